"""Gates fused into the Triton chunk kernels (backends/triton_gates.py).

A linear-attention chunked state's operands (q, k, v and the log-decay) reach the kernels as
streams: the leaves they are computed from (inputs, params) and a program the generated
loaders evaluate where the kernels read them. These tests show that the gate expressions
really are computed in the kernels (the block solver no longer evaluates them), that the
results and gradients match the float64 sequential backend, and that blocks whose gates give
non-finite values or negative decays are still solved exactly. Runs under TRITON_INTERPRET=1
(conftest.py), chunk 16.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rnnc  # noqa: E402

from cases import CASES, rel_err  # noqa: E402

triton = pytest.importorskip("triton")
from rnnc.backends import triton_chunk as tc  # noqa: E402
from rnnc.backends import triton_gates as tg  # noqa: E402
from rnnc.ir import Op  # noqa: E402

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

# Gates as a user writes them: a per-head learned decay rate through softplus, a per-channel
# data-dependent decay through logsigmoid, a sigmoid write strength, and a normalised query.
GATED = """rnn gated(q[H,K], k[H,K], v[H,V], a[H], gk[H,K], b[H]) -> o[H,V] {
    param rate[H] = ones, w[H,K] = ones
    state S[H,K,V] = 0
    d[h,i] = logsigmoid(gk[h,i] * w[h,i]) / 4 - softplus(a[h]) * rate[h]
    S[h,i,j] = exp(d[h,i]) * S[h,i,j] + sigmoid(b[h]) * k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] / sqrt(1 + abs(a[h])) * S[h,i,j])
}
"""
DIMS = dict(H=2, K=16, V=16)


@pytest.fixture(autouse=True)
def _chunk_kernels(monkeypatch):
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "auto")


def _inputs(B, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    H, K, V = DIMS["H"], DIMS["K"], DIMS["V"]
    xs = [r(B, T, H, K), F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V), r(B, T, H),
          r(B, T, H, K), r(B, T, H)]
    return [x.to(dtype) for x in xs]


def _pair(src, dims, **kw):
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    tri = rnnc.compile(src, backend="triton", chunk_size=16, **dims, **kw)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, tri


def _run(m, dtype, xs64, h0, loss):
    """[outputs..., final S, then the gradients of loss(outputs, final S) w.r.t. the inputs, S0
    and the params] of module m on xs64 and the initial state h0, cast to dtype."""
    xs = [x.to(dtype).requires_grad_() for x in xs64]
    s0 = h0.to(dtype).requires_grad_()
    out, fin = m(*xs, initial_state={"S": s0}, output_final_state=True)
    outs = out if isinstance(out, tuple) else (out,)
    return [*outs, fin["S"], *torch.autograd.grad(loss(outs, fin["S"]), [*xs, s0, *m.parameters()])]


def test_gate_expressions_run_in_the_kernels():
    """The solver's streams carry the gate expressions; the nodes that compute them are left
    to the kernels (lazy, evaluated only for blocks solved another way), and the loaders in
    the generated kernel module compute them."""
    _, tri = _pair(GATED, DIMS)
    solver = tri._runner.solver
    plans = solver.streams["S"]
    rec = tri.recurrence
    gate_ops = {getattr(rec.node(n), "op", None) for n in solver.lazy}
    assert {Op.LOGSIGMOID, Op.SOFTPLUS, Op.SIGMOID, Op.EXP, Op.SQRT} <= gate_ops
    assert not set(solver.lazy) & set(solver.hoisted)   # nothing evaluates them per block
    inputs = {d.node for d in rec.inputs} | {d.node for d in rec.params}
    for prog in plans.values():   # every leaf is an input or a param here
        assert {n for n, _ in prog.leaves} <= inputs
    g_ops = {ins[1] for ins in plans["g"].code if ins[0] == "op"}
    assert {Op.LOGSIGMOID, Op.SOFTPLUS} <= g_ops and Op.EXP not in g_ops  # exp(x): x read as log
    text = tc.source(solver.stream_signatures("S"))
    assert "_logsigmoid(" in text and "_softplus(" in text and "tl.sigmoid(" in text


@pytest.mark.parametrize("T", [17, 37])
def test_gated_spec_against_sequential(T):
    """Outputs, final state and the gradients of every input, param and the initial state."""
    ref, tri = _pair(GATED, DIMS)
    B = 2 if T == 17 else 1   # a second batch entry where it is cheaper
    xs64 = _inputs(B, T, seed=T, dtype=F64)
    g = torch.Generator().manual_seed(100 + T)
    h0 = torch.randn(B, DIMS["H"], DIMS["K"], DIMS["V"], generator=g, dtype=F64)
    do = torch.randn(B, T, DIMS["H"], DIMS["V"], generator=g, dtype=F64)
    dS = torch.randn(B, DIMS["H"], DIMS["K"], DIMS["V"], generator=g, dtype=F64)

    def loss(outs, S):
        return (outs[0].double() * do).sum() + (S.double() * dS).sum()
    got, want = _run(tri, torch.float32, xs64, h0, loss), _run(ref, F64, xs64, h0, loss)
    names = ["o", "S_last", "dq", "dk", "dv", "da", "dgk", "db", "dS0", "drate", "dw"]
    for n, x, y in zip(names, got, want):
        assert rel_err(x, y) < 2e-4, (n, rel_err(x, y))


def test_mamba2_gates_in_the_kernels():
    """mamba2's key dt*x and log-decay -exp(A_log)*dt are computed in the kernels."""
    case = next(c for c in CASES if c.name == "mamba2")
    tri = rnnc.compile(str(case.path), backend="triton", chunk_size=16, **case.dims)
    solver = tri._runner.solver
    plans = solver.streams["S"]
    muls = [ins for ins in plans["v"].code + plans["g"].code if ins[0] == "op"]
    assert any(ins[1] is Op.MUL for ins in muls) and any(ins[1] is Op.EXP for ins in muls)
    assert any(getattr(tri.recurrence.node(n), "op", None) is Op.EXP for n in solver.lazy)


def test_nonfinite_gate_falls_back_exactly():
    """A NaN input makes the streamed block's results non-finite; that block is then solved as
    before (the chunk form up to the NaN, step by step after it), so the steps before the NaN
    and the batch row without it stay finite and match the sequential backend."""
    ref, tri = _pair(GATED, DIMS)
    xs = _inputs(2, 21, seed=3, dtype=F64)
    xs[3][1, 13, 0] = float("nan")  # the softplus gate of batch row 1, step 13
    with torch.no_grad():
        want = ref(*xs)
        got = tri(*[x.float() for x in xs])
    assert torch.isfinite(got[:, :13]).all() and torch.isfinite(got[0]).all()
    assert rel_err(got[0], want[0]) < 1e-4
    assert rel_err(got[1, :13], want[1, :13]) < 1e-4
    assert torch.isnan(got[1, 13:]).any() == torch.isnan(want[1, 13:]).any()


SIGNED = """rnn signed(q[H,K], k[H,K], v[H,V], g[H,K]) -> o[H,V] {
    state S[H,K,V] = 0
    S[h,i,j] = (2 * sigmoid(g[h,i]) - 1) * S[h,i,j] + k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}
"""


def test_negative_decay_block_is_exact():
    """log of a negative decay is NaN inside the kernel: the block goes to the exact path."""
    dims = dict(H=2, K=8, V=8)
    ref = rnnc.compile(SIGNED, backend="sequential", **dims).double()
    tri = rnnc.compile(SIGNED, backend="triton", chunk_size=16, **dims)
    assert "S" in tri._runner.solver.streams
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(2, 19, 2, 8, generator=g, dtype=F64) for _ in range(4)]
    with torch.no_grad():
        want, wf = ref(*xs, output_final_state=True)
        got, gf = tri(*[x.float() for x in xs], output_final_state=True)
    assert rel_err(got, want) < 1e-4 and rel_err(gf["S"], wf["S"]) < 1e-4


def test_streams_against_materialised_operands():
    """chunk_linear_attention with streams (a per-head step gate, a per-channel param, a
    constant) equals it with the operands computed by torch, values and gradients."""
    B, L, H, K, V = 1, 21, 2, 16, 16
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v, beta, a = r(B, L, H, K), r(B, L, H, K) / 4, r(B, L, H, V), r(B, L, H, 1), r(B, L, H, 1)
    w = r(1, 1, H, K)
    S0 = r(B, H, K, V)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, a, w)]

    def prog(build):
        p = tg.Program()
        build(p)
        return p
    # k * sigmoid(beta); log-decay: logsigmoid(a) * w * 0.5 (per channel through the param)
    pk = prog(lambda p: p.op(Op.MUL, p.leaf(0, ()), p.op(Op.SIGMOID, p.leaf(1, ()))))
    pg = prog(lambda p: p.op(Op.MUL, p.op(Op.MUL, p.op(Op.LOGSIGMOID, p.leaf(2, ())), p.leaf(3, ())),
                             p.const(0.5)))

    def streams(ls):
        qq, kk, vv, bb, aa, ww = ls
        place = {0: kk, 1: bb, 2: aa, 3: ww}
        sk = tg.Stream.build(pk, lambda n, lab: (place[n], True), (B, L, H, K))
        sg = tg.Stream.build(pg, lambda n, lab: (place[n], n != 3), (B, L, H, K), squeeze=True)
        return qq, sk, vv, sg
    qs, ks, vs, gs = streams(leaves)
    assert gs.kinds == ((True, True, False), (False, True, True)) and gs.shape == (B, L, H, K)
    o, S = tc.chunk_linear_attention(qs, ks, vs, gs, S0, chunk=16)
    lm = [x.clone().requires_grad_() for x in (q, k, v, beta, a, w)]
    kk = lm[1] * torch.sigmoid(lm[3])
    gg = F.logsigmoid(lm[4]) * lm[5] * 0.5
    o2, S2 = tc.chunk_linear_attention(lm[0], kk, lm[2], gg.expand(B, L, H, K), S0, chunk=16)
    assert rel_err(o, o2) < 1e-5 and rel_err(S, S2) < 1e-5
    ((o * o2.detach()).sum() + S.sum()).backward()
    ((o2 * o2.detach()).sum() + S2.sum()).backward()
    for a_, b_ in zip(leaves, lm):
        assert rel_err(a_.grad, b_.grad) < 1e-4


def test_loaders_carry_no_spec_text():
    """The generated loaders are built from the programs' ops and constants and generated names
    only: a spec whose names collide with the kernels' own (b, h, t, c, m, L, H, X, tl) emits
    the same chunk kernels as the same spec with plain names."""
    from rnnc.backends import triton_backend as tb
    hostile = GATED.replace("q[", "c[").replace("(a[", "(m[").replace(" a[H]", " m[H]") \
        .replace("gk[", "L[").replace("d[h,i]", "X[h,i]")
    assert hostile.count("c[") == 2 and hostile.count("(m[h])") == 2 and hostile.count("X[") == 2
    texts = []
    for src in (GATED, hostile):
        rec = rnnc.load(src)
        text = tb.emit(rec, rnnc.analysis.analyse(rec))
        texts.append(text.partition(tb.LIBRARY_MARKER)[2].split("\n", 1)[1])
    assert "_ld_g(" in texts[0] and texts[0] == texts[1]


# A gated delta rule as a user writes it: raw gate inputs, the decay and the write strength
# computed in the step (fla's GatedDeltaNet computes the same outside its kernel).
GATED_DELTA = """rnn gdelta(q[H,K], k[H,K], v[H,V], a[H], b[H]) -> o[H,V] {
    param A_log[H] = zeros, dt_bias[H] = zeros
    state S[H,K,V] = 0
    alpha[h] = exp(-exp(A_log[h]) * softplus(a[h] + dt_bias[h]))
    beta[h] = sigmoid(b[h])
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    S[h,i,j] = alpha[h] * (S[h,i,j] - beta[h] * k[h,i] * u[h,j]) + beta[h] * k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}
"""


def test_delta_rule_gates_run_in_the_kernels():
    """The delta rule's decay and write strength are computed in its kernels: the solver plans
    streams for r, p (sigmoid(b) k, which is w too: the write strength over the heads goes
    with p, so the kernels take their w = p path), v and the log-decay, and leaves the gate
    nodes lazy."""
    _, tri = _pair(GATED_DELTA, DIMS)
    solver = tri._runner.solver
    plans = solver.streams["S"]
    assert {"k", "v", "r", "g"} <= set(plans) and "w" not in plans
    assert solver.layout["S"].delta.same
    assert Op.SIGMOID in {ins[1] for ins in plans["k"].code if ins[0] == "op"}
    assert Op.SIGMOID not in {ins[1] for ins in plans["v"].code if ins[0] == "op"}
    g_ops = {ins[1] for ins in plans["g"].code if ins[0] == "op"}
    assert {Op.SOFTPLUS, Op.EXP, Op.ADD} <= g_ops
    rec = tri.recurrence
    assert {Op.SOFTPLUS, Op.SIGMOID} <= {getattr(rec.node(n), "op", None) for n in solver.lazy}
    from rnnc.backends import triton_backend as tb
    emitted = tb.emit(rec, rnnc.analysis.analyse(rec))
    assert "def _ld_a(" in emitted and "_softplus(" in emitted.partition(tb.LIBRARY_MARKER)[2]


@pytest.mark.parametrize("T", [17, 37])
def test_gated_delta_rule_against_sequential(T):
    """Outputs, final state and every gradient, from an initial state."""
    ref, tri = _pair(GATED_DELTA, DIMS)
    with torch.no_grad():
        for m in (ref, tri):
            m.A_log.mul_(0.0).add_(-1.0)   # decays around exp(-0.37 * softplus)
    B, H, K, V = 2, DIMS["H"], DIMS["K"], DIMS["V"]
    g = torch.Generator().manual_seed(200 + T)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    xs64 = [r(B, T, H, K), F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V), r(B, T, H),
            r(B, T, H)]
    h0 = r(B, H, K, V)
    do, dS = r(B, T, H, V), r(B, H, K, V)

    def loss(outs, S):
        return (outs[0].double() * do).sum() + (S.double() * dS).sum()
    names = ["o", "S_last", "dq", "dk", "dv", "da", "db", "dS0", "dA_log", "ddt_bias"]
    for n, x, y in zip(names, _run(tri, torch.float32, xs64, h0, loss), _run(ref, F64, xs64, h0, loss)):
        assert rel_err(x, y) < 2e-4, (n, rel_err(x, y))


def test_generated_loaders_compile_for_gpu_without_one():
    """The kernels generated for the gated specs (and mamba2's, a decay per head and a term
    added to the readout; rwkv6's, a bonus term) compile down to sm_90 cubins, forward,
    backward and d log_decay, in a process without the interpreter, which is stricter about
    types than the interpreter is."""
    from cases import compile_offline
    code = (
        "import rnnc, rnnc.analysis\n"
        "from rnnc.backends import triton_backend as tb, triton_chunk as tc, triton_delta as td\n"
        f"specs = [{GATED!r}, open('examples/mamba2.rnn').read(), open('examples/rwkv6.rnn').read(),\n"
        f"         {GATED_DELTA!r}]\n"
        "for src in specs:\n"
        "    rec = rnnc.load(src)\n"
        "    an = rnnc.analysis.analyse(rec)\n"
        "    sigs = tb.chunk_signatures(rec, an)\n"
        "    if an.plan == 'chunked':\n"
        "        scalar = not any(chan for _, _, chan in sigs[3][1])\n"
        "        out = tc.compile_for(K=16, V=16, chunk=16, scalar=scalar, sigs=sigs,\n"
        "                             names=('chunk_fwd', 'chunk_bwd', 'chunk_dg'))\n"
        "    else:\n"
        "        out = td.compile_for(K=16, V=16, chunk=16, variants=[(True, True, False)],\n"
        "                             sigs=sigs, dot_prec='tf32')\n"
        "    assert len(out) == (3 if an.plan == 'chunked' else 2) and min(out.values()) > 0, out\n"
        "    if an.plan == 'chunked':   # what the kernels add to o\n"
        "        added = {'mamba2': ['e'], 'rwkv6': ['u', 'x']}.get(rec.name, [])\n"
        "        assert [n for n, _ in sigs[4:]] == added, sigs\n"
        "print('compiled')\n")
    compile_offline(code)


MULTI = """rnn multi(q[A,G,K], k[A,G,K], v[A,G,V], g[A]) -> o[A,G,V] {
    state S[A,G,K,V] = 0
    S[a,c,i,j] = exp(g[a]) * S[a,c,i,j] + k[a,c,i] * v[a,c,j]
    o[a,c,j] = sum[i](q[a,c,i] * S[a,c,i,j])
}
"""


def test_gate_over_one_of_two_head_axes():
    """A decay over one of the two axes the kernels flatten into their head axis is read
    over both (the kernels' layout has no place for a broadcast part of a head): the streamed
    block matches the sequential backend, forward and backward."""
    dims = dict(A=2, G=3, K=16, V=16)
    ref = rnnc.compile(MULTI, backend="sequential", **dims).double()
    tri = rnnc.compile(MULTI, backend="triton", chunk_size=16, **dims)
    solver = tri._runner.solver
    ran = []
    real = solver._solve_streamed
    solver._solve_streamed = lambda *a, **k: ran.append(real(*a, **k)) or ran[-1]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 21, 2, 3, 16, generator=gen, dtype=F64) for _ in range(3)]
    xs.append(F.logsigmoid(torch.randn(2, 21, 2, generator=gen, dtype=F64)))
    want = ref(*[x.requires_grad_() for x in xs])
    x32 = [x.detach().float().requires_grad_() for x in xs]
    got = tri(*x32)
    assert ran == [True] and rel_err(got, want) < 1e-5
    gw = torch.autograd.grad((want * want.detach()).sum(), xs)
    gg = torch.autograd.grad((got * want.detach().float()).sum(), x32)
    for a, b in zip(gg, gw):
        assert rel_err(a, b) < 1e-4


def test_a_long_gate_expression_is_loaded_computed():
    """A gate expression longer than a program may be (triton_gates.MAX_STEPS) is computed in
    PyTorch and loaded as it is; the results are unchanged."""
    gate = "g[h]"
    for _ in range(tg.MAX_STEPS + 5):
        gate = f"(0.5 * {gate} - 0.1)"
    src = ("rnn deep(q[H,K], k[H,K], v[H,V], g[H]) -> o[H,V] {\n    state S[H,K,V] = 0\n"
           f"    S[h,i,j] = exp(-softplus({gate})) * S[h,i,j] + k[h,i] * v[h,j]\n"
           "    o[h,j] = sum[i](q[h,i] * S[h,i,j])\n}\n")
    dims = dict(H=2, K=16, V=16)
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    tri = rnnc.compile(src, backend="triton", chunk_size=16, **dims)
    prog = tri._runner.solver.streams["S"]["g"]
    assert len(prog.code) <= tg.MAX_STEPS and not prog.inlined   # the exponent, as a leaf
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 19, 2, 16, generator=gen, dtype=F64) for _ in range(3)]
    xs.append(torch.randn(2, 19, 2, generator=gen, dtype=F64))
    with torch.no_grad():
        assert rel_err(tri(*[x.float() for x in xs]), ref(*xs)) < 1e-4


# --- a term added to the readout, computed in the kernels (the epilogue) --------------------
# The readout q·S plus a gated skip term, as mamba2's `+ Dskip * x`, here with a gate the
# kernels compute (sigmoid) and a value over the value axis.
SKIP = """rnn skip(q[H,K], k[H,K], v[H,V], g[H,K], s[H]) -> o[H,V] {
    param D[H] = ones
    state S[H,K,V] = 0
    S[h,i,j] = exp(g[h,i]) * S[h,i,j] + k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j]) + sigmoid(s[h] * D[h]) * v[h,j]
}
"""
# RWKV-6's bonus inside the readout (a state-free term pairing a step with itself), with an
# added gated term after it: both are added by the kernels.
BONUS = """rnn bonus(q[H,K], k[H,K], v[H,V], g[H,K], s[H]) -> o[H,V] {
    param u[H,K]
    state S[H,K,V] = 0
    o[h,j] = sum[i](q[h,i] * (S[h,i,j] + u[h,i] * k[h,i] * v[h,j])) + sigmoid(s[h]) * v[h,j]
    S[h,i,j] = exp(-exp(g[h,i])) * S[h,i,j] + k[h,i] * v[h,j]
}
"""
# The same readout read twice (by the sum and by a second output): nothing to fuse.
SKIP_TWICE = SKIP.replace("-> o[H,V] {", "-> (o[H,V], r[H,V]) {").replace(
    "    o[h,j] = sum[i](q[h,i] * S[h,i,j]) + sigmoid(s[h] * D[h]) * v[h,j]",
    "    r[h,j] = sum[i](q[h,i] * S[h,i,j])\n    o[h,j] = r[h,j] + sigmoid(s[h] * D[h]) * v[h,j]")


def _skip_inputs(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    H, K, V = DIMS["H"], DIMS["K"], DIMS["V"]
    return [r(B, T, H, K), F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V),
            F.logsigmoid(r(B, T, H, K)), r(B, T, H)]


def _launch_extras(monkeypatch):
    """Records, per chunk_linear_attention call of the Triton block solver, what it was handed
    to add to o: {"extra", "bonus"} or fewer."""
    seen = []
    real = tc.chunk_linear_attention

    def spy(*args, **kw):
        seen.append({n for n in ("extra", "bonus") if kw.get(n) is not None})
        return real(*args, **kw)
    monkeypatch.setattr(tc, "chunk_linear_attention", spy)
    return seen


@pytest.mark.parametrize("src,fused", [(SKIP, {"extra"}), (BONUS, {"extra", "bonus"}), (SKIP_TWICE, set())],
                         ids=["added", "bonus-and-added", "read-twice"])
@pytest.mark.parametrize("T", [1, 21])
def test_readout_epilogue_against_sequential(src, fused, T, monkeypatch):
    """A term added to the readout, and a bonus term inside it, are added by the kernels as
    they write o (the sum and the terms' nodes are no longer evaluated in PyTorch), unless
    the readout is read elsewhere too. Outputs, final state and every gradient match the
    float64 sequential backend."""
    seen = _launch_extras(monkeypatch)
    ref, tri = _pair(src, DIMS)
    solver = tri._runner.solver
    rec = tri.recurrence
    if "extra" in fused:
        (readout, (add, other, state)), = solver.epilogues.items()
        assert state == "S" and add in solver.supplied
        assert other in solver.lazy and other not in solver.hoisted
        assert Op.SIGMOID in {getattr(rec.node(n), "op", None) for n in solver.lazy}
    else:
        assert solver.epilogues == {}
    assert bool(solver.bonuses) == ("bonus" in fused)
    if "bonus" in fused:   # u * k is computed by the kernels' loaders, not in PyTorch
        assert not any(getattr(rec.node(n), "op", None) is Op.MUL for n in solver.hoisted)
    B = 2 if T == 1 else 1
    xs64 = _skip_inputs(B, T, seed=T)
    g = torch.Generator().manual_seed(200 + T)
    h0 = torch.randn(B, DIMS["H"], DIMS["K"], DIMS["V"], generator=g, dtype=F64)
    dS = torch.randn(B, DIMS["H"], DIMS["K"], DIMS["V"], generator=g, dtype=F64)

    def loss(outs, S):
        return sum((o.double() * (1 + k)).sin().sum() for k, o in enumerate(outs)) + (S.double() * dS).sum()
    got, want = _run(tri, torch.float32, xs64, h0, loss), _run(ref, F64, xs64, h0, loss)
    assert len(got) == len(want)
    for n, (x, y) in enumerate(zip(got, want)):
        assert rel_err(x, y) < 2e-4, (n, rel_err(x, y))
    if T > 1:   # one step runs the fused recurrent kernel, not the chunk kernels
        assert seen and all(s == fused for s in seen), seen


def test_readout_epilogue_falls_back_exactly():
    """A NaN in the added term's gate makes the streamed block non-finite; the block is then
    solved the exact way, and the sum is computed in PyTorch after it: the batch row without
    the NaN, and the steps before it, still match the sequential backend."""
    ref, tri = _pair(SKIP, DIMS)
    assert tri._runner.solver.epilogues
    xs = _skip_inputs(2, 21, seed=5)
    xs[4][1, 13, 0] = float("nan")
    with torch.no_grad():
        want = ref(*xs)
        got = tri(*[x.float() for x in xs])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1, :13]).all()
    assert rel_err(got[0], want[0]) < 1e-4
    assert rel_err(got[1, :13], want[1, :13]) < 1e-4
    assert torch.isnan(got[1, 13:]).any() and torch.isnan(want[1, 13:]).any()


@pytest.mark.parametrize("added,split,include,block_k", [
    ("extra", False, True, 0), ("bonus", True, False, 0), ("both", False, False, 0),
    ("both", True, True, 16), ("both", False, False, 16)])
def test_extra_terms_against_adding_them_after(added, split, include, block_k):
    """chunk_linear_attention(..., extra=e) is o + e, and bonus=(u, x) is o + (sum_i u_i) x,
    with their gradients, in both forward kinds (the walk and the two levels) and either
    readout (the new or the old state), also with the key axis split in two (e added once,
    the bonus's sum over i split with it); a wrong shape or no q is refused."""
    g = torch.Generator().manual_seed(4)
    B, L, H, K, V = 1, 21, 2, 32 if block_k else 16, 16
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    base = [r(B, L, H, K), r(B, L, H, K), r(B, L, H, V), F.logsigmoid(r(B, L, H, K)),
            r(B, L, H, V), r(B, L, H, K), r(B, L, H, V), r(B, H, K, V)]
    w = r(B, L, H, V)
    a = [t.clone().requires_grad_() for t in base]
    kw = {}
    if added in ("extra", "both"):
        kw["extra"] = a[4]
    if added in ("bonus", "both"):
        kw["bonus"] = (a[5], a[6])
    o, S = tc.chunk_linear_attention(*a[:4], a[7], include, chunk=16, split=split,
                                     block_k=block_k, **kw)
    ga = torch.autograd.grad((o * w).sum() + S.sum(), a, allow_unused=True)
    b = [t.clone().requires_grad_() for t in base]
    o2, S2 = tc.chunk_linear_attention(*b[:4], b[7], include, chunk=16, split=split, block_k=0)
    if "extra" in kw:
        o2 = o2 + b[4]
    if "bonus" in kw:
        o2 = o2 + b[5].sum(-1, keepdim=True) * b[6]
    gb = torch.autograd.grad((o2 * w).sum() + S2.sum(), b, allow_unused=True)
    assert torch.allclose(o, o2, atol=1e-5)
    assert torch.equal(S, S2) if not block_k else torch.allclose(S, S2, atol=1e-5)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=1e-5))
    with pytest.raises(rnnc.RnncError, match="extra must be"):
        tc.chunk_linear_attention(*base[:4], base[7], chunk=16, extra=base[4][..., :3])
    with pytest.raises(rnnc.RnncError, match="bonus u must be"):
        tc.chunk_linear_attention(*base[:4], base[7], chunk=16, bonus=(base[5][..., :3], base[6]))
    with pytest.raises(rnnc.RnncError, match="needs q"):
        tc.chunk_linear_attention(None, *base[1:4], base[7], chunk=16, extra=base[4])


def test_dot_precision_follows_the_leaves(monkeypatch):
    """The chunk kernels' tl.dot precision: TF32 on CUDA for bf16/fp16 leaves (or where torch
    allows TF32 matmuls), IEEE for float32 leaves and always off CUDA."""
    from types import SimpleNamespace as T
    cuda = lambda dt: T(is_cuda=True, dtype=dt)    # noqa: E731  what dot_precision reads
    cpu = lambda dt: T(is_cuda=False, dtype=dt)    # noqa: E731
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert tg.dot_precision([cuda(torch.float32), cuda(torch.bfloat16)]) == "tf32"
    assert tg.dot_precision([cuda(torch.float16)]) == "tf32"
    assert tg.dot_precision([cuda(torch.float32)]) == "ieee"
    assert tg.dot_precision([cpu(torch.bfloat16)]) == "ieee"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert tg.dot_precision([cuda(torch.float32)]) == "tf32"
    assert tg.dot_precision([cpu(torch.float32)]) == "ieee"
