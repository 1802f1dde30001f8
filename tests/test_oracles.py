"""rnnc's compiled examples against independent implementations.

- elman / lstm / gru against torch.nn.RNN / LSTM / GRU with copied weights;
- the fla-backed examples against fla-core's naive recurrent functions (fp32 inside);
- every example against its hand-written loop in references.py, in float64.

The table of examples lives in cases.py; the adapters in oracles.py and references.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import oracles  # noqa: E402
import references  # noqa: E402
from cases import (CASES, FLA_CASES, TORCH_NN_CASES, compile_case,  # noqa: E402
                   make_initial_state, make_inputs)

ids = lambda c: c.name  # noqa: E731

F64 = torch.float64


def run(m, xs, init):
    """Full-sequence forward through rnnc, returning (outputs, final_state)."""
    res = m(*xs, initial_state=init, output_final_state=True)
    assert isinstance(res, tuple) and len(res) == 2, "output_final_state=True must return (outputs, final_state)"
    out, final = res
    assert isinstance(final, dict), f"final state must be a dict, got {type(final)}"
    return out, final


def check_shapes(case, out, final, B, T):
    (oname,) = case.outputs  # every example has a single output
    assert isinstance(out, torch.Tensor), f"single-output spec must return a tensor, got {type(out)}"
    assert tuple(out.shape) == (B, T, *case.output_shape(oname))
    assert set(final) == set(case.states), f"final state keys {sorted(final)} != {sorted(case.states)}"
    for k, v in final.items():
        assert tuple(v.shape) == (B, *case.state_shape(k)), f"state {k}: shape {tuple(v.shape)}"


def assert_states_close(got, want, **tol):
    assert set(got) == set(want), f"{sorted(got)} != {sorted(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda s, k=k: f"final state {k}: {s}")


# ---------------------------------------------------------------------------
# torch.nn
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "rand_init"])
@pytest.mark.parametrize("case", TORCH_NN_CASES, ids=ids)
def test_torch_nn(case, with_init, dtype, tol):
    B, T = 3, 10
    D, H = case.dims["D"], case.dims["H"]
    tmod = oracles.make_torch_rnn(case.name, D, H, dtype, seed=7)
    params = oracles.torch_to_params(case.name, tmod)  # torch weights -> rnnc params
    m, _ = compile_case(case, dtype, params=params)
    xs = make_inputs(case, B, T, dtype, seed=1)
    init = make_initial_state(case, B, dtype, seed=2) if with_init else None

    with torch.no_grad():
        want, want_final = oracles.run_torch(case.name, tmod, xs[0], init)
        out, final = run(m, xs, init)
    check_shapes(case, out, final, B, T)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    assert_states_close(final, want_final, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# fla-core naive references
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "rand_init"])
@pytest.mark.parametrize("case", FLA_CASES, ids=ids)
def test_fla_oracle(case, with_init):
    if not oracles.fla_available():
        pytest.skip("fla-core cannot be imported (needs fla-core==0.6.0 and triton)")
    B, T = 2, 12
    m, params = compile_case(case, F64)
    xs = make_inputs(case, B, T, F64, seed=3)
    init = make_initial_state(case, B, F64, seed=4) if with_init else None
    oracle = getattr(oracles, case.oracle)
    with torch.no_grad():
        want, want_final = oracle(params, xs, init)
        out, final = run(m, xs, init)
    check_shapes(case, out, final, B, T)
    # fla computes in fp32 (|relative error| ~1e-6 at these sizes)
    torch.testing.assert_close(out, want, rtol=3e-5, atol=3e-5)
    assert_states_close(final, want_final, rtol=3e-5, atol=3e-5)


# ---------------------------------------------------------------------------
# hand-written reference loops, float64
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "rand_init"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_reference(case, with_init):
    B, T = 2, 9
    m, params = compile_case(case, F64)
    xs = make_inputs(case, B, T, F64, seed=5)
    init = make_initial_state(case, B, F64, seed=6) if with_init else None
    init_copy = None if init is None else {k: v.clone() for k, v in init.items()}
    xs_copy = [x.clone() for x in xs]

    with torch.no_grad():
        out, final = run(m, xs, init)
        plain = m(*xs) if init is None else m(*xs, initial_state=init)
    # the compiled module must not modify its arguments in place
    for a, b in zip(xs, xs_copy):
        assert torch.equal(a, b), "rnnc modified an input tensor in place"
    if init is not None:
        for k in init:
            assert torch.equal(init[k], init_copy[k]), f"rnnc modified initial_state[{k!r}] in place"

    want, want_final = getattr(references, case.reference)(params, xs, init)
    check_shapes(case, out, final, B, T)
    assert out.dtype == F64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert_states_close(final, want_final, rtol=1e-10, atol=1e-10)
    # without output_final_state the outputs come alone and are the same
    assert isinstance(plain, torch.Tensor)
    torch.testing.assert_close(plain, out, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_reference_float32(case):
    """float32 modules stay float32 and agree with the float64 reference to fp32 accuracy."""
    B, T = 2, 8
    m, params = compile_case(case, torch.float32)
    xs = make_inputs(case, B, T, torch.float32, seed=8)
    with torch.no_grad():
        out, final = run(m, xs, None)
    assert out.dtype == torch.float32
    for v in final.values():
        assert v.dtype == torch.float32
    want, want_final = getattr(references, case.reference)(
        {k: v.double() for k, v in params.items()}, [x.double() for x in xs], None)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    assert_states_close({k: v.double() for k, v in final.items()}, want_final, rtol=1e-4, atol=1e-4)
