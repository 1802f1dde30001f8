"""rnnc.builder (specs from Python), rnnc.layers (composition), and the two examples that use
them: examples/lsrl_parity.py (exact hand-set weights) and examples/search.py (--quick).

The builder must construct the parser's AST: every example file is rebuilt from its AST with
builder calls and must print, parse and compute exactly as the file does; three examples
are also written by hand with the API."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rnnc  # noqa: E402
from cases import CASES, compile_case, load_params, make_inputs  # noqa: E402
from rnnc import builder as rb  # noqa: E402
from rnnc import layers as L  # noqa: E402
from rnnc import syntax as S  # noqa: E402
from rnnc.parse import parse  # noqa: E402
from rnnc.random_spec import KINDS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.rnn"))
F64 = torch.float64


def _example(name: str) -> S.Program:
    path = ROOT / "examples" / f"{name}.rnn"
    return parse(path.read_text(), str(path))


def _load_example_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- 1. round trip of every example through the builder -------------------------------------------
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_rebuilt_from_ast_prints_parses_and_computes_the_same(path):
    program = parse(path.read_text(), str(path))
    s = rb.from_program(program)
    assert isinstance(s, rb.Spec) and s.name == path.stem
    assert s.to_block() == program.blocks[0]                 # the builder made the parser's AST
    back = parse(s.to_source())
    assert back.blocks == program.blocks                      # its text parses back to it
    assert s.to_program().blocks == program.blocks
    assert s.to_program().filename == f"<builder {path.stem}>"
    # and both compile to modules that compute identical outputs with the same params
    case = next(c for c in CASES if c.name == path.stem)
    m_file, params = compile_case(case, F64)
    m_spec = rnnc.compile(s, **case.dims).to(F64)
    load_params(m_spec, params)
    xs = make_inputs(case, 2, 5, F64)
    y1, y2 = m_file(*xs), m_spec(*xs)
    for a, b in zip(y1 if isinstance(y1, tuple) else (y1,), y2 if isinstance(y2, tuple) else (y2,)):
        assert torch.equal(a, b)


def test_from_source_and_from_program_pick_blocks():
    two = "rnn a(x[D]) -> y[D] {\n    y = x\n}\nrnn b(x[D]) -> y[D] {\n    y = 2 * x\n}\n"
    with pytest.raises(rnnc.RnncError, match="2 rnn blocks"):
        rb.Spec.from_source(two)
    s = rb.Spec.from_source(two, name="b")
    assert s.to_block() == parse(two).blocks[1]
    with pytest.raises(rnnc.RnncError, match="no rnn named 'c'"):
        rb.from_program(parse(two), name="c")


# --- 2. hand-built specs equal the example files ----------------------------------------------------
def hand_gla() -> rb.Spec:
    s = rb.Spec("gla")
    q, k, v, g = s.input("q", "H", "K"), s.input("k", "H", "K"), s.input("v", "H", "V"), s.input("g", "H", "K")
    S_ = s.state("S", "H", "K", "V", init=0)
    h, i, j = rb.indices("h i j")
    s[S_[h, i, j]] = rb.exp(g[h, i]) * S_[h, i, j] + k[h, i] * v[h, j]
    o = s.local("o")
    s[o[h, j]] = rb.sum(i)(q[h, i] * S_[h, i, j])
    s.output(o, "H", "V")
    return s


def hand_mingru() -> rb.Spec:
    s = rb.Spec("mingru")
    x = s.input("x", "D")
    Wz, Wh = s.params(("Wz", "H", "D"), ("Wh", "H", "D"))
    h = s.state("h", "H", init=0)
    z = s.let("z", rb.sigmoid(Wz @ x))
    s[h] = (1 - z) * h + z * (Wh @ x)
    s.output(h)
    return s


def hand_gated_deltanet() -> rb.Spec:
    s = rb.Spec("gated_deltanet")
    q, k, v = s.input("q", "H", "K"), s.input("k", "H", "K"), s.input("v", "H", "V")
    alpha, beta = s.input("alpha", "H"), s.input("beta", "H")
    S_ = s.state("S", "H", "K", "V", init=0)
    h, i, j = rb.indices("h i j")
    u = s.local("u", "H", "V")
    s[u[h, j]] = rb.sum(i)(k[h, i] * S_[h, i, j])
    s[S_[h, i, j]] = alpha[h] * (S_[h, i, j] - beta[h] * k[h, i] * u[h, j]) + beta[h] * k[h, i] * v[h, j]
    o = s.local("o", "H", "V")
    s[o[h, j]] = rb.sum(i)(q[h, i] * S_[h, i, j])
    s.output(o)
    return s


@pytest.mark.parametrize("build", [hand_gla, hand_mingru, hand_gated_deltanet], ids=lambda f: f.__name__)
def test_hand_built_spec_equals_example(build):
    s = build()
    program = _example(s.name)
    assert s.to_block() == program.blocks[0]
    assert s.to_program().blocks == program.blocks


def test_readme_snippet_compiles_on_auto():
    m = rnnc.compile(hand_gla(), backend="auto", H=2, K=4, V=4)
    assert m.backend == "scan"
    q, k, v = torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4)
    assert m(q, k, v, -torch.rand(2, 6, 2, 4)).shape == (2, 6, 2, 4)


# --- 3. random specs of every analysis class ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_random_specs_roundtrip_and_compile_on_auto(kind):
    for seed in range(5):
        src, dims = rnnc.random_spec(seed, kind)
        program = parse(src)
        s = rb.Spec.from_source(src)
        assert parse(s.to_source()).blocks == program.blocks, src
        m = rnnc.compile(s, backend="auto", **dims)
        assert m.backend == ("sequential" if kind == "nonlinear" else "scan")


# --- 4. the API surface ---------------------------------------------------------------------------------
def test_dims_params_inits_and_states():
    s = rb.Spec("decls")
    D, H = rb.dims("D H")
    x = s.input("x", D)
    xx = s.input("xx", 2 * H)
    m = s.input("m", "2*(H*K)")
    t = s.input("t")
    W, b, c = s.params(("W", H, D), rb.decl("b", H, init=rb.zeros), rb.decl("c", H, init=rb.ones))
    n = s.param("n", H, init=rb.normal(0.02))
    u = s.param("u", H, init=rb.uniform(-0.5, 0.5))
    k = s.param("k", init=-4)
    e = s.param("e", 3, init=rb.const(1) / 8)
    hi, cnt, mn = s.states(("hi", H), ("cnt",), rb.decl("mn", H, init=-math.inf))
    s[hi] = rb.maximum(hi, W @ x + b)
    s[cnt] = cnt + t
    s[mn] = rb.minimum(mn, c * n + u + k + e[0])
    s.output(hi)
    s.output(cnt, None)
    s.output(mn)
    src = s.to_source()
    assert "rnn decls(x[D], xx[2*H], m[2*H*K], t) -> (hi[H], cnt, mn[H]) {" in src
    assert "param W[H, D], b[H] = zeros, c[H] = ones" in src
    assert "param n[H] = normal(0.02)" in src and "param u[H] = uniform(-0.5, 0.5)" in src
    assert "param k = -4" in src and "param e[3] = 1 / 8" in src
    assert "state hi[H], cnt, mn[H] = -inf" in src
    rec = s.check()
    assert [p.name for p in rec.params] == ["W", "b", "c", "n", "u", "k", "e"]
    assert [(st.name, st.init) for st in rec.states] == [("hi", 0.0), ("cnt", 0.0), ("mn", -math.inf)]
    mod = s.compile(D=3, H=2, K=2)
    assert mod.k.item() == -4 and torch.all(mod.e == 0.125) and torch.all(mod.c == 1)
    ys = mod(torch.randn(2, 4, 3), torch.randn(2, 4, 4), torch.randn(2, 4, 8), torch.ones(2, 4))
    assert [tuple(y.shape) for y in ys] == [(2, 4, 2), (2, 4), (2, 4, 2)]
    assert torch.equal(ys[1][0], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_every_operator_and_function_against_torch():
    s = rb.Spec("ops")
    x, y = s.input("x", "D"), s.input("y", "D")
    A = s.input("A", "D", "D")
    i, j = rb.indices("i j")
    r = {}
    r["arith"] = s.let("arith", (x + y) * (x - y) / (1 + y ** 2) - -x + 2 ** (-abs(x)))
    r["fns"] = s.let("fns", rb.exp(-x) + rb.log(1 + rb.sigmoid(y)) + rb.tanh(x) + rb.relu(y)
                     + rb.softplus(x) + rb.silu(y) + rb.logsigmoid(x) + rb.sqrt(rb.abs(y)) + abs(x))
    r["mm"] = s.let("mm", A @ x + x @ A)
    r["minmax"] = s.let("minmax", rb.maximum(x, y) - rb.minimum(x, 0.5) + rb.max(x, -y))
    r["cmp"] = s.let("cmp", rb.where(x < y, 1, 0) + rb.where(x <= 0, 2, 0) + rb.where(x > y, 4, 0)
                     + rb.where(x >= 1, 8, 0) + rb.where(rb.eq(x, x), 16, 0) + rb.where(x != x, 32, 0)
                     + rb.where(rb.lt(0, x), 64, 0) + rb.where(x == y, 128, 0))
    red = s.local("red", "D")
    s[red[i]] = rb.sum(j)(A[i, j] * x[j]) + rb.max(j)(A[i, j]) + A[i, 0] + A[-1, i]
    r["red"] = red
    r["sc"] = s.let("sc", rb.sum(i, j)(A[i, j]) + rb.sum(i, x[i] * y[i]))
    for name in r:
        s.output(name, "D" if name != "sc" else None)
    src = s.to_source()
    assert "- -x" in src and "2 ** -abs(x)" in src and "max[j](A[i, j])" in src and "A[-1, i]" in src
    assert parse(src).blocks[0] == s.to_block()
    g = torch.Generator().manual_seed(0)
    X, Y, AA = (torch.randn(*sh, generator=g, dtype=F64) for sh in [(2, 3, 4), (2, 3, 4), (2, 3, 4, 4)])
    out = dict(zip(r, s.compile()(X, Y, AA)))
    Fn = torch.nn.functional
    expect = {
        "arith": (X + Y) * (X - Y) / (1 + Y ** 2) + X + 2 ** (-X.abs()),
        "fns": (torch.exp(-X) + torch.log(1 + torch.sigmoid(Y)) + torch.tanh(X) + torch.relu(Y)
                + Fn.softplus(X) + Fn.silu(Y) + Fn.logsigmoid(X) + Y.abs().sqrt() + X.abs()),
        "mm": torch.einsum("btij,btj->bti", AA, X) + torch.einsum("bti,btij->btj", X, AA),
        "minmax": torch.maximum(X, Y) - torch.minimum(X, torch.tensor(0.5, dtype=F64)) + torch.maximum(X, -Y),
        "cmp": ((X < Y) * 1 + (X <= 0) * 2 + (X > Y) * 4 + (X >= 1) * 8 + 16 + (X > 0) * 64
                + (X == Y) * 128).to(F64),
        "red": (torch.einsum("btij,btj->bti", AA, X) + AA.amax(-1) + AA[..., :, 0] + AA[..., -1, :]),
        "sc": AA.sum((-1, -2)) + (X * Y).sum(-1),
    }
    for name, want in expect.items():
        torch.testing.assert_close(out[name], want, rtol=1e-12, atol=1e-12, msg=name)


def test_numbers_print_as_the_language_writes_them():
    s = rb.Spec("nums")
    x = s.input("x")
    cases = [x * -2, x + 0.1, x * 1e-7, x * 1e20, (-2) ** x, -(x ** 2), (-x) ** 2, x - (-1.5),
             rb.minimum(x, rb.inf), rb.maximum(x, -math.inf), x * float("inf"), rb.const(1) + rb.const(2)]
    for k, e in enumerate(cases):
        s.let(f"y{k}", e)
    s.output("y0", None)
    src = s.to_source()
    for text in ["x * -2", "x + 0.1", "x * 1e-07", "x * 1e+20", "(-2) ** x", "-x ** 2", "(-x) ** 2",
                 "x - -1.5", "min(x, inf)", "max(x, -inf)", "x * inf", "1 + 2"]:
        assert text in src, text
    # no negative literal anywhere in the AST: -2 is Neg(Num(2)), as the parser makes it
    assert s.to_block().stmts[0].value == S.BinOp("*", S.Name("x"), S.Neg(S.Num(2.0)))
    assert parse(src).blocks[0] == s.to_block()
    with pytest.raises(rb.BuilderError, match="nan"):
        x * float("nan")


def test_several_outputs_and_an_output_that_names_a_state():
    s = rb.Spec("two")
    x = s.input("x", "D")
    h = s.state("h", "D")
    s[h] = 0.5 * h + x
    y = s.let("y", 2 * h, "D")
    s.output(y)
    s.output(h)
    assert s.to_source().splitlines()[0] == "rnn two(x[D]) -> (y[D], h[D]) {"
    y_, h_ = s.compile()(torch.ones(1, 3, 2, dtype=F64))
    assert torch.equal(h_[0, :, 0], torch.tensor([1.0, 1.5, 1.75], dtype=F64))
    assert torch.equal(y_, 2 * h_)


# --- 5. errors ------------------------------------------------------------------------------------------
def test_front_end_errors_point_into_the_generated_text():
    s = rb.Spec("bad")
    x = s.input("x", "D")
    W = s.param("W", "H", "D")
    s.let("y", x @ W)                      # [D] @ [H,D]: inner sizes differ
    s.output("y", "H")
    with pytest.raises(rnnc.RnncError) as ei:
        rnnc.compile(s, D=3, H=4)
    err = ei.value
    assert err.filename == "<builder bad>" and (err.line, err.col) == (3, 9)
    assert "'@' shape mismatch" in err.message
    assert str(err).splitlines()[1].strip() == "y = x @ W"   # the generated line, with a caret
    assert s.to_source().splitlines()[2].strip() == "y = x @ W"

    s2 = rb.Spec("twice")
    x = s2.input("x", "D")
    h = s2.state("h", "D")
    s2[h] = x
    s2[h] = 2 * x
    s2.output(h)
    with pytest.raises(rnnc.RnncError, match=r"<builder twice>:4:5: error: state 'h' is assigned twice"):
        s2.check()

    s3 = rb.Spec("unbound")
    x = s3.input("x", "D")
    i, j = rb.indices("i j")
    y = s3.local("y")
    s3[y[i]] = x[j]
    s3.output(y, "D")
    with pytest.raises(rnnc.RnncError, match="index 'j' is not bound"):
        s3.check()

    s4 = rb.Spec("sum")                    # a reserved name: the checker's message
    s4.output(s4.input("x"), None)
    with pytest.raises(rnnc.RnncError, match="reserved"):
        s4.check()


@pytest.mark.parametrize("misuse, match", [
    (lambda s, x: x + torch.ones(2), "got torch.Tensor"),
    (lambda s, x: x * "2", "str '2'"),
    (lambda s, x: x + True, "bool"),
    (lambda s, x: x[1.5], "an index is rb.Index or an int"),
    (lambda s, x: x[0:1], "slices"),
    (lambda s, x: x["i"], "rb.index"),
    (lambda s, x: x * rb.index("i"), "not a value"),
    (lambda s, x: (x + 1)[0], "only named tensors"),
    (lambda s, x: bool(x > 0), "no truth value"),
    (lambda s, x: max(x, 1), "no truth value"),
    (lambda s, x: rb.where(x, 1, 2), "must be a comparison"),
    (lambda s, x: rb.sum()(x), "needs the indices"),
    (lambda s, x: s.input("x y"), "invalid input name"),
    (lambda s, x: s.input(3), "must be a str"),
    (lambda s, x: s.state("param"), "keyword"),
    (lambda s, x: s.input("z", 0), "positive integer"),
    (lambda s, x: s.input("z", 1.5), "a dim is"),
    (lambda s, x: s.input("z", "H*"), "invalid dim"),
    (lambda s, x: s.param("p", init="glorot"), "unknown initializer"),
    (lambda s, x: s.state("st", init=rb.zeros), "constant number"),
    (lambda s, x: s.output(x + 1), "name or a handle"),
    (lambda s, x: s.assign(x * 2, 1), "name or a handle"),
    (lambda s, x: s.local("x"), "already declared as input"),
    (lambda s, x: x // 2, "not part of the .rnn language"),
    (lambda s, x: rb.Spec("empty").to_source(), "no outputs"),
])
def test_python_side_misuse_is_a_clear_builder_error(misuse, match):
    s = rb.Spec("f")
    x = s.input("x", "D")
    with pytest.raises(rb.BuilderError, match=match) as ei:
        misuse(s, x)
    assert isinstance(ei.value, rnnc.RnncError) and isinstance(ei.value, TypeError)


# --- 6. layers ------------------------------------------------------------------------------------------
def test_recurrent_layer_projects_splits_and_flattens():
    torch.manual_seed(0)
    layer = L.RecurrentLayer(hand_gla(), 12, H=2, K=3, V=5)
    assert layer.input_sizes == {"q": (2, 3), "k": (2, 3), "v": (2, 5), "g": (2, 3)}
    assert layer.proj.d_out == 6 + 6 + 10 + 6 and layer.d_out == 10
    x = torch.randn(2, 7, 12, dtype=F64)
    layer = layer.double()
    y, final = layer(x, output_final_state=True)
    assert y.shape == (2, 7, 10) and final["S"].shape == (2, 2, 3, 5)
    q, k, v, g = layer.split(x)
    torch.testing.assert_close(y, layer.rnn(q, k, v, g).reshape(2, 7, 10), rtol=0, atol=0)
    # the same function as the reference loop, through backend="auto" (the scan)
    assert layer.rnn.backend == "scan"
    ref = rnnc.compile(hand_gla(), H=2, K=3, V=5)
    torch.testing.assert_close(y, ref(q, k, v, g).reshape(2, 7, 10), rtol=1e-10, atol=1e-10)


def test_stack_composes_and_checks_widths():
    torch.manual_seed(0)
    mingru = rnnc.compile(str(ROOT / "examples" / "mingru.rnn"), D=8, H=6)
    model = L.Stack([L.Embedding(5, 8), L.LayerNorm(8), mingru, L.Fn("tanh"),
                     L.Residual(L.MLP(6, 12, 6)), L.RMSNorm(6), L.Linear(6, 3)])
    assert isinstance(model[2], L.RecurrentLayer) and model[2].proj is None   # fed directly
    assert model.d_out == 3 and L.count_params(model) > 0
    out = model(torch.randint(0, 5, (2, 9)))
    assert out.shape == (2, 9, 3)
    out.sum().backward()
    assert mingru.Wz.grad is not None
    with pytest.raises(rnnc.RnncError, match="takes width 5, but the layer before it gives 8"):
        L.Stack([L.Linear(4, 8), L.Linear(5, 2)])
    with pytest.raises(rnnc.RnncError, match="keeps the width"):
        L.Residual(L.Linear(4, 5))
    with pytest.raises(rnnc.RnncError, match="wrap it as"):
        L.Stack([L.Linear(4, 8), rnnc.compile(hand_gla(), H=2, K=2, V=2)])
    with pytest.raises(rnnc.RnncError, match="needs the size of dim K"):
        L.RecurrentLayer(hand_gla(), 8, H=2, V=2)
    with pytest.raises(rnnc.RnncError, match="weight must have shape"):
        L.Linear(2, 3, weight=torch.zeros(2, 3))


# --- 7. the examples ------------------------------------------------------------------------------------
def test_lsrl_parity_is_exact_on_every_bit_string_and_backend():
    ex = _load_example_module("lsrl_parity")
    bits = ex.all_bit_strings(10)
    assert bits.shape == (1024, 10, 1)
    parity = bits.squeeze(-1).cumsum(1) % 2
    for backend in ("sequential", "scan"):
        model = ex.parity_model(backend)
        assert model[0].rnn.backend == backend
        with torch.no_grad():
            assert torch.equal(model(bits).squeeze(-1), parity)
    rows = ex.check(long_T=300, long_B=32, seed=1)
    assert len(rows) == 8 and all(ok for *_, ok in rows), rows
    assert {b for _, b, _ in rows} == {"sequential", "scan"}


def test_search_quick_runs_and_saves_a_parsable_winner(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "search.py"), "--quick",
                           "--out", str(tmp_path), "--no-plot"],
                          capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - t0 < 240
    winner = tmp_path / "winner.rnn"
    assert winner.exists()
    program = parse(winner.read_text(), str(winner))
    rnnc.load(str(winner))
    results = json.loads((tmp_path / "results.json").read_text())
    assert program.blocks[0].name == results["winner"]
    assert results["confirmed"], results["verdict"]
    assert "verdict: CONFIRMED" in proc.stdout
