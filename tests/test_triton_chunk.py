"""The Triton chunked linear-attention kernels (backends/triton_chunk.py) against the PyTorch
implementation of the scan backend (scan_kernels.chunk_linear_attention).

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), at small
sizes. The kernels compute in float32; each output and gradient is judged against
scan_kernels in float64, its error (max abs, relative to the reference's max abs) bounded by
20x the error of scan_kernels itself run in float32, plus 1e-6: no hand-tuned atol.

K = 12 and V = 20 are not powers of two (masked channels), and the value block is capped at
16 so that two programs share the value channels (their dq, dk shares are summed).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc.backends import scan_kernels as sk

triton = pytest.importorskip("triton")
from rnnc.backends import triton_chunk as tc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import compile_offline  # noqa: E402

F64 = torch.float64
NAMES = ("o", "S_last", "dq", "dk", "dv", "dlog_decay", "dS0")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def key_parts(monkeypatch):
    """The leading size of every partial-sum tensor triton_chunk adds up (_summed), in order."""
    parts, real = [], tc._summed
    monkeypatch.setattr(tc, "_summed", lambda p: parts.append(p.shape[0]) or real(p))
    return parts


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    monkeypatch.setattr(tc, "MAX_BV", 16)


def make(B, L, H, K, V, per_channel, decays=None, seed=0):
    """q, k, v, log_decay, S0 in float64; decays: a function of a shape giving log-decays."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    shape = (B, L, H, K if per_channel else 1)
    if decays is None:  # a spread of decays, most in [-3, 0]
        g = torch.nn.functional.logsigmoid(2 * r(*shape) + 2)
    else:
        g = decays(shape, gen)
    return [r(B, L, H, K), r(B, L, H, K) / K ** 0.5, r(B, L, H, V), g, r(B, H, K, V)]


def run(fn, ins, dtype, include, chunk, has_q=True, seed=1):
    """Outputs and gradients (in float64) of fn at inputs cast to dtype, for random incoming
    gradients of o and S_last."""
    B, L, H, K = ins[1].shape
    V = ins[2].shape[-1]
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, L, H, V, generator=gen, dtype=F64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=F64)
    xs = [x.detach().to(dtype).requires_grad_() for x in ins]
    if not has_q:
        xs[0] = None
    o, S = fn(*xs, include_current=include, chunk=chunk)
    loss = (S.double() * dS).sum()
    if has_q:
        loss = loss + (o.double() * do).sum()
    loss.backward()
    res = {"o": o, "S_last": S, "dq": xs[0].grad if has_q else None, "dk": xs[1].grad,
           "dv": xs[2].grad, "dlog_decay": xs[3].grad, "dS0": xs[4].grad}
    return {n: None if t is None else t.detach().double() for n, t in res.items()}


def rel_err(x, ref):
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def check(ins, include, chunk=16, has_q=True, ours=None):
    """Our float32 results against scan_kernels: float64 is the reference, float32 the yardstick."""
    ref = run(sk.chunk_linear_attention, ins, F64, include, 16, has_q)
    ref32 = run(sk.chunk_linear_attention, ins, torch.float32, include, 16, has_q)
    ours = ours or run(tc.chunk_linear_attention, ins, torch.float32, include, chunk, has_q)
    bad = []
    for n in NAMES:
        if ref[n] is None:
            assert ours[n] is None
            continue
        assert torch.isfinite(ours[n]).all(), f"{n} is not finite"
        e, e32 = rel_err(ours[n], ref[n]), rel_err(ref32[n], ref[n])
        if not e <= 20 * e32 + 1e-6:
            bad.append(f"{n}: {e:.2e} vs scan float32 {e32:.2e}")
    assert not bad, bad


@pytest.mark.parametrize("L", [1, 17, 64])
@pytest.mark.parametrize("include", [True, False], ids=["current", "previous"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_matches_scan_reference(per_channel, include, L):
    """Forward and backward at chunk 16: one sub-chunk per chunk, the state passed on."""
    B = 1 if L == 64 else 2
    check(make(B, L, 2, 12, 20, per_channel), include)


@pytest.mark.parametrize("per_channel,include,chunk", [
    (True, True, 64), (True, False, 32), (False, False, 64), (False, True, 32)])
def test_several_sub_chunks_per_chunk(per_channel, include, chunk):
    """Chunks of 2 and 4 sub-chunks: the off-diagonal sub-blocks and their decays M_ij."""
    check(make(1, 40, 2, 12, 20, per_channel, seed=2), include, chunk)


@pytest.mark.parametrize("per_channel,include,split,has_q", [
    (True, True, False, True), (True, False, True, True), (False, True, True, True),
    (False, False, False, True), (True, True, True, False), (False, True, False, False)])
def test_key_split_matches_scan_reference(key_parts, per_channel, include, split, has_q):
    """The key axis split over programs (block_k=16 of K = 40: three key blocks, the last
    one masked), in the walk and the two levels: the outputs and dv are partial sums per
    key block, added up; the states and every gradient as without the split."""
    fn = lambda *a, **k: tc.chunk_linear_attention(*a, **k, split=split, block_k=16)  # noqa: E731
    ins = make(1, 21, 2, 40, 20, per_channel, seed=5)
    check(ins, include, 16, has_q, ours=run(fn, ins, torch.float32, include, 16, has_q))
    # the outputs (with q) and dv were split in three; dq and dk per value block, in two
    assert key_parts == ([3] if has_q else []) + ([2, 2, 3] if has_q else [2, 3])


def test_keys_beyond_one_program_are_split(monkeypatch, key_parts):
    """K past MAX_K: the default launch splits the keys (here K = 40 > MAX_K = 32: three
    blocks of 16), where it used to refuse; holding all K (block_k=0) is refused by name."""
    monkeypatch.setattr(tc, "MAX_K", 32)
    monkeypatch.setattr(tc, "SPLIT_K", 16)
    assert tc.default_config(40, 20).block_k == 16 and tc.default_config(32, 20).block_k == 0
    assert {c.block_k for c in tc.configs(40, 20, 64)} == {16}
    ins = make(1, 21, 1, 40, 20, True, seed=6)
    check(ins, True)
    assert key_parts[0] == 3
    with pytest.raises(rnnc.RnncError, match="block_k=0 holds all K = 40"):
        tc.chunk_linear_attention(*[x.float() for x in ins], chunk=16, block_k=0)
    for bad in (24, 8, -16):
        with pytest.raises(rnnc.RnncError, match="block_k must be 0 .all K. or a power of two"):
            tc.chunk_linear_attention(*[x.float() for x in ins], chunk=16, block_k=bad)


def _extreme(shape, gen):
    """Log-decays of -30 and -1e-6 per step, about one in ten exactly -inf (a decay of 0)."""
    u = torch.rand(*shape, generator=gen, dtype=F64)
    g = torch.where(u < 0.45, -30.0, -1e-6)
    return torch.where(u > 0.9, float("-inf"), g)


@pytest.mark.parametrize("has_q", [True, False], ids=["outputs", "state_only"])
@pytest.mark.parametrize("include", [True, False], ids=["current", "previous"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_extreme_decays(per_channel, include, has_q):
    """Decays of exactly 0 and down to exp(-30) per step: finite, and as accurate as scan."""
    ins = make(1, 40, 1, 12, 20, per_channel, decays=_extreme, seed=3)
    assert torch.isinf(ins[3]).any() and (ins[3] == -30).any() and (ins[3] == -1e-6).any()
    check(ins, include, 32, has_q)


def test_dlogdecay_rounding_is_absolute():
    """The known limit of the identity d log_decay = reverse cumsum (q dq - k dk): where every
    decay is exp(-30), the true d log_decay is ~1e-13 while the summed terms are O(1), so its
    error is float32 rounding of those terms, not of the gradient. Bounded here (and the other
    gradients stay relative)."""
    ins = make(1, 24, 1, 12, 20, True, decays=lambda s, g: torch.full(s, -30.0, dtype=F64))
    ours = run(tc.chunk_linear_attention, ins, torch.float32, True, 32)
    ref = run(sk.chunk_linear_attention, ins, F64, True, 16)
    q, k = ins[0], ins[1]
    terms = (q * ref["dq"]).abs().sum(1).max() + (k * ref["dk"]).abs().sum(1).max()
    err = (ours["dlog_decay"] - ref["dlog_decay"]).abs().max()
    assert err <= 8 * torch.finfo(torch.float32).eps * terms, (err, terms)
    assert ref["dlog_decay"].abs().max() < 1e-9          # so the error above is not relative
    for n in ("o", "S_last", "dq", "dk", "dv", "dS0"):
        assert rel_err(ours[n], ref[n]) < 1e-5, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """bfloat16 / float16 inputs are read and computed in float32: outputs float32, gradients
    in the input dtype, as accurate as the float32 path on the rounded inputs."""
    ins = [x.to(dtype).double() for x in make(1, 8, 2, 12, 16, True, seed=4)]
    ours = run(tc.chunk_linear_attention, ins, dtype, True, 16)
    xs = [x.to(dtype).requires_grad_() for x in ins]
    o, S = tc.chunk_linear_attention(*xs, chunk=16)
    assert o.dtype == S.dtype == torch.float32
    (o.sum() + S.sum()).backward()
    assert all(x.grad.dtype == dtype for x in xs)
    ref = run(sk.chunk_linear_attention, ins, F64, True, 16)
    for n in ("o", "S_last"):   # the gradients are rounded to dtype on the way out
        assert rel_err(ours[n], ref[n]) < 1e-5, n
    for n in ("dq", "dk", "dv", "dlog_decay", "dS0"):
        assert rel_err(ours[n], ref[n]) < 4 * torch.finfo(dtype).eps, n


def test_fla_oracle():
    """fla's naive recurrences (per-key GLA, scalar simple GLA) give the same outputs and final
    state. fla scales q by K**-0.5 in naive_recurrent_gla (no scale argument): q is
    pre-multiplied by K**0.5 there."""
    gla = pytest.importorskip("fla.ops.gla.naive")
    sgla = pytest.importorskip("fla.ops.simple_gla.naive")
    q, k, v, g, S0 = make(1, 12, 2, 16, 16, True, seed=5)
    K = q.shape[-1]
    o_ref, S_ref = gla.naive_recurrent_gla(q * K ** 0.5, k, v, g, initial_state=S0,
                                           output_final_state=True)
    o, S = tc.chunk_linear_attention(*(x.float() for x in (q, k, v, g, S0)), chunk=16)
    assert rel_err(o.double(), o_ref.double()) < 1e-5
    assert rel_err(S.double(), S_ref.double()) < 1e-5
    gs = g[..., :1]
    o_ref, S_ref = sgla.naive_recurrent_simple_gla(q, k, v, gs[..., 0], scale=1.0,
                                                   initial_state=S0, output_final_state=True)
    o, S = tc.chunk_linear_attention(*(x.float() for x in (q, k, v, gs, S0)), chunk=16)
    assert rel_err(o.double(), o_ref.double()) < 1e-5
    assert rel_err(S.double(), S_ref.double()) < 1e-5


def test_errors_are_clear():
    q, k, v, g, S0 = make(1, 5, 1, 4, 4, True)
    with pytest.raises(rnnc.RnncError, match="scan backend"):
        tc.chunk_linear_attention(q, k, v, g, S0)
    f = [x.float() for x in (q, k, v, g, S0)]
    with pytest.raises(rnnc.RnncError, match="chunk"):
        tc.chunk_linear_attention(*f, chunk=48)
    with pytest.raises(rnnc.RnncError, match="log_decay"):
        tc.chunk_linear_attention(f[0], f[1], f[2], f[3][..., :2], f[4])
    with pytest.raises(rnnc.RnncError, match="S0"):
        tc.chunk_linear_attention(*f[:4], f[4][..., :3])
    with pytest.raises(rnnc.RnncError, match="precision"):
        tc.chunk_linear_attention(*f, precision="fp16")


def test_compiles_for_gpu_without_one():
    """The three kernels compile down to an sm_90 cubin (Triton runs its whole pipeline on the
    CPU), in a process without the interpreter: per-key decay at chunk 32 (two sub-chunks,
    tf32), one decay per head, state only, at chunk 16, bf16 leaves (read as they are), and
    the key axis split in two."""
    code = ("from rnnc.backends import triton_chunk as tc\n"
            "a = tc.compile_for(K=64, V=64, chunk=32)\n"
            "b = tc.compile_for(K=16, V=16, chunk=16, scalar=True, include_current=False,\n"
            "                   precision='ieee')\n"
            "c = tc.compile_for(K=16, V=16, chunk=16, dtype='bf16', names=('chunk_fwd',))\n"
            "d = tc.compile_for(K=32, V=16, chunk=16, block_k=16,\n"
            "                   names=('chunk_fwd', 'chunk_out', 'chunk_dqkv'))\n"
            "assert all(n > 0 for n in [*a.values(), *b.values(), *c.values(), *d.values()])\n"
            "print('compiled')\n")
    compile_offline(code)
