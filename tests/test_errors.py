"""Errors are part of the interface: every mistake in a spec, a compile request or a call
of a compiled module is an `rnnc.RnncError` with a clear message; spec errors carry the
exact line and column and print as `FILE:LINE:COL: error: MESSAGE`, the source line and a
caret under the column. Never any other exception type."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc import RnncError
from rnnc.interpret import concrete

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.rnn"))

H1 = "rnn f(x[D]) -> y[D] {\n"  # a one-line header shared by many cases below


# --- helpers ---------------------------------------------------------------------------------------
def raises_rnnc(fn, *args, **kwargs) -> RnncError:
    """Call fn; it must raise RnncError and nothing else (a bare traceback fails loudly)."""
    try:
        fn(*args, **kwargs)
    except RnncError as err:
        return err
    except Exception as err:  # pragma: no cover - reports an rnnc bug
        pytest.fail(f"raised {type(err).__name__} instead of RnncError: {err}")
    pytest.fail("no error was raised")


def assert_located(err: RnncError, source: str, message: str, line: int, col: int,
                   token: str, filename: str = "<spec>") -> None:
    """The message, the position, and the formatted text with source line and caret."""
    assert message in err.message, err.message
    assert (err.line, err.col) == (line, col), f"{err.line}:{err.col} != {line}:{col}\n{err}"
    src_line = source.splitlines()[line - 1]
    # the position points at the offending token (guards the test table itself too)
    assert src_line[col - 1:].startswith(token), (src_line, col, token)
    assert err.filename == filename
    text = str(err)
    lines = text.splitlines()
    assert lines[0] == f"{filename}:{line}:{col}: error: {err.message}"
    assert lines[1] == "    " + src_line.replace("\t", " ")
    assert lines[2] == "    " + " " * (col - 1) + "^"
    assert len(lines) == 3
    assert "Traceback" not in text


def assert_unlocated(err: RnncError, message: str, filename: str = "<spec>") -> None:
    assert message in err.message, err.message
    assert err.line is None and err.col is None
    assert str(err) == f"{filename}: error: {err.message}"


def src(*body: str, header: str = H1) -> str:
    return header + "".join(f"    {line}\n" for line in body) + "}\n"


# --- spec errors: (id, source, compile kwargs, message, line, col, token at the caret) -------------------
SPEC_ERRORS = [
    # syntax
    ("syntax_unexpected_token", src("y = x +* 2"), {},
     "syntax error: unexpected '*'", 2, 12, "*"),
    ("syntax_missing_arrow", "rnn f(x[D]) y[D] {\n    y = x\n}\n", {},
     "syntax error: unexpected 'y'", 1, 13, "y[D]"),
    ("syntax_unexpected_end_of_line", src("y = x +"), {},
     "syntax error: unexpected end of line", 2, 12, ""),
    ("syntax_unclosed_paren", src("y = (x"), {},
     "syntax error: unexpected '}'", 3, 1, "}"),
    ("syntax_junk_after_block", src("y = x") + "} \n", {},
     "syntax error: unexpected '}'", 4, 1, "}"),
    ("syntax_two_comparisons", src("y = where(x > 0 > 1, x, x)"), {},
     "syntax error: unexpected '>'", 2, 21, "> 1"),
    ("unexpected_character", src("y = x $ 2"), {},
     "unexpected character '$'", 2, 11, "$"),
    ("unexpected_character_semicolon", src("y = x ; y = x"), {},
     "unexpected character ';'", 2, 11, ";"),
    ("unexpected_character_after_tab", "rnn f(x[D]) -> y[D] {\n\ty = x ! 2\n}\n", {},
     "unexpected character '!'", 2, 8, "!"),
    ("unexpected_end_of_file", "rnn f(x[D]) -> y[D] {\n    y = x\n", {},
     "unexpected end of file", 2, 10, ""),
    ("unexpected_end_of_file_in_header", "rnn f(x[D]) -> y[D] {", {},
     "unexpected end of file", 1, 22, ""),
    # names and functions
    ("unknown_name", src("y = x + z"), {}, "unknown name 'z'", 2, 13, "z"),
    ("unknown_name_on_continuation_line", "rnn f(x[D]) -> y[D] {\n    y = tanh(x\n             + q)\n}\n",
     {}, "unknown name 'q'", 3, 16, "q)"),
    ("unknown_name_after_comments_and_blank_lines",
     "\n\n# comment\nrnn f(x[D]) -> y[D] {  # c\n\n    y = x * q  # c\n}\n", {}, "unknown name 'q'", 6, 13, "q"),
    ("unknown_name_crlf", "rnn f(x[D]) -> y[D] {\r\n    y = q\r\n}\r\n", {}, "unknown name 'q'", 2, 9, "q"),
    ("unknown_name_indexed", src("y[d] = x[d] * w[d]"), {}, "unknown name 'w'", 2, 19, "w[d]"),
    ("dim_used_as_value", src("y = D"), {}, "'D' is a dim, not a value", 2, 9, "D"),
    ("function_used_as_value", src("y = exp"), {}, "'exp' is a function", 2, 9, "exp"),
    ("unknown_function", src("y = foo(x)"), {}, "unknown function 'foo'", 2, 9, "foo(x)"),
    ("unknown_function_sum_call", src("y = 2 * sum(x)"), {}, "sum over an axis is written sum[i](...)", 2, 13, "sum(x)"),
    ("function_arity_exp", src("y = exp(x, x)"), {}, "exp takes 1 argument, got 2", 2, 9, "exp("),
    ("function_arity_max", src("y = 1 + max(x)"), {}, "max takes 2 arguments, got 1", 2, 13, "max("),
    ("function_arity_where", src("y = where(x > 0, x)"), {}, "where takes 3 arguments, got 2",
     2, 9, "where("),
    ("function_arity_zero", src("y = tanh()"), {}, "tanh takes 1 argument, got 0", 2, 9, "tanh("),
    ("unknown_reduction", src("y[d] = prod[d](x[d])"), {},
     "unknown reduction 'prod'", 2, 12, "prod["),
    # indices
    ("unbound_index", "rnn f(x[D], z[D]) -> y[D] {\n    y[d] = x[d] * z[e]\n}\n", {},
     "index 'e' is not bound", 2, 21, "e]"),
    ("unbound_index_tensor_form", "rnn f(x[D]) -> y {\n    y = x[d]\n}\n", {},
     "index 'd' is not bound", 2, 11, "d]"),
    ("index_on_different_sizes", "rnn f(x[D], z[E]) -> y[D] {\n    y[d] = x[d] * z[d]\n}\n", {},
     "index 'd' is used on axes of different sizes: D", 2, 21, "d]"),
    ("index_on_different_sizes_in_sum", "rnn f(x[D], z[E]) -> y {\n    y = sum[i](x[i] * z[i])\n}\n", {},
     "index 'i' is used on axes of different sizes", 2, 25, "i]"),
    ("index_on_different_sizes_vs_state",
     src("state S[D,D]", "S[i,j] = S[i,j] * q[j]", "y = x", header="rnn f(x[D], q[E]) -> y[D] {\n"),
     {}, "index 'j' is used on axes of different sizes: D (state S) and E (q[...])", 3, 25, "j]"),
    ("too_many_indices", src("y[d] = x[d, e]"), {}, "2 indices are given", 2, 12, "x[d, e]"),
    ("too_few_indices", "rnn f(z[D,E]) -> y[D] {\n    y[d] = z[d]\n}\n", {},
     "1 index is given", 2, 12, "z[d]"),
    ("state_target_wrong_index_count", src("state S[D,D]", "S[i] = x[i]", "y = x"), {},
     "state S[D,D] has 2 axes but 1 index is given", 3, 5, "S[i]"),
    ("integer_index_out_of_range", "rnn f(x[3]) -> y {\n    y = x[3]\n}\n", {},
     "index 3 is out of range for an axis of size 3", 2, 11, "3]"),
    ("negative_index_out_of_range", "rnn f(x[3]) -> y {\n    y = x[-4]\n}\n", {},
     "index -4 is out of range", 2, 11, "-4]"),
    ("index_twice_on_lhs", src("y[d, d] = x[d]"), {}, "index 'd' appears twice", 2, 10, "d]"),
    ("integer_index_on_lhs", src("y[0] = x[0]"), {}, "index names, not numbers", 2, 7, "0]"),
    ("lhs_index_without_size", "rnn f(x[D]) -> y {\n    z[d] = 1\n    y = 1\n}\n", {},
     "index 'd' on the left-hand side has no size", 2, 7, "d]"),
    ("reduction_rebinds_index", src("y[d] = sum[d](x[d])"), {},
     "index 'd' is already bound", 2, 16, "d]"),
    ("reduction_index_unused", "rnn f(x[D]) -> y {\n    y = sum[d](x[d]) + sum[e](1)\n}\n", {},
     "index 'e' of sum[e] does not index anything", 2, 28, "e]"),
    ("unindexed_tensor_in_index_form", src("y[d] = x[d] + x"), {},
     "'x' has shape [D]", 2, 19, "x"),
    # shapes
    ("matmul_shape_mismatch", "rnn f(x[D]) -> y[H] {\n    param W[H,E]\n    y = W @ x\n}\n", {},
     "'@' shape mismatch: [H,E] @ [D]", 3, 9, "W @ x"),
    ("matmul_scalar_operand", src("y = x[0] @ x"), {}, "'@' needs operands with at least one axis",
     2, 9, "x[0] @ x"),
    ("matmul_in_index_form", src("y[d] = x[d] @ x[d]"), {}, "'@' takes tensor-form operands",
     2, 12, "x[d] @"),
    ("broadcast_mismatch", "rnn f(x[D], z[E]) -> y[D] {\n    y = x + z\n}\n", {},
     "shapes [D] and [E] do not broadcast in '+'", 2, 9, "x + z"),
    ("broadcast_mismatch_in_function", "rnn f(x[D], z[E]) -> y[D] {\n    y = 1 + max(x, z)\n}\n", {},
     "shapes [D] and [E] do not broadcast in max(...)", 2, 13, "max(x, z)"),
    ("broadcast_mismatch_2d", "rnn f(x[D,E], z[D]) -> y[D,E] {\n    y = x * z\n}\n", {},
     "do not broadcast in '*'", 2, 9, "x * z"),
    ("state_wrong_shape", "rnn f(x[D]) -> h[H] {\n    state h[H]\n    h = x\n}\n", {},
     "cannot assign a value of shape [D] to state h[H]", 3, 5, "h = x"),
    ("output_wrong_shape", "rnn f(x[D]) -> y[H] {\n    y = x\n}\n", {},
     "cannot assign a value of shape [D] to output y[H]", 1, 16, "y[H]"),
    # assignments and declarations
    ("state_assigned_twice", src("state h[D]", "h = x", "h = x * 2", "y = h"), {},
     "state 'h' is assigned twice in one step (first at line 3)", 4, 5, "h = x * 2"),
    ("state_assigned_twice_index_form", src("state h[D]", "h[i] = x[i]", "h = x * 2", "y = h"), {},
     "state 'h' is assigned twice", 4, 5, "h = x * 2"),
    ("assign_to_input", src("x = x * 2", "y = x"), {},
     "cannot assign to input 'x'", 2, 5, "x = x"),
    ("assign_to_param", src("param W[D]", "W = x", "y = x"), {"D": 3},
     "cannot assign to param 'W'", 3, 5, "W = x"),
    ("assign_to_param_index_form", src("param W[D]", "W[i] = x[i]", "y = x"), {"D": 3},
     "cannot assign to param 'W'", 3, 5, "W[i]"),
    ("output_never_assigned", src("z = x"), {}, "output 'y' is never assigned", 1, 16, "y[D]"),
    ("output_listed_twice", "rnn f(x[D]) -> (y[D], y[D]) {\n    y = x\n}\n", {},
     "output 'y' is listed twice", 1, 23, "y[D])"),
    ("param_declared_twice", src("param W[D], W[D]", "y = x"), {},
     "'W' is already declared as param at line 2", 2, 17, "W[D]"),
    ("input_declared_twice", "rnn f(x[D], x[D]) -> y[D] {\n    y = x\n}\n", {},
     "'x' is already declared as input at line 1", 1, 13, "x[D])"),
    ("state_shadows_param", src("param W[D]", "state W[D]", "y = x"), {},
     "'W' is already declared as param at line 2", 3, 11, "W[D]"),
    ("state_shadows_input", src("state x[D]", "y = x"), {},
     "'x' is already declared as input at line 1", 2, 11, "x[D]"),
    ("block_defined_twice", src("y = x") + src("y = x"), {},
     "rnn 'f' is defined twice (first at line 1)", 4, 5, "f("),
    # dims
    ("param_dim_not_given", "rnn f(x[D]) -> y[H] {\n    param W[H,D]\n    y = W @ x\n}\n", {"D": 3},
     "dim H has no size: param W[H,D] needs it; pass H=...", 2, 11, "W[H,D]"),
    ("param_dims_none_given", "rnn f(x[D]) -> y[D] {\n    param b[D]\n    y = x + b\n}\n", {},
     "dim D has no size", 2, 11, "b[D]"),
    ("state_dim_in_no_input", src("state s[E]", "y = x"), {},
     "dim E has no size: it appears in no input, so pass E=...", 2, 13, "E]"),
    ("output_dim_in_no_input", "rnn f(x) -> y[D] {\n    y = x\n}\n", {},
     "dim D has no size", 1, 15, "D]"),
    ("lower_case_dim", "rnn f(x[d]) -> y[d] {\n    y = x\n}\n", {},
     "dim names are upper-case (got 'd')", 1, 9, "d]"),
    ("zero_dim", "rnn f(x[0]) -> y {\n    y = 1\n}\n", {},
     "a dim must be a positive integer", 1, 9, "0]"),
    # comparisons
    ("comparison_outside_where", src("y = x > 0"), {},
     "a comparison can only be the condition of where(c, a, b)", 2, 11, "> 0"),
    ("comparison_inside_function", src("y = exp(x <= 0)"), {},
     "a comparison can only be the condition of where", 2, 15, "<= 0"),
    ("comparison_in_where_branch", src("y = where(x > 0, x == 1, x)"), {},
     "a comparison can only be the condition of where", 2, 24, "== 1"),
    ("where_condition_not_comparison", src("y = where(x, x, 0)"), {},
     "the condition of where(c, a, b) must be a comparison", 2, 15, "x, x"),
    # initial values
    ("state_init_not_constant", src("state s[D] = x", "y = x"), {},
     "a state's initial value must be a constant number", 2, 18, "x"),
    ("state_init_call", src("state s[D] = exp(1)", "y = x"), {},
     "a state's initial value must be a constant number", 2, 18, "exp(1)"),
    ("state_init_nan", src("state s[D] = inf - inf", "y = x"), {},
     "a state's initial value must be a constant number", 2, 18, "inf - inf"),
    ("param_init_name", src("param W[D] = x", "y = x"), {"D": 2},
     "a param's initializer is zeros, ones, a number, normal(std) or uniform(lo, hi)", 2, 18, "x"),
    ("param_init_unknown_call", src("param W[D] = xavier(1)", "y = x"), {"D": 2},
     "a param's initializer is", 2, 18, "xavier(1)"),
    ("param_init_normal_arity", src("param W[D] = normal(1, 2)", "y = x"), {"D": 2},
     "normal(...) takes 1 finite number", 2, 18, "normal("),
    ("param_init_normal_negative", src("param W[D] = normal(-1)", "y = x"), {"D": 2},
     "normal(std) needs std >= 0", 2, 18, "normal("),
    ("param_init_uniform_arity", src("param W[D] = uniform(1)", "y = x"), {"D": 2},
     "uniform(...) takes 2 finite numbers", 2, 18, "uniform("),
    ("param_init_uniform_order", src("param W[D] = uniform(2, 1)", "y = x"), {"D": 2},
     "uniform(lo, hi) needs lo <= hi", 2, 18, "uniform("),
    ("param_init_uniform_not_number", src("param W[D] = uniform(x, 1)", "y = x"), {"D": 2},
     "uniform(...) takes 2 finite numbers", 2, 18, "uniform("),
]

# reserved or unsafe identifiers, in every place a spec can introduce a name
RESERVED_NAMES = ["__import__", "import", "exec", "eval", "torch", "self", "_x", "exp", "sum",
                  "max", "inf", "print", "lambda", "F"]
for _n in RESERVED_NAMES:
    _msg = "reserved" if not _n.startswith("_") else "invalid"
    SPEC_ERRORS += [
        (f"reserved_variable_{_n}", src(f"{_n} = x", "y = x"), {}, _msg, 2, 5, _n),
        (f"reserved_input_{_n}", f"rnn f({_n}[D]) -> y[D] {{\n    y = 1\n}}\n", {}, _msg, 1, 7, _n),
        (f"reserved_param_{_n}", src(f"param {_n}[D]", "y = x"), {"D": 2}, _msg, 2, 11, _n),
        (f"reserved_state_{_n}", src(f"state {_n}[D]", "y = x"), {}, _msg, 2, 11, _n),
    ]
SPEC_ERRORS += [
    ("reserved_rnn_name_torch", "rnn torch(x[D]) -> y[D] {\n    y = x\n}\n", {}, "reserved", 1, 5, "torch"),
    ("reserved_dim_name", "rnn f(x[None]) -> y {\n    y = 1\n}\n", {}, "reserved", 1, 9, "None"),
    ("reserved_underscore_dim", "rnn f(x[_D]) -> y {\n    y = 1\n}\n", {}, "invalid dim name", 1, 9, "_D"),
]
# param names that would clobber attributes of the compiled nn.Module
for _n in ["forward", "training", "step", "parameters", "state_dict", "to", "cuda", "recurrence",
           "analysis", "plan", "backend"]:
    SPEC_ERRORS.append((f"module_attr_param_{_n}", src(f"param {_n}[D]", "y = x"), {"D": 2},
                        f"param name '{_n}'", 2, 11, _n))


@pytest.mark.parametrize("source,kwargs,message,line,col,token",
                         [c[1:] for c in SPEC_ERRORS], ids=[c[0] for c in SPEC_ERRORS])
def test_spec_error(source, kwargs, message, line, col, token):
    err = raises_rnnc(rnnc.compile, source, backend="sequential", **kwargs)
    assert_located(err, source, message, line, col, token)


def test_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.rnn"
    source = "# a comment\nrnn f(x[D]) -> y[D] {\n    y = x + q\n}\n"
    path.write_text(source)
    err = raises_rnnc(rnnc.compile, str(path))
    assert_located(err, source, "unknown name 'q'", 3, 13, "q", filename=str(path))
    err = raises_rnnc(rnnc.load, path)  # a PathLike works too
    assert err.filename == str(path) and (err.line, err.col) == (3, 13)


def test_error_in_second_block_is_located_in_the_file():
    source = src("y = x") + "\n# second\n" + src("y = x * nope", header="rnn g(x[D]) -> y[D] {\n")
    err = raises_rnnc(rnnc.compile, source, name="f")  # every block is checked
    assert_located(err, source, "unknown name 'nope'", 7, 13, "nope")


def test_syntax_error_lists_what_was_expected():
    err = raises_rnnc(rnnc.compile, src("y = x +"))
    assert "expected" in err.message and "a name" in err.message and "a number" in err.message


# --- errors without a source position ------------------------------------------------------------
UNLOCATED = [
    ("no_rnn_block", "# only a comment\n", {}, "no rnn block found"),
    ("several_blocks_without_name",
     src("y = x") + src("y = x", header="rnn g(x[D]) -> y[D] {\n"), {},
     "defines several recurrences (f, g); pass name="),
    ("unknown_block_name",
     src("y = x") + src("y = x", header="rnn g(x[D]) -> y[D] {\n"), {"name": "h"},
     "no rnn named 'h' (found: f, g)"),
    ("unknown_block_name_single", src("y = x"), {"name": "g"}, "no rnn named 'g' (found: f)"),
    ("unknown_dim", src("y = x"), {"Q": 3}, "unknown dim 'Q' (rnn f has dims: D)"),
    ("dim_not_positive", src("y = x"), {"D": 0}, "dim D must be a positive integer, got 0"),
    ("dim_not_int", src("y = x"), {"D": 2.0}, "dim D must be a positive integer, got 2.0"),
    ("dim_bool", src("y = x"), {"D": True}, "dim D must be a positive integer, got True"),
]


@pytest.mark.parametrize("source,kwargs,message", [c[1:] for c in UNLOCATED],
                         ids=[c[0] for c in UNLOCATED])
def test_unlocated_error(source, kwargs, message):
    err = raises_rnnc(rnnc.compile, source, **kwargs)
    assert_unlocated(err, message)


def test_missing_file_names_the_file():
    err = raises_rnnc(rnnc.compile, "no/such/file.rnn")
    assert str(err) == "no/such/file.rnn: error: no such file"
    assert err.filename == "no/such/file.rnn" and err.line is None


def test_unknown_backend_is_an_rnnc_error():
    err = raises_rnnc(rnnc.compile, src("y = x"), backend="no-such-backend")
    assert "no-such-backend" in err.message


def test_non_text_spec_is_an_rnnc_error():
    err = raises_rnnc(rnnc.compile, 42)
    assert "int" in err.message


# --- runtime errors of a compiled module -----------------------------------------------------------
RT_SPEC = ("rnn f(x[D], g, z[2*D]) -> (y[D], h[D]) {\n"
           "    state h[D] = 0\n"
           "    h = g * h + x\n"
           "    y = h * 2\n"
           "}\n")


@pytest.fixture(scope="module")
def rt():
    return rnnc.compile(RT_SPEC, backend="sequential")


def _xs(B=2, T=4, D=3, dtype=torch.float32):
    return [torch.randn(B, T, D, dtype=dtype), torch.rand(B, T, dtype=dtype),
            torch.randn(B, T, 2 * D, dtype=dtype)]


def _with(i, value):
    xs = _xs()
    xs[i] = value
    return xs


RUNTIME_ERRORS = [
    ("too_few_inputs", lambda m: m(*_xs()[:2]), "takes 3 inputs (x, g, z), got 2"),
    ("too_many_inputs", lambda m: m(*_xs(), _xs()[0]), "takes 3 inputs (x, g, z), got 4"),
    ("no_inputs", lambda m: m(), "takes 3 inputs (x, g, z), got 0"),
    ("wrong_rank_missing_time", lambda m: m(*_with(0, torch.randn(2, 3))),
     "input 'x' must have shape [B, T, D] (3 axes), got [2, 3]"),
    ("wrong_rank_scalar_input", lambda m: m(*_with(1, torch.randn(2, 4, 1))),
     "input 'g' must have shape [B, T] (2 axes), got [2, 4, 1]"),
    ("wrong_per_step_shape", lambda m: m(*_with(2, torch.randn(2, 4, 7))),
     "input 'z'"),
    ("per_step_shape_inconsistent_dim", lambda m: m(*_with(2, torch.randn(2, 4, 8))),
     "input 'z' must have shape [B, T, 2*D] = [B, T, 6], got [2, 4, 8]"),
    ("batch_mismatch", lambda m: m(*_with(1, torch.rand(3, 4))),
     "input 'g' has B/T = [3, 4], but earlier inputs have [2, 4]"),
    ("time_mismatch", lambda m: m(*_with(2, torch.randn(2, 5, 6))),
     "input 'z' has B/T = [2, 5], but earlier inputs have [2, 4]"),
    ("integer_dtype", lambda m: m(*_with(0, torch.ones(2, 4, 3, dtype=torch.int64))),
     "input 'x' must be a floating-point tensor, got torch.int64"),
    ("bool_dtype", lambda m: m(*_with(1, torch.ones(2, 4, dtype=torch.bool))),
     "input 'g' must be a floating-point tensor, got torch.bool"),
    ("mixed_dtypes", lambda m: m(*_with(1, torch.rand(2, 4, dtype=torch.float64))),
     "input 'g' is torch.float64 but earlier inputs are torch.float32"),
    ("not_a_tensor", lambda m: m(*_with(1, [[0.5] * 4] * 2)),
     "input 'g' must be a torch.Tensor, got list"),
    ("initial_state_unknown_key", lambda m: m(*_xs(), initial_state={"c": torch.zeros(2, 3)}),
     "initial_state has no state 'c' (states: h)"),
    ("initial_state_wrong_shape", lambda m: m(*_xs(), initial_state={"h": torch.zeros(2, 4)}),
     "initial state 'h' must have shape [B, 3] = [2, 3], got [2, 4]"),
    ("initial_state_missing_batch", lambda m: m(*_xs(), initial_state={"h": torch.zeros(3)}),
     "initial state 'h' must have shape"),
    ("initial_state_not_tensor", lambda m: m(*_xs(), initial_state={"h": 0.0}),
     "initial state 'h' must have shape"),
    ("initial_state_not_dict", lambda m: m(*_xs(), initial_state=[torch.zeros(2, 3)]),
     "initial_state must be a dict"),
    ("step_given_sequences", lambda m: m.step(*_xs()),
     "input 'x' must have shape [B, D] (2 axes), got [2, 4, 3]"),
    ("step_state_unknown_key", lambda m: m.step(*[x[:, 0] for x in _xs()], state={"q": 1}),
     "initial_state has no state 'q'"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in RUNTIME_ERRORS],
                         ids=[c[0] for c in RUNTIME_ERRORS])
def test_runtime_error(rt, call, message):
    err = raises_rnnc(call, rt)
    assert_unlocated(err, message, filename="rnn f")


def test_runtime_param_dim_mismatch():
    m = rnnc.compile("rnn f(x[D]) -> y[H] {\n    param W[H,D]\n    y = W @ x\n}\n", H=2, D=3)
    err = raises_rnnc(m, torch.randn(2, 4, 5))
    assert_unlocated(err, "input 'x' must have shape [B, T, D] = [B, T, 3], got [2, 4, 5]",
                     filename="rnn f")


def test_runtime_valid_call_still_works(rt):
    """The table above fails for the stated reasons only: the same module runs on good inputs."""
    y, h = rt(*_xs())
    assert y.shape == (2, 4, 3) and h.shape == (2, 4, 3)


# --- bugs found while writing this file: each must be an RnncError, not a Python traceback -------------
def test_integer_index_out_of_range_on_a_dim_given_at_compile_time():
    source = "rnn f(x[D]) -> y {\n    param W[H,D]\n    y = W[5, 0]\n}\n"
    try:
        m = rnnc.compile(source, H=2, D=3)
    except RnncError as err:  # best: at compile time, at the index
        assert_located(err, source, "out of range", 3, 11, "5,")
        return
    err = raises_rnnc(m, torch.randn(2, 4, 3))
    assert "out of range" in err.message


def test_integer_index_out_of_range_on_a_dim_from_the_inputs():
    m = rnnc.compile("rnn f(x[D]) -> y {\n    y = x[5]\n}\n")
    err = raises_rnnc(m, torch.randn(2, 4, 3))
    assert "out of range" in err.message and "x" in str(err)
    y = m(torch.randn(2, 4, 6))  # in range for D = 6
    assert y.shape == (2, 4)


def test_rnn_without_inputs_is_an_rnnc_error():
    """B and T come from the inputs: an rnn with none cannot run. Either compile or the
    call must say so, as an RnncError."""
    source = "rnn f() -> y {\n    y = 1\n}\n"
    try:
        m = rnnc.compile(source)
    except RnncError:
        return
    raises_rnnc(m)


def test_huge_param_dim_is_an_rnnc_error():
    """A param too large to allocate is a user error with a message, not a torch RuntimeError."""
    raises_rnnc(rnnc.compile, src("param W[1000000000000000]", "y = x"), D=2)


# --- nothing but RnncError, ever ----------------------------------------------------------------------
def _only_rnnc(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except RnncError:
        return "rnnc"
    except Exception as err:  # reported below with the input that caused it
        return f"{type(err).__name__}: {err}"
    return "ok"


def test_all_tables_raise_only_rnnc_errors(rt):
    """Every case above again, counted in one place: RnncError or success, nothing else."""
    bad = []
    for case in SPEC_ERRORS + UNLOCATED:
        r = _only_rnnc(rnnc.compile, case[1], **case[2])
        if r not in ("rnnc",):
            bad.append((case[0], r))
    for name, call, _ in RUNTIME_ERRORS:
        r = _only_rnnc(call, rt)
        if r != "rnnc":
            bad.append((name, r))
    assert not bad, bad


def _sizes(rec):
    base = dict(D=3, H=2, K=4, V=5, N=2, P=3)
    return {d: base.get(d, 2) for d in rec.dims}


def _load_compile_run(text):
    """Parse, check, compile with every dim given and run a tiny batch: only RnncError may escape."""
    rec = rnnc.load(text)
    dims = _sizes(rec)
    m = rnnc.compile(text, backend="sequential", **dims)
    xs = [torch.randn(2, 2, *concrete(d.shape, dims), dtype=torch.float64) for d in rec.inputs]
    m(*xs, output_final_state=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_prefix_of_an_example_fails_cleanly(path):
    text = path.read_text()
    bad = []
    for i in range(0, len(text), 3):
        prefix = text[:i] + "\n"  # a newline so that rnnc reads it as source text
        r = _only_rnnc(rnnc.load, prefix)
        if r not in ("ok", "rnnc"):
            bad.append((i, r))
    assert not bad, bad[:5]


def test_mutated_examples_fail_cleanly():
    """Deterministic small edits of every example: parse, check, compile and run must either
    work or raise RnncError."""
    rng = random.Random(1234)
    pieces = list("()[]{},=+-*/@<>#\n .0123xyzhijDHK_") + [
        "**", "->", "sum", "max", "where", "inf", "state", "param", "exp", "-inf", "1e400",
        "zeros", "normal", "uniform", "[0]", "[-1]"]
    bad = []
    count = 0
    for path in EXAMPLES:
        text = path.read_text()
        for _ in range(8):
            s = list(text)
            for _ in range(rng.randint(1, 2)):
                j, op = rng.randrange(len(s)), rng.random()
                if op < 0.33:
                    del s[j]
                elif op < 0.66:
                    s.insert(j, rng.choice(pieces))
                else:
                    s[j] = rng.choice(pieces)
            mutated = "".join(s)
            count += 1
            r = _only_rnnc(_load_compile_run, mutated)
            if r not in ("ok", "rnnc"):
                bad.append((mutated, r))
    assert count >= 8 * len(EXAMPLES)
    assert not bad, bad[:3]
