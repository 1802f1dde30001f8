"""The Triton backend's wide kernels (`triton_wide_codegen`): dense recurrences whose recurrent
matrices do not fit the fused kernel's registers (an LSTM at H = 768), forward and backward,
under Triton's interpreter. The fused kernel's register limit is lowered here so that small sizes take the
wide path; H = 40 is cut into three blocks of 16 (the last one padded), and B = 17 makes two
batch blocks of 16, where the recurrent products run as tl.dot.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc.backends import triton_backend as tb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASE_BY_NAME, compile_offline, judge_float32, rel_err, run_case  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DENSE = ("elman", "lstm", "gru", "slstm")


@pytest.fixture
def wide(monkeypatch):
    """Every spec with a recurrent matrix takes the wide kernel; launches are counted."""
    monkeypatch.setattr(tb, "REGISTER_LIMIT", 64)
    tb.LAUNCHES.clear()


def widened(name: str, H: int = 40, D: int = 8):
    case = CASE_BY_NAME[name]
    return dataclasses.replace(case, dims={**case.dims, "H": H, "D": D})


@pytest.mark.parametrize("B,T", [(3, 1), (3, 7), (17, 5)], ids=["T1", "T7", "B17"])
@pytest.mark.parametrize("name", DENSE)
def test_matches_sequential(wide, name, B, T):
    """Outputs and final states, from a random initial state, against the float64 reference:
    within 20x the float32 sequential backend's own error; one launch per step."""
    case = widened(name)
    with torch.no_grad():
        got = run_case(case, "triton", torch.float32, B, T)
        ref = run_case(case, "sequential", torch.float64, B, T)
        s32 = run_case(case, "sequential", torch.float32, B, T)
    judge_float32(name, got, ref, s32)
    assert tb.LAUNCHES["wide_forward"] == T and tb.LAUNCHES["forward"] == 0


def test_step_by_step_equals_the_sequence(wide):
    """.step() (one launch of the wide kernel) carried over T steps gives the full call's
    outputs and final state."""
    m = rnnc.compile("examples/lstm.rnn", backend="triton", D=8, H=40)
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, final = m(x, output_final_state=True)
        st, ys = None, []
        for t in range(x.shape[1]):
            yt, st = m.step(x[:, t], state=st)
            ys.append(yt)
    assert rel_err(torch.stack(ys, 1), y) < 1e-6
    assert all(rel_err(st[k], final[k]) < 1e-6 for k in final)


def test_bf16_inputs_round_the_outputs_once(wide):
    """bf16 inputs are read as they are and computed in float32: the outputs are a float32
    run on the same values, rounded to bf16 once (within one ulp: the interpreter rounds
    toward zero, a GPU to nearest)."""
    m = rnnc.compile("examples/gru.rnn", backend="triton", D=8, H=40)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        y16 = m(x)
        y32 = m(x.float())
    assert y16.dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps
    assert ((y16.float() - y32).abs() <= eps * y32.abs() + 1e-30).all()
    assert not torch.equal(y16.float(), y32)  # the outputs were rounded


@pytest.mark.parametrize("seed", range(4))
def test_random_nonlinear_specs(wide, seed):
    """Random Elman-like specs (`rnnc.random_spec`, kind nonlinear) at H = 20."""
    src, dims = rnnc.random_spec(seed, "nonlinear")
    dims = {**dims, "H": 20}
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    tri = rnnc.compile(src, backend="triton", **dims)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, dims["D"], generator=g, dtype=torch.float64)
    h0 = {"h": torch.randn(2, 20, generator=g, dtype=torch.float64)}
    with torch.no_grad():
        want, wf = ref(x, initial_state=h0, output_final_state=True)
        got, gf = tri(x.float(), initial_state={"h": h0["h"].float()}, output_final_state=True)
    assert rel_err(got, want) < 1e-5 and rel_err(gf["h"], wf["h"]) < 1e-5
    assert tb.LAUNCHES["wide_forward"] == 9


@pytest.mark.parametrize("B,T", [(3, 5), (17, 4)], ids=["B3", "B17"])
@pytest.mark.parametrize("name", DENSE)
def test_gradients_match_sequential(wide, name, B, T):
    """Gradients of inputs, params and initial states (of a random projection of the outputs
    and final states) through wide_backward, one launch per step, and the GEMMs after it."""
    case = widened(name)
    got = run_case(case, "triton", torch.float32, B, T, grad=True)
    assert tb.LAUNCHES["wide_backward"] == T
    ref = run_case(case, "sequential", torch.float64, B, T, grad=True)
    s32 = run_case(case, "sequential", torch.float32, B, T, grad=True)
    judge_float32(name, got, ref, s32)


@pytest.mark.parametrize("seed", range(4))
def test_random_nonlinear_specs_train(wide, seed):
    """Gradients of inputs, params and the initial state of random Elman-like specs at H = 20
    (a random projection of outputs and final state), against the float64 reference."""
    src, dims = rnnc.random_spec(seed, "nonlinear")
    dims = {**dims, "H": 20}
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    tri = rnnc.compile(src, backend="triton", **dims)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(2, 7, dims["D"], generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 20, generator=g, dtype=torch.float64)
    wy, wh = torch.randn(2, 7, 20, generator=g, dtype=torch.float64), torch.randn(2, 20, generator=g, dtype=torch.float64)

    def grads(m, dtype):
        xs, s0 = x.to(dtype).requires_grad_(), h0.to(dtype).requires_grad_()
        y, fin = m(xs, initial_state={"h": s0}, output_final_state=True)
        loss = (y.double() * wy).sum() + (fin["h"].double() * wh).sum()
        return torch.autograd.grad(loss, [xs, s0, *m.parameters()])
    want, got = grads(ref, torch.float64), grads(tri, torch.float32)
    assert tb.LAUNCHES["wide_backward"] == 7
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


def test_training_without_a_backward_is_refused_with_a_clear_error(wide):
    """A spec the wide forward takes but its backward does not (here a value computed from
    params alone, exp(b)) says so when a call needs gradients, instead of returning outputs
    without one; under torch.no_grad() it runs."""
    src = ("rnn expbias(x[D]) -> h[H] {\n"
           "    param W[H,D], U[H,H], b[H]\n"
           "    state h[H] = 0\n"
           "    h = tanh(W @ x + U @ h + exp(b))\n"
           "}\n")
    m = rnnc.compile(src, backend="triton", D=4, H=20)
    x = torch.randn(2, 3, 4)
    with pytest.raises(rnnc.RnncError, match="no backward here .the step computes values from params"):
        m(x)
    assert tb.LAUNCHES["wide_forward"] == 0
    with torch.no_grad():
        assert m(x).shape == (2, 3, 20)


@pytest.mark.parametrize("stmt,why", [
    ("s = sum[u](h[u] * h[u])", "the wide kernel: the product at line 4 is not a param matrix"),
    ("s = max[u](h[u])", "the wide kernel: a reduction along the recurrent axis .line 4"),
], ids=["sum", "max"])
def test_a_spec_it_cannot_take_names_the_reason(wide, stmt, why):
    """Anything else that mixes along the recurrent axis keeps the register-limit error, with
    the wide kernel's reason and line."""
    src = ("rnn normed(x[D]) -> h[H] {\n"
           "    param W[H,D], U[H,H]\n"
           "    state h[H] = 0\n"
           f"    {stmt}\n"
           "    h = tanh(W @ x + U @ h) / (1 + s * s)\n"
           "}\n")
    m = rnnc.compile(src, backend="triton", D=4, H=20)
    with torch.no_grad(), pytest.raises(rnnc.RnncError, match=why):
        m(torch.randn(2, 3, 4))


def test_emit_shows_the_wide_kernel():
    from rnnc.backends import get
    backend = get("triton")
    lstm = rnnc.load("examples/lstm.rnn")
    text = backend.emit(lstm, rnnc.analysis.analyse(lstm))
    assert "def wide_forward(" in text and "tl.dot(hk, tl.trans(w)" in text
    mingru = rnnc.load("examples/mingru.rnn")
    assert "wide_forward" not in backend.emit(mingru, rnnc.analysis.analyse(mingru))


def test_compiles_for_gpu_at_full_width():
    """At H = 768 only the wide kernels are compiled (the fused ones do not fit), down to sm_90
    cubins, fp32 and bf16, for lstm and gru; at B = 16 (tl.dot rows) the forward, waiting
    between steps, spills nothing."""
    code = ("import rnnc, triton\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from triton.compiler import ASTSource\n"
            "from rnnc.backends import triton_backend as tb, triton_gates as tg\n"
            "for name in ('lstm', 'gru'):\n"
            "    rec = rnnc.load(f'examples/{name}.rnn')\n"
            "    a = rnnc.analysis.analyse(rec)\n"
            "    for dt in ('fp32', 'bf16'):\n"
            "        got = tb.compile_for(rec, a, dict(D=768, H=768), B=16, dtype=dt)\n"
            "        assert set(got) == {'wide_forward', 'wide_backward'} and min(got.values()) > 0, got\n"
            "rec = rnnc.load('examples/lstm.rnn')\n"
            "r = tb.Runner(rec, rnnc.analysis.analyse(rec))\n"
            "w, mod = r.wide()\n"
            "geo = r.wide_geometry(w, dict(D=768, H=768), 16)\n"
            "assert geo['programs'] == 48, geo\n"
            "sig, consts = tb.signature(rec, mod.wide_forward.arg_names, w.args,\n"
            "                           {**geo['const'], 'SYNC': True}, flags=w.flag_args)\n"
            "k = triton.compile(ASTSource(fn=mod.wide_forward, signature=sig, constexprs=consts),\n"
            "                   target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8))\n"
            "use = tg.cubin_usage(k.asm['cubin'])\n"
            "assert use['stack'] in (0, None), use\n"
            "print('compiled')\n")
    compile_offline(code)


def test_one_launch_for_all_steps_where_programs_wait(wide, monkeypatch):
    """RNNC_TRITON_WIDE=persistent: one launch runs every step, the programs waiting for each
    other between steps, forward and backward. Under the interpreter, which runs programs one after another, that
    completes with a single program (H = 16, B = 3); with three, the first waits past its cap,
    raises the flag, and the runner redoes the call a step a launch: the same results."""
    monkeypatch.setenv("RNNC_TRITON_WIDE", "persistent")
    monkeypatch.setattr(tb, "WIDE_SPINS", 8)
    for H, launches, fallbacks in ((16, 1, 0), (40, 1 + 5, 1)):
        case = widened("lstm", H=H)
        tb.LAUNCHES.clear()
        with torch.no_grad():
            got = run_case(case, "triton", torch.float32, 3, 5)
            ref = run_case(case, "sequential", torch.float64, 3, 5)
            s32 = run_case(case, "sequential", torch.float32, 3, 5)
        judge_float32("lstm", got, ref, s32)
        assert tb.LAUNCHES["wide_forward"] == launches and tb.LAUNCHES["wide_fallback"] == fallbacks
        tb.LAUNCHES.clear()
        got = run_case(case, "triton", torch.float32, 3, 5, grad=True)
        ref = run_case(case, "sequential", torch.float64, 3, 5, grad=True)
        s32 = run_case(case, "sequential", torch.float32, 3, 5, grad=True)
        judge_float32("lstm", got, ref, s32)
        assert tb.LAUNCHES["wide_backward"] == launches and tb.LAUNCHES["wide_fallback"] == 2 * fallbacks


def test_wide_mode_setting_is_checked(wide, monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_WIDE", "sometimes")
    m = rnnc.compile("examples/elman.rnn", backend="triton", D=4, H=20)
    with torch.no_grad(), pytest.raises(rnnc.RnncError, match="RNNC_TRITON_WIDE must be"):
        m(torch.randn(2, 3, 4))


def test_bf16_input_gradients_are_the_float32_ones_rounded(wide):
    """Training on bf16 inputs: the kernels read them as they are, every gradient accumulates
    in float32, and the inputs' gradients come back in bf16, rounded once."""
    m = rnnc.compile("examples/gru.rnn", backend="triton", D=8, H=40)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    # cotangents that bf16 holds exactly: both runs then backpropagate the same values
    wy = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    grads = []
    for xin in (x.clone().requires_grad_(), x.float().requires_grad_()):
        m.zero_grad()
        (m(xin).float() * wy).sum().backward()
        grads.append((xin.grad, [p.grad.clone() for p in m.parameters()]))
    (g16, p16), (g32, p32) = grads
    assert g16.dtype == torch.bfloat16 and torch.equal(g16, g32.to(torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(p16, p32))


def test_heads_run_forward_and_say_why_they_do_not_train(wide):
    """A multi-head LSTM (heads a parallel axis of the grid, E the recurrent one): the forward
    runs; its backward, which takes vectors along the recurrent axis only, says so."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from triton_gpu import MHLSTM_SPEC
    finally:
        sys.path.pop(0)
    dims = dict(D=8, NH=3, E=40)
    ref = rnnc.compile(MHLSTM_SPEC, backend="sequential", **dims).double()
    tri = rnnc.compile(MHLSTM_SPEC, backend="triton", **dims)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(tri(x.float()), ref(x)) < 1e-5
    assert tb.LAUNCHES["wide_forward"] == 4
    with pytest.raises(rnnc.RnncError, match="no backward here .a value it reads or writes"):
        tri(x.float())
