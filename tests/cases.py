"""The table of example specs that drives the test suite.

One entry per file in examples/.  Every entry says, independently of the .rnn text
(nothing here parses the spec), which sizes to compile with, the per-step shape and
the distribution of every input, the shape and distribution of every param and state,
and which functions check it:

- ``reference``: the name of a hand-written loop in references.py (every example has one);
- ``oracle``: the name of the strongest independent check, a function in oracles.py
  (torch.nn or fla-core) where one exists, else the same as ``reference``.

Distribution kinds (see ``sample``):
  "normal"   randn
  "unit"     randn, L2-normalized over the last axis (delta-rule keys)
  "gate"     sigmoid(randn), in (0, 1)
  "logdecay" logsigmoid(randn), negative
  "positive" softplus(randn)
  "weight"   randn / sqrt(last axis), the scale of a Linear layer's weight

Sizes are small and distinct per dim so that a transposed or mixed-up axis fails loudly
instead of broadcasting silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

Shape = tuple  # of dim names (str) or ints


@dataclass(frozen=True, eq=False)
class Case:
    name: str
    dims: dict
    # input name -> per-step shape (dim names / ints), in header order
    shapes: dict
    # input name -> distribution kind, in header order (same keys as shapes)
    inputs: dict
    # param name -> (shape, kind); params are randomized in tests so that
    # constant default inits (zeros, ones, 0.9) cannot hide a bug
    params: dict = field(default_factory=dict)
    # state name -> (shape, kind); used to draw random initial states
    states: dict = field(default_factory=dict)
    # output name -> per-step shape, in header order
    outputs: dict = field(default_factory=dict)
    oracle: str = ""
    reference: str = ""

    @property
    def path(self) -> Path:
        return EXAMPLES / f"{self.name}.rnn"

    def resolve(self, shape) -> tuple:
        return tuple(self.dims[d] if isinstance(d, str) else int(d) for d in shape)

    def input_shape(self, name) -> tuple:
        return self.resolve(self.shapes[name])

    def state_shape(self, name) -> tuple:
        return self.resolve(self.states[name][0])

    def param_shape(self, name) -> tuple:
        return self.resolve(self.params[name][0])

    def output_shape(self, name) -> tuple:
        return self.resolve(self.outputs[name])

    def __repr__(self):  # short pytest ids
        return f"Case({self.name})"


W, N = "weight", "normal"

CASES: list[Case] = [
    Case(
        name="elman", dims=dict(D=3, H=4),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={"W": (("H", "D"), W), "U": (("H", "H"), W), "b": (("H",), N)},
        states={"h": (("H",), N)}, outputs={"h": ("H",)},
        oracle="oracle_elman", reference="ref_elman",
    ),
    Case(
        name="lstm", dims=dict(D=3, H=4),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={
            **{f"W{g}": (("H", "D"), W) for g in "ifgo"},
            **{f"U{g}": (("H", "H"), W) for g in "ifgo"},
            **{f"b{g}": (("H",), N) for g in "ifgo"},
        },
        states={"h": (("H",), N), "c": (("H",), N)}, outputs={"h": ("H",)},
        oracle="oracle_lstm", reference="ref_lstm",
    ),
    Case(
        name="gru", dims=dict(D=3, H=4),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={
            **{f"W{g}": (("H", "D"), W) for g in "rzn"},
            **{f"U{g}": (("H", "H"), W) for g in "rzn"},
            **{f"b{g}": (("H",), N) for g in ("r", "z", "n", "hn")},
        },
        states={"h": (("H",), N)}, outputs={"h": ("H",)},
        oracle="oracle_gru", reference="ref_gru",
    ),
    Case(
        name="mingru", dims=dict(D=3, H=4),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={"Wz": (("H", "D"), W), "Wh": (("H", "D"), W)},
        states={"h": (("H",), N)}, outputs={"h": ("H",)},
        oracle="oracle_mingru", reference="ref_mingru",
    ),
    Case(
        name="minlstm", dims=dict(D=3, H=4),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={"Wf": (("H", "D"), W), "Wi": (("H", "D"), W), "Wh": (("H", "D"), W)},
        states={"h": (("H",), N)}, outputs={"h": ("H",)},
        oracle="oracle_minlstm", reference="ref_minlstm",
    ),
    Case(
        name="s6", dims=dict(D=3, N=4),
        shapes={"x": ("D",), "dt": ("D",), "B": ("N",), "C": ("N",)},
        inputs={"x": N, "dt": "positive", "B": N, "C": N},
        params={"A_log": (("D", "N"), N), "Dskip": (("D",), N)},
        states={"h": (("D", "N"), N)}, outputs={"y": ("D",)},
        oracle="oracle_s6", reference="ref_s6",
    ),
    Case(
        name="s4d", dims=dict(D=3, N=4),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={"log_dt": (("D",), N), "A_log": (("D", "N"), N), "Bp": (("D", "N"), N),
                "Cp": (("D", "N"), N), "Dskip": (("D",), N)},
        states={"h": (("D", "N"), N)}, outputs={"y": ("D",)},
        oracle="oracle_s4d", reference="ref_s4d",
    ),
    Case(
        name="rglru", dims=dict(D=3),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={"Wa": (("D", "D"), W), "Wx": (("D", "D"), W), "ba": (("D",), N),
                "bx": (("D",), N), "lam": (("D",), N)},
        states={"h": (("D",), N)}, outputs={"h": ("D",)},
        oracle="oracle_rglru", reference="ref_rglru",
    ),
    Case(
        name="hgrn", dims=dict(D=5),
        shapes={"x": ("D",), "g": ("D",)}, inputs={"x": N, "g": "logdecay"},
        states={"h": (("D",), N)}, outputs={"h": ("D",)},
        oracle="oracle_hgrn", reference="ref_hgrn",
    ),
    Case(
        name="retnet", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "k": ("H", "K"), "v": ("H", "V")},
        inputs={"q": N, "k": N, "v": N},
        params={"gamma": (("H",), "gate")},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_retnet", reference="ref_retnet",
    ),
    Case(
        name="gla", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "k": ("H", "K"), "v": ("H", "V"), "g": ("H", "K")},
        inputs={"q": N, "k": N, "v": N, "g": "logdecay"},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_gla", reference="ref_gla",
    ),
    Case(
        name="hgrn2", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "f": ("H", "K"), "v": ("H", "V")},
        inputs={"q": N, "f": N, "v": N},
        params={"lb": (("H",), "gate")},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_hgrn2", reference="ref_hgrn2",
    ),
    Case(
        name="mamba2", dims=dict(H=2, P=3, N=4),
        shapes={"x": ("H", "P"), "dt": ("H",), "B": ("H", "N"), "C": ("H", "N")},
        inputs={"x": N, "dt": "positive", "B": N, "C": N},
        params={"A_log": (("H",), N), "Dskip": (("H",), N)},
        states={"S": (("H", "N", "P"), N)}, outputs={"y": ("H", "P")},
        oracle="oracle_mamba2", reference="ref_mamba2",
    ),
    Case(
        name="deltanet", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "k": ("H", "K"), "v": ("H", "V"), "beta": ("H",)},
        inputs={"q": N, "k": "unit", "v": N, "beta": "gate"},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_deltanet", reference="ref_deltanet",
    ),
    Case(
        name="gated_deltanet", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "k": ("H", "K"), "v": ("H", "V"), "alpha": ("H",),
                "beta": ("H",)},
        inputs={"q": N, "k": "unit", "v": N, "alpha": "gate", "beta": "gate"},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_gated_deltanet", reference="ref_gated_deltanet",
    ),
    Case(
        name="mlstm", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "k": ("H", "K"), "v": ("H", "V"), "ig": ("H",),
                "fg": ("H",)},
        inputs={"q": N, "k": N, "v": N, "ig": N, "fg": N},
        states={"C": (("H", "K", "V"), N), "n": (("H", "K"), N), "m": (("H",), N)},
        outputs={"o": ("H", "V")},
        oracle="ref_mlstm", reference="ref_mlstm",
    ),
    Case(
        name="slstm", dims=dict(D=3, H=4),
        shapes={"x": ("D",)}, inputs={"x": N},
        params={
            **{f"W{g}": (("H", "D"), W) for g in "ifzo"},
            **{f"R{g}": (("H", "H"), W) for g in "ifzo"},
            **{f"b{g}": (("H",), N) for g in "ifzo"},
        },
        # n is a normalizer (a discounted sum of exp input gates): keep it positive
        states={"h": (("H",), N), "c": (("H",), N), "n": (("H",), "positive"),
                "m": (("H",), N)},
        outputs={"h": ("H",)},
        oracle="ref_slstm", reference="ref_slstm",
    ),
    Case(
        name="rwkv6", dims=dict(H=2, K=3, V=4),
        shapes={"r": ("H", "K"), "k": ("H", "K"), "v": ("H", "V"), "w": ("H", "K")},
        inputs={"r": N, "k": N, "v": N, "w": "logdecay"},
        params={"u": (("H", "K"), N)},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_rwkv6", reference="ref_rwkv6",
    ),
    Case(
        name="kda", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "k": ("H", "K"), "v": ("H", "V"), "g": ("H", "K"),
                "beta": ("H",)},
        inputs={"q": N, "k": "unit", "v": N, "g": "logdecay", "beta": "gate"},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_kda", reference="ref_kda",
    ),
    Case(
        name="gated_deltaproduct", dims=dict(H=2, K=3, V=4),
        shapes={"q": ("H", "K"), "k1": ("H", "K"), "v1": ("H", "V"), "b1": ("H",),
                "k2": ("H", "K"), "v2": ("H", "V"), "b2": ("H",), "a": ("H",)},
        inputs={"q": N, "k1": "unit", "v1": N, "b1": "gate", "k2": "unit", "v2": N, "b2": "gate",
                "a": "gate"},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_gated_deltaproduct", reference="ref_gated_deltaproduct",
    ),
    Case(
        name="rwkv7", dims=dict(H=2, K=3, V=4),
        shapes={"r": ("H", "K"), "w": ("H", "K"), "k": ("H", "K"), "v": ("H", "V"),
                "kk": ("H", "K"), "a": ("H", "K")},
        inputs={"r": N, "w": "logdecay", "k": N, "v": N, "kk": "unit", "a": "gate"},
        params={"rk": (("H", "K"), N)},
        states={"S": (("H", "K", "V"), N)}, outputs={"o": ("H", "V")},
        oracle="oracle_rwkv7", reference="ref_rwkv7",
    ),
]

CASE_BY_NAME = {c.name: c for c in CASES}

# Examples whose oracle is fla-core (need `import fla`, i.e. triton installed).  The
# last six have no published oracle; their adapters run the recurrence with an fla scan
# (gla for hgrn2 and the [D, N] SSMs, hgrn for the elementwise gated RNNs).
FLA_CASES = [c for c in CASES if c.name in
             ("gla", "retnet", "mamba2", "deltanet", "gated_deltanet", "hgrn", "rwkv6",
              "kda", "rwkv7", "gated_deltaproduct", "hgrn2", "s6", "s4d", "mingru", "minlstm", "rglru")]
# Examples whose oracle is torch.nn
TORCH_NN_CASES = [c for c in CASES if c.name in ("elman", "lstm", "gru")]


def sample(kind: str, shape, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Draw a tensor of the given distribution kind (always drawn in float64, then cast,
    so float32 and float64 draws with one seed hold the same values)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if kind == "normal":
        pass
    elif kind == "unit":
        x = x / x.norm(dim=-1, keepdim=True)
    elif kind == "gate":
        x = torch.sigmoid(x)
    elif kind == "logdecay":
        x = F.logsigmoid(x)
    elif kind == "positive":
        x = F.softplus(x)
    elif kind == "weight":
        x = x / (shape[-1] ** 0.5 if len(shape) else 1.0)
    else:
        raise ValueError(f"unknown distribution kind {kind!r}")
    return x.to(dtype)


def make_inputs(case: Case, B: int, T: int, dtype=torch.float64, seed: int = 0):
    """Inputs in header order, each [B, T, *per-step shape]."""
    gen = torch.Generator().manual_seed(seed)
    return [sample(kind, (B, T, *case.input_shape(name)), gen, dtype)
            for name, kind in case.inputs.items()]


def make_params(case: Case, dtype=torch.float64, seed: int = 1000) -> dict:
    """Random values for every param, {name: tensor of the param's shape}."""
    gen = torch.Generator().manual_seed(seed)
    return {name: sample(kind, case.param_shape(name), gen, dtype)
            for name, (_, kind) in case.params.items()}


def make_initial_state(case: Case, B: int, dtype=torch.float64, seed: int = 2000) -> dict:
    """A random initial state, {state name: [B, *shape]}."""
    gen = torch.Generator().manual_seed(seed)
    return {name: sample(kind, (B, *case.state_shape(name)), gen, dtype)
            for name, (_, kind) in case.states.items()}


def compile_case(case: Case, dtype=torch.float64, backend: str = "sequential",
                 params: dict | None = None, seed: int = 1000):
    """Compile the example with rnnc and load random params into it.

    Returns (module, params) where params is the dict that was loaded, so that the
    same values can be handed to a reference loop or oracle.
    """
    import rnnc  # imported lazily: the table is usable without the compiler

    m = rnnc.compile(str(case.path), backend=backend, **case.dims)
    m = m.to(dtype)
    if params is None:
        params = make_params(case, dtype, seed)
    load_params(m, params)
    return m, params


def load_params(m: torch.nn.Module, params: dict) -> None:
    named = dict(m.named_parameters())
    assert set(named) == set(params), (
        f"params of the compiled module {sorted(named)} != spec params {sorted(params)}")
    with torch.no_grad():
        for k, v in params.items():
            assert isinstance(named[k], torch.nn.Parameter)
            assert tuple(named[k].shape) == tuple(v.shape), (
                f"param {k}: module shape {tuple(named[k].shape)} != spec {tuple(v.shape)}")
            named[k].copy_(v)


def gradcheck_fn(m: torch.nn.Module, params: dict, xs: list, init: dict) -> tuple:
    """(f, args) for torch.autograd.gradcheck over everything a call depends on:
    f(*inputs, *params, *initial states) -> (outputs, *final states) of module m, with params
    and states in name order; `init` may be {} (the default initial state)."""
    from torch.func import functional_call
    pnames, snames = sorted(params), sorted(init)
    xs = [x.requires_grad_() for x in xs]
    ps = [params[k].clone().requires_grad_() for k in pnames]
    s0 = [init[k].clone().requires_grad_() for k in snames]
    nx, npar = len(xs), len(ps)

    def f(*args):
        x_, p_, s_ = args[:nx], args[nx:nx + npar], args[nx + npar:]
        kwargs = dict(initial_state=dict(zip(snames, s_)) if snames else None, output_final_state=True)
        out, final = functional_call(m, dict(zip(pnames, p_)), tuple(x_), kwargs)
        return (out, *[final[k] for k in sorted(final)])
    return f, (*xs, *ps, *s0)


def run_case(case: Case, backend: str, dtype, B: int, T: int, grad: bool = False,
             device="cpu", in_dtype=None, with_init: bool = True, seed: int = 0,
             chunk_size: int | None = None) -> dict:
    """Compile the example on `backend`, load the table's random params, run it on the table's
    inputs (in `in_dtype`, default `dtype`) with a random initial state, and return
    {"out<j>", "final_<state>": tensor}; with grad, instead the gradients {"dx<j>",
    "dh0_<state>", "d<param>"} of a fixed random projection of all of them."""
    import rnnc
    m = rnnc.compile(str(case.path), backend=backend, chunk_size=chunk_size, **case.dims)
    load_params(m, {k: v.to(dtype) for k, v in make_params(case, torch.float64, 1000 + seed).items()})
    m = m.to(device=device, dtype=dtype)
    xs = [x.to(device=device, dtype=in_dtype or dtype).requires_grad_(grad)
          for x in make_inputs(case, B, T, torch.float64, seed)]
    h0 = {k: v.to(device=device, dtype=dtype).requires_grad_(grad)
          for k, v in make_initial_state(case, B, torch.float64, 2000 + seed).items()} if with_init else {}
    out, final = m(*xs, initial_state=h0 or None, output_final_state=True)
    result = {f"out{j}": o for j, o in enumerate(out if isinstance(out, tuple) else (out,))}
    result.update({f"final_{k}": v for k, v in final.items()})
    if grad:
        gen = torch.Generator(device=device).manual_seed(7)
        loss = sum((v.double() * torch.randn(v.shape, generator=gen, device=device, dtype=torch.float64)).sum()
                   for _, v in sorted(result.items()))
        leaves = xs + list(h0.values()) + list(m.parameters())
        names = [f"dx{j}" for j in range(len(xs))] + [f"dh0_{k}" for k in h0] + \
            [f"d{n}" for n, _ in m.named_parameters()]
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        result = {n: (g if g is not None else torch.zeros_like(leaf)) for n, g, leaf in zip(names, gs, leaves)}
    return {k: v.detach() for k, v in result.items()}


def compile_offline(code: str) -> None:
    """Run `code` in a fresh Python without TRITON_INTERPRET, where Triton compiles kernels for
    a real GPU target (down to a cubin, on the CPU); `code` prints 'compiled' when it is done.
    Skips where this Triton install has no CUDA toolchain."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RNNC_TRITON_KERNEL")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["RNNC_CACHE_DIR"] = str(Path(os.environ.get("RNNC_CACHE_DIR", "/tmp")) / "rnnc-sm90-test")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr or "No such file" in r.stderr):
        pytest.skip("this Triton install has no CUDA toolchain: " + r.stderr.splitlines()[-1])
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-2000:]


def within_float32_error(ref, t32, got, names, factor=20.0):
    """Each of `got` (a Triton kernel's float32 results, None where absent) is finite and within
    factor times the float32 error of `t32` (the PyTorch form in float32) of `ref` (the same in
    float64), plus 1e-6: a kernel judged by how far float32 arithmetic itself strays."""
    for name, a, b, c in zip(names, ref, t32, got):
        assert (a is None) == (c is None), name
        if a is None:
            continue
        assert torch.isfinite(c).all(), name
        err32 = (b.to(torch.float64) - a).abs().max().item()
        err = (c.to(torch.float64) - a).abs().max().item()
        assert err <= factor * err32 + 1e-6, f"{name}: {err:.3g} vs float32 torch {err32:.3g}"


def kernel_against_torch(run, torch_fn, kernel_fn, xs, out_shapes, names, seed=0, edit=None,
                         q=True):
    """A chunk kernel against its PyTorch form: xs the float64 arguments (edit(xs) first; q
    dropped where q is False), run(fn, xs, go, gs, dtype=None) the results and gradients of
    <o, go> + <S_last, gs> for random go, gs of out_shapes (o's, S_last's). The kernel's
    float32 results must be within_float32_error of the PyTorch form's float64 ones.
    Returns the kernel's."""
    if edit:
        edit(xs)
    if not q:
        xs[0] = None
    gen = torch.Generator().manual_seed(seed + 1)
    go, gs = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in out_shapes)
    ref = run(torch_fn, xs, go, gs)
    t32 = run(torch_fn, xs, go, gs, torch.float32)
    got = run(kernel_fn, xs, go, gs, torch.float32)
    assert all(c is None or c.dtype == torch.float32 for c in got)
    within_float32_error(ref, t32, got, names)
    return got


def rel_err(x, ref) -> float:
    """max|x - ref| / max|ref|, computed in float64."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def compare_to_sequential(case: Case, backend: str, T: int, grad: bool, B: int = 2,
                          floor: float = 2e-6, chunk_size: int | None = None) -> None:
    """Run the example on `backend` in float32 (with a random initial state) and judge every
    output and final state, or with grad every gradient, against the float64 sequential
    backend: within 20x the float32 sequential backend's own error, plus `floor`. Entries
    whose reference is not finite are skipped; the others must come out finite."""
    judge_float32(case.name, run_case(case, backend, torch.float32, B, T, grad, chunk_size=chunk_size),
                  run_case(case, "sequential", torch.float64, B, T, grad),
                  run_case(case, "sequential", torch.float32, B, T, grad), floor)


def judge_float32(name: str, got: dict, ref: dict, s32: dict, floor: float = 2e-6) -> None:
    """{entry: tensor} computed in float32 against the float64 reference `ref`: each within 20x
    the float32 sequential backend's own error (`s32`), plus `floor`. Entries whose reference
    is not finite are skipped; the others must come out finite."""
    assert set(got) == set(ref)
    for k in ref:
        if not torch.isfinite(ref[k]).all():
            continue
        assert torch.isfinite(got[k]).all(), f"{name} {k}: not finite"
        base, err = rel_err(s32[k], ref[k]), rel_err(got[k], ref[k])
        assert err <= 20 * base + floor, f"{name} {k}: rel err {err:.3g} vs sequential fp32 {base:.3g}"


def random_spec_against_sequential(kind: str, seed: int, T: int, out_tol: float, grad_tol: float,
                                   backend: str = "triton", **compile_kw):
    """A random spec of one analysis class (`rnnc.random_spec`) on `backend` in float32
    against the float64 sequential backend: outputs within `out_tol`, and the gradients of
    inputs and params of a random projection within `grad_tol` (relative errors). Returns
    the reference module."""
    import rnnc
    from rnnc.interpret import concrete
    F64 = torch.float64
    src, dims = rnnc.random_spec(seed, kind)
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    tri = rnnc.compile(src, backend=backend, **compile_kw, **dims)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, T, *concrete(d.shape, dims), generator=gen, dtype=F64) for d in ref.recurrence.inputs]
    x32 = [x.float().requires_grad_() for x in xs]
    x64 = [x.clone().requires_grad_() for x in xs]
    y64, y32 = ref(*x64), tri(*x32)
    y64 = y64 if isinstance(y64, tuple) else (y64,)
    y32 = y32 if isinstance(y32, tuple) else (y32,)
    for a, b in zip(y32, y64):
        assert rel_err(a.detach(), b.detach()) < out_tol
    w = [torch.randn(y.shape, generator=gen, dtype=F64) for y in y64]
    g64 = torch.autograd.grad(sum((y * v).sum() for y, v in zip(y64, w)), x64 + list(ref.parameters()),
                              allow_unused=True)
    g32 = torch.autograd.grad(sum((y.double() * v).sum() for y, v in zip(y32, w)),
                              x32 + list(tri.parameters()), allow_unused=True)
    for a, b in zip(g32, g64):
        if b is None:
            assert a is None or not a.abs().any()
            continue
        assert rel_err(a, b) < grad_tol
    return ref


# Diagonal specs beyond the examples that the Triton scan kernel takes (test_triton_scan*.py):
# an output reading the state before its update, and a state reading another (two strata).
OLD_READ_SPEC = """
rnn old(x[D], g[D]) -> (y[D], z[D]) {
    state h[D] = 0
    y = h * x
    h = exp(g) * h + x
    z = 2 * h - y
}
"""
STRATA_SPEC = """
rnn strata(x[D], g[D]) -> y[D] {
    state h[D] = 0
    state c[D,N] = 0
    h = exp(g) * h + x
    c[d,n] = sigmoid(h[d]) * c[d,n] + x[d] * h[d]
    y[d] = sum[n](c[d,n]) + h[d]
}
"""


# A delta rule whose output reads the state before the step's update (read, then write).
DELTA_READ_FIRST = """rnn dold(q[H,K], k[H,K], v[H,V], beta[H], g[H,K]) -> o[H,V] {
    state S[H,K,V] = 0
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    S[h,i,j] = DECAY * (S[h,i,j] - beta[h] * k[h,i] * u[h,j]) + beta[h] * k[h,i] * v[h,j]
}"""
READ_FIRST_DECAYS = {"none": "1.0", "per_head": "sigmoid(g[h,0])", "per_channel": "exp(-softplus(g[h,i]))"}

# Matrix states whose input is a sum of terms: the chunk forms run once per term.
SEVERAL_INPUTS = {
    "two_outer_products": """rnn two(q[H,K], k[H,K], v[H,V], g[H,K], k2[H,K], v2[H,V]) -> o[H,V] {
    state S[H,K,V] = 0
    S[h,i,j] = exp(g[h,i]) * S[h,i,j] + k[h,i] * v[h,j] + k2[h,i] * v2[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""",
    "outer_product_plus_constant": """rnn plus(q[H,K], k[H,K], v[H,V], g[H,K]) -> o[H,V] {
    state S[H,K,V] = 0
    S[h,i,j] = exp(g[h,i]) * S[h,i,j] + k[h,i] * v[h,j] + 0.5
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""",
    "delta_rule_plus_a_write": """rnn d2(q[H,K], k[H,K], v[H,V], g[H,K], k2[H,K], v2[H,V]) -> o[H,V] {
    state S[H,K,V] = 0
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    S[h,i,j] = sigmoid(g[h,0]) * (S[h,i,j] - k[h,i] * u[h,j]) + k[h,i] * v[h,j] + k2[h,i] * v2[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""",
}


def several_inputs_args(name, T, gen, dtype=torch.float64) -> list:
    """Inputs for a SEVERAL_INPUTS spec at H=2, K=3, V=2: keys normalised, g a log-decay."""
    r = lambda *s: torch.randn(2, T, *s, generator=gen, dtype=dtype)  # noqa: E731
    xs = [r(2, 3), F.normalize(r(2, 3), dim=-1), r(2, 2), F.logsigmoid(r(2, 3))]
    if name != "outer_product_plus_constant":
        xs += [r(2, 3), r(2, 2)]
    return xs
