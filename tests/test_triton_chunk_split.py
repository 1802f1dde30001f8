"""The two-level ("split") mode of the Triton chunked linear-attention kernels
(backends/triton_chunk.py, Config.split): chunk_states + chunk_out forward, chunk_dstates +
chunk_dqkv backward, against the PyTorch implementation of the scan backend
(scan_kernels.chunk_linear_attention) and, at model level, the sequential backend.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py). The split
configs are candidates of the tuner, which times nothing here: a fake timer
(`triton_tune.TIMER`, as in test_triton_tune.py) makes it choose them, or for the cases the
tuner never offers (a forward without q) `split=True` forces them. Every run records the
kernel launches to show which kernels ran, with which grid. Results are judged as in
test_triton_chunk.py: against scan_kernels in float64, within 20x scan_kernels' own float32
error plus 1e-6.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rnnc.backends import scan_kernels as sk

triton = pytest.importorskip("triton")
from rnnc.backends import triton_chunk as tc  # noqa: E402
from rnnc.backends import triton_tune as tune  # noqa: E402
from rnnc.backends.triton_tune import Config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, compare_to_sequential, compile_offline  # noqa: E402

F64, F32 = torch.float64, torch.float32
NAMES = ("o", "S_last", "dq", "dk", "dv", "dlog_decay", "dS0")
WALK = {"fwd": ["chunk_fwd"], "bwd": ["chunk_bwd"]}
SPLIT = {"fwd": ["chunk_states", "chunk_out"], "bwd": ["chunk_dstates", "chunk_dqkv"]}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """No injected timer, no cached choice, tuning on."""
    monkeypatch.setattr(tune, "TIMER", None)
    monkeypatch.delenv("RNNC_TRITON_TUNE", raising=False)
    tune.clear()
    yield
    tune.clear()


class Launches:
    """Stands in for the kernel module: records (kernel, grid, C, BV, the shape of every tensor
    argument) of each launch."""

    def __init__(self, module):
        self.module, self.log = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        log = self.log

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                    log.append((name, tuple(grid), kw.get("C"), kw.get("BV"), shapes))
                    return fn[grid](*args, **kw)
                return launch
        return Grid()

    def names(self):
        return [x[0] for x in self.log if x[0] != "chunk_dg"]

    def of(self, name):
        return [x[1:] for x in self.log if x[0] == name]


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the chunk kernels, whichever operand streams they were generated for."""
    rec = Launches(None)
    real = tc.kernels

    def kernels(sigs=None):
        rec.module = real(sigs)
        return rec
    monkeypatch.setattr(tc, "kernels", kernels)
    return rec


def force(monkeypatch, fwd: Config, bwd: Config, K, V, L, has_q=True):
    """Make the tuner choose fwd for the forward and bwd for the backward (chunk=None), after
    checking that configs() offers them."""
    assert fwd in tc.configs(K, V, L, has_q=has_q), fwd
    assert bwd.chunk == fwd.chunk and bwd in tc.configs(K, V, L, fwd.chunk, backward=True), bwd
    want = {"chunk_la.fwd": fwd, "chunk_la.bwd": bwd}
    monkeypatch.setattr(tune, "TIMER", lambda key, c, run: 0.0 if c == want[key[0]] else 1.0)


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


def _extreme(shape, gen):
    """Log-decays of -30 and -1e-6 per step, about one in ten exactly -inf (a decay of 0)."""
    u = torch.rand(*shape, generator=gen, dtype=F64)
    g = torch.where(u < 0.45, -30.0, -1e-6)
    return torch.where(u > 0.9, float("-inf"), g)


def run(fn, ins, dtype, include, chunk, has_q=True, grad=True, seed=1, **kw):
    """Outputs and (grad) gradients, in float64, of fn at inputs cast to dtype, for random
    incoming gradients of o and S_last."""
    B, L, H, K = ins[1].shape
    V = ins[2].shape[-1]
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, L, H, V, generator=gen, dtype=F64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=F64)
    xs = [x.detach().to(dtype).requires_grad_(grad) for x in ins]
    if not has_q:
        xs[0] = None
    with torch.set_grad_enabled(grad):
        o, S = fn(*xs, include_current=include, chunk=chunk, **kw)
    res = {"o": o, "S_last": S}
    if grad:
        loss = (S.double() * dS).sum()
        if has_q:
            loss = loss + (o.double() * do).sum()
        loss.backward()
        res.update({"dq": xs[0].grad if has_q else None, "dk": xs[1].grad, "dv": xs[2].grad,
                    "dlog_decay": xs[3].grad, "dS0": xs[4].grad})
    return {n: None if t is None else t.detach().double() for n, t in res.items()}


def rel_err(x, ref):
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def check(ins, include, chunk, has_q=True, grad=True, split=None):
    """Our float32 results (chunk: None for the tuner's choice) against scan_kernels: float64
    is the reference, float32 the yardstick."""
    ref = run(sk.chunk_linear_attention, ins, F64, include, 16, has_q, grad)
    ref32 = run(sk.chunk_linear_attention, ins, F32, include, 16, has_q, grad)
    ours = run(tc.chunk_linear_attention, ins, F32, include, chunk, has_q, grad, split=split)
    assert set(ours) == set(ref)
    bad = []
    for n in ref:
        if ref[n] is None:
            assert ours[n] is None
            continue
        assert torch.isfinite(ours[n]).all(), f"{n} is not finite"
        e, e32 = rel_err(ours[n], ref[n]), rel_err(ref32[n], ref[n])
        if not e <= 20 * e32 + 1e-6:
            bad.append(f"{n}: {e:.2e} vs scan float32 {e32:.2e}")
    assert not bad, bad


def check_grids(rec, B, H, K, V, L, fwd: Config, bwd: Config | None, has_q=True):
    """The kernels that ran, in order, and the split kernels' grids and stored states."""
    NV, NC = -(-V // fwd.block_v), -(-L // fwd.chunk)
    want = (SPLIT if fwd.split else WALK)["fwd"][:2 if has_q or not fwd.split else 1]
    if bwd is not None:
        want = want + (SPLIT if bwd.split else WALK)["bwd"]
    assert rec.names() == want
    states = (B, H, NC, K, V)
    if fwd.split:
        (grid, C, BV, shapes), = rec.of("chunk_states")
        assert (grid, C, BV) == ((NV, B * H), fwd.chunk, fwd.block_v)
        assert shapes[-1] == (states if has_q or bwd is not None else (1,))
        if has_q:
            (grid, C, BV, shapes), = rec.of("chunk_out")
            assert (grid, C, BV, shapes[-1]) == ((NV, NC, B * H), fwd.chunk, fwd.block_v, states)
    if bwd is not None and bwd.split:
        NV = -(-V // bwd.block_v)
        (grid, C, BV, shapes), = rec.of("chunk_dstates")
        # after the four operands' leaves (one each here), do and ds_last
        assert (grid, C, BV, shapes[6]) == ((NV, B * H), bwd.chunk, bwd.block_v, states)
        (grid, C, BV, shapes), = rec.of("chunk_dqkv")
        assert (grid, C, BV, shapes[5], shapes[6]) == ((NV, NC, B * H), bwd.chunk, bwd.block_v,
                                                       states, states)


# --- the candidate lists ----------------------------------------------------------------------
def test_candidates():
    """One split twin of every (chunk, BV), with twice the walk's most warps (at most 8),
    after the walk's configs; none for a forward without q; the defaults walk."""
    fwd = tc.configs(64, 64, 4096)
    walk = [c for c in fwd if not c.split]
    split = [c for c in fwd if c.split]
    assert fwd == walk + split and len(walk) == 15 and len(split) == 9
    pairs = {(c.chunk, c.block_v) for c in walk}
    assert {(c.chunk, c.block_v) for c in split} == pairs and len(split) == len(pairs)
    for c in split:
        assert c.warps == min(8, 2 * max(w.warps for w in walk if w[:2] == c[:2]))
    assert [c.warps for c in split if c.chunk == 64] == [8, 8, 4]   # BV 64, 32, 16
    bwd = tc.configs(64, 64, 4096, 64, backward=True)
    assert len(bwd) == 8 and [c[1:4] for c in bwd if c.split] == [(64, 8, True), (32, 8, True),
                                                                    (16, 8, True)]
    # no key split at K = 64; at K = 128 the same kinds again with 64 key channels a program,
    # whose smaller state tile gets more value channels and fewer warps
    assert {c.block_k for c in fwd + bwd} == {0}
    big = tc.configs(128, 128, 4096)
    whole, halves = [c for c in big if not c.block_k], [c for c in big if c.block_k]
    assert {c.block_k for c in halves} == {tc.SPLIT_K} and whole and halves
    assert {c.split for c in whole} == {c.split for c in halves} == {False, True}
    assert max(c.block_v for c in halves) == 64 and max(c.block_v for c in whole) == 32
    assert tc.key_blocks(200) == (64,) and tc.key_blocks(64) == tc.key_blocks(12) == ()
    assert not tc.default_config(128, 128).block_k
    assert not any(c.split for c in tc.configs(64, 64, 4096, has_q=False))
    assert any(c.split for c in tc.configs(64, 64, 4096, 64, backward=True, has_q=False))
    assert not tc.default_config(64, 64).split and not tc.default_config(32, 32, 16).split
    # at most GRID_Y chunks on a split grid's second axis
    long = tc.configs(64, 64, 16 * tc.GRID_Y + 1)
    assert {c.chunk for c in long if c.split} == {32, 64}
    # state passes: the most stages whose prefetch fits, 1 for the largest tiles
    assert tc.stages(16, 64, 64, False) == 3 and tc.stages(64, 64, 64, False) == 2
    assert tc.stages(64, 256, 16, False) == 1 and tc.stages(64, 256, 16, True) == 2


# --- split forward (and split or walk backward) against scan_kernels -------------------------
@pytest.mark.parametrize("per_channel,include,L,fwd,bwd", [
    (False, True, 1, Config(16, 32, 4, True), Config(16, 32, 8, True)),
    (True, False, 17, Config(16, 32, 4, True), Config(16, 32, 8, True)),
    (True, True, 37, Config(32, 32, 4, True), Config(32, 32, 2, False)),
    (False, False, 37, Config(32, 16, 4, True), Config(32, 16, 4, True)),
    (True, True, 64, Config(16, 32, 4, True), Config(16, 16, 4, True)),
    (False, True, 64, Config(32, 32, 4, True), Config(32, 32, 4, False)),
    (True, False, 37, Config(32, 32, 2, False), Config(32, 16, 4, True)),
], ids=["scalar-current-L1", "channel-previous-L17", "channel-current-L37-walkbwd",
        "scalar-previous-L37-bv16", "channel-current-L64", "scalar-current-L64-walkbwd",
        "channel-previous-L37-walkfwd"])
def test_split_matches_reference(launches, monkeypatch, per_channel, include, L, fwd, bwd):
    B, H, K, V = 2 if L < 20 else 1, 2, 32, 32   # a second batch entry where it is cheap
    force(monkeypatch, fwd, bwd, K, V, L)
    check(make(B, L, H, K, V, per_channel, seed=L), include, None)
    check_grids(launches, B, H, K, V, L, fwd, bwd)


def test_masked_channels_and_value_blocks(launches, monkeypatch):
    """K = 24 and V = 40 are not powers of two (masked key and value channels), and BV = 16
    splits V over three programs per chunk whose dq, dk shares are summed."""
    B, H, K, V, L = 1, 2, 24, 40, 37
    fwd, bwd = Config(16, 16, 4, True), Config(16, 16, 4, True)
    force(monkeypatch, fwd, bwd, K, V, L)
    check(make(B, L, H, K, V, True, seed=5), True, None)
    check_grids(launches, B, H, K, V, L, fwd, bwd)


def test_forward_without_autograd(launches, monkeypatch):
    """A split forward stores the per-chunk states even when nothing is trained (its second
    level reads them); the walk does not."""
    B, H, K, V, L = 1, 2, 32, 32, 37
    fwd = Config(16, 32, 4, True)
    force(monkeypatch, fwd, Config(16, 32, 8, True), K, V, L)
    check(make(B, L, H, K, V, False, seed=6), False, None, grad=False)
    check_grids(launches, B, H, K, V, L, fwd, None)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
def test_state_only(launches, grad):
    """Without q: chunk_states alone forward (storing the states only to train), and the split
    backward carries dS through the chunk totals alone (chunk_dstates without q)."""
    B, H, K, V, L = 1, 2, 32, 32, 37
    check(make(B, L, H, K, V, True, seed=7), True, 16, has_q=False, grad=grad, split=True)
    c = tc.default_config(K, V, 16)._replace(split=True)
    check_grids(launches, B, H, K, V, L, c, c if grad else None, has_q=False)


def test_split_argument(launches, monkeypatch):
    """split=False keeps the tuner among the walk's configs, split=True among the two levels'
    (a forward without q included), None among both; the choices are cached per setting."""
    B, H, K, V, L = 1, 2, 16, 16, 20
    ins = make(B, L, H, K, V, False, seed=8)
    monkeypatch.setattr(tune, "TIMER", lambda key, c, run: 0.0 if c.split else 1.0)
    for split, has_q, ran in [
            (False, True, WALK["fwd"] + WALK["bwd"]),
            (True, False, SPLIT["fwd"][:1] + SPLIT["bwd"]),
            (None, False, WALK["fwd"] + SPLIT["bwd"]),   # no split forward without q
            (None, True, SPLIT["fwd"] + SPLIT["bwd"])]:
        launches.log.clear()
        check(ins, True, None, has_q=has_q, split=split)
        assert launches.names() == ran, (split, has_q)
    assert len(tune.chosen()) == 8


@pytest.mark.parametrize("per_channel,include,has_q", [
    (True, True, True), (False, False, True), (True, False, False), (False, True, False)],
    ids=["channel-current", "scalar-previous", "channel-previous-state_only",
         "scalar-current-state_only"])
def test_extreme_decays(launches, per_channel, include, has_q):
    """Decays of exactly 0 and down to exp(-30) per step through both split passes: finite,
    and as accurate as scan."""
    ins = make(1, 40, 2, 16, 16, per_channel, decays=_extreme, seed=3)
    assert torch.isinf(ins[3]).any() and (ins[3] == -30).any() and (ins[3] == -1e-6).any()
    check(ins, include, 32, has_q, split=True)
    assert set(launches.names()) == set(SPLIT["bwd"]) | {"chunk_states"} | (
        {"chunk_out"} if has_q else set())


# --- models: the Triton backend with the split forced -----------------------------------------
FLOOR = 64 * torch.finfo(torch.float32).eps   # as test_triton_chunked.py


@pytest.mark.parametrize("name", ["gla", "retnet"])
def test_model_with_split_kernels(launches, monkeypatch, name):
    """backend="triton" without chunk_size (tuned): the tuner made to prefer the split
    configs, forward and backward; the model's outputs and final states, then its gradients,
    match the sequential backend."""
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")
    case = next(c for c in CASES if c.name == name)
    monkeypatch.setattr(tune, "TIMER", lambda key, c, run: 0.0 if c.split else 1.0)
    compare_to_sequential(case, "triton", 37, False, B=1, floor=FLOOR)
    assert set(launches.names()) == set(SPLIT["fwd"]), launches.names()
    launches.log.clear()
    compare_to_sequential(case, "triton", 37, True, B=1, floor=FLOOR)
    assert set(launches.names()) == set(SPLIT["fwd"]) | set(SPLIT["bwd"]), launches.names()
    assert {k[0] for k in tune.chosen()} == {"chunk_la.fwd", "chunk_la.bwd"}
    assert all(c.split for c in tune.chosen().values())


# --- sm_90 offline ------------------------------------------------------------------------------
def test_split_kernels_compile_for_gpu_without_one():
    """The state passes compile down to sm_90 cubins (Triton runs its whole pipeline on the
    CPU), in a process without the interpreter, with the num_stages they are launched with:
    at K = V = 64, chunk 64 and 8 warps (their config at BV = 64) two stages, their shared
    memory fits a block and they spill at most 64 bytes (the passes are light: 0 bytes before
    the operands were read through the generated loaders, 32 for chunk_states since, whose
    three loads of the decays per sub-chunk no longer share one pointer tile); at K = 256 per key channel
    one stage, which fits, where three (the default) would not: compile_for says so.
    (test_triton_chunk.py compiles every kernel, these included, at other sizes.)"""
    code = ("from rnnc.backends import triton_chunk as tc\n"
            "from rnnc.errors import RnncError\n"
            "names = ('chunk_states', 'chunk_dstates')\n"
            "a = tc.compile_for(K=64, V=64, chunk=64, warps=8, names=names, report=True)\n"
            "assert all((d['stack'] or 0) <= 64 and 0 < d['shared'] <= 232448\n"
            "           for d in a.values()), a\n"
            "kw = dict(K=256, V=64, chunk=64, include_current=False, precision='ieee')\n"
            "b = tc.compile_for(names=names, report=True, **kw)\n"
            "assert all(d['shared'] <= 232448 for d in b.values()), b\n"
            "tc.STAGE_BYTES = 1 << 30\n"
            "try:\n"
            "    tc.compile_for(names=names[:1], **kw)\n"
            "except RnncError as e:\n"
            "    assert 'shared memory' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('three stages at K = 256 fit?')\n"
            "print('compiled')\n")
    compile_offline(code)


def test_walk_kernels_with_a_head_decay_fit_shared_memory():
    """The walk kernels with one decay per head (retnet, mamba2) are launched with the
    num_stages that fit (walk_stages): at chunk 64 and K = V = 64, chunk_bwd compiles for
    sm_90 within a block's shared memory, where Triton's default three stages (about 308 KB)
    would not (compile_for raised that error when this test also compiled three stages; the
    test above shows the error for the state passes)."""
    code = ("from rnnc.backends import triton_chunk as tc\n"
            "kw = dict(K=64, V=64, chunk=64, scalar=True, warps=8, names=('chunk_bwd',))\n"
            "assert tc.walk_stages(64, 64, True) < 3 and tc.walk_stages(64, 64, False) == 3\n"
            "a = tc.compile_for(report=True, **kw)\n"
            "assert 0 < a['chunk_bwd']['shared'] <= 232448, a\n"
            "print('compiled')\n")
    compile_offline(code)
