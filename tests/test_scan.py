"""The scan backend (chunked, parallel over time) against the sequential reference loop.

- every associative example of the table: outputs, final states and gradients equal the
  sequential backend's, with and without an initial state, over several chunks;
- random specs of each associative class (rnnc.random_spec);
- torch.autograd.gradcheck through several chunks;
- fla-core's naive recurrent references (fp32) for gla, retnet, mamba2, gated_deltanet;
- extreme decays (near 0 and near 1) in float64 and float32;
- the chunk size does not change the result; .step() and state round trips;
- explicit backend requests: scan refuses a nonlinear recurrence with a located reason,
  "auto" picks scan exactly when the plan allows it;
- memory and autograd graph stay linear in T.

Float64 unless stated. No expected numbers are hard-coded: everything is compared with the
sequential backend or an external reference. Low precision is judged against the float32
sequential backend's own error vs float64, not with a hand-tuned atol.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import rnnc  # noqa: E402
import rnnc.analysis  # noqa: E402
import rnnc.backends.scan  # noqa: E402
import rnnc.backends.scan_kernels  # noqa: E402
import rnnc.ir  # noqa: E402
from rnnc.interpret import concrete  # noqa: E402

import oracles  # noqa: E402
from cases import (CASE_BY_NAME, CASES, DELTA_READ_FIRST, EXAMPLES, READ_FIRST_DECAYS,  # noqa: E402
                   SEVERAL_INPUTS, gradcheck_fn, load_params, make_initial_state, make_inputs,
                   make_params, several_inputs_args)

F64, F32 = torch.float64, torch.float32
CHUNK = 16
EPS32 = torch.finfo(F32).eps
ids = lambda c: c.name  # noqa: E731
INIT = pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "rand_init"])


pytestmark = pytest.mark.usefixtures("one_thread")


def plan_of(path_or_src) -> str:
    return rnnc.analysis.analyse(rnnc.load(str(path_or_src))).plan


ASSOC = [c for c in CASES if plan_of(c.path) != "sequential"]
NONASSOC = [c for c in CASES if plan_of(c.path) == "sequential"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def compile_pair(case, dtype=F64, chunk_size=CHUNK, params=None):
    """(scan module, sequential module, params): both hold the same param values."""
    scan = rnnc.compile(str(case.path), backend="scan", chunk_size=chunk_size, **case.dims).to(dtype)
    seq = rnnc.compile(str(case.path), backend="sequential", **case.dims).to(dtype)
    assert scan.backend == "scan" and seq.backend == "sequential"
    if params is None:
        params = make_params(case, dtype)
    load_params(scan, params)
    load_params(seq, params)
    return scan, seq, params


def run(m, xs, init):
    res = m(*xs, initial_state=init, output_final_state=True)
    assert isinstance(res, tuple) and len(res) == 2
    out, final = res
    assert isinstance(final, dict)
    return out, final


def _scale(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return finite.abs().max().item() if finite.numel() else 0.0


def close(got, want, what, rtol=1e-9, atol_rel=1e-10):
    """assert_close with atol relative to the magnitude of `want`."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol = atol_rel * max(_scale(want), 1e-300)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda s: f"{what}: {s}")


def close_all(got_out, got_final, want_out, want_final, what="", **tol):
    close(got_out, want_out, f"{what} output", **tol)
    assert set(got_final) == set(want_final), f"{sorted(got_final)} != {sorted(want_final)}"
    for k in want_final:
        close(got_final[k], want_final[k], f"{what} final state {k}", **tol)


def rel_err(got, want) -> float:
    """Normwise relative error max|got - want| / max|want| (want finite)."""
    assert torch.isfinite(want).all()
    return ((got.to(F64) - want.to(F64)).abs().max() / max(_scale(want), 1e-300)).item()


def grads(m, xs, init, w_out, w_fin):
    """d(sum w_out*out + sum w_fin*final) / d(inputs, params, initial state), in that order."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    init = None if init is None else {k: v.detach().clone().requires_grad_() for k, v in init.items()}
    params = [p for _, p in sorted(m.named_parameters())]
    out, final = run(m, xs, init)
    loss = (out * w_out).sum() + sum((final[k] * w_fin[k]).sum() for k in sorted(w_fin))
    wrt = [*xs, *params, *([] if init is None else [init[k] for k in sorted(init)])]
    gs = torch.autograd.grad(loss, wrt, allow_unused=True)
    names = ([f"input {i}" for i in range(len(xs))] + [f"param {k}" for k, _ in sorted(m.named_parameters())]
             + ([] if init is None else [f"initial state {k}" for k in sorted(init)]))
    return dict(zip(names, gs))


def compare_grads(scan, seq, xs, init, seed=99, rtol=1e-8, atol_rel=1e-10):
    out, final = run(seq, xs, init)
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    w_fin = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in sorted(final.items())}
    g_scan = grads(scan, xs, init, w_out, w_fin)
    g_seq = grads(seq, xs, init, w_out, w_fin)
    assert set(g_scan) == set(g_seq)
    used = 0
    for k in g_seq:
        if g_seq[k] is None:  # an input the spec never reads (e.g. a random spec's unused gate)
            assert g_scan[k] is None or not g_scan[k].any(), f"scan gives a gradient for unused {k}"
            continue
        used += 1
        assert g_scan[k] is not None, f"scan backend gives no gradient for {k}"
        assert torch.isfinite(g_scan[k]).all(), f"non-finite scan gradient for {k}"
        close(g_scan[k], g_seq[k], f"gradient of {k}", rtol=rtol, atol_rel=atol_rel)
    assert used > 0


# ---------------------------------------------------------------------------
# 1. every associative example vs the sequential backend
# ---------------------------------------------------------------------------

def test_table_has_associative_and_sequential_examples():
    names = {c.name for c in ASSOC}
    assert {"gla", "retnet", "mamba2", "deltanet", "gated_deltanet", "mlstm", "mingru", "s6"} <= names
    assert {"lstm", "gru", "elman", "slstm"} <= {c.name for c in NONASSOC}


@INIT
@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("case", ASSOC, ids=ids)
def test_matches_sequential(case, T, with_init):
    B = 2
    scan, seq, _ = compile_pair(case)
    xs = make_inputs(case, B, T, F64, seed=100 + T)
    init = make_initial_state(case, B, F64, seed=200 + T) if with_init else None
    with torch.no_grad():
        out, final = run(scan, xs, init)
        want, want_final = run(seq, xs, init)
    assert out.dtype == F64 and out.shape == want.shape
    assert torch.isfinite(out).all()
    close_all(out, final, want, want_final, case.name)


@INIT
@pytest.mark.parametrize("T", [7, 64])
@pytest.mark.parametrize("case", ASSOC, ids=ids)
def test_grads_match_sequential(case, T, with_init):
    B = 2
    scan, seq, _ = compile_pair(case)
    xs = make_inputs(case, B, T, F64, seed=300 + T)
    init = make_initial_state(case, B, F64, seed=400 + T) if with_init else None
    compare_grads(scan, seq, xs, init)


# ---------------------------------------------------------------------------
# 2. random specs of each associative class
# ---------------------------------------------------------------------------

RANDOM_KINDS = ("diagonal", "chunked", "delta", "delta_channel", "dense", "maxplus")
SEEDS = range(5)


def random_setup(seed, kind, B, T, dtype=F64):
    src, dims = rnnc.random_spec(seed, kind)
    rec = rnnc.load(src)
    assert rnnc.analysis.analyse(rec).plan != "sequential", f"{kind} spec {seed} is not associative:\n{src}"
    scan = rnnc.compile(src, backend="scan", chunk_size=CHUNK, **dims).to(dtype)
    seq = rnnc.compile(src, backend="sequential", **dims).to(dtype)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(sorted(scan.named_parameters()), sorted(seq.named_parameters())):
            assert n == n2
            v = torch.randn(p.shape, generator=gen, dtype=F64) / (p.shape[-1] ** 0.5 if p.dim() else 1.0)
            p.copy_(v)
            p2.copy_(v)
    xs = []
    for d in rec.inputs:
        x = torch.randn(B, T, *concrete(d.shape, dims), generator=gen, dtype=F64)
        if kind.startswith("delta") and d.name == "k":  # delta-rule keys are normalized in practice
            x = x / x.norm(dim=-1, keepdim=True)
        xs.append(x.to(dtype))
    init = {s.name: torch.randn(B, *concrete(s.shape, dims), generator=gen, dtype=F64).to(dtype)
            for s in rec.states}
    return src, scan, seq, xs, init


@pytest.mark.parametrize("T", [1, 17, 40])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_random_spec_forward(kind, seed, T):
    src, scan, seq, xs, init = random_setup(seed, kind, 2, T)
    with torch.no_grad():
        out, final = run(scan, xs, init)
        want, want_final = run(seq, xs, init)
    assert torch.isfinite(out).all(), src
    close_all(out, final, want, want_final, f"{kind} seed {seed}\n{src}")


@pytest.mark.parametrize("T", [1, 17, 40])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_random_spec_grads(kind, seed, T):
    src, scan, seq, xs, init = random_setup(seed, kind, 2, T)
    compare_grads(scan, seq, xs, init)


# ---------------------------------------------------------------------------
# 3. gradcheck through several chunks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "mlstm", "s6", "mingru"])
def test_gradcheck_scan(name):
    case = CASE_BY_NAME[name]
    if "K" in case.dims:  # fewer Jacobian columns; the head axis is kept
        case = dataclasses.replace(case, dims=dict(H=2, K=2, V=3))
    B, T = 1, 5
    scan, _, params = compile_pair(case, chunk_size=2)
    f, args = gradcheck_fn(scan, params, make_inputs(case, B, T, F64, seed=21),
                           make_initial_state(case, B, F64, seed=22))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# 4. fla-core naive references (fp32 inside)
# ---------------------------------------------------------------------------

@INIT
@pytest.mark.parametrize("name", ["gla", "retnet", "mamba2", "gated_deltanet"])
def test_fla_naive(name, with_init):
    if not oracles.fla_available():
        pytest.skip("fla-core's naive references cannot be imported")
    case = CASE_BY_NAME[name]
    B, T = 2, 40
    scan, _, params = compile_pair(case, dtype=F32)
    xs = make_inputs(case, B, T, F32, seed=41)
    init = make_initial_state(case, B, F32, seed=42) if with_init else None
    with torch.no_grad():
        out, final = run(scan, xs, init)
    want, want_final = getattr(oracles, case.oracle)(params, xs, init)
    assert out.dtype == F32
    tol = 3e-5
    assert rel_err(out, want) < tol, f"{name}: output rel err {rel_err(out, want):.2e} vs fla"
    assert set(final) == set(want_final)
    for k in want_final:
        err = rel_err(final[k], want_final[k])
        assert err < tol, f"{name}: final state {k} rel err {err:.2e} vs fla"


# ---------------------------------------------------------------------------
# 5. extreme decays
# ---------------------------------------------------------------------------

def _gla_g(mode, shape, gen):
    if mode == "fast":
        return torch.full(shape, -30.0, dtype=F64)
    if mode == "slow":
        return torch.full(shape, -1e-6, dtype=F64)
    pick = torch.rand(shape, generator=gen, dtype=F64)
    mid = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen, dtype=F64))
    return torch.where(pick < 1 / 3, -30.0, torch.where(pick < 2 / 3, -1e-6, mid))


def _extreme_setup(name, mode):
    """(case, params, inputs, initial state) in float64 with extreme decays."""
    case = CASE_BY_NAME[name]
    B, T = 2, 100
    gen = torch.Generator().manual_seed(51)
    xs = make_inputs(case, B, T, F64, seed=52)
    params = make_params(case, F64)
    init = make_initial_state(case, B, F64, seed=53)
    if name == "gla":
        xs[3] = _gla_g(mode, xs[3].shape, gen)
    elif name == "retnet":
        H = case.dims["H"]
        gamma = {"near1": [0.999999] * H, "near0": [1e-13] * H, "mixed": [0.999999, 1e-13]}[mode]
        params["gamma"] = torch.tensor(gamma[:H], dtype=F64)
    elif name == "mingru":
        # |Wz @ x| in the hundreds: the decay 1 - z is exactly 1 or 0 in float64 for most steps
        params["Wz"] = params["Wz"] * {"saturated": 1000.0, "mixed": 40.0}[mode]
    elif name == "gated_deltanet":
        alpha = {"near1": 1 - 1e-9, "near0": 1e-13}[mode]
        xs[3] = torch.full_like(xs[3], alpha)
    return case, params, xs, init


EXTREMES = [("gla", "fast"), ("gla", "slow"), ("gla", "mixed"),
            ("retnet", "near1"), ("retnet", "near0"), ("retnet", "mixed"),
            ("mingru", "saturated"), ("mingru", "mixed"),
            ("gated_deltanet", "near1"), ("gated_deltanet", "near0")]


@pytest.mark.parametrize("name,mode", EXTREMES, ids=[f"{n}-{m}" for n, m in EXTREMES])
def test_extreme_decays(name, mode):
    case, params, xs, init = _extreme_setup(name, mode)
    if name == "mingru":
        z = torch.sigmoid(xs[0] @ params["Wz"].T)
        saturated = ((1 - z == 0) | (1 - z == 1)).double().mean().item()
        assert saturated > (0.9 if mode == "saturated" else 0.2), saturated

    # float64: scan == sequential
    scan, seq, _ = compile_pair(case, F64, params=params)
    with torch.no_grad():
        out, final = run(scan, xs, init)
        want, want_final = run(seq, xs, init)
    assert torch.isfinite(out).all()
    for k in final:
        assert torch.isfinite(final[k]).all(), f"final state {k} not finite"
    close_all(out, final, want, want_final, f"{name}/{mode} f64", rtol=1e-8, atol_rel=1e-10)

    # float32: the scan's error vs float64 is within 10x of the sequential backend's own
    p32 = {k: v.to(F32) for k, v in params.items()}
    scan32, seq32, _ = compile_pair(case, F32, params=p32)
    x32 = [x.to(F32) for x in xs]
    i32 = {k: v.to(F32) for k, v in init.items()}
    with torch.no_grad():
        out32, final32 = run(scan32, x32, i32)
        ref32, ref_final32 = run(seq32, x32, i32)
    assert out32.dtype == F32 and torch.isfinite(out32).all()
    pairs = [("output", out32, ref32, want)] + [(f"state {k}", final32[k], ref_final32[k], want_final[k])
                                                  for k in want_final]
    for what, got, ref, exact in pairs:
        e_scan, e_seq = rel_err(got, exact), rel_err(ref, exact)
        assert e_scan <= 10 * max(e_seq, EPS32), (
            f"{name}/{mode} f32 {what}: scan rel err {e_scan:.2e}, sequential f32 {e_seq:.2e}")


# ---------------------------------------------------------------------------
# 6. chunk sizes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gla", "gated_deltanet"])
def test_chunk_sizes_agree(name):
    case = CASE_BY_NAME[name]
    B, T = 2, 37
    xs = make_inputs(case, B, T, F64, seed=61)
    init = make_initial_state(case, B, F64, seed=62)
    params = make_params(case, F64)
    _, seq, _ = compile_pair(case, params=params)
    with torch.no_grad():
        want, want_final = run(seq, xs, init)
    results = {}
    for cs in (1, 3, 16, 64):
        scan, _, _ = compile_pair(case, chunk_size=cs, params=params)
        with torch.no_grad():
            results[cs] = run(scan, xs, init)
        close_all(*results[cs], want, want_final, f"{name} chunk_size={cs}")
    for cs in (1, 3, 16):
        close_all(*results[cs], *results[64], f"{name} chunk_size={cs} vs 64", rtol=1e-10, atol_rel=1e-12)
    # gradients through the smallest chunks too
    scan1, _, _ = compile_pair(case, chunk_size=3, params=params)
    compare_grads(scan1, seq, xs, init)


def test_default_chunk_size():
    """Without chunk_size the backend's default (64) is used; T = 150 spans three chunks."""
    case = CASE_BY_NAME["gla"]
    m = rnnc.compile(str(case.path), backend="scan", **case.dims).double()
    seq = rnnc.compile(str(case.path), backend="sequential", **case.dims).double()
    assert m.backend == "scan"
    xs = make_inputs(case, 1, 150, F64, seed=63)
    init = make_initial_state(case, 1, F64, seed=64)
    with torch.no_grad():
        got = run(m, xs, init)
        want = run(seq, xs, init)
    close_all(*got, *want, "gla default chunk")


# ---------------------------------------------------------------------------
# 7. .step() and state round trip on the scan backend
# ---------------------------------------------------------------------------

@INIT
@pytest.mark.parametrize("case", ASSOC, ids=ids)
def test_scan_step_matches_forward(case, with_init):
    B, T = 2, 7
    scan, _, _ = compile_pair(case)
    xs = make_inputs(case, B, T, F64, seed=71)
    init = make_initial_state(case, B, F64, seed=72) if with_init else None
    with torch.no_grad():
        out, final = run(scan, xs, init)
        st, steps = init, []
        for t in range(T):
            o_t, st = scan.step(*[x[:, t] for x in xs], state=st)
            assert isinstance(st, dict)
            assert tuple(o_t.shape) == tuple(out[:, t].shape)
            steps.append(o_t)
    close_all(torch.stack(steps, 1), st, out, final, f"{case.name} step")


@pytest.mark.parametrize("case", ASSOC, ids=ids)
def test_scan_state_roundtrip(case):
    B, T = 2, 37
    scan, _, _ = compile_pair(case)
    xs = make_inputs(case, B, T, F64, seed=73)
    init = make_initial_state(case, B, F64, seed=74)
    with torch.no_grad():
        out, final = run(scan, xs, init)
        for t in (1, 16, 20, 36):
            out1, s1 = run(scan, [x[:, :t] for x in xs], init)
            out2, s2 = run(scan, [x[:, t:] for x in xs], s1)
            close_all(torch.cat([out1, out2], 1), s2, out, final, f"{case.name} split at {t}")


# ---------------------------------------------------------------------------
# 8. explicit backend requests
# ---------------------------------------------------------------------------

def test_scan_refuses_lstm_with_location():
    case = CASE_BY_NAME["lstm"]
    with pytest.raises(rnnc.RnncError) as info:
        rnnc.compile(str(case.path), backend="scan", **case.dims)
    msg = str(info.value)
    assert "not associative" in msg, msg
    assert "line 10" in msg, msg          # o = sigmoid(Wo @ x + Uo @ h + bo)
    assert "sigmoid" in msg, msg
    assert "scan" in msg and "lstm" in msg, msg


def test_scan_refusal_names_the_file():
    """The refusal is located: it names the file and points at the blocking expression."""
    case = CASE_BY_NAME["lstm"]
    with pytest.raises(rnnc.RnncError) as info:
        rnnc.compile(str(case.path), backend="scan", **case.dims)
    assert str(case.path) in str(info.value), str(info.value)
    assert info.value.line == 10 and "sigmoid(" in str(info.value)


@pytest.mark.parametrize("case", NONASSOC, ids=ids)
def test_scan_refuses_nonassociative(case):
    with pytest.raises(rnnc.RnncError, match="not associative"):
        rnnc.compile(str(case.path), backend="scan", **case.dims)
    m = rnnc.compile(str(case.path), backend="auto", **case.dims)
    assert m.backend == "sequential"


@pytest.mark.parametrize("case", ASSOC, ids=ids)
def test_auto_picks_scan(case):
    m = rnnc.compile(str(case.path), backend="auto", **case.dims)
    assert m.backend == "scan"
    seq = rnnc.compile(str(case.path), backend="sequential", **case.dims)
    assert seq.backend == "sequential"


@pytest.mark.parametrize("seed", range(3))
def test_random_nonlinear_refused(seed):
    src, dims = rnnc.random_spec(seed, "nonlinear")
    with pytest.raises(rnnc.RnncError, match="not associative"):
        rnnc.compile(src, backend="scan", **dims)
    assert rnnc.compile(src, backend="auto", **dims).backend == "sequential"


def test_bad_chunk_size():
    case = CASE_BY_NAME["gla"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(rnnc.RnncError, match="chunk_size"):
            rnnc.compile(str(case.path), backend="scan", chunk_size=bad, **case.dims)


# ---------------------------------------------------------------------------
# 9. memory linear in T
# ---------------------------------------------------------------------------

def _gla_inputs(B, T, H, K, V, dtype, seed=91):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) / K ** 0.5 for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=dtype) + 3)
    return [q, k, v, g]


def test_long_sequence_float32():
    H, K, V, T = 2, 8, 8, 16384
    m = rnnc.compile(str(CASE_BY_NAME["gla"].path), backend="scan", H=H, K=K, V=V)
    xs = _gla_inputs(1, T, H, K, V, F32)
    with torch.no_grad():
        out, final = run(m, xs, None)
        assert out.shape == (1, T, H, V) and out.dtype == F32
        assert torch.isfinite(out).all() and torch.isfinite(final["S"]).all()
        # the tail agrees with the sequential backend started from the scan's own state
        t0 = T - 40
        _, s_mid = run(m, [x[:, :t0] for x in xs], None)
        seq = rnnc.compile(str(CASE_BY_NAME["gla"].path), backend="sequential", H=H, K=K, V=V)
        tail, tail_final = run(seq, [x[:, t0:] for x in xs], s_mid)
    assert rel_err(out[:, t0:], tail) < 1e-5
    assert rel_err(final["S"], tail_final["S"]) < 1e-5


def _saved_bytes(m, xs):
    """Bytes autograd keeps for backward (distinct storages) after one forward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    xs = [x.clone().requires_grad_() for x in xs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(*xs)
    out.sum().backward()
    return sum(storages.values())


def test_autograd_memory_linear_in_T():
    H, K, V = 2, 8, 8
    m = rnnc.compile(str(CASE_BY_NAME["gla"].path), backend="scan", chunk_size=64, H=H, K=K, V=V)
    small = _saved_bytes(m, _gla_inputs(1, 1024, H, K, V, F32))
    large = _saved_bytes(m, _gla_inputs(1, 4096, H, K, V, F32))
    assert small > 0
    # linear: ~4x; quadratic would be ~16x
    assert large / small < 6, f"saved bytes T=1024: {small}, T=4096: {large} (ratio {large / small:.1f})"


# --- regressions found while building on the scan backend ------------------------------------

def test_ungated_delta_rule_in_float32():
    """A constant decay coefficient once came out in float64 and crashed float32 inputs."""
    case = CASE_BY_NAME["deltanet"]
    seq = rnnc.compile(str(case.path), backend="sequential", **case.dims)
    scan = rnnc.compile(str(case.path), backend="scan", chunk_size=4, **case.dims)
    scan.load_state_dict(seq.state_dict())
    xs = make_inputs(case, 2, 11, torch.float32, seed=3)
    ref64 = seq.double()(*[x.double() for x in xs])
    err_scan = (scan(*xs).double() - ref64).abs().max().item()
    assert err_scan < 1e-4 * max(1.0, ref64.abs().max().item())


SIGNED_DECAY = """rnn signed(q[H,K], k[H,K], v[H,V], g[H,K]) -> o[H,V] {
    state S[H,K,V] = 0
    S[h,i,j] = (2 * sigmoid(g[h,i]) - 1) * S[h,i,j] + k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}
"""


MULTI_HEAD = """rnn multi(q[A,G,K], k[A,G,K], v[A,G,V], g[A]) -> o[A,G,V] {
    state S[A,G,K,V] = 0
    S[a,c,i,j] = exp(g[a]) * S[a,c,i,j] + k[a,c,i] * v[a,c,j]
    o[a,c,j] = sum[i](q[a,c,i] * S[a,c,i,j])
}
"""


def test_decay_over_one_of_two_head_axes():
    """Two independent axes (A, G) are flattened into the chunk forms' head axis; a decay over
    A alone is read over both (it used to fail with a shape mismatch)."""
    dims = dict(A=2, G=3, K=4, V=5)
    scan = rnnc.compile(MULTI_HEAD, backend="scan", chunk_size=4, **dims).double()
    ref = rnnc.compile(MULTI_HEAD, backend="sequential", **dims).double()
    assert scan.analysis.plan == "chunked"
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(2, 11, 2, 3, n, generator=g, dtype=torch.float64) for n in (4, 4, 5)]
    xs.append(torch.nn.functional.logsigmoid(torch.randn(2, 11, 2, generator=g, dtype=torch.float64)))
    init = {"S": torch.randn(2, 2, 3, 4, 5, generator=g, dtype=torch.float64)}
    ya, fa = scan(*xs, initial_state=init, output_final_state=True)
    yr, fr = ref(*xs, initial_state=init, output_final_state=True)
    torch.testing.assert_close(ya, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fa["S"], fr["S"], rtol=1e-10, atol=1e-10)


UNEQUAL_WRITES = """rnn f(q[H,K], k[H,K], v[H,V], a[H], b[H], c[H]) -> o[H,V] {
    state S[H,K,V] = 0
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    S[h,i,j] = a[h] * (S[h,i,j] - b[h] * k[h,i] * u[h,j]) + c[h] * k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}
"""


@pytest.mark.parametrize("src,same", [(UNEQUAL_WRITES, False),
                                      (UNEQUAL_WRITES.replace("+ c[h] * k", "+ b[h] * k"), True)],
                         ids=["erase_b-write_c", "erase_b-write_b"])
def test_delta_rule_write_strengths(src, same, monkeypatch):
    """The erase strength b and the write strength c over the heads: the same gate makes
    w = p one tensor (the kernels' shorter path), different ones keep them apart; both agree
    with the sequential backend, gradients included."""
    seen = []
    kernels = rnnc.backends.scan_kernels
    real = kernels.chunk_delta_rule
    monkeypatch.setattr(kernels, "chunk_delta_rule",
                        lambda q, r, w, p, *a, **k: seen.append(w is p) or real(q, r, w, p, *a, **k))
    dims = dict(H=2, K=4, V=3)
    scan = rnnc.compile(src, backend="scan", chunk_size=4, **dims).double()
    seq = rnnc.compile(src, backend="sequential", **dims).double()
    assert scan.analysis.plan == "chunked_delta"
    g = torch.Generator().manual_seed(8)
    r = lambda *s: torch.randn(2, 11, *s, generator=g, dtype=F64)  # noqa: E731
    k = torch.nn.functional.normalize(r(2, 4), dim=-1)
    xs = [r(2, 4), k, r(2, 3), torch.sigmoid(r(2)), torch.sigmoid(r(2)), torch.sigmoid(r(2))]
    init = {"S": torch.randn(2, 2, 4, 3, generator=g, dtype=F64)}
    compare_grads(scan, seq, xs, init)
    assert seen and set(seen) == {same}


# A delta rule decayed per key channel, the decay before the erase (Kimi Delta Attention) and
# after it; RWKV-7's form (an erase vector apart from the read vector) is examples/rwkv7.rnn.
KDA_BEFORE = """rnn kda(q[H,K], k[H,K], v[H,V], g[H,K], beta[H]) -> o[H,V] {
    state S[H,K,V] = 0
    D[h,i,j] = exp(g[h,i]) * S[h,i,j]
    u[h,j] = sum[i](k[h,i] * D[h,i,j])
    S[h,i,j] = D[h,i,j] + beta[h] * k[h,i] * (v[h,j] - u[h,j])
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}"""
KDA_AFTER = """rnn kdb(q[H,K], k[H,K], v[H,V], g[H,K], beta[H]) -> o[H,V] {
    state S[H,K,V] = 0
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    S[h,i,j] = exp(g[h,i]) * (S[h,i,j] - beta[h] * k[h,i] * u[h,j]) + beta[h] * k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}"""


def _kda_inputs(g, T=11):
    r = lambda *s: torch.randn(2, T, *s, generator=g, dtype=F64)  # noqa: E731
    return [r(2, 4), torch.nn.functional.normalize(r(2, 4), dim=-1), r(2, 3),
            torch.nn.functional.logsigmoid(r(2, 4) + 2), torch.sigmoid(r(2))]


@pytest.mark.parametrize("src", [KDA_BEFORE, KDA_AFTER], ids=["decay_then_erase", "erase_then_decay"])
def test_delta_rule_with_a_decay_per_key_channel(src, monkeypatch):
    """A delta rule decayed per key channel runs the diagonal-plus-rank-1 chunk form
    (scan_kernels.chunk_dplr), the decay kept wherever the spec put it. It once got the
    per-head chunk form, which read key channel 0's decay for every channel (22% off), then
    a dense scan. Forward, final state and gradients against sequential, over T = 11 steps
    in chunks of 4 (the kernel rounds them to a power of two)."""
    kernels = rnnc.backends.scan_kernels
    calls = []
    real = kernels.chunk_dplr
    monkeypatch.setattr(kernels, "chunk_dplr", lambda *a, **k: calls.append(1) or real(*a, **k))
    dims = dict(H=2, K=4, V=3)
    scan = rnnc.compile(src, backend="scan", chunk_size=4, **dims).double()
    seq = rnnc.compile(src, backend="sequential", **dims).double()
    assert scan.analysis.plan == "chunked_delta"
    assert "per key channel" in scan.analysis.plan_reason
    g = torch.Generator().manual_seed(9)
    init = {"S": torch.randn(2, 2, 4, 3, generator=g, dtype=F64)}
    compare_grads(scan, seq, _kda_inputs(g), init)
    assert calls


def test_delta_rule_with_a_nonpositive_decay_is_stepped(monkeypatch):
    """A delta rule whose decay is negative in a block (the chunk forms need its logarithm)
    is solved step by step there, exactly; it once raised. Per key channel and per head.
    A decay of exactly 0 (log-decay -inf) stays on the chunk form, which takes it."""
    import rnnc.backends.block_solver as bs
    steps = []
    real = bs.BlockSolver._steps
    monkeypatch.setattr(bs.BlockSolver, "_steps", lambda *a, **k: steps.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    dims = dict(H=2, K=4, V=3)
    signed = KDA_BEFORE.replace("exp(g[h,i])", "tanh(g[h,i])")
    gdn = (EXAMPLES / "gated_deltanet.rnn").read_text()
    for src, stepped in ((signed, True), (gdn, True), (KDA_BEFORE, False)):
        steps.clear()
        scan = rnnc.compile(src, backend="scan", chunk_size=4, **dims).double()
        seq = rnnc.compile(src, backend="sequential", **dims).double()
        assert scan.analysis.plan == "chunked_delta"
        xs = _kda_inputs(g, T=9)
        if src is signed:
            xs[3] = torch.randn(xs[3].shape, generator=g, dtype=F64)
        elif src is gdn:
            xs = [xs[0], xs[1], xs[2], torch.tanh(xs[4] * 3 - 1.5), xs[4]]
        else:
            xs[3] = torch.where(xs[3] < -0.5, -torch.inf, xs[3])
        init = {"S": torch.randn(2, 2, 4, 3, generator=g, dtype=F64)}
        ya, fa = scan(*xs, initial_state=init, output_final_state=True)
        yr, fr = seq(*xs, initial_state=init, output_final_state=True)
        torch.testing.assert_close(ya, yr, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fa["S"], fr["S"], rtol=1e-10, atol=1e-10)
        assert bool(steps) == stepped, src


# A delta rule of rank 2 (two erases reading the same old state).
RANK2 = """rnn dp2(q[H,K], k[H,K], k2[H,K], v[H,V], beta[H]) -> o[H,V] {
    state S[H,K,V] = 0
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    u2[h,j] = sum[i](k2[h,i] * S[h,i,j])
    S[h,i,j] = S[h,i,j] - beta[h] * k[h,i] * u[h,j] - beta[h] * k2[h,i] * u2[h,j] + k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}"""
# A matrix state with a full transition over its key axis: a dense scan.
DENSE_KEY = """rnn dk(q[H,K], k[H,K], v[H,V]) -> o[H,V] {
    param A[H,K,K]
    state S[H,K,V] = 0
    S[h,i,j] = 0.5 * sum[m](A[h,i,m] * S[h,m,j]) + k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}"""


def _rank2_inputs(g):
    r = lambda *s: torch.randn(2, 11, *s, generator=g, dtype=F64)  # noqa: E731
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    return [r(2, 4), unit(r(2, 4)), unit(r(2, 4)), r(2, 3), torch.sigmoid(r(2)) * 0.5]


def test_delta_rule_of_rank_two():
    """Two erase terms per step run the chunk form with R = 2 erase reads (they once made
    the state a dense scan); forward, final state and gradients against sequential."""
    dims = dict(H=2, K=4, V=3)
    scan = rnnc.compile(RANK2, backend="scan", chunk_size=4, **dims).double()
    seq = rnnc.compile(RANK2, backend="sequential", **dims).double()
    assert scan.analysis.plan == "chunked_delta" and scan.analysis.state("S").transition.rank == 2
    g = torch.Generator().manual_seed(9)
    init = {"S": torch.randn(2, 2, 4, 3, generator=g, dtype=F64)}
    compare_grads(scan, seq, _rank2_inputs(g), init)


@pytest.mark.parametrize("limit", [None, "DENSE_LIMIT", "DENSE_CPU_WORK"],
                         ids=["scanned", "stepped", "stepped_on_cpu"])
def test_dense_state_too_large_is_stepped(limit, monkeypatch):
    """A dense-scan state whose per-step transitions would not fit (here forced with a limit
    of 1 entry; a 1024-wide h = A @ h + x once raised), or on a CPU would cost more to scan
    than to step (B n^3 past DENSE_CPU_WORK, forced the same way), is stepped through each
    block; every way agrees with the sequential backend, gradients included."""
    import rnnc.backends.block_solver as bs
    if limit is not None:
        monkeypatch.setattr(bs, limit, 1)
    steps = []
    real = bs.BlockSolver._steps
    monkeypatch.setattr(bs.BlockSolver, "_steps", lambda *a, **k: steps.append(1) or real(*a, **k))
    dims = dict(H=2, K=4, V=3)
    scan = rnnc.compile(DENSE_KEY, backend="scan", chunk_size=4, **dims).double()
    seq = rnnc.compile(DENSE_KEY, backend="sequential", **dims).double()
    seq.load_state_dict(scan.state_dict())
    assert scan.analysis.plan == "dense_scan"
    g = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(2, 11, *s, generator=g, dtype=F64)  # noqa: E731
    xs = [r(2, 4), r(2, 4), r(2, 3)]
    init = {"S": torch.randn(2, 2, 4, 3, generator=g, dtype=F64)}
    compare_grads(scan, seq, xs, init)
    assert bool(steps) == (limit is not None)


def test_chunked_plan_with_negative_decays_is_exact():
    """A decay that can be negative still gets the chunked plan; blocks where it is negative
    are solved exactly by materialising the state, never with an error or a wrong answer."""
    auto = rnnc.compile(SIGNED_DECAY, backend="auto", chunk_size=4).double()
    ref = rnnc.compile(SIGNED_DECAY, backend="sequential").double()
    assert auto.backend == "scan" and auto.analysis.plan == "chunked"
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 13, 2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    xs += [torch.randn(2, 13, 2, 4, generator=g, dtype=torch.float64),
           torch.randn(2, 13, 2, 3, generator=g, dtype=torch.float64)]
    xs[3][:, :4] = 5.0  # the first block has only positive decays: the chunk form runs there
    init = {"S": torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64)}
    ya, fa = auto(*xs, initial_state=init, output_final_state=True)
    yr, fr = ref(*xs, initial_state=init, output_final_state=True)
    torch.testing.assert_close(ya, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fa["S"], fr["S"], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# 10. the no-autograd path
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("case", ASSOC, ids=ids)
def test_no_grad_path_matches_autograd_path(case, T, monkeypatch):
    """Without autograd the scan backend writes its results in place: outputs into [B, T, ...]
    tensors block by block, elementwise states and chunk chains in place, chunk groups into
    one output; with inputs that require grad it builds them functionally and concatenates.
    Both agree with each other and with the sequential backend, from an initial state, with
    its final state, for T=1 and for T=37 in blocks of 8 steps (elementwise plans) or of 2
    chunks of 8 (matrix plans, one chunk per group), the last block partial."""
    monkeypatch.setattr(rnnc.backends.scan, "BLOCK_CHUNKS", 2)
    monkeypatch.setattr(rnnc.backends.scan_kernels, "_GROUP_ELEMENTS", 1)
    B = 2
    scan, seq, _ = compile_pair(case, chunk_size=8)
    xs = make_inputs(case, B, T, F64, seed=400 + T)
    init = make_initial_state(case, B, F64, seed=500 + T)
    with torch.no_grad():
        out, final = run(scan, xs, init)
        want, want_final = run(seq, xs, init)
    assert not out.requires_grad
    close_all(out, final, want, want_final, f"{case.name} no grad")
    g_out, g_final = run(scan, [x.clone().requires_grad_() for x in xs], init)
    assert g_out.requires_grad
    close_all(out, final, g_out.detach(), {k: v.detach() for k, v in g_final.items()},
              f"{case.name} no grad vs autograd")


def test_elementwise_blocks_follow_the_state_size(monkeypatch):
    """Elementwise plans without a chunk_size get blocks of at least 64 steps, longer for small
    states (about 2^20 state elements per block); a chunk_size asked for is the block length.
    Results stay those of the sequential backend when T is not a multiple of the block."""
    def block(name, shape, **kw):
        solver = rnnc.compile(str(CASE_BY_NAME[name].path), backend="scan", **kw)._runner
        return solver._block_length(4, {"h": shape})
    assert block("s6", (256, 16), D=256, N=16) == 64
    assert block("mingru", (256,), D=256, H=256) == 1024
    assert block("mingru", (256,), D=256, H=256, chunk_size=8) == 8
    case = CASE_BY_NAME["mingru"]
    B, T = 2, 300
    H = case.state_shape("h")[0]
    monkeypatch.setattr(rnnc.backends.scan, "ELEMENTWISE_BLOCK_ELEMENTS", B * 128 * H)
    scan, seq, _ = compile_pair(case, chunk_size=None)
    assert scan._runner._block_length(B, {"h": (H,)}) == 128   # blocks of 128, 128 and 44
    xs = make_inputs(case, B, T, F64, seed=71)
    init = make_initial_state(case, B, F64, seed=72)
    with torch.no_grad():
        close_all(*run(scan, xs, init), *run(seq, xs, init), "mingru, 128-step blocks")


@pytest.mark.parametrize("name", ["s6", "mingru"])
def test_unread_old_state_is_not_materialised(name):
    """A diagonal update's a * h_old is the scan's own work: the solver neither evaluates that
    node nor copies the old states out for it when nothing else reads them."""
    m = rnnc.compile(str(CASE_BY_NAME[name].path), backend="scan", **CASE_BY_NAME[name].dims)
    solver = m._runner
    assert all(s.read not in solver.want for s in m.recurrence.states)
    assert not any(s.read in rnnc.ir.operands(m.recurrence.node(n))
                   for p in solver.phases for n in p for s in m.recurrence.states)


def test_lazy_decay_of_a_block_solved_step_by_step():
    """gla's decay exp(g) is not computed for blocks the chunk form solves (it reads g); a block
    with a NaN input is solved step by step from the NaN on, and there the decay is computed.
    Outputs before the NaN, after it, and the final state match the sequential backend."""
    case = CASE_BY_NAME["gla"]
    scan, seq, _ = compile_pair(case, chunk_size=4)
    assert scan._runner.lazy
    xs = make_inputs(case, 2, 21, F64, seed=81)
    init = make_initial_state(case, 2, F64, seed=82)
    xs[1][1, 13] = float("nan")  # k of batch row 1 at step 13
    with torch.no_grad():
        out, final = run(scan, xs, init)
        want, want_final = run(seq, xs, init)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10, equal_nan=True)
    torch.testing.assert_close(final["S"], want_final["S"], rtol=1e-9, atol=1e-10, equal_nan=True)
    assert torch.isfinite(out[:, :13]).all() and torch.isfinite(out[0]).all()



@pytest.mark.parametrize("decay", list(READ_FIRST_DECAYS))
def test_delta_rule_read_before_its_update(decay):
    """Readouts of the state before a delta-rule update run as erase reads of the
    diagonal-plus-rank-1 form (scan_kernels.chunk_dplr, include_current=False); the scan
    backend once refused them. Forward, final state and gradients against sequential, T = 11
    in chunks of 4."""
    src = DELTA_READ_FIRST.replace("DECAY", READ_FIRST_DECAYS[decay])
    dims = dict(H=2, K=4, V=3)
    scan = rnnc.compile(src, backend="scan", chunk_size=4, **dims).double()
    seq = rnnc.compile(src, backend="sequential", **dims).double()
    assert scan.analysis.plan == "chunked_delta"
    assert rnnc.compile(src, backend="auto", **dims).backend == "scan"
    g = torch.Generator().manual_seed(12)
    r = lambda *s: torch.randn(2, 11, *s, generator=g, dtype=F64)  # noqa: E731
    xs = [r(2, 4), torch.nn.functional.normalize(r(2, 4), dim=-1), r(2, 3), torch.sigmoid(r(2)), r(2, 4)]
    init = {"S": torch.randn(2, 2, 4, 3, generator=g, dtype=F64)}
    compare_grads(scan, seq, xs, init)


@pytest.mark.parametrize("name", list(SEVERAL_INPUTS))
def test_input_of_several_terms(name):
    """A matrix state whose input is a sum of terms (k⊗v + k2⊗v2, k⊗v + 0.5, a delta rule with
    a second write) gets its chunk form, run once per input term and summed; it once ran as
    an elementwise or dense scan (and, before that, failed to compile). Forward, final state
    and gradients against sequential."""
    src = SEVERAL_INPUTS[name]
    dims = dict(H=2, K=3, V=2)
    scan = rnnc.compile(src, backend="scan", chunk_size=4, **dims).double()
    seq = rnnc.compile(src, backend="sequential", **dims).double()
    assert scan.analysis.plan in ("chunked", "chunked_delta")
    g = torch.Generator().manual_seed(14)
    init = {"S": torch.randn(2, 2, 3, 2, generator=g, dtype=F64)}
    compare_grads(scan, seq, several_inputs_args(name, 11, g), init)
