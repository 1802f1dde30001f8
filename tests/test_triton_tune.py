"""The autotuner of the Triton chunk kernels (backends/triton_tune.py) and its use by
triton_chunk, triton_delta and the Triton backend's chunked plans.

There is no GPU here: the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py), where the tuner times nothing unless a timer is injected (`triton_tune.TIMER`).
The tests inject fake timers to make the tuner choose a given config, and record the kernel
launches (their C, BV and num_warps) to see which config ran. Results are judged against
scan_kernels in float64, within 20x scan_kernels' own float32 error plus 1e-6, as in
test_triton_chunk.py and test_triton_delta.py. The interpreter ignores num_warps, so the
configs that differ only in warps are run once.
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
from rnnc.backends import triton_delta as td  # noqa: E402
from rnnc.backends import triton_tune as tune  # noqa: E402
from rnnc.backends.triton_tune import Config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, compare_to_sequential  # noqa: E402

F64, F32 = torch.float64, torch.float32
L = 37   # not a multiple of any chunk

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
    """Stands in for a kernel module: records (kernel, C, BV, num_warps) of every launch."""

    def __init__(self, module):
        self.module, self.log = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        log = self.log

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    log.append((name, kw.get("C"), kw.get("BV"), kw.get("num_warps")))
                    return fn[grid](*args, **kw)
                return launch
        return Grid()

    def of(self, name):
        return [x[1:] for x in self.log if x[0] == name]


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the chunk kernels, whichever operand streams they were generated for."""
    rec = {"la": Launches(None), "delta": Launches(None)}
    real_la, real_delta = tc.kernels, td.kernels

    def la(sigs=None):
        rec["la"].module = real_la(sigs)
        return rec["la"]

    def delta(*a, **k):
        rec["delta"].module = real_delta(*a, **k)
        return rec["delta"]
    monkeypatch.setattr(tc, "kernels", la)
    monkeypatch.setattr(td, "kernels", delta)
    return rec


class Timer:
    """A fake timer: seconds = cost(family, config); records every call."""

    def __init__(self, cost):
        self.cost, self.calls = cost, []

    def __call__(self, key, config, run):
        self.calls.append((key, config))
        return self.cost(key[0], config)

    def families(self):
        return [k[0] for k, _ in self.calls]


def wanting(targets):
    """A cost that makes targets[family] the fastest config of that family."""
    return Timer(lambda fam, c: 0.0 if c == targets.get(fam) else 1.0)


# --- inputs, runs and the judge ---------------------------------------------------------------
def la_inputs(B, H, K, V, per_channel, seed=0, T=L):
    L = T
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    g = torch.nn.functional.logsigmoid(2 * r(B, L, H, K if per_channel else 1) + 2)
    return [r(B, L, H, K), r(B, L, H, K) / K ** 0.5, r(B, L, H, V), g, r(B, H, K, V)]


def delta_inputs(B, H, K, V, gated, shared, seed=0, T=L):
    L = T
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    k = torch.nn.functional.normalize(r(B, L, H, K), dim=-1)
    w = torch.rand(B, L, H, 1, generator=gen, dtype=F64) * k
    p = w if shared else 0.5 * torch.nn.functional.normalize(r(B, L, H, K), dim=-1)
    la = torch.nn.functional.logsigmoid(r(B, L, H) + 2.0) if gated else None
    return [r(B, L, H, K), k, w, p, r(B, L, H, V), la, r(B, H, K, V)]


def results(fn, ins, dtype, seed=1):
    """Outputs and the gradients of every input of <o, do> + <S_last, dS> (float64);
    fn(*leaves) -> (o, S_last). A leaf repeated in ins (w as p) is one leaf."""
    leaves, xs = {}, []
    for x in ins:
        if x is None:
            xs.append(None)
        else:
            if id(x) not in leaves:
                leaves[id(x)] = x.detach().to(dtype).requires_grad_()
            xs.append(leaves[id(x)])
    o, S = fn(*xs)
    gen = torch.Generator().manual_seed(seed)
    loss = (S.double() * torch.randn(S.shape, generator=gen, dtype=F64)).sum()
    if o is not None:
        loss = loss + (o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out = {"o": o, "S_last": S}
    out.update({f"d{j}": g for j, g in enumerate(grads)})
    return {n: None if t is None else t.detach().double() for n, t in out.items()}


def rel_err(x, ref):
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def judge(ours, ref, ref32):
    bad = []
    for n in ref:
        if ref[n] is None:
            assert ours[n] is None, n
            continue
        assert torch.isfinite(ours[n]).all(), n
        e, e32 = rel_err(ours[n], ref[n]), rel_err(ref32[n], ref[n])
        if not e <= 20 * e32 + 1e-6:
            bad.append(f"{n}: {e:.2e} vs scan float32 {e32:.2e}")
    assert not bad, bad


def la_fn(include, **kw):
    return lambda q, k, v, g, S0: tc.chunk_linear_attention(q, k, v, g, S0, include, **kw)


def delta_fn(**kw):
    return lambda *xs: td.chunk_delta_rule(*xs, **kw)


def la_reference(ins, include):
    f = lambda q, k, v, g, S0: sk.chunk_linear_attention(q, k, v, g, S0, include, chunk=16)  # noqa: E731
    return results(f, ins, F64), results(f, ins, F32)


def delta_reference(ins):
    f = lambda *xs: sk.chunk_delta_rule(*xs, chunk=16)  # noqa: E731
    return results(f, ins, F64), results(f, ins, F32)


def pairs(fwd, bwd_of):
    """(forward config, backward config) runs covering every distinct (chunk, BV) of the
    forward list and, per chunk, of the backward list (warps do not matter here)."""
    def distinct(cs):   # the first config of each (chunk, BV)
        first = {}
        for c in cs:
            first.setdefault((c.chunk, c.block_v), c)
        return list(first.values())
    runs = []
    for chunk in dict.fromkeys(c.chunk for c in fwd):
        fs = distinct([c for c in fwd if c.chunk == chunk])
        bs = distinct(bwd_of(chunk))
        assert bs and all(b.chunk == chunk for b in bs)
        runs += [(fs[i % len(fs)], bs[i % len(bs)]) for i in range(max(len(fs), len(bs)))]
    return runs


# --- (1) every candidate config computes the reference function ------------------------------
@pytest.mark.parametrize("per_channel,include,has_q", [(True, True, True), (False, False, True),
                                                      (True, False, False)],
                         ids=["channel-current", "scalar-previous", "channel-state_only"])
def test_every_linear_attention_config_matches_reference(launches, monkeypatch, per_channel,
                                                         include, has_q):
    K = V = 32
    ins = la_inputs(1, 1, K, V, per_channel)
    if not has_q:
        ins[0] = None
    ref, ref32 = la_reference(ins, include)
    fwd = tc.configs(K, V, L)
    assert {c.chunk for c in fwd} == {16, 32, 64} and {c.block_v for c in fwd} == {16, 32}
    for f, b in pairs(fwd, lambda c: tc.configs(K, V, L, c, backward=True)):
        tune.clear()
        monkeypatch.setattr(tune, "TIMER", wanting({"chunk_la.fwd": f, "chunk_la.bwd": b}))
        launches["la"].log.clear()
        ours = results(la_fn(include), ins, F32)
        assert launches["la"].of("chunk_fwd") == [f[:3]]
        assert launches["la"].of("chunk_bwd") == [b[:3]]
        judge(ours, ref, ref32)


@pytest.mark.parametrize("gated,shared", [(True, True), (False, False)],
                         ids=["gated-w_is_p", "plain-w_ne_p"])
def test_every_delta_config_matches_reference(launches, monkeypatch, gated, shared):
    K = V = 32
    ins = delta_inputs(1, 1, K, V, gated, shared)
    ref, ref32 = delta_reference(ins)
    fwd = td.configs(L, K, V)
    assert {c.chunk for c in fwd} == {16, 32, 64} and {c.block_v for c in fwd} == {16, 32}
    for f, b in pairs(fwd, lambda c: td.configs(L, K, V, c, backward=True)):
        tune.clear()
        monkeypatch.setattr(tune, "TIMER", wanting({"chunk_delta.fwd": f, "chunk_delta.bwd": b}))
        launches["delta"].log.clear()
        ours = results(delta_fn(), ins, F32)
        assert launches["delta"].of("delta_fwd") == [f[:3]]
        assert launches["delta"].of("delta_bwd") == [b[:3]]
        judge(ours, ref, ref32)


# --- (2) the tuner: fastest config, one timing per key, the backward on the forward's chunk --
def made_up_cost(fam, c):
    """Chunk 32 fastest, then the smaller V block, then fewer warps."""
    return {32: 1.0, 16: 2.0, 64: 3.0}[c.chunk] + c.block_v / 1000 + c.warps / 10000


@pytest.mark.parametrize("family", ["la", "delta"])
def test_picks_the_fastest_and_caches_it(launches, monkeypatch, family):
    K = V = 32
    timer = Timer(made_up_cost)
    monkeypatch.setattr(tune, "TIMER", timer)
    if family == "la":
        ins, fn, names = la_inputs(1, 2, K, V, False), la_fn(True), ("chunk_fwd", "chunk_bwd")
        ref, ref32 = la_reference(ins, True)
        default = tc.default_config(K, V)
        fwd = tc.configs(K, V, L)
        bwd = lambda c: tc.configs(K, V, L, c, backward=True)  # noqa: E731
    else:
        ins, fn, names = delta_inputs(1, 2, K, V, True, True), delta_fn(), ("delta_fwd", "delta_bwd")
        ref, ref32 = delta_reference(ins)
        default = td.default_config(L, K, V)
        fwd = td.configs(L, K, V)
        bwd = lambda c: td.configs(L, K, V, c, backward=True)  # noqa: E731
    fam = "chunk_la" if family == "la" else "chunk_delta"
    assert default.chunk == 64
    best = min([default] + fwd, key=lambda c: made_up_cost(None, c))
    assert best.chunk == 32 and best != default
    best_bwd = min([default._replace(chunk=32)] + bwd(32), key=lambda c: made_up_cost(None, c))

    judge(results(fn, ins, F32), ref, ref32)
    rec = launches[family]
    assert rec.of(names[0]) == [best[:3]]
    # the backward walks the forward's chunks: chunk 32, not the default 64
    assert rec.of(names[1]) == [best_bwd[:3]] and best_bwd.chunk == 32
    timed = {}
    for key, c in timer.calls:
        timed.setdefault(key[0], []).append(c)
    assert set(timed) == {f"{fam}.fwd", f"{fam}.bwd"}
    assert set(timed[f"{fam}.fwd"]) == set(fwd) | {default}      # every candidate, once
    assert len(timed[f"{fam}.fwd"]) == len(set(fwd) | {default})
    assert {c.chunk for c in timed[f"{fam}.bwd"]} == {32}
    chosen = {k[0]: c for k, c in tune.chosen().items()}
    assert chosen == {f"{fam}.fwd": best, f"{fam}.bwd": best_bwd}

    # the same key again (L = 40 rounds up to 64 too): no timing, the same config
    n = len(timer.calls)
    rec.log.clear()
    results(fn, la_inputs(1, 2, K, V, False, T=40) if family == "la" else
            delta_inputs(1, 2, K, V, True, True, T=40), F32)
    assert len(timer.calls) == n
    assert rec.of(names[0]) == [best[:3]] and rec.of(names[1]) == [best_bwd[:3]]
    # a new key (another batch size) is timed
    more = [None if x is None else torch.cat([x, x]) for x in ins]
    if family == "delta":
        more[3] = more[2]   # keep w is p
    results(fn, more, F32)
    assert len(timer.calls) > n
    assert len(tune.chosen()) == 4


def test_choose_without_kernels():
    """choose() itself: the fastest, ties to the default, failing candidates skipped, one
    timing per key; without a timer off CUDA the default, untimed."""
    d, a, b = Config(64, 32, 4), Config(32, 32, 4), Config(16, 16, 2)
    built = []

    def bench(c):
        built.append(c)
        if c == b:
            raise RuntimeError("out of resources")
        return lambda: None
    cpu = torch.device("cpu")
    assert tune.choose(("k0",), [a, b], d, bench, cpu) == d and built == []   # no timer on CPU
    costs = {d: 3.0, a: 2.0, b: 1.0}
    tune.TIMER = Timer(lambda fam, c: costs[c])
    assert tune.choose(("k1",), [a, b, a], d, bench, cpu) == a      # b fails, a beats d
    assert built == [d, a, b]
    assert tune.choose(("k1",), [a, b], d, bench, cpu) == a and len(tune.TIMER.calls) == 2
    costs[a] = 3.0
    assert tune.choose(("k2",), [a], d, bench, cpu) == d             # a tie keeps the default
    assert tune.choose(("k3",), [b], b, bench, cpu) == b             # every one fails: default
    assert tune.bucket(37) == 64 and tune.bucket(64) == 64 and tune.bucket(65) == 128
    assert tune.bucket(1) == 1
    assert tune.warps_for(64 * 64) == [4, 8] and tune.warps_for(16 * 16) == [2]
    assert tune.warps_for(256 * 128) == []                           # too big for 8 warps
    assert tune.warps_for(64 * 64, 64 * 256) == [8]                  # the operand tile too


# --- (3) RNNC_TRITON_TUNE=0 and (4) explicit chunks: the defaults, untimed --------------------
def test_tuning_off_gives_the_defaults(launches, monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_TUNE", "0")
    timer = Timer(made_up_cost)
    monkeypatch.setattr(tune, "TIMER", timer)
    K = V = 32
    results(la_fn(True), la_inputs(1, 2, K, V, False), F32)
    results(delta_fn(), delta_inputs(1, 2, K, V, True, True), F32)
    assert timer.calls == [] and tune.chosen() == {}
    d = tc.default_config(K, V)[:3]   # the launch log holds (C, BV, warps)
    assert d == (64, 32, 4)
    assert launches["la"].of("chunk_fwd") == [d] and launches["la"].of("chunk_bwd") == [d]
    d = td.default_config(L, K, V)[:3]
    assert launches["delta"].of("delta_fwd") == [d] and launches["delta"].of("delta_bwd") == [d]
    monkeypatch.setenv("RNNC_TRITON_TUNE", "1")   # and back on, "auto" is tuned
    results(la_fn(True, chunk="auto"), la_inputs(1, 2, K, V, False), F32)
    assert timer.families() and launches["la"].of("chunk_fwd")[-1][0] == 32


def test_explicit_chunk_is_honoured_untimed(launches, monkeypatch):
    timer = Timer(made_up_cost)
    monkeypatch.setattr(tune, "TIMER", timer)
    K = V = 32
    ins = la_inputs(1, 2, K, V, False)
    ref, ref32 = la_reference(ins, True)
    judge(results(la_fn(True, chunk=16), ins, F32), ref, ref32)
    ins = delta_inputs(1, 2, K, V, False, False)
    ref, ref32 = delta_reference(ins)
    judge(results(delta_fn(chunk=64, block_v=16), ins, F32), ref, ref32)
    assert timer.calls == [] and tune.chosen() == {}
    assert launches["la"].of("chunk_fwd") == launches["la"].of("chunk_bwd") == [(16, 32, 4)]
    assert launches["delta"].of("delta_fwd") == launches["delta"].of("delta_bwd") == [(64, 16, 4)]
    with pytest.raises(rnnc.RnncError, match="chunk must be"):
        tc.chunk_linear_attention(*[x.float() for x in la_inputs(1, 1, 16, 16, True)], chunk=24)
    with pytest.raises(rnnc.RnncError, match="chunk must be"):
        td.chunk_delta_rule(*[None if x is None else x.float() for x in
                              delta_inputs(1, 1, 16, 16, True, True)], chunk=128)


# --- (5) the model-level path: the Triton backend without chunk_size -------------------------
FLOOR = 64 * torch.finfo(torch.float32).eps   # as test_triton_chunked.py


@pytest.mark.parametrize("name", ["retnet", "gated_deltanet"])
def test_model_without_chunk_size_is_tuned(launches, monkeypatch, name):
    """backend="triton" without chunk_size: the chunk kernels go through the tuner (made to
    prefer chunk 16 here, not the default 64), and the model still matches sequential."""
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")
    case = next(c for c in CASES if c.name == name)
    timer = Timer(lambda fam, c: c.chunk + c.block_v / 1000 + c.warps / 10000)
    monkeypatch.setattr(tune, "TIMER", timer)
    compare_to_sequential(case, "triton", L, True, floor=FLOOR)
    fam = "chunk_la" if name == "retnet" else "chunk_delta"
    assert {f"{fam}.fwd", f"{fam}.bwd"} <= set(timer.families())
    rec = launches["la" if name == "retnet" else "delta"]
    fwd, bwd = ("chunk_fwd", "chunk_bwd") if name == "retnet" else ("delta_fwd", "delta_bwd")
    assert rec.of(fwd) and {c for c, _, _ in rec.of(fwd)} == {16}
    assert rec.of(bwd) and {c for c, _, _ in rec.of(bwd)} == {16}


def test_model_with_chunk_size_is_not_tuned(launches, monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")
    case = next(c for c in CASES if c.name == "retnet")
    timer = Timer(made_up_cost)
    monkeypatch.setattr(tune, "TIMER", timer)
    compare_to_sequential(case, "triton", L, False, floor=FLOOR, chunk_size=32)
    assert timer.calls == []
    assert {c for c, _, _ in launches["la"].of("chunk_fwd")} == {32}



def test_a_numeric_setting_caps_the_candidates_timed(monkeypatch):
    """RNNC_TRITON_TUNE=N times the default and N - 1 others spread over the list (its ends
    included), and chooses the fastest of those; 1 (or unset) times them all."""
    cands = [tune.Config(c, bv, w) for c in (16, 32, 64) for bv in (32, 64) for w in (4, 8)]
    default = cands[5]
    cost = {c: 10.0 - i for i, c in enumerate(cands)}   # the last candidate is the fastest
    seen = []
    monkeypatch.setattr(tune, "TIMER", lambda key, c, run: (seen.append(c), cost[c])[1])
    bench = lambda c: (lambda: None)  # noqa: E731
    monkeypatch.setenv("RNNC_TRITON_TUNE", "3")
    assert tune.limit() == 3
    got = tune.choose(("k", 1), cands, default, bench, torch.device("cpu"))
    others = [c for c in cands if c != default]
    assert seen == [default, others[0], others[-1]] and got == cands[-1]
    seen.clear()
    monkeypatch.setenv("RNNC_TRITON_TUNE", "1")
    assert tune.limit() is None
    got = tune.choose(("k", 2), cands, default, bench, torch.device("cpu"))
    assert sorted(seen) == sorted(cands) and got == cands[-1]
    assert tune._spread(list(range(7)), 4) == [0, 2, 4, 6]


BACKWARD_KERNELS = {"chunk_bwd", "chunk_dstates", "chunk_dqkv", "delta_bwd"}


@pytest.mark.parametrize("family", ["la", "delta"])
def test_a_training_forward_is_timed_with_its_backward(launches, monkeypatch, family):
    """A forward that stores states for a backward fixes the backward's chunk, so each of its
    candidates is timed together with the backward at that chunk (that chunk's default BV and
    warps). Costs here favour chunk 64 in the forward and make its backward dear: inference
    picks chunk 64, training another chunk; the results stay those of the reference."""
    K = V = 32
    rec = launches[family]

    def cost(key, config, run):
        start = len(rec.log)
        run()
        ran = rec.log[start:]
        spent = sum((10.0 if c == 64 else 1.0) if n in BACKWARD_KERNELS else
                    (1.0 if c == 64 else 2.0) for n, c, _, _ in ran)
        timed.append((key[0], config, ran))
        return spent

    timed = []
    monkeypatch.setattr(tune, "TIMER", cost)
    monkeypatch.setenv("RNNC_TRITON_TUNE", "4")   # the default and three others, chunk 16 first
    if family == "la":
        ins, fn = la_inputs(1, 1, K, V, False), la_fn(True)
        ref, ref32 = la_reference(ins, True)
        bwd_default = lambda chunk: tc.default_config(K, V, chunk)  # noqa: E731
    else:
        ins, fn = delta_inputs(1, 1, K, V, True, True), delta_fn()
        ref, ref32 = delta_reference(ins)
        bwd_default = lambda chunk: td.default_config(L, K, V, chunk)  # noqa: E731
    fam = "chunk_la.fwd" if family == "la" else "chunk_delta.fwd"

    with torch.no_grad():
        fn(*[None if x is None else x.float() for x in ins])
    inference = [(c, ran) for f, c, ran in timed if f == fam]
    assert len(inference) == 4
    assert all(n not in BACKWARD_KERNELS for _, r in inference for n, *_ in r)
    assert {k[0]: c for k, c in tune.chosen().items()}[fam].chunk == 64

    timed.clear()
    judge(results(fn, ins, F32), ref, ref32)
    training = [(c, ran) for f, c, ran in timed if f == fam]
    assert len(training) == 4
    for c, ran in training:   # each candidate's run: its forward, then the backward it implies
        back = [(C, bv, w) for n, C, bv, w in ran if n in BACKWARD_KERNELS]
        want = bwd_default(c.chunk)
        assert back and all(b == (want.chunk, want.block_v, want.warps) for b in back), (c, back)
    chosen = [c for k, c in tune.chosen().items() if k[0] == fam and c.chunk != 64]
    assert len(chosen) == 1   # the training key's choice avoids the dear backward
