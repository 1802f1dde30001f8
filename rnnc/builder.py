"""Build .rnn specs from Python: the same AST the parser makes, so the same checker applies.

    import rnnc
    from rnnc import builder as rb

    s = rb.Spec("gla")
    q, k = s.input("q", "H", "K"), s.input("k", "H", "K")      # q_t, k_t: [H, K] per step
    v, g = s.input("v", "H", "V"), s.input("g", "H", "K")
    S = s.state("S", "H", "K", "V", init=0)                     # carried state [H, K, V]
    h, i, j = rb.indices("h i j")
    s[S[h, i, j]] = rb.exp(g[h, i]) * S[h, i, j] + k[h, i] * v[h, j]   # index form
    o = s.local("o", "H", "V")
    s[o[h, j]] = rb.sum(i)(q[h, i] * S[h, i, j])
    s.output(o)                                                 # o[H, V] per step
    print(s.to_source())                                        # .rnn text
    m = rnnc.compile(s, backend="auto", H=2, K=4, V=4)          # an nn.Module

A `Spec` records one `rnn` block as `rnnc.syntax` nodes. `to_source()` prints it as .rnn
text and `to_program()` parses that text back, so every error of the front end (unknown
names, shape and index mismatches, a state assigned twice, ...) is an `rnnc.RnncError`
located at FILE:LINE:COL of the generated text (file name `<builder NAME>`), with the
generated line and a caret. Misuse on the Python side (a tensor where an expression
belongs, a bad name, a number where an index belongs) raises `BuilderError` at once; it
is both an `rnnc.RnncError` and a `TypeError`.

Shapes: every handle returned by `input`, `param`, `state` and `local` stands for the
per-step value of that name (no batch or time axis). Its `shape` is the tuple of dims it
was declared with, `None` for a per-step scalar or a local declared without dims.

Expressions are built with Python operators on handles and numbers: `+ - * / ** @`,
unary `-`, comparisons `< <= > >= == !=` (only inside `where`), and the functions of
this module (`exp`, `sigmoid`, ..., `maximum`, `minimum`, `where`, `sum`, `max`).
`handle[i, j]` with indices from `indices(...)` (or integers) is an index-form access.

`from_program(program)` / `Spec.from_source(text)` rebuild a `Spec` from a parsed AST
with these same calls; `Spec.to_block()` returns the AST without printing.
"""
from __future__ import annotations

import math
import numbers
import re

from . import syntax as S
from .errors import RnncError

__all__ = [
    "BuilderError", "Spec", "Expr", "Var", "Index", "Dim", "Decl", "Init",
    "index", "indices", "dim", "dims", "decl", "const", "inf",
    "zeros", "ones", "normal", "uniform",
    "exp", "log", "sigmoid", "tanh", "relu", "softplus", "silu", "logsigmoid", "sqrt",
    "abs", "maximum", "minimum", "where", "call",
    "lt", "le", "gt", "ge", "eq", "ne",
    "sum", "max", "reduce",
    "from_program", "from_block",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYWORDS = {"rnn", "param", "state", "inf"}  # words the grammar itself owns


class BuilderError(RnncError, TypeError):
    """A misuse of the builder API, found in Python before any .rnn text is made."""

    def __init__(self, message: str):
        super().__init__(message, filename="<builder>")


def _typename(x) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _check_name(name, what: str) -> str:
    if not isinstance(name, str):
        raise BuilderError(f"a {what} name must be a str, got {_typename(name)}")
    if not _NAME.match(name):
        raise BuilderError(f"invalid {what} name {name!r}: use letters, digits and '_', "
                           "starting with a letter")
    if name in _KEYWORDS:
        raise BuilderError(f"{what} name {name!r} is a keyword of the .rnn language; pick another name")
    return name


# --- dims ------------------------------------------------------------------------------------
class Dim:
    """A dim: a name (`dim("H")`), a positive integer (`dim(4)`) or a product (`4 * dim("H")`).

    Anywhere a dim is expected, a plain str (`"H"`, `"4*H"`, `"2*(H*K)"`) or int works too.
    """
    __slots__ = ("node",)

    def __init__(self, d):
        self.node = _dim_node(d)

    def __mul__(self, other):
        return Dim(S.DimProd(_factors(self.node) + _factors(_dim_node(other))))

    def __rmul__(self, other):
        return Dim(S.DimProd(_factors(_dim_node(other)) + _factors(self.node)))

    def __eq__(self, other):
        return isinstance(other, Dim) and self.node == other.node

    def __hash__(self):
        return hash(self.node)

    def __str__(self):
        return S.unparse_dim(self.node)

    def __repr__(self):
        return f"Dim({str(self)!r})"


def _factors(node) -> tuple:
    return node.factors if isinstance(node, S.DimProd) else (node,)


def _dim_node(d):
    if isinstance(d, Dim):
        return d.node
    if isinstance(d, (S.DimName, S.DimInt, S.DimProd)):
        return d
    if isinstance(d, bool) or (isinstance(d, numbers.Number) and not isinstance(d, numbers.Integral)):
        raise BuilderError(f"a dim is a name, a positive int or a product, got {d!r}")
    if isinstance(d, numbers.Integral):
        if int(d) < 1:
            raise BuilderError(f"a dim must be a positive integer, got {int(d)}")
        return S.DimInt(int(d))
    if isinstance(d, str):
        text = d.replace("(", " ").replace(")", " ")
        parts = [p.strip() for p in text.split("*")]
        if not parts or any(not p for p in parts):
            raise BuilderError(f"invalid dim {d!r}: write a name, an integer or a product like '4*H'")
        nodes = []
        for p in parts:
            if p.isdigit():
                nodes.append(_dim_node(int(p)))
            else:
                nodes.append(S.DimName(_check_name(p, "dim")))
        return nodes[0] if len(nodes) == 1 else S.DimProd(tuple(nodes))
    raise BuilderError(f"a dim is a str, an int or rb.Dim, got {_typename(d)}")


def dim(d) -> Dim:
    """One dim: `dim("H")`, `dim(4)`, `dim("2*H")`."""
    return Dim(d)


def dims(names: str) -> tuple:
    """Several dims from one string: `H, K, V = dims("H K V")` (commas or spaces)."""
    return tuple(Dim(n) for n in names.replace(",", " ").split())


def _shape(ds) -> tuple | None:
    """A shape from the dims given to input/param/state/local/output (None if none)."""
    if len(ds) == 1 and isinstance(ds[0], (tuple, list)):
        ds = tuple(ds[0])
    if len(ds) == 1 and ds[0] is None:
        return None
    if not ds:
        return None
    return tuple(_dim_node(d) for d in ds)


# --- indices ---------------------------------------------------------------------------------
class Index:
    """An index name for index-form statements: `h, i, j = indices("h i j")`.

    It can only appear inside brackets: `S[h, i, j]`, `sum(i)(...)`.
    """
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = _check_name(name, "index")

    def __repr__(self):
        return f"Index({self.name!r})"

    def _no_value(self, *_):
        raise BuilderError(f"index {self.name!r} is not a value: use it inside brackets, "
                           f"as in x[{self.name}], or bind it with rb.sum({self.name})(...)")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _no_value
    __truediv__ = __rtruediv__ = __pow__ = __rpow__ = __neg__ = __matmul__ = _no_value


def index(name: str) -> Index:
    """One index: `i = index("i")`."""
    return Index(name)


def indices(names: str) -> tuple:
    """Several indices from one string: `h, i, j = indices("h i j")` (commas or spaces)."""
    return tuple(Index(n) for n in names.replace(",", " ").split())


def _index_node(ix):
    if isinstance(ix, Index):
        return S.IndexName(ix.name)
    if isinstance(ix, (S.IndexName, S.IndexInt)):
        return ix
    if isinstance(ix, numbers.Integral) and not isinstance(ix, bool):
        return S.IndexInt(int(ix))
    if isinstance(ix, str):
        raise BuilderError(f"use rb.index({ix!r}) (or rb.indices) for an index, not the str {ix!r}")
    if isinstance(ix, slice):
        raise BuilderError("slices are not supported: index with rb.indices(...) names or integers")
    raise BuilderError(f"an index is rb.Index or an int, got {_typename(ix)}")


# --- expressions -------------------------------------------------------------------------------
def _num_node(v):
    if isinstance(v, bool):
        raise BuilderError("a bool is not a number in a spec; use 0 or 1")
    v = float(v)
    if v != v:
        raise BuilderError("nan has no place in a spec (the .rnn language has no nan)")
    if v < 0:  # no negative literals in .rnn: -x is unary minus applied to x
        return S.Neg(_num_node(-v))
    if v == math.inf:
        return S.Inf()
    return S.Num(v)


def _node(x):
    """The syntax node of an expression operand: an Expr, a Python number, or a syntax node."""
    if isinstance(x, Expr):
        return x.node
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return _num_node(x)
    if isinstance(x, S.Num):  # a raw node: no negative literals, as the parser never makes them
        return _num_node(x.value)
    if isinstance(x, (S.Inf, S.Name, S.Access, S.Reduce, S.Call, S.BinOp, S.Neg, S.Compare)):
        return x
    if isinstance(x, Index):
        x._no_value()
    if isinstance(x, bool):
        raise BuilderError("a bool is not a number in a spec; use 0 or 1")
    if isinstance(x, str):
        raise BuilderError(f"got the str {x!r} where an expression belongs: use the handle "
                           "returned by s.input/param/state/local (or s.ref(name))")
    raise BuilderError(f"expected a builder expression or a number, got {_typename(x)}")


class Expr:
    """A .rnn expression (a wrapped `rnnc.syntax` node). Combine with Python operators.

    Comparisons build conditions for `where`; an Expr has no truth value, so `if e:` and
    Python's own `max(a, b)` raise (use `rb.maximum`).
    """
    __slots__ = ("node",)
    __array_priority__ = 1000  # numpy scalars on the left defer to us

    def __init__(self, node):
        self.node = _node(node)

    # arithmetic
    def _bin(op, swap=False):
        def f(self, other):
            o = _node(other)
            return Expr(S.BinOp(op, o, self.node) if swap else S.BinOp(op, self.node, o))
        return f

    __add__, __radd__ = _bin("+"), _bin("+", True)
    __sub__, __rsub__ = _bin("-"), _bin("-", True)
    __mul__, __rmul__ = _bin("*"), _bin("*", True)
    __truediv__, __rtruediv__ = _bin("/"), _bin("/", True)
    __pow__, __rpow__ = _bin("**"), _bin("**", True)
    __matmul__, __rmatmul__ = _bin("@"), _bin("@", True)
    del _bin

    def __neg__(self):
        return Expr(S.Neg(self.node))

    def __pos__(self):
        return self

    def __abs__(self):
        return abs(self)

    # comparisons (conditions of where)
    def __lt__(self, other):
        return lt(self, other)

    def __le__(self, other):
        return le(self, other)

    def __gt__(self, other):
        return gt(self, other)

    def __ge__(self, other):
        return ge(self, other)

    def __eq__(self, other):  # noqa: D105 - builds a condition, like numpy/torch
        return eq(self, other)

    def __ne__(self, other):
        return ne(self, other)

    __hash__ = object.__hash__

    def __bool__(self):
        raise BuilderError("a builder expression has no truth value: comparisons build "
                           "conditions for rb.where(c, a, b); for an elementwise max or min "
                           "use rb.maximum / rb.minimum")

    def __floordiv__(self, other):
        raise BuilderError("'//' is not part of the .rnn language")

    __rfloordiv__ = __mod__ = __rmod__ = __floordiv__

    def __getitem__(self, key):
        raise BuilderError(f"only named tensors can be indexed, not the expression "
                           f"{self.source()!r}: assign it to a local first (s.let(...))")

    def __iter__(self):
        raise BuilderError("a builder expression is not iterable")

    def source(self) -> str:
        """The expression as .rnn text."""
        return S.unparse_expr(self.node)

    def __repr__(self):
        return f"Expr({self.source()})"


class Var(Expr):
    """A named value of a spec: an input, param, state or local (see `Spec`).

    As an expression it reads the name (tensor form); `v[i, j]` is an index-form access.
    `shape` is the declared tuple of dims (None: scalar, or a local declared without dims).
    """
    __slots__ = ("name", "kind", "shape", "spec")

    def __init__(self, name: str, kind: str, shape, spec):
        self.node = S.Name(name)
        self.name, self.kind, self.shape, self.spec = name, kind, shape, spec

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if not key:
            raise BuilderError(f"{self.name}[] needs at least one index")
        return Expr(S.Access(self.name, tuple(_index_node(k) for k in key)))

    def __repr__(self):
        shape = "" if self.shape is None else "[" + ", ".join(S.unparse_dim(d) for d in self.shape) + "]"
        return f"<{self.kind} {self.name}{shape}>"


def const(value) -> Expr:
    """A number as an expression (so `const(1) + const(2)` stays `1 + 2` in the text)."""
    if isinstance(value, Expr):
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise BuilderError(f"const takes a number, got {_typename(value)}")
    return Expr(_num_node(value))


inf = Expr(S.Inf())  #: the constant `inf`; `-inf` is its negative


def call(fn: str, *args) -> Expr:
    """A call of any .rnn function by name (the checker rejects unknown ones)."""
    _check_name(fn, "function")
    return Expr(S.Call(fn, tuple(_node(a) for a in args)))


def _fn1(name):
    def f(a) -> Expr:
        return Expr(S.Call(name, (_node(a),)))
    f.__name__ = name
    f.__qualname__ = name
    f.__doc__ = f"`{name}(a)`, elementwise; same shape as `a`."
    return f


exp, log, sigmoid, tanh, relu = (_fn1(n) for n in ("exp", "log", "sigmoid", "tanh", "relu"))
softplus, silu, logsigmoid, sqrt = (_fn1(n) for n in ("softplus", "silu", "logsigmoid", "sqrt"))
abs = _fn1("abs")  # noqa: A001 - the .rnn function; Python's abs(e) also works on an Expr


def maximum(a, b) -> Expr:
    """`max(a, b)`: elementwise maximum, broadcasting like `+`."""
    return Expr(S.Call("max", (_node(a), _node(b))))


def minimum(a, b) -> Expr:
    """`min(a, b)`: elementwise minimum, broadcasting like `+`."""
    return Expr(S.Call("min", (_node(a), _node(b))))


def _cmp(op):
    def f(a, b) -> Expr:
        return Expr(S.Compare(op, _node(a), _node(b)))
    return f


lt, le, gt, ge, eq, ne = (_cmp(op) for op in ("<", "<=", ">", ">=", "==", "!="))
lt.__doc__ = "`a < b`, a condition for `where` (also `a < b` on Exprs); likewise le, gt, ge, eq, ne."


def where(cond, a, b) -> Expr:
    """`where(cond, a, b)`: `a` where the comparison `cond` holds, else `b` (elementwise)."""
    c = _node(cond)
    if not isinstance(c, S.Compare):
        raise BuilderError("the condition of where(c, a, b) must be a comparison such as "
                           "x > 0 (built with < <= > >= == != or rb.lt, ...)")
    return Expr(S.Call("where", (c, _node(a), _node(b))))


class _Reducer:
    def __init__(self, op, idx):
        self.op, self.idx = op, idx

    def __call__(self, body) -> Expr:
        return Expr(S.Reduce(self.op, self.idx, _node(body)))

    def __repr__(self):
        return f"{self.op}[{', '.join(i.name for i in self.idx)}]"


def reduce(op: str, *args):
    """`op[i, ...](body)` for op "sum" or "max": `reduce("sum", i)(body)` or `reduce("sum", i, body)`."""
    _check_name(op, "reduction")
    if args and not isinstance(args[-1], (Index, S.IndexName, S.IndexInt)) \
            and not (isinstance(args[-1], numbers.Integral) and not isinstance(args[-1], bool)):
        *idx, body = args
        return reduce(op, *idx)(body)
    if not args:
        raise BuilderError(f"{op}(...) needs the indices to reduce over, e.g. rb.{op}(i)(body)")
    idx = tuple(_index_node(i) for i in args)
    return _Reducer(op, idx)


def sum(*args):  # noqa: A001 - the .rnn reduction
    """`sum[i, ...](body)`: `rb.sum(i)(body)`, `rb.sum(i, j)(body)` or `rb.sum(i, body)`.

    Sums `body` over the given indices; the result keeps the body's other indices.
    """
    return reduce("sum", *args)


def max(*args):  # noqa: A001 - the .rnn reduction, or the binary max
    """`max[i, ...](body)` with indices (`rb.max(i)(body)`, `rb.max(i, body)`), or with two
    expressions the elementwise `max(a, b)` (same as `maximum`)."""
    if len(args) == 2 and not any(isinstance(a, Index) for a in args):
        return maximum(*args)
    return reduce("max", *args)


# --- param inits -----------------------------------------------------------------------------
class Init:
    """A param initializer: `zeros`, `ones`, `normal(std)`, `uniform(lo, hi)`."""
    __slots__ = ("node",)

    def __init__(self, node):
        self.node = node

    def __repr__(self):
        return f"Init({S.unparse_expr(self.node)})"


zeros = Init(S.Name("zeros"))  #: all zeros
ones = Init(S.Name("ones"))    #: all ones


def normal(std) -> Init:
    """Normal with mean 0 and standard deviation `std` (a number >= 0)."""
    return Init(S.Call("normal", (_node(std),)))


def uniform(lo, hi) -> Init:
    """Uniform on (lo, hi)."""
    return Init(S.Call("uniform", (_node(lo), _node(hi))))


def _init_node(init, kind: str):
    if init is None:
        return None
    if isinstance(init, Init):
        if kind == "state":
            raise BuilderError("a state's initial value is a constant number (or -inf), "
                               f"not {S.unparse_expr(init.node)}")
        return init.node
    if isinstance(init, str):
        if kind == "param" and init in ("zeros", "ones"):
            return S.Name(init)
        if init.strip() in ("inf", "-inf", "+inf"):
            return _num_node(float(init))
        raise BuilderError(f"unknown initializer {init!r}: use a number, -inf, "
                           + ("rb.zeros, rb.ones, rb.normal(std) or rb.uniform(lo, hi)"
                              if kind == "param" else "or a constant expression"))
    return _node(init)


# --- declarations and the spec -------------------------------------------------------------------
class Decl:
    """One item of a `param` or `state` line: `decl("W", "H", "D", init=rb.zeros)`."""
    __slots__ = ("name", "shape", "init")

    def __init__(self, name: str, *dims, init=None):
        self.name = _check_name(name, "declared")
        self.shape = _shape(dims)
        self.init = init

    def __repr__(self):
        return f"decl({self.name!r}, ...)"


def decl(name: str, *dims, init=None) -> Decl:
    """A declaration for `Spec.params` / `Spec.states` (several on one line)."""
    return Decl(name, *dims, init=init)


def _as_decl(d) -> Decl:
    if isinstance(d, Decl):
        return d
    if isinstance(d, (tuple, list)) and d and isinstance(d[0], str):
        return Decl(d[0], *d[1:])
    if isinstance(d, str):
        return Decl(d)
    raise BuilderError(f"a declaration is rb.decl(name, *dims, init=...) or a tuple "
                       f"(name, *dims), got {_typename(d)}")


class Spec:
    """One `rnn` block under construction.

    Header: `input(name, *dims)` (in order), `output(var, *dims)` (in order).
    Body, in order: `param`/`params`, `state`/`states`, and assignments
    (`s[target] = value`, `s.assign(target, value)`, `s.let(name, value)`).

    Then `to_source()` (.rnn text), `to_block()` (the AST, without printing),
    `to_program()` (parsed from the text: what `rnnc.compile(s, ...)` and
    `rnnc.load(s)` use), `check()` and `compile(**dims)`.
    """

    def __init__(self, name: str, doc: str | None = None):
        self.name = _check_name(name, "rnn")
        self.doc = doc
        self._inputs: list = []   # syntax.Arg
        self._outputs: list = []  # syntax.Arg
        self._stmts: list = []    # syntax.ParamStmt | StateStmt | Assign
        self._vars: dict = {}     # name -> Var

    # --- header ------------------------------------------------------------------------------
    def input(self, name: str, *dims) -> Var:
        """Declare input `name` with per-step shape `dims` (none: a per-step scalar).

        At call time the compiled module takes it as [B, T, *dims].
        """
        _check_name(name, "input")
        shape = _shape(dims)
        self._inputs.append(S.Arg(name, shape))
        return self._new(name, "input", shape)

    def output(self, var, *dims) -> Var:
        """Emit `var` (a handle or a name) each step with shape `dims`.

        Without dims the handle's declared shape is used (a state's, or a local's given to
        `local`); a handle without a shape is a per-step scalar. Outputs come back from the
        module as [B, T, *dims], in the order of `output` calls.
        """
        name = self._name_of(var, "output")
        shape = _shape(dims)
        v = self._vars.get(name)
        if not dims:  # the declared shape; pass None explicitly for a per-step scalar
            shape = v.shape if v is not None else (var.shape if isinstance(var, Var) else None)
        self._outputs.append(S.Arg(name, shape))
        return v if v is not None else self._local(name, shape)

    # --- declarations --------------------------------------------------------------------------
    def param(self, name: str, *dims, init=None) -> Var:
        """Declare a learned param of shape `dims` (a line `param NAME[dims] = init`).

        init: None (nn.Linear-style uniform on the last axis), a number, `rb.zeros`,
        `rb.ones`, `rb.normal(std)`, `rb.uniform(lo, hi)` or a constant expression.
        """
        return self.params(Decl(name, *dims, init=init))

    def params(self, *decls):
        """Several params on one line: `W, b = s.params(("W", "H", "D"), rb.decl("b", "H", init=0))`."""
        return self._declare(decls, "param")

    def state(self, name: str, *dims, init=None) -> Var:
        """Declare a state of shape `dims` (a line `state NAME[dims] = init`).

        init: None (the language default, 0), a number, `-math.inf`/`-rb.inf` or a constant
        expression. Before it is assigned in a step the handle reads the previous step's
        value, afterwards the new one.
        """
        return self.states(Decl(name, *dims, init=init))

    def states(self, *decls):
        """Several states on one line: `h, c = s.states(("h", "H"), ("c", "H"))`."""
        return self._declare(decls, "state")

    def local(self, name: str, *dims) -> Var:
        """A handle for a local (a name assigned in the body); dims only document its shape
        and give `output` a default. Nothing is emitted until it is assigned."""
        _check_name(name, "local")
        v = self._vars.get(name)
        if v is not None and v.kind != "local":
            raise BuilderError(f"{name!r} is already declared as {v.kind}")
        return self._local(name, _shape(dims))

    def ref(self, name: str) -> Var:
        """The handle of a name already declared or assigned in this spec."""
        if name not in self._vars:
            raise BuilderError(f"spec {self.name} has no name {name!r} yet")
        return self._vars[name]

    # --- statements --------------------------------------------------------------------------------
    def assign(self, target, value) -> Var:
        """Append an assignment and return the target's handle.

        target: a handle or name (tensor form `y = value`), or `y[i, j]` built from a
        handle with index names (index form `y[i,j] = value`).
        """
        if isinstance(target, Expr) and isinstance(target.node, S.Access):
            acc = target.node
            name, idx = acc.name, acc.indices
        else:
            name, idx = self._name_of(target, "assignment target"), None
        val = _node(value)
        self._stmts.append(S.Assign(name, idx, val))
        v = self._vars.get(name)
        if v is None:
            v = self._local(name, target.shape if isinstance(target, Var) else None)
        return v

    __setitem__ = assign

    def let(self, name: str, value, *dims) -> Var:
        """`name = value` (tensor form) as a new or reassigned local; returns its handle.
        dims (optional) record the local's shape for `output`."""
        _check_name(name, "local")
        v = self.assign(name, value)
        if dims and v.kind == "local":
            v.shape = _shape(dims)
        return v

    # --- results ---------------------------------------------------------------------------------
    def to_block(self) -> S.Block:
        """The `rnnc.syntax.Block` built so far (no positions; equal to the parsed text's)."""
        if not self._outputs:
            raise BuilderError(f"spec {self.name} has no outputs: call s.output(...)")
        return S.Block(self.name, tuple(self._inputs), tuple(self._outputs), tuple(self._stmts))

    def to_source(self) -> str:
        """The spec as .rnn text (canonical layout; `doc` lines first, as comments)."""
        text = S.unparse_block(self.to_block())
        if self.doc:
            text = "".join(f"# {line}".rstrip() + "\n" for line in self.doc.splitlines()) + text
        return text

    def to_program(self) -> S.Program:
        """The spec parsed from `to_source()` (file name `<builder NAME>`), so positions and
        error messages point into the generated text."""
        from .parse import parse
        return parse(self.to_source(), f"<builder {self.name}>")

    def check(self):
        """Parse and check; return the `rnnc.ir.Recurrence` (or raise `RnncError`)."""
        from .compiler import load
        return load(self)

    def compile(self, backend: str = "sequential", **kw):
        """`rnnc.compile(self, backend=..., **dims)`."""
        from .compiler import compile as _compile
        return _compile(self, backend=backend, **kw)

    def save(self, path) -> str:
        """Write `to_source()` to `path`; return the text."""
        from pathlib import Path
        text = self.to_source()
        Path(path).write_text(text)
        return text

    @classmethod
    def from_source(cls, text: str, name: str | None = None, filename: str = "<spec>") -> "Spec":
        """Parse .rnn text and rebuild its block (the only one, or `name`) as a Spec."""
        from .parse import parse
        return from_program(parse(text, filename), name)

    def __repr__(self):
        try:
            return f"<rnnc.builder.Spec\n{self.to_source()}>"
        except BuilderError:
            return f"<rnnc.builder.Spec {self.name} (no outputs yet)>"

    # --- internals ---------------------------------------------------------------------------------
    def _local(self, name, shape) -> Var:
        """The handle of local `name`: the existing one (learning its shape), or a new one."""
        v = self._vars.get(name)
        if v is None:
            return self._new(name, "local", shape)
        if v.kind == "local" and shape is not None:
            v.shape = shape
        return v

    def _new(self, name, kind, shape) -> Var:
        v = Var(name, kind, shape, self)
        self._vars[name] = v
        return v

    def _name_of(self, var, what) -> str:
        if isinstance(var, Var):
            return var.name
        if isinstance(var, str):
            return _check_name(var, what)
        if isinstance(var, Expr):
            raise BuilderError(f"the {what} must be a name or a handle, not the expression "
                               f"{var.source()!r}")
        raise BuilderError(f"the {what} must be a name or a handle, got {_typename(var)}")

    def _declare(self, decls, kind):
        if not decls:
            raise BuilderError(f"{kind}s() needs at least one declaration")
        ds = [_as_decl(d) for d in decls]
        nodes = tuple(S.Decl(d.name, d.shape, _init_node(d.init, kind)) for d in ds)
        self._stmts.append((S.ParamStmt if kind == "param" else S.StateStmt)(nodes))
        out = []
        for d in ds:
            out.append(self._new(d.name, kind, d.shape))
        return out[0] if len(out) == 1 else tuple(out)


# --- AST -> builder --------------------------------------------------------------------------------
def _raw_dim(d) -> Dim:
    """A Dim holding the node as is (the parser accepts `0` as a dim; the checker rejects it)."""
    x = Dim.__new__(Dim)
    x.node = d
    return x


def _dim_back(d):
    if isinstance(d, S.DimName):
        return d.name
    if isinstance(d, S.DimInt):
        return d.value if d.value >= 1 else _raw_dim(d)
    out = None
    for f in d.factors:
        f = _dim_back(f)
        out = Dim(f) if out is None else out * f
    return out


def _dims_back(shape) -> tuple:
    """Builder dims for a parsed shape; None (a scalar) is passed on as an explicit None."""
    if shape is None:
        return (None,)
    return tuple(_dim_back(d) for d in shape)


def _handle(spec: Spec, name: str) -> Var:
    """The spec's handle for a name; an undeclared name still reads (the checker reports it)."""
    v = spec._vars.get(name)
    return v if v is not None else Var(name, "unknown", None, spec)


def _idx_back(ix):
    return Index(ix.name) if isinstance(ix, S.IndexName) else ix.value


_FUNCS = {"exp": exp, "log": log, "sigmoid": sigmoid, "tanh": tanh, "relu": relu,
          "softplus": softplus, "silu": silu, "logsigmoid": logsigmoid, "sqrt": sqrt,
          "abs": abs, "max": maximum, "min": minimum}
_CMPS = {"<": lt, "<=": le, ">": gt, ">=": ge, "==": eq, "!=": ne}


def _expr_back(e, spec: Spec) -> Expr:
    """Rebuild an expression with builder calls only (operators, rb functions, handles)."""
    if isinstance(e, S.Num):
        return const(e.value)
    if isinstance(e, S.Inf):
        return inf
    if isinstance(e, S.Name):
        return _handle(spec, e.name)
    if isinstance(e, S.Access):
        return _handle(spec, e.name)[tuple(_idx_back(i) for i in e.indices)]
    if isinstance(e, S.Reduce):
        idx = [_idx_back(i) for i in e.indices]
        body = _expr_back(e.body, spec)
        if e.op == "sum":
            return sum(*idx)(body)
        if e.op == "max":
            return max(*idx)(body)
        return reduce(e.op, *idx)(body)
    if isinstance(e, S.Call):
        args = [_expr_back(a, spec) for a in e.args]
        f = _FUNCS.get(e.fn)
        if f is not None and len(args) == (2 if e.fn in ("max", "min") else 1):
            return f(*args)
        if e.fn == "where" and len(args) == 3 and isinstance(e.args[0], S.Compare):
            return where(*args)
        return call(e.fn, *args)
    if isinstance(e, S.BinOp):
        a, b = _expr_back(e.left, spec), _expr_back(e.right, spec)
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                "@": lambda: a @ b, "**": lambda: a ** b}[e.op]()
    if isinstance(e, S.Neg):
        return -_expr_back(e.operand, spec)
    if isinstance(e, S.Compare):
        return _CMPS[e.op](_expr_back(e.left, spec), _expr_back(e.right, spec))
    raise BuilderError(f"not an expression node: {_typename(e)}")


def _init_back(e, kind, spec):
    if e is None:
        return None
    if kind == "param":
        if isinstance(e, S.Name) and e.name in ("zeros", "ones"):
            return zeros if e.name == "zeros" else ones
        if isinstance(e, S.Call) and e.fn == "normal" and len(e.args) == 1:
            return normal(_expr_back(e.args[0], spec))
        if isinstance(e, S.Call) and e.fn == "uniform" and len(e.args) == 2:
            return uniform(*(_expr_back(a, spec) for a in e.args))
    return _expr_back(e, spec)


def from_block(block: S.Block, doc: str | None = None) -> Spec:
    """Rebuild one parsed `rnn` block as a `Spec`, using the builder API only.

    `from_block(b).to_block() == b` for every block the parser makes.
    """
    s = Spec(block.name, doc=doc)
    for a in block.inputs:
        s.input(a.name, *_dims_back(a.shape))
    for st in block.stmts:
        if isinstance(st, (S.ParamStmt, S.StateStmt)):
            kind = "param" if isinstance(st, S.ParamStmt) else "state"
            ds = [Decl(d.name, *_dims_back(d.shape), init=_init_back(d.init, kind, s)) for d in st.decls]
            (s.params if kind == "param" else s.states)(*ds)
        elif isinstance(st, S.Assign):
            value = _expr_back(st.value, s)
            if st.indices is None:
                s[st.target] = value
            else:
                s[_handle(s, st.target)[tuple(_idx_back(i) for i in st.indices)]] = value
        else:
            raise BuilderError(f"not a statement node: {_typename(st)}")
    for o in block.outputs:
        s.output(o.name, *_dims_back(o.shape))
    return s


def from_program(program: S.Program, name: str | None = None) -> Spec:
    """Rebuild the block of a parsed program (the only one, or the one called `name`)."""
    blocks = program.blocks
    if name is None:
        if len(blocks) != 1:
            names = ", ".join(b.name for b in blocks)
            raise BuilderError(f"the program defines {len(blocks)} rnn blocks ({names}); pass name=...")
        return from_block(blocks[0])
    for b in blocks:
        if b.name == name:
            return from_block(b)
    raise BuilderError(f"no rnn named {name!r} (found: {', '.join(b.name for b in blocks)})")
