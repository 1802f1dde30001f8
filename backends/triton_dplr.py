"""Triton kernels for the chunked diagonal-plus-rank-1 form with a decay per key channel
(Kimi Delta Attention, RWKV-7), forward and backward.

`chunk_dplr` has the contract of `scan_kernels.chunk_dplr` for one erase and one input term
per step (r, w, p [B, L, H, K]):

    S_t = diag(exp(log_alpha_t)) S_{t-1} - w_t (r_t^T S_{t-1}) + p_t v_t^T,
    o_t = S_t^T q_t (include_current) or S_{t-1}^T q_t,

with log_alpha [B, L, H, K], or [B, L, H, 1] for one decay per head. The kernels live in
templates/chunk_dplr.py.tmpl (see there for the math) and read their operands through the
loaders of `triton_gates`, so each operand may also be a Stream: the spec's expression over
its leaves, computed inside the kernels.

- dplr_fwd, one program per (batch * head, V block), walks the chunks with the state
  [K, V block] in float32 registers: per chunk the pair scores (one key column at a time: a
  decay per channel leaves no [C, C] mask for a tl.dot), the unit lower triangular inverse,
  the outputs and the state update as tl.dot products. Training stores the state entering
  every chunk ([B, H, NC, K, V] float32).
- dplr_bwd walks the chunks in reverse from the stored states, recomputing each chunk's
  forward, carrying dL/dS; the K-side gradients come one share per V block, summed here.

K is never split (the triangular solve needs whole r . w products); V may be. Everything is
computed in float32; float32, bfloat16 and float16 inputs are accepted. The chunk is 16
steps unless asked for (16, 32 or 64): the score loop's cost per step grows with the chunk.
Nothing is tuned yet: no GPU has run these kernels (see benchmarks/README.md).

It runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rnnc.errors import RnncError

from . import triton_gates as gates
from .triton_gates import Stream

TEMPLATE = Path(__file__).parent / "templates" / "chunk_dplr.py.tmpl"
OPERANDS = ("q", "r", "w", "p", "v", "a")   # a: log_alpha
MAX_K = 128          # the whole key axis in one program's registers, beside the [C, K] tiles
CHUNKS = (16, 32, 64)
DEFAULT_CHUNK = 16
_ACCEPTED = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def plain_signatures(per_channel: bool = True) -> tuple:
    """The stream signatures of materialised operands: q, r, w, p [B, L, H, K], v [B, L, H, V]
    and log_alpha [B, L, H, K] (or [B, L, H, 1] without per_channel)."""
    full = (gates.PLAIN, ((True, True, True),))
    return (full,) * 5 + ((gates.PLAIN, ((True, True, per_channel),)),)


def source(sigs: tuple | None = None) -> str:
    """The kernel module's text for the operands' stream signatures, as it is loaded and as
    `rnnc compile --emit` shows it."""
    return gates.module_source(TEMPLATE.read_text(), OPERANDS, sigs or plain_signatures())


def kernels(sigs: tuple | None = None, interpreted: bool | None = None):
    """The kernel module (dplr_fwd, dplr_bwd) for those signatures; Triton decides at
    decoration time whether a kernel is interpreted, so the two kinds are cached apart."""
    from rnnc import cache
    interpreted = _interpreting() if interpreted is None else interpreted
    return cache.load_module(source(sigs), "chunk_dplr_interp" if interpreted else "chunk_dplr")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def geometry(L: int, K: int, V: int, chunk: int, block_v: int | None = None) -> dict:
    """Chunk C (16 <= C <= chunk, shorter for short blocks), padded key width BK, V block
    BV (block_v, a power of two >= 16, where given), chunk count NC, V block count NV,
    warps."""
    C = min(chunk, max(16, _pow2(L)))
    BK = max(16, _pow2(K))
    # sm_90 compiles (compile_for, K = 64 and 128): 8 warps keep the forward out of local
    # memory where 4 spill at K = 128; the backward spills 2.6-6 KB per thread at every
    # geometry tried (V blocks of 16 or 32, 4 or 8 warps), so V blocks stay at 32, which
    # recompute the chunks' K-side work half as often as 16 would
    BV = min(block_v or (64 if BK <= 32 else 32), max(16, _pow2(V)))
    return {"C": C, "BK": BK, "BV": BV, "NC": -(-L // C), "NV": -(-V // BV),
            "warps": 4 if BK * BV < 2048 else 8}


def fits(r, p) -> str | None:
    """Why these operands are not this kernel's form (None where they are): one erase and one
    input term per step, K <= MAX_K."""
    if len(r.shape) != 4 or len(p.shape) != 4:
        return "several erase or input terms per step (the kernel takes one of each)"
    K = r.shape[-1]
    if K > MAX_K:
        return f"K = {K} keys exceed {MAX_K} (the whole key axis lives in one program)"
    return None


def _check(q, r, w, p, v, la, S0, chunk):
    why = fits(r, p)
    if why:
        raise RnncError(f"chunk_dplr (Triton): {why}")
    B, L, H, K = r.shape
    for name, s in {"q": q, "r": r, "w": w, "p": p, "v": v, "log_alpha": la}.items():
        for t in ([] if s is None else s.leaves) + ([S0] if name == "r" else []):
            if t.dtype not in _ACCEPTED:
                raise RnncError(f"chunk_dplr (Triton) computes in float32; {name} is {t.dtype}: "
                                "use the scan backend for float64" if t.dtype == torch.float64
                                else f"chunk_dplr (Triton): {name} has dtype {t.dtype}")
            if t.device != S0.device:
                raise RnncError(f"chunk_dplr (Triton): {name} is on {t.device}, S0 on {S0.device}")
    for name, s in (("q", q), ("w", w), ("p", p)):
        if s is not None and tuple(s.shape) != (B, L, H, K):
            raise RnncError(f"chunk_dplr: {name} has shape {tuple(s.shape)}, r {(B, L, H, K)}")
    if len(v.shape) != 4 or tuple(v.shape[:3]) != (B, L, H):
        raise RnncError(f"chunk_dplr: v must be [B, L, H, V] = [{B}, {L}, {H}, V], got {tuple(v.shape)}")
    if tuple(la.shape) not in ((B, L, H, K), (B, L, H, 1)):
        raise RnncError(f"chunk_dplr: log_alpha must be [B, L, H, K] or [B, L, H, 1], got "
                        f"{tuple(la.shape)}")
    if tuple(S0.shape) != (B, H, K, v.shape[3]):
        raise RnncError(f"chunk_dplr: S0 must be [B, H, K, V], got {tuple(S0.shape)}")
    if L < 1:
        raise RnncError("chunk_dplr: the block needs L >= 1 steps")
    if chunk not in CHUNKS:
        raise RnncError(f"chunk_dplr (Triton): chunk must be one of {CHUNKS}, got {chunk}")
    if S0.device.type != "cuda" and not _interpreting():
        raise RnncError("chunk_dplr (Triton) runs on CUDA tensors (or on CPU under "
                        f"TRITON_INTERPRET=1); these are on {S0.device}")


def chunk_dplr(q, r, w, p, v, log_alpha, S0, chunk: int | None = None,
               include_current: bool = True, block_v: int | None = None):
    """scan_kernels.chunk_dplr's contract (one erase and one input term), in Triton.

    q: [B, L, H, K] or None; r, w, p: [B, L, H, K]; v: [B, L, H, V]; log_alpha:
    [B, L, H, K] or [B, L, H, 1]; S0: [B, H, K, V]; any L >= 1. Each of q, r, w, p, v and
    log_alpha may be a triton_gates.Stream. Returns (o [B, L, H, V] or None, S_last
    [B, H, K, V]), differentiable w.r.t. every tensor (the leaves, for streams). block_v
    overrides geometry's V block (a power of two >= 16). Passing the same object as w and p
    (KDA) takes the shorter shared path: half the pair scores, two fewer products per chunk."""
    chunk = DEFAULT_CHUNK if chunk in (None, "auto") else chunk
    shared = p is w
    q, r, w, v, la = (gates.as_stream(x) for x in (q, r, w, v, log_alpha))
    p = w if shared else gates.as_stream(p)
    _check(q, r, w, p, v, la, S0, chunk)
    has_q = q is not None
    ops = (q if has_q else r, r, w, p, v, la)
    used = _used(has_q, shared)
    dtype = None
    for s, u in zip(ops[:5], used):
        for x in (s.leaves if u else []):
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    meta, leaves = gates.pack(ops, used)
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*leaves, S0])
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise RnncError(f"chunk_dplr (Triton): block_v must be a power of two >= 16, got {block_v}")
    res = _ChunkDPLR.apply((chunk, want_grad, dtype or torch.float32, has_q,
                            bool(include_current), block_v, shared), meta, S0, *leaves)
    return (None, res[0]) if not has_q else (res[0], res[1])


def _used(has_q, shared):
    """Which of q, r, w, p, v, log_alpha bring leaves of their own (p none when it is w)."""
    return (has_q, True, True, not shared, True, True)


def _streams(meta, leaves, has_q, shared):
    """The six operand streams, q standing for r without q and p for w when shared."""
    used = _used(has_q, shared)
    q, r, w, p, v, la = gates.unpack(meta, leaves, used)
    q = q if has_q else Stream(r.code, r.leaves, r.kinds, r.shape)
    p = w if shared else p
    return (q, r, w, p, v, la), used


class _ChunkDPLR(torch.autograd.Function):
    """(cfg, meta, S0, *leaves) -> (o?, S_last); cfg = (chunk, want_grad, output dtype, has_q,
    include_current, block_v, shared); meta: the q, r, w, p, v, log_alpha streams (q's leaves
    absent without q, p's when shared)."""

    @staticmethod
    def forward(ctx, cfg, meta, S0, *leaves):
        chunk, want_grad, dtype, has_q, inc, block_v, shared = cfg
        leaves = [t.contiguous() for t in leaves]
        streams, used = _streams(meta, leaves, has_q, shared)
        B, L, H, K = streams[1].shape
        V = streams[4].shape[3]
        geo = geometry(L, K, V, chunk, block_v)
        flat = [x for s in streams for x in s.leaves]
        prec = gates.dot_precision(flat)
        f32 = dict(dtype=torch.float32, device=S0.device)
        S_last = torch.empty(B, H, K, V, **f32)
        o = torch.empty(B, L, H, V, **f32) if has_q else S_last
        hist = torch.empty(B, H, geo["NC"], K, V, **f32) if want_grad else S_last
        kernels(tuple(s.signature for s in streams)).dplr_fwd[(B * H, geo["NV"])](
            *flat, S0.contiguous().float(), o, S_last, hist, L, H, K, V, geo["NC"],
            C=geo["C"], BK=geo["BK"], BV=geo["BV"], HAS_Q=has_q, INC=inc,
            STORE_HIST=want_grad, DOT_PREC=prec, SHARED=shared, num_warps=geo["warps"])
        if want_grad:
            ctx.save_for_backward(hist, *leaves)
        ctx.cfg, ctx.meta, ctx.geo, ctx.S0_dtype = cfg, meta, geo, S0.dtype
        S_last = S_last.to(S0.dtype)
        return (o.to(dtype), S_last) if has_q else (S_last,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        _, _, _, has_q, inc, _, shared = ctx.cfg
        hist, *leaves = ctx.saved_tensors
        streams, used = _streams(ctx.meta, leaves, has_q, shared)
        B, L, H, K = streams[1].shape
        V = streams[4].shape[3]
        geo = ctx.geo
        flat = [x for s in streams for x in s.leaves]
        f32 = dict(dtype=torch.float32, device=hist.device)
        part = lambda: torch.zeros(geo["NV"], B, L, H, K, **f32)   # noqa: E731
        dq, dr, dw, da = part() if has_q else None, part(), part(), part()
        dp = None if shared else part()
        dv = torch.empty(B, L, H, V, **f32)
        ds0 = torch.empty(B, H, K, V, **f32)
        dsl = grads[-1].float().contiguous()
        do = grads[0].float().contiguous() if has_q else dsl
        kernels(tuple(s.signature for s in streams)).dplr_bwd[(B * H, geo["NV"])](
            *flat, hist, do, dsl, dr if dq is None else dq, dr, dw, dw if dp is None else dp, dv,
            da, ds0, B, L, H, K, V, geo["NC"],
            C=geo["C"], BK=geo["BK"], BV=geo["BV"], HAS_Q=has_q, INC=inc,
            DOT_PREC=gates.dot_precision(flat), SHARED=shared, num_warps=geo["warps"])
        da = da.sum(0)
        if streams[5].shape[3] == 1:
            da = da.sum(-1, keepdim=True)
        per_op = [None if g is None else g.sum(0) for g in (dq, dr, dw, dp)] + [dv, da]
        res = gates.grads(streams, per_op, used, ctx.needs_input_grad[3:])
        return (None, None, ds0.to(ctx.S0_dtype) if ctx.needs_input_grad[2] else None, *res)


def compile_for(arch: int = 90, K: int = 64, V: int = 64, chunk: int = 16, dtype: str = "fp32",
                dot_prec: str = "tf32", variants=((True, True), (True, False), (False, True)),
                per_channel: bool = True, block_v: int | None = None, warps: int | None = None,
                names=("dplr_fwd", "dplr_bwd"), shared: bool = False,
                sigs: tuple | None = None) -> dict:
    """Compile dplr_fwd and dplr_bwd for an NVIDIA target without a GPU (Triton's whole
    pipeline to a cubin, on the CPU; run it without TRITON_INTERPRET). variants: (has_q,
    include_current) pairs; dtype: the inputs' element type ("fp32", "bf16", "fp16");
    block_v, warps: geometry's unless given; shared: the w-is-p kernels; sigs: the operands'
    stream signatures (default: materialised operands, per_channel saying which decay).
    Returns {(kernel, has_q, include_current): {"cubin": bytes, "shared": bytes of shared
    memory, "regs", "stack": per thread (None without Triton's cuobjdump)}}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sigs = sigs or plain_signatures(per_channel)
    mod = kernels(sigs, interpreted=False)
    geo = geometry(4 * chunk, K, V, chunk, block_v)
    leaves = {f"{op}_{j}" for op, sig in zip(OPERANDS, sigs) for j in range(len(sig[1]))}
    out = {}
    for name in names:
        fn = getattr(mod, name)
        for has_q, inc in variants:
            consts = {"C": geo["C"], "BK": geo["BK"], "BV": geo["BV"], "DOT_PREC": dot_prec,
                      "HAS_Q": has_q, "INC": inc, "STORE_HIST": True, "SHARED": shared}
            consts = {k: c for k, c in consts.items() if k in fn.arg_names}
            sig = {a: "constexpr" if a in consts else f"*{dtype}" if a in leaves or a == "do_ptr"
                   else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": warps or geo["warps"]})
            cubin = k.asm["cubin"]
            out[(name, has_q, inc)] = {"cubin": len(cubin), "shared": k.metadata.shared,
                                       **gates.cubin_usage(cubin)}
    return out


__all__ = ["chunk_dplr", "fits", "geometry", "kernels", "source", "compile_for"]
