"""Packed sequences (`cu_seqlens`, fla's convention; rnnc.varlen).

Every example, packed N sequences of different lengths back to back, must give what the
sequential backend gives on each sequence alone: outputs, and final states from per-sequence
initial states. Then gradients, the one-call path for equal lengths, the Triton backend (under
the interpreter) and the errors.
"""
from __future__ import annotations

import pytest
import torch

import rnnc
from cases import CASES, load_params, make_initial_state, make_inputs, make_params

F64 = torch.float64
LENGTHS = [4, 1, 7, 4, 2]   # distinct and repeated lengths, a sequence of one step


def _cu(lengths):
    return torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))])


def _packed_case(case, lengths, seed=0):
    """(inputs packed [1, T_total, ...], per-sequence inputs [1, L_i, ...], initial states [N, ...])."""
    N = len(lengths)
    per = [make_inputs(case, 1, n, seed=seed + i) for i, n in enumerate(lengths)]
    packed = [torch.cat(parts, 1) for parts in zip(*per)]
    return packed, per, make_initial_state(case, N)


def _check_against_separate(m, ref, packed, per, init, lengths, rtol=1e-10):
    y, final = m(*packed, cu_seqlens=_cu(lengths), initial_state=init, output_final_state=True)
    ys = y if isinstance(y, tuple) else (y,)
    t = 0
    for i, (xs, n) in enumerate(zip(per, lengths)):
        yi, fi = ref(*xs, initial_state={k: v[i:i + 1] for k, v in init.items()},
                     output_final_state=True)
        for got, want in zip(ys, yi if isinstance(yi, tuple) else (yi,)):
            torch.testing.assert_close(got[:, t:t + n], want, rtol=rtol, atol=rtol)
        for k in fi:
            torch.testing.assert_close(final[k][i:i + 1], fi[k], rtol=rtol, atol=rtol)
        t += n
    assert t == packed[0].shape[1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_packed_sequences_match_separate_runs(case):
    params = make_params(case)
    m = rnnc.compile(str(case.path), backend="auto", **case.dims).double()
    ref = rnnc.compile(str(case.path), backend="sequential", **case.dims).double()
    load_params(m, params)
    load_params(ref, params)
    packed, per, init = _packed_case(case, LENGTHS)
    _check_against_separate(m, ref, packed, per, init, LENGTHS)


def test_default_initial_state_and_no_final_state():
    case = next(c for c in CASES if c.name == "gated_deltanet")
    m = rnnc.compile(str(case.path), backend="scan", **case.dims).double()
    packed, per, _ = _packed_case(case, [3, 5])
    y = m(*packed, cu_seqlens=[0, 3, 8])           # a list of ints is taken too
    torch.testing.assert_close(y[:, :3], m(*per[0]))
    torch.testing.assert_close(y[:, 3:], m(*per[1]))


def test_equal_lengths_take_one_call(monkeypatch):
    """Equal lengths are one batch [N, L]; otherwise one call per distinct length."""
    case = next(c for c in CASES if c.name == "gla")
    m = rnnc.compile(str(case.path), backend="scan", **case.dims).double()
    calls = []
    real = m._run
    monkeypatch.setattr(m, "_run", lambda xs, s, lead: calls.append(xs[0].shape[:2]) or real(xs, s, lead))
    for lengths, want in (([3, 3, 3], [(3, 3)]), (LENGTHS, [(5, 1), (4, 1), (3, 2), (1, 3)])):
        calls.clear()
        packed, per, init = _packed_case(case, lengths)
        m(*packed, cu_seqlens=_cu(lengths), initial_state=init)
        assert [tuple(c) for c in calls] == want


def test_packed_gradients():
    """gradcheck in float64 through the stages (gathers, index_copy of the states)."""
    case = next(c for c in CASES if c.name == "gla")
    m = rnnc.compile(str(case.path), backend="scan", **case.dims).double()
    lengths = [2, 3, 1]
    packed, _, init = _packed_case(case, lengths)
    cu = _cu(lengths)
    xs = [x.requires_grad_() for x in packed]
    s0 = init["S"].requires_grad_()

    def f(*args):
        y, fin = m(*args[:-1], cu_seqlens=cu, initial_state={"S": args[-1]}, output_final_state=True)
        return y, fin["S"]
    assert torch.autograd.gradcheck(f, (*xs, s0))


@pytest.mark.parametrize("name", ["lstm", "s6", "gla", "kda"])
def test_packed_on_triton(name):
    """The fused kernel (lstm), the scan kernel (s6), the chunk kernels (gla) and the PyTorch
    chunk form a delta rule decayed per key channel takes (kda), in float32."""
    case = next(c for c in CASES if c.name == name)
    params = make_params(case, torch.float32)
    # chunk 16: the interpreter's time grows with the chunk (the default is 64)
    m = rnnc.compile(str(case.path), backend="triton", chunk_size=16, **case.dims)
    ref = rnnc.compile(str(case.path), backend="sequential", **case.dims)
    load_params(m, params)
    load_params(ref, params)
    packed, per, init = _packed_case(case, [3, 1, 5])
    f32 = lambda xs: [x.float() for x in xs]  # noqa: E731
    _check_against_separate(m, ref, f32(packed), [f32(p) for p in per],
                            {k: v.float() for k, v in init.items()}, [3, 1, 5], rtol=2e-5)


@pytest.mark.parametrize("cu,B,msg", [
    ([0, 3, 9], 2, "batch size 1"),
    ([1, 3, 8], 1, "start at 0"),
    ([0, 3, 7], 1, "end at the inputs' length T = 8"),
    ([0, 5, 5, 8], 1, "sequence 1 runs from 5 to 5"),
    ([0, 6, 3, 8], 1, "increase strictly"),
    ([0], 1, "at least two offsets"),
    (torch.tensor([0.0, 8.0]), 1, "integer tensor"),
    (torch.tensor([[0, 8]]), 1, "1-D integer tensor"),
    ("0,8", 1, "list of ints"),
])
def test_bad_cu_seqlens_is_a_clear_error(cu, B, msg):
    m = rnnc.compile("examples/gla.rnn", backend="scan", H=2, K=3, V=4)
    T = 9 if B == 2 else 8
    xs = [torch.randn(B, T, 2, 3), torch.randn(B, T, 2, 3), torch.randn(B, T, 2, 4),
          torch.nn.functional.logsigmoid(torch.randn(B, T, 2, 3))]
    with pytest.raises(rnnc.RnncError, match="rnn gla") as err:
        m(*xs, cu_seqlens=cu)
    assert msg in str(err.value)


def test_initial_state_per_sequence_is_checked():
    m = rnnc.compile("examples/gla.rnn", backend="scan", H=2, K=3, V=4)
    xs = [torch.randn(1, 8, 2, 3), torch.randn(1, 8, 2, 3), torch.randn(1, 8, 2, 4),
          torch.nn.functional.logsigmoid(torch.randn(1, 8, 2, 3))]
    with pytest.raises(rnnc.RnncError, match=r"must have shape \[B, 2, 3, 4\] = \[2, 2, 3, 4\]"):
        m(*xs, cu_seqlens=[0, 3, 8], initial_state={"S": torch.zeros(1, 2, 3, 4)})
