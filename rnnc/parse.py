"""Stage 1: .rnn text -> typed AST (`rnnc.syntax`). One entry point: `parse`."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import lark
from lark import Token, v_args
from lark.visitors import Transformer_NonRecursive

from . import syntax as S
from .errors import RnncError


class _DropNewlinesInBrackets:
    """Post-lexer: a newline inside ( ) or [ ] does not end a statement, and runs of
    newlines (blank lines, comment lines) count as one."""
    always_accept = ("_NL",)
    _open = {"LPAR", "LSQB"}
    _close = {"RPAR", "RSQB"}

    def process(self, stream):
        depth = 0
        last_nl = False
        for tok in stream:
            if tok.type in self._open:
                depth += 1
            elif tok.type in self._close:
                depth = max(depth - 1, 0)
            elif tok.type == "_NL":
                if depth or last_nl:
                    continue
                last_nl = True
                yield tok
                continue
            last_nl = False
            yield tok


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    text = resources.files("rnnc.grammar").joinpath("rnn.lark").read_text()
    return lark.Lark(text, parser="lalr", postlex=_DropNewlinesInBrackets(),
                     propagate_positions=True, maybe_placeholders=True)


def _pos(x) -> S.Pos:
    if isinstance(x, Token):
        return S.Pos(x.line, x.column)
    return S.Pos(getattr(x, "line", 0) or 0, getattr(x, "column", 0) or 0)


_MAX_INT_DIGITS = 18  # an int64 holds 18 digits safely; longer ones are no size or index


def _int(tok) -> int:
    text = str(tok)
    if len(text) > _MAX_INT_DIGITS:
        raise RnncError(f"integer {text[:12]}... is too large ({len(text)} digits)",
                        line=tok.line, col=tok.column)
    return int(text)


# Non-recursive: deeply nested expressions must not exhaust Python's stack.
@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
    # dims
    def dim_name(self, meta, c):
        return S.DimName(str(c[0]), _pos(c[0]))

    def dim_int(self, meta, c):
        return S.DimInt(_int(c[0]), _pos(c[0]))

    def dim_product(self, meta, c):
        factors = []
        for f in c:
            factors.extend(f.factors if isinstance(f, S.DimProd) else [f])
        return factors[0] if len(factors) == 1 else S.DimProd(tuple(factors), _pos(meta))

    def shape(self, meta, c):
        return tuple(c)

    # indices
    def index_name(self, meta, c):
        return S.IndexName(str(c[0]), _pos(c[0]))

    def index_int(self, meta, c):
        return S.IndexInt(_int(c[0]), _pos(c[0]))

    def index_negint(self, meta, c):
        return S.IndexInt(-_int(c[0]), _pos(meta))

    # expressions
    def number(self, meta, c):
        return S.Num(float(c[0]), _pos(c[0]))

    def inf(self, meta, c):
        return S.Inf(_pos(meta))

    def name(self, meta, c):
        return S.Name(str(c[0]), _pos(c[0]))

    def access(self, meta, c):
        return S.Access(str(c[0]), tuple(c[1:]), _pos(c[0]))

    def reduce(self, meta, c):
        return S.Reduce(str(c[0]), tuple(c[1:-1]), c[-1], _pos(c[0]))

    def call(self, meta, c):
        args = tuple(a for a in c[1:] if a is not None)
        return S.Call(str(c[0]), args, _pos(c[0]))

    def add(self, meta, c):
        return S.BinOp("+", c[0], c[1], _pos(meta))

    def sub(self, meta, c):
        return S.BinOp("-", c[0], c[1], _pos(meta))

    def mul(self, meta, c):
        return S.BinOp("*", c[0], c[1], _pos(meta))

    def div(self, meta, c):
        return S.BinOp("/", c[0], c[1], _pos(meta))

    def matmul(self, meta, c):
        return S.BinOp("@", c[0], c[1], _pos(meta))

    def pow(self, meta, c):
        return S.BinOp("**", c[0], c[1], _pos(meta))

    def neg(self, meta, c):
        return S.Neg(c[0], _pos(meta))

    def compare(self, meta, c):
        return S.Compare(str(c[1]), c[0], c[2], _pos(c[1]))

    # statements
    def arg(self, meta, c):
        return S.Arg(str(c[0]), c[1], _pos(c[0]))

    def single_output(self, meta, c):
        return (c[0],)

    def output_list(self, meta, c):
        return tuple(c)

    def decl(self, meta, c):
        return S.Decl(str(c[0]), c[1], c[2], _pos(c[0]))

    def param_stmt(self, meta, c):
        return S.ParamStmt(tuple(c), _pos(meta))

    def state_stmt(self, meta, c):
        return S.StateStmt(tuple(c), _pos(meta))

    def target(self, meta, c):
        return (str(c[0]), tuple(c[1:]) if len(c) > 1 else None, _pos(c[0]))

    def assign(self, meta, c):
        (name, idx, pos), value = c
        return S.Assign(name, idx, value, pos)

    def block(self, meta, c):
        name, rest = c[0], c[1:]
        inputs = []
        i = 0
        while i < len(rest) and (rest[i] is None or isinstance(rest[i], S.Arg)):
            if rest[i] is not None:
                inputs.append(rest[i])
            i += 1
        outputs = rest[i]
        stmts = tuple(s for s in rest[i + 1:] if s is not None)
        return S.Block(str(name), tuple(inputs), outputs, stmts, _pos(name))

    def start(self, meta, c):
        return tuple(b for b in c if b is not None)


_TOKEN_WORDS = {
    "_NL": "end of line", "NAME": "a name", "NUMBER": "a number", "INT": "an integer",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
    "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "SLASH": "'/'", "AT": "'@'", "__ANON_0": "'->'", "CMP": "a comparison",
    "$END": "end of file", "RNN": "'rnn'", "PARAM": "'param'", "STATE": "'state'",
}


def _describe(tok) -> str:
    if tok is None or getattr(tok, "type", None) == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return repr(str(tok))


def _expected(names) -> str:
    words = sorted({_TOKEN_WORDS.get(n, repr(n.lower())) for n in names})
    if len(words) > 6:
        return ""
    return " (expected " + ", ".join(words) + ")"


def parse(source: str, filename: str = "<spec>") -> S.Program:
    """Parse .rnn source text into a `syntax.Program`, or raise `RnncError` at the bad token."""
    if not isinstance(source, str):
        raise RnncError("spec source must be text", filename=filename)
    # CR LF line ends count as one line end (a lone CR is not a line end; lark sees it).
    source = source.replace("\r\n", "\n")
    try:
        tree = _parser().parse(source)
    except lark.UnexpectedCharacters as e:
        ch = source[e.pos_in_stream] if 0 <= e.pos_in_stream < len(source) else "?"
        raise RnncError(f"unexpected character {ch!r}", line=e.line, col=e.column,
                        source=source, filename=filename) from None
    except lark.UnexpectedToken as e:
        if e.token.type == "$END":
            lines = source.rstrip("\n").split("\n")
            raise RnncError("unexpected end of file (is a '}' missing?)", line=len(lines),
                            col=len(lines[-1]) + 1, source=source, filename=filename) from None
        raise RnncError(f"syntax error: unexpected {_describe(e.token)}{_expected(e.expected)}",
                        line=e.line, col=e.column, source=source, filename=filename) from None
    except lark.UnexpectedEOF:
        lines = source.rstrip("\n").split("\n")
        raise RnncError("unexpected end of file (is a '}' missing?)", line=len(lines),
                        col=len(lines[-1]) + 1, source=source, filename=filename) from None
    except lark.LarkError as e:  # anything else lark can raise is still a syntax error
        raise RnncError(f"syntax error: {e}", filename=filename, source=source) from None
    try:
        blocks = _ToAst().transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, RnncError):
            raise e.orig_exc.located(source, filename) from None
        raise RnncError(f"internal parser error: {e.orig_exc}", filename=filename) from None
    return S.Program(blocks, source, filename)
