"""Peers: other people's implementations of the recurrences in examples/, timed by `rnnc bench --peers`.

The table is explicit: `PEERS` maps an rnn block's name (elman, lstm, gru, gla, retnet, mamba2,
deltanet, gated_deltanet, kda, s6, hgrn, hgrn2, rwkv6, rwkv7) to the adapters that compute the same function. A spec is
recognised by its block name only, so every adapter is checked against rnnc's sequential
reference on the same inputs and params before it is timed (`rnnc.bench` does this): a block
that is called `gla` but computes something else makes the peer fail its check, and it is
never timed.

Each adapter maps rnnc's calling convention onto the peer's:

    peer.prepare(params, inputs, dims, requires_grad) -> Prepared
        params: {name: tensor} (rnnc's param values), inputs: rnnc inputs [B, T, *shape] in
        header order, all already on the device and in the benchmark dtype.
    prepared.run() -> raw            the timed call (forward only)
    prepared.output(raw) -> tensor   rnnc's first output [B, T, *shape], for the check
    prepared.leaves                  tensors whose grads a backward pass fills

What is timed: the peer's own call plus the gate algebra that maps rnnc's inputs onto the
peer's arguments (for mamba2 on simple GLA: k = dt B, g = -exp(A_log) dt), so that both sides
start from the same inputs. Pure layout changes (transposes to [B, H, T, K], padding to a
multiple of a chunk) are done once in `prepare`, outside the timed region.

Conventions of fla-core 0.6.0 (see PEERS.md): every naive function computes in fp32 and some
hard-code a q * K**-0.5 scale (undone here by multiplying q by K**0.5, or passing scale=1.0).
On CPU only the naive PyTorch references run (labelled "CPU reference": they are loops or
chunked einsums in eager PyTorch, not fla's kernels); on CUDA the Triton chunk_* kernels run.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Prepared:
    run: Callable[[], object]
    output: Callable[[object], torch.Tensor]
    leaves: list = field(default_factory=list)


@dataclass(frozen=True)
class Peer:
    rnn: str                 # the rnn block name it recognises
    name: str                # shown as the "backend" of its rows, e.g. "torch.nn.LSTM"
    package: str             # import name whose absence means "not installed"
    pip: str                 # what to pip install
    devices: tuple           # ("cpu", "cuda") or a subset
    prepare: Callable
    note: str = ""           # e.g. "CPU reference (eager PyTorch loop)"
    tol: float = 1e-4        # relative error allowed in the float32 check


def _import(module: str, attr: str | None = None):
    """Import quietly (fla warns "roll back to CPU" on a machine without a GPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def unavailable(peer: Peer, device: str) -> str | None:
    """Why the peer cannot run here ("not installed: ...", "needs CUDA"), or None."""
    if device not in peer.devices:
        return f"needs {'CUDA' if 'cuda' in peer.devices else 'CPU'}"
    if importlib.util.find_spec(peer.package) is None:
        return f"not installed (pip install {peer.pip})"
    try:
        _import(peer.package)
    except Exception as e:  # e.g. fla without triton, mamba-ssm with a mismatched ABI
        return f"not installed: importing {peer.package} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().contiguous().requires_grad_(requires_grad)


def _first(raw):
    return raw[0] if isinstance(raw, (tuple, list)) else raw


# ---------------------------------------------------------------------------------------------
# torch.nn: elman, lstm, gru (weight mapping from PEERS.md)
# ---------------------------------------------------------------------------------------------

def _torch_nn(kind: str):
    def prepare(params, inputs, dims, requires_grad):
        (x,) = inputs
        p = params
        if kind == "elman":
            H, D = p["W"].shape
            mod = torch.nn.RNN(D, H, nonlinearity="tanh", batch_first=True)
            Wih, Whh, bih = p["W"], p["U"], p["b"]
            bhh = torch.zeros_like(bih)
        elif kind == "lstm":
            H, D = p["Wi"].shape
            mod = torch.nn.LSTM(D, H, batch_first=True)
            Wih = torch.cat([p[f"W{g}"] for g in "ifgo"])
            Whh = torch.cat([p[f"U{g}"] for g in "ifgo"])
            bih = torch.cat([p[f"b{g}"] for g in "ifgo"])
            bhh = torch.zeros_like(bih)
        else:  # gru: b_hn stays inside the reset gate
            H, D = p["Wr"].shape
            mod = torch.nn.GRU(D, H, batch_first=True)
            Wih = torch.cat([p["Wr"], p["Wz"], p["Wn"]])
            Whh = torch.cat([p["Ur"], p["Uz"], p["Un"]])
            bih = torch.cat([p["br"], p["bz"], p["bn"]])
            bhh = torch.cat([torch.zeros_like(p["br"]), torch.zeros_like(p["bz"]), p["bhn"]])
        mod = mod.to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            mod.weight_ih_l0.copy_(Wih)
            mod.weight_hh_l0.copy_(Whh)
            mod.bias_ih_l0.copy_(bih)
            mod.bias_hh_l0.copy_(bhh)
        mod.requires_grad_(requires_grad)
        x = _leaf(x, requires_grad)
        return Prepared(run=lambda: mod(x)[0], output=lambda y: y,
                        leaves=[x, *mod.parameters()])
    return prepare


# ---------------------------------------------------------------------------------------------
# fla-core: CPU references (naive_*) and CUDA kernels (chunk_*)
# ---------------------------------------------------------------------------------------------

def _gla_call(chunk: bool):
    """fla's GLA as f(q, k, v, g) -> its result, with rnnc's readout o = S^T q: chunk_gla
    (CUDA) with scale 1, or naive_recurrent_gla (CPU), whose q scale K**-0.5 is hard-coded
    and undone by scaling q up."""
    if chunk:
        f = _import("fla.ops.gla", "chunk_gla")
        return lambda q, k, v, g: f(q, k, v, g, scale=1.0)
    f = _import("fla.ops.gla.naive", "naive_recurrent_gla")
    return lambda q, k, v, g: f(q * q.shape[-1] ** 0.5, k, v, g, output_final_state=False)


def _gla(chunk: bool):
    def prepare(params, inputs, dims, requires_grad):
        q, k, v, g = (_leaf(t, requires_grad) for t in inputs)
        f = _gla_call(chunk)
        return Prepared(run=lambda: f(q, k, v, g), output=_first, leaves=[q, k, v, g])
    return prepare


def _hgrn2(chunk: bool):
    """hgrn2(q, f, v), param lb[H], on fla's GLA as fla's HGRN2 layer runs it: the forget gate
    a = lb + (1 - lb) sigmoid(f) gives the key 1 - a and the log-decay log a."""
    def prepare(params, inputs, dims, requires_grad):
        q, f, v = (_leaf(t, requires_grad) for t in inputs)
        lb = _leaf(params["lb"], requires_grad)
        gla = _gla_call(chunk)

        def run():
            a = lb[:, None] + (1 - lb[:, None]) * torch.sigmoid(f)
            return gla(q, 1 - a, v, torch.log(a))
        return Prepared(run=run, output=_first, leaves=[q, f, v, lb])
    return prepare


def _rwkv6(chunk: bool):
    """rwkv6(r, k, v, w), param u[H, K]: fla's chunk_rwkv6 takes [B, T, H, K]; its naive
    reference takes [B, H, T, K] (PEERS.md) and returns that layout."""
    def prepare(params, inputs, dims, requires_grad):
        r, k, v, w = (_leaf(t, requires_grad) for t in inputs)
        u = _leaf(params["u"], requires_grad)
        if chunk:
            fn = _import("fla.ops.rwkv6", "chunk_rwkv6")
            return Prepared(run=lambda: fn(r, k, v, w, u, scale=1.0), output=_first,
                            leaves=[r, k, v, w, u])
        fn = _import("fla.ops.rwkv6.recurrent_naive", "naive_recurrent_rwkv6")
        tr = lambda t: t.transpose(1, 2)  # noqa: E731
        return Prepared(run=lambda: fn(tr(r), tr(k), tr(v), tr(w), u, scale=1.0),
                        output=lambda y: tr(_first(y)), leaves=[r, k, v, w, u])
    return prepare


def _kda(chunk: bool):
    """kda(q, k, v, g, beta): fla's chunk_kda (CUDA) and naive_recurrent_kda (CPU) take rnnc's
    layout [B, T, H, K] and the log decay g as they are."""
    def prepare(params, inputs, dims, requires_grad):
        q, k, v, g, beta = (_leaf(t, requires_grad) for t in inputs)
        f = _import("fla.ops.kda", "chunk_kda") if chunk else \
            _import("fla.ops.kda.naive", "naive_recurrent_kda")
        return Prepared(run=lambda: f(q, k, v, g, beta, scale=1.0), output=_first,
                        leaves=[q, k, v, g, beta])
    return prepare


def _kda_naive_chunk(params, inputs, dims, requires_grad):
    """fla's naive chunked KDA (chunk 64; T padded with steps of zero keys, values, beta and
    log decay, which leave the state alone, so the first T outputs are unchanged)."""
    f = _import("fla.ops.kda.naive", "naive_chunk_kda")
    T = inputs[0].shape[1]
    pad = (-T) % 64
    lay = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t  # noqa: E731
    q, k, v, g, beta = (_leaf(lay(t), requires_grad) for t in inputs)
    return Prepared(run=lambda: f(q, k, v, g, beta, scale=1.0, chunk_size=64),
                    output=lambda raw: _first(raw)[:, :T], leaves=[q, k, v, g, beta])


def _rwkv7(chunk: bool):
    """rwkv7(r, w, k, v, kk, a), param rk[H, K], as fla's RWKV-7 layer runs it: the
    diagonal-plus-low-rank recurrence with a = -kk, b = kk * a (chunk_rwkv7 on CUDA,
    [B, T, H, K]; dplr_recurrence on CPU, [B, H, T, K], its q scale K**-0.5 hard-coded and
    its a left uncast: both undone here), then the bonus (r . rk k) v added."""
    def prepare(params, inputs, dims, requires_grad):
        r, w, k, v, kk, a = (_leaf(t, requires_grad) for t in inputs)
        rk = _leaf(params["rk"], requires_grad)
        if chunk:
            f = _import("fla.ops.rwkv7", "chunk_rwkv7")
            core = lambda: _first(f(r, w, k, v, -kk, kk * a, scale=1.0))  # noqa: E731
        else:
            f = _import("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence")
            tr = lambda t: t.transpose(1, 2)  # noqa: E731
            core = lambda: tr(_first(f(tr(r) * r.shape[-1] ** 0.5, tr(k), tr(v),  # noqa: E731
                                       tr(-kk).float(), tr(kk * a), tr(w),
                                       output_final_state=False)))

        def run():
            o = core()
            return o + ((r * rk * k).sum(-1, keepdim=True) * v).to(o.dtype)
        return Prepared(run=run, output=lambda y: y, leaves=[r, w, k, v, kk, a, rk])
    return prepare


def _simple_gla(fn: str, module: str):
    """retnet (fixed per-head decay gamma) and mamba2 (SSD) on fla's simple GLA."""
    def prepare(params, inputs, dims, requires_grad):
        f = _import(module, fn)
        chunk = fn.startswith("chunk")
        if len(inputs) == 3:  # retnet(q, k, v), param gamma[H]
            q, k, v = (_leaf(t, requires_grad) for t in inputs)
            gamma = _leaf(params["gamma"], requires_grad)
            B, T, H, _ = q.shape
            leaves = [q, k, v, gamma]
            if chunk:
                run = lambda: f(q, k, v, g_gamma=torch.log(gamma.float()), scale=1.0)
            else:
                run = lambda: f(q, k, v, torch.log(gamma)[None, None, :].expand(B, T, H), scale=1.0)
            return Prepared(run=run, output=_first, leaves=leaves)
        # mamba2(x, dt, B, C), params A_log[H], Dskip[H]: q = C, k = dt B, v = x, g = -exp(A_log) dt
        x, dt, Bm, Cm = (_leaf(t, requires_grad) for t in inputs)
        A_log = _leaf(params["A_log"], requires_grad)
        Dskip = _leaf(params["Dskip"], requires_grad)

        def run():
            g = -torch.exp(A_log)[None, None, :] * dt
            o = _first(f(Cm, dt[..., None] * Bm, x, g, scale=1.0))
            return o + (Dskip[None, None, :, None] * x).to(o.dtype)
        return Prepared(run=run, output=lambda y: y, leaves=[x, dt, Bm, Cm, A_log, Dskip])
    return prepare


def _delta_recurrent(params, inputs, dims, requires_grad):
    f = _import("fla.ops.delta_rule.naive", "delta_rule_recurrence")
    tr = lambda t: t.transpose(1, 2)  # [B, T, H, ...] -> [B, H, T, ...]
    q, k, v, beta = (_leaf(tr(t), requires_grad) for t in inputs)
    K = q.shape[-1]
    return Prepared(run=lambda: f(q * K ** 0.5, k, v, beta, output_final_state=False),
                    output=lambda raw: tr(_first(raw)), leaves=[q, k, v, beta])


def _delta_chunkwise(params, inputs, dims, requires_grad):
    """fla's naive chunkwise delta rule (chunk 32; T padded with zero keys, which leave the
    state alone, so the first T outputs are unchanged)."""
    f = _import("fla.ops.delta_rule.naive", "delta_rule_chunkwise")
    T = inputs[0].shape[1]
    pad = (-T) % 32

    def lay(t):
        t = t.transpose(1, 2)  # [B, H, T, ...]
        if pad:
            t = F.pad(t, (0, 0, 0, pad)) if t.dim() == 4 else F.pad(t, (0, pad))
        return t
    q, k, v, beta = (_leaf(lay(t), requires_grad) for t in inputs)
    K = q.shape[-1]
    return Prepared(run=lambda: f(q * K ** 0.5, k, v, beta, chunk_size=32),
                    output=lambda raw: _first(raw)[:, :, :T].transpose(1, 2),
                    leaves=[q, k, v, beta])


def _delta_chunk(params, inputs, dims, requires_grad):
    q, k, v, beta = (_leaf(t, requires_grad) for t in inputs)
    f = _import("fla.ops.delta_rule", "chunk_delta_rule")
    return Prepared(run=lambda: f(q, k, v, beta, scale=1.0), output=_first, leaves=[q, k, v, beta])


def _gated_delta(fn: str, module: str):
    """g = log(alpha); the recurrent naive takes (beta, g), the chunked ones (g, beta)."""
    def prepare(params, inputs, dims, requires_grad):
        q, k, v, alpha, beta = (_leaf(t, requires_grad) for t in inputs)
        f = _import(module, fn)
        if fn == "naive_recurrent_gated_delta_rule":
            run = lambda: f(q, k, v, beta, torch.log(alpha), scale=1.0)
        else:
            run = lambda: f(q, k, v, torch.log(alpha), beta, scale=1.0)
        return Prepared(run=run, output=_first, leaves=[q, k, v, alpha, beta])
    return prepare


def _hgrn(fn: str, module: str):
    def prepare(params, inputs, dims, requires_grad):
        x, g = (_leaf(t, requires_grad) for t in inputs)
        f = _import(module, fn)
        return Prepared(run=lambda: f(x, g), output=_first, leaves=[x, g])
    return prepare


# ---------------------------------------------------------------------------------------------
# mamba-ssm and accelerated-scan (CUDA)
# ---------------------------------------------------------------------------------------------

def _selective_scan(params, inputs, dims, requires_grad):
    """s6 on mamba-ssm's fused selective scan: u, delta [B, D, T], A [D, N], B, C [B, N, T]."""
    f = _import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    x, dt, Bm, Cm = (_leaf(t.transpose(1, 2), requires_grad) for t in inputs)
    A_log = _leaf(params["A_log"].float(), requires_grad)
    Dskip = _leaf(params["Dskip"].float(), requires_grad)
    return Prepared(run=lambda: f(x, dt, -torch.exp(A_log), Bm, Cm, Dskip),
                    output=lambda y: _first(y).transpose(1, 2),
                    leaves=[x, dt, Bm, Cm, A_log, Dskip])


def _ssd_combined(params, inputs, dims, requires_grad):
    """mamba2 on mamba-ssm's Triton SSD: x [B, T, H, P], dt [B, T, H], B, C [B, T, G=H, N]."""
    f = _import("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    x, dt, Bm, Cm = (_leaf(t, requires_grad) for t in inputs)
    A_log = _leaf(params["A_log"].float(), requires_grad)
    Dskip = _leaf(params["Dskip"].float(), requires_grad)
    return Prepared(run=lambda: f(x, dt, -torch.exp(A_log), Bm, Cm, chunk_size=64, D=Dskip),
                    output=_first, leaves=[x, dt, Bm, Cm, A_log, Dskip])


def _accelerated_scan(params, inputs, dims, requires_grad):
    """hgrn on accelerated-scan's warp kernel: x[t] = gate[t] x[t-1] + token[t] on (B, D, T),
    T padded to a power of two >= 32 (zero tokens at the end leave earlier outputs alone)."""
    f = _import("accelerated_scan.warp", "scan")
    T = inputs[0].shape[1]
    Tp = max(32, 1 << (T - 1).bit_length())

    def lay(t):
        t = t.transpose(1, 2)
        return F.pad(t, (0, Tp - T)) if Tp != T else t
    x, g = (_leaf(lay(t), requires_grad) for t in inputs)
    return Prepared(run=lambda: f(torch.exp(g).contiguous(), x),
                    output=lambda y: y[..., :T].transpose(1, 2), leaves=[x, g])


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

_FLA = dict(package="fla", pip="fla-core triton")
_CPU_REF = "CPU reference: fla's eager PyTorch code, not its kernels"

PEERS: dict[str, tuple] = {
    "elman": (Peer("elman", "torch.nn.RNN", "torch", "torch", ("cpu", "cuda"), _torch_nn("elman")),),
    "lstm": (Peer("lstm", "torch.nn.LSTM", "torch", "torch", ("cpu", "cuda"), _torch_nn("lstm")),),
    "gru": (Peer("gru", "torch.nn.GRU", "torch", "torch", ("cpu", "cuda"), _torch_nn("gru")),),
    "gla": (
        Peer("gla", "fla naive_recurrent_gla", devices=("cpu",), prepare=_gla(False), note=_CPU_REF, **_FLA),
        Peer("gla", "fla chunk_gla", devices=("cuda",), prepare=_gla(True), **_FLA),
    ),
    "rwkv6": (
        Peer("rwkv6", "fla naive_recurrent_rwkv6", devices=("cpu",), prepare=_rwkv6(False),
             note=_CPU_REF, **_FLA),
        Peer("rwkv6", "fla chunk_rwkv6", devices=("cuda",), prepare=_rwkv6(True), **_FLA),
    ),
    "kda": (
        Peer("kda", "fla naive_recurrent_kda", devices=("cpu",), prepare=_kda(False),
             note=_CPU_REF, **_FLA),
        Peer("kda", "fla naive_chunk_kda", devices=("cpu",), prepare=_kda_naive_chunk,
             note=_CPU_REF, **_FLA),
        Peer("kda", "fla chunk_kda", devices=("cuda",), prepare=_kda(True), **_FLA),
    ),
    "rwkv7": (
        Peer("rwkv7", "fla dplr_recurrence", devices=("cpu",), prepare=_rwkv7(False),
             note=_CPU_REF, **_FLA),
        Peer("rwkv7", "fla chunk_rwkv7", devices=("cuda",), prepare=_rwkv7(True), **_FLA),
    ),
    "hgrn2": (
        Peer("hgrn2", "fla naive_recurrent_gla", devices=("cpu",), prepare=_hgrn2(False),
             note=_CPU_REF, **_FLA),
        Peer("hgrn2", "fla chunk_gla", devices=("cuda",), prepare=_hgrn2(True), **_FLA),
    ),
    "retnet": (
        Peer("retnet", "fla naive_recurrent_simple_gla", devices=("cpu",), note=_CPU_REF,
             prepare=_simple_gla("naive_recurrent_simple_gla", "fla.ops.simple_gla.naive"), **_FLA),
        Peer("retnet", "fla naive_chunk_simple_gla", devices=("cpu",), note=_CPU_REF,
             prepare=_simple_gla("naive_chunk_simple_gla", "fla.ops.simple_gla.naive"), **_FLA),
        Peer("retnet", "fla chunk_simple_gla", devices=("cuda",),
             prepare=_simple_gla("chunk_simple_gla", "fla.ops.simple_gla"), **_FLA),
    ),
    "mamba2": (
        Peer("mamba2", "fla naive_recurrent_simple_gla", devices=("cpu",), note=_CPU_REF,
             prepare=_simple_gla("naive_recurrent_simple_gla", "fla.ops.simple_gla.naive"), **_FLA),
        Peer("mamba2", "fla naive_chunk_simple_gla", devices=("cpu",), note=_CPU_REF,
             prepare=_simple_gla("naive_chunk_simple_gla", "fla.ops.simple_gla.naive"), **_FLA),
        Peer("mamba2", "fla chunk_simple_gla", devices=("cuda",),
             prepare=_simple_gla("chunk_simple_gla", "fla.ops.simple_gla"), **_FLA),
        Peer("mamba2", "mamba_ssm mamba_chunk_scan_combined", "mamba_ssm", "mamba-ssm", ("cuda",),
             _ssd_combined, tol=1e-3),
    ),
    "deltanet": (
        Peer("deltanet", "fla delta_rule_recurrence", devices=("cpu",), note=_CPU_REF,
             prepare=_delta_recurrent, **_FLA),
        Peer("deltanet", "fla delta_rule_chunkwise", devices=("cpu",), note=_CPU_REF,
             prepare=_delta_chunkwise, **_FLA),
        Peer("deltanet", "fla chunk_delta_rule", devices=("cuda",), prepare=_delta_chunk, **_FLA),
    ),
    "gated_deltanet": (
        Peer("gated_deltanet", "fla naive_recurrent_gated_delta_rule", devices=("cpu",), note=_CPU_REF,
             prepare=_gated_delta("naive_recurrent_gated_delta_rule", "fla.ops.gated_delta_rule.naive"),
             **_FLA),
        Peer("gated_deltanet", "fla naive_chunk_gated_delta_rule", devices=("cpu",), note=_CPU_REF,
             prepare=_gated_delta("naive_chunk_gated_delta_rule", "fla.ops.gated_delta_rule.naive"),
             **_FLA),
        Peer("gated_deltanet", "fla chunk_gated_delta_rule", devices=("cuda",),
             prepare=_gated_delta("chunk_gated_delta_rule", "fla.ops.gated_delta_rule"), **_FLA),
    ),
    "hgrn": (
        Peer("hgrn", "fla naive_recurrent_hgrn", devices=("cpu",), note=_CPU_REF,
             prepare=_hgrn("naive_recurrent_hgrn", "fla.ops.hgrn.naive"), **_FLA),
        Peer("hgrn", "fla chunk_hgrn", devices=("cuda",), prepare=_hgrn("chunk_hgrn", "fla.ops.hgrn"), **_FLA),
        Peer("hgrn", "fla fused_recurrent_hgrn", devices=("cuda",),
             prepare=_hgrn("fused_recurrent_hgrn", "fla.ops.hgrn"), **_FLA),
        Peer("hgrn", "accelerated_scan warp", "accelerated_scan", "accelerated-scan", ("cuda",),
             _accelerated_scan),
    ),
    "s6": (
        Peer("s6", "mamba_ssm selective_scan_fn", "mamba_ssm", "mamba-ssm", ("cuda",), _selective_scan,
             tol=1e-3),
    ),
}


def peers_for(rnn_name: str) -> tuple:
    """The adapters for an rnn block name (empty when none is known)."""
    return PEERS.get(rnn_name, ())
