"""The IR: a typed dataflow graph of one time step.

Node kinds are a handful of frozen dataclasses; `Op` enumerates the elementwise and
reduction operators. A `Recurrence` holds the graph (a `networkx.DiGraph` whose nodes are
integer ids in creation order, which is a topological order) and the declarations.

Shapes are per-sample and per-step: tuples of sympy expressions of the dims. At run time
every value carries one extra leading axis: the batch (size B, or B*T for work hoisted out
of the time loop), or size 1 for values that depend on no input and no state.

Node attributes, declared here and nowhere else:

| attribute | type          | written by        | meaning                                               |
|-----------|---------------|-------------------|-------------------------------------------------------|
| node      | node kind     | check             | the operation                                         |
| shape     | tuple[sympy]  | check             | per-sample shape                                      |
| batched   | bool          | check             | depends on an input or a state (varies over batch)    |
| pos       | syntax.Pos    | check             | source position of the expression                     |
| stmt      | int           | check             | index of the statement that created the node          |
| label     | str or None   | check             | the name a statement bound to this node               |
| hoisted   | bool          | analysis          | depends on no state read: runs for all T at once      |
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

import networkx as nx
import sympy as sp

from .syntax import Pos

NODE_ATTRS = {
    "node": "check", "shape": "check", "batched": "check", "pos": "check",
    "stmt": "check", "label": "check", "hoisted": "analysis",
}


class Op(enum.Enum):
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    POW = "**"
    NEG = "neg"
    EXP = "exp"
    LOG = "log"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    RELU = "relu"
    SOFTPLUS = "softplus"
    SILU = "silu"
    LOGSIGMOID = "logsigmoid"
    SQRT = "sqrt"
    ABS = "abs"
    MAX = "max"
    MIN = "min"
    WHERE = "where"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="


# Functions a spec may call: name -> (op, number of arguments).
FUNCTIONS = {
    "exp": (Op.EXP, 1), "log": (Op.LOG, 1), "sigmoid": (Op.SIGMOID, 1), "tanh": (Op.TANH, 1),
    "relu": (Op.RELU, 1), "softplus": (Op.SOFTPLUS, 1), "silu": (Op.SILU, 1),
    "logsigmoid": (Op.LOGSIGMOID, 1), "sqrt": (Op.SQRT, 1), "abs": (Op.ABS, 1),
    "max": (Op.MAX, 2), "min": (Op.MIN, 2), "where": (Op.WHERE, 3),
}
REDUCTIONS = {"sum": Op.ADD, "max": Op.MAX}
BINARY = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "**": Op.POW}
COMPARE = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE}


# --- node kinds ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Input:
    """The current step's slice x_t of an input sequence."""
    name: str


@dataclass(frozen=True)
class Param:
    """A learned weight, shared over time."""
    name: str


@dataclass(frozen=True)
class StateRead:
    """The value a state had at the end of the previous step."""
    name: str


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Elementwise:
    """`op` applied to operands of equal rank, broadcasting axes of size 1."""
    op: Op
    args: tuple


@dataclass(frozen=True)
class Contract:
    """Sum of products, einsum-style: `einsum(",".join(subscripts) + "->" + out, *args)`.

    Letters missing from `out` are summed. Axes of size 1 broadcast."""
    args: tuple
    subscripts: tuple
    out: str


@dataclass(frozen=True)
class Reduce:
    """`op` (ADD or MAX) over the per-sample `axes` of `arg`."""
    op: Op
    arg: int
    axes: tuple


@dataclass(frozen=True)
class Select:
    """Rearrange the axes of `arg`. `index` has one entry per axis of `arg`: an int picks
    that position (the axis disappears), a letter names the axis (a repeated letter takes
    the diagonal). `out` lists the result's axes: letters from `index`, or None for a new
    axis of size 1."""
    arg: int
    index: tuple
    out: tuple


@dataclass(frozen=True)
class Broadcast:
    """Expand size-1 axes of `arg` (of equal rank) to the node's shape."""
    arg: int


@dataclass(frozen=True)
class StateWrite:
    """The new value of a state at the end of the step."""
    name: str
    arg: int


@dataclass(frozen=True)
class Output:
    """What the step emits for one output."""
    name: str
    arg: int


Node = Union[Input, Param, StateRead, Const, Elementwise, Contract, Reduce, Select,
             Broadcast, StateWrite, Output]


def operands(node: Node) -> tuple:
    """The node ids a node reads, in order."""
    if isinstance(node, (Elementwise, Contract)):
        return node.args
    if isinstance(node, (Reduce, Select, Broadcast, StateWrite, Output)):
        return (node.arg,)
    return ()


# --- declarations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Init:
    """How a param is initialised: kind is default | const | normal | uniform."""
    kind: str
    args: tuple = ()


@dataclass(frozen=True)
class InputDecl:
    name: str
    shape: tuple
    node: int
    pos: Pos


@dataclass(frozen=True)
class ParamDecl:
    name: str
    shape: tuple
    init: Init
    node: int
    pos: Pos


@dataclass(frozen=True)
class StateDecl:
    name: str
    shape: tuple
    init: float
    read: int          # the StateRead node
    write: int | None  # the StateWrite node, None if never assigned (the state is constant)
    pos: Pos


@dataclass(frozen=True)
class OutputDecl:
    name: str
    shape: tuple
    node: int  # the Output node
    pos: Pos


@dataclass
class Recurrence:
    """One checked `rnn` block: declarations plus the step's dataflow graph."""
    name: str
    graph: nx.DiGraph
    inputs: list
    params: list
    states: list
    outputs: list
    dims: list           # dim names in order of first use
    dim_pos: dict        # dim name -> Pos of first use
    source: str = ""
    filename: str = "<spec>"
    statements: list = field(default_factory=list)  # (label, Pos) per assignment

    def node(self, i: int) -> Node:
        return self.graph.nodes[i]["node"]

    def attr(self, i: int, key: str):
        return self.graph.nodes[i][key]

    def order(self) -> list:
        """All node ids in a topological order (creation order)."""
        return sorted(self.graph.nodes)

    def dim_symbols(self) -> dict:
        return {d: dim_symbol(d) for d in self.dims}


def dim_symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, positive=True, integer=True)


def shape_str(shape) -> str:
    return "[" + ",".join(str(s).replace(" ", "") for s in shape) + "]"
