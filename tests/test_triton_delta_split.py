"""The split (two-level) forward of the Triton delta-rule kernels (backends/triton_delta.py):
delta_ut (per chunk, in parallel), delta_state (the walk over chunks carrying the state) and
delta_out (per chunk and V block, in parallel), followed by the unchanged walk backward.

Runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py). The split is
forced either directly (`split=True` with an explicit chunk) or through the tuner with an
injected fake timer, and the kernel launches are recorded to prove which kernels ran.
Results are judged against `scan_kernels.chunk_delta_rule` in float64, within 20x that
PyTorch implementation's own float32 error plus 1e-6, as in test_triton_delta.py; the split
kernels are also compiled to sm_90 cubins in a process without the interpreter.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rnnc.backends import scan_kernels as sk

triton = pytest.importorskip("triton")
from rnnc.backends import triton_delta as td  # noqa: E402
from rnnc.backends import triton_tune as tune  # noqa: E402
from rnnc.backends.triton_tune import Config  # noqa: E402
from rnnc.backends import triton_gates as tg  # noqa: E402
from rnnc.backends.triton_gates import Stream  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, compare_to_sequential, compile_offline  # noqa: E402

F64, F32 = torch.float64, torch.float32
B, H = 2, 2
SPLIT = set(td.SPLIT_KERNELS)
FLOOR = 64 * torch.finfo(torch.float32).eps   # as test_triton_chunked.py

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """No injected timer, no cached choice, tuning on (unless a test says otherwise)."""
    monkeypatch.setattr(tune, "TIMER", None)
    monkeypatch.delenv("RNNC_TRITON_TUNE", raising=False)
    tune.clear()
    yield
    tune.clear()


class Launches:
    """Stands in for the kernel module: records (kernel, grid, C, BV) of every launch."""

    def __init__(self, module):
        self.module, self.log = module, []

    def __getattr__(self, name):
        fn, log = getattr(self.module, name), self.log

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    log.append((name, tuple(grid), kw.get("C"), kw.get("BV")))
                    return fn[grid](*args, **kw)
                return launch
        return Grid()

    def names(self):
        return [x[0] for x in self.log]


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the delta kernels, whichever operand streams they were generated for."""
    rec = Launches(None)
    real = td.kernels

    def kernels(*a, **k):
        rec.module = real(*a, **k)
        return rec
    monkeypatch.setattr(td, "kernels", kernels)
    return rec


def make(L, gated, shared, K=32, V=32, seed=0):
    """float64 (q, r, w, p, v, log_alpha, S0), DeltaNet-like (unit keys, w = beta k); p is w
    when shared, else a second write vector of the same size."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    k = torch.nn.functional.normalize(rn(B, L, H, K), dim=-1)
    w = torch.rand(B, L, H, 1, generator=g, dtype=F64) * k
    p = w if shared else 0.5 * torch.nn.functional.normalize(rn(B, L, H, K), dim=-1)
    la = torch.nn.functional.logsigmoid(rn(B, L, H) + 2.0) if gated else None
    return [rn(B, L, H, K), k, w, p, rn(B, L, H, V), la, rn(B, H, K, V)]


def run(fn, xs, shared, dtype, seed=1):
    """[o, S_last, d q, r, w, p, v, log_alpha, S0] of <o, go> + <S_last, gs> for random go, gs,
    the inputs cast to dtype; with shared, w is passed as p too (its gradient holds both)."""
    xs = [None if x is None else x.detach().to(dtype).requires_grad_() for x in xs]
    q, r, w, p, v, la, S0 = xs
    o, S = fn(q, r, w, w if shared else p, v, la, S0)
    gen = torch.Generator().manual_seed(seed)
    loss = (S.to(F64) * torch.randn(S.shape, generator=gen, dtype=F64)).sum()
    if o is not None:
        loss = loss + (o.to(F64) * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
    loss.backward()
    return [o, S] + [None if x is None or (shared and x is p) else x.grad for x in xs]


NAMES = ["o", "S_last", "dq", "dr", "dw", "dp", "dv", "dlog_alpha", "dS0"]


def judge(xs, shared, fn, floor=0.0):
    """fn's results against the float64 reference, within 20x its float32 error + 1e-6 (or
    + floor times the reference's largest magnitude, where that is more)."""
    ref_fn = lambda *a: sk.chunk_delta_rule(*a, chunk=16)  # noqa: E731
    ref, ref32 = run(ref_fn, xs, shared, F64), run(ref_fn, xs, shared, F32)
    got = run(fn, xs, shared, F32)
    bad = []
    for name, a, b, c in zip(NAMES, ref, ref32, got):
        assert (a is None) == (c is None), name
        if a is None:
            continue
        assert torch.isfinite(c).all(), name
        err32, err = (b.to(F64) - a).abs().max().item(), (c.to(F64) - a).abs().max().item()
        if not err <= 20 * err32 + max(1e-6, floor * a.abs().max().item()):
            bad.append(f"{name}: {err:.3g} vs float32 torch {err32:.3g}")
    assert not bad, bad
    return got


def assert_split_ran(rec, L, C, NV, has_q=True):
    """The three split kernels ran once each with chunk C on their grids, then the walk
    backward; the walk forward did not run."""
    NC = -(-L // C)
    want = [("delta_ut", (NC * B * H,)), ("delta_state", (B * H, NV))]
    if has_q:
        want.append(("delta_out", (NV * NC * B * H,)))
    assert [(n, g) for n, g, _, _ in rec.log if n in SPLIT] == want
    assert "delta_fwd" not in rec.names() and rec.names().count("delta_bwd") == 1
    assert {c for n, _, c, _ in rec.log} == {C}


# --- (1) the split forward, forced with an explicit chunk, then the walk backward -------------
SPLIT_CASES = {
    # id: (L, chunk, gated, shared, K, V, block_v, with q)
    "L1-c16-gated-w_is_p": (1, 16, True, True, 32, 32, None, True),
    "L17-c16-plain-w_ne_p-2vblocks": (17, 16, False, False, 32, 32, 16, True),
    "L37-c16-gated-w_ne_p": (37, 16, True, False, 32, 32, None, True),
    "L37-c32-plain-w_is_p-2vblocks": (37, 32, False, True, 32, 32, 16, True),
    "L64-c32-gated-w_is_p": (64, 32, True, True, 32, 32, None, True),
    "L37-c16-gated-w_ne_p-K24-V40-3vblocks": (37, 16, True, False, 24, 40, 16, True),
    "L17-c16-gated-w_is_p-K16-V48": (17, 16, True, True, 16, 48, None, True),
    "L37-c16-gated-w_is_p-state_only": (37, 16, True, True, 32, 32, None, False),
    "L64-c32-plain-w_ne_p-state_only": (64, 32, False, False, 32, 32, 16, False),
}


@pytest.mark.parametrize("L,chunk,gated,shared,K,V,block_v,has_q", SPLIT_CASES.values(),
                         ids=SPLIT_CASES.keys())
def test_split_matches_reference(launches, L, chunk, gated, shared, K, V, block_v, has_q):
    """Outputs, S_last and every gradient after a split forward."""
    xs = make(L, gated, shared, K, V)
    if not has_q:
        xs[0] = None
    got = judge(xs, shared, lambda *a: td.chunk_delta_rule(*a, chunk=chunk, block_v=block_v, split=True))
    assert (got[0] is None) == (not has_q)
    geo = td.geometry(L, K, V, chunk, block_v)
    assert_split_ran(launches, L, geo["C"], geo["NV"], has_q)


def _ops(q, r, w, p, v, la, shared):
    """The kernels' operand streams for materialised operands (p is w when shared)."""
    streams = [Stream.plain(x) for x in (q, r, w, p, v, la.unsqueeze(-1))]
    used = (True, True, True, not shared, True, True)
    return td._Ops(*tg.pack(streams, used), used)


@pytest.mark.parametrize("shared", [True, False], ids=["w_is_p", "w_ne_p"])
def test_extreme_log_decays(launches, shared):
    """Log-decays of -30 (the floor: alpha ~ 1e-13) and -1e-6 (alpha ~ 1), mixed: finite and
    correct (the clamp leaves -30 itself unchanged; the kernels' zero gradient there is within
    the bound, as the true one is ~1e-13). The gradients of w and p here are large (~50) and
    the reference's float32 error unusually small, so they are judged with a relative floor of
    64 float32 epsilons, as the model tests are; the walk forward gives the same gradients
    (the backward is the same), and the split forward's o, S_last and stored states are
    checked against the walk's directly, tightly."""
    L = 37
    xs = make(L, True, shared, seed=4)
    g = torch.Generator().manual_seed(5)
    xs[5] = torch.where(torch.rand(B, L, H, generator=g) < 0.4, -30.0, -1e-6).to(F64)
    judge(xs, shared, lambda *a: td.chunk_delta_rule(*a, chunk=16, block_v=16, split=True),
          floor=FLOOR)
    assert_split_ran(launches, L, 16, 2)
    q, r, w, p, v, la, S0 = [x.float() for x in xs]
    ops = _ops(q, r, w, p, v, la, shared)
    res = {}
    for split in (False, True):
        geo = td._geo(L, 32, 32, Config(16, 16, 2, split))
        out = td._forward_buffers(geo, ops, True, True)
        td._forward(geo, dict(HAS_LA=True, SHARED=shared), True, ops, S0, out)
        res[split] = out[:3]
    for name, a, b in zip(("o", "S_last", "hist"), res[False], res[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


def test_split_stores_the_walks_history():
    """Without autograd the split forward still stores its intermediates: the chunk-entry
    states it stores are the walk's (same layout, same values up to float32 rounding), as are
    o and S_last."""
    L, K, V = 37, 32, 32
    xs = [x.float() for x in make(L, True, False, K, V, seed=2)]
    q, r, w, p, v, la, S0 = xs
    ops = _ops(q, r, w, p, v, la, False)
    res = {}
    for split in (False, True):
        geo = td._geo(L, K, V, Config(16, 16, 2, split))
        out = td._forward_buffers(geo, ops, True, False)
        if split:
            assert out[2].shape == (B, H, 3, K, V) and out[3] is not None
        else:
            out = td._forward_buffers(geo, ops, True, True)     # the walk stores it for training
        td._forward(geo, dict(HAS_LA=True, SHARED=False), True, ops, S0, out)
        res[split] = out[:3]
    for name, a, b in zip(("o", "S_last", "hist"), res[False], res[True]):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(res[True][2][:, :, 0], S0, rtol=0, atol=0)


def test_bf16_inputs(launches):
    """bf16 inputs are read and converted: the split forward gives the walk's bf16 output
    and float32 S_last (the same float32 computation up to rounding), and the backward after
    it gradients in each input's dtype, finite."""
    q, r, w, _, v, la, S0 = [x.to(torch.bfloat16) for x in make(37, True, True, seed=6)]
    S0 = S0.float()
    res = {}
    for split in (False, True):
        leaves = [x.detach().clone().requires_grad_() for x in (q, r, w, v, la, S0)]
        lq, lr, lw, lv, lla, lS0 = leaves
        o, S = td.chunk_delta_rule(lq, lr, lw, lw, lv, lla, lS0, chunk=16, split=split)
        assert o.dtype == torch.bfloat16 and S.dtype == F32
        (o.float().sum() + S.sum()).backward()
        res[split] = (o, S, leaves)
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(res[True][1], res[False][1], rtol=1e-5, atol=1e-5)
    for a, b in zip(res[False][2], res[True][2]):
        assert b.grad.dtype == b.dtype and torch.isfinite(b.grad.float()).all()
        torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=2e-2, atol=2e-2)
    assert launches.names() == ["delta_fwd", "delta_bwd", *td.SPLIT_KERNELS, "delta_bwd"]


# --- (2) the tuner: split candidates, chosen by the timer -------------------------------------
def test_candidate_lists():
    """The forward's list ends with the split variants (chunks >= 32 leaving more than one
    chunk, one warps each), fewer than the walk's; the backward's has none; the default is the
    walk."""
    for (L, K, V), n_walk, n_split in [((37, 32, 32), 6, 2), ((4096, 64, 64), 15, 6),
                                       ((4096, 128, 128), 14, 6), ((16, 32, 32), 2, 0)]:
        cs = td.configs(L, K, V)
        walk, split = [c for c in cs if not c.split], [c for c in cs if c.split]
        assert (len(walk), len(split)) == (n_walk, n_split), (L, K, V, cs)
        assert cs == walk + split
        assert all(c.chunk >= 32 and L > c.chunk for c in split)
        assert not any(c.split for c in td.configs(L, K, V, 32, backward=True))
        assert not td.default_config(L, K, V).split


@pytest.mark.parametrize("shared", [True, False], ids=["w_is_p", "w_ne_p"])
def test_tuner_chooses_split(launches, monkeypatch, shared):
    """A timer that makes a split candidate the fastest forward: it runs (and the backward,
    tuned on the forward's chunk, reads its stored states)."""
    L, K, V = 37, 32, 32
    target = Config(32, 16, 2, True)
    assert target in td.configs(L, K, V)
    calls = []

    def timer(key, c, run):
        calls.append((key[0], c))
        return 0.0 if (key[0], c) == ("chunk_delta.fwd", target) else 1.0
    monkeypatch.setattr(tune, "TIMER", timer)
    judge(make(L, True, shared, K, V, seed=3), shared, lambda *a: td.chunk_delta_rule(*a))
    assert_split_ran(launches, L, 32, 2)
    timed = [c for fam, c in calls if fam == "chunk_delta.fwd"]
    assert set(timed) == set(td.configs(L, K, V)) | {td.default_config(L, K, V)}
    assert all(not c.split for fam, c in calls if fam == "chunk_delta.bwd")


def test_split_argument_restricts_the_tuner(launches, monkeypatch):
    """split=False with chunk=None times only walk candidates (the cost prefers splits)."""
    calls = []

    def timer(key, c, run):
        calls.append(c)
        return 0.0 if c.split else 1.0
    monkeypatch.setattr(tune, "TIMER", timer)
    x = [None if t is None else t.float() for t in make(37, False, True)]
    td.chunk_delta_rule(x[0], x[1], x[2], x[2], x[4], x[5], x[6], split=False)
    assert calls and not any(c.split for c in calls)
    assert launches.names() == ["delta_fwd"]


# --- (3) sm_90 cubins without a GPU -----------------------------------------------------------
def test_split_kernels_compile_for_gpu_without_one():
    """delta_ut, delta_state and delta_out compile to sm_90 cubins: with and without
    log_alpha, shared and separate w, p, float32 and bfloat16 inputs (delta_out only with q);
    and at a production size (K = V = 128, chunk 64, BV 64, 8 warps, tf32, bf16 inputs: the
    split candidate of that size) within sm_90's 227 KiB of shared memory per block and 255
    registers per thread."""
    code = ("from rnnc.backends import triton_delta as td\n"
            "a = td.compile_for(K=32, V=32, chunk=16, names=td.SPLIT_KERNELS,\n"
            "                   variants=[(True, True, True), (False, False, False)])\n"
            "b = td.compile_for(K=32, V=32, chunk=16, dtype='bf16', names=td.SPLIT_KERNELS,\n"
            "                   variants=[(True, True, False)])\n"
            "assert len(a) == 5 and len(b) == 3 and min(a.values()) > 0 and min(b.values()) > 0, (a, b)\n"
            "assert {k[0] for k in a} == set(td.SPLIT_KERNELS), a\n"
            "c = td.compile_for(K=128, V=128, chunk=64, dtype='bf16', dot_prec='tf32', block_v=64,\n"
            "                   warps=8, names=td.SPLIT_KERNELS, variants=[(True, True, True)],\n"
            "                   detail=True)\n"
            "assert len(c) == 3 and all(0 < d['shared'] <= 227 * 1024 for d in c.values()), c\n"
            "assert all((d['regs'] or 0) <= 255 for d in c.values()), c\n"
            "print('compiled', c)\n")
    compile_offline(code)


# --- (4) the models, split forced through the tuner, against the sequential backend -----------
@pytest.mark.parametrize("name,grad", [("gated_deltanet", False), ("gated_deltanet", True),
                                       ("deltanet", True)])
def test_models_with_split_forward(launches, monkeypatch, name, grad):
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")
    monkeypatch.setattr(tune, "TIMER", lambda key, c, run: 0.0 if c.split else 1.0)
    case = next(c for c in CASES if c.name == name)
    compare_to_sequential(case, "triton", 37, grad, floor=FLOOR)
    names = launches.names()
    assert "delta_fwd" not in names and {"delta_ut", "delta_state", "delta_out"} <= set(names)
    assert ("delta_bwd" in names) == grad
