"""The typed AST of a .rnn file: what the parser produces and the builder API constructs.

Every node carries `pos` (1-based line and column) so that checking can point at it.
`unparse(program)` prints canonical .rnn text; parsing it back gives an equal AST
(positions aside).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Pos:
    line: int
    col: int


NOPOS = Pos(0, 0)


# --- dims (inside declaration brackets) -------------------------------------------------
@dataclass(frozen=True)
class DimName:
    name: str
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class DimInt:
    value: int
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class DimProd:
    factors: tuple  # of DimName | DimInt
    pos: Pos = field(default=NOPOS, compare=False)


Dim = Union[DimName, DimInt, DimProd]


# --- indices (inside expression brackets) ------------------------------------------------
@dataclass(frozen=True)
class IndexName:
    name: str
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class IndexInt:
    value: int
    pos: Pos = field(default=NOPOS, compare=False)


Index = Union[IndexName, IndexInt]


# --- expressions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: float
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Inf:
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Name:
    name: str
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Access:
    name: str
    indices: tuple  # of Index
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Reduce:
    op: str  # the written name: "sum" or "max" (checked later)
    indices: tuple  # of Index
    body: "Expr"
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple  # of Expr
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / @ **
    left: "Expr"
    right: "Expr"
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Compare:
    op: str  # < <= > >= == !=
    left: "Expr"
    right: "Expr"
    pos: Pos = field(default=NOPOS, compare=False)


Expr = Union[Num, Inf, Name, Access, Reduce, Call, BinOp, Neg, Compare]


# --- statements and blocks ---------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    """A header input or output: `x[D]`, or a bare scalar `x`."""
    name: str
    shape: tuple | None  # of Dim; None for a per-step scalar
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Decl:
    """One item of a `param` or `state` line: NAME[dims] (= init)?"""
    name: str
    shape: tuple | None
    init: Expr | None
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class ParamStmt:
    decls: tuple
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class StateStmt:
    decls: tuple
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Assign:
    """`y = expr` (indices None, tensor form) or `y[i,j] = expr` (index form)."""
    target: str
    indices: tuple | None
    value: Expr
    pos: Pos = field(default=NOPOS, compare=False)


Stmt = Union[ParamStmt, StateStmt, Assign]


@dataclass(frozen=True)
class Block:
    name: str
    inputs: tuple  # of Arg
    outputs: tuple  # of Arg
    stmts: tuple  # of Stmt
    pos: Pos = field(default=NOPOS, compare=False)


@dataclass(frozen=True)
class Program:
    blocks: tuple  # of Block
    source: str = field(default="", compare=False)
    filename: str = field(default="<spec>", compare=False)


# --- printing -------------------------------------------------------------------------------------
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "@": 2, "**": 4}


def _num(v: float) -> str:
    if v != v:
        return "(0 * inf)"  # nan has no literal; this constant expression evaluates to it
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def unparse_dim(d: Dim) -> str:
    if isinstance(d, DimName):
        return d.name
    if isinstance(d, DimInt):
        return str(d.value)
    return "*".join(unparse_dim(f) for f in d.factors)


def _shape(shape) -> str:
    return "" if shape is None else "[" + ", ".join(unparse_dim(d) for d in shape) + "]"


def _index(i: Index) -> str:
    return i.name if isinstance(i, IndexName) else str(i.value)


def unparse_expr(e: Expr, prec: int = 0) -> str:
    """Print an expression with the fewest parentheses that keep its structure."""
    if isinstance(e, Num):
        return _num(e.value)
    if isinstance(e, Inf):
        return "inf"
    if isinstance(e, Name):
        return e.name
    if isinstance(e, Access):
        return f"{e.name}[{', '.join(_index(i) for i in e.indices)}]"
    if isinstance(e, Reduce):
        return f"{e.op}[{', '.join(_index(i) for i in e.indices)}]({unparse_expr(e.body)})"
    if isinstance(e, Call):
        return f"{e.fn}({', '.join(unparse_expr(a) for a in e.args)})"
    if isinstance(e, Neg):
        s = "-" + unparse_expr(e.operand, 3)
        return f"({s})" if prec > 3 else s
    if isinstance(e, Compare):
        s = f"{unparse_expr(e.left, 1)} {e.op} {unparse_expr(e.right, 1)}"
        return f"({s})" if prec > 0 else s
    if isinstance(e, BinOp):
        p = _PREC[e.op]
        if e.op == "**":  # right-associative, and its right side may be unary
            s = f"{unparse_expr(e.left, 5)} ** {unparse_expr(e.right, 3)}"
        else:  # left-associative
            s = f"{unparse_expr(e.left, p)} {e.op} {unparse_expr(e.right, p + 1)}"
        return f"({s})" if prec > p else s
    raise TypeError(f"not an expression: {e!r}")


def _decl(d: Decl) -> str:
    init = "" if d.init is None else " = " + unparse_expr(d.init)
    return d.name + _shape(d.shape) + init


def unparse_block(b: Block) -> str:
    ins = ", ".join(a.name + _shape(a.shape) for a in b.inputs)
    outs = [a.name + _shape(a.shape) for a in b.outputs]
    out = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ")"
    lines = [f"rnn {b.name}({ins}) -> {out} {{"]
    for s in b.stmts:
        if isinstance(s, ParamStmt):
            lines.append("    param " + ", ".join(_decl(d) for d in s.decls))
        elif isinstance(s, StateStmt):
            lines.append("    state " + ", ".join(_decl(d) for d in s.decls))
        else:
            tgt = s.target if s.indices is None else f"{s.target}[{', '.join(_index(i) for i in s.indices)}]"
            lines.append(f"    {tgt} = {unparse_expr(s.value)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def unparse(program: Program) -> str:
    return "\n".join(unparse_block(b) for b in program.blocks)
