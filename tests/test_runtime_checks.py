"""Runtime input checks of compiled modules, on both backends (issue 9).

tests/test_errors.py already checks the calling convention of one sequential module (input
count, rank, per-step shape, B/T mismatch, int/bool/mixed dtypes, non-tensors, initial_state
keys and shapes, step). This file adds what was missing:

- the same checks on the scan backend, and on a module with matrix and vector states whose
  dims are fixed at compile time (so the expected shape is concrete) or solved from inputs;
- cases not covered there: extra axes, 0-dim tensors, complex and float16/bfloat16 mixes,
  numpy arrays, an inconsistent dim across two inputs, initial states with the wrong batch
  or transposed axes;
- what is *accepted*: non-contiguous inputs and initial states (transposed, strided, expanded
  with stride 0) give exactly the contiguous answer; float16/bfloat16 inputs compute in
  float32 and come back in their own dtype; initial states of another float or integer dtype
  are converted to the compute dtype; empty batches and sequences;
- device mixes (CPU and CUDA inputs, an initial state or the params on another device),
  skipped without CUDA.

Every error is an RnncError printed as `rnn NAME: error: MESSAGE` that names the input (or
state) and the expected shape.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rnnc
from rnnc import RnncError

BACKENDS = ["sequential", "scan"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (device checks cannot be tested on CPU)")

# Four inputs of two ranks, a matrix state and a vector state, one chunked plan: the scan
# backend runs it, so every check below runs on both backends.
SPEC = """rnn rt(q[H,K], k[H,K], v[H,V], g[H]) -> (o[H,V], n[H,K]) {
    state S[H,K,V] = 0, n[H,K] = 0
    S[h,i,j] = exp(g[h]) * S[h,i,j] + k[h,i] * v[h,j]
    n[h,i] = exp(g[h]) * n[h,i] + k[h,i]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}
"""
H, K, V = 2, 3, 4
B, T = 2, 5


@pytest.fixture(scope="module", params=BACKENDS)
def m(request):
    """The module with every dim given at compile time (expected shapes are concrete)."""
    mod = rnnc.compile(SPEC, backend=request.param, H=H, K=K, V=V)
    assert mod.backend == request.param
    return mod


@pytest.fixture(scope="module", params=BACKENDS)
def m_free(request):
    """The same spec with no dims given: H, K, V are solved from the inputs."""
    return rnnc.compile(SPEC, backend=request.param)


def xs(b=B, t=T, dtype=torch.float32, seed=0, h=H, k=K, v=V):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, k, generator=g, dtype=torch.float64)
    kk = torch.randn(b, t, h, k, generator=g, dtype=torch.float64)
    vv = torch.randn(b, t, h, v, generator=g, dtype=torch.float64)
    gg = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=g, dtype=torch.float64))
    return [x.to(dtype) for x in (q, kk, vv, gg)]


def state(b=B, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"S": torch.randn(b, H, K, V, generator=g, dtype=torch.float64).to(dtype),
            "n": torch.randn(b, H, K, generator=g, dtype=torch.float64).to(dtype)}


def replaced(i, value, base=None):
    out = list(base if base is not None else xs())
    out[i] = value
    return out


def rnnc_error(fn, *args, **kwargs) -> RnncError:
    try:
        fn(*args, **kwargs)
    except RnncError as err:
        text = str(err)
        assert text.startswith("rnn rt: error: "), text
        assert "\n" not in text and "Traceback" not in text, text
        return err
    except Exception as err:  # pragma: no cover - an rnnc bug
        pytest.fail(f"{type(err).__name__} instead of RnncError: {err}")
    pytest.fail("no error was raised")


def same(a, b):
    """Outputs (a tensor or a tuple) equal to float64 rounding."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# --- rank ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i,bad,message", [
    (0, torch.randn(B, T, H, K, 1), "input 'q' must have shape [B, T, H, K] (4 axes), got [2, 5, 2, 3, 1]"),
    (3, torch.randn(B, T, H, 1), "input 'g' must have shape [B, T, H] (3 axes), got [2, 5, 2, 1]"),
    (2, torch.tensor(1.0), "input 'v' must have shape [B, T, H, V] (4 axes), got []"),
    (1, torch.randn(T, H, K), "input 'k' must have shape [B, T, H, K] (4 axes), got [5, 2, 3]"),
], ids=["extra-axis", "extra-axis-on-vector-input", "zero-dim", "missing-batch"])
def test_wrong_rank(m, i, bad, message):
    err = rnnc_error(m, *replaced(i, bad))
    assert err.message == message


def test_step_given_a_sequence_names_the_step_shape(m):
    err = rnnc_error(m.step, *xs())
    assert err.message == "input 'q' must have shape [B, H, K] (3 axes), got [2, 5, 2, 3]"


# --- per-step shape ------------------------------------------------------------------------------------
@pytest.mark.parametrize("i,bad,message", [
    (0, torch.randn(B, T, H + 1, K), "input 'q' must have shape [B, T, H, K] = [B, T, 2, 3], got [2, 5, 3, 3]"),
    (2, torch.randn(B, T, H, V + 1), "input 'v' must have shape [B, T, H, V] = [B, T, 2, 4], got [2, 5, 2, 5]"),
    (1, torch.randn(B, T, K, H), "input 'k' must have shape [B, T, H, K] = [B, T, 2, 3], got [2, 5, 3, 2]"),
], ids=["wrong-H", "wrong-V", "transposed"])
def test_wrong_per_step_shape_against_compile_time_dims(m, i, bad, message):
    err = rnnc_error(m, *replaced(i, bad))
    assert err.message == message


def test_dim_inconsistent_across_inputs_names_the_later_input(m_free):
    """K is solved from q; k disagrees: the error names k and the shape q implies."""
    err = rnnc_error(m_free, *replaced(1, torch.randn(B, T, H, K + 2)))
    assert err.message == "input 'k' must have shape [B, T, H, K] = [B, T, 2, 3], got [2, 5, 2, 5]"


def test_dims_solved_from_inputs_work_for_new_sizes(m_free):
    y, final = m_free(*xs(h=3, k=2, v=5), output_final_state=True)
    assert y[0].shape == (B, T, 3, 5) and final["S"].shape == (B, 3, 2, 5)


# --- batch and time ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("i,bad,message", [
    (3, torch.randn(B + 1, T, H), "input 'g' has B/T = [3, 5], but earlier inputs have [2, 5]"),
    (1, torch.randn(B, T - 1, H, K), "input 'k' has B/T = [2, 4], but earlier inputs have [2, 5]"),
    (2, torch.randn(T, B, H, V), "input 'v' has B/T = [5, 2], but earlier inputs have [2, 5]"),
], ids=["batch", "time", "batch-and-time-swapped"])
def test_mismatched_batch_or_time(m, i, bad, message):
    err = rnnc_error(m, *replaced(i, bad))
    assert err.message == message


# --- dtype --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i,dtype,message", [
    (0, torch.int32, "input 'q' must be a floating-point tensor, got torch.int32"),
    (3, torch.uint8, "input 'g' must be a floating-point tensor, got torch.uint8"),
    (2, torch.complex64, "input 'v' must be a floating-point tensor, got torch.complex64"),
], ids=["int32", "uint8", "complex64"])
def test_non_float_dtype(m, i, dtype, message):
    base = xs()
    err = rnnc_error(m, *replaced(i, base[i].to(dtype), base))
    assert err.message == message


@pytest.mark.parametrize("first,other", [(torch.float32, torch.float16), (torch.float16, torch.bfloat16),
                                         (torch.bfloat16, torch.float64)])
def test_mixed_float_dtypes(m, first, other):
    base = xs(dtype=first)
    err = rnnc_error(m, *replaced(1, base[1].to(other), base))
    assert err.message == f"input 'k' is {other} but earlier inputs are {first}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(m, dtype):
    """Accepted: computation runs in float32, outputs come back in the inputs' dtype."""
    low = xs(dtype=dtype)
    y = m(*low)
    ref = m(*[x.float() for x in low])
    for a, b in zip(y, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.to(dtype).float(), rtol=0, atol=0)


def test_not_a_tensor(m):
    err = rnnc_error(m, *replaced(0, np.zeros((B, T, H, K), dtype=np.float32)))
    assert err.message == "input 'q' must be a torch.Tensor, got ndarray"


def test_input_count_on_this_backend(m):
    err = rnnc_error(m, *xs()[:3])
    assert err.message == "takes 4 inputs (q, k, v, g), got 3"


# --- inputs by name -----------------------------------------------------------------------------------------
def test_inputs_by_name_in_any_order(m):
    q, k, v, g = xs()
    S0 = state()
    want = m(q, k, v, g, initial_state=S0, output_final_state=True)
    got = m(q, g=g, v=v, k=k, initial_state=S0, output_final_state=True)
    same(got[0], want[0])
    for name in want[1]:
        same(got[1][name], want[1][name])
    same(m.step(v=v[:, 0], g=g[:, 0], q=q[:, 0], k=k[:, 0], state=S0)[0],
         m.step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state=S0)[0])


@pytest.mark.parametrize("pos,named,message", [
    (1, {"x": 0}, "has no input 'x' (inputs: q, k, v, g)"),
    (2, {"k": 1, "v": 2, "g": 3}, "input 'k' is given twice, by position and by name"),
    (1, {"v": 2}, "inputs 'k', 'g' not given (inputs: q, k, v, g)"),
    (0, {"q": 0, "k": 1, "v": 2}, "input 'g' not given (inputs: q, k, v, g)"),
], ids=["unknown", "twice", "missing-two", "missing-one"])
def test_inputs_by_name_errors(m, pos, named, message):
    x = xs()
    names = ["q", "k", "v", "g"]
    err = rnnc_error(m, *x[:pos], **{n: x[i] if n in names else x[0] for n, i in named.items()})
    assert err.message == message
    err = rnnc_error(m.step, *(t[:, 0] for t in x[:pos]),
                     **{n: x[i][:, 0] if n in names else x[0][:, 0] for n, i in named.items()})
    assert err.message == message


# --- initial state ------------------------------------------------------------------------------------------
def test_initial_state_wrong_key_lists_the_states(m):
    st = state()
    st["s"] = st.pop("S")  # a typo
    err = rnnc_error(m, *xs(), initial_state=st)
    assert err.message == "initial_state has no state 's' (states: S, n)"


@pytest.mark.parametrize("name,bad,got", [
    ("S", torch.zeros(B, H, V, K), "[2, 2, 4, 3]"),
    ("S", torch.zeros(B + 1, H, K, V), "[3, 2, 3, 4]"),
    ("n", torch.zeros(H, K), "[2, 3]"),
    ("n", torch.zeros(B, H, K, 1), "[2, 2, 3, 1]"),
], ids=["transposed", "wrong-batch", "missing-batch", "extra-axis"])
def test_initial_state_wrong_shape(m, name, bad, got):
    st = state()
    st[name] = bad
    err = rnnc_error(m, *xs(), initial_state=st)
    want = {"S": "[B, 2, 3, 4] = [2, 2, 3, 4]", "n": "[B, 2, 3] = [2, 2, 3]"}[name]
    assert err.message == f"initial state {name!r} must have shape {want}, got {got}"


def test_initial_state_not_a_tensor(m):
    err = rnnc_error(m, *xs(), initial_state={"S": np.zeros((B, H, K, V))})
    assert err.message == "initial state 'S' must have shape [B, 2, 3, 4] = [2, 2, 3, 4], got ndarray"


def test_step_state_wrong_shape(m):
    err = rnnc_error(m.step, *[x[:, 0] for x in xs()], state={"S": torch.zeros(H, K, V)})
    assert err.message == "initial state 'S' must have shape [B, 2, 3, 4] = [2, 2, 3, 4], got [2, 3, 4]"


def test_partial_initial_state_uses_the_declared_init_for_the_rest(m):
    st = state()
    full = m(*xs(), initial_state={"S": st["S"], "n": torch.zeros(B, H, K)})
    part = m(*xs(), initial_state={"S": st["S"]})
    same(full, part)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_initial_state_of_another_dtype_is_converted(m, dtype):
    """Accepted: an initial state is converted to the compute dtype (float32 here)."""
    st = {k: v.round() for k, v in state().items()}  # exactly representable in every dtype
    ref = m(*xs(), initial_state=st)
    got = m(*xs(), initial_state={k: v.to(dtype) for k, v in st.items()})
    same(ref, got)


# --- non-contiguous tensors: accepted, same answer -----------------------------------------------------------
def _layouts(x: torch.Tensor) -> dict:
    """The same values as `x` in non-contiguous layouts."""
    out = {}
    # transposed storage: the last two axes swapped in memory
    t = x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 2 else x
    out["transposed"] = t
    # time-major storage ([T, B, ...] in memory)
    out["time-major"] = x.transpose(0, 1).contiguous().transpose(0, 1)
    # every other step of a twice-as-long tensor
    big = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
    big[:, ::2] = x
    out["strided"] = big[:, ::2]
    return out


@pytest.mark.parametrize("layout", ["transposed", "time-major", "strided"])
def test_non_contiguous_inputs_give_the_contiguous_answer(m, layout):
    base = xs(dtype=torch.float64)
    m64 = m.double()
    ref = m64(*base, output_final_state=True)
    other = [_layouts(x)[layout] for x in base]
    assert not any(x.is_contiguous() for x in other if x.dim() > 2 or layout != "transposed")
    got = m64(*other, output_final_state=True)
    same(ref[0], got[0])
    for k in ref[1]:
        torch.testing.assert_close(ref[1][k], got[1][k], rtol=1e-12, atol=1e-12)


def test_expanded_inputs_with_stride_zero(m):
    """An input broadcast over the batch with expand() (stride 0) is read, not written."""
    base = xs(dtype=torch.float64)
    m64 = m.double()
    expanded = [x[:1].expand(B, *x.shape[1:]) for x in base]
    assert all(x.stride(0) == 0 for x in expanded)
    ref = m64(*[x.contiguous() for x in expanded])
    got = m64(*expanded)
    same(ref, got)
    assert all(x.stride(0) == 0 for x in expanded)  # not materialised in place


def test_non_contiguous_initial_state_and_step_inputs(m):
    m64 = m.double()
    st = state(dtype=torch.float64)
    st_nc = {"S": st["S"].transpose(-1, -2).contiguous().transpose(-1, -2),
             "n": st["n"].transpose(0, 1).contiguous().transpose(0, 1)}
    assert not st_nc["S"].is_contiguous() and not st_nc["n"].is_contiguous()
    base = xs(dtype=torch.float64)
    same(m64(*base, initial_state=st), m64(*base, initial_state=st_nc))
    steps = [x[:, 1] for x in base]  # a slice in the middle of T: not contiguous
    assert not steps[0].is_contiguous()
    ya, sa = m64.step(*[s.contiguous() for s in steps], state=st)
    yb, sb = m64.step(*steps, state=st_nc)
    same(ya, yb)


def test_inputs_are_not_modified(m):
    base = xs()
    copies = [x.clone() for x in base]
    st = state()
    st_copy = {k: v.clone() for k, v in st.items()}
    m(*base, initial_state=st, output_final_state=True)
    assert all(torch.equal(a, b) for a, b in zip(base, copies))
    assert all(torch.equal(st[k], st_copy[k]) for k in st)


# --- empty batch, empty sequence ------------------------------------------------------------------------------
# B=0 on the scan backend once raised ZeroDivisionError in the chunk kernels (fixed).
@pytest.mark.parametrize("backend,b,t", [
    ("sequential", B, 0), ("sequential", 0, T), ("sequential", 0, 0),
    ("scan", B, 0), ("scan", 0, T), ("scan", 0, 0),
])
def test_empty_batch_or_sequence(backend, b, t):
    """B=0 or T=0: outputs [B, T, *shape], and the final state is the initial state."""
    mod = rnnc.compile(SPEC, backend=backend, H=H, K=K, V=V)
    st = state(b=b)
    (o, n), final = mod(*xs(b=b, t=t), initial_state=st, output_final_state=True)
    assert o.shape == (b, t, H, V) and n.shape == (b, t, H, K)
    if t == 0:
        for k in st:
            torch.testing.assert_close(final[k], st[k])


# --- devices (CUDA only) ----------------------------------------------------------------------------------------
@needs_cuda
def test_cpu_and_cuda_inputs_mixed(m):
    base = xs()
    err = rnnc_error(m.cuda(), *replaced(2, base[2], [x.cuda() for x in base]))
    assert err.message.startswith("input 'v' is on cpu but earlier inputs are on cuda")


@needs_cuda
def test_params_on_another_device_than_the_inputs():
    mod = rnnc.compile("rnn rt(x[D]) -> y[D] {\n    param w[D]\n    y = x * w\n}\n", D=3)
    err = rnnc_error(mod, torch.randn(2, 4, 3, device="cuda"))
    assert "param 'w' is on cpu but the inputs are on cuda" in err.message
    assert ".to(device)" in err.message


@needs_cuda
def test_initial_state_on_another_device(m):
    mc = m.cuda()
    err = rnnc_error(mc, *[x.cuda() for x in xs()], initial_state=state())
    assert err.message.startswith("initial state 'S' is on cpu but the inputs are on cuda")


@needs_cuda
def test_cuda_answer_matches_cpu(m):
    base = xs(dtype=torch.float64)
    m64 = m.double()
    ref = m64(*base)
    got = m64.cuda()(*[x.cuda() for x in base])
    m64.cpu()
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-10, atol=1e-10)
