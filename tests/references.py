"""Hand-written reference loops, one per example, in plain PyTorch.

Written from the papers' formulas (matrix / vector notation), not from the .rnn text
or from anything in rnnc.  They compute in the dtype they are given (use float64 for
1e-10 comparisons) and support autograd.

Calling convention of every ``ref_<name>``:

    ref_<name>(params, inputs, initial_state=None) -> (outputs, final_state)

- params: {param name (as in the spec): tensor}
- inputs: list of tensors [B, T, *per-step shape], in header order
- initial_state: None (the spec's initial values) or {state name: [B, *shape]}
- outputs: tensor [B, T, *shape] (all examples have a single output)
- final_state: {state name: [B, *shape]}

Conventions used below: per-step vectors are row vectors batched on the left, so a
matrix-vector product ``W x`` is written ``x @ W.T``; matrix states S[K, V] follow the
linear-attention convention o = S^T q, S <- A S + k v^T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _state(initial_state, name, like, shape, fill=0.0):
    """The initial value of one state: from initial_state if given, else a constant."""
    if initial_state is not None and name in initial_state:
        return initial_state[name].to(like.dtype)
    return torch.full(shape, fill, dtype=like.dtype, device=like.device)


def _outer(a, b):
    """Batched outer product a[..., K] (x) b[..., V] -> [..., K, V]."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


# ---------------------------------------------------------------------------
# Classic nonlinear RNNs
# ---------------------------------------------------------------------------

def ref_elman(params, inputs, initial_state=None):
    """Elman (1990): h_t = tanh(W x_t + U h_{t-1} + b)."""
    (x,) = inputs
    B, T, _ = x.shape
    W, U, b = params["W"], params["U"], params["b"]
    h = _state(initial_state, "h", x, (B, W.shape[0]))
    ys = []
    for t in range(T):
        h = torch.tanh(x[:, t] @ W.T + h @ U.T + b)
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def ref_lstm(params, inputs, initial_state=None):
    """LSTM (Hochreiter & Schmidhuber 1997, with forget gate; torch.nn.LSTM's equations)."""
    (x,) = inputs
    B, T, _ = x.shape
    p = params
    H = p["Wi"].shape[0]
    h = _state(initial_state, "h", x, (B, H))
    c = _state(initial_state, "c", x, (B, H))
    ys = []
    for t in range(T):
        xt = x[:, t]
        i = torch.sigmoid(xt @ p["Wi"].T + h @ p["Ui"].T + p["bi"])
        f = torch.sigmoid(xt @ p["Wf"].T + h @ p["Uf"].T + p["bf"])
        g = torch.tanh(xt @ p["Wg"].T + h @ p["Ug"].T + p["bg"])
        o = torch.sigmoid(xt @ p["Wo"].T + h @ p["Uo"].T + p["bo"])
        c = f * c + i * g
        h = o * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys, 1), {"h": h, "c": c}


def ref_gru(params, inputs, initial_state=None):
    """GRU (Cho et al. 2014) in torch.nn.GRU's form: the hidden bias b_hn is inside r *(.)."""
    (x,) = inputs
    B, T, _ = x.shape
    p = params
    H = p["Wr"].shape[0]
    h = _state(initial_state, "h", x, (B, H))
    ys = []
    for t in range(T):
        xt = x[:, t]
        r = torch.sigmoid(xt @ p["Wr"].T + p["br"] + h @ p["Ur"].T)
        z = torch.sigmoid(xt @ p["Wz"].T + p["bz"] + h @ p["Uz"].T)
        n = torch.tanh(xt @ p["Wn"].T + p["bn"] + r * (h @ p["Un"].T + p["bhn"]))
        h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def ref_slstm(params, inputs, initial_state=None):
    """sLSTM (Beck et al. 2024), computed UNSTABILIZED:

        c_t = f_t c_{t-1} + i_t z_t,  n_t = f_t n_{t-1} + i_t,  h_t = o_t c_t / n_t
        with i_t = exp(i~_t) and f_t = sigmoid(f~_t) = exp(logsigmoid(f~_t)).

    The spec carries the stabilized pair (c e^{-m}, n e^{-m}) with
    m_t = max(log f_t + m_{t-1}, log i_t); h is unchanged by the rescaling.  The
    stabilizer m is tracked separately here only to report the final state in the
    spec's (stabilized) coordinates.
    """
    (x,) = inputs
    B, T, _ = x.shape
    p = params
    H = p["Wi"].shape[0]
    h = _state(initial_state, "h", x, (B, H))
    c_s = _state(initial_state, "c", x, (B, H))
    n_s = _state(initial_state, "n", x, (B, H))
    m = _state(initial_state, "m", x, (B, H))
    # unstabilized carried values
    c = c_s * torch.exp(m)
    n = n_s * torch.exp(m)
    ys = []
    for t in range(T):
        xt = x[:, t]
        log_i = xt @ p["Wi"].T + h @ p["Ri"].T + p["bi"]
        f = torch.sigmoid(xt @ p["Wf"].T + h @ p["Rf"].T + p["bf"])
        z = torch.tanh(xt @ p["Wz"].T + h @ p["Rz"].T + p["bz"])
        o = torch.sigmoid(xt @ p["Wo"].T + h @ p["Ro"].T + p["bo"])
        i = torch.exp(log_i)
        c = f * c + i * z
        n = f * n + i
        m = torch.maximum(torch.log(f) + m, log_i)
        h = o * (c / n)
        ys.append(h)
    return torch.stack(ys, 1), {"h": h, "c": c * torch.exp(-m), "n": n * torch.exp(-m), "m": m}


# ---------------------------------------------------------------------------
# Gated linear RNNs with elementwise (diagonal) state
# ---------------------------------------------------------------------------

def ref_mingru(params, inputs, initial_state=None):
    """minGRU (Feng et al. 2024): z = sigma(Lin_z x), h~ = Lin_h x, h = (1-z) h + z h~."""
    (x,) = inputs
    B, T, _ = x.shape
    Wz, Wh = params["Wz"], params["Wh"]
    h = _state(initial_state, "h", x, (B, Wz.shape[0]))
    z = torch.sigmoid(x @ Wz.T)
    htil = x @ Wh.T
    ys = []
    for t in range(T):
        h = torch.lerp(h, htil[:, t], z[:, t])  # (1-z) h + z h~
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def ref_minlstm(params, inputs, initial_state=None):
    """minLSTM (Feng et al. 2024): f' = f/(f+i), i' = i/(f+i), h = f' h + i' h~."""
    (x,) = inputs
    B, T, _ = x.shape
    f = torch.sigmoid(x @ params["Wf"].T)
    i = torch.sigmoid(x @ params["Wi"].T)
    htil = x @ params["Wh"].T
    fn, inorm = f / (f + i), i / (f + i)
    h = _state(initial_state, "h", x, (B, f.shape[-1]))
    ys = []
    for t in range(T):
        h = fn[:, t] * h + inorm[:, t] * htil[:, t]
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def ref_rglru(params, inputs, initial_state=None):
    """RG-LRU (De et al. 2024, Griffin): a = sigma(Lambda)^(c r), c = 8,
    h = a h + sqrt(1 - a^2) (i x)."""
    (x,) = inputs
    B, T, D = x.shape
    p = params
    r = torch.sigmoid(x @ p["Wa"].T + p["ba"])
    i = torch.sigmoid(x @ p["Wx"].T + p["bx"])
    a = torch.sigmoid(p["lam"]) ** (8.0 * r)
    h = _state(initial_state, "h", x, (B, D))
    ys = []
    for t in range(T):
        h = a[:, t] * h + torch.sqrt(1 - a[:, t] ** 2) * (i[:, t] * x[:, t])
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def ref_hgrn(params, inputs, initial_state=None):
    """HGRN recurrence as in fla: h = exp(g) h + x (g a log forget gate)."""
    x, g = inputs
    B, T, D = x.shape
    h = _state(initial_state, "h", x, (B, D))
    ys = []
    for t in range(T):
        h = torch.exp(g[:, t]) * h + x[:, t]
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def _diag_ssm(h, dA, dBx, C, D, x):
    """One ZOH step of a diagonal SSM with state h[B, D, N]:
    h <- dA h + dBx, y = C h + D x."""
    h = dA * h + dBx
    y = torch.einsum("bdn,bdn->bd", C, h) + D * x
    return h, y


def ref_s6(params, inputs, initial_state=None):
    """Mamba S6 (Gu & Dao 2023), dt already positive:
    A = -exp(A_log), dA = exp(dt A), dB x = dt B x, y = C h + D x."""
    x, dt, Bm, Cm = inputs
    Bsz, T, Dd = x.shape
    N = Bm.shape[-1]
    A = -torch.exp(params["A_log"])  # [D, N]
    h = _state(initial_state, "h", x, (Bsz, Dd, N))
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t, :, None] * A)                          # [B, D, N]
        dBx = (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]     # [B, D, N]
        Cb = Cm[:, t, None, :].expand(Bsz, Dd, N)
        h, y = _diag_ssm(h, dA, dBx, Cb, params["Dskip"], x[:, t])
        ys.append(y)
    return torch.stack(ys, 1), {"h": h}


def ref_s4d(params, inputs, initial_state=None):
    """S4D-Real (Gu et al. 2022), time invariant, ZOH-style decay exp(dt A) with the
    simplified input matrix dt B: dt = exp(log_dt), A = -exp(A_log)."""
    (x,) = inputs
    Bsz, T, Dd = x.shape
    p = params
    dt = torch.exp(p["log_dt"])                 # [D]
    A = -torch.exp(p["A_log"])                  # [D, N]
    dA = torch.exp(dt[:, None] * A)             # [D, N]
    dB = dt[:, None] * p["Bp"]                  # [D, N]
    N = A.shape[-1]
    h = _state(initial_state, "h", x, (Bsz, Dd, N))
    Cb = p["Cp"].expand(Bsz, Dd, N)
    ys = []
    for t in range(T):
        h, y = _diag_ssm(h, dA, dB * x[:, t, :, None], Cb, p["Dskip"], x[:, t])
        ys.append(y)
    return torch.stack(ys, 1), {"h": h}


# ---------------------------------------------------------------------------
# Linear attention family: matrix state S[H, K, V], o = S^T q
# ---------------------------------------------------------------------------

def _readout(q, S):
    """o[b, h, :] = S[b, h]^T q[b, h]."""
    return (S.transpose(-1, -2) @ q.unsqueeze(-1)).squeeze(-1)


def ref_retnet(params, inputs, initial_state=None):
    """Retention (Sun et al. 2023), recurrent form: S = gamma S + k v^T, o = S^T q."""
    q, k, v = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    gamma = params["gamma"][None, :, None, None]
    S = _state(initial_state, "S", q, (B, H, K, V))
    ys = []
    for t in range(T):
        S = gamma * S + _outer(k[:, t], v[:, t])
        ys.append(_readout(q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def ref_gla(params, inputs, initial_state=None):
    """GLA (Yang et al. 2024): S = diag(alpha) S + k v^T, alpha = exp(g), o = S^T q."""
    q, k, v, g = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = _state(initial_state, "S", q, (B, H, K, V))
    ys = []
    for t in range(T):
        S = torch.diag_embed(torch.exp(g[:, t])) @ S + _outer(k[:, t], v[:, t])
        ys.append(_readout(q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def ref_hgrn2(params, inputs, initial_state=None):
    """HGRN2 (Qin et al. 2024): a = lb + (1 - lb) sigmoid(f) per key channel,
    S = diag(a) S + (1 - a) v^T, o = S^T q."""
    q, f, v = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    lb = params["lb"][:, None]                         # [H, 1]
    S = _state(initial_state, "S", q, (B, H, K, V))
    ys = []
    for t in range(T):
        a = lb + (1 - lb) * torch.sigmoid(f[:, t])     # [B, H, K]
        S = a[..., None] * S + _outer(1 - a, v[:, t])
        ys.append(_readout(q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def ref_mamba2(params, inputs, initial_state=None):
    """Mamba-2 SSD (Dao & Gu 2024), per head h with scalar a_t = exp(dt A), A = -exp(A_log):
    S = a S + dt B x^T (S[N, P]), y = S^T C + D x."""
    x, dt, Bm, Cm = inputs
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    A = -torch.exp(params["A_log"])  # [H]
    Dskip = params["Dskip"]
    S = _state(initial_state, "S", x, (Bsz, H, N, P))
    ys = []
    for t in range(T):
        a = torch.exp(dt[:, t] * A)  # [B, H]
        S = a[..., None, None] * S + dt[:, t, :, None, None] * _outer(Bm[:, t], x[:, t])
        ys.append(_readout(Cm[:, t], S) + Dskip[:, None] * x[:, t])
    return torch.stack(ys, 1), {"S": S}


def ref_deltanet(params, inputs, initial_state=None):
    """DeltaNet (Schlag et al. 2021): S = (I - beta k k^T) S + beta k v^T, o = S^T q,
    with the generalized Householder matrix built explicitly."""
    q, k, v, beta = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    S = _state(initial_state, "S", q, (B, H, K, V))
    ys = []
    for t in range(T):
        S = _householder(S, eye, k[:, t], v[:, t], beta[:, t])
        ys.append(_readout(q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def _householder(S, eye, k, v, b):
    """One delta-rule step with the generalized Householder matrix built explicitly:
    (I - b k k^T) S + b k v^T; k [B, H, K], v [B, H, V], b [B, H]."""
    b = b[..., None, None]
    return (eye - b * _outer(k, k)) @ S + b * _outer(k, v)


def ref_gated_deltanet(params, inputs, initial_state=None):
    """Gated DeltaNet (Yang et al. 2025): S = alpha (I - beta k k^T) S + beta k v^T."""
    q, k, v, alpha, beta = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    S = _state(initial_state, "S", q, (B, H, K, V))
    ys = []
    for t in range(T):
        a = alpha[:, t, :, None, None]
        b = beta[:, t, :, None, None]
        kt = k[:, t]
        S = a * ((eye - b * _outer(kt, kt)) @ S) + b * _outer(kt, v[:, t])
        ys.append(_readout(q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def ref_mlstm(params, inputs, initial_state=None):
    """mLSTM (Beck et al. 2024), computed UNSTABILIZED:

        C = e^{lf} C + e^{ig} k v^T,  n = e^{lf} n + e^{ig} k,
        o = C^T q / max(|q^T n|, 1),  lf = logsigmoid(fg).

    The spec carries (C e^{-m}, n e^{-m}, m) with m_t = max(lf + m_{t-1}, ig_t),
    m_0 = -inf; m is tracked separately only to report the final state in the spec's
    coordinates (an initial state is converted back with C = C_s e^{m})."""
    q, k, v, ig, fg = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    C_s = _state(initial_state, "C", q, (B, H, K, V))
    n_s = _state(initial_state, "n", q, (B, H, K))
    m = _state(initial_state, "m", q, (B, H), fill=float("-inf"))
    # e^{-inf} * 0 = 0 for the default initial state
    C = C_s * torch.exp(m)[..., None, None]
    n = n_s * torch.exp(m)[..., None]
    ys = []
    for t in range(T):
        f = torch.sigmoid(fg[:, t])
        i = torch.exp(ig[:, t])
        C = f[..., None, None] * C + i[..., None, None] * _outer(k[:, t], v[:, t])
        n = f[..., None] * n + i[..., None] * k[:, t]
        m = torch.maximum(torch.log(f) + m, ig[:, t])
        qt = q[:, t]
        den = torch.clamp((qt * n).sum(-1).abs(), min=1.0)
        ys.append(_readout(qt, C) / den[..., None])
    em = torch.exp(-m)
    return torch.stack(ys, 1), {"C": C * em[..., None, None], "n": n * em[..., None], "m": m}


def ref_rwkv6(params, inputs, initial_state=None):
    """RWKV-6 (Peng et al. 2024) WKV: o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T."""
    r, k, v, w = inputs
    B, T, H, K = r.shape
    V = v.shape[-1]
    u = params["u"]  # [H, K]
    S = _state(initial_state, "S", r, (B, H, K, V))
    ys = []
    for t in range(T):
        kv = _outer(k[:, t], v[:, t])
        ys.append(_readout(r[:, t], S + u[None, :, :, None] * kv))
        S = torch.diag_embed(torch.exp(w[:, t])) @ S + kv
    return torch.stack(ys, 1), {"S": S}


def ref_kda(params, inputs, initial_state=None):
    """Kimi Delta Attention: S = (I - beta k k^T) diag(exp g) S + beta k v^T, o = S^T q,
    with the Householder-like matrix and the decay built explicitly."""
    q, k, v, g, beta = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    S = _state(initial_state, "S", q, (B, H, K, V))
    ys = []
    for t in range(T):
        b = beta[:, t, :, None, None]
        kt = k[:, t]
        S = (eye - b * _outer(kt, kt)) @ (torch.diag_embed(torch.exp(g[:, t])) @ S) \
            + b * _outer(kt, v[:, t])
        ys.append(_readout(q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def ref_rwkv7(params, inputs, initial_state=None):
    """RWKV-7: S = (diag(exp w) - (a * kk) kk^T) S + k v^T,
    o = S^T r + (sum_i r_i rk_i k_i) v, the transition built explicitly."""
    r, w, k, v, kk, a = inputs
    B, T, H, K = r.shape
    V = v.shape[-1]
    S = _state(initial_state, "S", r, (B, H, K, V))
    ys = []
    for t in range(T):
        M = torch.diag_embed(torch.exp(w[:, t])) - _outer(a[:, t] * kk[:, t], kk[:, t])
        S = M @ S + _outer(k[:, t], v[:, t])
        bonus = (r[:, t] * params["rk"] * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        ys.append(_readout(r[:, t], S) + bonus)
    return torch.stack(ys, 1), {"S": S}


def ref_gated_deltaproduct(params, inputs, initial_state=None):
    """Gated DeltaProduct with two Householder steps per token:
    S = (I - b2 k2 k2^T)(I - b1 k1 k1^T) a S + (I - b2 k2 k2^T) b1 k1 v1^T + b2 k2 v2^T."""
    q, k1, v1, b1, k2, v2, b2, a = inputs
    B, T, H, K = q.shape
    V = v1.shape[-1]
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    S = _state(initial_state, "S", q, (B, H, K, V))
    ys = []
    for t in range(T):
        S = a[:, t, :, None, None] * S
        for k, v, b in ((k1, v1, b1), (k2, v2, b2)):
            S = _householder(S, eye, k[:, t], v[:, t], b[:, t])
        ys.append(_readout(q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


REFERENCES = {name[len("ref_"):]: fn for name, fn in globals().items()
              if name.startswith("ref_") and callable(fn)}
