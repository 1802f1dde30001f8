"""Numerical primitives of the scan backend: one block of a recurrence at a time.

The backend walks over time in blocks and calls these once per block, passing the state
carried out of the previous block. The matrix-state kernels (chunk_linear_attention,
chunk_delta_rule) take a block of any length and cut it into chunks themselves: all the
work inside the chunks is batched over the chunks, and only the state is passed from chunk
to chunk sequentially, so a long block costs a few large tensor operations plus one small
update per chunk. Everything here is plain PyTorch, so autograd differentiates it, and it
runs unchanged on any device and in float32 or float64.

Shape letters: B batch, L block length (any L >= 1), H heads, K key channels, V value
channels, S the elementwise state shape of a diagonal recurrence, n the state size of a
dense one.

Stability rule kept throughout: a decay enters only as exp(x) with x a sum of log-decays
over some time segment, hence x <= 0, or as a product of the decays exp(x_u) <= 1 of such
a segment. Each such sum or product is accumulated from the segment's own terms (a masked
cumulative sum, a prefix or suffix sum inside a block, products of the halves of a block),
never as the difference of two prefix sums nor as a quotient: that keeps float32 rounding
relative to the segment rather than to the whole chunk, and log-decays of -inf (decays of
exactly 0) give exp(-inf) = 0 without ever meeting (-inf) - (-inf) or 0 / 0. Masks select
(torch.where, triu), never multiply a possibly infinite value with 0.
"""
from __future__ import annotations

import math

import torch

__all__ = ["linear_scan", "maxplus_scan", "chunk_linear_attention", "chunk_delta_rule",
           "chunk_dplr", "dense_scan"]

# --------------------------------------------------------------------------- helpers

def _decay_matrix(x: torch.Tensor) -> torch.Tensor:
    """Causal decay matrix of log-decays, key index first: x [..., N] -> [..., N, N] with
    out[..., s, t] = exp(sum_{s < u <= t} x[..., u]) for t >= s (1 on the diagonal) and 0
    for t < s.

    The segment sums are cumulative sums along the rows of the masked matrix, adding x[u]
    for s < u <= t only: no prefix sums are subtracted, so -inf entries stay harmless (the
    entries below the diagonal are sums of nothing, exp(0) = 1, and are zeroed after the
    exp). The key index comes first so that the cumulative sum runs along the contiguous
    last axis (several times faster on CPU than along the second to last); the consumers
    take the transposed products (K Q^T instead of Q K^T), which BLAS reads as they lie.
    """
    N = x.shape[-1]
    seg = torch.triu(x.unsqueeze(-2).expand(*x.shape[:-1], N, N), 1).cumsum(-1)
    return torch.exp(seg).triu()


def _suffix_exclusive(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[t] = sum_{u > t} x[u] along dim, summed directly (no total minus prefix)."""
    inc = x.flip(dim).cumsum(dim).flip(dim)
    last = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([inc.narrow(dim, 1, x.shape[dim] - 1), last], dim)


# --------------------------------------------------------------------------- 1. diagonal

def _align(a, b, h0, who):
    """a and b of a diagonal scan brought to a common shape; a stays a broadcast view.

    a keeps its own size-1 axes (except time, which the tree indexes), so per-level
    products of a cost only what a really holds; b takes the full output shape.
    """
    if a.dim() != b.dim() or h0.dim() != b.dim() - 1:
        raise ValueError(f"{who}: a {tuple(a.shape)}, b {tuple(b.shape)} and state "
                         f"{tuple(h0.shape)} need [B, L, *S], [B, L, *S] and [B, *S]")
    shape = torch.broadcast_shapes(a.shape, b.shape, h0.unsqueeze(1).shape)
    L = shape[1]
    if a.shape[1] != L:
        a = a.expand(a.shape[0], L, *a.shape[2:])
    if b.shape != shape:
        b = b.expand(shape)
    return a, b


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor):
    """h_t = a_t * h_{t-1} + b_t, elementwise, over one chunk.

    a: [B, L, *S], or broadcastable to b's shape (size-1 axes, including L);
    b: [B, L, *S]; h0: [B, *S].
    Returns (h, h_last): h [B, L, *S] holds every state of the chunk, h_last = h[:, -1].

    Two levels: the chunk is cut into n sub-chunks of `sub` ~ sqrt(L) steps; all sub-chunks
    step together from a zero state (sub vectorised steps, each touching 1/sub of the data,
    also accumulating the product of a), then the n sub-chunk carries are chained and added
    back in one pass. Only products and sums, so it is exact for any sign of a, zeros
    included. On CPU it moves several times less data than a Hillis-Steele tree (which
    rewrites the whole chunk at each of log2 L levels): 4-13x faster forward and 6-10x
    forward+backward at B=4, L=64..512, S=[256] and [256, 16].
    """
    L = b.shape[1]
    if a.dim() < b.dim():
        raise ValueError(f"linear_scan: a has shape {tuple(a.shape)}, b {tuple(b.shape)}; "
                         "a needs b's number of axes")
    a = a.expand_as(b)
    if not _needs_grad(a, b, h0):
        return _linear_scan_nograd(a, b, h0)
    B, S = b.shape[0], b.shape[2:]
    sub = max(1, math.isqrt(L - 1) + 1) if L > 1 else 1
    n = -(-L // sub)
    pad = n * sub - L
    if pad:  # identity steps at the end leave the states before them untouched
        a = torch.cat([a, a.new_ones(B, pad, *S)], 1)
        b = torch.cat([b, b.new_zeros(B, pad, *S)], 1)
    # unbind, not a[:, :, t]: its backward is one stack instead of a full-size zero
    # gradient per step.
    a_t = a.reshape(B, n, sub, *S).unbind(2)
    b_t = b.reshape(B, n, sub, *S).unbind(2)
    h, P = b_t[0], a_t[0]
    hs, Ps = [h], [P]
    for t in range(1, sub):
        h = torch.addcmul(b_t[t], a_t[t], h)
        P = P * a_t[t]
        hs.append(h)
        Ps.append(P)
    local = torch.stack(hs, 2)   # [B, n, sub, *S], each sub-chunk from a zero state
    prods = torch.stack(Ps, 2)   # running products of a inside each sub-chunk
    c, carries = h0, []
    for hj, pj in zip(h.unbind(1), P.unbind(1)):
        carries.append(c)
        c = torch.addcmul(hj, pj, c)
    incoming = torch.stack(carries, 1).unsqueeze(2)
    out = torch.addcmul(local, prods, incoming).reshape(B, n * sub, *S)[:, :L]
    return out, out[:, -1]


def _linear_scan_nograd(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor):
    """linear_scan without autograd: a (a broadcast view), b [B, L, *S], h0 [B, *S] ->
    (h [B, L, *S], h[:, -1]), every step written in place into one output tensor.

    Three passes instead of the two levels' stacked copies: the n sub-chunks of `sub` steps
    step together to get only their end values from a zero state and the products of their
    a (two running [B, n, *S] tensors); the n carries are chained; then the sub-chunks step
    together once more from their true incoming states, straight into the output. So a and
    b are read twice but the output is written once, with nothing of the chunk's size
    allocated besides it: 1.5-1.6x faster than the autograd form (its stacks) at B=4, L=64,
    S=[256, 16] and L=1024, S=[256] on 2 CPU threads, and as fast at L=64, S=[256]. Every
    state is the step's own a_t h + b_t from the state before it, as in the sequential loop;
    only the states entering the sub-chunks come through the products of a (so the results
    differ from the autograd form's by rounding only). The last L mod sub steps run one at a
    time.
    """
    B, L = b.shape[:2]
    S = b.shape[2:]
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), h0.dtype)
    out = torch.empty(b.shape, dtype=dtype, device=b.device)
    # sub = sqrt(L), at most 16: the first and third passes take 2 sub steps over n*B*S
    # elements each, the chain n steps over B*S. Measured on 2 threads, s6 and minGRU forward
    # at B=4, T=4096 (blocks of 64 steps of [256, 16] and 1024 of [256]): sub=16 and 8 within
    # noise at L=64, 4 slower; at L=1024 16 beat 8 and 32 by 5-15%.
    sub = min(16, math.isqrt(L))
    n = L // sub if sub > 1 else 0
    main = n * sub
    prev = h0
    if n > 1:
        # unbind, not indexing: one call makes all the views (Python indexing per step cost
        # about as much as the steps at S=[256]).
        a_t = a[:, :main].unflatten(1, (n, sub)).unbind(2)        # sub x [B, n, *S]
        b_t = b[:, :main].unflatten(1, (n, sub)).unbind(2)
        # the first step from the zero state is b_t[0] itself: start at the second (no copies)
        h = torch.addcmul(b_t[1], a_t[1], b_t[0]).to(dtype)
        P = torch.mul(a_t[0], a_t[1]).to(dtype)
        for t in range(2, sub):
            torch.addcmul(b_t[t], a_t[t], h, out=h)
            P.mul_(a_t[t])
        inc = out.new_empty(B, n + 1, *S)                         # inc[:, j]: into sub-chunk j
        inc[:, 0] = h0
        inc_j, h_j, P_j = inc.unbind(1), h.unbind(1), P.unbind(1)
        for j in range(n):
            torch.addcmul(h_j[j], P_j[j], inc_j[j], out=inc_j[j + 1])
        o_t = out[:, :main].unflatten(1, (n, sub)).unbind(2)
        prev = inc[:, :n]
        for t in range(sub):
            torch.addcmul(b_t[t], a_t[t], prev, out=o_t[t])
            prev = o_t[t]
        prev = inc_j[n]
    else:
        main = 0
    if main < L:
        a_r, b_r, o_r = a[:, main:].unbind(1), b[:, main:].unbind(1), out[:, main:].unbind(1)
        for t in range(L - main):
            torch.addcmul(b_r[t], a_r[t], prev, out=o_r[t])
            prev = o_r[t]
    return out, out[:, -1]


def _needs_grad(*ts) -> bool:
    """Whether autograd records operations on any of the tensors ts (None skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# --------------------------------------------------------------------------- 2. max-plus

def maxplus_scan(a: torch.Tensor, b: torch.Tensor, m0: torch.Tensor):
    """m_t = max(m_{t-1} + a_t, b_t), elementwise, over one chunk.

    a: [B, L, *S] or broadcastable to b's shape (size-1 axes, including L);
    b: [B, L, *S]; m0: [B, *S]. Any of them may hold -inf (a = -inf is a hard reset).
    Returns (m, m_last): m [B, L, *S], m_last = m[:, -1].

    A Hillis-Steele tree scan in the (max, +) semiring, composing
    (a2, b2) o (a1, b1) = (a1 + a2, max(b1 + a2, b2)).
    The closed form A_t + max(m0, cummax_s(b_s - A_s)) (A = cumsum of a) is the same maths,
    but it adds and then removes |A_s|: in float32 at log-decays near -30 per step that loses
    ~1e-4 relative, and a = -inf turns it into -inf + inf = NaN. The tree only ever adds
    segment sums to values of their own size and never subtracts, so it stays at float
    rounding and -inf passes through unchanged.
    """
    a, b = _align(a, b, m0, "maxplus_scan")
    L = b.shape[1]
    x = m0.unsqueeze(1) + a[:, :1]
    b = torch.cat([torch.where((x > b[:, :1]) | x.isnan(), x, b[:, :1]), b[:, 1:]], 1)
    d = 1
    while d < L:
        # As in linear_scan, with -inf and 0 as the identities entering at the front.
        # torch.where rather than torch.maximum: its backward is a single select (a tie
        # sends the whole gradient to one side, a valid subgradient), which halved the
        # backward time on CPU against maximum's tie-splitting backward. A NaN wins, as in
        # torch.maximum (and so in the sequential backend).
        x = torch.cat([torch.full_like(b[:, :d], float("-inf")), b[:, :-d]], 1) + a
        b = torch.where((x > b) | x.isnan(), x, b)
        if 2 * d < L:
            a = a + torch.cat([torch.zeros_like(a[:, :d]), a[:, :-d]], 1)
        d *= 2
    return b, b[:, -1]


# --------------------------------------------------------------------------- blocks of chunks
# The matrix-state kernels take a block of any length L and cut it into nc chunks of c
# steps. Everything inside a chunk is computed for all chunks at once (nc is one more batch
# axis of the same matmuls); only the passing of the state from chunk to chunk is
# sequential, one small update per chunk.

def _chunking(L: int, chunk: int, pow2: bool = False):
    """(nc, c): nc = ceil(L / chunk) chunks of c = ceil(L / nc) <= chunk steps, so the padding
    after the end is under nc steps. pow2 rounds c up to a power of two (the recursive
    halving of the per-channel decay needs it) and recounts nc."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    nc = max(1, -(-L // chunk))
    c = max(1, -(-L // nc))
    if pow2:
        c = 1 << (c - 1).bit_length()
        nc = max(1, -(-L // c))
    return nc, c


def _to_blocks(x: torch.Tensor, nc: int, c: int) -> torch.Tensor:
    """[B, L, H, D] -> [B, H, nc, c, D], zero-padded after the end of the block, contiguous
    (the kernels use each input in several matmuls, which would each copy a strided one)."""
    x = x.transpose(1, 2)
    pad = nc * c - x.shape[2]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(*x.shape[:2], nc, c, x.shape[-1]).contiguous()


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may be views of the same memory."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _from_blocks(o: torch.Tensor, L: int) -> torch.Tensor:
    """[B, H, nc, c, V] -> [B, L, H, V], the padding dropped."""
    B, H, nc, c, V = o.shape
    return o.reshape(B, H, nc * c, V)[:, :, :L].transpose(1, 2)


def _baddmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b for [..., n, m] tensors with equal batch shapes, in one baddbmm."""
    return torch.baddbmm(c.flatten(0, -3), a.flatten(0, -3), b.flatten(0, -3)).view(c.shape)


def _chain_diag(a: torch.Tensor, dS: torch.Tensor, S0: torch.Tensor):
    """S_{j+1} = a_j * S_j + dS_j over the chunks j (elementwise, a broadcast).

    a: [B, H, nc, 1 or K, 1]; dS: [B, H, nc, K, V]; S0: [B, H, K, V].
    Returns (S_in, S_last): S_in [B, H, nc, K, V] the state entering each chunk.
    """
    B, H, nc, K, V = dS.shape
    if nc == 1:
        return S0.unsqueeze(2), a[:, :, 0] * S0 + dS[:, :, 0]
    # A plain loop: each step touches one state, while linear_scan's two levels would make
    # several passes over all nc states (measured slower here, where a state is large).
    if not _needs_grad(a, dS, S0):  # each state written where it is read, no stack
        S_in = dS.new_empty(B, H, nc, K, V)  # contiguous: the readout's baddbmm takes it as is
        S_in[:, :, 0] = S0
        a_j, d_j, S_j = a.unbind(2), dS.unbind(2), S_in.unbind(2)
        for j in range(nc - 1):
            torch.addcmul(d_j[j], a_j[j], S_j[j], out=S_j[j + 1])
        return S_in, torch.addcmul(d_j[-1], a_j[-1], S_j[-1])
    S, ins = S0, []
    for aj, dj in zip(a.unbind(2), dS.unbind(2)):
        ins.append(S)
        S = torch.addcmul(dj, aj, S)
    return torch.stack(ins, 2), S


def _chain_dense(M: torch.Tensor, dS: torch.Tensor, S0: torch.Tensor):
    """S_{j+1} = M_j S_j + dS_j over the chunks j; M: [B, H, nc, K, K], otherwise as
    _chain_diag. One [K, K] @ [K, V] product per chunk and head."""
    B, H, nc, K, V = dS.shape
    if nc == 1:
        return S0.unsqueeze(2), M[:, :, 0] @ S0 + dS[:, :, 0]
    S = S0.expand(B, H, K, V).reshape(B * H, K, V)
    ins = []
    # unbind: one stack in the backward instead of a zero-filled gradient per chunk.
    for Mj, dj in zip(M.reshape(B * H, nc, K, K).unbind(1), dS.reshape(B * H, nc, K, V).unbind(1)):
        ins.append(S)
        S = torch.baddbmm(dj, Mj, S)
    return torch.stack(ins, 1).reshape(B, H, nc, K, V), S.reshape(B, H, K, V)


# Chunks per group: the per-chunk tensors of a whole long block ([B, H, nc, c, c], 16 MiB at
# B=4, H=4, L=4096, c=64 in float32) fall out of the CPU caches, and each elementwise pass
# over them then runs at memory speed: one 4096-step block ran 1.5-2x slower than the same
# work in groups. So a long block is worked through in groups of chunks, each group batched
# over its chunks, the state passed from group to group: about _GROUP_ELEMENTS elements per
# [B, H, chunks, c, c] tensor (512 KiB in float32), at least one chunk per group. Small
# problems (few heads, small chunks) get many chunks per group, which is where batching
# saves the most per-operation overhead. Measured on a 1 MiB-L2 CPU, one thread, B=4, H=4,
# c=64, forward and forward+backward at L=512 and 4096: 2^17 and 2^18 best (within noise of
# each other), 2^15 and 2^19 5-30% slower, whole blocks (2^22) up to 2x slower. Re-measured
# with 2 threads (gla, B=4, H=4, T=4096, forward): 2^18 5-10% faster than 2^17, 2^19 within
# noise of 2^18; retnet and gated_deltanet within noise; gla forward+backward at T=1024
# within noise.
_GROUP_ELEMENTS = 1 << 18


def _in_groups(core, xs, S0, L, c, BH):
    """Runs core(*xs sliced to a group of chunks, S) -> (o, S) over the block, the state
    carried from group to group; xs hold [B, L, ...] tensors or None."""
    step = c * max(1, _GROUP_ELEMENTS // (BH * c * c))
    if step >= L:
        return core(*xs, S0)
    # split, not slicing: its backward is one cat, where each slice's backward would fill a
    # full-size zero gradient.
    parts = [[None] * -(-L // step) if x is None else x.split(step, 1) for x in xs]
    S, os_ = S0, []
    if not _needs_grad(S0, *xs):  # each group's outputs copied into place while in cache
        for t0, group in zip(range(0, L, step), zip(*parts)):
            o, S = core(*group, S)
            if o is None:
                continue
            if not os_:
                os_.append(o.new_empty(o.shape[0], L, *o.shape[2:]))
            os_[0][:, t0:t0 + o.shape[1]] = o
        return (os_[0] if os_ else None), S
    for group in zip(*parts):
        o, S = core(*group, S)
        os_.append(o)
    return (None if os_[0] is None else torch.cat(os_, 1)), S


# --------------------------------------------------------------------------- 3. linear attn

def chunk_linear_attention(q, k, v, log_decay, S0, include_current: bool = True,
                           chunk: int = 64):
    """Linear attention with diagonal decay over a block of any length L.

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T, and o_t = S_t^T q_t
    (include_current=True) or o_t = S_{t-1}^T q_t (include_current=False).

    q: [B, L, H, K] or None; k: [B, L, H, K]; v: [B, L, H, V];
    log_decay: [B, L, H, K] (per key channel) or [B, L, H, 1] (one decay per head);
    S0: [B, H, K, V].
    Returns (o, S_last): o [B, L, H, V] (None when q is None), S_last [B, H, K, V].

    The block is cut into chunks of at most `chunk` steps (a power of two for the
    per-channel decay; the end padded with identity steps: zero q, k, v and log-decays).
    Per chunk, all chunks at once: the outputs from a zero state, the chunk's own
    contribution dS to the state, its total decay exp(G_c) and the effective queries
    q_t * exp(G_t) (G_{t-1} without the current step) that read the incoming state. Then
    S_in_{j+1} = exp(G_c) * S_in_j + dS_j is chained over the chunks (a loop, one small
    update per chunk) and o = o_local + q_eff @ S_in, again for all chunks at once. Long
    blocks go through this in groups of chunks that fit the CPU caches (_GROUP_ELEMENTS).
    `chunk` changes only the cost (and float rounding), never the result.
    """
    B, L, H, _ = k.shape
    if log_decay.shape[-1] == 1:
        nc, c = _chunking(L, chunk)
        core = _linear_attention_scalar
    else:
        nc, c = _chunking(L, chunk, pow2=q is not None)
        core = _linear_attention_channel
    return _in_groups(lambda q, k, v, ld, S: core(q, k, v, ld, S, include_current, c),
                      (q, k, v, log_decay), S0, L, c, B * H)


def _linear_attention_scalar(q, k, v, log_decay, S0, include_current, chunk):
    L = k.shape[1]
    nc, c = _chunking(L, chunk)
    kh, vh = _to_blocks(k, nc, c), _to_blocks(v, nc, c)            # [B, H, nc, c, K|V]
    x = _to_blocks(log_decay, nc, c)[..., 0]                       # [B, H, nc, c]
    # Index 0 stands for the state entering the chunk, so one decay matrix holds the decays
    # from it (row 0) and between steps (rows 1..c); E[s, t] = decay from after s to after t.
    x = torch.cat([torch.zeros_like(x[..., :1]), x], -1)
    E = _decay_matrix(x)                                           # [B, H, nc, c+1, c+1]
    last = E[..., :, c]                                            # decays to the chunk end
    dS = (kh * last[..., 1:].unsqueeze(-1)).transpose(-1, -2) @ vh
    S_in, S_last = _chain_diag(last[..., 0, None, None], dS, S0)
    if q is None:
        return None, S_last
    qh = _to_blocks(q, nc, c)
    # Step t reads the state after step t - delta; E[t, t - 1] = 0 makes the mask strictly
    # causal when delta = 1.
    delta = 0 if include_current else 1
    cols = E[..., 1 - delta:c + 1 - delta]                         # [B, H, nc, c+1, c]
    scores_t = (kh @ qh.transpose(-1, -2)) * cols[..., 1:, :]      # [key, query]
    o = _baddmm(scores_t.transpose(-1, -2) @ vh, qh * cols[..., 0, :].unsqueeze(-1), S_in)
    return _from_blocks(o, L), S_last


def _linear_attention_channel(q, k, v, log_decay, S0, include_current, chunk):
    B, L, H, K = k.shape
    if q is None:
        nc, c = _chunking(L, chunk)
        kh, vh, x = (_to_blocks(t, nc, c) for t in (k, v, log_decay))  # [B, H, nc, c, *]
        dS = (kh * torch.exp(_suffix_exclusive(x, 3))).transpose(-1, -2) @ vh
        return None, _chain_diag(torch.exp(x.sum(3)).unsqueeze(-1), dS, S0)[1]

    # Recursive halving on the flat time axis; chunks of c = 2^m steps start at multiples of
    # c, so every block below stays inside one chunk. At the level of half-length h, each
    # block of 2h steps splits into two halves around a reference point m (the last step of
    # the first half). A query t of the second half and a key s of the first half have the
    # decay D(m, t) * D(s, m), D(s, t) = prod_{s < u <= t} a_u (up to t - 1 when the current
    # step is left out), so the pair costs one matmul per level with
    #   Q_h[t] = q_t * D(start of t's half - 1, t),  K_h[s] = k_s * D(s, end of s's half).
    # Each (t, s) with s < t in one chunk falls in exactly one level (the one whose block is
    # the smallest holding both), and s = t decays by 1. Going up a level multiplies the
    # second halves of Q_h by the product T_h of the first half's decays, and the first
    # halves of K_h by T_h of the second half; T_2h is the product of the two T_h. So every
    # decay is a product of the a_u = exp(log_decay_u) <= 1 of its own segment (never a
    # quotient, never a difference of sums: a_u = 0 is harmless, and there is nothing to
    # overflow), and a level costs two elementwise passes. After the last level Q, K and T
    # hold the chunk-level decays: the reads of the incoming state, the keys decayed to the
    # chunk end, and the chunk's total decay.
    nc, c = _chunking(L, chunk, pow2=True)
    N = nc * c
    qh, kh, vh, x = (_to_blocks(t, nc, c).reshape(B, H, N, t.shape[-1])
                     for t in (q, k, v, log_decay))
    a = torch.exp(x)                     # padded steps: a = exp(0) = 1, zero q, k and v
    Vd = vh.shape[-1]
    Q = qh * a if include_current else qh
    Kd, T = kh, a                                                  # T: [B, H, N / h, K]
    # Without autograd the levels rescale Q and K in place instead of stacking new copies
    # (two full passes per level saved); Q and K must then not share memory with the inputs.
    in_place = not (torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, log_decay)))
    if in_place:
        Q, Kd = (t.clone() if _shares(t, src) else t for t, src in ((Q, q), (Kd, k)))
    # o is accumulated in place (no autograd node keeps it), a level adding to the second
    # halves only.
    o = (qh * kh).sum(-1, keepdim=True) * vh if include_current else vh.new_zeros(B, H, N, Vd)
    h = 1
    while h < c:
        n = N // (2 * h)
        # unbind, not indexing: the backward is one stack instead of a zero-filled full-size
        # gradient per piece.
        Q0, Q1 = Q.view(B, H, n, 2, h, K).unbind(3)
        K0, K1 = Kd.view(B, H, n, 2, h, K).unbind(3)
        T0, T1 = T.view(B, H, n, 2, 1, K).unbind(3)
        v0 = vh.view(B, H, n, 2, h, Vd).unbind(3)[0]
        if h == 1:   # tiny score blocks: elementwise beats a batch of tiny matmuls
            add = (Q1 * K0).sum(-1, keepdim=True) * v0
        elif h == 2:
            add = ((Q1.unsqueeze(-2) * K0.unsqueeze(-3)).sum(-1, keepdim=True)
                   * v0.unsqueeze(-3)).sum(-2)
        else:
            add = (Q1 @ K0.transpose(-1, -2)) @ v0
        o.view(B, H, n, 2, h, Vd)[:, :, :, 1] += add
        if in_place:
            Q1.mul_(T0)
            K0.mul_(T1)
        else:
            Q = torch.stack([Q0, Q1 * T0], 3).view(B, H, N, K)
            Kd = torch.stack([K0 * T1, K1], 3).view(B, H, N, K)
        T = T0 * T1
        h *= 2
    blk = lambda t: t.view(B, H, nc, c, t.shape[-1])  # noqa: E731
    dS = blk(Kd).transpose(-1, -2) @ blk(vh)
    S_in, S_last = _chain_diag(T.view(B, H, nc, K, 1), dS, S0)
    o = _baddmm(blk(o), blk(Q), S_in)
    return _from_blocks(o, L), S_last


# --------------------------------------------------------------------------- 4. delta rule

def _solve_unit_lower(A: torch.Tensor, B: torch.Tensor, b: int = 16) -> torch.Tensor:
    """X with (I + strict_lower(A)) X = B; A: [..., n, n], B: [..., n, m]; A's diagonal and
    upper part are ignored.

    Blocked forward substitution: the inverses of the diagonal b x b blocks come from one
    batched triangular solve, the rest are matmuls. For n = 64 with 128 right-hand sides this
    took 0.6x the time of one torch.linalg.solve_triangular forward, 0.65x forward+backward
    (CPU, whose small triangular solves run far below matmul speed).
    """
    n = A.shape[-1]
    if n <= b:
        return torch.linalg.solve_triangular(A, B, upper=False, unitriangular=True)
    m = -(-n // b)
    if m * b != n:   # identity rows and zero right-hand sides after the end
        A = torch.nn.functional.pad(A, (0, m * b - n, 0, m * b - n))
        B = torch.nn.functional.pad(B, (0, 0, 0, m * b - n))
    blocks = A.unflatten(-2, (m, b)).unflatten(-1, (m, b))        # [..., m, b, m, b]
    diag = torch.diagonal(blocks, dim1=-4, dim2=-2)               # [..., b, b, m]
    diag = diag.movedim(-1, -3)                                    # [..., m, b, b]
    eye = torch.eye(b, dtype=A.dtype, device=A.device)
    inv = torch.linalg.solve_triangular(diag, eye.expand(diag.shape), upper=False,
                                        unitriangular=True)
    xs = []
    for i in range(m):
        rhs = B[..., i * b:(i + 1) * b, :]
        if i:
            rhs = rhs - A[..., i * b:(i + 1) * b, :i * b] @ torch.cat(xs, -2)
        xs.append(inv[..., i, :, :] @ rhs)
    return torch.cat(xs, -2)[..., :n, :]


def chunk_delta_rule(q, r, w, p, v, log_alpha, S0, chunk: int = 64):
    """Identity-plus-rank-1 transition over a block of any length L (DeltaNet, Gated
    DeltaNet).

    S_t = alpha_t * (S_{t-1} - w_t (r_t^T S_{t-1})) + p_t v_t^T, and o_t = S_t^T q_t.
    DeltaNet: r = k, w = p = beta * k, alpha = 1.

    q: [B, L, H, K] or None; r, w, p: [B, L, H, K]; v: [B, L, H, V];
    log_alpha: [B, L, H], or None for alpha = 1; S0: [B, H, K, V].
    Returns (o, S_last): o [B, L, H, V] (None when q is None), S_last [B, H, K, V].
    Passing the same tensor object as w and p (DeltaNet, Gated DeltaNet) takes a shorter
    path with 10 instead of 14 chunk-sized matmuls; equal values in two tensors do not (p's
    gradient must stay apart from w's).

    The block is cut into chunks of at most `chunk` steps (the end padded with identity
    steps: zero q, r, w, p, v and alpha = 1). Inside a chunk, with y_t = S_{t-1}^T r_t,
    S_t = alpha_t S_{t-1} + p_t v_t^T - alpha_t w_t y_t^T: linear attention with a scalar
    decay and two rank-1 writes. The y_t solve a unit lower triangular c x c system (the
    UT/WY form, here allowing w != p), T y = rhs written row-wise:
      y_t + sum_{s<t} Gamma_{t-1,s} alpha_s (r_t.w_s) y_s
          = gamma_{t-1} S0^T r_t + sum_{s<t} Gamma_{t-1,s} (r_t.p_s) v_s,
    so y = Y0 S0 + y_loc with Y0 = T^-1 diag(gamma_{t-1}) R and y_loc = T^-1 A_rp V (one
    triangular solve with both right-hand sides). Everything else is linear in S0 too:
      S_c = M S0 + dS,  M = gamma_c I - Wd^T Y0,  dS = Pd^T V - Wd^T y_loc,
      O = Q_eff S0 + O_loc,  Q_eff = diag(gamma_t) Q - A_qw Y0,  O_loc = A_qp V - A_qw y_loc,
    with Wd = diag(Gamma_{c,t-1}) W (w_t decayed by alpha_t to the chunk end),
    Pd = diag(Gamma_{c,t}) P, A_qw = tril(Q W^T) * Gamma_{t,s-1}, A_qp = tril(Q P^T) * Gamma_{t,s}.
    All of that is computed for all chunks at once (for long blocks: for the chunks of one
    group at once, see _GROUP_ELEMENTS); only S_{j+1} = M_j S_j + dS_j (a [K, K] @ [K, V]
    product per chunk) runs chunk after chunk, then O = O_loc + Q_eff S_in at once.
    With w = p: Wd = diag(alpha) Pd and A_qw = A_qp diag(alpha), so with
    U = [-diag(alpha) Y0, V - diag(alpha) y_loc], [M - gamma_c I, dS] = Pd^T U and
    [Q_eff - diag(gamma_t) Q, O_loc] = A_qp U.
    """
    B, L, H, K = r.shape
    nc, c = _chunking(L, chunk)
    shared = p is w
    return _in_groups(
        lambda q, r, w, p, v, la, S: _delta_rule_core(q, r, w, p, v, la, S, c, shared),
        (q, r, w, p, v, log_alpha), S0, L, c, B * H)


def _delta_rule_core(q, r, w, p, v, log_alpha, S0, chunk, shared):
    B, L, H, K = r.shape
    nc, c = _chunking(L, chunk)
    rh, wh, vh = (_to_blocks(t, nc, c) for t in (r, w, v))         # [B, H, nc, c, *]
    ph = wh if shared else _to_blocks(p, nc, c)
    if log_alpha is None:
        x = torch.zeros(B, H, nc, c + 1, dtype=r.dtype, device=r.device)
    else:
        x = _to_blocks(log_alpha.unsqueeze(-1), nc, c)[..., 0]     # [B, H, nc, c]
        x = torch.cat([torch.zeros_like(x[..., :1]), x], -1)
    # Index 0 is the incoming state: E[s, t] is the decay from after step s to after step t
    # (0 for t < s). A write at step s (alpha_s w_s, or p_s) reaches the state after step t
    # decayed by E[s, t]; G = E[1:] holds these rows for s = 1..c. Its columns :c are the
    # states 0..c-1 that steps 1..c read (y_t = S_{t-1}^T r_t, strictly causal), its columns
    # 1: the states 1..c they write (o_t = S_t^T q_t, the current step included), its column
    # c the chunk end. Key index first, as E; the transposed products (W R^T instead of
    # R W^T) are read by BLAS as they lie.
    E = _decay_matrix(x)                                           # [B, H, nc, c+1, c+1]
    G = E[..., 1:, :]
    alpha = torch.exp(x[..., 1:]).unsqueeze(-1)                    # [B, H, nc, c, 1]
    last = G[..., c].unsqueeze(-1)                                 # decays to the chunk end
    eye = torch.eye(K, dtype=r.dtype, device=r.device)

    # The triangular system for y. Its diagonal is 0 (E[t, t - 1] = 0) and is taken as 1.
    a_rp = (ph @ rh.transpose(-1, -2)) * G[..., :c]                # [key, query]
    wa = None if shared else wh * alpha                            # alpha_s w_s
    a_rw = a_rp * alpha if shared else (wa @ rh.transpose(-1, -2)) * G[..., :c]
    rhs = torch.cat([rh * E[..., 0, :c].unsqueeze(-1), a_rp.transpose(-1, -2) @ vh], -1)
    Y = _solve_unit_lower(a_rw.transpose(-1, -2), rhs)             # [.., c, K+V] = [Y0, y_loc]

    if shared:
        U = torch.addcmul(torch.nn.functional.pad(vh, (K, 0)), alpha, Y, value=-1.0)
        MdS = (ph * last).transpose(-1, -2) @ U                    # [B, H, nc, K, K+V]
        M = E[..., 0, c, None, None] * eye + MdS[..., :K]
        dS = MdS[..., K:]
    else:
        WY = (wa * last).transpose(-1, -2) @ Y
        M = E[..., 0, c, None, None] * eye - WY[..., :K]
        dS = (ph * last).transpose(-1, -2) @ vh - WY[..., K:]
    S_in, S_last = _chain_dense(M, dS, S0)
    if q is None:
        return None, S_last
    qh = _to_blocks(q, nc, c)
    a_qp = (ph @ qh.transpose(-1, -2)) * G[..., 1:]                # [key, query]
    q_dec = qh * E[..., 0, 1:].unsqueeze(-1)
    if shared:
        AU = a_qp.transpose(-1, -2) @ U                            # [B, H, nc, c, K+V]
        q_eff = q_dec + AU[..., :K]
        o = _baddmm(AU[..., K:], q_eff, S_in)
    else:
        a_qw = (wa @ qh.transpose(-1, -2)) * G[..., 1:]
        AY = a_qw.transpose(-1, -2) @ Y
        q_eff = q_dec - AY[..., :K]
        o = _baddmm(a_qp.transpose(-1, -2) @ vh - AY[..., K:], q_eff, S_in)
    return _from_blocks(o, L), S_last


def chunk_dplr(q, r, w, p, v, log_alpha, S0, chunk: int = 64, include_current: bool = True):
    """Diagonal-plus-rank-1 transition with a decay per key channel over a block of any
    length L (Kimi Delta Attention, RWKV-7, a delta rule decayed per channel).

    S_t = diag(alpha_t) S_{t-1} - w_t (r_t^T S_{t-1}) + p_t v_t^T, and o_t = S_t^T q_t
    (include_current=False: o_t = S_{t-1}^T q_t, the state before the step), with
    alpha_t = exp(log_alpha_t) per key channel. Unlike chunk_delta_rule, the decay does
    not scale the erase: KDA's (I - beta k k^T) diag(alpha) is w = beta k, r = alpha * k, and
    the decay-after-erase form diag(alpha) (I - beta k k^T) is w = alpha * beta k, r = k.

    q: [B, L, H, K] or None; r, w, p: [B, L, H, K]; v: [B, L, H, V];
    log_alpha: [B, L, H, K], or [B, L, H, 1] for one decay per head (Gated DeltaProduct: plain
    products masked by a decay matrix instead of the per-channel halving); S0: [B, H, K, V].
    Returns (o, S_last) as chunk_delta_rule,
    whose fast path for w is p it shares.

    Inside a chunk, with G_t the per-channel log-decay summed over steps 1..t of the chunk,
    the state is S_t = diag(exp G_t) X_t, and X follows an undecayed update whose pair terms
    each carry the decay of one segment: with y_t = S_{t-1}^T r_t,
      y_t + sum_{s<t} (r_t . w_s)_{G_{t-1} - G_s} y_s
          = (r_t * exp G_{t-1})^T S0 + sum_{s<t} (r_t . p_s)_{G_{t-1} - G_s} v_s,
      o_t = (q_t * exp G_t)^T S0 + sum_{s<=t} (q_t . p_s)_{G_t - G_s} v_s - (q_t . w_s)_{G_t - G_s} y_s,
      S_c = diag(exp G_c) S0 + sum_s (p_s exp(G_c - G_s)) v_s^T - (w_s exp(G_c - G_s)) y_s^T,
    where (a . b)_x = sum_k a_k b_k exp(x_k): a channel-weighted product, as in linear
    attention with a decay per channel. _channel_pairs computes those score matrices by the
    same recursive halving (products of decays, never quotients); the rest is the
    chunk_delta_rule scheme: one unit lower triangular solve for y = Y0 S0 + y_loc, then
    S_{j+1} = M_j S_j + dS_j chained over the chunks.

    r and w may also be [B, L, H, R, K]: R erase terms per step, S_t = diag(alpha_t) S_{t-1}
    - sum_j w_{t,j} (r_{t,j}^T S_{t-1}) + p_t v_t^T, every r_{t,j} reading the state before
    the step (a DeltaProduct step composed into one transition has such terms).
    """
    B, L, H = r.shape[:3]
    nc, c = _chunking(L, chunk, pow2=True)
    shared = p is w
    return _in_groups(
        lambda q, r, w, p, v, la, S: _dplr_core(q, r, w, p, v, la, S, c, shared, include_current),
        (q, r, w, p, v, log_alpha), S0, L, c, B * H)


def _channel_pairs(queries, keys, x, c):
    """Channel-weighted pair scores inside chunks of c = 2^m steps, by recursive halving.

    queries: [(q [B, H, N, K], include)], keys: [k [B, H, N, K]], x: log-decays [B, H, N, K],
    N = nc * c. Returns (A, Q, Kd, T): A [B, H, nq, nk, nc, c, c] with A[t, s] = sum_k q_t,k
    k_s,k exp(sum of x_u,k over s < u <= t) for s < t (u <= t - 1 where include is False) and
    q_t . k_t on the diagonal where include is True, zero elsewhere; Q [B, H, nq, N, K] the
    queries decayed from the chunk start (to t, or to t - 1); Kd [B, H, nk, N, K] the keys
    decayed to the chunk end; T [B, H, nc, K] the chunks' total decays. The halving is
    _linear_attention_channel's, with the score blocks kept instead of applied to v.
    """
    if x.shape[-1] == 1:
        return _scalar_pairs(queries, keys, x, c)
    B, H, N, K = x.shape
    nc = N // c
    a = torch.exp(x)
    Q = torch.stack([qq * a if inc else qq for qq, inc in queries], 2)
    Kd = torch.stack(keys, 2)
    nq, nk = Q.shape[2], Kd.shape[2]
    A = Q.new_zeros(B, H, nq, nk, nc, c, c)
    for i, (qq, inc) in enumerate(queries):
        if inc:   # s = t: no decay
            A[:, :, i].diagonal(dim1=-2, dim2=-1).copy_(
                (qq.unsqueeze(2) * Kd).sum(-1).view(B, H, nk, nc, c))
    # Without autograd the levels rescale Q and K in place (as _linear_attention_channel);
    # they are fresh stacks here, never the inputs.
    in_place = not _needs_grad(x, *keys, *(qq for qq, _ in queries))
    T = a
    h = 1
    while h < c:
        n, m = N // (2 * h), c // (2 * h)
        Q0, Q1 = Q.view(B, H, nq, n, 2, h, K).unbind(4)
        K0, K1 = Kd.view(B, H, nk, n, 2, h, K).unbind(4)
        T0, T1 = T.view(B, H, n, 2, 1, K).unbind(3)
        if h <= 2:   # tiny score blocks: elementwise beats a batch of tiny matmuls
            sc = (Q1.unsqueeze(3).unsqueeze(-2) * K0.unsqueeze(2).unsqueeze(-3)).sum(-1)
        else:
            sc = Q1.unsqueeze(3) @ K0.unsqueeze(2).transpose(-1, -2)  # [B, H, nq, nk, n, h, h]
        # block j of a chunk at this level: the rows of its second half against the columns
        # of its first half, written where they lie in the chunk's matrix
        blocks = A.view(B, H, nq, nk, nc, m, 2, h, m, 2, h)[:, :, :, :, :, :, 1, :, :, 0, :]
        blocks.diagonal(dim1=5, dim2=7).copy_(
            sc.view(B, H, nq, nk, nc, m, h, h).permute(0, 1, 2, 3, 4, 6, 7, 5))
        if in_place:
            Q1.mul_(T0.unsqueeze(2))
            K0.mul_(T1.unsqueeze(2))
        else:
            Q = torch.stack([Q0, Q1 * T0.unsqueeze(2)], 4).view(B, H, nq, N, K)
            Kd = torch.stack([K0 * T1.unsqueeze(2), K1], 4).view(B, H, nk, N, K)
        T = T0 * T1
        h *= 2
    return A, Q, Kd, T.view(B, H, nc, K)


def _scalar_pairs(queries, keys, x, c):
    """_channel_pairs where every key channel shares one decay, x [B, H, N, 1]: the scores are
    plain products Q K^T masked by the chunk's decay matrix (_decay_matrix: segment sums,
    never differences of prefix sums), one batch of [c, K] @ [K, c] products instead of the
    halving's log2(c) levels over [N, K] streams. Same returns."""
    B, H, N, _ = x.shape
    nc = N // c
    xb = x.view(B, H, nc, c)
    # index 0 is the chunk's entry: E[s, t] decays from after step s to after step t (1-based)
    E = _decay_matrix(torch.cat([torch.zeros_like(xb[..., :1]), xb], -1))  # [B, H, nc, c+1, c+1]
    blk = lambda t: t.view(B, H, nc, c, t.shape[-1])  # noqa: E731
    nq, nk = len(queries), len(keys)
    # every query against every key in one product per chunk: [nq c, K] @ [K, nk c]
    Qr = torch.stack([blk(qq) for qq, _ in queries], 3)                # [B, H, nc, nq, c, K]
    Kr = torch.stack([blk(k) for k in keys], 3)                        # [B, H, nc, nk, c, K]
    K = Kr.shape[-1]
    sc = (Qr.reshape(B, H, nc, nq * c, K) @ Kr.reshape(B, H, nc, nk * c, K).transpose(-1, -2))
    sc = sc.view(B, H, nc, nq, c, nk, c).permute(0, 1, 3, 5, 2, 4, 6)   # [B, H, nq, nk, nc, c, c]
    # a query reads the state after its own step (columns 1:) or before it (columns :c,
    # where E[s, s] = 1 pairs it with the step just before it)
    masks = {inc: (E[..., 1:, 1:] if inc else E[..., 1:, :c]).transpose(-1, -2)
             for inc in {inc for _, inc in queries}}                   # [B, H, nc, t, s]
    A = torch.stack([sc[:, :, i] * masks[inc].unsqueeze(2) for i, (_, inc) in enumerate(queries)], 2)
    Q = torch.stack([Qr[:, :, :, i] * (E[..., 0, 1:] if inc else E[..., 0, :c]).unsqueeze(-1)
                     for i, (_, inc) in enumerate(queries)], 2).view(B, H, nq, N, K)
    Kd = (Kr * E[..., 1:, c].unsqueeze(-1).unsqueeze(3)).transpose(2, 3).reshape(B, H, nk, N, K)
    return A, Q, Kd, E[..., 0, c].unsqueeze(-1).expand(B, H, nc, K)


def _dplr_core(q, r, w, p, v, log_alpha, S0, c, shared, include=True):
    """One group of chunks. With w = p (one tensor: KDA's beta k) the erase and the write merge
    into U = V - y; every other case is _dplr_rank_core's, with R = M = 1 where r and p are
    [B, L, H, K]."""
    if not shared:
        one = lambda t: t if t.dim() == 5 else t.unsqueeze(3)  # noqa: E731
        return _dplr_rank_core(q, one(r), one(w), one(p), one(v), log_alpha, S0, c, include)
    B, L, H, K = r.shape
    nc = -(-L // c)
    N = nc * c
    flat = lambda t: _to_blocks(t, nc, c).view(B, H, N, t.shape[-1])  # noqa: E731
    # A read of the state before the step (include False) is an erase read with q for r:
    # strictly earlier pairs, decays up to t - 1.
    queries = [(flat(r), False)] + ([] if q is None else [(flat(q), include)])
    A, Q, Kd, T = _channel_pairs(queries, [flat(w)], flat(log_alpha), c)
    blk = lambda t: t.view(B, H, nc, c, t.shape[-1])  # noqa: E731
    vb = blk(flat(v))
    a_rw = A[:, :, 0, 0]
    Y = _solve_unit_lower(a_rw, torch.cat([blk(Q[:, :, 0]), a_rw @ vb], -1))  # [Y0, y_loc]
    U = torch.cat([-Y[..., :K], vb - Y[..., K:]], -1)
    MdS = blk(Kd[:, :, 0]).transpose(-1, -2) @ U
    S_in, S_last = _chain_dense(torch.diag_embed(T) + MdS[..., :K], MdS[..., K:], S0)
    if q is None:
        return None, S_last
    AU = A[:, :, 1, 0] @ U
    q_eff, o_loc = blk(Q[:, :, 1]) + AU[..., :K], AU[..., K:]
    return _from_blocks(_baddmm(o_loc, q_eff, S_in), L), S_last


def _dplr_rank_core(q, r, w, p, v, log_alpha, S0, c, include):
    """_dplr_core with R erase terms and M input terms per step, r, w [B, L, H, R, K], p
    [B, L, H, M, K], v [B, L, H, M, V]: every erase read y_{t,j} = S_{t-1}^T r_{t,j} reads the
    state before the step, so the triangular system runs over (step, term) pairs in step-major
    order, the pairs of one step left uncoupled (their scores, strictly earlier in time only,
    are zero there); the input terms add up in every product with V."""
    B, L, H, R, K = r.shape
    Mi = p.shape[3]
    nc = -(-L // c)
    N = nc * c
    flat = lambda t: _to_blocks(t, nc, c).view(B, H, N, t.shape[-1])  # noqa: E731
    x = flat(log_alpha)
    rs = [flat(r[:, :, :, j]) for j in range(R)]
    ws = [flat(w[:, :, :, j]) for j in range(R)]
    ps = [flat(p[:, :, :, m]) for m in range(Mi)]
    queries = [(rj, False) for rj in rs] + ([] if q is None else [(flat(q), include)])
    A, Q, Kd, T = _channel_pairs(queries, ws + ps, x, c)   # [B, H, nq, nk, nc, c, c]
    blk = lambda t: t.view(B, H, nc, c, t.shape[-1])  # noqa: E731

    def pairs(t, n):   # [B, H, n, N, D] -> [B, H, nc, (t, j), D], step-major
        return t.view(B, H, n, nc, c, t.shape[-1]).permute(0, 1, 3, 4, 2, 5) \
            .reshape(B, H, nc, c * n, t.shape[-1])
    vs = pairs(torch.stack([flat(v[:, :, :, m]) for m in range(Mi)], 2), Mi)  # [.., c Mi, V]
    a_rw = A[:, :, :R, :R].permute(0, 1, 4, 5, 2, 6, 3).reshape(B, H, nc, c * R, c * R)
    a_rp = A[:, :, :R, R:].permute(0, 1, 4, 5, 2, 6, 3).reshape(B, H, nc, c * R, c * Mi)
    Y = _solve_unit_lower(a_rw, torch.cat([pairs(Q[:, :, :R], R), a_rp @ vs], -1))
    WY = pairs(Kd[:, :, :R], R).transpose(-1, -2) @ Y
    M = torch.diag_embed(T) - WY[..., :K]
    dS = pairs(Kd[:, :, R:], Mi).transpose(-1, -2) @ vs - WY[..., K:]
    S_in, S_last = _chain_dense(M, dS, S0)
    if q is None:
        return None, S_last
    a_qw = A[:, :, R, :R].permute(0, 1, 3, 4, 5, 2).reshape(B, H, nc, c, c * R)
    a_qp = A[:, :, R, R:].permute(0, 1, 3, 4, 5, 2).reshape(B, H, nc, c, c * Mi)
    AY = a_qw @ Y
    q_eff = blk(Q[:, :, R]) - AY[..., :K]
    o_loc = a_qp @ vs - AY[..., K:]
    return _from_blocks(_baddmm(o_loc, q_eff, S_in), L), S_last


# --------------------------------------------------------------------------- 5. dense

def dense_scan(A: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int | None = None):
    """h_t = A_t h_{t-1} + b_t with small dense transitions, over one block.

    A: [B or 1, L, n, n] (1: one transition sequence for every batch row); b: [B, L, n];
    h0: [B, n]. Returns (h, h_last): h [B, L, n], h_last = h[:, -1].

    Two levels, work-efficient: the L steps in chunks of c (about sqrt(L / 2), a power of two;
    `chunk` overrides it), (1) the steps of every chunk at once, one step at a time, giving
    each step's product P_t of the chunk's transitions so far and its state y_t from a zero
    entry state; (2) the chunks' entry states s_k in turn, s_{k+1} = P_end s_k + y_end;
    (3) every state at once, h_t = P_t s_k + y_t. That is about L n^3 multiply-adds in 2c +
    L/c batched steps; the Hillis-Steele tree it replaces took L log2(L) n^3, and copied its
    [B, L, n, n] products at each of its log2(L) levels.
    """
    Ba, L, n, _ = A.shape
    B = b.shape[0]
    c = chunk or 1 << max(0, round(math.log2(max(1.0, (L / 2) ** 0.5))))
    N = -(-L // c)
    pad = N * c - L
    if pad:   # identity steps after the block: they leave the last state as it is
        eye = torch.eye(n, dtype=A.dtype, device=A.device).expand(Ba, pad, n, n)
        A = torch.cat([A, eye], 1)
        b = torch.cat([b, b.new_zeros(B, pad, n)], 1)
    A = A.reshape(Ba, N, c, n, n)
    b = b.reshape(B, N, c, n)
    P, y = [A[:, :, 0]], [b[:, :, 0]]
    for j in range(1, c):
        P.append(A[:, :, j] @ P[-1])
        y.append((A[:, :, j] @ y[-1].unsqueeze(-1)).squeeze(-1) + b[:, :, j])
    P, y = torch.stack(P, 2), torch.stack(y, 2)           # [Ba, N, c, n, n], [B, N, c, n]
    s, starts = h0, []
    for k in range(N):
        starts.append(s)
        if k + 1 < N:
            s = (P[:, k, -1] @ s.unsqueeze(-1)).squeeze(-1) + y[:, k, -1]
    h = (P @ torch.stack(starts, 1)[:, :, None, :, None]).squeeze(-1) + y
    h = h.reshape(B, N * c, n)[:, :L]
    return h, h[:, -1]
