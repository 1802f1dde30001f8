"""Stage 2: AST -> IR, checking names, shapes and indices. Entry point: `check`.

Both statement forms lower to the same node kinds. Tensor-form values have positional axes
and broadcast NumPy-style (trailing axes align); index-form values carry one index name per
axis and combine by name, einsum-style. `sum[i](a * b * ...)` becomes one `Contract`.
"""
from __future__ import annotations

import builtins
import keyword
import math
import re
from dataclasses import dataclass

import networkx as nx
import sympy as sp

from . import ir
from . import syntax as S
from .errors import RnncError, fail
from .ir import Op

_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Words a spec may not use as names: they would shadow Python, the generated code's own
# symbols or the language's functions.
_RESERVED = (set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))
             | {"torch", "tl", "triton", "math", "self", "F", "nn", "np", "rnnc", "inf",
                "os", "sys", "subprocess", "importlib", "builtins", "functools", "operator",
                "nan", "rnn", "param", "state", "sum", "max", "min"} | set(ir.FUNCTIONS))
_MODULE_ATTRS: set | None = None


def _module_attrs() -> set:
    global _MODULE_ATTRS
    if _MODULE_ATTRS is None:
        import torch
        _MODULE_ATTRS = set(dir(torch.nn.Module())) | {"step", "recurrence", "backend", "dims",
                                                      "plan", "source", "analysis"}
    return _MODULE_ATTRS


def check_identifier(name: str, pos, what: str) -> None:
    """Reject names that are not plain ASCII identifiers or that are reserved."""
    if not _IDENT.match(name):
        fail(f"invalid {what} name {name!r}: use letters, digits and '_', starting with a letter", pos)
    if len(name) > 64:
        fail(f"{what} name {name[:20]}... is too long (at most 64 characters)", pos)
    if name in _RESERVED:
        fail(f"{what} name {name!r} is reserved (a Python, Triton or rnnc name); pick another name", pos)
    if what == "param" and name in _module_attrs():
        fail(f"param name {name!r} clashes with an attribute of torch.nn.Module; pick another name", pos)


@dataclass
class _Val:
    id: int
    axes: tuple | None  # index names per axis (index form), None for tensor form


@dataclass
class _Cell:
    """The size an index ranges over, learnt from the first axis it indexes."""
    size: object = None
    where: str = ""


def _letters(n: int) -> tuple:
    return tuple("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n])


def _const_value(e) -> float | None:
    """The value of a constant expression (numbers, inf, + - * /), or None."""
    if isinstance(e, S.Num):
        return e.value
    if isinstance(e, S.Inf):
        return math.inf
    if isinstance(e, S.Neg):
        v = _const_value(e.operand)
        return None if v is None else -v
    if isinstance(e, S.BinOp) and e.op in "+-*/":
        a, b = _const_value(e.left), _const_value(e.right)
        if a is None or b is None:
            return None
        try:
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else math.nan}[e.op]
        except (OverflowError, ValueError):
            return math.nan
    return None


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _shp(shape) -> str:
    return ir.shape_str(shape)


class _Checker:
    def __init__(self, block: S.Block):
        self.block = block
        self.g = nx.DiGraph()
        self.kind: dict = {}      # declared name -> "input" | "param" | "state"
        self.decl_pos: dict = {}  # declared name -> Pos
        self.env: dict = {}       # name -> node id of its current value
        self.dims: dict = {}      # dim name -> Pos of first use
        self.inputs, self.params, self.outputs = [], [], []
        self.states: dict = {}    # name -> dict(shape, init, read, write, pos)
        self.statements = []
        self.stmt = -1
        self.index_form = False

    # --- graph ----------------------------------------------------------------------------
    def add(self, node, shape, pos, batched=None) -> int:
        i = self.g.number_of_nodes()
        args = ir.operands(node)
        if batched is None:
            batched = any(self.g.nodes[a]["batched"] for a in args)
        self.g.add_node(i, node=node, shape=tuple(shape), batched=batched, pos=pos,
                        stmt=self.stmt, label=None, hoisted=None)
        for a in args:
            self.g.add_edge(a, i)
        return i

    def shape(self, i) -> tuple:
        return self.g.nodes[i]["shape"]

    def rank(self, v: _Val) -> int:
        return len(self.shape(v.id))

    # --- declarations -----------------------------------------------------------------------
    def dim(self, d) -> sp.Expr:
        if isinstance(d, S.DimInt):
            if d.value < 1:
                fail(f"a dim must be a positive integer, not {d.value}", d.pos)
            return sp.Integer(d.value)
        if isinstance(d, S.DimName):
            check_identifier(d.name, d.pos, "dim")
            if not d.name[0].isupper():
                fail(f"dim names are upper-case (got {d.name!r}); lower-case names are indices", d.pos)
            self.dims.setdefault(d.name, d.pos)
            return ir.dim_symbol(d.name)
        return sp.Mul(*[self.dim(f) for f in d.factors])

    def shape_of(self, dims) -> tuple:
        return () if dims is None else tuple(self.dim(d) for d in dims)

    def declare(self, name, pos, kind):
        check_identifier(name, pos, kind)
        if name in self.env and name not in self.kind:
            first = next((p for n, p, _ in self.statements if n == name), None)
            where = f" at line {first.line}" if first is not None else ""
            fail(f"{name!r} is already a variable assigned{where}; declare it before using the name", pos)
        if name in self.kind:
            prev = self.decl_pos[name]
            fail(f"{name!r} is already declared as {self.kind[name]} at line {prev.line}", pos)
        self.kind[name] = kind
        self.decl_pos[name] = pos

    def param_init(self, e, pos) -> ir.Init:
        if e is None:
            return ir.Init("default")
        if isinstance(e, S.Name) and e.name in ("zeros", "ones"):
            return ir.Init("const", (0.0 if e.name == "zeros" else 1.0,))
        v = _const_value(e)
        if v is not None:
            if not math.isfinite(v):
                fail("a param's initial value must be a finite number", getattr(e, "pos", pos))
            return ir.Init("const", (v,))
        if isinstance(e, S.Call) and e.fn in ("normal", "uniform"):
            vals = [_const_value(a) for a in e.args]
            want = 1 if e.fn == "normal" else 2
            if len(vals) != want or any(x is None or not math.isfinite(x) for x in vals):
                fail(f"{e.fn}(...) takes {want} finite number{'s' if want > 1 else ''}", e.pos)
            if e.fn == "normal" and vals[0] < 0:
                fail("normal(std) needs std >= 0", e.pos)
            if e.fn == "uniform" and vals[0] > vals[1]:
                fail("uniform(lo, hi) needs lo <= hi", e.pos)
            return ir.Init(e.fn, tuple(vals))
        fail("a param's initializer is zeros, ones, a number, normal(std) or uniform(lo, hi)",
             getattr(e, "pos", pos))

    def input_decl(self, a: S.Arg):
        self.declare(a.name, a.pos, "input")
        shape = self.shape_of(a.shape)
        i = self.add(ir.Input(a.name), shape, a.pos, batched=True)
        self.env[a.name] = i
        self.inputs.append(ir.InputDecl(a.name, shape, i, a.pos))

    def param_decl(self, d: S.Decl):
        self.declare(d.name, d.pos, "param")
        shape = self.shape_of(d.shape)
        init = self.param_init(d.init, d.pos)
        i = self.add(ir.Param(d.name), shape, d.pos, batched=False)
        self.env[d.name] = i
        self.params.append(ir.ParamDecl(d.name, shape, init, i, d.pos))

    def state_decl(self, d: S.Decl):
        self.declare(d.name, d.pos, "state")
        shape = self.shape_of(d.shape)
        init = 0.0
        if d.init is not None:
            init = _const_value(d.init)
            if init is None or math.isnan(init):
                fail("a state's initial value must be a constant number (or -inf, inf)",
                     getattr(d.init, "pos", d.pos))
        i = self.add(ir.StateRead(d.name), shape, d.pos, batched=True)
        self.env[d.name] = i
        self.states[d.name] = dict(shape=shape, init=float(init), read=i, write=None, pos=d.pos)

    # --- statements ---------------------------------------------------------------------------
    def assign(self, s: S.Assign):
        self.stmt += 1
        name = s.target
        kind = self.kind.get(name)
        if kind in ("input", "param"):
            fail(f"cannot assign to {kind} {name!r}: {kind}s are read-only inside a step", s.pos)
        if kind is None:
            check_identifier(name, s.pos, "variable")
        if kind == "state" and self.states[name]["write"] is not None:
            first = self.g.nodes[self.states[name]["write"]]["pos"]
            fail(f"state {name!r} is assigned twice in one step (first at line {first.line})", s.pos)
        if s.indices is None:
            self.index_form = False
            v = self.deep(lambda: self.expr(s.value, {}), s.pos)
            value = v.id
            if kind == "state":
                value = self.coerce(value, self.states[name]["shape"], s.pos, f"state {name}")
        else:
            value = self.index_assign(s, kind)
        if self.g.nodes[value]["label"] is None:
            self.g.nodes[value]["label"] = name
        self.statements.append((name, s.pos, value))
        if kind == "state":
            self.states[name]["write"] = self.add(ir.StateWrite(name, value),
                                                  self.states[name]["shape"], s.pos)
        self.env[name] = value

    def index_assign(self, s: S.Assign, kind) -> int:
        self.index_form = True
        names = []
        for ix in s.indices:
            if isinstance(ix, S.IndexInt):
                fail("the left-hand side takes index names, not numbers", ix.pos)
            if ix.name in names:
                fail(f"index {ix.name!r} appears twice on the left-hand side", ix.pos)
            names.append(ix.name)
        scope = {n: _Cell() for n in names}
        if kind == "state":
            shape = self.states[s.target]["shape"]
            if len(shape) != len(names):
                fail(f"state {s.target}{_shp(shape)} has {_count(len(shape), 'axis', 'axes')} but "
                     f"{_count(len(names), 'index is', 'indices are')} given", s.pos)
            for n, size in zip(names, shape):
                scope[n] = _Cell(size, f"state {s.target}")
        v = self.deep(lambda: self.expr(s.value, scope), s.pos)
        for ix in s.indices:
            if scope[ix.name].size is None:
                fail(f"index {ix.name!r} on the left-hand side has no size: it indexes no "
                     "tensor on the right", ix.pos)
        target = tuple(scope[n].size for n in names)
        out = self.align(v, tuple(names))
        return self.broadcast_to(out, target, s.pos)

    @staticmethod
    def deep(fn, pos):
        """Run fn with room for deeply nested expressions; beyond that, a clear error."""
        import sys
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, 20000))
        try:
            return fn()
        except RecursionError:
            fail("this expression is nested too deeply (more than a few thousand levels)", pos)
        finally:
            sys.setrecursionlimit(old)

    # --- shape helpers ----------------------------------------------------------------------------
    def align(self, v: _Val, axes: tuple) -> int:
        """Place an index-form value's axes in the order `axes`, size 1 where missing."""
        if v.axes == axes:
            return v.id
        if self.rank(v) == 0 and not self.g.nodes[v.id]["batched"]:
            return v.id
        have = v.axes or ()
        out = tuple(a if a in have else None for a in axes)
        shape = tuple(self.shape(v.id)[have.index(a)] if a in have else sp.Integer(1) for a in axes)
        return self.add(ir.Select(v.id, have, out), shape, self.g.nodes[v.id]["pos"])

    def pad(self, i: int, rank: int) -> int:
        """Prepend size-1 axes so a tensor-form value has `rank` axes."""
        r = len(self.shape(i))
        if r == rank or (r == 0 and not self.g.nodes[i]["batched"]):
            return i
        idx = _letters(r)
        shape = (sp.Integer(1),) * (rank - r) + self.shape(i)
        return self.add(ir.Select(i, idx, (None,) * (rank - r) + idx), shape, self.g.nodes[i]["pos"])

    def broadcast_to(self, i: int, target: tuple, pos) -> int:
        shape = self.shape(i)
        if shape == target:
            return i
        return self.add(ir.Broadcast(i), target, pos)

    def coerce(self, i: int, target: tuple, pos, what: str) -> int:
        """A tensor-form value assigned to `what` of shape `target`: broadcast it there."""
        shape = self.shape(i)
        ok = len(shape) <= len(target) and all(
            a == b or a == 1 for a, b in zip(reversed(shape), reversed(target)))
        if not ok:
            fail(f"cannot assign a value of shape {_shp(shape)} to {what}{_shp(target)}", pos)
        return self.broadcast_to(self.pad(i, len(target)), target, pos)

    @staticmethod
    def bcast(shapes, pos, what) -> tuple:
        rank = max(len(s) for s in shapes)
        padded = [(sp.Integer(1),) * (rank - len(s)) + tuple(s) for s in shapes]
        out = []
        for axis in zip(*padded):
            sizes = {a for a in axis if a != 1}
            if len(sizes) > 1:
                fail(f"shapes {' and '.join(_shp(s) for s in shapes)} do not broadcast in {what}", pos)
            out.append(sizes.pop() if sizes else sp.Integer(1))
        return tuple(out)

    # --- expressions ----------------------------------------------------------------------------
    def const(self, value: float, pos) -> _Val:
        return _Val(self.add(ir.Const(float(value)), (), pos, batched=False), ())

    def lookup(self, name: str, pos) -> int:
        if name in self.env:
            return self.env[name]
        if name in ir.FUNCTIONS or name in ir.REDUCTIONS:
            fail(f"{name!r} is a function: call it as {name}(...)", pos)
        if name in self.dims:
            fail(f"{name!r} is a dim, not a value", pos)
        fail(f"unknown name {name!r}", pos)

    def expr(self, e, scope: dict) -> _Val:
        if isinstance(e, (S.Num, S.Inf)):
            return self.const(_const_value(e), e.pos)
        if isinstance(e, S.Neg):
            # Fold only -number / -inf: folding deeper chains here would be quadratic.
            if isinstance(e.operand, (S.Num, S.Inf)):
                return self.const(-_const_value(e.operand), e.pos)
            return self.elementwise(Op.NEG, [self.expr(e.operand, scope)], e.pos, "-")
        if isinstance(e, S.Name):
            i = self.lookup(e.name, e.pos)
            if self.shape(i) and self.index_form:
                fail(f"{e.name!r} has shape {_shp(self.shape(i))}: in an index-form statement "
                     f"write {e.name}[...] with one index per axis", e.pos)
            return _Val(i, None if self.shape(i) else ())
        if isinstance(e, S.Access):
            return self.access(e, scope)
        if isinstance(e, S.Reduce):
            return self.reduce(e, scope)
        if isinstance(e, S.Call):
            return self.call(e, scope)
        if isinstance(e, S.Compare):
            fail("a comparison can only be the condition of where(c, a, b)", e.pos)
        if isinstance(e, S.BinOp):
            if e.op == "@":
                return self.matmul(self.expr(e.left, scope), self.expr(e.right, scope), e.pos)
            vals = [self.expr(e.left, scope), self.expr(e.right, scope)]
            return self.elementwise(ir.BINARY[e.op], vals, e.pos, f"'{e.op}'")
        fail(f"unsupported expression {type(e).__name__}", getattr(e, "pos", None))

    def access(self, e: S.Access, scope: dict) -> _Val:
        i = self.lookup(e.name, e.pos)
        shape = self.shape(i)
        if len(e.indices) != len(shape):
            fail(f"{e.name}{_shp(shape)} has {_count(len(shape), 'axis', 'axes')} but "
                 f"{_count(len(e.indices), 'index is', 'indices are')} given", e.pos)
        index, out = [], []
        for ix, size in zip(e.indices, shape):
            if isinstance(ix, S.IndexInt):
                if size.is_Integer and not -int(size) <= ix.value < int(size):
                    fail(f"index {ix.value} is out of range for an axis of size {size}", ix.pos)
                index.append(ix.value)
                continue
            cell = scope.get(ix.name)
            if cell is None:
                fail(f"index {ix.name!r} is not bound: put it on the left-hand side or bind it "
                     f"with sum[{ix.name}](...) or max[{ix.name}](...)", ix.pos)
            if cell.size is None:
                cell.size, cell.where = size, f"{e.name}[...]"
            elif cell.size != size:
                fail(f"index {ix.name!r} is used on axes of different sizes: {cell.size} "
                     f"({cell.where}) and {size} ({e.name}[...])", ix.pos)
            index.append(ix.name)
            if ix.name not in out:
                out.append(ix.name)
        index, out = tuple(index), tuple(out)
        if index == out:
            return _Val(i, out)
        oshape = tuple(shape[index.index(a)] for a in out)
        # Point at the first integer index: that is what a range error will be about.
        pos = next((ix.pos for ix in e.indices if isinstance(ix, S.IndexInt)), e.pos)
        return _Val(self.add(ir.Select(i, index, out), oshape, pos), out)

    def reduce(self, e: S.Reduce, scope: dict) -> _Val:
        if e.op not in ir.REDUCTIONS:
            fail(f"unknown reduction {e.op!r}: use sum[i](...) or max[i](...)", e.pos)
        inner = dict(scope)
        names = []
        for ix in e.indices:
            if isinstance(ix, S.IndexInt):
                fail(f"{e.op}[...] takes index names, not numbers", ix.pos)
            if ix.name in inner:
                fail(f"index {ix.name!r} is already bound; {e.op}[{ix.name}] cannot bind it again", ix.pos)
            inner[ix.name] = _Cell()
            names.append(ix.name)
        factors = [e.body]
        if e.op == "sum":
            factors = _product_factors(e.body)
        vals = [self.expr(f, inner) for f in factors]
        for ix in e.indices:
            if inner[ix.name].size is None:
                fail(f"index {ix.name!r} of {e.op}[{ix.name}] does not index anything in its body", ix.pos)
        self.no_mixing(vals, e.pos)
        axes = []
        for v in vals:
            for a in v.axes or ():
                if a not in axes:
                    axes.append(a)
        keep = tuple(a for a in axes if a not in names)
        if e.op == "sum":
            letter = dict(zip(axes, _letters(len(axes))))
            if len(axes) > 52:
                fail("too many indices in one sum (at most 52)", e.pos)
            subs = tuple("".join(letter[a] for a in (v.axes or ())) for v in vals)
            sizes = {}
            for v in vals:
                for a, n in zip(v.axes or (), self.shape(v.id)):
                    if n != 1:
                        sizes[a] = n
            shape = tuple(sizes.get(a, sp.Integer(1)) for a in keep)
            node = ir.Contract(tuple(v.id for v in vals), subs, "".join(letter[a] for a in keep))
            return _Val(self.add(node, shape, e.pos), keep)
        (v,) = vals
        shape = tuple(n for a, n in zip(v.axes, self.shape(v.id)) if a not in names)
        red = tuple(k for k, a in enumerate(v.axes) if a in names)
        return _Val(self.add(ir.Reduce(ir.REDUCTIONS[e.op], v.id, red), shape, e.pos), keep)

    def call(self, e: S.Call, scope: dict) -> _Val:
        if e.fn in ir.REDUCTIONS and e.fn not in ir.FUNCTIONS:
            fail(f"{e.fn} over an axis is written {e.fn}[i](...), with the index to reduce", e.pos)
        if e.fn not in ir.FUNCTIONS:
            known = ", ".join(sorted(ir.FUNCTIONS))
            fail(f"unknown function {e.fn!r} (known: {known})", e.pos)
        op, arity = ir.FUNCTIONS[e.fn]
        if len(e.args) != arity:
            fail(f"{e.fn} takes {arity} argument{'s' if arity > 1 else ''}, got {len(e.args)}", e.pos)
        if op is Op.WHERE:
            c = e.args[0]
            if not isinstance(c, S.Compare):
                fail("the condition of where(c, a, b) must be a comparison such as a > b",
                     getattr(c, "pos", e.pos))
            cond = self.elementwise(ir.COMPARE[c.op], [self.expr(c.left, scope),
                                                       self.expr(c.right, scope)], c.pos, c.op)
            vals = [cond, self.expr(e.args[1], scope), self.expr(e.args[2], scope)]
        else:
            vals = [self.expr(a, scope) for a in e.args]
        return self.elementwise(op, vals, e.pos, f"{e.fn}(...)")

    def no_mixing(self, vals, pos):
        named = any(v.axes for v in vals)
        plain = any(v.axes is None and self.rank(v) for v in vals)
        if named and plain:
            fail("cannot combine an indexed value with an unindexed tensor; index every "
                 "tensor in an index-form expression", pos)

    def elementwise(self, op: Op, vals, pos, what: str) -> _Val:
        self.no_mixing(vals, pos)
        if any(v.axes for v in vals):
            axes = []
            for v in vals:
                for a in v.axes or ():
                    if a not in axes:
                        axes.append(a)
            axes = tuple(axes)
            ids = [self.align(v, axes) for v in vals]
            shape = self.bcast([self.shape(i) for i in ids], pos, what)
            return _Val(self.add(ir.Elementwise(op, tuple(ids)), shape, pos), axes)
        shape = self.bcast([self.shape(v.id) for v in vals], pos, what)
        ids = [self.pad(v.id, len(shape)) for v in vals]
        return _Val(self.add(ir.Elementwise(op, tuple(ids)), shape, pos), None if shape else ())

    def matmul(self, a: _Val, b: _Val, pos) -> _Val:
        if a.axes or b.axes:
            fail("'@' takes tensor-form operands; in index form write sum[i](...)", pos)
        sa, sb = self.shape(a.id), self.shape(b.id)
        if not sa or not sb:
            fail("'@' needs operands with at least one axis", pos)
        ka = sa[-1]
        kb = sb[-2] if len(sb) >= 2 else sb[-1]
        if ka != kb:
            fail(f"'@' shape mismatch: {_shp(sa)} @ {_shp(sb)} (inner sizes {ka} and {kb} differ)", pos)
        ba = sa[:-2]
        bb = sb[:-2] if len(sb) >= 2 else ()
        batch = self.bcast([ba, bb], pos, "'@'") if (ba or bb) else ()
        nb = len(batch)
        bl = "".join(_letters(nb + 3)[3:])  # batch letters after m, k, n = a, b, c
        sub_a = bl[nb - len(ba):] + ("ab" if len(sa) >= 2 else "b")
        sub_b = bl[nb - len(bb):] + ("bc" if len(sb) >= 2 else "b")
        out = bl + ("a" if len(sa) >= 2 else "") + ("c" if len(sb) >= 2 else "")
        shape = batch + ((sa[-2],) if len(sa) >= 2 else ()) + ((sb[-1],) if len(sb) >= 2 else ())
        node = ir.Contract((a.id, b.id), (sub_a, sub_b), out)
        return _Val(self.add(node, shape, pos), None if shape else ())

    # --- the block ---------------------------------------------------------------------------------
    def run(self) -> ir.Recurrence:
        b = self.block
        check_identifier(b.name, b.pos, "rnn")
        if not b.inputs:
            fail(f"rnn {b.name} has no inputs: the batch size and length come from the inputs", b.pos)
        for a in b.inputs:
            self.input_decl(a)
        for s in b.stmts:
            if isinstance(s, S.ParamStmt):
                for d in s.decls:
                    self.param_decl(d)
            elif isinstance(s, S.StateStmt):
                for d in s.decls:
                    self.state_decl(d)
            else:
                self.assign(s)
        self.stmt += 1
        seen = set()
        for o in b.outputs:
            if o.name in seen:
                fail(f"output {o.name!r} is listed twice", o.pos)
            seen.add(o.name)
            if o.name not in self.env:
                fail(f"output {o.name!r} is never assigned", o.pos)
            shape = self.shape_of(o.shape)
            value = self.coerce(self.env[o.name], shape, o.pos, f"output {o.name}")
            node = self.add(ir.Output(o.name, value), shape, o.pos)
            self.outputs.append(ir.OutputDecl(o.name, shape, node, o.pos))
        states = [ir.StateDecl(n, d["shape"], d["init"], d["read"], d["write"], d["pos"])
                  for n, d in self.states.items()]
        return ir.Recurrence(b.name, self.g, self.inputs, self.params, states, self.outputs,
                             list(self.dims), dict(self.dims), statements=self.statements)


def _product_factors(e) -> list:
    if isinstance(e, S.BinOp) and e.op == "*":
        return _product_factors(e.left) + _product_factors(e.right)
    return [e]


def check(program: S.Program) -> list:
    """Check every block of a parsed program; return one `ir.Recurrence` per block."""
    out, names = [], {}
    try:
        for block in program.blocks:
            if block.name in names:
                fail(f"rnn {block.name!r} is defined twice (first at line {names[block.name]})", block.pos)
            names[block.name] = block.pos.line
            rec = _Checker(block).run()
            rec.source, rec.filename = program.source, program.filename
            out.append(rec)
    except RnncError as err:
        raise err.located(program.source, program.filename) from None
    if not out:
        raise RnncError("no rnn block found", filename=program.filename)
    return out
