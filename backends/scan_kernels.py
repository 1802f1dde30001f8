"""Numerical primitives of the scan backend: one chunk of a recurrence at a time.

The backend walks over time in chunks and calls these once per chunk, passing the state
carried out of the previous chunk. Everything here is plain PyTorch, so autograd
differentiates it, and it runs unchanged on any device and in float32 or float64.

Shape letters: B batch, L chunk length (any L >= 1), H heads, K key channels, V value
channels, S the elementwise state shape of a diagonal recurrence, n the state size of a
dense one.

Stability rule kept throughout: a decay enters only as exp(x) with x a sum of log-decays,
hence x <= 0. Sums over a time segment are built by a masked cumulative sum (never as a
difference of two prefix sums), so log-decays of -inf (decays of exactly 0) give
exp(-inf) = 0 and never meet (-inf) - (-inf); and masking is done with torch.where, never
by multiplying a possibly infinite value with 0.
"""
from __future__ import annotations

import torch

__all__ = ["linear_scan", "maxplus_scan", "chunk_linear_attention", "chunk_delta_rule",
           "dense_scan"]

# Sub-block length of the per-channel-decay path of chunk_linear_attention. Module level so
# that tests can shrink it and reach the cross-sub-block code at tiny chunk lengths.
SUB_BLOCK = 16


# --------------------------------------------------------------------------- helpers

def _segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums of log-decays along the time axis.

    x: [..., N, C] (time, then channels). Returns [..., N, N, C] with
    out[..., t, s, :] = sum_{s < u <= t} x[..., u, :] for t >= s (0 on the diagonal) and
    -inf for t < s, so exp(out) is the causal decay mask.
    """
    N = x.shape[-2]
    strict = torch.ones(N, N, dtype=torch.bool, device=x.device).tril(-1).unsqueeze(-1)
    causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril().unsqueeze(-1)
    z = x.unsqueeze(-2).expand(*x.shape[:-1], N, x.shape[-1])  # z[t, s] = x[t]
    # A cumulative sum down the rows of the masked matrix adds x[u] for s < u <= t only:
    # no prefix sums are subtracted, so -inf entries stay harmless.
    z = torch.where(strict, z, torch.zeros((), dtype=x.dtype, device=x.device))
    seg = z.cumsum(-3)
    return torch.where(causal, seg, torch.full((), float("-inf"), dtype=x.dtype,
                                               device=x.device))


def _shift_right(x: torch.Tensor, dim: int, fill: float) -> torch.Tensor:
    """x moved one step forward along dim, with `fill` entering at index 0."""
    first = torch.full_like(x.narrow(dim, 0, 1), fill)
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim)


def _suffix_exclusive(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[t] = sum_{u > t} x[u] along dim, summed directly (no total minus prefix)."""
    inc = x.flip(dim).cumsum(dim).flip(dim)
    last = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([inc.narrow(dim, 1, x.shape[dim] - 1), last], dim)


# --------------------------------------------------------------------------- 1. diagonal

def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor):
    """h_t = a_t * h_{t-1} + b_t, elementwise, over one chunk.

    a: [B, L, *S], or broadcastable to b's shape (size-1 axes, including L);
    b: [B, L, *S]; h0: [B, *S].
    Returns (h, h_last): h [B, L, *S] holds every state of the chunk, h_last = h[:, -1].

    Hillis-Steele tree scan: log2(L) vectorized levels of products and multiply-adds, so it is
    exact for any sign of a, zeros included, and needs no logarithms.
    """
    L = b.shape[1]
    if a.dim() < b.dim():
        raise ValueError(f"linear_scan: a has shape {tuple(a.shape)}, b {tuple(b.shape)}; "
                         "a needs b's number of axes")
    if a.shape[1] != L:
        a = a.expand(a.shape[0], L, *a.shape[2:])
    # Folding h0 into the first input turns the chunk into a scan from a zero state.
    b = torch.cat([torch.addcmul(b[:, :1], a[:, :1], h0.unsqueeze(1)), b[:, 1:]], 1)
    d = 1
    while d < L:
        # Both updates read the previous level, so a is updated after b uses it.
        b = torch.cat([b[:, :d], torch.addcmul(b[:, d:], a[:, d:], b[:, :-d])], 1)
        if 2 * d < L:
            a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], 1)
        d *= 2
    return b, b[:, -1]


# --------------------------------------------------------------------------- 2. max-plus

def maxplus_scan(a: torch.Tensor, b: torch.Tensor, m0: torch.Tensor):
    """m_t = max(m_{t-1} + a_t, b_t), elementwise, over one chunk.

    a, b: [B, L, *S] (a may be broadcastable to b); m0: [B, *S], which may be -inf.
    Returns (m, m_last): m [B, L, *S], m_last = m[:, -1].

    Closed form m_t = A_t + max(m0, max_{s<=t}(b_s - A_s)) with A the cumulative sum of a
    inside the chunk: one cumsum and one cummax.
    """
    a = torch.broadcast_to(a, b.shape) if a.shape != b.shape else a
    A = a.cumsum(1)
    # b - A is -inf wherever b is -inf (A is finite), and max with m0 = -inf is -inf at
    # worst; A + (-inf) is then -inf: no inf - inf arises.
    c = (b - A).cummax(1).values
    m = A + torch.maximum(c, m0.unsqueeze(1))
    return m, m[:, -1]


# --------------------------------------------------------------------------- 3. linear attn

def chunk_linear_attention(q, k, v, log_decay, S0, include_current: bool = True):
    """Linear attention with diagonal decay over one chunk.

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T, and o_t = S_t^T q_t
    (include_current=True) or o_t = S_{t-1}^T q_t (include_current=False).

    q: [B, L, H, K] or None; k: [B, L, H, K]; v: [B, L, H, V];
    log_decay: [B, L, H, K] (per key channel) or [B, L, H, 1] (one decay per head);
    S0: [B, H, K, V].
    Returns (o, S_last): o [B, L, H, V] (None when q is None), S_last [B, H, K, V].
    """
    if log_decay.shape[-1] == 1:
        return _linear_attention_scalar(q, k, v, log_decay, S0, include_current)
    return _linear_attention_channel(q, k, v, log_decay, S0, include_current)


def _linear_attention_scalar(q, k, v, log_decay, S0, include_current):
    L = k.shape[1]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)                  # [B, H, L, K|V]
    x = log_decay[..., 0].transpose(1, 2)                          # [B, H, L]
    # Index 0 stands for the incoming state, so one segment-sum matrix holds the decays
    # from S0 (column 0) and between steps (columns 1..L).
    x = torch.cat([torch.zeros_like(x[..., :1]), x], -1)
    seg = _segsum(x.unsqueeze(-1))[..., 0]                         # [B, H, L+1, L+1]
    S_last = (torch.exp(seg[..., L, 0])[..., None, None] * S0
              + (kh * torch.exp(seg[..., L, 1:]).unsqueeze(-1)).transpose(-1, -2) @ vh)
    if q is None:
        return None, S_last
    qh = q.transpose(1, 2)
    # Step t reads the state after step t - delta; -inf above row t - delta of seg makes
    # the mask strictly causal when delta = 1.
    delta = 0 if include_current else 1
    rows = seg[..., 1 - delta:L + 1 - delta, :]                    # [B, H, L, L+1]
    scores = (qh @ kh.transpose(-1, -2)) * torch.exp(rows[..., 1:])
    o = scores @ vh + torch.exp(rows[..., :1]) * (qh @ S0)
    return o.transpose(1, 2), S_last


def _linear_attention_channel(q, k, v, log_decay, S0, include_current):
    B, L, H, K = k.shape
    c = max(1, min(SUB_BLOCK, L))
    n = -(-L // c)
    pad = n * c - L
    kh, vh, x = (t.transpose(1, 2) for t in (k, v, log_decay))    # [B, H, L, *]
    if pad:
        # Zero keys, values and log-decays after the end change neither the earlier
        # outputs nor the state at the end.
        kh, vh, x = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (kh, vh, x))
    Vd = vh.shape[-1]
    xb = x.reshape(B, H, n, c, K)
    kb = kh.reshape(B, H, n, c, K)
    vb = vh.reshape(B, H, n, c, Vd)

    # State at the end of each sub-block i: S0 decayed over sub-blocks 0..i, plus every key
    # s of sub-blocks j <= i decayed from s to the end of sub-block i.
    # That decay is (within-block suffix after s) + (whole sub-blocks j+1..i): both <= 0.
    bsum = xb.sum(3)                                               # [B, H, n, K]
    bseg = _segsum(bsum)                                           # [B, H, n(i), n(j), K]
    within = _suffix_exclusive(xb, 3)                              # [B, H, n, c, K]
    kdec = kb.unsqueeze(2) * torch.exp(bseg.unsqueeze(-2) + within.unsqueeze(2))
    S_end = (torch.exp(bsum.cumsum(2)).unsqueeze(-1) * S0.unsqueeze(2)
             + torch.einsum("bhijsk,bhjsv->bhikv", kdec, vb))      # [B, H, n, K, V]
    S_last = S_end[:, :, -1]
    if q is None:
        return None, S_last

    qh = q.transpose(1, 2)
    if pad:
        qh = torch.nn.functional.pad(qh, (0, 0, 0, pad))
    qb = qh.reshape(B, H, n, c, K)
    delta = 0 if include_current else 1
    # Earlier sub-blocks and S0, read through the state at the start of the query's
    # sub-block: the query is decayed from that reference to step t - delta (<= 0).
    S_ref = torch.cat([S0.unsqueeze(2), S_end[:, :, :-1]], 2)
    qexp = xb.cumsum(3)
    if delta:
        qexp = _shift_right(qexp, 3, 0.0)
    o = (qb * torch.exp(qexp)) @ S_ref                             # [B, H, n, c, V]
    # Inside a sub-block, exact log-space decays seg(t - delta, s) per channel.
    seg = _segsum(xb)                                              # [B, H, n, c, c, K]
    if delta:
        seg = _shift_right(seg, 3, float("-inf"))
    scores = (qb.unsqueeze(-2) * kb.unsqueeze(-3) * torch.exp(seg)).sum(-1)
    o = o + scores @ vb
    o = o.reshape(B, H, n * c, Vd)[:, :, :L]
    return o.transpose(1, 2), S_last


# --------------------------------------------------------------------------- 4. delta rule

def chunk_delta_rule(q, r, w, p, v, log_alpha, S0):
    """Identity-plus-rank-1 transition over one chunk (DeltaNet, Gated DeltaNet).

    S_t = alpha_t * (S_{t-1} - w_t (r_t^T S_{t-1})) + p_t v_t^T, and o_t = S_t^T q_t.
    DeltaNet: r = k, w = p = beta * k, alpha = 1.

    q: [B, L, H, K] or None; r, w, p: [B, L, H, K]; v: [B, L, H, V];
    log_alpha: [B, L, H], or None for alpha = 1; S0: [B, H, K, V].
    Returns (o, S_last): o [B, L, H, V] (None when q is None), S_last [B, H, K, V].

    With y_t = S_{t-1}^T r_t, S_t = alpha_t S_{t-1} + p_t v_t^T - alpha_t w_t y_t^T: linear
    attention with a scalar decay and two rank-1 writes. The y_t solve a unit lower
    triangular L x L system (the UT/WY form, here allowing w != p):
      y_t + sum_{s<t} Gamma_{t-1,s} alpha_s (r_t.w_s) y_s
          = gamma_{t-1} S0^T r_t + sum_{s<t} Gamma_{t-1,s} (r_t.p_s) v_s.
    """
    B, L, H, K = r.shape
    rh, wh, ph, vh = (t.transpose(1, 2) for t in (r, w, p, v))    # [B, H, L, *]
    if log_alpha is None:
        x = torch.zeros(B, H, L + 1, dtype=r.dtype, device=r.device)
    else:
        x = torch.cat([torch.zeros_like(log_alpha[:, :1]), log_alpha], 1).transpose(1, 2)
    # Index 0 of seg is the incoming state: seg[t, s] is the log of the decay from after
    # step s to after step t, and seg[t, s - 1] that decay times alpha_s.
    seg = _segsum(x.unsqueeze(-1))[..., 0]                         # [B, H, L+1, L+1]
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    causal = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()
    zero = torch.zeros((), dtype=r.dtype, device=r.device)

    # The triangular system for y, rows are steps t = 1..L (0-based i = t - 1).
    M = torch.where(strict, (rh @ wh.transpose(-1, -2)) * torch.exp(seg[..., :L, :L]), zero)
    rhs = (torch.exp(seg[..., :L, 0]).unsqueeze(-1) * (rh @ S0)
           + ((rh @ ph.transpose(-1, -2)) * torch.exp(seg[..., :L, 1:])) @ vh)
    # unitriangular: the solver takes the diagonal as 1 and ignores M's zero diagonal.
    y = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)

    last = seg[..., L, :]                                          # [B, H, L+1]
    S_last = (torch.exp(last[..., 0])[..., None, None] * S0
              + (ph * torch.exp(last[..., 1:]).unsqueeze(-1)).transpose(-1, -2) @ vh
              - (wh * torch.exp(last[..., :L]).unsqueeze(-1)).transpose(-1, -2) @ y)
    if q is None:
        return None, S_last
    qh = q.transpose(1, 2)
    rows = seg[..., 1:, :]                                         # [B, H, L, L+1]
    a_pv = (qh @ ph.transpose(-1, -2)) * torch.exp(rows[..., 1:])
    # seg[t, s - 1] is finite for s = t + 1 too, so the causal mask is applied here.
    a_wy = torch.where(causal, (qh @ wh.transpose(-1, -2)) * torch.exp(rows[..., :L]), zero)
    o = torch.exp(rows[..., :1]) * (qh @ S0) + a_pv @ vh - a_wy @ y
    return o.transpose(1, 2), S_last


# --------------------------------------------------------------------------- 5. dense

def dense_scan(A: torch.Tensor, b: torch.Tensor, h0: torch.Tensor):
    """h_t = A_t h_{t-1} + b_t with small dense transitions, over one chunk.

    A: [B, L, n, n]; b: [B, L, n]; h0: [B, n].
    Returns (h, h_last): h [B, L, n], h_last = h[:, -1].

    Hillis-Steele tree scan with matrix products: log2(L) levels, each a batched matmul.
    """
    L = b.shape[1]
    b = b.unsqueeze(-1)                                            # [B, L, n, 1]
    b = torch.cat([A[:, :1] @ h0[:, None, :, None] + b[:, :1], b[:, 1:]], 1)
    d = 1
    while d < L:
        b = torch.cat([b[:, :d], A[:, d:] @ b[:, :-d] + b[:, d:]], 1)
        if 2 * d < L:
            A = torch.cat([A[:, :d], A[:, d:] @ A[:, :-d]], 1)
        d *= 2
    h = b.squeeze(-1)
    return h, h[:, -1]
