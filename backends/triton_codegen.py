"""Code generation for the Triton backend: the step's IR as Triton tile expressions.

A program of the generated kernel owns one batch row (or a block of `BLK_B` rows) and one
block of every *parallel* axis: an axis along which the step never sums, reduces, picks or
mixes, so that its entries evolve independently (gla's V, mingru's H, s6's D). Each IR value
lives in registers as a tile whose axes are its kept per-sample axes, in IR order, led by the
batch block when there is one:

    value [*shape]  ->  tile [BLK_B?, BLK_c for each kept axis]

Axes are grouped into classes (union-find over the graph: elementwise operands, einsum
letters, a state's read and write); a class has one size `SZ<c>` and one block `BLK<c>`.
Literal size-1 axes and parallel classes with a block of one are dropped from tiles: the
program id indexes them. Padding (a block larger than its size) holds garbage, so every sum,
max, pick and store is masked.

Entry point: `generate(rec, analysis) -> Generated` (source text plus what the runner needs
to launch it). Identifiers in the source are generated (`v12`, `X0`, `BLK3`); spec text
appears only in comments, reduced to a safe character set.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path


from rnnc import ir
from rnnc.errors import RnncError

from .axes import axis_classes, unit as _unit
from rnnc.ir import Op

TEMPLATES = Path(__file__).parent / "templates"
_SAFE = re.compile(r"[^A-Za-z0-9_ +\-*/()\[\],.=@<>!:]")


def comment(text: str) -> str:
    """Spec text for a comment: one line, a safe character set, bounded length."""
    return _SAFE.sub("?", " ".join(str(text).split()))[:100]


# --- axes: backends/axes.py (shared with the newton backend) --------------------------------


@dataclass
class Layout:
    """Where every kernel value lives. Written once by `generate`, read by the runner."""
    rec: object
    pre: list           # hoisted batched contractions the runner computes with torch
    streams: list       # node ids loaded per step: inputs and `pre` nodes
    params: list        # param node ids the kernel reads
    invariant: list     # unbatched nodes computed once per program (from params and consts)
    loop: list          # batched nodes computed every step
    cls: dict           # (node, axis) -> class id
    size: dict          # class id -> sympy size
    parallel: set       # class ids that never mix
    kept_parallel: int | None
    batch_kept: bool
    batched: set        # node ids that vary over the batch (the `batched` attribute)
    states: list = field(default_factory=list)   # rec.states in order
    outputs: list = field(default_factory=list)  # rec.outputs in order

    def entries(self, i: int) -> list:
        """The tile axes of node i: 'b' for the batch block, then (axis, class) pairs."""
        out = ["b"] if self.batch_kept and i in self.batched else []
        shape = self.rec.attr(i, "shape")
        for k, s in enumerate(shape):
            if _unit(s):
                continue
            c = self.cls[(i, k)]
            if c in self.parallel and c != self.kept_parallel:
                continue
            out.append((k, c))
        return out

    def grid_classes(self) -> list:
        """Parallel classes the grid runs over (block 1 each, or BLK for the kept one)."""
        return sorted(self.parallel)

    def classes_of(self, i: int) -> set:
        return {self.cls[(i, k)] for k, s in enumerate(self.rec.attr(i, "shape")) if not _unit(s)}


def layout(rec, analysis) -> Layout:
    g = rec.graph
    hoisted = analysis.hoisted
    batched = {i for i in g.nodes if rec.attr(i, "batched")}
    # Hoisted batched contractions that sum (W @ x): one GEMM over all B*T, done by torch.
    sinks = [o.node for o in rec.outputs] + [s.write for s in rec.states if s.write is not None]
    pre, need, stack = [], set(), list(sinks)
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        node = rec.node(n)
        if (n in hoisted and n in batched and isinstance(node, ir.Contract)
                and any(ch not in node.out for sub in node.subscripts for ch in sub)):
            pre.append(n)
            continue
        stack.extend(ir.operands(node))
    for st in rec.states:
        need.add(st.read)
    kernel = need
    streams = sorted(n for n in kernel if n in pre or isinstance(rec.node(n), ir.Input))
    params = sorted(n for n in kernel if isinstance(rec.node(n), ir.Param))
    leaves = set(streams) | set(params) | {s.read for s in rec.states}
    invariant = sorted(n for n in kernel if n not in batched and n not in leaves)
    loop = sorted(n for n in kernel if n in batched and n not in leaves)
    cls, size, parallel = axis_classes(rec, kernel)
    # A recurrent matrix-vector product wants the batch as the rows of tl.dot; then every
    # parallel class gets a block of one. Otherwise one parallel class (the innermost axis of
    # the first state that has one) is tiled and the batch is one row per program.
    matvec = any(isinstance(rec.node(n), ir.Contract) and n in loop and any(
        ch not in rec.node(n).out for sub in rec.node(n).subscripts for ch in sub) for n in loop)
    kept_parallel = None
    if not matvec:
        for st in list(rec.states) + list(rec.outputs):
            node = st.read if hasattr(st, "read") else st.node
            for k in reversed(range(len(st.shape))):
                c = cls.get((node, k))
                if c in parallel:
                    kept_parallel = c
                    break
            if kept_parallel is not None:
                break
    return Layout(rec, sorted(pre), streams, params, invariant, loop, cls, size, parallel,
                  kept_parallel, matvec, batched, list(rec.states), list(rec.outputs))


# --- expressions -----------------------------------------------------------------------------
_UNARY = {
    Op.NEG: "-({0})", Op.EXP: "tl.exp({0})", Op.LOG: "tl.log({0})", Op.SIGMOID: "tl.sigmoid({0})",
    Op.TANH: "_tanh({0})", Op.RELU: "tl.maximum({0}, 0.0)", Op.SOFTPLUS: "_softplus({0})",
    Op.SILU: "({0}) * tl.sigmoid({0})", Op.LOGSIGMOID: "_logsigmoid({0})",
    Op.SQRT: "tl.sqrt({0})", Op.ABS: "tl.abs({0})",
}
_BINARY = {
    Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})", Op.DIV: "({0} / {1})",
    Op.POW: "_pow({0}, {1})", Op.MAX: "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    Op.MIN: "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    Op.LT: "_f({0} < {1})", Op.LE: "_f({0} <= {1})", Op.GT: "_f({0} > {1})",
    Op.GE: "_f({0} >= {1})", Op.EQ: "_f({0} == {1})", Op.NE: "_f({0} != {1})",
}


def const_text(value: float) -> str:
    if math.isnan(value):
        return 'float("nan")'
    if abs(value) > 3.4028234663852886e38:
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(float(value))


def block(e) -> str:
    return "BLK_B" if e == "b" else f"BLK{e[1]}"


def offs(e) -> str:
    return "ob" if e == "b" else f"o{e[1]}"


def mask(e) -> str:
    return "mb" if e == "b" else f"m{e[1]}"


def expand(name: str, pos: int, n: int) -> str:
    """A vector `name` placed at axis `pos` of an n-axis tile."""
    if n == 1:
        return name
    return f"{name}[{', '.join(':' if k == pos else 'None' for k in range(n))}]"


def align(expr: str, positions: list, n: int) -> str:
    """Place a tile whose axes go to `positions` (of an n-axis tile), permuting if needed."""
    if not positions:
        return expr
    if positions != sorted(positions):
        perm = sorted(range(len(positions)), key=lambda j: positions[j])
        expr = f"tl.permute({expr}, ({', '.join(map(str, perm))},))" if len(perm) > 1 else expr
        positions = sorted(positions)
    if len(positions) == n:
        return expr
    return f"{expr}[{', '.join(':' if k in positions else 'None' for k in range(n))}]"


def shape_of(entries) -> str:
    return "(" + "".join(block(e) + ", " for e in entries) + ")"


def full(expr: str, entries) -> str:
    """`expr` broadcast to the full tile of `entries` (loop carries need a fixed shape)."""
    if not entries:
        return expr
    return f"_bc({expr}, tl.zeros({shape_of(entries)}, tl.float32))"


def masked_sum(expr: str, entries: list, axes: list, fill: str = "0.0", op: str = "tl.sum") -> str:
    """Sum (or max) of a tile over some of its axes, padding excluded. Axes are positions."""
    if not axes:
        return expr
    n = len(entries)
    m = " & ".join(expand(mask(entries[p]), p, n) for p in axes)
    expr = f"tl.where({m}, {expr}, {fill})"
    for p in sorted(axes, reverse=True):
        expr = f"{op}({expr}, axis={p})"
    return expr


# --- the emitter -----------------------------------------------------------------------------
class Unsupported(RnncError):
    """The step uses something the generated kernels cannot express."""


class Emitter:
    """Writes the kernel fragments for one layout: the step (forward), its adjoint (backward),
    and the loads and stores around them."""

    def __init__(self, lay: Layout):
        self.lay = lay
        self.rec = lay.rec
        self.E = {}
        stmt_text = {}
        src_lines = self.rec.source.splitlines()
        for label, pos, node in self.rec.statements:
            if pos is not None and 0 < pos.line <= len(src_lines):
                stmt_text[node] = f"line {pos.line}: {comment(src_lines[pos.line - 1])}"
        self.stmt_text = stmt_text
        self.skip = {n for n in lay.loop if isinstance(self.rec.node(n), (ir.StateWrite, ir.Output))}
        self.loop = [n for n in lay.loop if n not in self.skip]
        self.invariant = [n for n in lay.invariant
                          if not isinstance(self.rec.node(n), (ir.StateWrite, ir.Output))]

    def entries(self, i):
        if i not in self.E:
            self.E[i] = self.lay.entries(i)
        return self.E[i]

    def v(self, i):
        return f"v{i}"

    def note(self, i) -> str:
        return f"  # {self.stmt_text[i]}" if i in self.stmt_text else ""

    # positions of a's tile axes inside a tile with entries `target`, matched by IR axis
    def pos(self, a, target) -> list:
        out = []
        for e in self.entries(a):
            if e == "b":
                out.append(target.index("b"))
            else:
                out.append(next(p for p, t in enumerate(target) if t != "b" and t[0] == e[0]))
        return out

    def aligned(self, a, target) -> str:
        return align(self.v(a), self.pos(a, target), len(target))

    def reduce_to(self, expr: str, src: list, keep: list) -> str:
        """A tile over `src` summed down to the axes at positions `keep` (in that order)."""
        drop = [p for p in range(len(src)) if p not in keep]
        expr = masked_sum(expr, src, drop)
        rest = sorted(keep)
        if rest != list(keep) and len(keep) > 1:
            expr = f"tl.permute({expr}, ({', '.join(str(rest.index(p)) for p in keep)},))"
        return expr

    # --- contractions ------------------------------------------------------------------------
    def contract(self, ops: list, comb: list, keep: list) -> str:
        """Sum over the axes of `comb` not in `keep` of the product of `ops` [(expr, positions)],
        with the result's axes in `keep` order. Two 2-D operands sharing one summed axis use
        tl.dot when every block is at least 16."""
        summed = [p for p in range(len(comb)) if p not in keep]
        n = len(comb)
        prod = " * ".join(align(e, p, n) for e, p in ops)
        generic = masked_sum(prod, comb, summed)
        rest = sorted(keep)
        if rest != list(keep) and len(keep) > 1:
            generic = f"tl.permute({generic}, ({', '.join(str(rest.index(p)) for p in keep)},))"
        if len(ops) == 2 and len(summed) == 1 and len(keep) == 2 and all(len(p) == 2 for _, p in ops):
            s = summed[0]
            (ea, pa), (eb, pb) = ops
            if s in pa and s in pb:
                m = next(p for p in pa if p != s)
                k = next(p for p in pb if p != s)
                if m != k and set(keep) == {m, k}:
                    a = ea if pa == [m, s] else f"tl.trans({ea})"
                    b = eb if pb == [s, k] else f"tl.trans({eb})"
                    ms = mask(comb[s])
                    a = f"tl.where({ms}[None, :], {a}, 0.0)"
                    b = f"tl.where({ms}[:, None], {b}, 0.0)"
                    dot = f"tl.dot({a}, {b}, input_precision=DOT_PREC)"
                    if list(keep) == [k, m]:
                        dot = f"tl.trans({dot})"
                    cond = " and ".join(f"{block(comb[p])} >= 16" for p in (m, s, k))
                    return f"({dot} if {cond} else {generic})"
        return generic

    def contract_frame(self, i):
        """(combined entries, letter -> position) of a Contract node's einsum."""
        node = self.rec.node(i)
        E = self.entries(i)
        comb = list(E)
        where = {}
        for p, e in enumerate(E):
            if e != "b":
                where[node.out[e[0]]] = p
        for a, sub in zip(node.args, node.subscripts):
            for e in self.entries(a):
                if e == "b":
                    continue
                ch = sub[e[0]]
                if ch not in where:
                    where[ch] = len(comb)
                    comb.append(("s" + ch, e[1]))
        return comb, where

    def operand_pos(self, i, j, where) -> list:
        node = self.rec.node(i)
        a, sub = node.args[j], node.subscripts[j]
        out = []
        for e in self.entries(a):
            out.append(0 if e == "b" else where[sub[e[0]]])
        if len(set(out)) != len(out):
            raise Unsupported("an einsum operand with a repeated index")
        return out

    # --- forward -----------------------------------------------------------------------------
    def fwd(self, i) -> list:
        rec, node, E, v = self.rec, self.rec.node(i), self.entries(i), self.v
        n = len(E)
        if isinstance(node, ir.Const):
            return [f"{v(i)} = {const_text(node.value)}"]
        if isinstance(node, ir.Elementwise):
            args = [self.aligned(a, E) for a in node.args]
            if node.op is Op.WHERE:
                expr = f"tl.where({args[0]} != 0, {args[1]}, {args[2]})"
            elif node.op in _UNARY:
                expr = _UNARY[node.op].format(args[0])
            else:
                expr = _BINARY[node.op].format(*args)
            return [f"{v(i)} = {expr}{self.note(i)}"]
        if isinstance(node, ir.Contract):
            comb, where = self.contract_frame(i)
            ops = [(v(a), self.operand_pos(i, j, where)) for j, a in enumerate(node.args)]
            return [f"{v(i)} = {self.contract(ops, comb, list(range(n)))}{self.note(i)}"]
        if isinstance(node, ir.Reduce):
            Ea = self.entries(node.arg)
            axes = [p for p, e in enumerate(Ea) if e != "b" and e[0] in node.axes]
            if node.op is Op.ADD:
                expr = masked_sum(v(node.arg), Ea, axes)
            else:
                expr = masked_sum(v(node.arg), Ea, axes, 'float("-inf")', "tl.max")
            return [f"{v(i)} = {expr}{self.note(i)}"]
        if isinstance(node, ir.Select):
            return [f"{v(i)} = {self.select(i)}{self.note(i)}"]
        if isinstance(node, ir.Broadcast):
            return [f"{v(i)} = {full(self.aligned(node.arg, E), E)}{self.note(i)}"]
        raise Unsupported(f"no Triton lowering for {type(node).__name__}")

    def _select_steps(self, i):
        """How a Select reads its operand's tile: (the condition on the operand's axes that the
        entries it takes satisfy, or None; the axes it drops (picked, or the second axis of a
        diagonal); letter -> axis of the operand tile)."""
        node = self.rec.node(i)
        Ea = self.entries(node.arg)
        n = len(Ea)
        at = {e[0]: p for p, e in enumerate(Ea) if e != "b"}
        cond, drop, first = [], [], {}
        for k, val in enumerate(node.index):
            if isinstance(val, int):
                if k in at:
                    c = Ea[at[k]][1]
                    idx = str(val) if val >= 0 else f"(SZ{c} + ({val}))"
                    cond.append(f"({expand(f'o{c}', at[k], n)} == {idx})")
                    drop.append(at[k])
            elif val in first:
                p0 = first[val]
                if (p0 in at) != (k in at):
                    raise Unsupported("a diagonal between an axis of size 1 and a larger one")
                if k in at:
                    c = Ea[at[k]][1]
                    cond.append(f"({expand(f'o{c}', at[p0], n)} == {expand(f'o{c}', at[k], n)})")
                    drop.append(at[k])
            else:
                first[val] = k
        letter_pos = {val: at[k] for val, k in first.items() if k in at}
        return (" & ".join(cond) or None), drop, letter_pos

    def select(self, i) -> str:
        node, E = self.rec.node(i), self.entries(i)
        n = len(self.entries(node.arg))
        cond, drop, letter_pos = self._select_steps(i)
        expr = self.v(node.arg)
        if cond:
            expr = f"tl.where({cond}, {expr}, 0.0)"
            for p in sorted(drop, reverse=True):
                expr = f"tl.sum({expr}, axis={p})"
        rest = [p for p in range(n) if p not in drop]
        target = [0 if e == "b" else letter_pos[node.out[e[0]]] for e in E]
        order = [rest.index(p) for p in target]
        if order != sorted(order) and len(order) > 1:
            expr = f"tl.permute({expr}, ({', '.join(map(str, order))},))"
        return expr

    # --- backward ----------------------------------------------------------------------------
    def vjp(self, i) -> tuple:
        """(lines, [(operand, contribution in the operand's tile)]) for node i, whose
        adjoint `g<i>` is a full tile."""
        node, E, v = self.rec.node(i), self.entries(i), self.v
        g, y = f"g{i}", v(i)
        if isinstance(node, ir.Elementwise):
            X = [self.aligned(a, E) for a in node.args]
            op = node.op
            d = {
                Op.ADD: lambda: [g, g], Op.SUB: lambda: [g, f"-{g}"],
                Op.MUL: lambda: [f"{g} * {X[1]}", f"{g} * {X[0]}"],
                Op.DIV: lambda: [f"{g} / {X[1]}", f"-{g} * {y} / {X[1]}"],
                Op.POW: lambda: [f"{g} * {X[1]} * _pow({X[0]}, {X[1]} - 1.0)",
                                 f"tl.where({X[0]} == 0.0, 0.0, {g} * {y} * tl.log({X[0]}))"],
                Op.NEG: lambda: [f"-{g}"], Op.EXP: lambda: [f"{g} * {y}"],
                Op.LOG: lambda: [f"{g} / {X[0]}"],
                Op.SIGMOID: lambda: [f"{g} * {y} * (1.0 - {y})"],
                Op.TANH: lambda: [f"{g} * (1.0 - {y} * {y})"],
                Op.RELU: lambda: [f"tl.where({X[0]} > 0.0, {g}, 0.0)"],
                Op.SOFTPLUS: lambda: [f"{g} * tl.sigmoid({X[0]})"],
                Op.SILU: lambda: [f"{g} * tl.sigmoid({X[0]}) * (1.0 + {X[0]} * (1.0 - tl.sigmoid({X[0]})))"],
                Op.LOGSIGMOID: lambda: [f"{g} * tl.sigmoid(-({X[0]}))"],
                Op.SQRT: lambda: [f"{g} * 0.5 / {y}"],
                Op.ABS: lambda: [f"tl.where({X[0]} > 0.0, {g}, tl.where({X[0]} < 0.0, -{g}, 0.0))"],
                Op.MAX: lambda: [f"tl.where({X[0]} > {X[1]}, {g}, tl.where({X[0]} == {X[1]}, 0.5 * {g}, 0.0))",
                                 f"tl.where({X[1]} > {X[0]}, {g}, tl.where({X[0]} == {X[1]}, 0.5 * {g}, 0.0))"],
                Op.MIN: lambda: [f"tl.where({X[0]} < {X[1]}, {g}, tl.where({X[0]} == {X[1]}, 0.5 * {g}, 0.0))",
                                 f"tl.where({X[1]} < {X[0]}, {g}, tl.where({X[0]} == {X[1]}, 0.5 * {g}, 0.0))"],
                Op.WHERE: lambda: [None, f"tl.where({X[0]} != 0, {g}, 0.0)",
                                   f"tl.where({X[0]} != 0, 0.0, {g})"],
            }.get(op)
            if d is None:  # comparisons: no gradient
                return [], []
            return [], [(a, self.reduce_to(f"({e})", E, self.pos(a, E)))
                         for a, e in zip(node.args, d()) if e is not None]
        if isinstance(node, ir.Contract):
            comb, where = self.contract_frame(i)
            out = []
            for j, a in enumerate(node.args):
                ops = [(v(b), self.operand_pos(i, k, where)) for k, b in enumerate(node.args) if k != j]
                ops.append((g, list(range(len(E)))))
                out.append((a, self.contract(ops, comb, self.operand_pos(i, j, where))))
            return [], out
        if isinstance(node, ir.Reduce):
            Ea = self.entries(node.arg)
            kept = [k for k in range(len(self.rec.attr(node.arg, "shape"))) if k not in node.axes]
            pos = [Ea.index("b") if e == "b" else next(p for p, f in enumerate(Ea) if f != "b" and f[0] == kept[e[0]])
                   for e in E]
            ga = align(g, pos, len(Ea))
            if node.op is Op.ADD:
                return [], [(node.arg, ga)]
            axes = [p for p, e in enumerate(Ea) if e != "b" and e[0] in node.axes]
            hit = f"({v(node.arg)} == {align(y, pos, len(Ea))})"
            cnt = align(masked_sum(f"tl.where({hit}, 1.0, 0.0)", Ea, axes), pos, len(Ea))
            return [f"c{i} = {cnt}"], [(node.arg, f"tl.where({hit}, {ga} / c{i}, 0.0)")]
        if isinstance(node, ir.Select):  # the adjoint goes back to the entries the Select took
            cond, _, letter_pos = self._select_steps(i)
            pos = [0 if e == "b" else letter_pos[node.out[e[0]]] for e in E]
            expr = align(g, pos, len(self.entries(node.arg)))
            return [], [(node.arg, f"tl.where({cond}, {expr}, 0.0)" if cond else expr)]
        if isinstance(node, ir.Broadcast):
            return [], [(node.arg, self.reduce_to(g, E, self.pos(node.arg, E)))]
        return [], []

    def vjp_invariant(self, i) -> tuple:
        """The adjoint of a value computed from params alone, from its accumulator."""
        lines = [f"g{i} = ga{i}"]
        more, contrib = self.vjp(i)
        return lines + more, contrib


# --- kernels -----------------------------------------------------------------------------------
class Adjoints:
    """The adjoint variables of a backward being written: `g<i>` for a value of the step,
    assigned by its first contribution and added to by the next ones (`assigned` holds those
    seen so far), and `ga<i>` for the accumulators carried across steps (params and the
    values computed from them only). Constants take none."""

    def __init__(self, rec, accumulated):
        self.rec, self.assigned, self.accumulated = rec, set(), set(accumulated)

    def add(self, a, expr: str, lines: list) -> None:
        if isinstance(self.rec.node(a), ir.Const):
            return
        if a in self.accumulated:
            lines.append(f"ga{a} = ga{a} + {expr}")
        elif a in self.assigned:
            lines.append(f"g{a} = g{a} + {expr}")
        else:
            lines.append(f"g{a} = {expr}")
            self.assigned.add(a)


@dataclass
class Tensor:
    """A pointer argument: `lead` axes ('S' split, 'B' batch, 'T' time) then the node's shape."""
    name: str
    node: int
    lead: tuple
    store: bool = False  # laid out with the batch block even when the node is unbatched


@dataclass
class Generated:
    source: str
    layout: Layout
    fwd: list           # Tensor arguments of `forward`, in order
    bwd: list           # Tensor arguments of `backward`, in order
    splits: dict        # sink tensor name -> grid dims it lacks ('B' or a class id)
    classes: list       # class ids, in order
    kept: list          # classes with a tile axis (BLK<c>)
    grid: list          # parallel classes the grid runs over


def op_helpers() -> list:
    """The lines of the @triton.jit helpers that the op tables (_UNARY, _BINARY) call, as
    the fused template defines them, for the other templates that evaluate IR expressions."""
    fused = (TEMPLATES / "fused.py.tmpl").read_text()
    return fused[fused.index("@triton.jit"):fused.index("@triton.jit\ndef forward(")].rstrip().splitlines()


def _fill(template: str, fragments: dict) -> str:
    out = []
    for line in template.splitlines():
        key = line.strip()
        if key.startswith("{{") and key.endswith("}}") and key[2:-2] in fragments:
            indent = line[:len(line) - len(line.lstrip())]
            out += [indent + x if x else "" for x in fragments[key[2:-2]]]
            continue
        for k, val in fragments.items():
            if isinstance(val, str):
                line = line.replace("{{" + k + "}}", val)
        out.append(line)
    return "\n".join(out) + "\n"


class _Kernels(Emitter):
    def __init__(self, lay):
        super().__init__(lay)
        self.grid = lay.grid_classes()
        self.kept = [c for c in sorted(lay.size) if c not in lay.parallel or c == lay.kept_parallel]

    def store_entries(self, node):
        return (["b"] if self.lay.batch_kept else []) + [e for e in self.entries(node) if e != "b"]

    def tile(self, t: Tensor):
        return self.store_entries(t.node) if t.store or "B" in t.lead else self.entries(t.node)

    def strides(self, t: Tensor):
        return [f"{t.name}_s{d}" for d in range(len(t.lead) + len(self.rec.attr(t.node, "shape")))]

    def split(self, t: Tensor, has_batch: bool):
        lay = self.lay
        classes = lay.classes_of(t.node)
        lacking = ([] if has_batch else ["B"]) + [c for c in self.grid if c not in classes]
        expr = "0"
        for d in lacking:
            pid, ng = ("pid_b", "NB") if d == "B" else (f"pid{d}", f"NG{d}")
            expr = pid if expr == "0" else f"({expr}) * {ng} + {pid}"
        return lacking, expr

    def access(self, t: Tensor, split_expr=None) -> list:
        """Lines defining base_<name> (scalar pointer), off_<name> and msk_<name> (tiles)."""
        E = self.tile(t)
        n = len(E)
        strides = self.strides(t)
        base, terms = [t.name], []
        for d, L in enumerate(t.lead):
            if L == "S":
                base.append(f"({split_expr}) * {strides[d]}")
            elif L == "B":
                if "b" in E:
                    terms.append(f"{expand('ob', E.index('b'), n)} * {strides[d]}")
                else:
                    base.append(f"pid_b * {strides[d]}")
        lead = len(t.lead)
        for k, size in enumerate(self.rec.attr(t.node, "shape")):
            if _unit(size):
                continue
            c = self.lay.cls[(t.node, k)]
            s = strides[lead + k]
            at = [p for p, e in enumerate(E) if e != "b" and e[0] == k]
            if at:
                terms.append(f"{expand(f'o{c}', at[0], n)} * {s}")
            else:
                base.append(f"pid{c} * {s}")
        msk = " & ".join(expand(mask(e), p, n) for p, e in enumerate(E)) or "None"
        return [f"base_{t.name} = {' + '.join(base)}",
                f"off_{t.name} = {' + '.join(terms) if terms else '0'}",
                f"msk_{t.name} = {msk}"]

    def load(self, t: Tensor) -> str:
        if not self.tile(t):
            return f"tl.load(base_{t.name}).to(tl.float32)"
        return f"tl.load(base_{t.name} + off_{t.name}, mask=msk_{t.name}, other=0.0).to(tl.float32)"

    def store(self, t: Tensor, value: str) -> str:
        if not self.tile(t):
            return f"tl.store(base_{t.name}, {value})"
        return f"tl.store(base_{t.name} + off_{t.name}, {value}, mask=msk_{t.name})"

    def step_stride(self, t: Tensor) -> str:
        return self.strides(t)[t.lead.index("T")]

    def arg_lines(self, ts) -> list:
        """A kernel's pointer arguments, then their strides a line per tensor."""
        out = [", ".join(t.name for t in ts) + ","] if ts else []
        return out + [", ".join(self.strides(t)) + "," for t in ts]

    def const_lines(self) -> list:
        """The constexpr parameters SZ<c> of every class and BLK<c> of the tiled ones."""
        const = [", ".join(f"SZ{c}: tl.constexpr" for c in sorted(self.lay.size)),
                 ", ".join(f"BLK{c}: tl.constexpr" for c in self.kept)]
        return [x + "," for x in const if x]

    def step_adjoints(self, adj, DY, dy_value, X, DX, stored=None) -> list:
        """One step's adjoints, in reverse order of the step (the fused and the wide backward):
        the outputs' gradients (`dy_value(t)` of DY tensor t) and the new states' (gs<read>)
        seed the values they come from, every value's vjp sends its adjoint on to its operands
        (through `adj`), and the streams' gradients are stored in DX. `stored`: {node: line}
        for values whose adjoint that line stores instead of sending it on."""
        rec, lay, lines = self.rec, self.lay, []
        for j, (t, o) in enumerate(zip(DY, lay.outputs)):
            lines.append(f"dy{j} = {dy_value(t)}")
            arg = rec.node(o.node).arg
            SE = self.store_entries(o.node)
            adj.add(arg, self.reduce_to(f"dy{j}", SE, self.pos(arg, SE)), lines)
        for st in lay.states:
            if st.write is not None:
                arg = rec.node(st.write).arg
                ER = self.entries(st.read)
                adj.add(arg, self.reduce_to(f"gs{st.read}", ER, self.pos(arg, ER)), lines)
        for i in reversed(self.loop):
            if i not in adj.assigned:
                continue
            lines.append(f"g{i} = {full(f'g{i}', self.entries(i))}")
            if stored and i in stored:
                lines.append(stored[i])
                continue
            more, contrib = self.vjp(i)
            lines += more
            for a, expr in contrib:
                adj.add(a, expr, lines)
        for t, dx in zip(X, DX):
            if t.node in adj.assigned:
                lines.append(self.store(dx, full(f"g{t.node}", self.tile(dx))))
        return lines

    # --- fragments ---------------------------------------------------------------------------
    def prologue(self, params) -> list:
        lay, lines = self.lay, ["pid = tl.program_id(0)", "pid_b = (pid % NB).to(tl.int64)",
                                "rest = pid // NB"]
        for c in self.grid:
            lines += [f"pid{c} = (rest % NG{c}).to(tl.int64)", f"rest = rest // NG{c}"]
        lines += self.batch_offsets()
        for c in self.kept:
            start = f"pid{c} * BLK{c} + " if c == lay.kept_parallel else ""
            lines += [f"o{c} = {start}tl.arange(0, BLK{c}).to(tl.int64)", f"m{c} = o{c} < SZ{c}"]
        lines.append("# params, and what the step computes from them alone")
        for t in params:
            lines += self.access(t) + [f"v{t.node} = {self.load(t)}"]
        for i in self.invariant:
            lines += self.fwd(i)
        return lines

    def batch_offsets(self) -> list:
        """Offsets (and mask) of the tiles' leading axis: the program's batch block."""
        if self.lay.batch_kept:
            return ["ob = pid_b * BLK_B + tl.arange(0, BLK_B).to(tl.int64)", "mb = ob < B"]
        return []

    def body(self) -> list:
        lines = []
        for i in self.loop:
            lines += self.fwd(i)
        return lines

    def new_states(self) -> list:
        lines = []
        for j, st in enumerate(self.lay.states):
            if st.write is not None:
                arg = self.rec.node(st.write).arg
                ER = self.entries(st.read)
                lines.append(f"n{j} = {full(self.aligned(arg, ER), ER)}")
        return lines

    def output_value(self, o) -> str:
        SE = self.store_entries(o.node)
        arg = self.rec.node(o.node).arg
        return full(align(self.v(arg), self.pos(arg, SE), len(SE)), SE)


def generate(rec, analysis) -> Generated:
    lay = layout(rec, analysis)
    K = _Kernels(lay)
    st_read = [s.read for s in lay.states]
    X = [Tensor(f"X{j}", n, ("B", "T")) for j, n in enumerate(lay.streams)]
    P = [Tensor(f"P{j}", n, ()) for j, n in enumerate(lay.params)]
    H0 = [Tensor(f"H0_{j}", r, ("B",)) for j, r in enumerate(st_read)]
    Y = [Tensor(f"Y{j}", o.node, ("B", "T"), store=True) for j, o in enumerate(lay.outputs)]
    HT = [Tensor(f"HT{j}", r, ("B",)) for j, r in enumerate(st_read)]
    HS = [Tensor(f"HS{j}", r, ("B", "T")) for j, r in enumerate(st_read)]
    DY = [Tensor(f"DY{j}", o.node, ("B", "T"), store=True) for j, o in enumerate(lay.outputs)]
    DHT = [Tensor(f"DHT{j}", r, ("B",)) for j, r in enumerate(st_read)]
    DX = [Tensor(f"DX{j}", n, ("S", "B", "T")) for j, n in enumerate(lay.streams)]
    DP = [Tensor(f"DP{j}", n, ("S",)) for j, n in enumerate(lay.params)]
    DH0 = [Tensor(f"DH0_{j}", r, ("S", "B")) for j, r in enumerate(st_read)]
    fwd_t = X + P + H0 + Y + HT + HS
    bwd_t = X + P + HS + DY + DHT + DX + DP + DH0

    grid_args = "".join(f"NG{c}, " for c in K.grid)
    const = [", ".join(f"SZ{c}: tl.constexpr" for c in sorted(lay.size))]
    const.append(", ".join([f"BLK{c}: tl.constexpr" for c in K.kept] +
                           (["BLK_B: tl.constexpr"] if lay.batch_kept else [])))
    const = [x + "," for x in const if x]

    # forward
    fs = ["# initial state, in registers for the whole loop"]
    for t in H0:
        fs += K.access(t) + [f"v{t.node} = {full(K.load(t), K.entries(t.node))}"]
    for t in X + Y + HS:
        fs += K.access(t)
    fs.append("if STORE_HIST:")
    for t in HS:
        fs += [f"    {K.store(t, f'v{t.node}')}", f"    base_{t.name} += {K.step_stride(t)}"]
    fs.append("    pass")
    step = ["# this step's inputs"] + [f"v{t.node} = {K.load(t)}" for t in X]
    step += ["# the step"] + K.body() + K.new_states()
    for j, (t, o) in enumerate(zip(Y, lay.outputs)):
        step.append(K.store(t, K.output_value(o)))
    for j, st in enumerate(lay.states):
        if st.write is not None:
            step.append(f"v{st.read} = n{j}")
    step.append("if STORE_HIST:")
    step += [f"    {K.store(t, f'v{t.node}')}" for t in HS] + ["    pass"]
    step += [f"base_{t.name} += {K.step_stride(t)}" for t in X + Y + HS]
    fe = ["# final state"]
    for t in HT:
        fe += K.access(t) + [K.store(t, f"v{t.node}")]

    # backward
    splits = {}
    bs = ["# gradient accumulators for params and the values computed from them"]
    acc_nodes = [t.node for t in P] + K.invariant
    for n in acc_nodes:
        E = K.entries(n)
        bs.append(f"ga{n} = tl.zeros({shape_of(E)}, tl.float32)" if E else f"ga{n} = tl.zeros((), tl.float32)")
    # A value that lacks a parallel axis is replicated in every program along it: its seed
    # is applied in the first of them only, so that the programs' adjoints are partial sums
    # whose total is the true adjoint (the runner sums the slices).
    def seed(t):
        lacking = [c for c in K.grid if c not in lay.classes_of(t.node)]
        value = K.load(t)
        if lacking:
            value = f"tl.where({' & '.join(f'(pid{c} == 0)' for c in lacking)}, {value}, 0.0)"
        return value
    for t in DHT:
        bs += K.access(t) + [f"gs{t.node} = {full(seed(t), K.entries(t.node))}"]
    for t in X + HS + DY:
        bs += K.access(t)
    for t in DX + DH0:
        lacking, expr = K.split(t, True)
        splits[t.name] = lacking
        bs += K.access(t, expr)
    # start at the last step (the history holds T + 1 states: hist[t] is the state before t)
    bs += [f"base_{t.name} += (T - 1).to(tl.int64) * {K.step_stride(t)}" for t in X + HS + DY + DX]
    bstep = ["# recompute the step from the state before it"]
    bstep += [f"v{t.node} = {K.load(t)}" for t in HS]
    bstep += [f"v{t.node} = {K.load(t)}" for t in X]
    bstep += K.body()
    bstep.append("# adjoints, in reverse order of the step")
    adj = Adjoints(rec, acc_nodes)
    assigned, accumulate = adj.assigned, adj.add
    bstep += K.step_adjoints(adj, DY, seed, X, DX)
    for j, st in enumerate(lay.states):
        r = st.read
        E = K.entries(r)
        new = full(f"g{r}", E) if r in assigned else f"tl.zeros({shape_of(E)}, tl.float32)" if E \
            else "tl.zeros((), tl.float32)"
        bstep.append(f"gs{r} = {new}" if st.write is not None else f"gs{r} = gs{r} + {new}")
    bstep += [f"base_{t.name} -= {K.step_stride(t)}" for t in X + HS + DY + DX]
    be = ["# gradient of the initial state"]
    be += [K.store(t, f"gs{t.node}") for t in DH0]
    be.append("# through the values computed from params alone")
    for i in reversed(K.invariant):
        lines, contrib = K.vjp_invariant(i)
        be += lines
        for a, expr in contrib:
            accumulate(a, expr, be)
    be.append("# param gradients (one slice per program; the runner sums the slices)")
    for t in DP:
        lacking, expr = K.split(t, False)
        splits[t.name] = lacking
        be += K.access(t, expr) + [K.store(t, f"ga{t.node}")]

    fragments = {
        # the file name without its directory: the text must not depend on where the spec lives
        "SOURCE": comment(Path(rec.filename).name), "NAME": comment(rec.name),
        "FWD_ARGS": K.arg_lines(fwd_t), "BWD_ARGS": K.arg_lines(bwd_t), "GRID_ARGS": grid_args,
        "CONST_ARGS": const, "PROLOGUE": K.prologue(P),
        "FWD_START": fs, "FWD_STEP": step, "FWD_END": fe,
        "BWD_START": bs, "BWD_STEP": bstep, "BWD_END": be,
    }
    template = (TEMPLATES / "fused.py.tmpl").read_text()
    return Generated(_fill(template, fragments), lay, fwd_t, bwd_t, splits,
                     sorted(lay.size), K.kept, K.grid)
