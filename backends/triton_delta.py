"""Triton kernels for the chunked delta rule (DeltaNet, Gated DeltaNet), forward and backward.

`chunk_delta_rule` has the contract of `scan_kernels.chunk_delta_rule` (see there for the
math); the kernels live in templates/chunk_delta.py.tmpl and are loaded through rnnc's disk
cache. Two forwards compute the same function:

- the walk (delta_fwd, the default): one program per (batch * head, V block) walks the chunks
  in order with the state [K, V block] in registers; inside a chunk it builds the strictly
  lower triangular UT matrix, inverts I + A by forward substitution, and applies the W/U
  factors with tl.dot. All of a chunk's work sits inside the sequential loop, so a long
  sequence gets only B * H * NV programs, each doing T / C dependent chunk steps.
- the split forward (Config.split, three launches): delta_ut, one program per (chunk,
  batch * head), does the part that does not depend on the state entering the chunk (the UT
  solve, Wt = T diag(gamma) R, and T V, or T A_rp V when w != p); delta_state, one program per
  (batch * head, V block), walks the chunks doing only two products with the state per chunk
  (the state-corrected values U = T V - Wt S, or Z = T A_rp V + Wt S, and the state update),
  storing each chunk's entry state and U (or Z); delta_out, one program per (V block, chunk,
  batch * head), computes every chunk's outputs from its stored entry state. The UT solve (C
  dependent steps) is the costliest part of a chunk's latency, which is why it gets its own
  parallel kernel rather than running inside delta_state. The split forward always stores the
  entry states (delta_out reads them) and allocates the scratch Wt [B, L, H, K] and U [B, L,
  H, V] (float32), with or without autograd.

K is never split (the solve needs whole r.w products); V may be.

Training stores the state entering every chunk ([B, H, NC, K, V] float32; both forwards store
the same), and the one backward kernel walks the chunks in reverse from the last one,
recomputes each chunk's forward from its stored entry state and carries the state adjoint dS
in registers. Gradients of the K-side inputs (q, r, w, p, log_alpha) are written once per V
block and summed here.

The kernels read q, r, w, p, v and log_alpha only through loaders generated per call
signature (`source(sigs)`): each operand is a tensor or a triton_gates.Stream (the tensors
it is computed from and the spec's expression over them, evaluated inside the kernels).

It runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (Triton's
interpreter, for tests at small sizes). Everything is computed in float32; float32, bfloat16
and float16 inputs are accepted.

Launch configs: chunk=None (or "auto") lets `triton_tune` choose the forward's kind (walk or
split), chunk, V block and num_warps among `configs()` (timed once per key on CUDA; the walk
with `geometry`'s defaults for chunk `DEFAULT_CHUNK` elsewhere), and delta_bwd's V block and
num_warps with the forward's chunk. An explicit chunk gets geometry's V block and warps,
untimed, and the walk unless split=True. `compile_for` compiles any of the kernels for an
NVIDIA target without a GPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rnnc.errors import RnncError

from . import triton_gates as gates
from . import triton_tune as tune
from .triton_gates import Stream

TEMPLATE = Path(__file__).parent / "templates" / "chunk_delta.py.tmpl"
MAX_K = 256          # the whole key dimension lives in one program's registers
CHUNKS = (16, 32, 64)
DEFAULT_CHUNK = 64   # the chunk when nothing is tuned (RNNC_TRITON_TUNE=0, CPU)
SPLIT_MIN_CHUNK = 32  # the shortest chunk among the split forward's tuner candidates
SPLIT_KERNELS = ("delta_ut", "delta_state", "delta_out")
_ACCEPTED = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


OPERANDS = ("q", "r", "w", "p", "v", "a")   # a: log_alpha


def plain_signatures(has_la: bool = True) -> tuple:
    """The stream signatures of materialised operands: q, r, w, p [B, L, H, K], v [B, L, H, V],
    log_alpha [B, L, H] (no leaf, never read, without it)."""
    full = (gates.PLAIN, ((True, True, True),))
    la = (gates.PLAIN, ((True, True, False),)) if has_la else ((("const", 0.0),), ())
    return (full,) * 5 + (la,)


def source(sigs: tuple | None = None) -> str:
    """The kernel module's text for the operands' stream signatures (q, r, w, p, v, log_alpha;
    default: materialised operands), as it is loaded and as `rnnc compile --emit` shows it."""
    return gates.module_source(TEMPLATE.read_text(), OPERANDS, sigs or plain_signatures())


def kernels(interpreted: bool | None = None, sigs: tuple | None = None):
    """The kernel module (delta_fwd, delta_bwd, ...) for those signatures. Triton decides at
    decoration time whether a kernel is interpreted, so the two kinds are cached under
    different tags."""
    from rnnc import cache
    if interpreted is None:
        interpreted = _interpreting()
    return cache.load_module(source(sigs), "chunk_delta_interp" if interpreted else "chunk_delta")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def geometry(L: int, K: int, V: int, chunk: int, block_v: int | None = None) -> dict:
    """Chunk length C (a power of two, 16 <= C <= chunk, shortened for short blocks), the
    padded key width BK, the V block BV and the counts NC (chunks) and NV (V blocks)."""
    C = min(chunk, max(16, _pow2(L)))
    BK = max(16, _pow2(K))
    if block_v is None:
        # the state tile, and the [C, BK] operand tiles, share the registers of one program
        block_v = 64 if BK <= 64 else 32
    BV = min(max(16, _pow2(block_v)), max(16, _pow2(V)))
    return {"C": C, "BK": BK, "BV": BV, "NC": -(-L // C), "NV": -(-V // BV),
            "warps": 4 if BK * BV <= 4096 else 8}


def _geo(L, K, V, c: tune.Config) -> dict:
    """geometry() for a launch config (its chunk, V block, warps and forward mode)."""
    return {**geometry(L, K, V, c.chunk, c.block_v), "warps": c.warps, "split": c.split}


def default_config(L: int, K: int, V: int, chunk: int = DEFAULT_CHUNK,
                   block_v: int | None = None) -> tune.Config:
    """The walk (split=False) with geometry's V block and warps."""
    geo = geometry(L, K, V, chunk, block_v)
    return tune.Config(geo["C"], geo["BV"], geo["warps"])


def configs(L: int, K: int, V: int, chunk: int | None = None, block_v: int | None = None,
            backward: bool = False) -> list:
    """Candidate launch configs: the chunk lengths of triton_tune.CHUNKS as geometry cuts them
    for L (or the given chunk), V blocks of every power of two from 16 to V's (or the given
    block_v), and the num_warps that suit the state tile (the backward holds S and dS) and the
    [C, K] operand tiles. The forward's list ends with split variants (the two-level forward,
    Config.split): chunks of at least SPLIT_MIN_CHUNK steps that leave L more than one chunk,
    every V block, and only the most warps of the walk's rule for each."""
    BK = max(16, _pow2(K))
    if chunk is None:
        chunks = dict.fromkeys(geometry(L, K, V, c)["C"] for c in tune.CHUNKS if c in CHUNKS)
    else:
        chunks = [geometry(L, K, V, chunk)["C"]]
    if block_v is None:
        bvs, bv = [], max(16, _pow2(V))
        while bv >= 16:
            bvs.append(bv)
            bv //= 2
    else:
        bvs = [geometry(L, K, V, DEFAULT_CHUNK, block_v)["BV"]]
    out, split = [], []
    for C in chunks:
        for bv in bvs:
            ws = tune.warps_for(BK * bv * (2 if backward else 1), max(C * BK, C * C))
            out += [tune.Config(C, bv, w) for w in ws]
            if ws and not backward and C >= SPLIT_MIN_CHUNK and L > C:
                split.append(tune.Config(C, bv, max(ws), True))
    return out + split


def _check(q, r, w, p, v, log_alpha, S0, chunk):
    """q (or None), r, w, p, v, log_alpha (or None: [B, L, H, 1] as a stream): Streams; S0 a
    tensor."""
    if len(r.shape) != 4:
        raise RnncError(f"chunk_delta_rule: r must be [B, L, H, K], got shape {tuple(r.shape)}")
    B, L, H, K = r.shape
    named = {"q": q, "r": r, "w": w, "p": p, "v": v, "log_alpha": log_alpha}
    for name, s in named.items():
        for t in ([] if s is None else s.leaves) + ([S0] if name == "r" else []):
            if t.dtype == torch.float64:
                raise RnncError(f"chunk_delta_rule (Triton) computes in float32; {name} is float64: "
                                "use the scan backend for float64")
            if t.dtype not in _ACCEPTED:
                raise RnncError(f"chunk_delta_rule (Triton): {name} has dtype {t.dtype}; "
                                "float32, bfloat16 or float16 expected")
            if t.device != S0.device:
                raise RnncError(f"chunk_delta_rule (Triton): {name} is on {t.device}, S0 on {S0.device}")
    for name, t in (("q", q), ("w", w), ("p", p)):
        if t is not None and tuple(t.shape) != (B, L, H, K):
            raise RnncError(f"chunk_delta_rule: {name} has shape {tuple(t.shape)}, r {tuple(r.shape)}; "
                            "both must be [B, L, H, K]")
    if len(v.shape) != 4 or tuple(v.shape[:3]) != (B, L, H):
        raise RnncError(f"chunk_delta_rule: v must be [B, L, H, V] = [{B}, {L}, {H}, V], got "
                        f"{tuple(v.shape)}")
    V = v.shape[3]
    if log_alpha is not None and tuple(log_alpha.shape) != (B, L, H, 1):
        raise RnncError(f"chunk_delta_rule: log_alpha must be [B, L, H] = [{B}, {L}, {H}], got "
                        f"{tuple(log_alpha.shape[:3]) if log_alpha.shape[3:] == (1,) else tuple(log_alpha.shape)}")
    if tuple(S0.shape) != (B, H, K, V):
        raise RnncError(f"chunk_delta_rule: S0 must be [B, H, K, V] = [{B}, {H}, {K}, {V}], got "
                        f"{tuple(S0.shape)}")
    if L < 1:
        raise RnncError("chunk_delta_rule: the block needs L >= 1 steps")
    if chunk is not None and chunk not in CHUNKS:
        raise RnncError(f"chunk_delta_rule (Triton): chunk must be one of {CHUNKS}, got {chunk}")
    if K > MAX_K:
        raise RnncError(f"chunk_delta_rule (Triton): K = {K} keys exceed {MAX_K} (the kernel keeps "
                        "the whole key axis of the state in registers); use the scan backend")
    if S0.device.type != "cuda" and not _interpreting():
        raise RnncError("chunk_delta_rule (Triton) runs on CUDA tensors (or on CPU under "
                        f"TRITON_INTERPRET=1); these are on {S0.device}")


def chunk_delta_rule(q, r, w, p, v, log_alpha, S0, chunk: int | str | None = None,
                     block_v: int | None = None, split: bool | None = None):
    """S_t = alpha_t (S_{t-1} - w_t (r_t^T S_{t-1})) + p_t v_t^T, o_t = S_t^T q_t, in Triton.

    q: [B, L, H, K] or None; r, w, p: [B, L, H, K]; v: [B, L, H, V]; log_alpha: [B, L, H] or
    None (alpha = 1); S0: [B, H, K, V]; any L >= 1; chunk in (16, 32, 64), or None / "auto":
    tuned (see triton_tune; chunk 64 off CUDA or with RNNC_TRITON_TUNE=0).
    q, r, w, p, v may also be triton_gates.Streams (log_alpha one of shape [B, L, H, 1]): the
    operands computed in the kernels from their leaves (the spec's gates, fused).
    Returns (o, S_last): o [B, L, H, V] in the inputs' promoted dtype (None when q is None),
    S_last [B, H, K, V] in S0's dtype. Differentiable w.r.t. every tensor argument (the
    leaves, for streams).
    Passing the same object as w and p (DeltaNet) takes the shorter shared path;
    w != p is supported too. block_v overrides the V block (a power of two >= 16).
    split: None lets the tuner choose the forward's kind (with an explicit chunk: the walk);
    True or False forces the split (three-kernel) or the walk forward, tuned among that kind's
    candidates when chunk is None. The backward is the same either way.
    """
    if chunk == "auto":
        chunk = None
    if isinstance(log_alpha, torch.Tensor) and log_alpha.dim() != 3:
        raise RnncError(f"chunk_delta_rule: log_alpha must be [B, L, H], got {tuple(log_alpha.shape)}")
    shared = p is w
    q, r, w, v = (gates.as_stream(x) for x in (q, r, w, v))
    p = w if shared else gates.as_stream(p)
    la = gates.as_stream(log_alpha.unsqueeze(-1) if isinstance(log_alpha, torch.Tensor)
                         else log_alpha)
    _check(q, r, w, p, v, la, S0, chunk)
    has_q, has_la = q is not None, la is not None
    B, L, H, K = r.shape
    ops = (q if has_q else r, r, w, p, v,
           la if has_la else Stream((("const", 0.0),), [], (), (B, L, H, 1)))
    used = (has_q, True, True, not shared, True, has_la)
    dtype = None
    for s, u in zip(ops[:5], used):
        for x in (s.leaves if u else []):
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    dtype = dtype or torch.float32
    meta, leaves = gates.pack(ops, used)
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*leaves, S0])
    res = _ChunkDelta.apply((chunk, block_v, shared, want_grad, dtype, split, has_q, has_la),
                            meta, S0, *leaves)
    if q is None:
        return None, res[0]
    return res[0], res[1]


class _Ops:
    """The six operand streams of one call (q, r, w, p, v, log_alpha), and what launching
    them needs: q stands for r without q, p for w when shared."""

    def __init__(self, meta, leaves, used):
        q, r, w, p, v, la = gates.unpack(meta, leaves, used)
        q = q if used[0] else Stream(r.code, r.leaves, r.kinds, r.shape)
        p = p if used[3] else w
        self.streams = (q, r, w, p, v, la)
        self.sigs = tuple(s.signature for s in self.streams)
        self.leaves = [x for s in self.streams for x in s.leaves]
        B, L, H, K = r.shape
        self.dims = (B, L, H, K, v.shape[3])
        self.device = r.leaves[0].device if r.leaves else None
        self.prec = gates.dot_precision(self.leaves)   # tl.dot's input precision


def _launch_args(geo, ops: _Ops):
    return dict(C=geo["C"], BK=geo["BK"], BV=geo["BV"], DOT_PREC=ops.prec, num_warps=geo["warps"])


def _key(family, ops: _Ops, dtypes, *flags):
    B, L, H, K, V = ops.dims
    return (family, B, H, K, V, tune.bucket(L), tuple(str(d) for d in dtypes), ops.sigs, *flags,
            tune.device_tag(ops.device))


def _forward_buffers(geo, ops: _Ops, has_q, want_grad):
    """(o, S_last, hist, scratch). The walk stores the history only for training; the split
    forward always does (its output kernel reads it) and adds its scratch (Wt, U)."""
    B, L, H, K, V = ops.dims
    f32 = dict(dtype=torch.float32, device=ops.device)
    o = torch.empty(B, L, H, V, **f32) if has_q else None
    S_last = torch.empty(B, H, K, V, **f32)
    if geo["split"]:
        hist = torch.empty(B, H, geo["NC"], K, V, **f32)
        return o, S_last, hist, (torch.empty(B, L, H, K, **f32), torch.empty(B, L, H, V, **f32))
    hist = torch.empty(B, H, geo["NC"], K, V, **f32) if want_grad else S_last
    return o, S_last, hist, None


def _forward(geo, flags, want_grad, ops: _Ops, S0, out):
    B, L, H, K, V = ops.dims
    o, S_last, hist, scratch = out
    NC, NV = geo["NC"], geo["NV"]
    mod = kernels(sigs=ops.sigs)
    if not geo["split"]:
        mod.delta_fwd[(B * H, NV)](
            *ops.leaves, S0, S_last if o is None else o, S_last, hist,
            L, H, K, V, NC,
            HAS_Q=o is not None, STORE_HIST=want_grad, **flags, **_launch_args(geo, ops))
        return
    wt, u = scratch
    mod.delta_ut[(NC * B * H,)](*ops.leaves, wt, u, L, H, K, V, NC, NV, **flags,
                                **_launch_args(geo, ops))
    mod.delta_state[(B * H, NV)](*ops.leaves, S0, wt, u, S_last, hist, L, H, K, V, NC, **flags,
                                 **_launch_args(geo, ops))
    if o is not None:
        mod.delta_out[(NV * NC * B * H,)](*ops.leaves, u, hist, o, L, H, K, V, NC, NV,
                                          **flags, **_launch_args(geo, ops))


def _backward_buffers(geo, ops: _Ops, has_q, shared, has_la):
    B, L, H, K, V = ops.dims
    f32 = dict(dtype=torch.float32, device=ops.device)
    part = lambda *shape: torch.empty(geo["NV"], *shape, **f32)   # noqa: E731  one slice per V block
    dq = part(B, L, H, K) if has_q else None
    dr, dw = part(B, L, H, K), part(B, L, H, K)
    dp = part(B, L, H, K) if not shared else None
    dla = part(B, L, H) if has_la else None
    return dq, dr, dw, dp, torch.empty(B, L, H, V, **f32), dla, torch.empty(B, H, K, V, **f32)


def _backward(geo, flags, ops: _Ops, hist, do, dsl, out):
    B, L, H, K, V = ops.dims
    dq, dr, dw, dp, dv, dla, ds0 = out
    kernels(sigs=ops.sigs).delta_bwd[(B * H, geo["NV"])](
        *ops.leaves, hist, dsl if do is None else do, dsl,
        dr if dq is None else dq, dr, dw, dw if dp is None else dp, dv,
        dr if dla is None else dla, ds0,
        B, L, H, K, V, geo["NC"],
        HAS_Q=dq is not None, **flags, **_launch_args(geo, ops))


class _ChunkDelta(torch.autograd.Function):
    """(cfg, meta, S0, *leaves) -> (o?, S_last). meta: (code, kinds, shape) of the q, r, w, p,
    v and log_alpha streams, whose leaves follow in that order, except q's without q, p's when
    shared (p is w) and log_alpha's without it. cfg = (chunk (None: tuned), block_v, shared,
    want_grad, output dtype, split (None: the tuner's choice), has_q, has_la)."""

    @staticmethod
    def forward(ctx, cfg, meta, S0, *leaves):
        chunk, block_v, shared, want_grad, dtype, split, has_q, has_la = cfg
        used = (has_q, True, True, not shared, True, has_la)
        ops = _Ops(meta, [t.contiguous() for t in leaves], used)
        B, L, H, K, V = ops.dims
        dtypes = [t.dtype for t in leaves] + [S0.dtype]
        S0c = S0.contiguous()
        flags = dict(HAS_LA=has_la, SHARED=shared)
        if chunk is None:
            key = _key("chunk_delta.fwd", ops, dtypes, block_v, has_q, has_la, shared, want_grad,
                       ops.prec, split)

            def bench(c):
                geo = _geo(L, K, V, c)
                out = _forward_buffers(geo, ops, has_q, want_grad)
                fwd = lambda: _forward(geo, flags, want_grad, ops, S0c, out)  # noqa: E731
                if not want_grad:
                    return fwd
                # training: the chunk chosen here is the backward's too, so each candidate is
                # timed with the backward it implies (its default config at that chunk)
                gb = _geo(L, K, V, default_config(L, K, V, c.chunk, block_v))
                back = _backward_buffers(gb, ops, has_q, shared, has_la)
                dsl = torch.zeros_like(out[1])
                do = dsl.new_zeros(B, L, H, V) if has_q else None
                return lambda: (fwd(), _backward(gb, flags, ops, out[2], do, dsl, back))
            cands = configs(L, K, V, None, block_v)
            default = default_config(L, K, V, block_v=block_v)
            if split is not None:
                cands = [c for c in cands if c.split == split]
                default = default._replace(split=bool(split))
            c = tune.choose(key, cands, default, bench, ops.device)
        else:
            c = default_config(L, K, V, chunk, block_v)._replace(split=bool(split))
        geo = _geo(L, K, V, c)
        o, S_last, hist, _ = out = _forward_buffers(geo, ops, has_q, want_grad)
        _forward(geo, flags, want_grad, ops, S0c, out)
        if want_grad:
            ctx.save_for_backward(hist, *leaves)
        ctx.cfg, ctx.meta, ctx.geo, ctx.dtypes = cfg, meta, geo, dtypes
        S_last = S_last.to(S0.dtype)
        return (S_last,) if o is None else (o.to(dtype), S_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        chunk, block_v, shared, _, _, _, has_q, has_la = ctx.cfg
        hist, *leaves = ctx.saved_tensors
        used = (has_q, True, True, not shared, True, has_la)
        ops = _Ops(ctx.meta, [t.contiguous() for t in leaves], used)
        B, L, H, K, V = ops.dims
        do = grads[0].contiguous() if has_q else None
        dsl = grads[-1].contiguous()
        flags = dict(HAS_LA=has_la, SHARED=shared)
        # the chunk is the forward's: `hist` holds the state entering each of its chunks
        geo = ctx.geo
        if chunk is None:
            key = _key("chunk_delta.bwd", ops, ctx.dtypes, geo["C"], block_v, has_q, has_la,
                       shared, ops.prec)

            def bench(c):
                g = _geo(L, K, V, c)
                out = _backward_buffers(g, ops, has_q, shared, has_la)
                return lambda: _backward(g, flags, ops, hist, do, dsl, out)
            c = tune.choose(key, configs(L, K, V, geo["C"], block_v, backward=True),
                            default_config(L, K, V, geo["C"], block_v), bench, ops.device)
            geo = _geo(L, K, V, c)
        out = _backward_buffers(geo, ops, has_q, shared, has_la)
        _backward(geo, flags, ops, hist, do, dsl, out)
        dq, dr, dw, dp, dv, dla, ds0 = out
        per_op = [None if g is None else g.sum(0) for g in (dq, dr, dw, dp)] + [dv]
        per_op.append(None if dla is None else dla.sum(0).unsqueeze(-1))
        res = gates.grads(ops.streams, per_op, used, ctx.needs_input_grad[3:])
        return (None, None, ds0.to(ctx.dtypes[-1]) if ctx.needs_input_grad[2] else None, *res)


def compile_for(arch: int = 90, K: int = 64, V: int = 64, chunk: int = 64, dtype: str = "fp32",
                dot_prec: str = "ieee", variants=None, names=("delta_fwd", "delta_bwd"),
                block_v: int | None = None, warps: int | None = None, detail: bool = False,
                sigs: tuple | None = None) -> dict:
    """Compile kernels for an NVIDIA target without a GPU (Triton runs its whole pipeline
    to a cubin on the CPU). names: the kernels, the walk forward and the backward by default
    (SPLIT_KERNELS: the split forward's three; delta_out only where has_q); variants:
    (has_q, has_la, shared) triples, all eight by default; dtype: the element type of the
    inputs ("fp32", "bf16", "fp16"); block_v and warps: geometry's unless given.
    Returns {(kernel, has_q, has_la, shared): cubin size}, or with detail
    {...: {"cubin": size, "shared": bytes of shared memory, "regs": registers per thread,
    "stack": bytes of stack per thread (spills)}} (regs and stack from the cuobjdump that
    ships with Triton; None without it). sigs: the operands' stream signatures (default:
    materialised operands). Run it without TRITON_INTERPRET.
    (With dot_prec="ieee", float32 tl.dot becomes unrolled FMAs: large cubins, slow compiles
    at chunk 64; "tf32" and "bf16" use the tensor cores.)"""
    import itertools

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    mod = kernels(interpreted=False, sigs=sigs)
    geo = geometry(4 * chunk, K, V, chunk, block_v)
    const = {n: geo[n] for n in ("C", "BK", "BV")}
    const["DOT_PREC"] = dot_prec
    # buffers allocated here (outputs, history, gradients) are float32; S0 (and the gradient
    # of S_last) is taken as float32 too; the per-step inputs and the gradient of o have dtype
    # (the split forward's scratch, Wt and U, is float32 too)
    leaves = {f"{op}_{j}" for op, sig in zip(OPERANDS, sigs or plain_signatures())
              for j in range(len(sig[1]))}   # the operands' leaves (one each: materialised)
    out = {}
    for name, (has_q, has_la, shared) in itertools.product(
            names, list(variants or itertools.product((True, False), repeat=3))):
        if name == "delta_out" and not has_q:
            continue
        fn = getattr(mod, name)
        consts = {**const, "HAS_Q": has_q, "HAS_LA": has_la, "SHARED": shared, "STORE_HIST": True}
        consts = {k: c for k, c in consts.items() if k in fn.arg_names}
        sig = {}
        for a in fn.arg_names:
            if a in consts:
                sig[a] = "constexpr"
            elif a in leaves or a == "do_ptr":
                sig[a] = f"*{dtype}"
            elif a.endswith("_ptr"):
                sig[a] = "*fp32"
            else:
                sig[a] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps or geo["warps"]})
        cubin = k.asm["cubin"]
        out[(name, has_q, has_la, shared)] = (
            {"cubin": len(cubin), "shared": k.metadata.shared, **gates.cubin_usage(cubin)}
            if detail else len(cubin))
    return out


__all__ = ["chunk_delta_rule", "geometry", "configs", "default_config", "kernels", "compile_for"]
