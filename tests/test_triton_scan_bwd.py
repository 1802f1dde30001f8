"""The Triton backend's reverse-scan backward (`_scan_backward`) for diagonal recurrences.

When the scan kernel ran the forward, training runs `_scan_backward`: it walks the chunks
from the last to the first and gets the state's gradient lam_t = g_t + a_{t+1} lam_{t+1} by a
scan over each chunk, carrying a_t lam_t of a chunk's first step into the chunk before. Specs
it does not cover (several strata, readouts of the state before its update) keep the fused
backward kernel, and so does RNNC_TRITON_KERNEL=fused.

Under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), at small sizes, with the
scan kernel forced (RNNC_TRITON_KERNEL=scan) and a chunk of 16 steps, so that T=33 carries
the gradient across two chunk boundaries and starts in a masked tail. `LAUNCHES` tells which
backward ran. The kernels compute in float32 (gradcheck needs float64, which they refuse), so
every gradient (inputs, params, initial state) is judged against the float64 sequential
backend on the same inputs, within 20x the float32 sequential backend's own error.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import rnnc  # noqa: E402
import rnnc.analysis  # noqa: E402
from rnnc.backends import get  # noqa: E402

from cases import (OLD_READ_SPEC, STRATA_SPEC, CASES, compare_to_sequential,  # noqa: E402
                   compile_offline, judge_float32, random_spec_against_sequential)

triton = pytest.importorskip("triton")
tb = get("triton")
F64, F32 = torch.float64, torch.float32
EX = Path(__file__).resolve().parent.parent / "examples"
ELEMENTWISE = ("mingru", "minlstm", "rglru", "hgrn", "s6", "s4d")
SCAN_CASES = [c for c in CASES if c.name in ELEMENTWISE]
ids = lambda c: c.name  # noqa: E731

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _scan_kernel(monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "scan")
    monkeypatch.setenv("RNNC_TRITON_CHUNK", "16")


def _counts():
    return tb.LAUNCHES["_scan_forward"], tb.LAUNCHES["_scan_backward"]


def _scan(src):
    rec = rnnc.load(str(src))
    return tb._generate(rec, rnnc.analysis.analyse(rec))[1]


# --- the examples ------------------------------------------------------------------------------
def test_the_elementwise_examples_have_the_reverse_scan():
    for name in ELEMENTWISE:
        scan = _scan(EX / f"{name}.rnn")
        assert scan.backward and scan.why_backward == "", (name, scan.why_backward)


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", SCAN_CASES, ids=ids)
def test_examples(case, T):
    """Gradients of every input, param and the initial state, of a random projection of all
    outputs and final states."""
    f0, b0 = _counts()
    compare_to_sequential(case, "triton", T, grad=True, chunk_size=16)
    assert _counts() == (f0 + 1, b0 + 1), "the scan forward and the reverse-scan backward did not both run"


# --- specs beyond the examples -------------------------------------------------------------------
HGRN, S6 = EX / "hgrn.rnn", EX / "s6.rnn"
INLINE = """
rnn lin(a[D], b[D], c[D]) -> (h[D], y[D]) {
    state h[D] = 0
    h = a * h + b
    y = h / c
}
"""
TWO = """
rnn two(x[D], g[D]) -> (y[D], z[D]) {
    state h[D] = 0
    state c[D] = 0
    h = exp(g) * h + x
    c = sigmoid(x) * c + g * x
    y = h * c
    z = tanh(c) + x
}
"""
SCALAR = """
rnn sc(x[D], g) -> y[D] {
    state s = 0
    s = sigmoid(g) * s + sum[d](x[d])
    y[d] = s * x[d] + s
}
"""


def _grads(src, dims, xs, params, h0, dtype=F32, backend="triton", final_only=False):
    """{d<name>}: gradients of a fixed random projection of the outputs and final states (or
    of the final states alone) with respect to the inputs, initial states and params."""
    m = rnnc.compile(str(src), backend=backend, **dims).to(dtype)
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(params[k])
    xs = [x.to(dtype).requires_grad_() for x in xs]
    h0 = {k: v.to(dtype).requires_grad_() for k, v in h0.items()}
    out, final = m(*xs, initial_state=h0, output_final_state=True)
    res = {} if final_only else {f"out{j}": o for j, o in enumerate(out if isinstance(out, tuple) else (out,))}
    res.update({f"final_{k}": v for k, v in final.items()})
    gen = torch.Generator().manual_seed(5)
    loss = sum((v.double() * torch.randn(v.shape, generator=gen, dtype=F64)).sum() for _, v in sorted(res.items()))
    names = [f"dx{j}" for j in range(len(xs))] + [f"dh0_{k}" for k in h0] + [f"d{k}" for k, _ in m.named_parameters()]
    leaves = xs + list(h0.values()) + list(m.parameters())
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(x)).detach() for n, g, x in zip(names, gs, leaves)}


def _check(name, src, dims, xs, params=None, h0=None, reverse_scan=True, final_only=False):
    """The float32 kernel gradients against the float64 sequential ones; which backward ran."""
    params, h0 = params or {}, h0 or {}
    f0, b0 = _counts()
    got = _grads(src, dims, xs, params, h0, final_only=final_only)
    assert _counts() == (f0 + 1, b0 + int(reverse_scan)), \
        "expected the reverse-scan backward" if reverse_scan else "expected the fused backward"
    ref = _grads(src, dims, xs, params, h0, F64, "sequential", final_only)
    s32 = _grads(src, dims, xs, params, h0, F32, "sequential", final_only)
    for k in ref:
        assert torch.isfinite(ref[k]).all(), f"{name} {k}: the reference itself is not finite"
    judge_float32(name, got, ref, s32)
    return got, ref


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def _s6_inputs(gen, B, T, D, N, log_decay=None):
    dt = torch.nn.functional.softplus(_randn(gen, B, T, D)) if log_decay is None else torch.ones(B, T, D, dtype=F64)
    xs = [_randn(gen, B, T, D), dt, _randn(gen, B, T, N), _randn(gen, B, T, N)]
    a_log = _randn(gen, D, N) if log_decay is None else torch.full((D, N), math.log(-log_decay), dtype=F64)
    return xs, {"A_log": a_log, "Dskip": _randn(gen, D)}, {"h": _randn(gen, B, D, N)}


@pytest.mark.parametrize("log_decay", [-30.0, -1e-6])
def test_extreme_decays_hgrn(log_decay):
    """Per-step log-decays of -30 (every product across a step underflows to 0: each step's
    gradient is its own) and -1e-6 (40 steps of almost undamped sums)."""
    gen = torch.Generator().manual_seed(21)
    B, T, D = 2, 40, 5
    xs = [_randn(gen, B, T, D), torch.full((B, T, D), log_decay, dtype=F64)]
    _check("hgrn", HGRN, dict(D=D), xs, h0={"h": _randn(gen, B, D)})


@pytest.mark.parametrize("log_decay", [-30.0, -1e-6])
def test_extreme_decays_s6(log_decay):
    """The same through s6's N-expanded decay exp(-exp(A_log) * dt), with its gradient to
    A_log accumulated over the chunks."""
    gen = torch.Generator().manual_seed(22)
    xs, params, h0 = _s6_inputs(gen, 2, 40, 3, 4, log_decay)
    _check("s6", S6, dict(D=3, N=4), xs, params, h0)


@pytest.mark.parametrize("src", [HGRN, S6], ids=["hgrn", "s6"])
def test_gradient_only_through_the_final_state(src):
    """A loss of the final state alone: the outputs' gradients are zero, and everything the
    inputs and the initial state receive crosses every chunk boundary in the carry."""
    gen = torch.Generator().manual_seed(23)
    if src == S6:
        xs, params, h0 = _s6_inputs(gen, 2, 33, 3, 4)
        dims = dict(D=3, N=4)
    else:
        xs = [_randn(gen, 2, 33, 5), torch.nn.functional.logsigmoid(_randn(gen, 2, 33, 5)) * 0.05]
        params, h0, dims = {}, {"h": _randn(gen, 2, 5)}, dict(D=5)
    got, ref = _check(src.stem, src, dims, xs, params, h0, final_only=True)
    assert ref["dh0_h"].abs().max() > 1e-3 and ref["dx0"][:, 0].abs().max() > 1e-3  # it does reach back


def test_parallel_blocks_s6():
    """s6 with D = 40 split over three program blocks (the last one masked): the gradients of
    B and C, which every block adds to, are slices summed after the kernel."""
    gen = torch.Generator().manual_seed(24)
    B, T, D, N = 2, 20, 40, 4
    m = rnnc.compile(str(S6), backend="triton", D=D, N=N)
    sgeo = m._runner.scan_geometry({"D": D, "N": N}, B, T)
    assert max(sgeo["ng"].values()) == 3
    xs, params, h0 = _s6_inputs(gen, B, T, D, N)
    _check("s6", S6, dict(D=D, N=N), xs, params, h0)


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the 0 / 0 above
def test_inline_first_order_scan():
    """h = a * h + b with the decay an input: da_t = lam_t * h_{t-1}, db_t = lam_t. The
    readout y = h / c comes out 0 / 0 at the steps past T that the last chunk recomputes: the
    kernel must keep them out of the scan."""
    gen = torch.Generator().manual_seed(25)
    B, T, D = 2, 33, 6
    xs = [torch.rand(B, T, D, generator=gen, dtype=F64) * 1.2 - 0.1, _randn(gen, B, T, D),
          1 + torch.rand(B, T, D, generator=gen, dtype=F64)]
    _check("inline", INLINE, dict(D=D), xs, h0={"h": _randn(gen, B, D)})


def test_two_independent_states_and_a_scalar_state():
    """Two states updated independently (one reverse scan each, outputs reading both) and a
    state without axes (its carry a scalar)."""
    gen = torch.Generator().manual_seed(26)
    assert _scan(TWO).backward and _scan(SCALAR).backward
    xs = [_randn(gen, 2, 33, 3), torch.nn.functional.logsigmoid(_randn(gen, 2, 33, 3))]
    _check("two", TWO, dict(D=3), xs, h0={"h": _randn(gen, 2, 3), "c": _randn(gen, 2, 3)})
    xs = [_randn(gen, 2, 33, 4), _randn(gen, 2, 33)]
    _check("scalar", SCALAR, dict(D=4), xs, h0={"s": _randn(gen, 2)})


# --- what falls back to the fused backward -----------------------------------------------------
@pytest.mark.parametrize("src, why", [(OLD_READ_SPEC, "before its update"), (STRATA_SPEC, "several strata")],
                         ids=["old_state_readout", "strata"])
def test_uncovered_specs_fall_back(src, why):
    """The scan forward runs, the reverse scan is not generated (with the reason), and the
    fused backward gives the right gradients."""
    scan = _scan(src)
    assert scan.source is not None and not scan.backward and why in scan.why_backward
    assert "def _scan_backward(" not in scan.source
    gen = torch.Generator().manual_seed(27)
    xs = [_randn(gen, 2, 33, 3), torch.nn.functional.logsigmoid(_randn(gen, 2, 33, 3))]
    h0 = {"h": _randn(gen, 2, 3)}
    if src == STRATA_SPEC:
        h0["c"] = _randn(gen, 2, 3, 4)
    _check("fallback", src, dict(D=3, N=4) if src == STRATA_SPEC else dict(D=3), xs, h0=h0, reverse_scan=False)


def test_fused_kernel_keeps_the_fused_backward(monkeypatch):
    """RNNC_TRITON_KERNEL=fused, and one step under auto, train through the fused backward;
    the gradients agree with the reverse scan's."""
    gen = torch.Generator().manual_seed(28)
    x, g = _randn(gen, 2, 20, 5).float(), torch.nn.functional.logsigmoid(_randn(gen, 2, 20, 5)).float()
    m = rnnc.compile(str(HGRN), backend="triton", D=5)

    def grads():
        xs = [x.clone().requires_grad_(), g.clone().requires_grad_()]
        (m(*xs) * torch.linspace(-1, 1, 5)).sum().backward()
        return [v.grad for v in xs]
    b0 = tb.LAUNCHES["_scan_backward"]
    by_scan = grads()
    assert tb.LAUNCHES["_scan_backward"] == b0 + 1
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "fused")
    f0 = tb.LAUNCHES["forward"]
    by_fused = grads()
    assert tb.LAUNCHES["_scan_backward"] == b0 + 1 and tb.LAUNCHES["forward"] == f0 + 1
    for a, b in zip(by_scan, by_fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")
    xs = [x[:, :1].clone().requires_grad_(), g[:, :1].clone().requires_grad_()]
    m(*xs).sum().backward()
    assert tb.LAUNCHES["_scan_backward"] == b0 + 1 and tb.LAUNCHES["forward"] == f0 + 2


# --- generated source ----------------------------------------------------------------------------
def test_emit_shows_the_reverse_scan(capsys, tmp_path):
    """`rnnc compile --emit` prints `_scan_backward` after `_scan_forward`; a spec that falls
    back has the scan forward only."""
    from rnnc.cli import main
    assert main(["compile", str(S6), "--backend", "triton", "--emit"]) == 0
    out = capsys.readouterr().out
    assert 0 < out.index("def _scan_forward(") < out.index("def _scan_backward(")
    assert "tl.associative_scan((ca0, cb0, cc0, cd0), 0, _affine_prev)" in out[out.index("def _scan_backward("):]
    spec = tmp_path / "old.rnn"
    spec.write_text(OLD_READ_SPEC)
    assert main(["compile", str(spec), "--backend", "triton", "--emit"]) == 0
    out = capsys.readouterr().out
    assert "def _scan_forward(" in out and "_scan_backward" not in out


def test_compiles_for_gpu_without_one():
    """The reverse-scan kernels of s6 and mingru compile to an sm_90 cubin, in a process
    without the interpreter."""
    code = ("import rnnc, rnnc.analysis\n"
            "from rnnc.backends import triton_backend as tb\n"
            "for name in ('s6', 'mingru'):\n"
            "    rec = rnnc.load(f'examples/{name}.rnn')\n"
            "    sizes = {d: 64 if d in ('D', 'H') else 16 for d in rec.dims}\n"
            "    out = tb.compile_for(rec, rnnc.analysis.analyse(rec), sizes)\n"
            "    assert out['_scan_backward'] > 0, out\n"
            "print('compiled')\n")
    compile_offline(code)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_diagonal_specs(seed, monkeypatch):
    """Randomly built diagonal specs (`rnnc.random_spec`): both scan kernels run, and the
    gradients of inputs and params match the float64 sequential backend across two chunk
    boundaries and a partial last chunk."""
    monkeypatch.delenv("RNNC_TRITON_KERNEL", raising=False)
    f0, b0 = _counts()
    random_spec_against_sequential("diagonal", seed, 21, out_tol=1e-4, grad_tol=1e-3, chunk_size=8)
    assert _counts() == (f0 + 1, b0 + 1)
