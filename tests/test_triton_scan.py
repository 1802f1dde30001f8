"""The Triton backend's time-chunked scan kernel (`_scan_forward`) for diagonal recurrences.

Runs under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1) at small sizes, with
the kernel forced (RNNC_TRITON_KERNEL=scan) and a chunk of 16 steps, so that T=33 crosses two
chunk boundaries and ends in a masked tail. Every example with an `elementwise_scan` plan,
forward and backward (the reverse-scan backward, or the fused one where the spec falls back to
it, replays the history the scan writes; test_triton_scan_bwd.py checks which ran), with a
random initial state and the final state compared; extreme decays; readouts of the state
before its update; states whose coefficients read other states; kernel selection; the
generated source; and an sm_90 compile without a GPU.

Float32 results are judged against the float64 sequential backend, relative to the float32
sequential backend's own error.
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
                   compile_offline, judge_float32)

triton = pytest.importorskip("triton")
tb = get("triton")
F64, F32 = torch.float64, torch.float32
ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"
ELEMENTWISE = ("mingru", "minlstm", "rglru", "hgrn", "s6", "s4d")
SCAN_CASES = [c for c in CASES if c.name in ELEMENTWISE]
ids = lambda c: c.name  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _scan_kernel(monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "scan")
    monkeypatch.setenv("RNNC_TRITON_CHUNK", "16")


def _launches():
    return tb.LAUNCHES["_scan_forward"]


def test_the_elementwise_examples_have_scan_kernels():
    """Exactly the examples whose plan is elementwise get the scan kernel."""
    have = set()
    for case in CASES:
        rec = rnnc.load(str(case.path))
        if tb._generate(rec, rnnc.analysis.analyse(rec))[1].source is not None:
            have.add(case.name)
    assert have == set(ELEMENTWISE)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", SCAN_CASES, ids=ids)
def test_examples(case, T, grad):
    before = _launches()
    compare_to_sequential(case, "triton", T, grad)
    assert _launches() == before + 1, "the scan kernel did not run"


# --- specs beyond the examples ---------------------------------------------------------------
HGRN = EX / "hgrn.rnn"
S6 = EX / "s6.rnn"


def _run(src, dims, xs, params, h0, grad=True, dtype=F32, backend="triton"):
    """{out<j>, final_<state>} or, with gradients, {d<name>} of a fixed projection."""
    m = rnnc.compile(str(src) if isinstance(src, Path) else src, backend=backend, **dims).to(dtype)
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(params[k])
    xs = [x.to(dtype).requires_grad_(grad) for x in xs]
    h0 = {k: v.to(dtype).requires_grad_(grad) for k, v in h0.items()}
    out, final = m(*xs, initial_state=h0, output_final_state=True)
    res = {f"out{j}": o for j, o in enumerate(out if isinstance(out, tuple) else (out,))}
    res.update({f"final_{k}": v for k, v in final.items()})
    if grad:
        gen = torch.Generator().manual_seed(5)
        loss = sum((v.double() * torch.randn(v.shape, generator=gen, dtype=F64)).sum()
                   for _, v in sorted(res.items()))
        names = [f"dx{j}" for j in range(len(xs))] + [f"dh0_{k}" for k in h0] + [f"d{k}" for k, _ in m.named_parameters()]
        leaves = xs + list(h0.values()) + list(m.parameters())
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        res.update({n: (g if g is not None else torch.zeros_like(x)) for n, g, x in zip(names, gs, leaves)})
    return {k: v.detach() for k, v in res.items()}


def _check(name, src, dims, xs, params, h0, grad=True):
    before = _launches()
    got = _run(src, dims, xs, params, h0, grad)
    assert _launches() == before + 1, "the scan kernel did not run"
    ref = _run(src, dims, xs, params, h0, grad, F64, "sequential")
    s32 = _run(src, dims, xs, params, h0, grad, F32, "sequential")
    for k in ref:
        assert torch.isfinite(ref[k]).all(), f"{name} {k}: the reference itself is not finite"
    judge_float32(name, got, ref, s32)


@pytest.mark.parametrize("log_decay", [-30.0, -1e-6])
def test_extreme_decays_hgrn(log_decay):
    """Per-step log-decays of -30 (the chunk's products underflow to 0) and -1e-6 (the state
    sums 40 steps almost undamped): finite and accurate, forward and gradients."""
    gen = torch.Generator().manual_seed(11)
    B, T, D = 2, 40, 5
    x = torch.randn(B, T, D, generator=gen, dtype=F64)
    g = torch.full((B, T, D), log_decay, dtype=F64)
    h0 = {"h": torch.randn(B, D, generator=gen, dtype=F64)}
    _check("hgrn", HGRN, dict(D=D), [x, g], {}, h0)


@pytest.mark.parametrize("log_decay", [-30.0, -1e-6])
def test_extreme_decays_s6(log_decay):
    """The same through s6's N-expanded decay exp(-exp(A_log) * dt), which never leaves
    registers."""
    gen = torch.Generator().manual_seed(12)
    B, T, D, N = 2, 40, 3, 4
    xs = [torch.randn(B, T, D, generator=gen, dtype=F64), torch.ones(B, T, D, dtype=F64),
          torch.randn(B, T, N, generator=gen, dtype=F64), torch.randn(B, T, N, generator=gen, dtype=F64)]
    params = {"A_log": torch.full((D, N), math.log(-log_decay), dtype=F64),
              "Dskip": torch.randn(D, generator=gen, dtype=F64)}
    h0 = {"h": torch.randn(B, D, N, generator=gen, dtype=F64)}
    _check("s6", S6, dict(D=D, N=N), xs, params, h0)


def _plain_inputs(B, T, D, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=F64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=F64))
    return gen, [x, g]


def test_readout_of_the_state_before_its_update():
    """`y = h * x` before `h = ...` reads the old state: the kernel composes the chunk's maps
    up to the step before as well (`_affine_prev`)."""
    gen, xs = _plain_inputs(2, 33, 5, 13)
    text = tb.emit(rnnc.load(OLD_READ_SPEC), rnnc.analysis.analyse(rnnc.load(OLD_READ_SPEC)))
    assert "_affine_prev)" in text
    _check("old", OLD_READ_SPEC, dict(D=5), xs, {}, {"h": torch.randn(2, 5, generator=gen, dtype=F64)})


def test_state_whose_coefficients_read_another_state():
    """c's decay and input read h's new value: h is scanned first, then c, in one chunk."""
    rec = rnnc.load(STRATA_SPEC)
    facts = rnnc.analysis.analyse(rec)
    assert facts.plan == "elementwise_scan" and facts.state("c").depends_on == ("h",)
    gen, xs = _plain_inputs(2, 33, 3, 14)
    h0 = {"h": torch.randn(2, 3, generator=gen, dtype=F64), "c": torch.randn(2, 3, 4, generator=gen, dtype=F64)}
    _check("two", STRATA_SPEC, dict(D=3, N=4), xs, {}, h0)


SCALAR = """
rnn sc(x[D], g) -> y[D] {
    state s = 0
    s = sigmoid(g) * s + sum[d](x[d])
    y[d] = s * x[d] + s
}
"""


def test_scalar_state():
    """A state without axes: its chunk tiles are [BLK_T] and its carry a scalar."""
    gen = torch.Generator().manual_seed(15)
    xs = [torch.randn(2, 33, 4, generator=gen, dtype=F64), torch.randn(2, 33, generator=gen, dtype=F64)]
    _check("scalar", SCALAR, dict(D=4), xs, {}, {"s": torch.randn(2, generator=gen, dtype=F64)})


# --- selection -------------------------------------------------------------------------------
def test_selection(monkeypatch):
    """auto: the scan kernel for T > 1, the fused one for a single step (.step()); forcing
    either works; forcing the scan where there is none, or a bad name, is a clear error."""
    m = rnnc.compile(str(HGRN), backend="triton", D=5)
    x, g = torch.randn(2, 6, 5), -torch.rand(2, 6, 5)
    counts = lambda: (tb.LAUNCHES["_scan_forward"], tb.LAUNCHES["forward"])  # noqa: E731
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")
    a0 = counts()
    y_scan = m(x, g)
    m.step(x[:, 0], g[:, 0])
    assert counts() == (a0[0] + 1, a0[1] + 1)
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "fused")
    y_fused = m(x, g)
    assert counts() == (a0[0] + 1, a0[1] + 2)
    torch.testing.assert_close(y_scan, y_fused, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "bogus")
    with pytest.raises(rnnc.RnncError, match="RNNC_TRITON_KERNEL"):
        m(x, g)
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "scan")
    gla = rnnc.compile(str(EX / "gla.rnn"), backend="triton", H=1, K=4, V=4)
    with pytest.raises(rnnc.RnncError, match="no scan kernel"):
        gla(*[torch.randn(1, 3, 1, 4) for _ in range(4)])


def test_chunk_size(monkeypatch):
    """chunk_size= sets the chunk (capped by the sequence), else RNNC_TRITON_CHUNK; either
    must be a power of two."""
    m = rnnc.compile(str(HGRN), backend="triton", chunk_size=8, D=5)
    assert m._runner.scan_geometry({"D": 5}, 2, 100)["chunk"] == 8
    assert m._runner.scan_geometry({"D": 5}, 2, 3)["chunk"] == 4
    with pytest.raises(rnnc.RnncError, match="power of two"):
        rnnc.compile(str(HGRN), backend="triton", chunk_size=12, D=5)
    m = rnnc.compile(str(HGRN), backend="triton", D=5)
    assert m._runner.scan_geometry({"D": 5}, 2, 100)["chunk"] == 16
    for bad in ("12", "x", "0"):
        monkeypatch.setenv("RNNC_TRITON_CHUNK", bad)
        with pytest.raises(rnnc.RnncError, match="power of two"):
            m(torch.randn(1, 3, 5), -torch.rand(1, 3, 5))


# --- generated source ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_source(name):
    """The emitted module is the fused kernels' text unchanged, then the scan kernel;
    deterministic; the chunk's coefficients are never stored."""
    from rnnc.backends import triton_codegen as cg
    rec = rnnc.load(str(EX / f"{name}.rnn"))
    facts = rnnc.analysis.analyse(rec)
    text = tb.emit(rec, facts)
    assert text == tb.emit(rec, facts)
    fused = cg.generate(rec, facts).source
    assert text.startswith(fused) and "def _scan_forward(" in text[len(fused):]
    scan = text[len(fused):]
    stores = [line for line in scan.splitlines() if "tl.store(" in line]
    assert stores and not any("ca0" in s or "cb0" in s for s in stores)


def test_compiles_for_gpu_without_one():
    """The scan kernels of the elementwise examples compile to an sm_90 cubin, in a process
    without the interpreter."""
    code = ("import rnnc, rnnc.analysis\n"
            "from rnnc.backends import triton_backend as tb\n"
            f"for name in {ELEMENTWISE!r}:\n"
            "    rec = rnnc.load(f'examples/{name}.rnn')\n"
            "    sizes = {d: 64 if d in ('D', 'H') else 16 for d in rec.dims}\n"
            "    out = tb.compile_for(rec, rnnc.analysis.analyse(rec), sizes)\n"
            "    assert out['_scan_forward'] > 0, out\n"
            "print('compiled')\n")
    compile_offline(code)
