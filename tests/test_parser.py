"""The .rnn front end: every example and every spec of LANGUAGE.md parses and checks, the
AST round-trips through `rnnc.syntax.unparse`, and the syntax features the language page
promises mean what it says (checked numerically through compiled modules where semantics
matter, against torch computations written here)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc import syntax as S
from rnnc.parse import parse
from rnnc.syntax import unparse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.rnn"))
LANGUAGE_MD = ROOT.parent / "shared" / "LANGUAGE.md"
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# --- helpers ----------------------------------------------------------------------------------
def spec(text: str) -> str:
    """Dedented spec text (always contains a newline, so rnnc treats it as source)."""
    lines = text.strip("\n").splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines) + "\n"


def block(text: str) -> S.Block:
    (b,) = parse(spec(text)).blocks
    return b


def value_of(stmt_text: str, header: str = "rnn f(x, a, b, c, d) -> y") -> S.Expr:
    """The AST of the right-hand side of `y = <stmt_text>`."""
    b = block(f"{header} {{\n    y = {stmt_text}\n}}")
    return b.stmts[-1].value


def roundtrips(program: S.Program) -> None:
    text = unparse(program)
    back = parse(text)
    assert back.blocks == program.blocks, f"unparse/parse changed the AST:\n{text}"


def seq(*shape, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=F64)
    return x.abs() + 0.5 if positive else x


def run(source: str, *xs, **dims):
    m = rnnc.compile(spec(source), backend="sequential", **dims)
    return m, m(*xs)


B, T = 2, 5


# --- 1. examples and LANGUAGE.md ----------------------------------------------------------------
def test_examples_exist():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses_checks_and_roundtrips(path):
    rec = rnnc.load(str(path))
    assert rec.name == path.stem
    program = parse(path.read_text(), str(path))
    assert [b.name for b in program.blocks] == [path.stem]
    roundtrips(program)
    # the canonical text also checks, to the same recurrence interface
    rec2 = rnnc.load(unparse(program))
    assert [d.name for d in rec2.inputs] == [d.name for d in rec.inputs]
    assert [d.name for d in rec2.outputs] == [d.name for d in rec.outputs]
    assert [d.shape for d in rec2.params] == [d.shape for d in rec.params]


def _language_blocks() -> list:
    if not LANGUAGE_MD.exists():
        return []
    text = LANGUAGE_MD.read_text()
    fences = re.findall(r"^```([^\n`]*)\n(.*?)^```", text, re.S | re.M)
    return [body for lang, body in fences
            if lang.strip() in ("", "rnn") and re.search(r"^\s*rnn\s+\w+\s*\(", body, re.M)]


LANGUAGE_BLOCKS = _language_blocks()
needs_md = pytest.mark.skipif(not LANGUAGE_MD.exists(), reason="../shared/LANGUAGE.md is missing")


@needs_md
def test_language_md_has_the_documented_specs():
    names = {b.name for body in LANGUAGE_BLOCKS for b in parse(body).blocks}
    assert {"gla", "elman", "lstm", "gru", "mingru", "s6", "rglru", "retnet",
            "gated_deltanet", "mlstm"} <= names


@needs_md
@pytest.mark.parametrize("index", range(max(len(LANGUAGE_BLOCKS), 1)))
def test_language_md_block_parses_verbatim(index):
    if not LANGUAGE_BLOCKS:
        pytest.skip("no rnn code block found in LANGUAGE.md")
    body = LANGUAGE_BLOCKS[index]
    program = parse(body, "LANGUAGE.md")
    assert program.blocks
    roundtrips(program)
    for b in program.blocks:
        rec = rnnc.load(body, name=b.name)
        assert rec.name == b.name


# --- 2. syntax features ---------------------------------------------------------------------------
PLAIN = spec("""
    rnn f(x[D], g) -> (y[D], h[D]) {
        param W[D,D] = zeros, b[D] = 0.5
        state h[D] = 0
        h = g * h + tanh(W @ x + b)
        y = -h ** 2
    }
""")


def test_comments_and_blank_lines_are_ignored():
    noisy = (
        "# a file comment\n"
        "\n"
        "   # an indented comment line\n"
        "rnn f(x[D], g) -> (y[D], h[D]) {   # trailing comment on the header\n"
        "\n"
        "    # comment inside the block\n"
        "    param W[D,D] = zeros, b[D] = 0.5  # with a comment\n"
        "\n\n"
        "    state h[D] = 0\n"
        "    h = g * h + tanh(W @ x + b)#no space before it\n"
        "    # another one\n"
        "    y = -h ** 2\n"
        "\n"
        "}  # after the block\n"
        "# the end, no newline at end of file")
    assert parse(noisy).blocks == parse(PLAIN).blocks
    rnnc.load(noisy)


def test_crlf_line_endings_and_tabs():
    assert parse(PLAIN.replace("\n", "\r\n").replace("    ", "\t")).blocks == parse(PLAIN).blocks


def test_statements_span_lines_inside_brackets():
    split = spec("""
        rnn f(
            x[D],
            g
        ) -> (
            y[D],
            h[D]
        ) {
            param W[D,
                    D] = zeros, b[D] = 0.5
            state h[D] = 0
            h = g * h + tanh(
                W @ x
                + b
            )
            y = -(h
                  ) ** 2
        }
    """)
    b_split, b_plain = parse(split).blocks[0], parse(PLAIN).blocks[0]
    # `-(h) ** 2` is `-(h ** 2)` just as `-h ** 2`
    assert b_split == b_plain
    rnnc.load(split)


def test_backslash_continues_a_line_and_one_line_blocks():
    a = block("""
        rnn f(x[D]) -> y[D] {
            y = x \\
                * 2
        }
    """)
    b = block("rnn f(x[D]) -> y[D] { y = x * 2 }")
    assert a == b
    assert a.stmts[0].value == S.BinOp("*", S.Name("x"), S.Num(2.0))


def test_several_blocks_and_name_selection():
    text = spec("""
        rnn first(x[D]) -> y[D] {
            y = x + 1
        }

        rnn second(x[D]) -> y[D] {
            y = x * 3
        }
    """)
    assert [b.name for b in parse(text).blocks] == ["first", "second"]
    x = seq(B, T, 3)
    m1 = rnnc.compile(text, name="first")
    m2 = rnnc.compile(text, name="second")
    torch.testing.assert_close(m1(x), x + 1, **TOL)
    torch.testing.assert_close(m2(x), x * 3, **TOL)


def test_several_outputs_in_header_order():
    b = parse(PLAIN).blocks[0]
    assert [(o.name, o.shape) for o in b.outputs] == [
        ("y", (S.DimName("D"),)), ("h", (S.DimName("D"),))]
    x, g = seq(B, T, 3, seed=1), seq(B, T, seed=2).sigmoid()
    m = rnnc.compile(PLAIN, D=3)
    out = m(x, g)
    assert isinstance(out, tuple) and len(out) == 2
    y, h = out
    # reference: W = 0, b = 0.5
    hh = torch.zeros(B, 3, dtype=F64)
    hs = []
    for t in range(T):
        hh = g[:, t, None] * hh + torch.tanh(torch.full_like(hh, 0.5))
        hs.append(hh)
    href = torch.stack(hs, 1)
    torch.testing.assert_close(h, href, **TOL)
    torch.testing.assert_close(y, -(href ** 2), **TOL)


def test_output_naming_a_state_emits_end_of_step_value_and_reads_before_after():
    m, (before, after, s) = run("""
        rnn f(x) -> (before, after, s) {
            state s = 0
            before = s
            s = s + x
            after = s
        }
    """, seq(B, T, seed=3))
    x = seq(B, T, seed=3)
    c = x.cumsum(1)
    torch.testing.assert_close(after, c, **TOL)
    torch.testing.assert_close(s, c, **TOL)
    torch.testing.assert_close(before, torch.cat([torch.zeros(B, 1, dtype=F64), c[:, :-1]], 1), **TOL)


def test_state_init_minus_inf_running_max():
    x = seq(B, T, 4, seed=4)
    m, y = run("""
        rnn f(x[D]) -> m[D] {
            state m[D] = -inf
            m = max(m, x)
        }
    """, x)
    torch.testing.assert_close(y, x.cummax(1).values, **TOL)


def test_state_update_that_reads_no_state():
    """A state whose new value depends on no state (here only on the input) is legal:
    it is carried, and an output naming it emits it."""
    x = seq(B, T, 3, seed=5)
    m, (y, h) = run("""
        rnn f(x[D]) -> (y[D], h[D]) {
            state h[D] = 0
            y = h
            h = 2 * x
        }
    """, x)
    torch.testing.assert_close(h, 2 * x, **TOL)
    torch.testing.assert_close(y, torch.cat([torch.zeros_like(x[:, :1]), 2 * x[:, :-1]], 1), **TOL)


def test_bare_scalar_inputs_and_outputs():
    b = block("""
        rnn f(x[D], g) -> (y[D], s) {
            y = g * x
            s = g + 1
        }
    """)
    assert b.inputs[1] == S.Arg("g", None) and b.outputs[1] == S.Arg("s", None)
    x, g = seq(B, T, 3, seed=6), seq(B, T, seed=7)
    m = rnnc.compile(unparse(S.Program((b,))))
    y, s = m(x, g)
    assert s.shape == (B, T)
    torch.testing.assert_close(y, g[..., None] * x, **TOL)
    torch.testing.assert_close(s, g + 1, **TOL)


def test_dims_as_products():
    b = block("""
        rnn f(x[D], z[2*H]) -> y[4*H] {
            param W[4 * H, D], V[(2)*H*1, 3]
            y = W @ x
        }
    """)
    assert b.inputs[1].shape == (S.DimProd((S.DimInt(2), S.DimName("H"))),)
    assert b.stmts[0].decls[0].shape == (S.DimProd((S.DimInt(4), S.DimName("H"))), S.DimName("D"))
    # parenthesised factors flatten into one product
    assert b.stmts[0].decls[1].shape[0] == S.DimProd((S.DimInt(2), S.DimName("H"), S.DimInt(1)))
    m = rnnc.compile(spec("""
        rnn f(x[D]) -> y[4*H] {
            param W[4*H, D]
            y = W @ x
        }
    """), H=2, D=3)
    assert tuple(m.W.shape) == (8, 3)
    x = seq(B, T, 3, seed=8)
    torch.testing.assert_close(m(x), x @ m.W.detach().to(F64).T, **TOL)


def test_product_dims_resolve_per_size_set():
    # concrete() caches substituted products; the cache must key on the sizes themselves
    import sympy

    from rnnc.interpret import concrete
    from rnnc.ir import dim_symbol
    H, D = (dim_symbol(n) for n in ("H", "D"))
    three = sympy.Integer(3)
    assert concrete((2 * H, D, three), {"H": 3, "D": 5}) == (6, 5, 3)
    assert concrete((2 * H, D, three), {"H": 4, "D": 1}) == (8, 1, 3)
    assert concrete((H * D,), {"H": 4, "D": 7}) == (28,)
    m = rnnc.compile(spec("""
        rnn f(x[D]) -> y[4*H] {
            param W[4*H, D]
            y = W @ x
        }
    """), H=3, D=2)
    assert tuple(m(seq(B, T, 2)).shape) == (B, T, 12)


def test_product_dim_is_solved_from_an_input():
    m, y = run("""
        rnn f(x[2*H], g[H]) -> y[2*H] {
            y = 3 * x
        }
    """, seq(B, T, 6), seq(B, T, 3))
    torch.testing.assert_close(y, 3 * seq(B, T, 6), **TOL)


def test_power_is_right_associative():
    assert value_of("a ** b ** c") == S.BinOp(
        "**", S.Name("a"), S.BinOp("**", S.Name("b"), S.Name("c")))
    x = seq(B, T, 3, positive=True, seed=9)
    m, y = run("""
        rnn f(x[D]) -> y[D] {
            y = 2 ** x ** 2
        }
    """, x)
    torch.testing.assert_close(y, 2 ** (x ** 2), **TOL)
    assert not torch.allclose(y, (2 ** x) ** 2)


def test_unary_minus_binds_looser_than_power():
    assert value_of("-x ** 2") == S.Neg(S.BinOp("**", S.Name("x"), S.Num(2.0)))
    assert value_of("(-x) ** 2") == S.BinOp("**", S.Neg(S.Name("x")), S.Num(2.0))
    assert value_of("2 ** -x") == S.BinOp("**", S.Num(2.0), S.Neg(S.Name("x")))
    assert value_of("-a * b") == S.BinOp("*", S.Neg(S.Name("a")), S.Name("b"))
    assert value_of("a - -b") == S.BinOp("-", S.Name("a"), S.Neg(S.Name("b")))
    x = seq(B, T, 3, seed=10)
    m, (y1, y2, y3, y4) = run("""
        rnn f(x[D]) -> (y1[D], y2[D], y3[D], y4) {
            y1 = -x ** 2
            y2 = (-x) ** 2
            y3 = 2 ** -x
            y4 = -2 ** 2
        }
    """, x)
    torch.testing.assert_close(y1, -(x ** 2), **TOL)
    torch.testing.assert_close(y2, x ** 2, **TOL)
    torch.testing.assert_close(y3, 2.0 ** -x, **TOL)
    torch.testing.assert_close(y4, torch.full((B, T), -4.0, dtype=F64), **TOL)


def test_arithmetic_is_left_associative():
    assert value_of("a - b - c") == S.BinOp(
        "-", S.BinOp("-", S.Name("a"), S.Name("b")), S.Name("c"))
    assert value_of("a / b * c") == S.BinOp(
        "*", S.BinOp("/", S.Name("a"), S.Name("b")), S.Name("c"))
    assert value_of("a + b * c") == S.BinOp(
        "+", S.Name("a"), S.BinOp("*", S.Name("b"), S.Name("c")))
    a, b, c = seq(B, T, seed=11), seq(B, T, positive=True, seed=12), seq(B, T, positive=True, seed=13)
    m, (y1, y2) = run("""
        rnn f(a, b, c) -> (y1, y2) {
            y1 = a - b - c
            y2 = a / b / c
        }
    """, a, b, c)
    torch.testing.assert_close(y1, a - b - c, **TOL)
    torch.testing.assert_close(y2, a / b / c, **TOL)


@pytest.mark.parametrize("text,value", [
    ("3", 3.0), ("0.25", 0.25), (".5", 0.5), ("2.", 2.0), ("1e3", 1000.0), ("1E-2", 0.01),
    ("2.5e+1", 25.0),
])
def test_number_literals(text, value):
    assert value_of(text) == S.Num(value)


@pytest.mark.parametrize("op,fn", [
    (">", torch.gt), (">=", torch.ge), ("<", torch.lt), ("<=", torch.le),
    ("==", torch.eq), ("!=", torch.ne),
])
def test_where_with_each_comparison(op, fn):
    assert value_of(f"where(a {op} b, c, d)") == S.Call(
        "where", (S.Compare(op, S.Name("a"), S.Name("b")), S.Name("c"), S.Name("d")))
    a = torch.tensor([[0.0, 1.0, 2.0, -1.0, 3.0]], dtype=F64)
    b = torch.tensor([[0.0, 2.0, 1.0, -1.0, 3.5]], dtype=F64)
    c, d = seq(1, 5, seed=14), seq(1, 5, seed=15)
    m, y = run(f"""
        rnn f(a, b, c, d) -> y {{
            y = where(a {op} b, c, d)
        }}
    """, a, b, c, d)
    torch.testing.assert_close(y, torch.where(fn(a, b), c, d), **TOL)


def test_where_leaky_relu_with_broadcasting():
    x = seq(B, T, 4, seed=16)
    m, y = run("""
        rnn f(x[D]) -> y[D] {
            y = where(x > 0, x, 0.1 * x)
        }
    """, x)
    torch.testing.assert_close(y, torch.where(x > 0, x, 0.1 * x), **TOL)


def test_integer_and_negative_integer_indices():
    assert value_of("z[0, a]", "rnn f(z[A,C]) -> y") == S.Access(
        "z", (S.IndexInt(0), S.IndexName("a")))
    assert value_of("z[-1, a]", "rnn f(z[A,C]) -> y") == S.Access(
        "z", (S.IndexInt(-1), S.IndexName("a")))
    z = seq(B, T, 3, 4, seed=17)
    m, (first, last, corner) = run("""
        rnn f(z[A,C]) -> (first[C], last[C], corner) {
            first[a] = z[0, a]
            last[a] = z[-1, a]
            corner = z[2, -4]
        }
    """, z)
    torch.testing.assert_close(first, z[:, :, 0, :], **TOL)
    torch.testing.assert_close(last, z[:, :, -1, :], **TOL)
    torch.testing.assert_close(corner, z[:, :, 2, 0], **TOL)


def test_max_reduction_versus_binary_max():
    red = value_of("max[i](z[h, i])", "rnn f(z[A,C]) -> y[A]")
    assert red == S.Reduce("max", (S.IndexName("i"),), S.Access("z", (S.IndexName("h"), S.IndexName("i"))))
    assert value_of("max(a, b)") == S.Call("max", (S.Name("a"), S.Name("b")))
    assert value_of("min(a, b)") == S.Call("min", (S.Name("a"), S.Name("b")))
    z, w = seq(B, T, 3, 4, seed=18), seq(B, T, 3, seed=19)
    m, (rmax, bmax, both) = run("""
        rnn f(z[A,C], w[A]) -> (rmax[A], bmax[A], both[A]) {
            rmax[h] = max[i](z[h, i])
            bmax = max(w, 0)
            both[h] = max(max[i](z[h, i]), w[h])
        }
    """, z, w)
    torch.testing.assert_close(rmax, z.amax(-1), **TOL)
    torch.testing.assert_close(bmax, w.clamp_min(0), **TOL)
    torch.testing.assert_close(both, torch.maximum(z.amax(-1), w), **TOL)


def test_sum_reduction_over_several_indices_and_einsum_semantics():
    q, k, v = seq(B, T, 2, 3, seed=20), seq(B, T, 2, 3, seed=21), seq(B, T, 2, 4, seed=22)
    m, (outer, dot, tot) = run("""
        rnn f(q[H,K], k[H,K], v[H,V]) -> (outer[H,K,V], dot[H], tot) {
            outer[h, i, j] = k[h, i] * v[h, j]
            dot[h] = sum[i](q[h, i] * k[h, i])
            tot = sum[h, i](q[h, i])
        }
    """, q, k, v)
    torch.testing.assert_close(outer, torch.einsum("bthi,bthj->bthij", k, v), **TOL)
    torch.testing.assert_close(dot, (q * k).sum(-1), **TOL)
    torch.testing.assert_close(tot, q.sum((-1, -2)), **TOL)


def test_transpose_by_index_order_and_index_sharing_a_tensor_name():
    z = seq(B, T, 3, 4, seed=23)
    h = seq(B, T, 3, seed=24)
    m, (zt, hh) = run("""
        rnn f(z[A,C], h[A]) -> (zt[C,A], hh[A]) {
            zt[j, h] = z[h, j]
            hh[h] = h[h] * h[h]
        }
    """, z, h)
    torch.testing.assert_close(zt, z.transpose(-1, -2), **TOL)
    torch.testing.assert_close(hh, h * h, **TOL)


def test_matmul_and_broadcasting_in_tensor_form():
    m = rnnc.compile(spec("""
        rnn f(x[D], r[H,D]) -> (y[H], z[H,D], s) {
            param W[H,D], M[D,D]
            y = W @ x
            z = r @ M + x
            s = x @ x
        }
    """), H=2, D=3)
    x, r = seq(B, T, 3, seed=25), seq(B, T, 2, 3, seed=26)
    y, z, s = m(x, r)
    W, M = m.W.detach().to(F64), m.M.detach().to(F64)
    torch.testing.assert_close(y, x @ W.T, **TOL)
    torch.testing.assert_close(z, r @ M + x[..., None, :], **TOL)
    torch.testing.assert_close(s, (x * x).sum(-1), **TOL)


@pytest.mark.parametrize("fn,ref", [
    ("exp", torch.exp), ("log", lambda x: torch.log(x.abs() + 0.1)), ("sigmoid", torch.sigmoid),
    ("tanh", torch.tanh), ("relu", torch.relu), ("softplus", torch.nn.functional.softplus),
    ("silu", torch.nn.functional.silu), ("logsigmoid", torch.nn.functional.logsigmoid),
    ("sqrt", lambda x: torch.sqrt(x.abs() + 0.1)), ("abs", torch.abs),
])
def test_functions(fn, ref):
    arg = "abs(x) + 0.1" if fn in ("log", "sqrt") else "x"
    x = seq(B, T, 3, seed=27)
    m, y = run(f"""
        rnn f(x[D]) -> y[D] {{
            y = {fn}({arg})
        }}
    """, x)
    torch.testing.assert_close(y, ref(x), **TOL)


def test_param_initializers():
    m = rnnc.compile(spec("""
        rnn f(x[D]) -> y[D] {
            param a[D] = zeros, b[D] = ones, c[D] = -2.5, d[H,D] = normal(0), e[D] = uniform(3, 3)
            param w[H,D]
            y = x
        }
    """), D=3, H=4)
    assert torch.equal(m.a, torch.zeros(3)) and torch.equal(m.b, torch.ones(3))
    assert torch.equal(m.c, torch.full((3,), -2.5))
    assert torch.equal(m.d, torch.zeros(4, 3)) and torch.equal(m.e, torch.full((3,), 3.0))
    bound = 1 / 3 ** 0.5
    assert m.w.shape == (4, 3) and m.w.abs().max() <= bound
    assert set(dict(m.named_parameters())) == {"a", "b", "c", "d", "e", "w"}


def test_unparse_prints_canonical_text_that_parses_back():
    text = spec("""
        rnn f(x[D], g, z[A,C]) -> (y[D], s) {
            param W[2*D, D] = normal(0.5), u[D] = -1, v[D] = uniform(-1, 1)
            state s = -inf, S[D,D] = 0
            t = -x ** 2 + (-x) ** 2 - 2 ** -x ** 3 / (g - (g - g))
            u2[i, j] = sum[k](W[i, k] * W[k, j]) + max[k](z[0, k]) + z[-1, 0]
            y = where(x >= g, exp(-t), max(x, min(g, 1e-3))) + x @ W[0, 0] * 0
            s = max(s, g)
        }
    """)
    roundtrips(parse(text))
