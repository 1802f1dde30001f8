"""Chunked linear attention with a diagonal decay as Triton kernels, forward and backward.

The same function as `scan_kernels.chunk_linear_attention` (RetNet, GLA, Mamba2, HGRN2,
RWKV6-style matrix states), for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1:

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T,
    o_t = S_t^T q_t (include_current) or S_{t-1}^T q_t.

The kernels live in templates/chunk_la.py.tmpl and are loaded through rnnc's disk cache.
They read q, k, v and the log-decay only through loaders generated per call signature
(`source(sigs)`): an operand is either a tensor or a triton_gates.Stream, the tensors it is
computed from and the spec's expression over them, evaluated inside the kernels.
Two ways to run the forward and the backward, sharing the per-chunk code (the template's
@triton.jit helpers _chunk_out, _chunk_state, _chunk_dq, _chunk_dkv), and chunk_dg after
either. Every grid's first axis numbers NK * NV blocks of channels: NV value blocks of BV
channels times NK key blocks of BK (NK = 1, all K in one program, unless the key axis is
split: Config.block_k; the outputs and dv are then one partial sum per key block, added up
here). The walk (the default), one program per (channel block, batch*head) walking the
chunks:

- chunk_fwd: the state S [BK, BV] in float32 registers; per chunk the outputs (the incoming
  state read through decayed queries, plus the intra-chunk attention) and the state update.
  When training it stores the state entering every chunk ([B, H, NC, K, V]): the backward
  walks the chunks in reverse and needs them in that order, which a recompute could only
  give by storing them too (or by a quadratic number of forward passes), and they are
  K*V / (C*(2K+V)) of the inputs' size (2/3 at K = V = 128, C = 64).
- chunk_bwd: the chunks in reverse carrying dL/dS; dq, dk (per value block, summed here),
  dv and dS0.

At long L that grid is only NK * NV * B * H programs, each doing L / C dependent chunk steps
with all the intra-chunk work inside the walk. The two levels (Config.split) keep only the state
recurrence sequential and do the rest for every chunk at once:

- chunk_states, grid (NK*NV, B*H): the walk with nothing but the state update (per chunk
  S <- exp(chunk total) S + (keys decayed to the chunk end)^T v, one tl.dot per sub-chunk),
  storing the state entering every chunk, exactly as chunk_fwd stores it (so either backward
  follows either forward), and S_last. A split forward with q stores them even without
  autograd (chunk_out reads them). Triton pipelines this loop, prefetching chunks into
  shared memory; `stages` picks its num_stages so that the prefetch stays within
  STAGE_BYTES.
- chunk_out, grid (NK*NV, NC, B*H): each chunk's outputs from its stored entering state.
- chunk_dstates, grid (NK*NV, B*H): the chunks in reverse carrying dL/dS through the chunk
  totals plus the outputs' share (q decayed to the chunk start)^T do, storing dL/dS at the end
  of every chunk ([B, H, NC, K, V], what that chunk's keys see from the later chunks) and
  dS0. Without q only the totals.
- chunk_dqkv, grid (NK*NV, NC, B*H): each chunk's dq, dk (per value block) and dv from its
  stored entering state and dL/dS at its end.
- chunk_dg: d log_decay. With G the cumulative log-decay, q_t enters as q_t exp(G_{t-d})
  (d = 0 or 1 as include_current) and k_s as k_s exp(-G_s), so dL/dG_t =
  q_{t+d} dq_{t+d} - k_t dk_t, plus sum_v dS_last * S_last at the end; d log_decay_u is its
  sum over t >= u. That sum cancels the pairs (key s, query t) with u <= s, so its rounding
  is absolute, about float32 epsilon times sum_t |q dq| + |k dk|, not relative to the
  gradient: where every decay is tiny (log-decays near -30) the true d log_decay is ~1e-13
  and comes back as rounding noise of that absolute size (tests/test_triton_chunk.py
  bounds it). Without q the same gradient is summed forwards instead, sum_v S0 * dS0 +
  sum_{s < u} k_s dk_s, where every term holds u: no cancellation at all.

Everything is computed in float32 (float32, bfloat16 and float16 inputs are read and
converted); outputs are float32, gradients are returned in the inputs' dtypes.

Launch configs: chunk=None (or "auto") lets `triton_tune` choose the chunk, the value block
BV, num_warps and the walk or the two levels of the forward among `configs()` (timed once per
key on CUDA; the default `DEFAULT_CHUNK`, geometry's BV, 4 warps and the walk elsewhere), and
the backward's BV, num_warps and kind with the forward's chunk (the kinds of the forward and
the backward are chosen independently). An explicit chunk is launched as given, with the
default BV and warps, the walk, and nothing is timed. split=True or False forces the kind.
No GPU has timed the two kinds against each other yet.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rnnc.errors import RnncError

from . import triton_gates as gates
from . import triton_tune as tune
from .triton_gates import Stream

SUB = 16                   # steps per sub-chunk: the tl.dot tile of the intra-chunk work
CHUNKS = (16, 32, 64, 128)
DEFAULT_CHUNK = 64         # the chunk when nothing is tuned (RNNC_TRITON_TUNE=0, CPU)
WARPS = 4                  # num_warps when nothing is tuned
MAX_K = 256                # key channels one program holds (beyond it the key axis is split)
MAX_BV = 64                # value channels per program (the grid's other axis)
SPLIT_K = 64               # key channels per program where the tuner tries splitting K
GRID_Y = 65535             # the most chunks a two-level launch takes (CUDA's grid y limit)
STAGE_BYTES = 112 * 1024   # shared memory the state passes' prefetched chunks may take (below)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, by sm
KERNELS = ("chunk_fwd", "chunk_bwd", "chunk_states", "chunk_out", "chunk_dstates", "chunk_dqkv",
           "chunk_dg")
_TEMPLATE = Path(__file__).resolve().parent / "templates" / "chunk_la.py.tmpl"
_modules: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


OPERANDS = ("q", "k", "v", "g")


def plain_signatures(scalar: bool = False) -> tuple:
    """The stream signatures of materialised operands (q, k, v [B, L, H, K or V]; g [B, L, H,
    K], or [B, L, H, 1] with scalar)."""
    full = (gates.PLAIN, ((True, True, True),))
    return full, full, full, (gates.PLAIN, ((True, True, not scalar),))


EXTRAS = ("e", "u", "x")   # optional streams added to o: o += e, and the bonus o_t += (sum_i u_t,i) x_t


def _operands(sigs: tuple) -> tuple:
    """(names, signatures) of a signature tuple: q, k, v, g, then (name, signature) pairs of
    the extras in use."""
    return (OPERANDS + tuple(n for n, _ in sigs[4:]),
            tuple(sigs[:4]) + tuple(sig for _, sig in sigs[4:]))


def source(sigs: tuple | None = None) -> str:
    """The kernel module's text for the operands' stream signatures (q, k, v, g, then any
    extras as (name, signature) pairs, see EXTRAS; see triton_gates; default: materialised
    operands with a decay per key channel), as it is loaded and as `rnnc compile --emit`
    shows it."""
    names, plain = _operands(sigs or plain_signatures())
    args = dict(zip(names, (gates.arg_list(n, sig) for n, sig in zip(names, plain))))
    epilogue = []
    if "u" in names:
        epilogue.append(f"acc += tl.sum(_tile_u({args['u']}b, h, H, K, ti, L, offs_k, mk, SUB), 1)"
                        f"[:, None] * _tile_x({args['x']}b, h, H, V, ti, L, offs_v, mv, SUB)")
    if "e" in names:   # once, not once per key block (me)
        epilogue.append(f"acc += _tile_e({args['e']}b, h, H, V, ti, L, offs_v, me, SUB)")
    extras = "".join(args[n] for n in names[4:])
    return gates.module_source(_TEMPLATE.read_text(), names, plain, SUB=str(SUB),
                               EXTRAS=extras, EPILOGUE=epilogue)


def kernels(sigs: tuple | None = None):
    """The kernel module for those signatures (interpreted or compiled, as TRITON_INTERPRET
    says at first use)."""
    from rnnc import cache
    sigs = sigs or plain_signatures()
    tag = ("chunk_la_interp" if _interpreting() else "chunk_la", sigs)
    if tag not in _modules:
        _modules[tag] = cache.load_module(source(sigs), tag[0])
    return _modules[tag]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def geometry(K: int, V: int, block_k: int = 0) -> tuple:
    """(BK, BV): the key tile (all K channels, or block_k of them where the key axis is
    split; tl.dot needs >= 16) and the value block, so that the state tile BK x BV stays at
    most 4096 values."""
    BK = max(16, _pow2(block_k or K))
    BV = max(16, min(_pow2(V), MAX_BV, 4096 // BK))
    return BK, BV


def key_blocks(K: int) -> tuple:
    """The key splits the tuner tries besides all K: BK = SPLIT_K where K is larger. At
    K = V = 128 (issue 6's size) a program holding all K spills 0.5-3.5 KB of registers per
    thread in the sm_90 cubins (compile_for(report=True)); one holding 64 key channels has
    half the state and operand tiles, at the price of NK partial sums of the outputs and dv
    (written, then added up) and of loading q, k and v's tiles once per key block."""
    return (SPLIT_K,) if _pow2(K) > SPLIT_K else ()


def _whole_k(K: int) -> tuple:
    """(0,) where one program may hold all K key channels (at most MAX_K), else ()."""
    return (0,) if _pow2(K) <= MAX_K else ()


def configs(K: int, V: int, L: int, chunk: int | None = None, backward: bool = False,
            has_q: bool = True) -> list:
    """Candidate launch configs: chunks from triton_tune.CHUNKS up to L rounded up to a power
    of two (or the given chunk), every legal value block (powers of two from 16 to geometry's
    BV), and the num_warps that suit the state tile (the backward holds S and dS): the walk
    first, then one two-level twin (split=True) of each (chunk, BV), with twice the walk's
    largest warps (at most 8). One, not one per warps, to keep the list (every candidate
    compiles once) well short of double; more warps because the sm_90 cubins of the split
    kernels (compile_for(report=True)) spill registers at the walk's warps and stop spilling
    (the state passes) or spill far less (chunk_out, chunk_dqkv) with more: their
    intra-chunk tiles, not the state tile, set their registers, and the grid of chunks, not
    the width of a program, gives them their parallelism. No split forward without q (the
    walk then only carries the state: it is the first level already), and none with more
    than GRID_Y chunks (the grid's second axis). Where K is large (key_blocks) the same list
    again with the key axis split (only that beyond MAX_K)."""
    if chunk is None:
        chunks = [c for c in tune.CHUNKS if c in CHUNKS and c <= max(SUB, tune.bucket(L))]
    else:
        chunks = [chunk]
    walk, split = [], []
    for bk in _whole_k(K) + key_blocks(K):
        BK, top = geometry(K, V, bk)
        for c in chunks:
            bv = top
            while bv >= 16:
                ws = tune.warps_for(BK * bv * (2 if backward else 1))
                walk += [tune.Config(c, bv, w, False, bk) for w in ws]
                if ws and (backward or has_q) and -(-L // c) <= GRID_Y:
                    split.append(tune.Config(c, bv, min(2 * max(ws), max(tune.WARPS)), True, bk))
                bv //= 2
    return walk + split


def stages(chunk: int, BK: int, BV: int, scalar: bool) -> int:
    """num_stages of the two-level state passes (chunk_states, chunk_dstates). Triton
    software-pipelines their chunk loop, prefetching the next chunks' tiles (k, v and g twice,
    or q, do and g twice: about chunk * (BK + BV + 2 KG) float32 per chunk, KG = 1 or BK as
    the decay is per head or per key channel) into shared memory; at the default 3 stages
    that is 389 KB at K = 256 per key channel, more than a block may have. The most stages
    (at most 3) whose prefetch fits STAGE_BYTES, so that two such programs can share an SM;
    1 (no prefetch) where even one chunk does not fit."""
    return _fitting_stages(chunk * (BK + BV + 2 * (1 if scalar else BK)) * 4)


def _fitting_stages(per: int) -> int:
    """The most pipeline stages (at most 3, at least 1) whose prefetch of `per` bytes per
    stage beyond the first fits STAGE_BYTES."""
    return max([1] + [n for n in (2, 3) if (n - 1) * per <= STAGE_BYTES])


def walk_stages(chunk: int, BK: int, scalar: bool) -> int:
    """num_stages of the walk kernels (chunk_fwd, chunk_bwd). With a decay per key channel
    their shared memory does not grow with the stages (3, Triton's default). With one decay
    per head Triton prefetches the next chunks' tiles and the [C, C] decay operands: about
    9 * chunk * BK float32 per stage (the sm_90 compiles measured 5.9-8.9 at K = 64, 128 and
    C = 32, 64), so at C = 64 three stages need 308 KB at K = 64 and 533 KB at K = 128, more
    than a block may have. The most stages (at most 3) whose prefetch fits STAGE_BYTES."""
    return _fitting_stages(9 * chunk * BK * 4) if scalar else 3


def default_config(K: int, V: int, chunk: int = DEFAULT_CHUNK) -> tune.Config:
    """The untuned launch: the walk, all K key channels in one program (SPLIT_K beyond
    MAX_K), geometry's value block, WARPS warps."""
    bk = 0 if _whole_k(K) else SPLIT_K
    return tune.Config(chunk, geometry(K, V, bk)[1], WARPS, False, bk)


def _check(q, k, v, log_decay, S0, chunk):
    """q (or None), k, v, log_decay: Streams (a tensor is a plain one); S0 a tensor."""
    if chunk is not None and chunk not in CHUNKS:
        raise RnncError(f"chunk must be one of {CHUNKS} (a power of two, at least the "
                        f"sub-chunk of {SUB}); got {chunk}")
    if len(k.shape) != 4:
        raise RnncError(f"k must be [B, L, H, K], got shape {tuple(k.shape)}")
    B, L, H, K = k.shape
    V = v.shape[-1]
    want = {"k": (k, (B, L, H, K)), "v": (v, (B, L, H, V)), "S0": (S0, (B, H, K, V))}
    if q is not None:
        want["q"] = (q, (B, L, H, K))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise RnncError(f"{name} has shape {tuple(t.shape)}, expected {shape} "
                            "(q, k [B, L, H, K]; v [B, L, H, V]; S0 [B, H, K, V])")
    if len(log_decay.shape) != 4 or tuple(log_decay.shape[:3]) != (B, L, H) \
            or log_decay.shape[3] not in (1, K):
        raise RnncError(f"log_decay has shape {tuple(log_decay.shape)}, expected "
                        f"{(B, L, H, K)} (per key channel) or {(B, L, H, 1)} (per head)")
    if L < 1 or B < 1 or H < 1 or K < 1 or V < 1:
        raise RnncError(f"empty problem: B, L, H, K, V = {B, L, H, K, V}")
    ts = [x for s in (q, k, v, log_decay) if s is not None for x in s.leaves] + [S0]
    for t in ts:
        if t.dtype == torch.float64:
            raise RnncError("the Triton chunked kernels compute in float32; float64 inputs "
                            "need the scan backend (backend='scan')")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RnncError(f"unsupported dtype {t.dtype} (float32, bfloat16 or float16)")
        if t.device != S0.device:
            raise RnncError("all inputs must be on the same device")
    if S0.device.type != "cuda" and not _interpreting():
        raise RnncError("the Triton chunked kernels run on CUDA tensors (or on CPU under "
                        f"TRITON_INTERPRET=1); these are on {S0.device}")


def chunk_linear_attention(q, k, v, log_decay, S0, include_current: bool = True,
                           chunk: int | str | None = None, precision: str | None = None,
                           split: bool | None = None, extra=None, bonus=None,
                           block_k: int | None = None):
    """Linear attention with diagonal decay over a block of any length L, in Triton.

    q: [B, L, H, K] or None; k: [B, L, H, K]; v: [B, L, H, V];
    log_decay: [B, L, H, K] (per key channel) or [B, L, H, 1] (one decay per head), values
    in [-inf, 0]; S0: [B, H, K, V]. q, k, v and log_decay may also be triton_gates.Streams
    (operands the kernels compute from their leaves: the spec's gates, fused).
    Returns (o, S_last): o [B, L, H, V] (None when q is None), S_last [B, H, K, V], float32.
    chunk: steps per chunk (16, 32, 64 or 128); it changes the cost, not the result. None or
    "auto": tuned (see triton_tune; the default chunk of 64 off CUDA or with RNNC_TRITON_TUNE=0).
    precision: tl.dot's operand precision, "ieee", "tf32" or "bf16" (operands rounded to
    bfloat16, float32 accumulation); None: triton_gates.dot_precision (RNNC_TRITON_DOT, by
    default TF32 on CUDA where torch allows it or an operand has bf16/fp16 leaves, else IEEE).
    split: None lets the tuner choose between the walk and the two-level kernels (the walk
    where nothing is timed); True or False forces one of them, forward and backward (a tuned
    chunk is then chosen among that kind's configs).
    block_k: None lets the tuner choose between one program holding all K key channels and a
    split of the key axis into blocks of SPLIT_K (where K is larger; all K where nothing is
    timed); 0 forces all K, a power of two from 16 up forces that split.
    extra: [B, L, H, V] (a tensor or a Stream) or None: added to o as the kernels write it
    (a term of the spec's output beside the readout, computed in the kernels); needs q.
    bonus: (u [B, L, H, K], x [B, L, H, V]) or None: o_t += (sum_i u_t,i) x_t, a term of the
    readout that pairs a step with itself (RWKV-6: u = r * u_param * k, x = v); needs q.
    Differentiable with respect to q, k, v, log_decay, extra, bonus (their leaves, for
    streams) and S0.
    """
    if chunk == "auto":
        chunk = None
    q, k, v, g, e = (gates.as_stream(x) for x in (q, k, v, log_decay, extra))
    u, x = (None, None) if bonus is None else (gates.as_stream(t) for t in bonus)
    _check(q, k, v, g, S0, chunk)
    extras = [(n, s) for n, s in zip(EXTRAS, (e, u, x)) if s is not None]
    for n, s in extras:
        want = tuple(k.shape) if n == "u" else tuple(v.shape)
        if q is None or tuple(s.shape) != want:
            what = "extra" if n == "e" else f"bonus {n}"
            raise RnncError(f"chunk_linear_attention: {what} must be {list(want)} and needs q, "
                            f"got {list(s.shape)}{' without q' if q is None else ''}")
    if precision is not None and precision not in ("ieee", "tf32", "bf16"):
        raise RnncError(f"precision must be 'ieee', 'tf32' or 'bf16', got {precision!r}")
    if precision is None or precision == "bf16":
        precision = gates.dot_precision([S0, *(x for s in (q, k, v, g) if s is not None
                                              for x in s.leaves)], precision)
    has_q = q is not None
    if block_k is not None and block_k != 0 and (block_k < 16 or block_k & (block_k - 1)):
        raise RnncError(f"block_k must be 0 (all K) or a power of two >= 16, got {block_k}")
    if block_k == 0 and not _whole_k(k.shape[-1]):
        raise RnncError(f"block_k=0 holds all K = {k.shape[-1]} key channels in one program "
                        f"(at most {MAX_K}); leave block_k unset or split the keys")
    cfg = (bool(include_current), None if chunk is None else int(chunk), precision, has_q,
           None if split is None else bool(split), None if block_k is None else int(block_k))
    streams = (q if has_q else k, k, v, g, *(s for _, s in extras))
    meta, leaves = gates.pack(streams, _used(has_q, len(streams)))
    o, S_last = _ChunkLA.apply(cfg, (meta, tuple(n for n, _ in extras)), S0, *leaves)
    return (o if has_q else None), S_last


def _used(has_q, n: int = 4) -> tuple:
    """Which of the n streams (q, k, v, g, then the extras) pass their own leaves (without q,
    k stands for it)."""
    return (has_q,) + (True,) * (n - 1)


class _Ops:
    """The operand streams of one call (q, k, v, g, then the extras named in `extras`), and
    what launching them needs."""

    def __init__(self, meta, leaves, has_q):
        meta, self.extras = meta
        self.used = _used(has_q, len(meta))
        q, k, v, g, *extra = gates.unpack(meta, leaves, self.used)
        q = q if has_q else Stream(k.code, k.leaves, k.kinds, k.shape)
        streams = (q, k, v, g, *extra)
        self.q, self.k, self.v, self.g = streams[:4]
        self.streams = streams
        self.sigs = tuple(s.signature for s in streams[:4]) + tuple(
            (n, s.signature) for n, s in zip(self.extras, extra))
        self.leaves = [x for s in streams for x in s.leaves]
        B, L, H, K = self.k.shape
        self.dims = (B, L, H, K, self.v.shape[-1])
        self.scalar = not self.g.per_channel
        self.device = self.leaves[0].device if self.leaves else None


def _launch_dims(ops: _Ops, c: tune.Config):
    """B, L, H, K, V, BK, NK (key blocks), NV (value blocks), NC (chunks), scalar."""
    B, L, H, K, V = ops.dims
    BK = geometry(K, V, c.block_k)[0]
    return B, L, H, K, V, BK, -(-K // BK), -(-V // c.block_v), -(-L // c.chunk), ops.scalar


def _key(family, ops: _Ops, dtypes, *flags):
    B, L, H, K, V = ops.dims
    return (family, B, H, K, V, tune.bucket(L), tuple(str(d) for d in dtypes), ops.sigs, *flags,
            tune.device_tag(ops.device))


def _stores(c: tune.Config, has_q, store) -> bool:
    """Whether the forward with config c writes the per-chunk states: when training, and
    always for a two-level forward with outputs (its second level reads them)."""
    return store or (c.split and has_q)


def _forward_buffers(c: tune.Config, ops: _Ops, has_q, store):
    """(o, S_last, states) for config c: o [NK, B, L, H, V], one partial sum per key block
    (_summed); the stored states are per chunk of c."""
    B, L, H, K, V, BK, NK, NV, NC, scalar = _launch_dims(ops, c)
    f32 = dict(dtype=torch.float32, device=ops.device)
    return (torch.empty(NK, B, L, H, V, **f32) if has_q else torch.empty(0, **f32),
            torch.empty(B, H, K, V, **f32),
            torch.empty(B, H, NC, K, V, **f32) if _stores(c, has_q, store)
            else torch.empty(1, **f32))


def _forward(c: tune.Config, cfg, ops: _Ops, S0, store, out):
    """Launch the forward with config c into out = (o, S_last, states): chunk_fwd (the walk),
    or chunk_states then (with q) chunk_out (two levels)."""
    include, _, prec, has_q, *_ = cfg
    B, L, H, K, V, BK, NK, NV, NC, scalar = _launch_dims(ops, c)
    o, S_last, states = out
    ker = kernels(ops.sigs)
    if c.split:
        ker.chunk_states[(NK * NV, B * H)](
            *ops.leaves, S0, S_last, states, L, H, K, V, NC, C=c.chunk, BK=BK, BV=c.block_v,
            SCALAR=scalar, STORE=_stores(c, has_q, store), PREC=prec, num_warps=c.warps,
            num_stages=stages(c.chunk, BK, c.block_v, scalar))
        if has_q:
            ker.chunk_out[(NK * NV, NC, B * H)](
                *ops.leaves, o, states, L, H, K, V, NC, C=c.chunk, BK=BK, BV=c.block_v,
                DELTA=0 if include else 1, SCALAR=scalar, PREC=prec, num_warps=c.warps)
        return
    ker.chunk_fwd[(NK * NV, B * H)](
        *ops.leaves, S0, o if has_q else S_last, S_last, states, L, H, K, V, NC,
        C=c.chunk, BK=BK, BV=c.block_v, DELTA=0 if include else 1, SCALAR=scalar, HAS_Q=has_q,
        STORE=store, PREC=prec, num_warps=c.warps, num_stages=walk_stages(c.chunk, BK, scalar))


def _backward_buffers(c: tune.Config, ops: _Ops, has_q):
    """(dq, dk, dv, dS0, dstates): dq, dk [NV, B, L, H, K] and dv [NK, B, L, H, V], one share
    per value or key block (_summed); dstates (dL/dS at the end of every chunk) for two
    levels."""
    B, L, H, K, V, BK, NK, NV, NC, scalar = _launch_dims(ops, c)
    f32 = dict(dtype=torch.float32, device=ops.device)
    dq = torch.zeros(NV, B, L, H, K, **f32) if has_q else torch.empty(1, **f32)
    return (dq, torch.empty(NV, B, L, H, K, **f32), torch.empty(NK, B, L, H, V, **f32),
            torch.empty(B, H, K, V, **f32),
            torch.empty(B, H, NC, K, V, **f32) if c.split else torch.empty(1, **f32))


def _backward(c: tune.Config, cfg, ops: _Ops, do, dS_last, states, out):
    """Launch the backward with config c (its chunk: the forward's) into out = (dq, dk, dv,
    dS0, dstates): chunk_bwd (the walk), or chunk_dstates then chunk_dqkv (two levels)."""
    include, _, prec, has_q, *_ = cfg
    B, L, H, K, V, BK, NK, NV, NC, scalar = _launch_dims(ops, c)
    dq, dk, dv, dS0, dstates = out
    ker = kernels(ops.sigs)
    if c.split:
        flags = dict(C=c.chunk, BK=BK, BV=c.block_v, DELTA=0 if include else 1, SCALAR=scalar,
                     HAS_Q=has_q, PREC=prec, num_warps=c.warps)
        ker.chunk_dstates[(NK * NV, B * H)](
            *ops.leaves, do, dS_last, dstates, dS0, L, H, K, V, NC, **flags,
            num_stages=stages(c.chunk, BK, c.block_v, scalar))
        ker.chunk_dqkv[(NK * NV, NC, B * H)](*ops.leaves, do, states, dstates, dq, dk, dv,
                                              L, H, K, V, NC, **flags)
        return
    ker.chunk_bwd[(NK * NV, B * H)](
        *ops.leaves, do, dS_last, states, dq, dk, dv, dS0, L, H, K, V, NC,
        C=c.chunk, BK=BK, BV=c.block_v, DELTA=0 if include else 1, SCALAR=scalar, HAS_Q=has_q,
        PREC=prec, num_warps=c.warps, num_stages=walk_stages(c.chunk, BK, scalar))


def _only(cands: list, split: bool | None, block_k: int | None = None) -> list:
    """The configs of one kind (split True or False) and key block (block_k; 0: all K), made
    so where the list has none; all of them for None."""
    for field, want in (("split", split), ("block_k", block_k)):
        if want is not None:
            cands = [c for c in cands if getattr(c, field) == want] or \
                [c._replace(**{field: want}) for c in cands]
    return cands


def _backward_default(K: int, V: int, chunk: int, split, block_k) -> tune.Config:
    """The backward's untuned config at the forward's chunk, of the kind and key block the
    call forces (if any)."""
    return _only([default_config(K, V, chunk)], split, block_k)[0]


def _summed(parts: torch.Tensor) -> torch.Tensor:
    """[N, ...] partial sums (per key or value block) -> [...]: the one share as it is."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def _extra_grads(ops: _Ops, do) -> list:
    """The gradients of the extra streams from o's, do [B, L, H, V]: e's is do; the bonus
    o_t += (sum_i u_t,i) x_t gives du_t,i = do_t . x_t and dx_t = do_t sum_i u_t,i."""
    out = []
    named = dict(zip(ops.extras, ops.streams[4:]))
    for n in ops.extras:
        if n == "e":
            out.append(do)
        elif n == "u":
            x = named["x"].value().expand(do.shape)
            out.append((do * x).sum(-1, keepdim=True).expand(ops.k.shape))
        else:
            u = named["u"].value().expand(ops.k.shape)
            out.append(do * u.sum(-1, keepdim=True))
    return out


class _ChunkLA(torch.autograd.Function):
    """(cfg, meta, S0, *leaves) -> (o, S_last); cfg = (include_current, chunk (None: tuned),
    precision, has_q, split (None: either), block_k (None: either)); meta: ((code, kinds,
    shape) of the q, k, v, g streams and then of the extras, the extras' names (EXTRAS)); their
    leaves follow in that order (without q's when has_q is False: q then stands for k, and o
    is an empty tensor)."""

    @staticmethod
    def forward(ctx, cfg, meta, S0, *leaves):
        include, chunk, prec, has_q, split, block_k = cfg
        dtypes = [t.dtype for t in leaves]
        S0 = S0.contiguous()
        ops = _Ops(meta, [t.contiguous() for t in leaves], has_q)
        store = any(ctx.needs_input_grad)
        L, K, V = ops.dims[1], ops.dims[3], ops.dims[4]
        if chunk is None:
            key = _key("chunk_la.fwd", ops, dtypes, include, has_q, store, prec, split, block_k)

            def bench(c):   # the launches and the sum of the key blocks' outputs
                out = _forward_buffers(c, ops, has_q, store)
                fwd = lambda: (_forward(c, cfg, ops, S0, store, out),  # noqa: E731
                               has_q and _summed(out[0]))
                if not store:
                    return fwd
                # training: the chunk chosen here is the backward's too, so each candidate is
                # timed with the backward it implies (its default config at that chunk)
                cb = _backward_default(K, V, c.chunk, split, block_k)
                back = _backward_buffers(cb, ops, has_q)
                dS = torch.zeros_like(out[1])
                do = out[0].new_zeros(ops.dims[:3] + (V,)) if has_q else dS
                return lambda: (fwd(), _backward(cb, cfg, ops, do, dS, out[2], back),
                                _summed(back[2]))
            cands = configs(K, V, L, has_q=has_q or bool(split))
            c = tune.choose(key, _only(cands, split, block_k),
                            _only([default_config(K, V)], split, block_k)[0], bench, ops.device)
        else:
            c = _only([default_config(K, V, chunk)], split, block_k)[0]
        o, S_last, states = out = _forward_buffers(c, ops, has_q, store)
        _forward(c, cfg, ops, S0, store, out)
        if has_q:
            o = _summed(o)
        ctx.cfg, ctx.meta, ctx.chunk, ctx.dtypes, ctx.s0_dtype = cfg, meta, c.chunk, dtypes, S0.dtype
        if store:   # S_last for d log_decay with q, S0 without
            ctx.save_for_backward(states, S_last if has_q else S0, *leaves)
        if not has_q:
            ctx.mark_non_differentiable(o)
        return o, S_last

    @staticmethod
    def backward(ctx, do, dS_last):
        include, tuned, prec, has_q, split, block_k = ctx.cfg
        tuned = tuned is None
        states, S_end, *leaves = ctx.saved_tensors
        ops = _Ops(ctx.meta, [t.contiguous() for t in leaves], has_q)
        B, L, H, K, V = ops.dims
        BK = geometry(K, V)[0]
        f32 = dict(dtype=torch.float32, device=S_end.device)
        if dS_last is None:
            dS_last = torch.zeros(B, H, K, V, **f32)
        if has_q:
            do = torch.zeros(B, L, H, V, **f32) if do is None else do.contiguous()
        else:
            do = dS_last   # never read
        dS_last = dS_last.contiguous()
        # the chunk is the forward's: `states` holds the state entering each of its chunks
        c = _backward_default(K, V, ctx.chunk, split, block_k)
        if tuned:
            key = _key("chunk_la.bwd", ops, ctx.dtypes, ctx.chunk, include, has_q, prec, split,
                       block_k)

            def bench(c):   # the launches and the sum of the key blocks' dv
                out = _backward_buffers(c, ops, has_q)
                return lambda: (_backward(c, ctx.cfg, ops, do, dS_last, states, out),
                                _summed(out[2]))
            cands = _only(configs(K, V, L, ctx.chunk, backward=True), split, block_k)
            c = tune.choose(key, cands, c, bench, ops.device)
        dq, dk, dv, dS0, _ = out = _backward_buffers(c, ops, has_q)
        _backward(c, ctx.cfg, ops, do, dS_last, states, out)
        dq = _summed(dq) if has_q else None
        dk, dv = _summed(dk), _summed(dv)
        # [B, H, K]: the pairs through S_last (with q) or from S0 (without), see chunk_dg
        sl = (dS_last.float() * S_end if has_q else dS0 * S_end.float()).sum(-1).contiguous()
        dg = torch.empty(B, L, H, 1 if ops.scalar else K, **f32)
        kernels(ops.sigs).chunk_dg[(B * H,)](
            *ops.leaves, dq if has_q else dk, dk, sl, dg, L, H, K, -(-L // SUB), C=SUB, BK=BK,
            DELTA=0 if include else 1, SCALAR=ops.scalar, HAS_Q=has_q, num_warps=WARPS)
        grads = gates.grads(ops.streams, (dq, dk, dv, dg, *_extra_grads(ops, do)), ops.used,
                            ctx.needs_input_grad[3:])
        return (None, None, dS0.to(ctx.s0_dtype) if ctx.needs_input_grad[2] else None, *grads)


def compile_for(K: int = 64, V: int = 64, chunk: int = 64, scalar: bool = False,
                include_current: bool = True, has_q: bool = True, precision: str = "tf32",
                arch: int = 90, block_v: int | None = None, warps: int = WARPS,
                names=KERNELS, report: bool = False, sigs: tuple | None = None,
                dtype: str = "fp32", block_k: int = 0) -> dict:
    """Compile the kernels (the walk's chunk_fwd and chunk_bwd, the two levels' chunk_states,
    chunk_out, chunk_dstates and chunk_dqkv, and chunk_dg) for an NVIDIA target without a GPU
    (Triton runs its whole pipeline down to a cubin on the CPU), with the launch options the
    Python side uses (num_stages of the state passes: `stages`). Raises RnncError where a
    kernel needs more shared memory than a block of that sm may have (SHARED_LIMIT), which
    otherwise only a launch on the GPU would find. `names`: the kernels to compile (all of
    KERNELS by default). Returns {kernel name: cubin size}, or with
    report {kernel name: {"cubin", "shared", "regs", "stack"}}: registers per thread and stack
    bytes (spills) from the cubin, through the cuobjdump that Triton bundles (None where it
    is missing). sigs: the operands' stream signatures (default: materialised operands, the
    decay per head with scalar); scalar must agree with them. dtype: the leaves' element type
    ("fp32", "bf16" or "fp16"; everything else is float32). precision: the products' operand
    precision ("tf32", "ieee" or "bf16", as chunk_linear_attention's). block_k: the key
    channels per program (0: all K; chunk_dg always takes all K). Run it without
    TRITON_INTERPRET (interpreted kernels do not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if _interpreting():
        raise RnncError("compile_for needs a process without TRITON_INTERPRET")
    BK, BV = geometry(K, V, block_k)
    BV = block_v or BV
    const = dict(C=chunk, BK=BK, BV=BV, DELTA=0 if include_current else 1, SCALAR=scalar,
                 HAS_Q=has_q, STORE=True, PREC=precision)
    ints = {"L", "H", "K", "V", "NC"}
    sigs = sigs or plain_signatures(scalar)
    ker = kernels(sigs)
    leaves = {f"{op}_{j}" for op, sig in zip(*_operands(sigs)) for j in range(len(sig[1]))}
    out = {}
    for name in names:
        fn = getattr(ker, name)
        dg = {"C": SUB, "BK": geometry(K, V)[0]} if name == "chunk_dg" else {}
        c = {a: dg.get(a, const[a]) for a in fn.arg_names if a in const}
        sig = {a: "constexpr" if a in c else "i32" if a in ints else
               f"*{dtype}" if a in leaves else "*fp32" for a in fn.arg_names}
        opts = dict(num_warps=WARPS if name == "chunk_dg" else warps)
        if name in ("chunk_states", "chunk_dstates"):
            opts["num_stages"] = stages(chunk, BK, BV, scalar)
        elif name in ("chunk_fwd", "chunk_bwd"):
            opts["num_stages"] = walk_stages(chunk, BK, scalar)
        src = ASTSource(fn=fn, signature=sig, constexprs=c)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        shared = k.metadata.shared
        if shared > SHARED_LIMIT.get(arch, shared):
            raise RnncError(f"{name} needs {shared} bytes of shared memory at K={K}, BV={BV}, "
                            f"chunk={chunk}; sm_{arch} has {SHARED_LIMIT[arch]} per block")
        cubin = k.asm["cubin"]
        out[name] = dict(cubin=len(cubin), shared=shared, **gates.cubin_usage(cubin)) if report \
            else len(cubin)
    return out
