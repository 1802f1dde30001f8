"""The scan backend's chunk primitives against step-by-step float64 loops.

Each kernel works on one chunk and carries the state in and out, so every comparison
checks the outputs and the last state, from a nonzero incoming state. Gradients are checked
with torch.autograd.gradcheck at tiny sizes, and against the loops' own autograd at the
extreme decays (-30 and -1e-6 per step, and exactly 0), where finite differences are
meaningless for -inf log-decays.

Run with -s to see the CPU timings that test_timings prints.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from rnnc.backends import scan_kernels as sk

F64 = torch.float64
F32 = torch.float32
LENGTHS = [1, 7, 64]
NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- references

def ref_linear(a, b, h0):
    h, hs = h0, []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, 1), h


def ref_maxplus(a, b, m0):
    m, ms = m0, []
    for t in range(b.shape[1]):
        m = torch.maximum(m + a[:, t], b[:, t])
        ms.append(m)
    return torch.stack(ms, 1), m


def ref_linear_attention(q, k, v, log_decay, S0, include_current=True):
    S, os_ = S0, []
    for t in range(k.shape[1]):
        prev = S
        S = (torch.exp(log_decay[:, t]).unsqueeze(-1) * S
             + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2))
        if q is not None:
            os_.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S if include_current else prev))
    return (torch.stack(os_, 1) if q is not None else None), S


def ref_delta(q, r, w, p, v, log_alpha, S0):
    S, os_ = S0, []
    for t in range(r.shape[1]):
        y = torch.einsum("bhk,bhkv->bhv", r[:, t], S)
        alpha = 1.0 if log_alpha is None else torch.exp(log_alpha[:, t])[..., None, None]
        S = (alpha * (S - w[:, t].unsqueeze(-1) * y.unsqueeze(-2))
             + p[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2))
        if q is not None:
            os_.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return (torch.stack(os_, 1) if q is not None else None), S


def ref_dplr(q, r, w, p, v, log_alpha, S0):
    """S_t = diag(exp(log_alpha_t)) S_{t-1} - w_t (r_t^T S_{t-1}) + p_t v_t^T, per channel."""
    return ref_dplr_rank(q, r.unsqueeze(3), w.unsqueeze(3), p, v, log_alpha, S0)


def ref_dplr_rank(q, r, w, p, v, log_alpha, S0, include_current=True):
    """ref_dplr with R erase terms per step, r, w [B, L, H, R, K], all reading S_{t-1}, and
    p, v [B, L, H, K or M, K] ([.., V]): one input term, or M."""
    S, os_ = S0, []
    for t in range(r.shape[1]):
        y = torch.einsum("bhjk,bhkv->bhjv", r[:, t], S)
        write = (torch.einsum("bhmk,bhmv->bhkv", p[:, t], v[:, t]) if p.dim() == 5
                 else p[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2))
        new = (torch.exp(log_alpha[:, t]).unsqueeze(-1) * S
               - torch.einsum("bhjk,bhjv->bhkv", w[:, t], y) + write)
        if q is not None:
            os_.append(torch.einsum("bhk,bhkv->bhv", q[:, t], new if include_current else S))
        S = new
    return (torch.stack(os_, 1) if q is not None else None), S


def ref_dense(A, b, h0):
    h, hs = h0, []
    for t in range(b.shape[1]):
        h = (A[:, t] @ h.unsqueeze(-1)).squeeze(-1) + b[:, t]
        hs.append(h)
    return torch.stack(hs, 1), h


# --------------------------------------------------------------------------- inputs

def gen(seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=F64):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape, dtype=F64):
        return torch.rand(*shape, generator=g, dtype=dtype)
    return randn, rand


def la_inputs(L, per_channel, seed=0, B=2, H=3, K=4, V=5, decay=None):
    """q, k, v, log_decay, S0; log-decays uniform in [-2, 0), or decay(shape) when given."""
    randn, rand = gen(seed)
    q, k, v = randn(B, L, H, K), randn(B, L, H, K), randn(B, L, H, V)
    shape = (B, L, H, K if per_channel else 1)
    ld = -2 * rand(*shape) if decay is None else decay(shape)
    return q, k, v, ld, randn(B, H, K, V)


def delta_inputs(L, kind, seed=0, B=2, H=3, K=4, V=5, gated=True, decay=None):
    """DeltaNet-like inputs (normalized keys, beta in (0, 1)) so the state stays bounded.

    kind 'deltanet': w = p = beta k; 'general': w = beta k and an independent small p.
    """
    randn, rand = gen(seed)
    q, v = randn(B, L, H, K), randn(B, L, H, V)
    k = F.normalize(randn(B, L, H, K), dim=-1)
    beta = rand(B, L, H, 1)
    w = beta * k
    p = w if kind == "deltanet" else 0.5 * randn(B, L, H, K)
    if not gated:
        la = None
    elif decay is None:
        la = -rand(B, L, H)
    else:
        la = decay((B, L, H))
    return q, k, w, p, v, la, randn(B, H, K, V)


def dplr_inputs(L, kind, seed=0, B=2, H=3, K=4, V=5, decay=None):
    """Kimi-Delta-Attention-like inputs with a log-decay per key channel (uniform in [-1, 0),
    or decay(shape)): kind 'kda' (decay before the erase: w = p = beta k, r = alpha k), 'after'
    (w = alpha beta k, r = k, p = beta k) or 'rwkv7' (w = a kk, r = kk, p = k)."""
    randn, rand = gen(seed)
    q, v = randn(B, L, H, K), randn(B, L, H, V)
    k = F.normalize(randn(B, L, H, K), dim=-1)
    la = -rand(B, L, H, K) if decay is None else decay((B, L, H, K))
    alpha = torch.exp(la)
    beta = rand(B, L, H, 1)
    if kind == "kda":
        w = p = beta * k
        r = alpha * k
    elif kind == "after":
        w, r, p = alpha * beta * k, k, beta * k
    else:
        w, r, p = rand(B, L, H, K) * k, k, 0.5 * randn(B, L, H, K)
    return q, r, w, p, v, la, randn(B, H, K, V)


def dense_inputs(L, seed=0, B=2, n=4):
    randn, _ = gen(seed)
    # Entries of size ~0.9/sqrt(n) keep products of 64 transitions of order 1.
    A = 0.9 * randn(B, L, n, n) / n ** 0.5
    return A, randn(B, L, n), randn(B, n)


def close(x, ref, rtol=1e-9):
    """Normwise closeness: |x - ref| <= rtol * (max |ref| + 1) everywhere, no NaN/inf."""
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert torch.isfinite(x).all(), "non-finite values"
    err = (x.to(F64) - ref.to(F64)).abs().max().item() if x.numel() else 0.0
    scale = ref.abs().max().item() + 1.0 if ref.numel() else 1.0
    assert err <= rtol * scale, f"max error {err:.3e} vs scale {scale:.3e}"


def pair_close(got, want, rtol=1e-9):
    for x, r in zip(got, want):
        if r is None:
            assert x is None
        else:
            close(x, r, rtol)


def values_and_grads_close(got, want, args, allow_unused=False):
    """(o, S_last) and the gradients of sum(o) + sum(S_last^2) w.r.t. args, against the
    reference loop's autograd. With allow_unused, an input neither side reads (p when w is
    passed as p) must get no gradient or a zero one."""
    pair_close(got, want)
    gg = torch.autograd.grad(got[0].sum() + got[1].square().sum(), args, allow_unused=allow_unused)
    gw = torch.autograd.grad(want[0].sum() + want[1].square().sum(), args, allow_unused=allow_unused)
    for x, r in zip(gg, gw):
        if r is None:
            assert x is None or not x.abs().any()
        else:
            close(x, r)


# --------------------------------------------------------------------------- 1. linear_scan

@pytest.mark.parametrize("L", LENGTHS)
def test_linear_scan_matches_loop(L):
    randn, rand = gen(L)
    a = 2 * rand(3, L, 5, 2) - 1          # both signs
    b, h0 = randn(3, L, 5, 2), randn(3, 5, 2)
    pair_close(sk.linear_scan(a, b, h0), ref_linear(a, b, h0))


@pytest.mark.parametrize("L", [7, 64])
def test_linear_scan_broadcast_a(L):
    randn, rand = gen(1)
    b, h0 = randn(2, L, 4, 3), randn(2, 4, 3)
    for a in (rand(2, L, 4, 1), rand(1, L, 1, 3), rand(2, 1, 4, 3)):
        want = ref_linear(a.expand_as(b), b, h0)
        pair_close(sk.linear_scan(a, b, h0), want)


def test_linear_scan_negative_and_zero_decays():
    randn, rand = gen(2)
    L = 64
    b, h0 = randn(2, L, 8), randn(2, 8)
    # Parity-style decays of exactly -1, zeros (resets) and large negative values.
    a = -torch.ones(2, L, 8, dtype=F64)
    a[:, 10] = 0.0
    a[:, 20:30, :4] = -1.5 * rand(2, 10, 4)
    a[:, 40:, 4:] = 0.0
    got = sk.linear_scan(a, b, h0)
    pair_close(got, ref_linear(a, b, h0))
    # Pure parity: a = -1, b = 0 gives h_t = (-1)^t h0 exactly.
    h, last = sk.linear_scan(-torch.ones(1, 7, 1, dtype=F64), torch.zeros(1, 7, 1, dtype=F64),
                             torch.ones(1, 1, dtype=F64))
    assert h.flatten().tolist() == [(-1.0) ** t for t in range(1, 8)]
    assert last.item() == -1.0


def test_linear_scan_chunks_compose():
    randn, rand = gen(3)
    a, b, h0 = 2 * rand(2, 40, 6) - 1, randn(2, 40, 6), randn(2, 6)
    h1, s1 = sk.linear_scan(a[:, :13], b[:, :13], h0)
    h2, s2 = sk.linear_scan(a[:, 13:], b[:, 13:], s1)
    pair_close((torch.cat([h1, h2], 1), s2), ref_linear(a, b, h0))


def test_linear_scan_gradcheck():
    randn, rand = gen(4)
    a = (2 * rand(2, 5, 3) - 1).requires_grad_()
    b, h0 = randn(2, 5, 3).requires_grad_(), randn(2, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: sk.linear_scan(*x), (a, b, h0))
    ab = rand(2, 5, 1).requires_grad_()     # broadcast a: gradient sums over the size-1 axis
    assert torch.autograd.gradcheck(lambda *x: sk.linear_scan(*x), (ab, b, h0))


def test_linear_scan_float32():
    randn, rand = gen(5)
    a, b, h0 = 2 * rand(4, 64, 32) - 1, randn(4, 64, 32), randn(4, 32)
    got = sk.linear_scan(a.float(), b.float(), h0.float())
    assert all(x.dtype == F32 for x in got)
    pair_close(got, ref_linear(a, b, h0), rtol=1e-4)


def _grad_path(fn, *args):
    """fn's results on its autograd path (the inputs require grad), detached."""
    args = [None if x is None else x.detach().clone().requires_grad_() for x in args]
    out = fn(*args)
    assert any(x is not None and x.requires_grad for x in out)
    return tuple(None if x is None else x.detach() for x in out)


@pytest.mark.parametrize("L", [1, 2, 3, 7, 16, 17, 64, 300])
def test_linear_scan_no_grad_path_matches_autograd_path(L):
    """Without autograd, linear_scan writes every state in place into one tensor (three
    passes over sub-chunks, the last L mod sub steps one at a time); with inputs that require
    grad it builds them functionally. Both agree with each other and with the loop, for a
    full and for broadcast decays of both signs (zeros included) and a nonzero h0."""
    randn, rand = gen(60 + L)
    b, h0 = randn(2, L, 4, 3), randn(2, 4, 3)
    full = 2 * rand(2, L, 4, 3) - 1
    full[:, L // 2] = 0.0
    for a in (full, rand(2, L, 4, 1), rand(1, L, 1, 3), rand(2, 1, 4, 3)):
        got = sk.linear_scan(a, b, h0)
        assert not got[0].requires_grad
        pair_close(got, ref_linear(a.expand_as(b), b, h0))
        pair_close(got, _grad_path(sk.linear_scan, a, b, h0))
        with torch.no_grad():  # inputs that require grad, autograd off: the in-place path too
            pair_close(sk.linear_scan(*(x.clone().requires_grad_() for x in (a, b, h0))), got,
                       rtol=0)
    got32 = sk.linear_scan(full.float(), b.float(), h0.float())
    assert all(x.dtype == F32 for x in got32)
    pair_close(got32, ref_linear(full, b, h0), rtol=1e-5)


# --------------------------------------------------------------------------- 2. maxplus_scan

@pytest.mark.parametrize("L", LENGTHS)
def test_maxplus_matches_loop(L):
    randn, rand = gen(10 + L)
    a, b, m0 = -3 * rand(2, L, 4, 3), randn(2, L, 4, 3), randn(2, 4, 3)
    pair_close(sk.maxplus_scan(a, b, m0), ref_maxplus(a, b, m0))


def test_maxplus_infinities():
    randn, rand = gen(11)
    L = 64
    a, b = -30 * rand(2, L, 6), randn(2, L, 6)
    m0 = torch.full((2, 6), NEG_INF, dtype=F64)
    b[:, :5, :3] = NEG_INF                   # nothing but -inf for a while
    a[:, 30, 3:] = NEG_INF                   # a hard reset
    a.requires_grad_()
    b.requires_grad_()
    want = ref_maxplus(a, b, m0)
    got = sk.maxplus_scan(a, b, m0)
    for x, r in zip(got, want):
        assert not torch.isnan(x).any()
        assert torch.equal(torch.isinf(x), torch.isinf(r))
        fin = torch.isfinite(r)
        close(x[fin], r[fin])
    # Ties of -inf with -inf make the subgradient a choice, so only finiteness is checked.
    grads = torch.autograd.grad(got[0][torch.isfinite(got[0])].sum(), (a, b))
    assert all(torch.isfinite(g).all() for g in grads)
    # Every input -inf: the answer is -inf, not NaN.
    ninf = torch.full((1, 3, 2), NEG_INF, dtype=F64)
    m, last = sk.maxplus_scan(ninf, ninf, ninf[:, 0])
    assert torch.isneginf(m).all() and torch.isneginf(last).all()


def test_maxplus_gradcheck():
    randn, rand = gen(12)
    a = (-rand(2, 5, 3)).requires_grad_()
    b, m0 = randn(2, 5, 3).requires_grad_(), randn(2, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: sk.maxplus_scan(*x), (a, b, m0))


def test_maxplus_grad_with_neg_inf_state():
    randn, rand = gen(13)
    a = (-rand(2, 9, 3)).requires_grad_()
    b = randn(2, 9, 3).requires_grad_()
    m0 = torch.full((2, 3), NEG_INF, dtype=F64)
    m, last = sk.maxplus_scan(a, b, m0)
    ga, gb = torch.autograd.grad(m.sum() + last.sum(), (a, b))
    rm, rlast = ref_maxplus(a, b, m0)
    ra, rb = torch.autograd.grad(rm.sum() + rlast.sum(), (a, b))
    close(ga, ra)
    close(gb, rb)


@pytest.mark.parametrize("scale", [30.0, 1.0, 1e-6])
def test_maxplus_float32(scale):
    randn, rand = gen(14)
    a, b, m0 = -scale * rand(4, 64, 32), randn(4, 64, 32), randn(4, 32)
    got = sk.maxplus_scan(a.float(), b.float(), m0.float())
    pair_close(got, ref_maxplus(a, b, m0), rtol=1e-4)


# --------------------------------------------------------------------------- 3. linear attention

@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("L", LENGTHS + [50])
def test_linear_attention_matches_loop(L, per_channel, include_current):
    q, k, v, ld, S0 = la_inputs(L, per_channel, seed=L)
    got = sk.chunk_linear_attention(q, k, v, ld, S0, include_current)
    pair_close(got, ref_linear_attention(q, k, v, ld, S0, include_current))


@pytest.mark.parametrize("include_current", [True, False])
def test_linear_attention_leaves_inputs_alone(include_current):
    # One head and a whole number of chunks: the blocked layout of q and k is then a view of
    # the inputs themselves, which the inference path (no autograd) rescales in place.
    q, k, v, ld, S0 = la_inputs(64, True, seed=5, H=1)
    before = [t.clone() for t in (q, k, v, ld, S0)]
    with torch.no_grad():
        got = sk.chunk_linear_attention(q, k, v, ld, S0, include_current, chunk=16)
    for t, b in zip((q, k, v, ld, S0), before):
        assert torch.equal(t, b)
    pair_close(got, ref_linear_attention(q, k, v, ld, S0, include_current))
    qg = q.clone().requires_grad_()
    pair_close(sk.chunk_linear_attention(qg, k, v, ld, S0, include_current, chunk=16), got)


@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_attention_state_only(per_channel):
    q, k, v, ld, S0 = la_inputs(64, per_channel, seed=3)
    o, S = sk.chunk_linear_attention(None, k, v, ld, S0)
    assert o is None
    close(S, ref_linear_attention(None, k, v, ld, S0)[1])


@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_attention_chunks_compose(per_channel):
    q, k, v, ld, S0 = la_inputs(45, per_channel, seed=4)
    o1, s1 = sk.chunk_linear_attention(q[:, :32], k[:, :32], v[:, :32], ld[:, :32], S0)
    o2, s2 = sk.chunk_linear_attention(q[:, 32:], k[:, 32:], v[:, 32:], ld[:, 32:], s1)
    pair_close((torch.cat([o1, o2], 1), s2), ref_linear_attention(q, k, v, ld, S0))


def _loguniform_decay(shape, seed=98):
    """Log-decays spread log-uniformly over [-30, -1e-6]."""
    _, rand = gen(seed)
    lo, hi = torch.log(torch.tensor(1e-6, dtype=F64)), torch.log(torch.tensor(30.0, dtype=F64))
    return -torch.exp(lo + (hi - lo) * rand(*shape))


def _decay_fn(kind):
    if kind == "strong":
        return lambda s: torch.full(s, -30.0, dtype=F64)
    if kind == "weak":
        return lambda s: torch.full(s, -1e-6, dtype=F64)
    if kind == "loguniform":
        return _loguniform_decay

    def zero(s):            # decays of exactly 0 at some steps (and channels)
        x = -gen(97)[1](*s)
        x[:, 3] = NEG_INF
        x[:, 20:23, ..., :1] = NEG_INF
        x[:, -1] = NEG_INF
        return x
    return zero


EXTREMES = ["strong", "weak", "loguniform", "zero"]


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", EXTREMES)
def test_linear_attention_extreme_decays(kind, per_channel, include_current):
    args = [x.requires_grad_() for x in la_inputs(64, per_channel, seed=5,
                                                  decay=_decay_fn(kind))]
    # Gradients too, the -inf log-decays included.
    values_and_grads_close(sk.chunk_linear_attention(*args, include_current),
                           ref_linear_attention(*args, include_current), args)


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_attention_gradcheck(per_channel, include_current):
    args = [x.requires_grad_() for x in la_inputs(5, per_channel, seed=6, B=1, H=2, K=3, V=2)]
    assert torch.autograd.gradcheck(
        lambda *x: sk.chunk_linear_attention(*x, include_current=include_current), args)


@pytest.mark.parametrize("kind", ["random"] + EXTREMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_attention_float32(per_channel, kind):
    decay = None if kind == "random" else _decay_fn(kind)
    args = la_inputs(64, per_channel, seed=7, B=2, H=2, K=16, V=16, decay=decay)
    for inc in (True, False):
        got = sk.chunk_linear_attention(*(x.float() for x in args), include_current=inc)
        assert all(x.dtype == F32 for x in got)
        pair_close(got, ref_linear_attention(*args, include_current=inc), rtol=1e-4)


# --------------------------------------------------------------------------- 4. delta rule

@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kind", ["deltanet", "general"])
@pytest.mark.parametrize("L", LENGTHS)
def test_delta_rule_matches_loop(L, kind, gated):
    args = delta_inputs(L, kind, seed=L, gated=gated)
    pair_close(sk.chunk_delta_rule(*args), ref_delta(*args))


def test_delta_rule_state_only_and_chunks_compose():
    q, r, w, p, v, la, S0 = delta_inputs(40, "general", seed=20)
    o, S = sk.chunk_delta_rule(None, r, w, p, v, la, S0)
    assert o is None
    close(S, ref_delta(None, r, w, p, v, la, S0)[1])
    o1, s1 = sk.chunk_delta_rule(*(x[:, :17] for x in (q, r, w, p, v, la)), S0)
    o2, s2 = sk.chunk_delta_rule(*(x[:, 17:] for x in (q, r, w, p, v, la)), s1)
    pair_close((torch.cat([o1, o2], 1), s2), ref_delta(q, r, w, p, v, la, S0))


def test_delta_rule_negative_eigenvalues():
    # w = (1 + beta) k with |k| = 1: the transition I - w k^T has the eigenvalue -beta.
    q, r, w, p, v, la, S0 = delta_inputs(64, "deltanet", seed=21)
    w2 = w + r
    args = (q, r, w2, w2, v, la, S0)
    pair_close(sk.chunk_delta_rule(*args), ref_delta(*args))


@pytest.mark.parametrize("kind", EXTREMES)
def test_delta_rule_extreme_decays(kind):
    args = [x.requires_grad_() for x in delta_inputs(64, "general", seed=22,
                                                     decay=_decay_fn(kind))]
    values_and_grads_close(sk.chunk_delta_rule(*args), ref_delta(*args), args)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_gradcheck(gated):
    args = [x.requires_grad_() if x is not None else None
            for x in delta_inputs(5, "general", seed=23, B=1, H=2, K=3, V=2, gated=gated)]
    assert torch.autograd.gradcheck(lambda *x: sk.chunk_delta_rule(*x), args)


@pytest.mark.parametrize("decay", ["random"] + EXTREMES)
@pytest.mark.parametrize("kind", ["deltanet", "general"])
def test_delta_rule_float32(kind, decay):
    args = delta_inputs(64, kind, seed=24, B=2, H=2, K=16, V=16,
                        decay=None if decay == "random" else _decay_fn(decay))
    got = sk.chunk_delta_rule(*(x.float() for x in args))
    assert all(x.dtype == F32 for x in got)
    pair_close(got, ref_delta(*args), rtol=1e-4)


# --------------------------------------------------------------------------- 4b. decay per channel

DPLR_KINDS = ["kda", "after", "rwkv7"]


@pytest.mark.parametrize("chunk", [4, 64])
@pytest.mark.parametrize("kind", DPLR_KINDS)
@pytest.mark.parametrize("L", LENGTHS + [37])
def test_dplr_matches_loop(L, kind, chunk):
    q, r, w, p, v, la, S0 = dplr_inputs(L, kind, seed=L)
    if kind == "kda":
        assert w is p   # the shared path
    pair_close(sk.chunk_dplr(q, r, w, p, v, la, S0, chunk=chunk), ref_dplr(q, r, w, p, v, la, S0))


def test_dplr_state_only_and_chunks_compose():
    q, r, w, p, v, la, S0 = dplr_inputs(40, "rwkv7", seed=30)
    o, S = sk.chunk_dplr(None, r, w, p, v, la, S0, chunk=8)
    assert o is None
    close(S, ref_dplr(None, r, w, p, v, la, S0)[1])
    o1, s1 = sk.chunk_dplr(*(x[:, :17] for x in (q, r, w, p, v, la)), S0, chunk=8)
    o2, s2 = sk.chunk_dplr(*(x[:, 17:] for x in (q, r, w, p, v, la)), s1, chunk=8)
    pair_close((torch.cat([o1, o2], 1), s2), ref_dplr(q, r, w, p, v, la, S0))


@pytest.mark.parametrize("kind", EXTREMES)
def test_dplr_extreme_decays(kind):
    """Decays of e^-30, 1 - 1e-6, log-uniform over many scales and exactly 0, per channel:
    values and gradients (the -inf log-decays included)."""
    args = [x.requires_grad_() for x in dplr_inputs(64, "after", seed=31, decay=_decay_fn(kind))]
    values_and_grads_close(sk.chunk_dplr(*args, chunk=16), ref_dplr(*args), args)


@pytest.mark.parametrize("kind", DPLR_KINDS)
def test_dplr_gradcheck(kind):
    args = [x.detach().requires_grad_() for x in dplr_inputs(6, kind, seed=32, B=1, H=2, K=3, V=2)]
    if kind == "kda":   # one tensor for w and p, as the shared path takes it
        args[3] = args[2]
    assert torch.autograd.gradcheck(lambda *x: sk.chunk_dplr(*x, chunk=4), args)


@pytest.mark.parametrize("decay", ["random"] + EXTREMES)
@pytest.mark.parametrize("kind", DPLR_KINDS)
def test_dplr_float32(kind, decay):
    args = dplr_inputs(64, kind, seed=33, B=2, H=2, K=16, V=16,
                       decay=None if decay == "random" else _decay_fn(decay))
    got = sk.chunk_dplr(*(x.float() for x in args))
    assert all(x.dtype == F32 for x in got)
    pair_close(got, ref_dplr(*args), rtol=1e-4)


def dplr_rank_inputs(L, R, seed=0, B=2, H=3, K=4, V=5, M=None):
    randn, rand = gen(seed)
    q = randn(B, L, H, K)
    if M is None:
        p, v = 0.5 * randn(B, L, H, K), randn(B, L, H, V)
    else:
        p, v = 0.5 * randn(B, L, H, M, K), randn(B, L, H, M, V)
    r = F.normalize(randn(B, L, H, R, K), dim=-1)
    w = 0.3 * randn(B, L, H, R, K)
    return q, r, w, p, v, -rand(B, L, H, K), randn(B, H, K, V)


@pytest.mark.parametrize("include", [True, False], ids=["new", "old"])
@pytest.mark.parametrize("R,M", [(2, None), (3, None), (1, 2), (3, 3)])
@pytest.mark.parametrize("L,chunk", [(1, 4), (7, 4), (37, 8), (100, 64)])
def test_dplr_rank_matches_loop(L, chunk, R, M, include):
    """R erase terms per step (a DeltaProduct step composed into one transition) and M input
    terms: the triangular system over (step, term) pairs, the inputs in one pass."""
    args = dplr_rank_inputs(L, R, seed=L + R, M=M)
    pair_close(sk.chunk_dplr(*args, chunk=chunk, include_current=include),
               ref_dplr_rank(*args, include_current=include))


def test_dplr_rank_gradcheck():
    args = [x.requires_grad_() for x in dplr_rank_inputs(6, 2, seed=40, B=1, H=2, K=3, V=2)]
    assert torch.autograd.gradcheck(lambda *x: sk.chunk_dplr(*x, chunk=4), args)


def _per_head(args):
    """The same inputs with one log-decay per head: log_alpha [B, L, H, 1] (channel 0's)."""
    *head, la, S0 = args
    return (*head, la[..., :1].contiguous(), S0)


@pytest.mark.parametrize("include", [True, False], ids=["new", "old"])
@pytest.mark.parametrize("decay", ["random"] + EXTREMES)
@pytest.mark.parametrize("R,M", [(1, None), (3, None), (3, 3)])
@pytest.mark.parametrize("L,chunk", [(1, 4), (37, 8), (100, 64)])
def test_dplr_one_decay_per_head(L, chunk, R, M, decay, include):
    """log_alpha [B, L, H, 1] (Gated DeltaProduct) takes the plain-product path: values and
    gradients against the loop with that decay on every channel, the -inf decays included."""
    args = dplr_rank_inputs(L, R, seed=L + R + 7, M=M)
    if decay != "random":
        la = _decay_fn(decay)(args[5].shape) if L > 3 else args[5].clone()
        if decay == "zero":   # a decay of exactly 0 inside every block, L = 1 included
            la[:, L // 2] = NEG_INF
        args = (*args[:5], la, args[6])
    args = [x.requires_grad_() for x in _per_head(args)]
    want = ref_dplr_rank(*args[:5], args[5].expand_as(args[0]), args[6], include_current=include)
    values_and_grads_close(sk.chunk_dplr(*args, chunk=chunk, include_current=include), want, args)


def test_dplr_one_decay_per_head_gradcheck():
    args = [x.requires_grad_() for x in _per_head(dplr_rank_inputs(6, 2, seed=41, B=1, H=2, K=3, V=2))]
    assert torch.autograd.gradcheck(lambda *x: sk.chunk_dplr(*x, chunk=4), args)


def test_dplr_one_decay_per_head_shared_path():
    """w is p (KDA's one tensor) with one decay per head."""
    q, r, w, p, v, la, S0 = _per_head(dplr_inputs(37, "kda", seed=42))
    assert w is p
    want = ref_dplr(q, r, w, p, v, la.expand_as(q), S0)
    pair_close(sk.chunk_dplr(q, r, w, p, v, la, S0, chunk=8), want)


# --------------------------------------------------------------------------- 5. dense_scan

@pytest.mark.parametrize("L", LENGTHS)
def test_dense_scan_matches_loop(L):
    args = dense_inputs(L, seed=L)
    pair_close(sk.dense_scan(*args), ref_dense(*args))


def test_dense_scan_shared_and_singular_transitions():
    A, b, h0 = dense_inputs(64, seed=30)
    A = A.clone()
    A[:, 5] = 0.0                               # a reset
    A[:, 9] = -torch.eye(4, dtype=F64)          # a sign flip
    pair_close(sk.dense_scan(A, b, h0), ref_dense(A, b, h0))
    shared = A[:1]                              # one transition sequence for every batch row
    pair_close(sk.dense_scan(shared, b, h0), ref_dense(shared.expand_as(A), b, h0))


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_dense_scan_any_sub_chunk(chunk):
    """The two levels at any sub-chunk length: one step each (the chain alone), lengths that
    leave the last sub-chunk short (identity steps after the block), and one sub-chunk
    longer than the block (the first level alone); a transition shared by every batch row."""
    A, b, h0 = dense_inputs(37, seed=33, B=3, n=5)
    pair_close(sk.dense_scan(A, b, h0, chunk=chunk), ref_dense(A, b, h0))
    pair_close(sk.dense_scan(A[:1], b, h0, chunk=chunk), ref_dense(A[:1].expand_as(A), b, h0))


def test_dense_scan_gradcheck():
    args = [x.requires_grad_() for x in dense_inputs(5, seed=31, B=2, n=3)]
    assert torch.autograd.gradcheck(lambda *x: sk.dense_scan(*x), args)


def test_dense_scan_float32():
    args = dense_inputs(64, seed=32, B=4, n=6)
    got = sk.dense_scan(*(x.float() for x in args))
    pair_close(got, ref_dense(*args), rtol=1e-4)


# --------------------------------------------------------------------------- 6. long blocks
# chunk_linear_attention and chunk_delta_rule take blocks of any length: chunks batched
# together, the state chained from chunk to chunk, and long blocks worked through in groups
# of chunks. Checked against the float64 loops from a nonzero state, outputs and last state.

LONG = [1, 63, 64, 65, 200, 1000]
_REFS = {}


def _ref_cached(key, fn, *args):
    """The loops cost ~25 ms per 1000 steps: each reference is computed once per module."""
    if key not in _REFS:
        _REFS[key] = fn(*args)
    return _REFS[key]


def _groups_of(monkeypatch, chunks, BH, c):
    """Long blocks in groups of about `chunks` chunks of c steps at B * H = BH (one chunk
    per group for chunks = 1). The default groups hold all chunks at the test sizes, except
    at L = 1000 with chunk = 64 (2 groups of 10 and 6 chunks)."""
    monkeypatch.setattr(sk, "_GROUP_ELEMENTS", chunks * BH * c * c)


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("L", LONG)
def test_linear_attention_long(L, chunk):
    for per_channel in (False, True):
        q, k, v, ld, S0 = la_inputs(L, per_channel, seed=100 + L)
        for inc in (True, False):
            want = _ref_cached(("la", L, per_channel, inc), ref_linear_attention,
                               q, k, v, ld, S0, inc)
            pair_close(sk.chunk_linear_attention(q, k, v, ld, S0, inc, chunk=chunk), want)
        o, S = sk.chunk_linear_attention(None, k, v, ld, S0, chunk=chunk)
        assert o is None
        close(S, want[1])


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("L", LONG)
def test_delta_rule_long(L, chunk):
    for kind in ("deltanet", "general"):
        for gated in (True, False):
            q, r, w, p, v, la, S0 = delta_inputs(L, kind, seed=200 + L, gated=gated)
            want = _ref_cached(("delta", L, kind, gated), ref_delta, q, r, w, p, v, la, S0)
            # kind 'deltanet' passes w itself as p (the shared path) and also a copy of it
            # (the general path with equal values).
            ps = (p, p.clone()) if kind == "deltanet" else (p,)
            for p_ in ps:
                pair_close(sk.chunk_delta_rule(q, r, w, p_, v, la, S0, chunk=chunk), want)
            o, S = sk.chunk_delta_rule(None, r, w, p, v, la, S0, chunk=chunk)
            assert o is None
            close(S, want[1])


@pytest.mark.parametrize("chunk", [1, 5, 16, 40])
def test_long_odd_chunks_and_groups(chunk, monkeypatch):
    """Chunk sizes that do not divide L (balanced chunks, and the per-channel rounding up to
    a power of two), in groups of 2 or 3 chunks."""
    L = 200
    _groups_of(monkeypatch, 2, 6, chunk)
    for per_channel in (False, True):
        q, k, v, ld, S0 = la_inputs(L, per_channel, seed=100 + L)
        for inc in (True, False):
            want = _ref_cached(("la", L, per_channel, inc), ref_linear_attention,
                               q, k, v, ld, S0, inc)
            pair_close(sk.chunk_linear_attention(q, k, v, ld, S0, inc, chunk=chunk), want)
    for kind in ("deltanet", "general"):
        q, r, w, p, v, la, S0 = delta_inputs(L, kind, seed=200 + L)
        want = _ref_cached(("delta", L, kind, True), ref_delta, q, r, w, p, v, la, S0)
        pair_close(sk.chunk_delta_rule(q, r, w, p, v, la, S0, chunk=chunk), want)


@pytest.mark.parametrize("groups", ["batched", "one chunk each"])
def test_chunk_forms_no_grad_path_matches_autograd_path(groups, monkeypatch):
    """Without autograd the chunk forms chain the chunk states in place and copy each group's
    outputs into one tensor; with inputs that require grad they stack and concatenate. Same
    results, and the same as the loops, over 37 steps in chunks of 8 (the last one partial),
    in one group or one group per chunk, with and without queries, from a nonzero state."""
    L, chunk = 37, 8
    if groups != "batched":
        _groups_of(monkeypatch, 1, 3, chunk)
    for per_channel in (False, True):
        q, k, v, ld, S0 = la_inputs(L, per_channel, seed=300)
        for inc in (True, False):
            fn = lambda *x: sk.chunk_linear_attention(*x, include_current=inc, chunk=chunk)  # noqa: B023,E731
            got = fn(q, k, v, ld, S0)
            pair_close(got, ref_linear_attention(q, k, v, ld, S0, inc))
            pair_close(got, _grad_path(fn, q, k, v, ld, S0))
        got = sk.chunk_linear_attention(None, k, v, ld, S0, chunk=chunk)
        assert got[0] is None
        close(got[1], _grad_path(lambda *x: sk.chunk_linear_attention(None, *x, chunk=chunk),
                                 k, v, ld, S0)[1])
    for kind in ("deltanet", "general"):
        q, r, w, p, v, la, S0 = delta_inputs(L, kind, seed=301)
        got = sk.chunk_delta_rule(q, r, w, p, v, la, S0, chunk=chunk)
        pair_close(got, ref_delta(q, r, w, p, v, la, S0))
        shared = p is w  # deltanet: w itself as p, the kernel's shorter path, on both paths
        pair_close(got, _grad_path(
            lambda q, r, w, p, v, la, S0: sk.chunk_delta_rule(q, r, w, w if shared else p, v, la,
                                                              S0, chunk=chunk),
            q, r, w, p, v, la, S0))


def test_long_chunk_must_be_positive():
    q, k, v, ld, S0 = la_inputs(8, False)
    with pytest.raises(ValueError):
        sk.chunk_linear_attention(q, k, v, ld, S0, chunk=0)


@pytest.mark.parametrize("groups", ["batched", "one chunk each"])
@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_attention_long_gradcheck(per_channel, include_current, groups, monkeypatch):
    """chunk=2 over 7 steps: 4 chunks (the last one padded) in one group, or one by one."""
    if groups != "batched":
        _groups_of(monkeypatch, 1, 2, 2)
    args = [x.requires_grad_() for x in la_inputs(7, per_channel, seed=106, B=1, H=2, K=3,
                                                  V=2)]
    assert torch.autograd.gradcheck(
        lambda *x: sk.chunk_linear_attention(*x, include_current=include_current, chunk=2),
        args)


@pytest.mark.parametrize("groups", ["batched", "one chunk each"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_long_gradcheck(gated, shared, groups, monkeypatch):
    """As above; shared passes w itself as p (the shorter path for w = p)."""
    if groups != "batched":
        _groups_of(monkeypatch, 1, 2, 2)
    q, r, w, p, v, la, S0 = delta_inputs(7, "general", seed=107, B=1, H=2, K=3, V=2,
                                         gated=gated)
    args = [x.requires_grad_() for x in (q, r, w, p, v, S0)]
    if gated:
        args.append(la.requires_grad_())

    def fn(q, r, w, p, v, S0, la=None):
        return sk.chunk_delta_rule(q, r, w, w if shared else p, v, la, S0, chunk=2)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("kind", EXTREMES)
def test_linear_attention_long_extreme_decays(kind):
    """200 steps in chunks of 16: values and gradients against the loop's autograd, the
    -inf log-decays included, for both decay shapes and both read orders."""
    for per_channel in (False, True):
        args = [x.requires_grad_() for x in la_inputs(200, per_channel, seed=108,
                                                      decay=_decay_fn(kind))]
        for inc in (True, False):
            values_and_grads_close(sk.chunk_linear_attention(*args, inc, chunk=16),
                                   ref_linear_attention(*args, inc), args)


@pytest.mark.parametrize("kind", EXTREMES)
def test_delta_rule_long_extreme_decays(kind):
    for shared in (False, True):
        q, r, w, p, v, la, S0 = delta_inputs(200, "general", seed=109, decay=_decay_fn(kind))
        args = [x.requires_grad_() for x in (q, r, w, p, v, la, S0)]
        q, r, w, p, v, la, S0 = args
        p_ = w if shared else p
        values_and_grads_close(sk.chunk_delta_rule(q, r, w, p_, v, la, S0, chunk=16),
                               ref_delta(q, r, w, p_, v, la, S0), args, allow_unused=True)


@pytest.mark.parametrize("kind", ["random"] + EXTREMES)
def test_long_float32(kind):
    """1000 steps in float32 (chunks of 64, 16 chunks in 2 groups at these sizes)."""
    decay = None if kind == "random" else _decay_fn(kind)
    for per_channel in (False, True):
        args = la_inputs(1000, per_channel, seed=110, B=2, H=2, K=16, V=16, decay=decay)
        got = sk.chunk_linear_attention(*(x.float() for x in args))
        assert all(x.dtype == F32 for x in got)
        pair_close(got, ref_linear_attention(*args), rtol=1e-4)
    dargs = delta_inputs(1000, "deltanet", seed=111, B=2, H=2, K=16, V=16, decay=decay)
    q, r, w, p, v, la, S0 = (x.float() for x in dargs)
    got = sk.chunk_delta_rule(q, r, w, w, v, la, S0)
    assert all(x.dtype == F32 for x in got)
    pair_close(got, ref_delta(*dargs), rtol=1e-4)


# --------------------------------------------------------------------------- timings

def _ms(fn, reps=10):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3


@pytest.mark.parametrize("L", [64, 512])
def test_timings(L):
    """Prints CPU ms per call (best of a few) at B=4, H=4, K=V=64 for one chunk (L=64) and
    a block of 8 chunks (L=512); asserts finiteness. Thread CPU time, which a loaded machine
    disturbs less than wall time."""
    B, H, K, V = 4, 4, 64, 64
    randn, rand = gen(40)
    q, k, v = randn(B, L, H, K, dtype=F32), randn(B, L, H, K, dtype=F32), randn(B, L, H, V,
                                                                                dtype=F32)
    S0 = randn(B, H, K, V, dtype=F32)
    kn = F.normalize(k, dim=-1)
    w = rand(B, L, H, 1, dtype=F32) * kn
    ld1, ldk, la = -rand(B, L, H, 1, dtype=F32), -rand(B, L, H, K, dtype=F32), -rand(B, L, H,
                                                                                  dtype=F32)
    runs = {
        "linear_attention scalar decay": lambda: sk.chunk_linear_attention(q, k, v, ld1, S0),
        "linear_attention per-channel decay": lambda: sk.chunk_linear_attention(
            q, k, v, ldk, S0),
        "delta_rule gated (p is w)": lambda: sk.chunk_delta_rule(q, kn, w, w, v, la, S0),
    }
    for name, fn in runs.items():
        o, S = fn()
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        print(f"\n  {name}, L={L}: {_ms(fn, 10 if L <= 64 else 3):.2f} ms (float32, forward, "
              f"{torch.get_num_threads()} thread)", end="")
