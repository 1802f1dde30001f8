"""Adapters from rnnc's calling convention to external oracles (torch.nn and fla-core).

Every ``oracle_<name>`` has the same signature as the loops in references.py:

    oracle_<name>(params, inputs, initial_state=None) -> (outputs, final_state)

with inputs [B, T, *shape] in header order and states {name: [B, *shape]}.  Outputs are
returned in the dtype of the inputs, but fla computes in fp32: compare fla-backed
oracles at a relative tolerance near 1e-5, not 1e-12.

For the torch.nn cells there are also helpers that go the other way (the direction of
PEERS.md): build a randomly initialized torch.nn.RNN/LSTM/GRU, map its weights onto
rnnc's param names (``torch_to_params``) and run it (``run_torch``).

fla-core 0.6.0 traps, found by reading the installed source (fla/ops/*/naive.py,
fla/ops/rwkv6/recurrent_naive.py) and checked numerically against references.py:

 1. Importing anything under ``fla.ops`` needs triton (fla/ops/__init__.py imports
    every Triton kernel) and takes ~7 s; it warns "roll back to CPU".  Import lazily.
 2. Every naive function casts to fp32 internally (``.float()``); float64 inputs lose
    precision silently.  Some outputs are cast back to the input dtype, some are not:
    ``naive_recurrent_gated_delta_rule`` returns o in fp32 whatever the input dtype;
    all final states are fp32.  The adapters cast back.
 3. Scale: ``naive_recurrent_gla`` and ``delta_rule_recurrence`` HARD-CODE
    q * K**-0.5 (no scale argument): multiply q by K**0.5 first.
    ``naive_recurrent_simple_gla``, ``naive_recurrent_gated_delta_rule`` and
    ``naive_recurrent_rwkv6`` take ``scale=None`` meaning K**-0.5: pass scale=1.0.
 4. Layout: gla, simple_gla, gated_delta_rule take [B, T, H, K];
    ``delta_rule_recurrence`` and ``naive_recurrent_rwkv6`` take [B, H, T, K]
    (beta [B, H, T], w [B, H, T, K]); hgrn takes [B, T, D].
    States are [B, H, K, V] (hgrn [B, D]) in every case, the same as rnnc's S[H, K, V].
 5. Argument order: ``naive_recurrent_gated_delta_rule(q, k, v, beta, g, ...)`` but
    ``naive_chunk_gated_delta_rule(q, k, v, g, beta, ...)`` -- beta and g swap places
    (PEERS.md's "unverified" note is TRUE).  g is the LOG decay: g = log(alpha), and the
    decay is applied to S before the delta correction:
    S = exp(g) S;  S += k (beta (v - S^T k))^T  ==  alpha (I - beta k k^T) S + beta k v^T.
 6. rwkv6: ``naive_recurrent_rwkv6(q, k, v, w, u, scale, initial_state, output_final_state)``,
    w is the LOG decay (``w.exp()`` inside), u is [H, K] with no batch or time axis,
    o_t = q_t^T (S_{t-1} + diag(u) k_t v_t^T) reads the state BEFORE the update, then
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T.  (PEERS.md's "unverified" formula is right.)
 7. Defaults for output_final_state differ: False for gla, gated_delta_rule, hgrn,
    rwkv6; True for simple_gla and delta_rule_recurrence.  Always pass it explicitly.
    All of them return a tuple (o, final_state_or_None).
 8. ``naive_recurrent_simple_gla``'s g is a per-head LOG decay [B, T, H] (exp inside);
    retnet needs g = log(gamma) broadcast over batch and time.
 9. Initial states are added in place into an fp32 zero buffer (``S += initial_state``)
    in gla/simple_gla/delta_rule/hgrn/rwkv6; gated_delta_rule uses it after .float().
10. ``naive_recurrent_gla``'s ``gk`` is per key channel [B, T, H, K], log space.
"""
from __future__ import annotations

import functools

import torch


# ---------------------------------------------------------------------------
# fla availability
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """True if fla-core's naive CPU references can be imported (needs triton)."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fla.ops.gla.naive  # noqa: F401
            import fla.ops.simple_gla.naive  # noqa: F401
            import fla.ops.delta_rule.naive  # noqa: F401
            import fla.ops.gated_delta_rule.naive  # noqa: F401
            import fla.ops.hgrn.naive  # noqa: F401
            import fla.ops.rwkv6.recurrent_naive  # noqa: F401
        return True
    except Exception:
        return False


def _fla(module: str, fn: str):
    import importlib
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), fn)


def _init(initial_state, name):
    if initial_state is None:
        return None
    return initial_state[name]


# ---------------------------------------------------------------------------
# fla-backed oracles
# ---------------------------------------------------------------------------

def oracle_gla(params, inputs, initial_state=None):
    q, k, v, g = inputs
    K = q.shape[-1]
    f = _fla("fla.ops.gla.naive", "naive_recurrent_gla")
    o, S = f(q * K ** 0.5, k, v, g,  # trap 3: undo the hard-coded K**-0.5
             initial_state=_init(initial_state, "S"), output_final_state=True)
    return o.to(q.dtype), {"S": S.to(q.dtype)}


def oracle_retnet(params, inputs, initial_state=None):
    q, k, v = inputs
    B, T, H, _ = q.shape
    g = torch.log(params["gamma"]).to(q.dtype)[None, None, :].expand(B, T, H)
    f = _fla("fla.ops.simple_gla.naive", "naive_recurrent_simple_gla")
    o, S = f(q, k, v, g, scale=1.0,
             initial_state=_init(initial_state, "S"), output_final_state=True)
    return o.to(q.dtype), {"S": S.to(q.dtype)}


def oracle_mamba2(params, inputs, initial_state=None):
    """Mamba-2 SSD as simple GLA: q = C, k = dt B, v = x, g = -exp(A_log) dt, plus D x."""
    x, dt, Bm, Cm = inputs
    g = -torch.exp(params["A_log"])[None, None, :] * dt        # [B, T, H]
    f = _fla("fla.ops.simple_gla.naive", "naive_recurrent_simple_gla")
    o, S = f(Cm, dt[..., None] * Bm, x, g, scale=1.0,
             initial_state=_init(initial_state, "S"), output_final_state=True)
    y = o.to(x.dtype) + params["Dskip"][None, None, :, None] * x
    return y, {"S": S.to(x.dtype)}


def oracle_deltanet(params, inputs, initial_state=None):
    q, k, v, beta = inputs
    K = q.shape[-1]
    f = _fla("fla.ops.delta_rule.naive", "delta_rule_recurrence")
    tr = lambda t: t.transpose(1, 2)  # trap 4: [B, T, H, ...] -> [B, H, T, ...]
    o, S = f(tr(q * K ** 0.5), tr(k), tr(v), tr(beta),  # trap 3
             initial_state=_init(initial_state, "S"), output_final_state=True)
    return tr(o).to(q.dtype), {"S": S.to(q.dtype)}


def oracle_gated_deltanet(params, inputs, initial_state=None):
    q, k, v, alpha, beta = inputs
    f = _fla("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule")
    # trap 5: (beta, g) in this order for the recurrent version; g = log(alpha)
    o, S = f(q, k, v, beta, torch.log(alpha), scale=1.0,
             initial_state=_init(initial_state, "S"), output_final_state=True)
    return o.to(q.dtype), {"S": S.to(q.dtype)}  # trap 2: o comes back in fp32


def oracle_hgrn(params, inputs, initial_state=None):
    x, g = inputs
    f = _fla("fla.ops.hgrn.naive", "naive_recurrent_hgrn")
    o, h = f(x, g, initial_state=_init(initial_state, "h"), output_final_state=True)
    return o.to(x.dtype), {"h": h.to(x.dtype)}


def oracle_rwkv6(params, inputs, initial_state=None):
    r, k, v, w = inputs
    f = _fla("fla.ops.rwkv6.recurrent_naive", "naive_recurrent_rwkv6")
    tr = lambda t: t.transpose(1, 2)  # trap 4: [B, H, T, K]
    o, S = f(tr(r), tr(k), tr(v), tr(w), params["u"], scale=1.0,
             initial_state=_init(initial_state, "S"), output_final_state=True)
    return tr(o).to(r.dtype), {"S": S.to(r.dtype)}


def oracle_kda(params, inputs, initial_state=None):
    q, k, v, g, beta = inputs
    f = _fla("fla.ops.kda.naive", "naive_recurrent_kda")
    # [B, T, H, K] layout; g the log decay per key channel, applied before the erase
    o, S = f(q, k, v, g, beta, scale=1.0,
             initial_state=_init(initial_state, "S"), output_final_state=True)
    return o.to(q.dtype), {"S": S.to(q.dtype)}


def oracle_gated_deltaproduct(params, inputs, initial_state=None):
    """fla's gated DeltaProduct with num_householder=2: keys, values and strengths of the
    two Householder steps interleaved along time ([B, 2T, H, ...]), g = log a per head."""
    q, k1, v1, b1, k2, v2, b2, a = inputs
    f = _fla("fla.ops.gated_delta_product.naive", "naive_recurrent_gated_delta_product")
    il = lambda x1, x2: torch.stack([x1, x2], 2).flatten(1, 2)  # noqa: E731
    S0 = _init(initial_state, "S")
    o, S = f(q, il(k1, k2), il(v1, v2), torch.log(a), il(b1, b2), scale=1.0,
             initial_state=None if S0 is None else S0.float().clone(),  # it updates it in place
             output_final_state=True, num_householder=2)
    return o.to(q.dtype), {"S": S.to(q.dtype)}


def oracle_rwkv7(params, inputs, initial_state=None):
    """RWKV-7 as fla's layer runs it: the diagonal-plus-low-rank recurrence
    S = diag(exp gk) S + b (a^T S) + k v^T with a = -kk and b = kk * a (fla's
    ``dplr_recurrence``), then the bonus added outside the recurrence."""
    r, w, k, v, kk, a = inputs
    K = r.shape[-1]
    f = _fla("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence")
    tr = lambda t: t.transpose(1, 2)  # noqa: E731  [B, H, T, K]
    # trap: dplr_recurrence casts q, k, v, b and gk to fp32 but not a, and then mixes them
    o, S = f(tr(r * K ** 0.5), tr(k), tr(v), tr(-kk).float(), tr(kk * a), tr(w),  # K**-0.5
             initial_state=_init(initial_state, "S"), output_final_state=True)
    bonus = (r * params["rk"] * k).sum(-1, keepdim=True) * v
    return tr(o).to(r.dtype) + bonus, {"S": S.to(r.dtype)}


# Extra fla-backed oracles for examples with no published oracle of their own: the
# recurrence itself is run by an fla scan, only the gate algebra is done here.

def oracle_hgrn2(params, inputs, initial_state=None):
    """HGRN2 as GLA (as fla's HGRN2 layer runs it): the forget gate
    a = lb + (1 - lb) sigmoid(f) gives the log-decay g = log a and the key k = 1 - a."""
    q, f, v = inputs
    K = q.shape[-1]
    a = params["lb"][:, None] + (1 - params["lb"][:, None]) * torch.sigmoid(f)
    gla = _fla("fla.ops.gla.naive", "naive_recurrent_gla")
    o, S = gla(q * K ** 0.5, 1 - a, v, torch.log(a),  # trap 3: undo the hard-coded K**-0.5
               initial_state=_init(initial_state, "S"), output_final_state=True)
    return o.to(q.dtype), {"S": S.to(q.dtype)}


def oracle_s6(params, inputs, initial_state=None):
    """S6 as GLA with one "head" per channel d, K = N, V = 1:
    q = C, k = dt[d] B[n], v = x[d], gk[d, n] = -exp(A_log[d, n]) dt[d]; plus D x."""
    x, dt, Bm, Cm = inputs
    Bsz, T, D = x.shape
    N = Bm.shape[-1]
    q = Cm[:, :, None, :].expand(Bsz, T, D, N)
    k = dt[..., None] * Bm[:, :, None, :]
    gk = -torch.exp(params["A_log"])[None, None] * dt[..., None]
    S0 = None if initial_state is None else initial_state["h"][..., None]
    o, S = oracle_gla({}, [q, k, x[..., None], gk], None if S0 is None else {"S": S0})
    return o[..., 0] + params["Dskip"] * x, {"h": S["S"][..., 0]}


def oracle_s4d(params, inputs, initial_state=None):
    """S4D-Real as S6 with time-invariant dt = exp(log_dt), B = Bp[d, n], C = Cp[d, n]."""
    (x,) = inputs
    Bsz, T, D = x.shape
    dt = torch.exp(params["log_dt"])
    N = params["A_log"].shape[-1]
    q = params["Cp"].expand(Bsz, T, D, N)
    k = (dt[:, None] * params["Bp"]).expand(Bsz, T, D, N)
    gk = (-torch.exp(params["A_log"]) * dt[:, None]).expand(Bsz, T, D, N)
    S0 = None if initial_state is None else {"S": initial_state["h"][..., None]}
    o, S = oracle_gla({}, [q, k, x[..., None], gk], S0)
    return o[..., 0] + params["Dskip"] * x, {"h": S["S"][..., 0]}


def oracle_mingru(params, inputs, initial_state=None):
    """minGRU as HGRN: h = exp(log(1 - z)) h + z h~, log(1 - z) = logsigmoid(-a)."""
    (x,) = inputs
    a = x @ params["Wz"].T
    z = torch.sigmoid(a)
    return oracle_hgrn({}, [z * (x @ params["Wh"].T), torch.nn.functional.logsigmoid(-a)],
                       initial_state)


def oracle_minlstm(params, inputs, initial_state=None):
    """minLSTM as HGRN with g = log(f / (f + i)), x = i / (f + i) h~."""
    (x,) = inputs
    f = torch.sigmoid(x @ params["Wf"].T)
    i = torch.sigmoid(x @ params["Wi"].T)
    return oracle_hgrn({}, [i / (f + i) * (x @ params["Wh"].T), torch.log(f / (f + i))],
                       initial_state)


def oracle_rglru(params, inputs, initial_state=None):
    """RG-LRU as HGRN: log a = c r log sigma(Lambda), x = sqrt(1 - a^2) (i x), c = 8."""
    (x,) = inputs
    r = torch.sigmoid(x @ params["Wa"].T + params["ba"])
    i = torch.sigmoid(x @ params["Wx"].T + params["bx"])
    log_a = 8.0 * r * torch.nn.functional.logsigmoid(params["lam"])
    return oracle_hgrn({}, [torch.sqrt(1 - torch.exp(2 * log_a)) * (i * x), log_a],
                       initial_state)


# ---------------------------------------------------------------------------
# torch.nn oracles (weight mapping from PEERS.md)
# ---------------------------------------------------------------------------

def make_torch_rnn(name: str, D: int, H: int, dtype=torch.float32, seed: int = 0):
    """A randomly initialized single-layer batch-first torch.nn.RNN/LSTM/GRU."""
    cls = {"elman": lambda: torch.nn.RNN(D, H, nonlinearity="tanh", batch_first=True),
           "lstm": lambda: torch.nn.LSTM(D, H, batch_first=True),
           "gru": lambda: torch.nn.GRU(D, H, batch_first=True)}[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls().to(dtype)


def torch_to_params(name: str, mod: torch.nn.Module) -> dict:
    """rnnc params equal to the torch.nn module's weights (PEERS.md mapping)."""
    Wih = mod.weight_ih_l0.detach().clone()
    Whh = mod.weight_hh_l0.detach().clone()
    bih = mod.bias_ih_l0.detach().clone()
    bhh = mod.bias_hh_l0.detach().clone()
    if name == "elman":
        return {"W": Wih, "U": Whh, "b": bih + bhh}
    if name == "lstm":
        p = {}
        for g, Wi, Wh, bi, bh in zip("ifgo", Wih.chunk(4), Whh.chunk(4), bih.chunk(4), bhh.chunk(4)):
            p[f"W{g}"], p[f"U{g}"], p[f"b{g}"] = Wi, Wh, bi + bh
        return p
    if name == "gru":
        Wr, Wz, Wn = Wih.chunk(3)
        Ur, Uz, Un = Whh.chunk(3)
        b_ir, b_iz, b_in = bih.chunk(3)
        b_hr, b_hz, b_hn = bhh.chunk(3)
        return {"Wr": Wr, "Wz": Wz, "Wn": Wn, "Ur": Ur, "Uz": Uz, "Un": Un,
                "br": b_ir + b_hr, "bz": b_iz + b_hz, "bn": b_in, "bhn": b_hn}
    raise KeyError(name)


def params_to_torch(name: str, params: dict, D: int, H: int, dtype=None) -> torch.nn.Module:
    """The inverse direction: a torch.nn module computing the same function as rnnc params
    (hidden-side biases set to zero except GRU's b_hn)."""
    dtype = dtype or next(iter(params.values())).dtype
    mod = make_torch_rnn(name, D, H, dtype)
    p = params
    with torch.no_grad():
        if name == "elman":
            Wih, Whh, bih = p["W"], p["U"], p["b"]
            bhh = torch.zeros_like(bih)
        elif name == "lstm":
            Wih = torch.cat([p[f"W{g}"] for g in "ifgo"])
            Whh = torch.cat([p[f"U{g}"] for g in "ifgo"])
            bih = torch.cat([p[f"b{g}"] for g in "ifgo"])
            bhh = torch.zeros_like(bih)
        elif name == "gru":
            Wih = torch.cat([p["Wr"], p["Wz"], p["Wn"]])
            Whh = torch.cat([p["Ur"], p["Uz"], p["Un"]])
            bih = torch.cat([p["br"], p["bz"], p["bn"]])
            bhh = torch.cat([torch.zeros_like(p["br"]), torch.zeros_like(p["bz"]), p["bhn"]])
        else:
            raise KeyError(name)
        mod.weight_ih_l0.copy_(Wih)
        mod.weight_hh_l0.copy_(Whh)
        mod.bias_ih_l0.copy_(bih)
        mod.bias_hh_l0.copy_(bhh)
    return mod


def run_torch(name: str, mod: torch.nn.Module, x: torch.Tensor, initial_state=None):
    """Run a torch.nn cell on x [B, T, D]; states in rnnc's layout {name: [B, H]}."""
    if name == "lstm":
        hx = None
        if initial_state is not None:
            hx = (initial_state["h"][None].contiguous(), initial_state["c"][None].contiguous())
        y, (hT, cT) = mod(x, hx)
        return y, {"h": hT[0], "c": cT[0]}
    hx = None if initial_state is None else initial_state["h"][None].contiguous()
    y, hT = mod(x, hx)
    return y, {"h": hT[0]}


def _torch_oracle(name):
    def oracle(params, inputs, initial_state=None):
        (x,) = inputs
        H, D = params["W" if name == "elman" else ("Wi" if name == "lstm" else "Wr")].shape
        mod = params_to_torch(name, params, D, H, x.dtype)
        return run_torch(name, mod, x, initial_state)
    oracle.__name__ = f"oracle_{name}"
    oracle.__doc__ = f"torch.nn oracle for {name} (weights mapped from rnnc params)."
    return oracle


oracle_elman = _torch_oracle("elman")
oracle_lstm = _torch_oracle("lstm")
oracle_gru = _torch_oracle("gru")

ORACLES = {name[len("oracle_"):]: fn for name, fn in globals().items()
           if name.startswith("oracle_") and callable(fn)}
