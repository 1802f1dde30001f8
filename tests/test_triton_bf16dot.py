"""bf16 dot operands in the chunk kernels (RNNC_TRITON_DOT=bf16, or precision="bf16").

In that mode every tl.dot of the chunk kernels rounds both operands to bfloat16 and
accumulates in float32, as fla's kernels and torch's bf16 matmul do. On CPU the kernels run
the "bf16x" form (the same rounding, by integer arithmetic, before a float32 product), which
Triton's interpreter computes correctly; the GPU form is compiled to an sm_90 cubin here.

How results are judged. The yardstick is what rounding the inputs to bfloat16 alone does:
`e_in`, the float64 reference on bf16-rounded inputs against the float64 reference on the
inputs themselves (relative to the reference's max |value|), per output and gradient. The
bf16-dot kernels, fed the unrounded float32 inputs, must come within 4 e_in of the float64
reference (each of their products rounds operands once, as rounding the inputs does, and some
rounded operands are values computed from several inputs: the decayed keys, the state). And
they must be further from it than e_in / 16: a mode that rounded nothing (float32 products,
within 1e-5 here) fails that bound.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc.backends import scan_kernels as sk

triton = pytest.importorskip("triton")
from rnnc.backends import triton_chunk as tc  # noqa: E402
from rnnc.backends import triton_delta as td  # noqa: E402
from rnnc.backends import triton_gates as tg  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import compile_offline, rel_err  # noqa: E402

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(fn, xs, cotangents):
    """fn's outputs and the gradients of <outputs, cotangents> w.r.t. every input, float64."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    outs = fn(*xs)
    sum((o.double() * c).sum() for o, c in zip(outs, cotangents)).backward()
    return [o.detach().double() for o in outs] + [x.grad.double() for x in xs]


def _judge(names, ref, rounded_in, got):
    """Each result within 4 e_in of the reference, and further from it than e_in / 16."""
    bad = []
    for name, a, b, c in zip(names, ref, rounded_in, got):
        assert torch.isfinite(c).all(), name
        e_in, e = rel_err(b, a), rel_err(c, a)
        if not e_in / 16 < e <= 4 * e_in:
            bad.append(f"{name}: {e:.2e} against inputs rounded to bf16 {e_in:.2e}")
    assert not bad, bad


def _bf16_round(xs):
    return [x.to(BF16).to(F64) for x in xs]


@pytest.mark.parametrize("per_channel,split,block_k", [
    (True, False, None), (False, False, None), (True, True, None), (False, True, 16)],
    ids=["channel-walk", "scalar-walk", "channel-levels", "scalar-levels-keysplit"])
def test_linear_attention_bf16_dots(per_channel, split, block_k):
    """gla-like (a decay per key channel) and retnet-like (one per head) at L = 37, chunk 16
    (three chunks, the last one partial), forward and backward, in the walk and the two-level
    kernels, all K in one program or two key blocks of 16; precision="bf16"."""
    gen = torch.Generator().manual_seed(3)
    B, L, H, K, V = 1, 37, 2, 32, 32
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    g = torch.nn.functional.logsigmoid(2 * r(B, L, H, K if per_channel else 1) + 2)
    xs = [r(B, L, H, K), r(B, L, H, K) / K ** 0.5, r(B, L, H, V), g, r(B, H, K, V)]
    cot = [r(B, L, H, V), r(B, H, K, V)]
    ref_fn = lambda *a: sk.chunk_linear_attention(*a, chunk=16)  # noqa: E731
    ref = _grads(ref_fn, xs, cot)
    rounded = _grads(ref_fn, _bf16_round(xs), cot)
    got = _grads(lambda *a: tc.chunk_linear_attention(*a, chunk=16, precision="bf16", split=split,
                                                      block_k=block_k),
                 [x.float() for x in xs], cot)
    ieee = _grads(lambda *a: tc.chunk_linear_attention(*a, chunk=16, precision="ieee"),
                  [x.float() for x in xs], cot)
    names = ["o", "S_last", "dq", "dk", "dv", "dlog_decay", "dS0"]
    _judge(names, ref, rounded, got)
    assert max(rel_err(a, b) for a, b in zip(ieee, ref)) < 1e-5   # what "rounded nothing" gives


@pytest.mark.parametrize("split", [False, True], ids=["walk", "split"])
def test_delta_rule_bf16_dots(monkeypatch, split):
    """Gated DeltaNet-like inputs (w = p = beta k), L = 37 at chunk 16, both forwards;
    RNNC_TRITON_DOT=bf16 reaches the delta kernels."""
    monkeypatch.setenv(tg.DOT_ENV, "bf16")
    gen = torch.Generator().manual_seed(4)
    B, L, H, K, V = 1, 37, 2, 32, 32
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    k = torch.nn.functional.normalize(r(B, L, H, K), dim=-1)
    w = torch.rand(B, L, H, 1, generator=gen, dtype=F64) * k
    la = torch.nn.functional.logsigmoid(r(B, L, H) + 2.0)
    xs = [r(B, L, H, K), k, w, r(B, L, H, V), la, r(B, H, K, V)]
    cot = [r(B, L, H, V), r(B, H, K, V)]

    def fn(kernel):
        return lambda q, r_, w_, v, a, S0: kernel(q, r_, w_, w_, v, a, S0)

    ref_fn = fn(lambda *a: sk.chunk_delta_rule(*a, chunk=16))
    ref = _grads(ref_fn, xs, cot)
    rounded = _grads(ref_fn, _bf16_round(xs), cot)
    got = _grads(fn(lambda *a: td.chunk_delta_rule(*a, chunk=16, split=split)),
                 [x.float() for x in xs], cot)
    _judge(["o", "S_last", "dq", "dr", "dw", "dv", "dlog_alpha", "dS0"], ref, rounded, got)


def test_the_mode_reaches_a_compiled_spec(monkeypatch):
    """rnnc.compile(..., backend="triton") on examples/gla.rnn: unset, the chunk kernels match
    the sequential backend to float32's rounding; with RNNC_TRITON_DOT=bf16 (read at every
    call) the outputs move by bf16's rounding, not more."""
    path = Path(__file__).resolve().parents[1] / "examples" / "gla.rnn"
    dims = dict(H=2, K=16, V=16)
    seq = rnnc.compile(str(path), backend="sequential", **dims).double()
    tri = rnnc.compile(str(path), backend="triton", chunk_size=16, **dims)
    gen = torch.Generator().manual_seed(5)
    B, T = 1, 21
    q, k, v = (torch.randn(B, T, 2, 16, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, 2, 16, generator=gen) + 2)
    with torch.no_grad():
        want = seq(q.double(), k.double(), v.double(), g.double())
        plain = tri(q, k, v, g)
        monkeypatch.setenv(tg.DOT_ENV, "bf16")
        rounded = tri(q, k, v, g)
    assert rel_err(plain, want) < 1e-5
    e = rel_err(rounded, want)
    assert 2.0 ** -14 < e < 2.0 ** -5, e


def test_dot_modes(monkeypatch):
    """RNNC_TRITON_DOT: auto (the default) keeps the leaves' rule; tf32/ieee/bf16 force one
    on CUDA; off CUDA only bf16 changes anything (its interpreter form); a bad value is a
    clear error naming the variable."""
    from types import SimpleNamespace as T
    cuda = T(is_cuda=True, dtype=torch.float32)
    cpu = T(is_cuda=False, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for env, on_cuda, off_cuda in [("", "ieee", "ieee"), ("auto", "ieee", "ieee"),
                                   ("tf32", "tf32", "ieee"), ("IEEE", "ieee", "ieee"),
                                   (" bf16 ", "bf16", "bf16x")]:
        monkeypatch.setenv(tg.DOT_ENV, env)
        assert (tg.dot_precision([cuda]), tg.dot_precision([cpu])) == (on_cuda, off_cuda), env
    assert tg.dot_precision([cuda], "bf16") == "bf16"   # an explicit want beats the variable
    monkeypatch.setenv(tg.DOT_ENV, "fp8")
    with pytest.raises(rnnc.RnncError, match="RNNC_TRITON_DOT .* must be one of"):
        tg.dot_precision([cuda])
    with pytest.raises(rnnc.RnncError, match="precision must be 'ieee', 'tf32' or 'bf16'"):
        tc.chunk_linear_attention(None, *(torch.zeros(1, 1, 1, 16),) * 3,
                                  torch.zeros(1, 1, 16, 16), precision="fp8")


def test_bf16_dots_compile_for_gpu_without_one():
    """The GPU form (a bfloat16 tl.dot) compiles to sm_90 cubins, with bf16 leaves: the walk's
    linear-attention kernels with a split key axis, and the delta rule's walk and backward."""
    compile_offline(
        "from rnnc.backends import triton_chunk as tc, triton_delta as td\n"
        "a = tc.compile_for(K=64, V=32, chunk=32, precision='bf16', dtype='bf16', block_k=32,\n"
        "                   names=('chunk_fwd', 'chunk_bwd'), report=True)\n"
        "b = td.compile_for(K=32, V=32, chunk=16, dtype='bf16', dot_prec='bf16',\n"
        "                   variants=[(True, True, True)], detail=True)\n"
        "assert len(a) == 2 and len(b) == 2, (a, b)\n"
        "assert all(r['cubin'] > 0 and r['shared'] > 0 for r in [*a.values(), *b.values()]), (a, b)\n"
        "print('compiled')\n")


@pytest.mark.parametrize("kind,seed", [("chunked", 0), ("chunked", 3), ("delta", 0), ("delta", 3)])
def test_random_specs_with_bf16_dots(monkeypatch, kind, seed):
    """Random specs with a matrix state (`rnnc.random_spec`) on the triton backend with
    RNNC_TRITON_DOT=bf16, against float64 sequential: outputs and final states within 4 e_in
    and further than e_in / 16, where the yardstick e_in rounds the params as well as the
    inputs to bf16 (the operands the kernels round are computed from both). Gradients are
    judged by the kernel tests above: in a random spec a log-decay's gradient is a sum that
    cancels (see triton_chunk's chunk_dg), whose rounding the bf16 products raise in absolute
    terms, unlike rounding a param."""
    from rnnc.interpret import concrete
    src, dims = rnnc.random_spec(seed, kind)
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    rounded = rnnc.compile(src, backend="sequential", **dims).double()
    rounded.load_state_dict({k: v.to(BF16).double() for k, v in ref.state_dict().items()})
    tri = rnnc.compile(src, backend="triton", chunk_size=16, **dims)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    assert ref.analysis.plan in ("chunked", "chunked_delta")
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 21, *concrete(d.shape, dims), generator=gen, dtype=F64)
          for d in ref.recurrence.inputs]

    def results(m, inputs):
        with torch.no_grad():
            ys, final = m(*inputs, output_final_state=True)
        ys = ys if isinstance(ys, tuple) else (ys,)
        return [y.double() for y in ys] + [s.double() for s in final.values()]

    want, yardstick = results(ref, xs), results(rounded, _bf16_round(xs))
    monkeypatch.setenv(tg.DOT_ENV, "bf16")
    got = results(tri, [x.float() for x in xs])
    assert len(got) == len(want) >= 2
    for a, b, c in zip(want, yardstick, got):
        e_in, e = rel_err(b, a), rel_err(c, a)
        assert e_in / 16 < e <= 4 * e_in, (e, e_in)
