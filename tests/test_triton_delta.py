"""Triton chunked delta-rule kernels (backends/triton_delta.py) under Triton's CPU interpreter.

Forward and backward are judged against `scan_kernels.chunk_delta_rule` in float64, relative
to that PyTorch implementation's own float32 error: err <= 20 * err_torch32 + 1e-6 for every
output and every gradient. DeltaNet-like inputs keep the recurrence stable: L2-normalised
keys, beta in (0, 1), w = beta * k. fla-core's naive recurrent Gated DeltaNet is an
independent oracle for the semantics, and the kernels are compiled to an sm_90 cubin in a
process without the interpreter.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc.backends import scan_kernels as sk

triton = pytest.importorskip("triton")
from rnnc.backends import triton_delta as td  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import compile_offline, kernel_against_torch  # noqa: E402

F64, F32 = torch.float64, torch.float32
B, H, K, V = 2, 2, 32, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def make(L, gated, shared, seed=0, B=B, H=H, K=K, V=V):
    """float64 (q, r, w, p, v, log_alpha, S0), DeltaNet-like; p is w when shared."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    k = torch.nn.functional.normalize(rn(B, L, H, K), dim=-1)
    beta = torch.rand(B, L, H, 1, generator=g, dtype=F64)
    w = beta * k
    # a second write vector of the size of beta * k, so that w != p stays as stable
    p = w if shared else 0.5 * torch.nn.functional.normalize(rn(B, L, H, K), dim=-1)
    la = torch.nn.functional.logsigmoid(rn(B, L, H) + 2.0) if gated else None
    return rn(B, L, H, K), k, w, p, rn(B, L, H, V), la, rn(B, H, K, V)


def run(fn, xs, go, gs, shared, dtype=None):
    """(o, S_last, grads of q, r, w, p, v, log_alpha, S0) of the loss <o, go> + <S_last, gs>,
    the inputs cast to dtype; with shared, w is passed as p too (its grad holds both)."""
    xs = [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]
    q, r, w, p, v, la, S0 = xs
    o, S = fn(q, r, w, w if shared else p, v, la, S0)
    loss = (S.to(F64) * gs).sum()
    if o is not None:
        loss = loss + (o.to(F64) * go).sum()
    loss.backward()
    return [o, S] + [None if x is None or (shared and x is p) else x.grad for x in xs]


NAMES = ["o", "S_last", "dq", "dr", "dw", "dp", "dv", "dlog_alpha", "dS0"]


def compare(L, gated, shared, chunk=16, block_v=None, q=True, seed=0, edit=None):
    return kernel_against_torch(
        lambda fn, xs, go, gs, dtype=None: run(fn, xs, go, gs, shared, dtype),
        lambda *a: sk.chunk_delta_rule(*a, chunk=chunk),
        lambda *a: td.chunk_delta_rule(*a, chunk=chunk, block_v=block_v),
        list(make(L, gated, shared, seed)), [(B, L, H, V), (B, H, K, V)], NAMES, seed, edit, q)


@pytest.mark.parametrize("L", [1, 17, 64])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shared", [True, False], ids=["w_is_p", "w_ne_p"])
def test_matches_reference(L, gated, shared):
    """Outputs, final state and all gradients (S_last's too), chunk 16; w != p runs with two
    V blocks (the K-side gradients are summed over them)."""
    compare(L, gated, shared, block_v=None if shared else 16)


def test_without_q():
    """q = None: no output, S_last and its gradients only."""
    got = compare(17, True, True, q=False)
    assert got[0] is None and got[2] is None


def test_larger_chunks():
    """chunk 64 and 32 (the chunk length is cut to a power of two >= 16 covering L)."""
    assert td.geometry(70, K, V, 64)["C"] == 64 and td.geometry(20, K, V, 64)["C"] == 32
    compare(70, True, True, chunk=64)
    compare(20, True, False, chunk=64, block_v=16)


def test_zero_decays():
    """log alpha = -inf (alpha = 0: the state is wiped) stays finite and correct; its
    gradient there is 0, as in the reference."""
    def wipe(xs):
        la = xs[5].clone()
        la[0, 5, 0] = la[0, 6, 0] = la[1, 12, 1] = -float("inf")
        xs[5] = la
    got = compare(17, True, True, edit=wipe)
    assert got[7][0, 5, 0] == 0 and got[7][1, 12, 1] == 0


def test_fla_naive_oracle():
    """fla-core's naive recurrent Gated DeltaNet (float32, [B, T, H, *] layout, q scaled by
    `scale`) gives the same outputs and final state: r = k, w = p = beta k, log_alpha = g."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    q, k, w, _, v, g, S0 = make(33, True, True, seed=3)
    beta = (w / k).mean(-1)   # make() built w = beta * k
    o_fla, S_fla = naive.naive_recurrent_gated_delta_rule(
        q.float(), k.float(), v.float(), beta.float(), g.float(), scale=1.0,
        initial_state=S0.float(), output_final_state=True)
    ref = sk.chunk_delta_rule(q, k, w, w, v, g, S0, chunk=16)
    w32 = w.float()
    got = td.chunk_delta_rule(q.float(), k.float(), w32, w32, v.float(), g.float(), S0.float(), chunk=16)
    for a, b, c, name in zip(ref, (o_fla, S_fla), got, ("o", "S_last")):
        # two float32 computations of one recurrence agree up to their own errors
        bound = (b.to(F64) - a).abs().max().item() + (c.to(F64) - a).abs().max().item()
        assert (c - b).abs().max().item() <= 20 * bound + 1e-6, name
        assert (b.to(F64) - a).abs().max().item() <= 1e-4 * a.abs().max().item(), name


def test_bf16_inputs():
    """bf16 inputs (S0 float32) give a bf16 output, float32 S_last, and gradients in each
    input's dtype; judged against the float64 reference on the same (rounded) inputs, with
    the final rounding of the bf16 results allowed for."""
    xs = [None if x is None else x.to(torch.bfloat16).to(F64) for x in make(17, True, True, seed=5)]
    xs[6] = make(17, True, True, seed=5)[6]
    q, r, w, _, v, la, S0 = xs
    gen = torch.Generator().manual_seed(6)
    # o's gradient reaches the kernel in o's dtype: bf16 values keep it exact
    go = torch.randn(B, 17, H, V, generator=gen, dtype=F64).to(torch.bfloat16).to(F64)
    gs = torch.randn(B, H, K, V, generator=gen, dtype=F64)
    torch_fn = lambda *a: sk.chunk_delta_rule(*a, chunk=16)  # noqa: E731
    ref = run(torch_fn, xs, go, gs, True)
    t32 = run(torch_fn, xs, go, gs, True, F32)
    lo = [x.detach().to(torch.bfloat16).requires_grad_() for x in (q, r, w, v, la)]
    S0f = S0.detach().float().requires_grad_()
    o, S = td.chunk_delta_rule(lo[0], lo[1], lo[2], lo[2], lo[3], lo[4], S0f, chunk=16)
    assert o.dtype == torch.bfloat16 and S.dtype == F32
    ((o.to(F64) * go).sum() + (S.to(F64) * gs).sum()).backward()
    got = [o, S, lo[0].grad, lo[1].grad, lo[2].grad, lo[3].grad, lo[4].grad, S0f.grad]
    names = ["o", "S_last", "dq", "dr", "dw", "dv", "dlog_alpha", "dS0"]
    ref = [x for i, x in enumerate(ref) if i != 5]
    t32 = [x for i, x in enumerate(t32) if i != 5]
    for name, a, b, c in zip(names, ref, t32, got):
        assert c.dtype == (F32 if name in ("S_last", "dS0") else torch.bfloat16), name
        err32 = (b.to(F64) - a).abs().max().item()
        rounding = 2.0 ** -8 * a.abs() if c.dtype == torch.bfloat16 else 0.0
        excess = ((c.to(F64) - a).abs() - rounding).max().item()
        assert excess <= 20 * err32 + 1e-6, f"{name}: {excess:.3g} vs float32 torch {err32:.3g}"


def test_errors_are_clear():
    q, r, w, p, v, la, S0 = make(5, True, True)
    with pytest.raises(rnnc.RnncError, match="scan backend"):
        td.chunk_delta_rule(q, r, w, w, v, la, S0, chunk=16)
    f = [x.float() for x in (q, r, w, v, la, S0)]
    with pytest.raises(rnnc.RnncError, match="S0 must be"):
        td.chunk_delta_rule(f[0], f[1], f[2], f[2], f[3], f[4], f[5][:, :1], chunk=16)
    with pytest.raises(rnnc.RnncError, match="log_alpha must be"):
        td.chunk_delta_rule(f[0], f[1], f[2], f[2], f[3], f[4][..., None], f[5], chunk=16)
    with pytest.raises(rnnc.RnncError, match="chunk must be"):
        td.chunk_delta_rule(f[0], f[1], f[2], f[2], f[3], f[4], f[5], chunk=24)
    with pytest.raises(rnnc.RnncError, match="L >= 1"):
        td.chunk_delta_rule(f[0][:, :0], f[1][:, :0], f[2][:, :0], f[2][:, :0], f[3][:, :0],
                            f[4][:, :0], f[5], chunk=16)
    with pytest.raises(rnnc.RnncError, match="dtype"):
        td.chunk_delta_rule(f[0], f[1], f[2], f[2], f[3].int(), f[4], f[5], chunk=16)


def test_compiles_for_gpu_without_one():
    """Forward and backward compile to sm_90 cubins (no GPU needed), with and without q and
    log_alpha, shared and separate w, p, float32 and bfloat16 inputs."""
    code = ("from rnnc.backends import triton_delta as td\n"
            "a = td.compile_for(K=32, V=32, chunk=16, variants=[(True, True, True), (False, False, False)])\n"
            "b = td.compile_for(K=32, V=32, chunk=16, dtype='bf16', variants=[(True, True, False)])\n"
            "assert len(a) == 4 and len(b) == 2 and min(a.values()) > 0 and min(b.values()) > 0, (a, b)\n"
            "print('compiled')\n")
    compile_offline(code)
