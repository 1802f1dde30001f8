"""Chunked plans on the Triton backend: the generated chunk kernels (linear attention and the
delta rule) run inside the block solver, against the sequential reference.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), with
chunk 16 so that T = 17 crosses a chunk boundary with a one-step tail and T = 64 holds
four whole chunks. The kernels compute in float32 and are judged against the float64
sequential backend, relative to the float32 sequential backend's own error. The kernels'
own tests (any decay, extreme decays, fla's references) are test_triton_chunk.py and
test_triton_delta.py; this file checks the plans that use them, every chunked example and
random chunked specs, forward and backward, and which kernel ran.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import rnnc  # noqa: E402

from cases import (CASES, DELTA_READ_FIRST, READ_FIRST_DECAYS, SEVERAL_INPUTS,  # noqa: E402
                   compare_to_sequential, load_params, make_initial_state, make_inputs, make_params,
                   random_spec_against_sequential, rel_err, run_case, several_inputs_args)

triton = pytest.importorskip("triton")
F64, F32 = torch.float64, torch.float32
CHUNKED = [c for c in CASES if rnnc.compile(str(c.path), backend="sequential", **c.dims).analysis.plan
           in ("chunked", "chunked_delta")]
ids = lambda c: c.name  # noqa: E731
# Where the sequential float32 error is far below one ulp of the result, the floor is the
# rounding of one float32 sum over a chunk of 64 terms: the chunk kernels' d(log_decay) comes
# from such sums with cancellation (see triton_chunk.py), so it is accurate to this absolute
# level rather than relative to a gradient the sequential loop happens to get almost exact.
FLOOR = 64 * torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _chunk_kernels(monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")


def _counts():
    from rnnc.backends import triton_backend
    return dict(triton_backend.LAUNCHES)


def test_every_chunked_example_is_here():
    assert {c.name for c in CHUNKED} >= {"retnet", "gla", "mamba2", "deltanet", "gated_deltanet",
                                         "mlstm", "rwkv6"}


# T = 64 for every case but the two the diagonal-plus-low-rank kernels run (their score loops
# are the slowest code under the interpreter; tests/test_triton_dplr.py runs them at T = 40)
# and Gated DeltaProduct, which runs the fused kernel at every T (test_triton.py: T = 33)
PLAN_RUNS = [(c, T) for c in CHUNKED for T in (1, 17, 64)
             if not (T == 64 and c.name in ("kda", "rwkv7", "gated_deltaproduct"))]


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case,T", PLAN_RUNS, ids=[f"{c.name}-{T}" for c, T in PLAN_RUNS])
def test_chunked_plan(case, T, grad):
    before = _counts()
    # The interpreter's time grows with every program: one batch entry at T = 64 and for the
    # backward of a sequence (the kernels' own tests check the backward's batch offsets)
    B = 1 if T == 64 or (grad and T > 1) else 2
    compare_to_sequential(case, "triton", T, grad, B=B, floor=FLOOR, chunk_size=16)
    after = _counts()
    ran = {k for k in after if after[k] != before.get(k, 0)}
    # T = 1 decodes through the fused kernel; longer sequences through the chunk kernels, but
    # for a delta rule with several low-rank terms (no Triton chunk kernel yet) the fused one
    fused = T == 1 or case.name == "gated_deltaproduct"
    assert ran == ({"forward"} if fused else {"chunked"}), ran


@pytest.mark.parametrize("kind", ["chunked", "delta"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_chunked_specs(kind, seed):
    """Random specs with a matrix state: the chunk kernels against float64 sequential, values
    and the gradients of inputs and params."""
    ref = random_spec_against_sequential(kind, seed, 21, out_tol=1e-4, grad_tol=1e-4, chunk_size=16)
    assert ref.analysis.plan in ("chunked", "chunked_delta")


@pytest.mark.parametrize("case", [c for c in CHUNKED if c.name in ("gla", "gated_deltanet", "kda")],
                         ids=ids)
def test_decoding_matches_the_chunked_sequence(case):
    """.step() one token at a time (the fused kernel) continues exactly where the chunked
    sequence left off: same outputs and final state."""
    m = rnnc.compile(str(case.path), backend="triton", chunk_size=16, **case.dims)
    load_params(m, {k: v.float() for k, v in make_params(case, F64).items()})
    xs = [x.float() for x in make_inputs(case, 2, 20, F64)]
    h0 = {k: v.float() for k, v in make_initial_state(case, 2, F64).items()}
    full, final = m(*xs, initial_state=h0, output_final_state=True)
    head, state = m(*[x[:, :17] for x in xs], initial_state=h0, output_final_state=True)
    steps = []
    for t in range(17, 20):
        y, state = m.step(*[x[:, t] for x in xs], state=state)
        steps.append(y)
    torch.testing.assert_close(torch.cat([head, torch.stack(steps, 1)], 1), full, rtol=1e-4, atol=1e-5)
    for k in final:
        torch.testing.assert_close(state[k], final[k], rtol=1e-4, atol=1e-5)


def test_forcing_the_fused_kernel(monkeypatch):
    """RNNC_TRITON_KERNEL=fused runs a chunked plan through the fused recurrent kernel."""
    case = next(c for c in CHUNKED if c.name == "gla")
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "fused")
    before = _counts()
    tri = run_case(case, "triton", F32, 2, 17, False, chunk_size=16)
    after = _counts()
    assert {k for k in after if after[k] != before.get(k, 0)} == {"forward"}
    ref = run_case(case, "sequential", F64, 2, 17, False)
    for k in ref:
        assert rel_err(tri[k], ref[k]) < 1e-5


@pytest.mark.parametrize("name", ["kda", "rwkv7"])
def test_a_decay_per_key_channel_runs_the_dplr_kernels(monkeypatch, name):
    """A delta rule decayed per key channel runs triton_dplr's chunk kernels, forward and
    backward (never the PyTorch form), with its operands as streams: the spec's gates (KDA's
    r = exp(g) k, its beta k as w and p at once; RWKV-7's a kk) computed inside the kernels."""
    grad = True
    import rnnc.backends.scan_kernels as sk
    import rnnc.backends.triton_dplr as td
    from rnnc.backends import triton_gates as tg
    case = next(c for c in CHUNKED if c.name == name)
    calls = []
    real = td.chunk_dplr
    monkeypatch.setattr(td, "chunk_dplr", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(sk, "chunk_dplr", lambda *a, **k: pytest.fail("the PyTorch form ran"))
    compare_to_sequential(case, "triton", 17, grad, floor=FLOOR, chunk_size=16)
    assert calls
    for q, r, w, p, v, la, S0 in calls:
        assert all(isinstance(x, tg.Stream) for x in (q, r, w, p, v, la))
        assert la.shape[-1] == case.dims["K"] and (w is p) == (name == "kda")
        # KDA's r = exp(g) k, RWKV-7's w = a kk: products the kernels compute
        assert not (r if name == "kda" else w).identity


def test_nonfinite_gate_of_a_channel_decay_falls_back_exactly():
    """KDA with a NaN in one batch row's beta at step 13: the streamed dplr kernels' results
    are not finite, so the block is solved as before (the chunk form up to the NaN, step by
    step after it); the other row, and the steps before the NaN, match the sequential
    backend."""
    case = next(c for c in CHUNKED if c.name == "kda")
    ref = rnnc.compile(str(case.path), backend="sequential", **case.dims).double()
    tri = rnnc.compile(str(case.path), backend="triton", chunk_size=16, **case.dims)
    xs = make_inputs(case, 2, 21, F64, seed=4)
    xs[list(case.inputs).index("beta")][1, 13] = float("nan")
    with torch.no_grad():
        want = ref(*xs)
        got = tri(*[x.float() for x in xs])
    assert torch.isfinite(got[:, :13]).all() and torch.isfinite(got[0]).all()
    assert rel_err(got[0], want[0]) < 1e-4 and rel_err(got[1, :13], want[1, :13]) < 1e-4
    assert torch.isnan(got[1, 13:]).any() and torch.isnan(want[1, 13:]).any()


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_forcing_the_chunk_form_of_several_low_rank_terms(monkeypatch, grad):
    """Gated DeltaProduct (rank 3) runs the fused kernel by default (above);
    RNNC_TRITON_KERNEL=chunked runs its PyTorch chunk form (scan_kernels.chunk_dplr)."""
    import rnnc.backends.scan_kernels as sk
    case = next(c for c in CHUNKED if c.name == "gated_deltaproduct")
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "chunked")
    calls = []
    real = sk.chunk_dplr
    monkeypatch.setattr(sk, "chunk_dplr", lambda *a, **k: calls.append(1) or real(*a, **k))
    compare_to_sequential(case, "triton", 17, grad, floor=FLOOR, chunk_size=16)
    assert calls


def test_bad_chunk_size_is_a_clear_error():
    case = next(c for c in CHUNKED if c.name == "gla")
    with pytest.raises(rnnc.RnncError, match="chunk"):
        run_case(case, "triton", F32, 2, 17, False, chunk_size=12)


@pytest.mark.parametrize("decay", ["none", "per_head"])
def test_delta_rule_read_before_its_update(decay):
    """The Triton chunk kernels compute readouts of the new state; a readout of the state
    before the update once went through them as if it read the new one (1.75 off, silently).
    It now runs the diagonal-plus-low-rank kernels (triton_dplr), whose erase reads are such
    reads; forward and backward against sequential."""
    src = DELTA_READ_FIRST.replace("DECAY", READ_FIRST_DECAYS[decay])
    dims = dict(H=2, K=4, V=3)
    tri = rnnc.compile(src, backend="triton", chunk_size=16, **dims)
    seq = rnnc.compile(src, backend="sequential", **dims).double()
    tri.load_state_dict(seq.state_dict())
    g = torch.Generator().manual_seed(13)
    r = lambda *s: torch.randn(2, 19, *s, generator=g, dtype=F64)  # noqa: E731
    xs = [r(2, 4), torch.nn.functional.normalize(r(2, 4), dim=-1), r(2, 3), torch.sigmoid(r(2)), r(2, 4)]
    x32 = [x.float().requires_grad_() for x in xs]
    x64 = [x.clone().requires_grad_() for x in xs]
    y32, y64 = tri(*x32), seq(*x64)
    assert rel_err(y32.detach(), y64.detach()) < 1e-5
    w = torch.randn(y64.shape, generator=g, dtype=F64)
    g32 = torch.autograd.grad((y32.double() * w).sum(), x32, allow_unused=True)
    g64 = torch.autograd.grad((y64 * w).sum(), x64, allow_unused=True)
    for a, b in zip(g32, g64):
        if b is None:   # g, without a decay
            assert a is None or not a.abs().any()
        else:
            assert rel_err(a.double(), b) < 1e-4


@pytest.mark.parametrize("name", ["two_outer_products", "delta_rule_plus_a_write"])
def test_input_of_several_terms(name):
    """An input that is a sum of terms runs the chunk kernels once per term (materialised
    operands); forward and backward against sequential."""
    src = SEVERAL_INPUTS[name]
    dims = dict(H=2, K=3, V=2)
    tri = rnnc.compile(src, backend="triton", chunk_size=16, **dims)
    seq = rnnc.compile(src, backend="sequential", **dims).double()
    assert tri.analysis.plan in ("chunked", "chunked_delta")
    g = torch.Generator().manual_seed(15)
    xs = several_inputs_args(name, 19, g)
    x32 = [x.float().requires_grad_() for x in xs]
    x64 = [x.clone().requires_grad_() for x in xs]
    before = _counts()
    y32, y64 = tri(*x32), seq(*x64)
    assert _counts().get("chunked", 0) > before.get("chunked", 0)
    assert rel_err(y32.detach(), y64.detach()) < 1e-5
    w = torch.randn(y64.shape, generator=g, dtype=F64)
    for a, b in zip(torch.autograd.grad((y32.double() * w).sum(), x32),
                    torch.autograd.grad((y64 * w).sum(), x64)):
        assert rel_err(a.double(), b) < 1e-4
