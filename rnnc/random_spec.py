"""Random, well-typed specs of each analysis class, for property tests.

    src, dims = rnnc.random_spec(seed, kind="chunked")

kind: "diagonal" (elementwise scan), "chunked" (matrix state, diagonal decay, rank-1 write),
"delta" (identity/diagonal plus rank-1), "delta_channel" (a delta rule decayed per key
channel, as Kimi Delta Attention or RWKV-7: diagonal plus rank 1), "dense" (a small dense transition), "maxplus",
"nonlinear". The spec text is built from a seeded `random.Random`, so a seed always gives the
same spec; `dims` are small sizes to compile it with.
"""
from __future__ import annotations

import random

KINDS = ("diagonal", "chunked", "delta", "delta_channel", "dense", "maxplus", "nonlinear")

_POSITIVE_GATES = ("sigmoid({x})", "exp(-softplus({x}))", "exp(logsigmoid({x}))")
_SIGNED = ("tanh({x})", "{x}", "silu({x})", "0.5 * {x}")


def _gate(r: random.Random, x: str) -> str:
    return r.choice(_POSITIVE_GATES).format(x=x)


def _signed(r: random.Random, x: str) -> str:
    return r.choice(_SIGNED).format(x=x)


def random_spec(seed: int, kind: str = "diagonal") -> tuple:
    """(source text, dims) of a random recurrence of the given analysis class."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    r = random.Random(f"{kind}:{seed}")
    return globals()[f"_{kind}"](r, seed)


def _diagonal(r, seed):
    dims = {"D": r.choice([2, 3]), "H": r.choice([3, 4])}
    two_axis = r.random() < 0.4
    lines = [f"rnn rand_diag_{seed}(x[D], g[H]) -> y[H] {{", "    param W[H,D], V[H,D]"]
    if two_axis:
        dims["N"] = 2
        lines += ["    param Bp[H,N], Cp[H,N]", "    state h[H,N] = 0"]
    else:
        lines += ["    state h[H] = 0"]
    lines.append(f"    a = {_gate(r, 'W @ x + g')}")
    if r.random() < 0.3:  # a negative decay somewhere: still affine, still a scan
        lines.append("    a = a - 0.5")
    lines.append(f"    u = {_signed(r, 'V @ x')}")
    if two_axis:
        lines.append("    h[i,n] = a[i] * h[i,n] + u[i] * Bp[i,n]")
        lines.append("    y[i] = sum[n](Cp[i,n] * h[i,n])" + (" + u[i]" if r.random() < 0.5 else ""))
    else:
        form = r.choice(["h = a * h + u", "h = a * h + (1 - a) * u", "h[i] = a[i] * h[i] + u[i]"])
        lines.append(f"    {form}")
        lines.append("    y = h" if r.random() < 0.5 else f"    y = h * {_gate(r, 'g')}")
    lines.append("}")
    return "\n".join(lines) + "\n", dims


def _chunked(r, seed):
    dims = {"H": 2, "K": r.choice([2, 3]), "V": r.choice([3, 4])}
    per_channel = r.random() < 0.5
    lines = [f"rnn rand_chunk_{seed}(q[H,K], k[H,K], v[H,V], g[H,K]) -> o[H,V] {{"]
    if r.random() < 0.5:
        lines.append("    param w[H] = 1")
    lines.append("    state S[H,K,V] = 0")
    decay = "exp(logsigmoid(g[h,i]))" if per_channel else "sigmoid(sum[c](g[h,c]))"
    if any("param w" in x for x in lines):
        kv = "k[h,i] * (w[h] * v[h,j])"
    else:
        kv = r.choice(["k[h,i] * v[h,j]", "tanh(k[h,i]) * v[h,j]", "k[h,i] * silu(v[h,j])"])
    kv += _second_write(seed)
    read_old = r.random() < 0.3
    if read_old:
        lines.append("    o[h,j] = sum[i](q[h,i] * S[h,i,j])")
        lines.append(f"    S[h,i,j] = {decay} * S[h,i,j] + {kv}")
    else:
        lines.append(f"    S[h,i,j] = {decay} * S[h,i,j] + {kv}")
        extra = r.choice(["", " + v[h,j]", " * 2"])
        lines.append(f"    o[h,j] = sum[i](q[h,i] * S[h,i,j]){extra}")
    lines.append("}")
    return "\n".join(lines) + "\n", dims


def _delta(r, seed):
    dims = {"H": 2, "K": r.choice([2, 3]), "V": r.choice([2, 3])}
    gated = r.random() < 0.5
    lines = [f"rnn rand_delta_{seed}(q[H,K], k[H,K], v[H,V], a[H], b[H]) -> o[H,V] {{",
             "    state S[H,K,V] = 0",
             "    beta = sigmoid(b)",
             "    u[h,j] = sum[i](k[h,i] * S[h,i,j])"]
    if gated:
        lines.append("    alpha = sigmoid(a)")
        lines.append("    S[h,i,j] = alpha[h] * (S[h,i,j] - beta[h] * k[h,i] * u[h,j]) + beta[h] * k[h,i] * v[h,j]"
                     + _second_write(seed))
    else:
        lines.append("    S[h,i,j] = S[h,i,j] + beta[h] * k[h,i] * (v[h,j] - u[h,j])" + _second_write(seed))
    _readout(seed, lines)
    return "\n".join(lines) + "\n", dims


def _second_write(seed) -> str:
    """Every fourth seed, a second outer product in the input (the chunk forms run once per
    input term)."""
    return " + 0.5 * q[h,i] * tanh(v[h,j])" if seed % 4 == 3 else ""


def _readout(seed, lines):
    """o = q^T S after the update, or (every third seed) of the state before it: read, then
    write. (By the seed: draws of Random("kind:seed") at one position barely vary with it.)"""
    read = "    o[h,j] = sum[i](q[h,i] * S[h,i,j])"
    if seed % 3 == 2:
        lines.insert(next(i for i, x in enumerate(lines) if x.startswith("    state")) + 1, read)
    else:
        lines.append(read)
    lines.append("}")


def _delta_channel(r, seed):
    dims = {"H": 2, "K": r.choice([2, 3]), "V": r.choice([2, 3])}
    decay = _gate(r, "g[h,i]")
    lines = [f"rnn rand_kda_{seed}(q[H,K], k[H,K], v[H,V], g[H,K], b[H]) -> o[H,V] {{",
             "    state S[H,K,V] = 0",
             "    beta = sigmoid(b)"]
    form = r.random()
    if form < 0.25:        # RWKV-7: erase along a vector apart from the one read (here q)
        lines.append("    u[h,j] = sum[i](q[h,i] * S[h,i,j])")
        lines.append(f"    S[h,i,j] = {decay} * S[h,i,j] - beta[h] * k[h,i] * u[h,j] "
                     "+ k[h,i] * v[h,j]")
    elif form < 0.6:       # erase what the decayed state holds along k (KDA)
        lines.append(f"    D[h,i,j] = {decay} * S[h,i,j]")
        lines.append("    u[h,j] = sum[i](k[h,i] * D[h,i,j])")
        lines.append("    S[h,i,j] = D[h,i,j] + beta[h] * k[h,i] * (v[h,j] - u[h,j])")
    else:                  # erase first, then decay
        lines.append("    u[h,j] = sum[i](k[h,i] * S[h,i,j])")
        lines.append(f"    S[h,i,j] = {decay} * (S[h,i,j] - beta[h] * k[h,i] * u[h,j]) "
                     "+ beta[h] * k[h,i] * v[h,j]")
    _readout(seed, lines)
    return "\n".join(lines) + "\n", dims


def _dense(r, seed):
    dims = {"N": r.choice([2, 3]), "D": 2}
    lines = [f"rnn rand_dense_{seed}(x[D], A[N,N]) -> h[N] {{", "    param W[N,D]", "    state h[N] = 0"]
    coupling = r.choice(["0.5 * tanh(A[i,j])", "0.3 * A[i,j]"])
    lines.append(f"    z = {_signed(r, 'W @ x')}")
    lines.append(f"    h[i] = sum[j]({coupling} * h[j]) + z[i]")
    lines.append("}")
    return "\n".join(lines) + "\n", dims


def _maxplus(r, seed):
    dims = {"D": r.choice([2, 3])}
    lines = [f"rnn rand_max_{seed}(a[D], b[D]) -> y[D] {{", "    state m[D] = -inf"]
    inc = r.choice(["logsigmoid(a)", "-softplus(a)", "a"])
    lines.append(f"    m = max(m + {inc}, b)")
    lines.append("    y = m" if r.random() < 0.5 else "    y = tanh(m)")
    lines.append("}")
    return "\n".join(lines) + "\n", dims


def _nonlinear(r, seed):
    dims = {"D": 2, "H": r.choice([2, 3])}
    lines = [f"rnn rand_nl_{seed}(x[D]) -> h[H] {{", "    param W[H,D], U[H,H], b[H]", "    state h[H] = 0"]
    f = r.choice(["tanh", "sigmoid", "silu"])
    if r.random() < 0.5:
        lines.append(f"    h = {f}(W @ x + U @ h + b)")
    else:
        lines.append("    z = sigmoid(W @ x + b)")
        lines.append(f"    h = z * h + (1 - z) * {f}(U @ h)")
    lines.append("}")
    return "\n".join(lines) + "\n", dims
