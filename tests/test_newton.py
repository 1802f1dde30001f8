"""The newton backend (DEER-style Newton iterations over time) against the sequential reference.

Every example, nonlinear or not: outputs and final states from a random initial state, over
blocks shorter than the sequence (the last one partial); gradients by the implicit-function
adjoint, against sequential's and by gradcheck; the exact fallback for a block that does not
converge; the size limit.
"""
from __future__ import annotations

import pytest
import torch

import rnnc
import rnnc.backends.newton as newton
from cases import (CASES, load_params, make_initial_state, make_inputs, make_params, rel_err,
                   random_spec_against_sequential)
from rnnc.random_spec import KINDS

F64 = torch.float64
NONLINEAR = ("elman", "lstm", "gru", "slstm")


def _pair(case, block=8):
    params = make_params(case)
    m = rnnc.compile(str(case.path), backend="newton", chunk_size=block, **case.dims).double()
    ref = rnnc.compile(str(case.path), backend="sequential", **case.dims).double()
    load_params(m, params)
    load_params(ref, params)
    return m, ref


def _flat(y):
    return y if isinstance(y, tuple) else (y,)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_example_matches_sequential(case):
    m, ref = _pair(case)
    xs, init = make_inputs(case, 2, 19), make_initial_state(case, 2)
    y, f = m(*xs, initial_state=init, output_final_state=True)
    yr, fr = ref(*xs, initial_state=init, output_final_state=True)
    for a, b in zip(_flat(y), _flat(yr)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for k in fr:
        torch.testing.assert_close(f[k], fr[k], rtol=1e-9, atol=1e-9)
    iters = m._runner.iterations
    assert len(iters) == 3    # blocks of 8, 8 and 3 steps
    if case.name not in NONLINEAR + ("mlstm",):
        assert iters == [2, 2, 2]   # affine: exact after one iteration, the second confirms it
    else:
        assert all(i is not None for i in iters), iters   # converged, not stepped


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_match_sequential(case):
    """Gradients of a random projection of outputs and final states, with respect to inputs,
    params and the initial state."""
    m, ref = _pair(case)
    gen = torch.Generator().manual_seed(5)
    grads = []
    for mod in (m, ref):
        xs = [x.requires_grad_() for x in make_inputs(case, 2, 11)]
        init = {k: v.requires_grad_() for k, v in make_initial_state(case, 2).items()}
        y, f = mod(*xs, initial_state=init, output_final_state=True)
        outs = [*_flat(y), *(f[k] for k in sorted(f))]
        gen.manual_seed(5)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs)
        wrt = xs + list(mod.parameters()) + [init[k] for k in sorted(init)]
        grads.append(torch.autograd.grad(loss, wrt, allow_unused=True))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            assert rel_err(a, b) < 1e-8, rel_err(a, b)


@pytest.mark.parametrize("name", ["elman", "gru", "lstm"])
def test_gradcheck(name):
    case = next(c for c in CASES if c.name == name)
    m, _ = _pair(case, block=3)
    xs = [x.requires_grad_() for x in make_inputs(case, 1, 7)]
    init = {k: v.requires_grad_() for k, v in make_initial_state(case, 1).items()}
    names = sorted(init)

    def f(*args):
        y, fin = m(*args[:len(xs)], initial_state=dict(zip(names, args[len(xs):])),
                   output_final_state=True)
        return (*_flat(y), *(fin[k] for k in names))
    assert torch.autograd.gradcheck(f, (*xs, *(init[k] for k in names)))


def test_a_block_that_does_not_converge_is_stepped(monkeypatch):
    """With a tolerance no iterate meets, each block runs its L + 1 iterations and is then
    stepped through exactly; mlstm's default state m = -inf makes its iterates non-finite,
    which is stepped through the same way."""
    monkeypatch.setattr(newton, "TOLERANCE", -1.0)
    case = next(c for c in CASES if c.name == "gru")
    m, ref = _pair(case)
    xs = make_inputs(case, 2, 10)
    torch.testing.assert_close(m(*xs), ref(*xs), rtol=1e-12, atol=1e-12)
    assert m._runner.iterations == [None, None]
    monkeypatch.undo()
    case = next(c for c in CASES if c.name == "mlstm")
    m, ref = _pair(case)
    xs = make_inputs(case, 2, 10)
    torch.testing.assert_close(m(*xs), ref(*xs), rtol=1e-12, atol=1e-12)
    assert None in m._runner.iterations


def test_short_and_empty_sequences():
    case = next(c for c in CASES if c.name == "lstm")
    m, ref = _pair(case)
    for T in (0, 1):
        xs, init = make_inputs(case, 2, T), make_initial_state(case, 2)
        y, f = m(*xs, initial_state=init, output_final_state=True)
        yr, fr = ref(*xs, initial_state=init, output_final_state=True)
        torch.testing.assert_close(y, yr)
        for k in fr:
            torch.testing.assert_close(f[k], fr[k])


def test_a_state_too_large_is_refused():
    """A block the step mixes (elman's whole h) over the limit is refused; an elementwise
    state of any width runs (blocks of one entry)."""
    m = rnnc.compile("examples/elman.rnn", backend="newton", D=2, H=newton.MAX_STATE + 1)
    with pytest.raises(rnnc.RnncError, match="blocks of 1025 entries"):
        m(torch.randn(1, 3, 2))
    wide = rnnc.compile("examples/mingru.rnn", backend="newton", D=2, H=2 * newton.MAX_STATE)
    ref = rnnc.compile("examples/mingru.rnn", backend="sequential", D=2, H=2 * newton.MAX_STATE)
    ref.load_state_dict(wide.state_dict())
    x = torch.randn(1, 5, 2)
    torch.testing.assert_close(wide(x), ref(x))


def test_auto_never_picks_newton():
    assert rnnc.compile("examples/gru.rnn", backend="auto", D=3, H=4).backend == "sequential"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_random_specs(kind, seed):
    """Random specs of every analysis class, float32 against the float64 sequential backend,
    outputs and gradients, in blocks of 4 steps over 9."""
    random_spec_against_sequential(kind, seed, 9, 1e-4, 1e-3, backend="newton", chunk_size=4)


MHLSTM = """
rnn mhlstm(x[D]) -> h[NH,E] {
    param Wi[NH,E,D], Wf[NH,E,D], Wg[NH,E,D], Wo[NH,E,D]
    param Ri[NH,E,E], Rf[NH,E,E], Rg[NH,E,E], Ro[NH,E,E]
    state h[NH,E] = 0, c[NH,E] = 0
    i[a,e] = sigmoid(sum[d](Wi[a,e,d] * x[d]) + sum[u](Ri[a,e,u] * h[a,u]))
    f[a,e] = sigmoid(sum[d](Wf[a,e,d] * x[d]) + sum[u](Rf[a,e,u] * h[a,u]))
    g[a,e] = tanh(sum[d](Wg[a,e,d] * x[d]) + sum[u](Rg[a,e,u] * h[a,u]))
    o[a,e] = sigmoid(sum[d](Wo[a,e,d] * x[d]) + sum[u](Ro[a,e,u] * h[a,u]))
    c = f * c + i * g
    h = o * tanh(c)
}
"""
# the same with a state shared by the heads: no block structure
COUPLED = MHLSTM.replace("rnn mhlstm", "rnn coupled").replace(
    "state h[NH,E] = 0, c[NH,E] = 0", "state h[NH,E] = 0, c[NH,E] = 0, s = 0").replace(
    "    h = o * tanh(c)\n", "    h = o * tanh(c) + s\n    s = tanh(sum[a,e](h[a,e]))\n")


def _blocks(m, dims):
    from rnnc.interpret import concrete
    rec = m.recurrence
    return newton.blocks_of(rec, m.analysis.core, [concrete(s.shape, dims) for s in rec.states])


@pytest.mark.parametrize("src,groups", [(MHLSTM, 3), (COUPLED, 1)], ids=["heads", "coupled"])
def test_multi_head_cells_get_block_diagonal_jacobians(src, groups):
    """Heads that never meet make the Jacobian block-diagonal (one block per head, h and c
    of the head in it); a state shared by the heads couples them all (one block). Forward
    and gradients against sequential either way, and gradcheck."""
    dims = dict(NH=3, E=2, D=3)
    m = rnnc.compile(src, backend="newton", chunk_size=4, **dims).double()
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    ref.load_state_dict(m.state_dict())
    blk = _blocks(m, dims)
    assert blk.G == groups and blk.G * blk.m == (12 if groups == 3 else 13)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 3, generator=g, dtype=F64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = m(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)
    (gx,), (gr,) = torch.autograd.grad(y.sum(), [x]), torch.autograd.grad(yr.sum(), [xr])
    torch.testing.assert_close(gx, gr, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: m(t), (x[:1, :5].detach().requires_grad_(),))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_blocks_hold_every_nonzero_of_the_jacobian(case):
    """The claimed block structure against the step's full Jacobian (autograd, at a random
    state and input): every entry outside the blocks is exactly zero."""
    m, _ = _pair(case)
    blk = _blocks(m, case.dims)
    xs = [x[:, 0] for x in make_inputs(case, 1, 1)]
    init = make_initial_state(case, 1)
    names = sorted(init)
    shapes = {k: init[k].shape for k in names}
    flat0 = torch.cat([init[k].reshape(-1) for k in names])
    order = [s.name for s in m.recurrence.states]

    def step(flat):
        st, off = {}, 0
        for k in names:
            n = init[k].numel()
            st[k] = flat[off:off + n].reshape(shapes[k])
            off += n
        _, new = m.step(*xs, state=st)
        return torch.cat([new[k].reshape(-1) for k in names])
    J = torch.autograd.functional.jacobian(step, flat0)
    # blocks index the states in declaration order; the flat vector here is in name order
    pos, off = {}, 0
    for k in order:
        pos[k] = off
        off += init[k].numel()
    remap, off = torch.empty(len(flat0), dtype=torch.long), 0
    for k in names:
        n = init[k].numel()
        remap[pos[k]:pos[k] + n] = torch.arange(off, off + n)
        off += n
    group = torch.empty(len(flat0), dtype=torch.long)
    for gi, row in enumerate(blk.perm):
        group[remap[row]] = gi
    outside = group[:, None] != group[None, :]
    assert float(J[outside].abs().max()) == 0.0 if bool(outside.any()) else True
