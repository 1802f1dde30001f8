"""Properties of every compiled example (sequential backend, float64):

- ``.step()`` decoding equals the full-sequence forward, outputs and final state;
- state round trip: forward over [0:T] == forward over [0:t] then [t:T] from the
  returned final state;
- T = 1 works and equals the reference loop;
- default-initialized modules run and agree with the reference on their own params;
- gradients: torch.autograd.gradcheck w.r.t. inputs, params (through
  torch.func.functional_call) and the initial state, and backward through the real
  nn.Parameters equal to autograd through the reference loop.

No expected numbers are hard-coded: everything is compared with references.py or with
rnnc itself along another path.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import references  # noqa: E402
from cases import CASES, compile_case, gradcheck_fn, make_initial_state, make_inputs  # noqa: E402

ids = lambda c: c.name  # noqa: E731
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
INIT = pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "rand_init"])


def run(m, xs, init):
    out, final = m(*xs, initial_state=init, output_final_state=True)
    assert isinstance(final, dict)
    return out, final


def assert_states_close(got, want, **tol):
    assert set(got) == set(want), f"{sorted(got)} != {sorted(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda s, k=k: f"state {k}: {s}")


# ---------------------------------------------------------------------------
# decoding and state passing
# ---------------------------------------------------------------------------

@INIT
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_step_matches_forward(case, with_init):
    B, T = 2, 7
    m, _ = compile_case(case, F64)
    xs = make_inputs(case, B, T, F64, seed=11)
    init = make_initial_state(case, B, F64, seed=12) if with_init else None
    with torch.no_grad():
        out, final = run(m, xs, init)
        st = init
        steps = []
        for t in range(T):
            o_t, st = m.step(*[x[:, t] for x in xs], state=st)
            assert isinstance(st, dict)
            assert tuple(o_t.shape) == tuple(out[:, t].shape), f"step output shape {tuple(o_t.shape)}"
            steps.append(o_t)
    torch.testing.assert_close(torch.stack(steps, 1), out, **TOL)
    assert_states_close(st, final, **TOL)


@INIT
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_state_roundtrip(case, with_init):
    B, T = 2, 11
    m, _ = compile_case(case, F64)
    xs = make_inputs(case, B, T, F64, seed=13)
    init = make_initial_state(case, B, F64, seed=14) if with_init else None
    with torch.no_grad():
        out, final = run(m, xs, init)
        for t in (1, 4, T - 1):
            out1, s1 = run(m, [x[:, :t] for x in xs], init)
            out2, s2 = run(m, [x[:, t:] for x in xs], s1)
            torch.testing.assert_close(torch.cat([out1, out2], 1), out, **TOL)
            assert_states_close(s2, final, **TOL)


@INIT
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_single_step_sequence(case, with_init):
    """T = 1: forward, step and reference agree."""
    B = 3
    m, params = compile_case(case, F64)
    xs = make_inputs(case, B, 1, F64, seed=15)
    init = make_initial_state(case, B, F64, seed=16) if with_init else None
    with torch.no_grad():
        out, final = run(m, xs, init)
        o_t, st = m.step(*[x[:, 0] for x in xs], state=init)
    want, want_final = getattr(references, case.reference)(params, xs, init)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, **TOL)
    assert_states_close(final, want_final, **TOL)
    torch.testing.assert_close(o_t, want[:, 0], **TOL)
    assert_states_close(st, want_final, **TOL)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_default_params(case):
    """The spec's own initialization (no randomized params) runs and matches the reference."""
    import rnnc

    m = rnnc.compile(str(case.path), backend="sequential", **case.dims).double()
    named = dict(m.named_parameters())
    assert set(named) == set(case.params)
    for k, p in named.items():
        assert tuple(p.shape) == case.param_shape(k), f"param {k}: {tuple(p.shape)}"
    params = {k: p.detach().clone() for k, p in named.items()}
    xs = make_inputs(case, 2, 6, F64, seed=17)
    with torch.no_grad():
        out, final = run(m, xs, None)
    want, want_final = getattr(references, case.reference)(params, xs, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, **TOL)
    assert_states_close(final, want_final, **TOL)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------

@INIT
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_gradcheck(case, with_init):
    """Finite differences vs autograd, w.r.t. inputs, params and (if given) the initial
    state, through the outputs and the final state."""
    B, T = 1, 3
    m, params = compile_case(case, F64)
    init = make_initial_state(case, B, F64, seed=22) if with_init else {}
    f, args = gradcheck_fn(m, params, make_inputs(case, B, T, F64, seed=21), init)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@INIT
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_grad_matches_reference(case, with_init):
    """backward() through the module's own nn.Parameters equals autograd through the
    reference loop, for inputs, params and initial state."""
    B, T = 2, 6
    m, params = compile_case(case, F64)
    xs = make_inputs(case, B, T, F64, seed=31)
    init = make_initial_state(case, B, F64, seed=32) if with_init else None
    gen = torch.Generator().manual_seed(33)

    # module
    xs_m = [x.clone().requires_grad_() for x in xs]
    init_m = None if init is None else {k: v.clone().requires_grad_() for k, v in init.items()}
    out, final = run(m, xs_m, init_m)
    w_out = torch.randn(out.shape, generator=gen, dtype=F64)
    w_fin = {k: torch.randn(final[k].shape, generator=gen, dtype=F64) for k in sorted(final)}
    loss = (out * w_out).sum() + sum((final[k] * w_fin[k]).sum() for k in w_fin)
    m.zero_grad(set_to_none=True)
    loss.backward()

    # reference
    xs_r = [x.clone().requires_grad_() for x in xs]
    init_r = None if init is None else {k: v.clone().requires_grad_() for k, v in init.items()}
    params_r = {k: v.clone().requires_grad_() for k, v in params.items()}
    out_r, final_r = getattr(references, case.reference)(params_r, xs_r, init_r)
    loss_r = (out_r * w_out).sum() + sum((final_r[k] * w_fin[k]).sum() for k in w_fin)
    loss_r.backward()

    tol = dict(rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(loss.detach(), loss_r.detach(), **tol)
    for i, (a, b) in enumerate(zip(xs_m, xs_r)):
        assert a.grad is not None, f"no gradient for input {list(case.inputs)[i]}"
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda s, i=i: f"input {list(case.inputs)[i]}: {s}")
    named = dict(m.named_parameters())
    for k in params:
        assert named[k].grad is not None, f"no gradient for param {k}"
        torch.testing.assert_close(named[k].grad, params_r[k].grad, **tol, msg=lambda s, k=k: f"param {k}: {s}")
    if init is not None:
        for k in init:
            assert init_m[k].grad is not None, f"no gradient for initial state {k}"
            torch.testing.assert_close(init_m[k].grad, init_r[k].grad, **tol,
                                       msg=lambda s, k=k: f"initial state {k}: {s}")


def _graph_nodes(fn) -> set:
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack.extend(g for g, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backward_has_no_per_step_select(case):
    """The loop reads step t of its inputs and hoisted values from one unbind per tensor,
    never x[:, t]: the backward of each such select filled a zero gradient of the whole
    [B, T, ...] tensor, O(T^2) in all (gla, T = 1024: 64 s forward+backward, 1.5 s after)."""
    m, _ = compile_case(case)
    xs = [x.requires_grad_() for x in make_inputs(case, 2, 6)]
    y = m(*xs)
    names = _graph_nodes((y[0] if isinstance(y, tuple) else y).grad_fn)
    assert "UnbindBackward0" in names and "SelectBackward0" not in names, sorted(names)
