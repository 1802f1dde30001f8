#!/usr/bin/env python
"""The Triton backend on a CUDA GPU against hand-written peers, side by side in one run.

    python benchmarks/triton_gpu.py                  # full sizes (under ~6 min on an H100)
    python benchmarks/triton_gpu.py --quick          # small sizes: a smoke run on the GPU
    python benchmarks/triton_gpu.py --cases lstm,scan,fla
    python benchmarks/triton_gpu.py --dry-run        # CPU: tiny sizes, backend="sequential"

Writes <out>/triton_gpu.json and <out>/triton_gpu.md (default out: benchmarks/results, or
benchmarks/results/quick with --quick) and prints the table.

Cases (--cases, comma-separated; "fla" = gla,retnet,gated_deltanet):

    lstm     examples/lstm.rnn, B=16 T=1024 D=H=768, fp32 and bf16 inputs, vs torch.nn.LSTM (cuDNN)
    lstm_sync  lstm with RNNC_TRITON_WIDE=persistent (the wide kernels in one launch per pass)
    gru      examples/gru.rnn, same sizes, vs torch.nn.GRU (cuDNN)
    mhlstm   an inline multi-head LSTM (NH heads of width E, NH*E = 768, E = 64 and 32), vs
             torch.nn.LSTM(768) with the block-diagonal weights copied in: the same function,
             computed by cuDNN as a dense 768x768 recurrence (width-matched, dense cost)
    s6       examples/s6.rnn, B=4 T=4096 D=1536 N=16, vs mamba-ssm selective_scan_fn
    scan     an inline first-order scan h = a*h + b, B=8 T=4096 D=1536, fp32 and bf16, vs
             accelerated-scan (scalar = Triton; warp = CUDA, only when nvcc is found); reports
             bandwidth = 3 * B*T*D * element size (a, b read, h written) / time
    gla, retnet, gated_deltanet
             examples/*.rnn, B=4 T=2048 H=8 K=V=64, vs fla fused_recurrent_gla /
             fused_recurrent_simple_gla / fused_recurrent_gated_delta_rule (--fla-chunk adds
             fla's chunk_* kernels from rnnc/peers.py; their autotuning costs minutes)
    chunk_gla, chunk_retnet, chunk_mamba2, chunk_gated_deltanet   (alias "chunk")
             issue 6's shapes: examples/*.rnn at B=8 H=16 K=V=128 (mamba2: N=P=128),
             T in {2048, 8192}, bf16 inputs, vs fla chunk_gla / chunk_simple_gla (retnet,
             mamba2) / chunk_gated_delta_rule, and mamba-ssm mamba_chunk_scan_combined for
             mamba2. Each case's first calls compile and tune both sides (minutes), so
             run them one per command (benchmarks/gpu_session.sh chunk1 .. chunk4).
    chunk_hgrn2, chunk_rwkv6   (not in "chunk")
             the same shapes: examples/hgrn2.rnn vs fla chunk_gla, handed the key 1 - a and
             the log-decay log a that rnnc computes inside its kernels; examples/rwkv6.rnn vs
             fla chunk_rwkv6 (the bonus u computed in rnnc's kernels)
    gru_small, mhlstm_small
             small states over long sequences (GRU H=64; a multi-head LSTM, 16 heads of 16), B=16
             T=4096, vs cuDNN: the case for --backend newton (Newton iterations, DEER)
    chunk_kda, chunk_rwkv7   (not in "chunk")
             the same shapes: examples/kda.rnn vs fla chunk_kda, examples/rwkv7.rnn vs fla
             chunk_rwkv7 (a delta rule decayed per key channel: rnnc runs the triton_dplr chunk
             kernels; RNNC_TRITON_KERNEL=fused times its fused recurrent kernel instead)

Every implementation is first checked against rnnc's sequential backend (float64 reference,
B=2, T=128, relative error max|got - want| / max|want| <= 5e-3 in fp32, since matmuls may run
in TF32; <= 5e-2 on bf16-rounded inputs). One that fails its check, or raises, is not timed:
its row says why, and the script goes on. A peer whose package is missing says "not installed".

Timing: the first call is timed on its own (it includes Triton's JIT compile); then
`triton.testing.do_bench` (warm-up, L2 flushed before each call, median and 20/80% quantiles).
Forward runs under torch.no_grad(); forward+backward is the backward of the sum of the outputs,
with grads for inputs and params. ratio = peer ms / rnnc ms (> 1: rnnc is faster).

If a CUDA error poisons the process (illegal memory access, device-side assert), the remaining
cases run in a fresh child process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from unittest import mock
from dataclasses import dataclass, field
from pathlib import Path

from rnnc.peers import _first, _import, _leaf  # the adapters below follow rnnc.peers' convention

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"

CHUNK_CASES = ("chunk_gla", "chunk_retnet", "chunk_mamba2", "chunk_gated_deltanet")
# chunked cases beyond issue 6's four: the same shapes, not in the "chunk" alias
MORE_CHUNK_CASES = ("chunk_hgrn2", "chunk_rwkv6", "chunk_kda", "chunk_rwkv7")
CHUNKED = CHUNK_CASES + MORE_CHUNK_CASES   # every case of a chunked plan at issue 6's shapes
ALL_CASES = ("lstm", "lstm_sync", "gru", "mhlstm", "s6", "scan", "gla", "retnet",
             "gated_deltanet") + CHUNKED + ("gru_small", "mhlstm_small")
ALIASES = {"fla": ("gla", "retnet", "gated_deltanet"), "chunk": CHUNK_CASES, "all": ALL_CASES}

CHECK_B, CHECK_T = 2, 128
TOL = {"float32": 5e-3, "bfloat16": 5e-2}
PASSES = ("forward", "forward+backward")

# Peak HBM bandwidth by device name (B/s), first match wins; RNNC_PEAK_GBPS overrides, and a
# device not listed falls back on memory clock x bus width (rnnc.bench._peak_gbps).
PEAK_BW = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
           ("GH200", 4.0e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12),
           ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12),
           ("A10G", 0.6e12), ("4090", 1.008e12)]

# Errors after which the CUDA context is unusable: the rest runs in a new process.
POISON = ("illegal memory access", "device-side assert", "unspecified launch failure",
          "misaligned address", "illegal instruction", "CUDA error: an illegal",
          "CUBLAS_STATUS_EXECUTION_FAILED", "cudaErrorLaunchFailure")

# A multi-head LSTM: NH independent heads of width E, each with its own E x E recurrence.
MHLSTM_SPEC = """
# Multi-head LSTM: NH independent heads of width E (block-diagonal recurrence)
rnn mhlstm(x[D]) -> h[NH,E] {
    param Wi[NH,E,D], Wf[NH,E,D], Wg[NH,E,D], Wo[NH,E,D]
    param Ri[NH,E,E], Rf[NH,E,E], Rg[NH,E,E], Ro[NH,E,E]
    param bi[NH,E], bf[NH,E], bg[NH,E], bo[NH,E]
    state h[NH,E] = 0, c[NH,E] = 0
    i[a,e] = sigmoid(sum[d](Wi[a,e,d] * x[d]) + sum[u](Ri[a,e,u] * h[a,u]) + bi[a,e])
    f[a,e] = sigmoid(sum[d](Wf[a,e,d] * x[d]) + sum[u](Rf[a,e,u] * h[a,u]) + bf[a,e])
    g[a,e] = tanh(sum[d](Wg[a,e,d] * x[d]) + sum[u](Rg[a,e,u] * h[a,u]) + bg[a,e])
    o[a,e] = sigmoid(sum[d](Wo[a,e,d] * x[d]) + sum[u](Ro[a,e,u] * h[a,u]) + bo[a,e])
    c = f * c + i * g
    h = o * tanh(c)
}
"""

# The minimal first-order scan: a (gate) and b (token) are inputs, nothing else is computed.
SCAN_SPEC = """
# First-order linear scan h[t] = a[t] * h[t-1] + b[t]
rnn linscan(a[D], b[D]) -> h[D] {
    state h[D] = 0
    h = a * h + b
}
"""


# ---------------------------------------------------------------------------------------------
# imports
# ---------------------------------------------------------------------------------------------

def _interpret_autotune_patch():
    """Dry run on CPU: fla's kernels run under TRITON_INTERPRET=1, but triton's autotuner
    benchmarks its configs through a GPU driver; keep only the first config so none is needed."""
    try:
        from triton.runtime import autotuner
    except Exception:
        return
    if getattr(autotuner.Autotuner, "_rnnc_patched", False):
        return
    orig = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: orig(self, kwargs)[:1]
    autotuner.Autotuner._rnnc_patched = True
    # mamba-ssm's SSD wrappers enter torch.cuda.device(x.device.index), which is None on CPU.
    import contextlib
    import torch
    real = torch.cuda.device
    torch.cuda.device = lambda d: contextlib.nullcontext() if d is None or (
        isinstance(d, torch.device) and d.type == "cpu") else real(d)


MAMBA_TRITON = HERE / "wheels" / "mamba_ssm_triton"  # fetch_wheels.sh: mamba-ssm's Python, no CUDA build


def _mamba_triton_path() -> str | None:
    """mamba-ssm is published as an sdist whose build needs nvcc; its Triton SSD kernels need
    no build. When mamba_ssm is not importable and fetch_wheels.sh laid out its Python files
    (with a package __init__ that skips the CUDA selective scan), put them on sys.path."""
    import importlib.util
    if importlib.util.find_spec("mamba_ssm") is not None or not (MAMBA_TRITON / "mamba_ssm").is_dir():
        return None
    sys.path.insert(0, str(MAMBA_TRITON))
    _mamba_triton_path.used = True
    return f"mamba_ssm from {MAMBA_TRITON.relative_to(ROOT)} (Triton kernels only, no CUDA extension)"


_mamba_triton_path.used = False


def _short(e: BaseException) -> str:
    from rnnc.errors import RnncError
    text = e.message if isinstance(e, RnncError) else str(e)
    line = " ".join(text.strip().split("\n")[:1]) if text.strip() else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return line if isinstance(e, RnncError) else f"{type(e).__name__}: {line}"


def _version(dist: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version(dist)
        except PackageNotFoundError:
            if dist == "mamba-ssm" and _mamba_triton_path.used:
                return "2.3.2.post1 (Python files only, from benchmarks/wheels)"
            return "not installed"
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# peers (the rnnc.peers convention: prepare(params, inputs, dims, requires_grad) -> Prepared)
# ---------------------------------------------------------------------------------------------

def _mhlstm_cudnn(params, inputs, dims, requires_grad):
    """torch.nn.LSTM(D, NH*E) with block-diagonal recurrent weights: the same function as
    mhlstm, but cuDNN runs the dense (NH*E) x (NH*E) recurrence."""
    import torch
    (x,) = inputs
    p = params
    NH, E, D = p["Wi"].shape
    mod = torch.nn.LSTM(D, NH * E, batch_first=True).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        mod.weight_ih_l0.copy_(torch.cat([p[f"W{g}"].reshape(NH * E, D) for g in "ifgo"]))
        mod.weight_hh_l0.copy_(torch.cat([torch.block_diag(*p[f"R{g}"].unbind(0)) for g in "ifgo"]))
        mod.bias_ih_l0.copy_(torch.cat([p[f"b{g}"].reshape(NH * E) for g in "ifgo"]))
        mod.bias_hh_l0.zero_()
    mod.requires_grad_(requires_grad)
    x = _leaf(x, requires_grad)
    from rnnc.peers import Prepared
    return Prepared(run=lambda: mod(x)[0], output=lambda y: y.reshape(*y.shape[:2], NH, E),
                    leaves=[x, *mod.parameters()])


def _acc_scan(module: str):
    """accelerated-scan: x[t] = gate[t] x[t-1] + token[t] on contiguous (B, C, T). The warp
    kernel needs T a power of two (>= 32): zero tokens appended leave earlier outputs alone.
    The transposes to (B, D, T) are done once, outside the timed call."""
    def prepare(params, inputs, dims, requires_grad):
        import torch.nn.functional as F
        from rnnc.peers import Prepared
        f = _import(module, "scan")
        T = inputs[0].shape[1]
        Tp = max(32, 1 << (T - 1).bit_length()) if module.endswith("warp") else T

        def lay(t):
            t = t.transpose(1, 2)
            return F.pad(t, (0, Tp - T)) if Tp != T else t
        a, b = (_leaf(lay(t), requires_grad) for t in inputs)
        return Prepared(run=lambda: f(a, b), output=lambda y: y[..., :T].transpose(1, 2),
                        leaves=[a, b])
    return prepare


def _fla_gla(params, inputs, dims, requires_grad):
    from rnnc.peers import Prepared
    f = _import("fla.ops.gla", "fused_recurrent_gla")
    q, k, v, g = (_leaf(t, requires_grad) for t in inputs)
    return Prepared(run=lambda: f(q, k, v, gk=g, scale=1.0), output=_first, leaves=[q, k, v, g])


def _fla_retnet(params, inputs, dims, requires_grad):
    """retnet(q, k, v), param gamma[H]: simple GLA with a data-independent log decay g_gamma."""
    import torch
    from rnnc.peers import Prepared
    f = _import("fla.ops.simple_gla", "fused_recurrent_simple_gla")
    q, k, v = (_leaf(t, requires_grad) for t in inputs)
    gamma = _leaf(params["gamma"].float(), requires_grad)
    return Prepared(run=lambda: f(q, k, v, g_gamma=torch.log(gamma), scale=1.0), output=_first,
                    leaves=[q, k, v, gamma])


def _fla_gated_delta(params, inputs, dims, requires_grad):
    """fused_recurrent_gated_delta_rule(q, k, v, g, gk, gv, beta, ...): g and beta must be
    passed by keyword (the positional order differs from chunk_gated_delta_rule's)."""
    import torch
    from rnnc.peers import Prepared
    f = _import("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule")
    q, k, v, alpha, beta = (_leaf(t, requires_grad) for t in inputs)
    return Prepared(run=lambda: f(q, k, v, g=torch.log(alpha), beta=beta, scale=1.0),
                    output=_first, leaves=[q, k, v, alpha, beta])


@dataclass
class PeerSpec:
    peer: object                  # an rnnc.peers.Peer
    checked: bool = True          # compared with the reference before timing
    interpretable: bool = False   # Triton code that runs on CPU under TRITON_INTERPRET=1 (dry run)
    needs: str | None = None      # an extra requirement, e.g. "nvcc"


def _peers_for(case: str, fla_chunk: bool) -> list:
    from rnnc import peers as P
    Peer = P.Peer
    fla = dict(package="fla", pip="fla-core triton")
    if case in ("lstm", "gru", "lstm_sync", "gru_small"):  # torch.nn.LSTM / GRU, our weights (cuDNN)
        return [PeerSpec(P.peers_for(case.removesuffix("_sync").removesuffix("_small"))[0])]
    if case in ("mhlstm", "mhlstm_small"):
        return [PeerSpec(Peer("mhlstm", "torch.nn.LSTM(NH*E) cuDNN, block-diagonal weights", "torch",
                              "torch", ("cpu", "cuda"), _mhlstm_cudnn))]
    if case == "s6":
        return [PeerSpec(P.peers_for("s6")[0])]  # mamba_ssm selective_scan_fn
    if case == "scan":
        return [PeerSpec(Peer("linscan", "accelerated_scan scalar (Triton)", "accelerated_scan",
                              "accelerated-scan", ("cuda",), _acc_scan("accelerated_scan.scalar")),
                         interpretable=True),
                PeerSpec(Peer("linscan", "accelerated_scan warp (CUDA)", "accelerated_scan",
                              "accelerated-scan", ("cuda",), _acc_scan("accelerated_scan.warp")),
                         needs="nvcc")]
    if case in CHUNKED:  # fla's chunk kernels, and mamba-ssm's SSD for mamba2 (which, unlike
        # fla's chunk kernels, runs under Triton's interpreter in float32: the dry run checks it)
        return [PeerSpec(p, interpretable=p.package == "mamba_ssm")
                for p in P.peers_for(case[len("chunk_"):]) if "chunk" in p.name and "cuda" in p.devices]
    out = []
    if case == "gla":
        out.append(PeerSpec(Peer("gla", "fla fused_recurrent_gla", devices=("cuda",), prepare=_fla_gla,
                                 **fla), interpretable=True))
    elif case == "retnet":
        out.append(PeerSpec(Peer("retnet", "fla fused_recurrent_simple_gla", devices=("cuda",),
                                 prepare=_fla_retnet, **fla), interpretable=True))
    elif case == "gated_deltanet":
        out.append(PeerSpec(Peer("gated_deltanet", "fla fused_recurrent_gated_delta_rule",
                                 devices=("cuda",), prepare=_fla_gated_delta, **fla),
                            interpretable=True))
    if fla_chunk:
        out += [PeerSpec(p) for p in P.peers_for(case) if "chunk_" in p.name and "cuda" in p.devices]
    return out


def _peer_unavailable(ps: PeerSpec, device: str, dry: bool) -> str | None:
    from rnnc import peers as P
    peer = ps.peer
    if ps.needs == "nvcc" and device == "cuda" and not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        return "needs nvcc (compiles a CUDA extension at import): not found"
    if device == "cpu" and "cpu" not in peer.devices:
        if not (dry and ps.interpretable and os.environ.get("TRITON_INTERPRET") == "1"):
            return "needs CUDA"
        device = "cuda"  # dry run: Triton interpreter; only the package is checked below
    return P.unavailable(peer, device)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    key: str                  # the --cases name
    label: str                # shown in the table
    spec: object              # a path or .rnn source text
    dims: dict
    B: int
    T: int
    dtypes: tuple = ("float32",)
    bandwidth: bool = False   # report 3 * B*T*D * element size / time
    note: str = ""
    check_B: int = CHECK_B    # batch of the correctness check
    env: dict = field(default_factory=dict)  # environment variables set while the case runs
    peers: list = field(default_factory=list)


def build_cases(keys, mode: str, fla_chunk: bool, chunk_T=None) -> list:
    """mode: "full", "quick" or "dry"; chunk_T: the lengths of the chunk cases (their mode's
    when None)."""
    def pick(full, quick, dry):
        return {"full": full, "quick": quick, "dry": dry}[mode]
    two = ("float32", "bfloat16")
    out = []
    for key in keys:
        if key in ("lstm", "gru"):
            H = pick(768, 256, 16)
            B, T = pick((16, 1024), (4, 256), (2, 16))
            out.append(Case(key, key, EXAMPLES / f"{key}.rnn", dict(D=H, H=H), B, T, two,
                            note="cuDNN in bf16 computes with bf16 weights; rnnc computes in fp32 "
                                 "(bf16 inputs are read as they are); at H=768 rnnc runs its wide "
                                 "kernels, checked at B=16 (their tl.dot path)",
                            check_B=16))
        elif key == "lstm_sync":  # the wide kernels' one-launch form, not yet the default
            H = pick(768, 256, 16)
            B, T = pick((16, 1024), (4, 256), (2, 16))
            out.append(Case(key, "lstm, wide kernels in one launch", EXAMPLES / "lstm.rnn",
                            dict(D=H, H=H), B, T, note="RNNC_TRITON_WIDE=persistent: the wide "
                            "kernels' programs wait for each other between steps inside one launch",
                            check_B=16, env={"RNNC_TRITON_WIDE": "persistent"}))
        elif key == "mhlstm":
            H = pick(768, 256, 16)
            D = H
            B, T = pick((16, 1024), (4, 256), (2, 16))
            for E in pick((64, 32), (64,), (8,)):
                out.append(Case(key, f"mhlstm E={E}", MHLSTM_SPEC, dict(D=D, NH=H // E, E=E), B, T,
                                note=f"cuDNN runs the dense {H}x{H} recurrence with the "
                                     f"block-diagonal weights copied in: same function, same total "
                                     f"width, but dense cost (width-matched, not head-aware)"))
        elif key == "gru_small":   # small states for the newton backend (DEER)
            B, T = pick((16, 4096), (4, 512), (2, 16))
            H = pick(64, 32, 8)
            out.append(Case(key, "gru H=64", EXAMPLES / "gru.rnn", dict(D=H, H=H), B, T,
                            note="small state, long sequence: the newton backend's case (run it "
                                 "with --backend newton)"))
        elif key == "mhlstm_small":
            B, T = pick((16, 4096), (4, 512), (2, 16))
            NH, E = pick((16, 16), (8, 16), (2, 4))
            out.append(Case(key, f"mhlstm {NH}x{E}", MHLSTM_SPEC, dict(D=NH * E, NH=NH, E=E), B, T,
                            note="heads of 16: block-diagonal Jacobians for the newton backend"))
        elif key == "s6":
            B, T = pick((4, 4096), (2, 512), (2, 16))
            dims = pick(dict(D=1536, N=16), dict(D=256, N=16), dict(D=8, N=4))
            out.append(Case(key, key, EXAMPLES / "s6.rnn", dims, B, T))
        elif key == "scan":
            B, T = pick((8, 4096), (2, 1024), (2, 32))
            D = pick(1536, 256, 8)
            out.append(Case(key, "scan h=a*h+b", SCAN_SPEC, dict(D=D), B, T, two, bandwidth=True,
                            note="peers take (B, D, T): the transposes are done once, untimed"))
        elif key in ("gla", "retnet", "gated_deltanet"):
            B, T = pick((4, 2048), (2, 256), (2, 16))
            dims = pick(dict(H=8, K=64, V=64), dict(H=2, K=64, V=64), dict(H=2, K=16, V=16))
            out.append(Case(key, key, EXAMPLES / f"{key}.rnn", dims, B, T))
        elif key in CHUNKED:
            name = key[len("chunk_"):]
            B = pick(8, 2, 2)
            H, K = pick((16, 128), (4, 64), (2, 16))
            dims = dict(H=H, N=K, P=K) if name == "mamba2" else dict(H=H, K=K, V=K)
            for T in chunk_T or pick((2048, 8192), (1024,), (33,)):
                # (the dry run uses float32: Triton's interpreter mishandles mamba-ssm's bf16 dots)
                out.append(Case(key, name, EXAMPLES / f"{name}.rnn", dims, B, T,
                                pick(("bfloat16",), ("bfloat16",), ("float32",)),
                                note="issue 6's shapes; bf16 inputs, fp32 state and accumulation"))
        else:
            raise ValueError(key)
    for c in out:
        c.peers = _peers_for(c.key, fla_chunk)
    return out


def _not_run(case: Case, backend: str, why: str) -> list:
    """The rows of a case that was not run (or whose set-up failed): one per dtype."""
    return [{"case": case.key, "label": case.label, "B": case.B, "T": case.T, "dims": case.dims,
             "dtype": dn, "pass": "forward", "backend": backend, "rnnc_ok": False,
             "rnnc_error": why, "rnnc_ms": None, "peer": None, "note": case.note}
            for dn in case.dtypes]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, rep_ms: int, warmup_ms: int) -> dict:
    """The first call alone (Triton compiles here), then the median of timed calls."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    if device == "cuda":
        # A slow call (> 0.5 s once compiled) gets three plain calls, not do_bench's dozens.
        t0 = time.perf_counter()
        fn()
        _sync(device)
        second_ms = (time.perf_counter() - t0) * 1e3
        if second_ms > 500:
            times = [second_ms]
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            return {"first_ms": first_ms, "ms": statistics.median(times), "ms_p20": min(times),
                    "ms_p80": max(times), "timer": "3 calls, perf_counter + synchronize (slow call)"}
        try:
            from triton.testing import do_bench
            q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return {"first_ms": first_ms, "ms": float(q[0]), "ms_p20": float(q[1]),
                    "ms_p80": float(q[2]), "timer": "triton.testing.do_bench (L2 flushed)"}
        except (ImportError, TypeError, AttributeError):
            pass
        import torch
        n_warm = max(1, min(20, int(warmup_ms / max(first_ms, 1e-3))))
        for _ in range(n_warm):
            fn()
        times = []
        while len(times) < 5 or (sum(times) < rep_ms and len(times) < 200):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        timer = "CUDA events"
    else:  # dry run: Triton's interpreter is slow, one or three timed calls are enough
        times = []
        for _ in range(1 if first_ms > 200 else 3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        timer = "perf_counter (CPU dry run)"
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"first_ms": first_ms, "ms": statistics.median(times), "ms_p20": q(0.2),
            "ms_p80": q(0.8), "timer": timer}


def peak_bandwidth() -> tuple:
    """(bytes/s, where the number comes from) for the current CUDA device."""
    import torch
    env = os.environ.get("RNNC_PEAK_GBPS")
    if env:
        try:
            return float(env) * 1e9, "RNNC_PEAK_GBPS"
        except ValueError:
            pass
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_BW:
        if key in name:
            return bw, f"name table ({key})"
    try:
        from rnnc.bench import _peak_gbps
        g = _peak_gbps()
        if g:
            return g * 1e9, "memory clock x bus width"
    except Exception:
        pass
    return None, "unknown"


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------

def run_case(case: Case, args, device: str, log) -> list:
    import torch
    import rnnc
    from rnnc import analysis
    from rnnc.bench import DTYPES, _make_inputs, _module_fns, _outs, _peer_fns, _rel_err, input_kinds

    rec = rnnc.load(case.spec)
    facts = analysis.analyse(rec)
    kinds = input_kinds(rec, facts)
    sizes = dict(case.dims)
    B, T = case.B, case.T
    passes = PASSES[:1] if args.forward_only else PASSES
    base = {"case": case.key, "label": case.label, "spec": rec.name, "plan": facts.plan,
            "B": B, "T": T, "dims": sizes, "inputs": kinds, "note": case.note}
    rows = []

    # Reference: the sequential backend, seeded params shared by everyone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        ref = rnnc.compile(case.spec, backend="sequential", **sizes)
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ref.to(device=device, dtype=torch.float64)
    Bc, Tc = min(B, case.check_B), min(T, CHECK_T)
    xs_c = _make_inputs(rec, kinds, sizes, Bc, Tc, torch.float64, device, args.seed + 1)
    with torch.no_grad():
        want = {"float32": _outs(ref(*xs_c))}
        for dn in case.dtypes:
            if dn != "float32":
                want[dn] = _outs(ref(*[x.to(DTYPES[dn]).double() for x in xs_c]))

    def check_inputs(dn):
        return [x.to(DTYPES[dn]) for x in xs_c]
    check_desc = f"vs sequential float64, B={Bc}, T={Tc}"

    # rnnc under test: compile, check per dtype.
    status = {}  # dtype -> (ok, reason, err)
    m = None
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            m = rnnc.compile(case.spec, backend=args.backend, **sizes)
        m.load_state_dict(ref_state)
        m.to(device=device, dtype=torch.float32)
        compile_ms = (time.perf_counter() - t0) * 1e3
    except Exception as e:
        compile_ms = None
        for dn in case.dtypes:
            status[dn] = (False, f"rnnc.compile(backend={args.backend!r}) raised {_short(e)}", None)
        log(f"    rnnc {args.backend}: compile failed: {_short(e)}")
    if m is not None:
        for dn in case.dtypes:
            try:
                with torch.no_grad():
                    got = _outs(m(*check_inputs(dn)))
                err = _rel_err(got, want[dn])
                if err <= TOL[dn]:
                    status[dn] = (True, "", err)
                else:
                    status[dn] = (False, f"disagrees: rel err {err:.2e} > {TOL[dn]:g} ({dn} {check_desc}); "
                                         f"not timed", err)
            except Exception as e:
                status[dn] = (False, f"raised {_short(e)} in the check ({dn} {check_desc})", None)
            log(f"    rnnc {args.backend} check {dn}: "
                + ("ok" if status[dn][0] else "FAILED") + (f" (rel err {status[dn][2]:.1e})" if status[dn][2] is not None else "")
                + ("" if status[dn][0] else f": {status[dn][1]}"))

    # Peers: availability, then a check per dtype.
    peer_status = []  # per peer: dtype -> (ok, reason, err)
    for ps in case.peers:
        why = _peer_unavailable(ps, device, args.dry_run)
        st = {}
        for dn in case.dtypes:
            if why:
                st[dn] = (False, why, None)
                continue
            if not ps.checked:
                st[dn] = (True, "not checked (a different function)", None)
                continue
            try:
                params = {k: v.to(device=device, dtype=DTYPES[dn]) for k, v in ref_state.items()}
                with torch.no_grad():
                    prep = ps.peer.prepare(params, check_inputs(dn), sizes, False)
                    got = (prep.output(prep.run()),)
                err = _rel_err(got, want[dn][:1])
                st[dn] = ((True, "", err) if err <= TOL[dn] else
                          (False, f"disagrees with rnnc's sequential reference: rel err {err:.2e} > "
                                  f"{TOL[dn]:g} ({dn} {check_desc}); not timed", err))
            except Exception as e:
                st[dn] = (False, f"raised {_short(e)} in the check ({dn} {check_desc})", None)
        for dn in case.dtypes:
            ok, reason, err = st[dn]
            log(f"    peer {ps.peer.name} {dn}: " + ("ok" if ok else reason)
                + (f" (rel err {err:.1e})" if ok and err is not None else ""))
        peer_status.append(st)

    # Timing, per dtype: rnnc, then every peer that passed.
    bw_peak = args.peak_bw
    for dn in case.dtypes:
        dt = DTYPES[dn]
        try:
            xs = _make_inputs(rec, kinds, sizes, B, T, dt, device, args.seed + 2)
        except Exception as e:
            xs = None
            log(f"    inputs {dn}: {_short(e)}")
        elem = torch.empty((), dtype=dt).element_size()
        nbytes = 3 * B * T * sizes.get("D", 0) * elem if case.bandwidth else None

        def timed(fns, what):
            res = {}
            for p, fn in zip(PASSES, fns):
                if p not in passes:
                    continue
                try:
                    r = measure(fn, device, args.rep_ms, args.warmup_ms)
                    if nbytes and p == "forward":
                        r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
                        r["bw_fraction"] = (nbytes / (r["ms"] * 1e-3) / bw_peak) if bw_peak else None
                    res[p] = r
                    log(f"    {what} {dn} {p}: {r['ms']:.3f} ms (first call {r['first_ms']:.0f} ms)")
                except Exception as e:
                    res[p] = {"error": f"raised {_short(e)} while timed ({dn}, B={B}, T={T})"}
                    log(f"    {what} {dn} {p}: {res[p]['error']}")
                    if device == "cuda":
                        torch.cuda.empty_cache()
            return res

        r_ok, r_reason, r_err = status[dn]
        rnnc_res = {}
        if r_ok and xs is not None:
            try:
                rnnc_res = timed(_module_fns(m, xs), f"rnnc {args.backend}")
            except Exception as e:
                rnnc_res = {p: {"error": f"raised {_short(e)}"} for p in passes}
        peer_res = []
        for ps, st in zip(case.peers, peer_status):
            ok, reason, err = st[dn]
            if not ok or xs is None:
                peer_res.append({})
                continue
            # mhlstm E=64 and E=32 share one cuDNN LSTM of the same width: time it once.
            width = ({"D": sizes["D"], "H": sizes["NH"] * sizes["E"]} if case.key == "mhlstm" else sizes)
            key = (case.key, ps.peer.name, dn, B, T, tuple(sorted(width.items())))
            if key in _PEER_CACHE:
                peer_res.append(_PEER_CACHE[key])
                continue
            try:
                params = {k: v.to(device=device, dtype=dt) for k, v in ref_state.items()}
                t0 = time.perf_counter()
                fns = _peer_fns(ps.peer, params, xs, sizes)
                res = timed(fns, f"peer {ps.peer.name}")
                res["setup_ms"] = (time.perf_counter() - t0) * 1e3
            except Exception as e:
                res = {p: {"error": f"raised {_short(e)} in set-up"} for p in passes}
            _PEER_CACHE[key] = res
            peer_res.append(res)

        for p in passes:
            rr = rnnc_res.get(p, {})
            row_base = {**base, "dtype": dn, "pass": p, "backend": args.backend,
                        "rnnc_ok": bool(r_ok and "ms" in rr),
                        "rnnc_error": (r_reason if not r_ok else rr.get("error")),
                        "rnnc_check_err": r_err, "rnnc_compile_ms": compile_ms,
                        "rnnc_ms": rr.get("ms"), "rnnc_ms_p20": rr.get("ms_p20"),
                        "rnnc_ms_p80": rr.get("ms_p80"), "rnnc_first_call_ms": rr.get("first_ms"),
                        "rnnc_gbps": rr.get("gbps"), "rnnc_bw_fraction": rr.get("bw_fraction"),
                        "timer": rr.get("timer"), "bytes_model": nbytes if p == "forward" else None}
            if not case.peers:
                rows.append({**row_base, "peer": None})
            for ps, st, pr in zip(case.peers, peer_status, peer_res):
                ok, reason, err = st[dn]
                q = pr.get(p, {})
                peer_ms = q.get("ms")
                ratio = (peer_ms / rr["ms"]) if (peer_ms and rr.get("ms")) else None
                rows.append({**row_base, "peer": ps.peer.name, "peer_ok": peer_ms is not None,
                             "peer_error": reason if not ok else q.get("error"),
                             "peer_note": ps.peer.note, "peer_check_err": err,
                             "peer_ms": peer_ms, "peer_ms_p20": q.get("ms_p20"),
                             "peer_ms_p80": q.get("ms_p80"), "peer_first_call_ms": q.get("first_ms"),
                             "peer_gbps": q.get("gbps"), "peer_bw_fraction": q.get("bw_fraction"),
                             "ratio_peer_over_rnnc": ratio})
        del xs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


_PEER_CACHE: dict = {}  # a peer timed once per (case, dtype, sizes): mhlstm E=64/E=32 share cuDNN


def dry_checks(log) -> list:
    """Extra checks of the script's own logic, on CPU: the block-diagonal cuDNN mapping for
    mhlstm with one head equals examples/lstm.rnn."""
    import torch
    import rnnc
    notes = []
    torch.manual_seed(0)
    m1 = rnnc.compile(MHLSTM_SPEC, D=6, NH=1, E=5)
    lstm = rnnc.compile(EXAMPLES / "lstm.rnn", D=6, H=5)
    sd = {k: (v[0] if v.dim() >= 2 else v[0]) for k, v in m1.state_dict().items()}
    sd = {("U" + k[1:] if k[0] == "R" else k): v for k, v in sd.items()}
    lstm.load_state_dict(sd)
    x = torch.randn(2, 9, 6)
    with torch.no_grad():
        err = float((m1(x)[:, :, 0] - lstm(x)).abs().max())
    msg = f"dry check: mhlstm with NH=1 equals examples/lstm.rnn: max abs diff {err:.1e}"
    log("  " + msg)
    notes.append(msg)
    if err > 1e-5:
        raise AssertionError(msg)
    return notes


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def _ms(x):
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _bw(gbps, frac):
    if gbps is None:
        return ""
    return f"{gbps:.3g}" + (f" ({100 * frac:.0f}%)" if frac else "")


def render_md(meta, rows) -> str:
    L = [f"# rnnc `{meta['backend']}` backend vs hand-written peers ({meta['mode']})", ""]
    dev = meta.get("device_name") or "CPU (dry run: no timing meaning)"
    L.append(f"- **Device:** {dev}" + (f", sm_{meta['capability']}" if meta.get("capability") else "")
             + (f"; peak HBM bandwidth {meta['peak_bw'] / 1e12:.2f} TB/s ({meta['peak_bw_source']})"
                if meta.get("peak_bw") else ""))
    v = meta["versions"]
    L.append(f"- **Software:** torch {v['torch']} (CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}), "
             f"triton {v['triton']}, Python {v['python']}; TF32 matmul={meta['tf32_matmul']}, "
             f"cuDNN TF32={meta['tf32_cudnn']}; rnnc chunk-kernel products: "
             f"RNNC_TRITON_DOT={meta.get('chunk_dot', 'auto')}")
    L.append("- **Peers:** " + ", ".join(f"{k} {v['peers'][k]}" for k in v["peers"]))
    L.append(f"- **When:** {meta['date']}, rnnc {meta['rnnc_commit']}; `{meta['command']}` took "
             f"{meta['elapsed_s']:.0f} s")
    L.append("")
    L.append("Times in ms: the median of timed calls after warm-up; *1st call* is the first call "
             "alone, which includes Triton's JIT compile. ratio = peer ms / rnnc ms: > 1 means rnnc "
             "is faster. Every implementation was "
             f"checked against rnnc's sequential backend first (float64 reference, B={CHECK_B}, "
             f"T=min(T, {CHECK_T}); "
             "rel err ≤ 5e-3 fp32, ≤ 5e-2 on bf16 inputs).")
    L.append("")
    bw = any(r.get("rnnc_gbps") or r.get("peer_gbps") for r in rows)
    hdr = ["case", "sizes", "dtype", "pass", f"rnnc {meta['backend']} ms", "1st call ms", "peer", "peer ms",
           "ratio"] + (["rnnc GB/s (% peak)", "peer GB/s (% peak)"] if bw else [])
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "|".join("---" if i < 4 or h == "peer" else "---:" for i, h in enumerate(hdr)) + "|")
    for r in rows:
        sizes = f"B={r['B']} T={r['T']} " + " ".join(f"{k}={v}" for k, v in r["dims"].items())
        rnnc_ms = _ms(r["rnnc_ms"]) if r["rnnc_ok"] else "error¹" if r.get("rnnc_error") else "–"
        if r.get("peer") is None:
            peer, pms, ratio = "–", "–", "–"
        else:
            peer = r["peer"]
            if r.get("peer_ok"):
                pms = _ms(r["peer_ms"])
            else:
                e = r.get("peer_error") or "–"
                pms = "not installed²" if e.startswith("not installed") else e if len(e) <= 40 else "error²"
            ratio = f"{r['ratio_peer_over_rnnc']:.2f}×" if r.get("ratio_peer_over_rnnc") else "–"
        cells = [r["label"], sizes, r["dtype"], r["pass"], rnnc_ms, _ms(r.get("rnnc_first_call_ms")),
                 peer, pms, ratio]
        if bw:
            cells += [_bw(r.get("rnnc_gbps"), r.get("rnnc_bw_fraction")),
                      _bw(r.get("peer_gbps"), r.get("peer_bw_fraction"))]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    errs = {}  # (mark, case, who, message) -> ["dtype pass", ...]
    for r in rows:
        where = f"{r['dtype']} {r['pass']}"
        if r.get("rnnc_error"):
            errs.setdefault(("¹", r["label"], f"rnnc {r['backend']}", r["rnnc_error"]), []).append(where)
        if r.get("peer") and not r.get("peer_ok") and r.get("peer_error") and (
                len(r["peer_error"]) > 40 or r["peer_error"].startswith("not installed")):
            errs.setdefault(("²", r["label"], r["peer"], r["peer_error"]), []).append(where)
    if errs:
        L.append("Errors and untimed rows:")
        L.append("")
        for (mark, label, who, msg), wh in errs.items():
            L.append(f"- {mark} {label} ({', '.join(dict.fromkeys(wh))}): {who}: {msg}")
        L.append("")
    notes = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["label"], r["note"])
        if r.get("peer_note"):
            notes.setdefault(r["peer"], r["peer_note"])
    L.append("Notes:")
    L.append("")
    for k, n in notes.items():
        L.append(f"- {k}: {n}")
    if bw:
        L.append("- GB/s: bytes of the minimal algorithm (a, b read, h written: 3·B·T·D·element size, "
                 "in the input dtype) / median forward time. rnnc's fused and scan kernels read "
                 "bf16 inputs and write bf16 outputs as they are, computing in fp32.")
    L.append("- first call: includes Triton compilation of the kernels for that pass; "
             "rnnc.compile itself (rnnc compile ms in the JSON) is separate.")
    for n in meta.get("notes", []):
        L.append(f"- {n}")
    return "\n".join(L) + "\n"


def _write(out: Path, meta: dict, rows: list) -> str:
    """Writes out/triton_gpu.json and out/triton_gpu.md; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    md = render_md(meta, rows)
    (out / "triton_gpu.md").write_text(md)
    return md


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine_meta(args, device) -> dict:
    import torch
    meta = {"mode": "dry run" if args.dry_run else "quick" if args.quick else "full",
            "backend": args.backend, "device": device, "date": datetime.datetime.now(
                datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "rnnc_commit": _git_commit(), "platform": platform.platform(),
            "command": "python benchmarks/triton_gpu.py " + " ".join(args.argv),
            "chunk_dot": os.environ.get("RNNC_TRITON_DOT") or "auto",
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    versions = {"torch": torch.__version__, "python": platform.python_version(),
                "triton": _version("triton"),
                "peers": {d: _version(d) for d in ("fla-core", "flash-linear-attention", "mamba-ssm",
                                                   "causal-conv1d", "accelerated-scan")}}
    if device == "cuda":
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = torch.backends.cudnn.version()
        meta["device_name"] = torch.cuda.get_device_name()
        cap = torch.cuda.get_device_capability()
        meta["capability"] = f"{cap[0]}{cap[1]}"
        meta["peak_bw"], meta["peak_bw_source"] = peak_bandwidth()
    meta["versions"] = versions
    return meta


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="triton_gpu.py",
        description="Time rnnc's Triton backend against hand-written peers on a CUDA GPU "
                    "(cuDNN LSTM/GRU, mamba-ssm, accelerated-scan, fla); write JSON and markdown.",
        epilog=f"cases: {', '.join(ALL_CASES)}; aliases: fla = gla,retnet,gated_deltanet; "
               f"chunk = {','.join(CHUNK_CASES)}; all")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run on the GPU")
    ap.add_argument("--cases", default="all", help="comma-separated case names (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: benchmarks/results; benchmarks/results/quick with "
                         "--quick; a temporary folder with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny sizes, backend=sequential by default: validates the script "
                         "(fla peers run under TRITON_INTERPRET=1)")
    ap.add_argument("--backend", default=None,
                    help="rnnc backend under test (default: triton; sequential with --dry-run)")
    ap.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    ap.add_argument("--fla-chunk", action="store_true",
                    help="also time fla's chunk_* kernels (autotuning adds minutes)")
    ap.add_argument("--rep-ms", type=int, default=None, help="do_bench timed window per measurement "
                    "(default 200; 50 with --quick)")
    ap.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up window (default 25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-T", default=None,
                    help="comma-separated lengths of the chunk cases (default 2048,8192)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no case after this many seconds (the rest are listed as not run), "
                         "for a GPU session with a fixed budget; results are written after every "
                         "case, so a command killed at its limit still leaves them")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.chunk_T = tuple(int(t) for t in args.chunk_T.split(",")) if args.chunk_T else None
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.backend is None:
        args.backend = "sequential" if args.dry_run else "triton"
    if args.rep_ms is None:
        args.rep_ms = 50 if args.quick else 200
    keys = []
    for k in (s.strip() for s in args.cases.split(",")):
        if not k:
            continue
        for kk in ALIASES.get(k, (k,)):
            if kk not in ALL_CASES:
                ap.error(f"unknown case {kk!r} (cases: {', '.join(ALL_CASES)}; aliases: fla, chunk, all)")
            if kk not in keys:
                keys.append(kk)
    if not keys:
        ap.error("--cases names no case")
    args.keys = keys
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton/fla are imported
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        _interpret_autotune_patch()
    t_start = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    mamba_note = _mamba_triton_path()
    meta = machine_meta(args, device)
    args.peak_bw = meta.get("peak_bw")
    mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    cases = build_cases(args.keys, mode, args.fla_chunk, args.chunk_T)
    notes = [mamba_note] if mamba_note else []
    if args.dry_run:
        notes.append("dry run: CPU, tiny sizes; times mean nothing; it checks that every spec, "
                     "module, peer adapter and output path works")
        notes += dry_checks(log)
    rows = []
    poisoned = None
    done_keys = []
    out = args.out
    if out is None and not args.child:
        out = Path(tempfile.mkdtemp(prefix="triton_gpu_dry_")) if args.dry_run else \
            HERE / "results" / ("quick" if args.quick else "")
    for i, case in enumerate(cases):
        spent = time.perf_counter() - t_start
        if args.deadline_s is not None and spent > args.deadline_s:
            log(f"[{spent:5.0f} s] {case.label} T={case.T}: not run (deadline)")
            rows += _not_run(case, args.backend, f"not run: the {args.deadline_s:.0f} s deadline "
                                                 f"(--deadline-s) had passed")
            continue
        log(f"[{spent:5.0f} s] {case.label}: B={case.B} T={case.T} {case.dims}")
        try:
            with mock.patch.dict(os.environ, case.env):
                case_rows = run_case(case, args, device, log)
        except Exception as e:  # the reference itself or the inputs: record and go on
            log(traceback.format_exc())
            case_rows = _not_run(case, args.backend, f"case set-up raised {_short(e)}")
        rows += case_rows
        done_keys.append(case.key)
        if out is not None:  # so far: what a command killed at its time limit leaves behind
            meta["notes"], meta["elapsed_s"] = notes, time.perf_counter() - t_start
            _write(out, meta, rows)
        text = " ".join(str(r.get("rnnc_error") or "") + " " + str(r.get("peer_error") or "")
                        for r in case_rows)
        if any(p in text for p in POISON):
            poisoned = case.label
            break
    if poisoned is not None:
        rest = [k for k in args.keys if k not in done_keys]
        notes.append(f"a CUDA error in {poisoned} poisoned the process; "
                     f"{', '.join(rest) or 'nothing'} ran in a fresh process")
        if rest:
            log(f"CUDA context poisoned by {poisoned}: running {', '.join(rest)} in a new process")
            with tempfile.TemporaryDirectory() as td:
                child_out = Path(td) / "child.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--cases", ",".join(rest),
                       "--backend", args.backend, "--rep-ms", str(args.rep_ms), "--warmup-ms",
                       str(args.warmup_ms), "--seed", str(args.seed), "--child", str(child_out)]
                if args.chunk_T:
                    cmd += ["--chunk-T", ",".join(map(str, args.chunk_T))]
                if args.deadline_s is not None:
                    left = args.deadline_s - (time.perf_counter() - t_start)
                    cmd += ["--deadline-s", f"{max(0.0, left):.0f}"]
                cmd += [flag for flag, on in (("--quick", args.quick), ("--dry-run", args.dry_run),
                                              ("--forward-only", args.forward_only),
                                              ("--fla-chunk", args.fla_chunk)) if on]
                subprocess.run(cmd)
                if child_out.exists():
                    child = json.loads(child_out.read_text())
                    rows += child["rows"]
                    notes += child["meta"].get("notes", [])
                else:
                    notes.append(f"the child process for {', '.join(rest)} wrote nothing")
    meta["notes"] = notes
    meta["elapsed_s"] = time.perf_counter() - t_start
    if args.child:
        args.child.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        return 0
    md = _write(out, meta, rows)
    print(md)
    print(f"wrote {out / 'triton_gpu.json'} and {out / 'triton_gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
