"""The Triton backend on bfloat16/float16 inputs: read natively, computed in float32.

The kernels load bf16/fp16 inputs as they are (each load converts to float32), compute in
float32 and store the outputs in the inputs' dtype; states, the history, params and their
gradients stay float32, and the inputs' gradients come back in the inputs' dtype.

How results are judged. For one set of values (inputs drawn in float64 and rounded to the low
precision dtype; params and the initial state rounded to float32; output cotangents rounded
to the low precision dtype) five runs see exactly the same numbers:

- `lowp`: backend="triton" on the bf16/fp16 inputs (the path under test);
- `tri32`: backend="triton" on the same values as float32 inputs;
- `seqlp`: backend="sequential" on the bf16/fp16 inputs (it casts them to float32, computes
  and rounds its outputs to the inputs' dtype);
- `seq32`, `seq64`: backend="sequential" in float32 and float64 on the same values.

Reading a bf16 value into float32 is exact, so `lowp` runs the very float32 arithmetic of
`tri32`: its final states and float32 gradients must equal `tri32`'s bit for bit, its input
gradients must be `tri32`'s rounded once, and each output entry must lie within one ulp of
`tri32`'s (Triton's interpreter rounds float32 -> bf16 toward zero where a GPU rounds to
nearest even, so one ulp rather than half). Against the sequential backend, which computes
differently in float32, the allowance is the float32 tests' own (20x the float32 sequential
backend's error against float64, relative to max |ref|, plus 2e-6) plus the rounding of the
two results to the low precision dtype: 1.5 eps for outputs (one ulp here, half an ulp
there), one eps for input gradients (both rounded to nearest).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import rnnc  # noqa: E402
import rnnc.analysis  # noqa: E402
from rnnc.backends import get  # noqa: E402

from cases import (CASE_BY_NAME, CASES, compile_offline, load_params, make_initial_state,  # noqa: E402
                   make_inputs, make_params, rel_err)

triton = pytest.importorskip("triton")
tb = get("triton")
F32, F64 = torch.float32, torch.float64
LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}
EX = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")

# (example, RNNC_TRITON_KERNEL): an elementwise example whose inputs the kernel reads as they
# are (hgrn), with the scan kernel that "auto" picks for T > 1 and with the fused kernel; one
# whose input is read both by the kernel and by hoisted contractions (rglru); and a nonlinear
# one whose inputs only the hoisted contractions read (lstm).
CONFIGS = [("hgrn", "auto"), ("hgrn", "fused"), ("rglru", "auto"), ("lstm", "auto")]


def _launched(name, kernel, T):
    """The forward kernel a call runs (Runner.kernel's rule)."""
    scan = name in ("hgrn", "rglru")
    return "_scan_forward" if kernel == "auto" and scan and T > 1 else "forward"


def _values(case, B, T, lowp, seed=0):
    """Inputs (low precision), params and initial state (float32 values), and the cotangents
    of outputs (low precision values) and final states (float32)."""
    xs = [x.to(lowp) for x in make_inputs(case, B, T, F64, seed)]
    params = {k: v.float() for k, v in make_params(case, F64, 1000 + seed).items()}
    h0 = {k: v.float() for k, v in make_initial_state(case, B, F64, 2000 + seed).items()}
    gen = torch.Generator().manual_seed(7)
    wy = [torch.randn(B, T, *case.output_shape(o), generator=gen, dtype=F64).to(lowp) for o in case.outputs]
    wh = {k: torch.randn(v.shape, generator=gen, dtype=F64).float() for k, v in sorted(h0.items())}
    return xs, params, h0, wy, wh


def _run(case, backend, xs, params, h0, wy, wh, dtype, in_dtype, **compile_kw):
    """Forward and backward on one backend: {entry: tensor} (outputs `out<j>`, final states
    `final_<s>`, gradients `dx<j>`, `dh0_<s>`, `d<param>`), each in the dtype the module gave."""
    m = rnnc.compile(str(case.path), backend=backend, **compile_kw, **case.dims)
    load_params(m, {k: v.to(dtype) for k, v in params.items()})
    m = m.to(dtype)
    x = [v.to(in_dtype).requires_grad_() for v in xs]
    s0 = {k: v.to(dtype).requires_grad_() for k, v in h0.items()}
    out, final = m(*x, initial_state=s0, output_final_state=True)
    out = out if isinstance(out, tuple) else (out,)
    res = {f"out{j}": o for j, o in enumerate(out)}
    res.update({f"final_{k}": v for k, v in final.items()})
    heads = list(out) + [final[k] for k in sorted(wh)]
    cot = [w.to(o.dtype) for w, o in zip(wy, out)] + [wh[k].to(final[k].dtype) for k in sorted(wh)]
    leaves = x + list(s0.values()) + list(m.parameters())
    names = [f"dx{j}" for j in range(len(x))] + [f"dh0_{k}" for k in s0] + [f"d{n}" for n, _ in m.named_parameters()]
    gs = torch.autograd.grad(heads, leaves, cot, allow_unused=True)
    res.update({n: (g if g is not None else torch.zeros_like(v)) for n, g, v in zip(names, gs, leaves)})
    return {k: v.detach() for k, v in res.items()}


def _ulp_close(got, ref32, lowp):
    """Every entry of `got` (low precision) within one ulp of the float32 `ref32`: the error of
    one rounding, toward zero or to nearest."""
    fi = torch.finfo(lowp)
    bound = fi.eps * ref32.abs() + fi.eps * fi.tiny  # a relative ulp; subnormal spacing near 0
    return bool(((got.float() - ref32).abs() <= bound).all())


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("lp", ["bf16", "fp16"])
@pytest.mark.parametrize("name,kernel", CONFIGS, ids=[f"{n}-{k}" for n, k in CONFIGS])
def test_matches_float32_and_sequential(name, kernel, lp, T, monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_KERNEL", kernel)
    case, lowp = CASE_BY_NAME[name], LOWP[lp]
    vals = _values(case, 2, T, lowp)
    before = tb.LAUNCHES[_launched(name, kernel, T)]
    got = _run(case, "triton", *vals, F32, lowp)
    assert tb.LAUNCHES[_launched(name, kernel, T)] == before + 1, "another forward kernel ran"
    tri32 = _run(case, "triton", *vals, F32, F32)
    seqlp = _run(case, "sequential", *vals, F32, lowp)
    seq32 = _run(case, "sequential", *vals, F32, F32)
    seq64 = _run(case, "sequential", *vals, F64, F64)
    eps = torch.finfo(lowp).eps
    for k, v in got.items():
        low = k.startswith(("out", "dx"))
        assert v.dtype == (lowp if low else F32), f"{k} is {v.dtype}"
        assert torch.isfinite(v).all(), k
        base = rel_err(seq32[k], seq64[k])
        if k.startswith("out"):
            assert _ulp_close(v, tri32[k], lowp), f"{k}: more than one rounding from the float32 run"
            err = rel_err(v, seqlp[k])
            assert err <= 1.5 * eps + 20 * base + 2e-6, f"{k}: rel err {err:.3g} vs sequential (fp32 err {base:.3g})"
        elif k.startswith("dx"):
            assert torch.equal(v, tri32[k].to(lowp)), f"{k}: not the float32 run's gradient rounded once"
            err = rel_err(v, seqlp[k])
            assert err <= eps + 20 * base + 2e-6, f"{k}: rel err {err:.3g} vs sequential (fp32 err {base:.3g})"
        else:  # float32: the same arithmetic as the float32 run, and as close to float64
            assert torch.equal(v, tri32[k]), f"{k}: differs from the float32 run on the same values"
            err = rel_err(v, seq64[k])
            assert err <= 20 * base + 2e-6, f"{k}: rel err {err:.3g} vs float64 (fp32 sequential {base:.3g})"


@pytest.mark.parametrize("name", ["hgrn", "lstm"])
def test_step(name, monkeypatch):
    """.step() (the fused kernel at T=1) on bf16 inputs: bf16 outputs, float32 states, each step
    within one ulp of the float32 run of the whole sequence by the fused kernel."""
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "fused")
    case = CASE_BY_NAME[name]
    xs, params, h0, _, _ = _values(case, 2, 4, torch.bfloat16)
    m = rnnc.compile(str(case.path), backend="triton", **case.dims)
    load_params(m, params)
    with torch.no_grad():
        full32 = m(*[x.float() for x in xs], initial_state=h0)
        state = h0
        for t in range(4):
            y, state = m.step(*[x[:, t] for x in xs], state=state)
            assert y.dtype == torch.bfloat16 and all(v.dtype == F32 for v in state.values())
            assert _ulp_close(y, full32[:, t], torch.bfloat16), f"step {t}"


# --- what the kernels are handed ------------------------------------------------------------
class _Spy:
    """Stands in for a runner's kernel module; records the named tensor arguments of every
    launch of the forward and backward kernels, then launches them."""

    def __init__(self, real, log):
        self._real, self._log = real, log

    def __getattr__(self, name):
        fn = getattr(self._real, name)
        if name not in ("forward", "backward", "_scan_forward", "_scan_backward"):
            return fn
        log = self._log

        class _Grid:
            def __getitem__(self, grid):
                launch = fn[grid]

                def call(*args, **kw):
                    log.append((name, {a: v for a, v in zip(fn.arg_names, args) if isinstance(v, torch.Tensor)}))
                    return launch(*args, **kw)
                return call
        return _Grid()


@pytest.mark.parametrize("name,kernel,T", [("hgrn", "auto", 5), ("hgrn", "fused", 5), ("rglru", "auto", 5),
                                           ("rglru", "fused", 1)])
def test_kernels_read_the_inputs_as_they_are(name, kernel, T, monkeypatch):
    """The tensors the kernels get for raw input streams are the caller's bf16 tensors (the
    same memory: no float32 copy); hoisted contractions, states and the history are float32;
    outputs and their gradients bf16; the input gradients accumulate in float32."""
    monkeypatch.setenv("RNNC_TRITON_KERNEL", kernel)
    case = CASE_BY_NAME[name]
    xs, params, h0, wy, _ = _values(case, 2, T, torch.bfloat16)
    m = rnnc.compile(str(case.path), backend="triton", **case.dims)
    load_params(m, params)
    runner, log = m._runner, []
    monkeypatch.setattr(runner, "kernels", _Spy(runner.kernels, log))
    x = [v.requires_grad_() for v in xs]
    y = m(*x, initial_state=h0)
    torch.autograd.grad(y, x, wy[0])
    fwd_kernel = _launched(name, kernel, T)
    reverse = fwd_kernel == "_scan_forward" and getattr(runner.scan, "backward", None)
    assert [k for k, _ in log] == [fwd_kernel, "_scan_backward" if reverse else "backward"]
    fwd, bwd = log[0][1], log[1][1]
    rec, lay = m.recurrence, runner.gen.layout
    raw = 0
    for j, n in enumerate(lay.streams):
        node = rec.node(n)
        if type(node).__name__ == "Input":
            raw += 1
            given = x[[d.name for d in rec.inputs].index(node.name)]
            for seen in (fwd[f"X{j}"], bwd[f"X{j}"]):
                assert seen.dtype == torch.bfloat16 and seen.data_ptr() == given.data_ptr(), f"X{j}"
        else:
            assert fwd[f"X{j}"].dtype == F32 and bwd[f"X{j}"].dtype == F32
        assert bwd[f"DX{j}"].dtype == F32
    assert raw >= 1
    assert fwd["Y0"].dtype == torch.bfloat16 and bwd["DY0"].dtype == torch.bfloat16
    for key in ("H0_0", "HT0", "HS0"):
        assert fwd[key].dtype == F32, key
    assert bwd["HS0"].dtype == F32 and bwd["DH0_0"].dtype == F32


class _Recorder:
    """A runner wrapper that records the dtypes of the inputs it is handed."""

    def __init__(self, inner, native):
        self.inner, self.seen = inner, []
        if native:
            self.native_inputs = True

    def __call__(self, sizes, params, inputs, state0):
        self.seen.append({v.dtype for v in inputs.values()})
        return self.inner(sizes, params, {k: v.to(F32) if v.dtype in LOWP.values() else v
                                          for k, v in inputs.items()}, state0)


@pytest.mark.parametrize("native,in_dtype,param_dtype,want", [
    (False, torch.bfloat16, F32, F32),             # a runner that does not declare it: cast
    (True, torch.bfloat16, F32, torch.bfloat16),   # declared, bf16 inputs, float32 compute
    (True, torch.float16, F32, torch.float16),
    (True, F32, F32, F32),
    (True, torch.bfloat16, F64, F64),              # float64 compute: cast, whatever it declares
])
def test_module_casts_unless_the_runner_reads_natively(native, in_dtype, param_dtype, want):
    case = CASE_BY_NAME["rglru"]  # params set the compute dtype
    m = rnnc.compile(str(case.path), backend="sequential", **case.dims).to(param_dtype)
    rec = _Recorder(m._runner, native)
    m._runner = rec
    y = m(*[x.to(in_dtype) for x in make_inputs(case, 2, 3, F64)])
    assert rec.seen == [{want}] and y.dtype == in_dtype


def test_float64_is_refused():
    """float64 compute still gets the clear error, and so do low precision params or states
    handed to a runner directly."""
    case = CASE_BY_NAME["hgrn"]
    m = rnnc.compile(str(case.path), backend="triton", **case.dims)
    xs = make_inputs(case, 2, 3, F64)
    with pytest.raises(rnnc.RnncError, match="computes in float32.*float64"):
        m(*xs)                                              # float64 inputs
    m64 = rnnc.compile(str(EX / "lstm.rnn"), backend="triton", D=3, H=4).double()
    with pytest.raises(rnnc.RnncError, match="computes in float32.*float64"):
        m64(torch.randn(2, 3, 3, dtype=torch.bfloat16))     # bf16 inputs, float64 params
    runner = m._runner
    inputs = {"x": xs[0].to(torch.bfloat16), "g": xs[1].to(torch.bfloat16)}
    with pytest.raises(rnnc.RnncError, match="params and states must be float32"):
        runner({"D": 5}, {}, inputs, {"h": torch.zeros(2, 5, dtype=torch.bfloat16)})
    assert runner({"D": 5}, {}, inputs, {"h": torch.zeros(2, 5)})[0]["h"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "mamba2"])
@pytest.mark.parametrize("T", [1, 21])
def test_chunked_plan(name, T, monkeypatch):
    """Chunked plans: one step runs the fused kernel on the bf16 inputs; a sequence runs the
    block solver on them as they are. The chunk kernels' leaves that are raw inputs are
    the caller's bf16 memory (no float32 copy); what PyTorch computes from an input (mamba2's
    `Dskip * x`) reads a float32 copy. Outputs and input gradients bf16, states float32,
    within the allowance above of the sequential backend on the same bf16 inputs."""
    from rnnc.backends import block_solver, triton_chunk, triton_delta
    monkeypatch.delenv("RNNC_TRITON_KERNEL", raising=False)
    case = CASE_BY_NAME[name]
    lowp = torch.bfloat16
    xs, params, h0, wy, _ = _values(case, 2 if T == 1 else 1, T, lowp)
    seen, leaves = [], []
    solve = block_solver.BlockSolver.__call__
    monkeypatch.setattr(block_solver.BlockSolver, "__call__", lambda self, s, p, i, h: seen.append(
        {v.dtype for v in i.values()}) or solve(self, s, p, i, h))
    for mod, fn in ((triton_chunk, "chunk_linear_attention"), (triton_delta, "chunk_delta_rule")):
        def spy(*args, _inner=getattr(mod, fn), **kw):
            leaves.extend(x for a in args if hasattr(a, "leaves") for x in a.leaves)
            return _inner(*args, **kw)
        monkeypatch.setattr(mod, fn, spy)   # before compile: the runner's table takes the spies
    # outputs' cotangent only; chunk 16, as the interpreter's time grows with the chunk
    got = _run(case, "triton", xs, params, h0, wy, {}, F32, lowp, chunk_size=16)
    monkeypatch.undo()
    assert seen == ([] if T == 1 else [{lowp}])
    if T > 1:
        ptrs = {v.data_ptr() for v in xs}
        raw = [t for t in leaves if t.dtype == lowp]
        assert raw and all(t.data_ptr() in ptrs for t in raw), "a raw input was copied"
        assert {t.dtype for t in leaves} <= {lowp, F32}
    dx = [got[f"dx{j}"] for j in range(len(xs))]
    assert all(g.dtype == lowp and torch.isfinite(g).all() for g in dx)
    seqlp = _run(case, "sequential", xs, params, h0, wy, {}, F32, lowp)
    seq32 = _run(case, "sequential", xs, params, h0, wy, {}, F32, F32)
    seq64 = _run(case, "sequential", xs, params, h0, wy, {}, F64, F64)
    assert got["out0"].dtype == lowp and all(v.dtype == F32 for k, v in got.items() if k.startswith("final_"))
    eps = torch.finfo(lowp).eps
    base = rel_err(seq32["out0"], seq64["out0"])
    assert rel_err(got["out0"], seqlp["out0"]) <= 1.5 * eps + 20 * base + 2e-6
    for k in (k for k in got if k.startswith("final_")):
        assert rel_err(got[k], seq64[k]) <= 20 * rel_err(seq32[k], seq64[k]) + 2e-6, k
    for j, g in enumerate(dx):
        # each use of an input in a kernel rounds its gradient contribution once
        g64 = seq64[f"dx{j}"]
        assert rel_err(g, g64) <= 4 * eps + 20 * rel_err(seqlp[f"dx{j}"].float(), g64) + 2e-6, f"dx{j}"


# --- generated source -------------------------------------------------------------------------
def _loads(text):
    """(call text, what follows it) for every tl.load(...) call in `text`."""
    out = []
    for m in re.finditer(r"tl\.load\(", text):
        depth, i = 0, m.end() - 1
        while True:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        out.append((text[m.start():i], text[i:i + len(".to(tl.float32)")]))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_load_converts_to_float32(case):
    """Every load in the generated fused and scan kernels converts to float32 at once, so a
    bf16/fp16 stream or output gradient never enters the arithmetic in its own dtype."""
    rec = rnnc.load(str(case.path))
    text = tb._generate(rec, rnnc.analysis.analyse(rec))[2]
    loads = _loads(text)
    assert loads
    for call, after in loads:
        assert after == ".to(tl.float32)", call


def test_bf16_signature():
    """compile_for's bf16 signature types exactly the raw input streams, the outputs and the
    outputs' gradients as bf16."""
    rec = rnnc.load(str(EX / "rglru.rnn"))
    r = tb.Runner(rec, rnnc.analysis.analyse(rec))
    sig, _ = tb.signature(rec, r.kernels.backward.arg_names, r.gen.bwd, {}, "bf16")
    ptrs = {k: v for k, v in sig.items() if v.startswith("*")}
    raw = {f"X{j}" for j, n in enumerate(r.gen.layout.streams) if type(rec.node(n)).__name__ == "Input"}
    assert raw == {"X0"}
    assert {k for k, v in ptrs.items() if v == "*bf16"} == raw | {"DY0"}
    assert all(v == "*fp32" for k, v in ptrs.items() if k not in raw | {"DY0"})
    fsig, _ = tb.signature(rec, r.kernels.forward.arg_names, r.gen.fwd, {}, "bf16")
    assert {k for k, v in fsig.items() if v == "*bf16"} == raw | {"Y0"}
    assert tb.signature(rec, r.kernels.forward.arg_names, r.gen.fwd, {}, "fp32")[0] == \
        {k: ("*fp32" if v.startswith("*") else v) for k, v in fsig.items()}


def test_compiles_bf16_for_gpu_without_one():
    """The fused forward and backward and the scan kernel compile to an sm_90 cubin with
    bf16 inputs and outputs (and fp16 for one), in a process without the interpreter."""
    code = ("import rnnc, rnnc.analysis\n"
            "from rnnc.backends import triton_backend as tb\n"
            "for name, dtype in [('hgrn', 'bf16'), ('rglru', 'bf16'), ('lstm', 'bf16'), ('hgrn', 'fp16')]:\n"
            "    rec = rnnc.load(f'examples/{name}.rnn')\n"
            "    sizes = {d: 64 for d in rec.dims}\n"
            "    out = tb.compile_for(rec, rnnc.analysis.analyse(rec), sizes, dtype=dtype)\n"
            "    assert out['forward'] > 0 and out['backward'] > 0, out\n"
            "    assert name == 'lstm' or out['_scan_forward'] > 0, out\n"
            "print('compiled')\n")
    compile_offline(code)


class _FakeCuda:
    """Stands in for a CUDA tensor where only the device and dtype are read."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.device = type("D", (), {"type": "cuda"})()

    def float(self):
        return _FakeCuda(F32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F32])
def test_auto_hands_low_precision_to_triton_and_casts_for_the_cpu(dtype):
    """backend="auto" (rnnc.plan.DeviceDispatch): CUDA inputs go to the Triton runner in their
    own dtype; the CPU choice, and the fallback when Triton refuses, get float32."""
    from rnnc.errors import RnncError
    from rnnc.plan import DeviceDispatch
    seen = []

    def cpu(sizes, params, inputs, state0):
        seen.append(("cpu", inputs["x"].dtype))
        return "cpu"

    def gpu_ok(sizes, params, inputs, state0):
        seen.append(("gpu", inputs["x"].dtype))
        return "gpu"

    def gpu_refuses(sizes, params, inputs, state0):
        seen.append(("gpu", inputs["x"].dtype))
        raise RnncError("too wide")

    assert DeviceDispatch.native_inputs is True
    assert DeviceDispatch(cpu, lambda: gpu_ok)({}, {}, {"x": _FakeCuda(dtype)}, {}) == "gpu"
    assert DeviceDispatch(cpu, lambda: gpu_refuses)({}, {}, {"x": _FakeCuda(dtype)}, {}) == "cpu"
    assert DeviceDispatch(cpu, lambda: gpu_ok)({}, {}, {"x": torch.zeros(1, dtype=dtype)}, {}) == "cpu"
    assert seen == [("gpu", dtype), ("gpu", dtype), ("cpu", F32), ("cpu", F32)]


def test_auto_on_cpu_matches_scan_in_bf16():
    case = CASE_BY_NAME["hgrn"]
    auto = rnnc.compile(str(case.path), backend="auto", **case.dims)
    scan = rnnc.compile(str(case.path), backend="scan", **case.dims)
    scan.load_state_dict(auto.state_dict())
    xs = [x.to(torch.bfloat16) for x in make_inputs(case, 2, 7, F64)]
    with torch.no_grad():
        ya, yb = auto(*xs), scan(*xs)
    assert ya.dtype == torch.bfloat16 and torch.equal(ya, yb)
