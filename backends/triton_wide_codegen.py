"""Code generation for the Triton backend's wide kernel: dense recurrences too wide for the
fused kernel's registers.

The fused kernel (`triton_codegen`) keeps a recurrent matrix such as an LSTM's U [4H, H] in
registers for the whole time loop, which stops at a few thousand values per program. Here
the one axis class that the recurrent products mix (H: the rows and columns of U and the
state h) is cut into blocks, and a program owns one block of it (and one batch block):

    state, gates, outputs   tiles [BLK_B, BLK<A>]           (the program's block)
    recurrent product W @ h acc [BLK_B, BLK<A>] += tl.dot(h [BLK_B, BK], W [BLK<A>, BK]^T)
                            over column tiles of the whole previous state

Every program needs the whole previous state, so states live in global memory between
steps (`SB<j>`, two slots) and the runner launches the kernel once per step. Everything
else about a tile is the fused kernel's layout (`Layout`), with class A made the tiled
parallel class; the step's other expressions are emitted by the same `Emitter`.

What it takes: each recurrent product is a `Contract` of two operands, a param matrix
whose two axes are both in class A and a state read whose class-A axis is summed, giving a
class-A vector; no other expression of the step sums, reduces, picks or mixes along class
A; every class that is not A is one the grid runs over. Other specs get `Wide.source` None
and the reason. The kernel is forward-only: training a spec this wide runs on another
backend (the runner says so).

Entry point: `generate(gen, rec) -> Wide`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from rnnc import ir

from .triton_codegen import (TEMPLATES, Adjoints, Tensor, Unsupported, _fill, _Kernels, _unit, comment, full,
                             op_helpers, shape_of)


@dataclass
class Product:
    node: int        # the Contract node
    param: int       # its matrix operand (a Param node)
    out_axis: int    # the param's axis along the product's output
    sum_axis: int    # the param's axis summed against the state
    state: int       # index of the state in Layout.states
    state_axis: int  # the state's axis in class A


@dataclass
class Wide:
    source: str | None            # the kernel module's text (None: no wide kernel)
    why: str = ""                 # why there is none
    axis: int | None = None       # the class cut into blocks
    products: list = field(default_factory=list)
    args: list = field(default_factory=list)   # Tensor arguments, in order
    params: list = field(default_factory=list)  # param node ids, in the order of `args`
    grid: list = field(default_factory=list)   # classes the grid runs over (A included)
    classes: list = field(default_factory=list)
    bwd_args: list = field(default_factory=list)  # Tensor arguments of wide_backward
    why_backward: str = ""        # why wide_backward cannot run ("" when it can)
    flag_args: tuple = ("FLAGS", "ERR")  # int32 pointer arguments of both kernels


def _line(rec, n: int, fmt: str) -> str:
    """fmt with node n's source line, or "" where it has none."""
    pos = rec.attr(n, "pos")
    return fmt.format(pos.line) if pos and pos.line else ""


def _products(lay, rec, A) -> list:
    """The recurrent products of the step, or Unsupported naming what stands in the way."""
    reads = {st.read: j for j, st in enumerate(lay.states)}
    out = []
    for n in lay.loop:
        node = rec.node(n)
        if not (isinstance(node, ir.Contract)
                and any(ch not in node.out for sub in node.subscripts for ch in sub)):
            continue
        at = _line(rec, n, " at line {}")
        where = f"the product{at}" if at else "a product"
        if len(node.args) != 2:
            raise Unsupported(f"{where} has {len(node.args)} operands; the wide kernel takes "
                              "a param matrix times a state")
        kinds = [isinstance(rec.node(a), ir.Param) for a in node.args]
        if sorted(kinds) != [False, True] or not any(a in reads for a in node.args):
            raise Unsupported(f"{where} is not a param matrix times a state read")
        jp = kinds.index(True)
        p, s = node.args[jp], node.args[1 - jp]
        psub, ssub = node.subscripts[jp], node.subscripts[1 - jp]
        paxes = [k for k, d in enumerate(rec.attr(p, "shape")) if lay.cls.get((p, k)) == A]
        saxes = [k for k, d in enumerate(rec.attr(s, "shape")) if lay.cls.get((s, k)) == A]
        oaxes = [k for k, d in enumerate(rec.attr(n, "shape")) if lay.cls.get((n, k)) == A]
        if len(paxes) != 2 or len(saxes) != 1 or len(oaxes) != 1:
            raise Unsupported(f"{where} is not a matrix-vector product along one axis")
        summed = ssub[saxes[0]]
        if summed in node.out:
            raise Unsupported(f"{where} does not sum the state's recurrent axis")
        sum_axis = next(k for k in paxes if psub[k] == summed)
        out_axis = next(k for k in paxes if k != sum_axis)
        if psub[out_axis] != node.out[oaxes[0]]:
            raise Unsupported(f"{where} does not sum the state's recurrent axis")
        out.append(Product(n, p, out_axis, sum_axis, reads[s], saxes[0]))
    if not out:
        raise Unsupported("the step has no recurrent matrix-vector product")
    return out


def _check_rest(lay, rec, A, products) -> None:
    """Nothing but the recurrent products may mix along class A."""
    skip = {pr.node for pr in products}
    mats = {pr.param for pr in products}
    for n in lay.loop + lay.invariant:
        node = rec.node(n)
        if n in skip:
            continue
        if any(a in mats for a in ir.operands(node)):
            raise Unsupported("a recurrent matrix is read by something other than its product")
        where = _line(rec, n, " (line {})")
        classes = [lay.cls.get((n, k)) for k in range(len(rec.attr(n, "shape")))]
        if classes.count(A) > 1:
            raise Unsupported(f"a value with two recurrent axes{where}")
        if isinstance(node, ir.Contract):
            for a, sub in zip(node.args, node.subscripts):
                for k, ch in enumerate(sub):
                    if ch not in node.out and lay.cls.get((a, k)) == A:
                        raise Unsupported(f"a sum along the recurrent axis{where} other than a "
                                          "param matrix times a state")
        elif isinstance(node, ir.Reduce):
            if any(lay.cls.get((node.arg, k)) == A for k in node.axes):
                raise Unsupported(f"a reduction along the recurrent axis{where}")
        elif isinstance(node, ir.Select):
            for k, v in enumerate(node.index):
                if lay.cls.get((node.arg, k)) == A and (isinstance(v, int) or node.index.count(v) > 1):
                    raise Unsupported(f"an index or diagonal along the recurrent axis{where}")


class _WideKernels(_Kernels):
    def __init__(self, lay, products, A):
        super().__init__(lay)
        self.products, self.A = products, A
        self.product_nodes = {pr.node for pr in products}

    def fwd(self, i) -> list:
        return [] if i in self.product_nodes else super().fwd(i)

    def matrix_base(self, t: Tensor) -> str:
        """A matrix param's scalar base: its axes outside class A are grid-indexed."""
        base = [t.name]
        for k, size in enumerate(self.rec.attr(t.node, "shape")):
            c = self.lay.cls.get((t.node, k))
            if not _unit(size) and c != self.A:
                base.append(f"pid{c} * {t.name}_s{k}")
        return " + ".join(base)

    def column_tiles(self) -> list:
        """The header of a loop over column tiles of the recurrent axis: ok/mk in its body."""
        A = self.A
        return [f"for k0 in range(0, SZ{A}, BK):", "    ok = k0 + tl.arange(0, BK).to(tl.int64)",
                f"    mk = ok < SZ{A}"]

    def slot_load(self, t: Tensor, slot: str) -> str:
        """The program's block of a state buffer's slot `slot`, as a full tile."""
        return full(f"tl.load(base_{t.name} + {slot} * {t.name}_s0 + off_{t.name}, "
                    f"mask=msk_{t.name}, other=0.0)", self.entries(t.node))

    def product_block(self, SB: list, mats: dict, slot: str = "cur") -> list:
        """The recurrent products, one column loop per state they read."""
        A, lines = self.A, []
        for j in sorted({pr.state for pr in self.products}):
            prods = [pr for pr in self.products if pr.state == j]
            sb = SB[j].name
            lines.append("# recurrent products: the whole previous state, a column tile at a time")
            lines += [f"v{pr.node} = tl.zeros((BLK_B, BLK{A}), tl.float32)" for pr in prods]
            lines += self.column_tiles() + [
                      f"    hk = tl.load(base_{sb} + {slot} * {sb}_s0 + ob[:, None] * {sb}_s1 + "
                      f"ok[None, :] * {sb}_s{2 + prods[0].state_axis}, "
                      "mask=mb[:, None] & mk[None, :], other=0.0, cache_modifier=\".cg\")"
                      "  # other programs wrote it: not from L1"]
            for pr in prods:
                m = mats[pr.param]
                lines += [f"    w = tl.load(wbase_{m} + o{A}[:, None] * {m}_s{pr.out_axis} + "
                          f"ok[None, :] * {m}_s{pr.sum_axis}, mask=m{A}[:, None] & mk[None, :], "
                          "other=0.0).to(tl.float32)",
                          f"    v{pr.node} += (tl.dot(hk, tl.trans(w), input_precision=DOT_PREC) "
                          f"if BLK_B >= 16 and BLK{A} >= 16 and BK >= 16 "
                          "else tl.sum(hk[:, None, :] * w[None, :, :], axis=2))"
                          + self.note(pr.node)]
        return lines


def generate(gen, rec) -> Wide:
    """The wide kernel for a recurrence with recurrent matrix products, or why there is none."""
    lay0 = gen.layout
    if not lay0.batch_kept:
        return Wide(None, "the step has no recurrent matrix-vector product")
    mixed = sorted(set(lay0.size) - lay0.parallel)
    if len(mixed) != 1:
        return Wide(None, f"the step mixes {len(mixed)} axis classes; the wide kernel cuts one")
    A = mixed[0]
    lay = replace(lay0, parallel=lay0.parallel | {A}, kept_parallel=A)
    try:
        # Every class but A is parallel (grid-indexed, no tile axis), so a product and the
        # state it reads are [BLK_B, BLK<A>] tiles.
        products = _products(lay, rec, A)
        _check_rest(lay, rec, A, products)
        return _source(_WideKernels(lay, products, A), gen, rec, products, A)
    except Unsupported as e:
        return Wide(None, e.message)


def _source(K: _WideKernels, gen, rec, products, A) -> Wide:
    lay = K.lay
    mats = {pr.param for pr in products}
    X = [Tensor(f"X{j}", n, ("B", "T")) for j, n in enumerate(lay.streams)]
    P = [Tensor(f"P{j}", n, ()) for j, n in enumerate(lay.params)]
    SB = [Tensor(f"SB{j}", st.read, ("S", "B")) for j, st in enumerate(lay.states)]
    Y = [Tensor(f"Y{j}", o.node, ("B", "T"), store=True) for j, o in enumerate(lay.outputs)]
    ts = X + P + SB + Y

    const = K.const_lines()
    vec = [t for t in P if t.node not in mats]
    pro = K.prologue(vec)
    pro.append("# the recurrent matrices, read a tile at a time in the step")
    by_node = {}
    for t in P:
        if t.node in mats:
            by_node[t.node] = t.name
            pro.append(f"wbase_{t.name} = {K.matrix_base(t)}")
    start = ["# the program's block of each state, from the slot step t0 reads"]
    for t in SB:
        start += K.access(t, "0") + [f"v{t.node} = {K.slot_load(t, '(t0 % SLOTS)')}"]
    for t in X + Y:
        start += K.access(t) + [f"base_{t.name} += t0.to(tl.int64) * {K.step_stride(t)}"]
    step = ["# this step's inputs"] + [f"v{t.node} = {K.load(t)}" for t in X]
    step += K.product_block(SB, by_node)
    step += ["# the rest of the step"] + K.body() + K.new_states()
    for t, o in zip(Y, lay.outputs):
        step.append(K.store(t, K.output_value(o)))
    step.append("# the new state's block, for every program's next step")
    for j, (t, st) in enumerate(zip(SB, lay.states)):
        if st.write is not None:
            step += [f"tl.store(base_{t.name} + nxt * {t.name}_s0 + off_{t.name}, n{j}, mask=msk_{t.name})",
                     f"v{st.read} = n{j}"]
    step += [f"base_{t.name} += {K.step_stride(t)}" for t in X + Y]
    bwd, bwd_ts, why_bwd = _backward(K, X, P, SB, by_node, vec)
    fragments = {"SOURCE": comment(Path(rec.filename).name), "NAME": comment(rec.name),
                 "AXIS": str(A), "HELPERS": op_helpers(), "ARGS": K.arg_lines(ts),
                 "GRID_ARGS": "".join(f"NG{c}, " for c in K.grid), "CONST_ARGS": const,
                 "PROLOGUE": pro, "START": start, "STEP": step, "BWD_ARGS": K.arg_lines(bwd_ts), **bwd}
    text = _fill((TEMPLATES / "wide.py.tmpl").read_text(), fragments)
    return Wide(text, "", A, products, ts, [t.node for t in P], K.grid, sorted(lay.size),
                bwd_ts, why_bwd)


def _backward(K: _WideKernels, X, P, SB, mats: dict, vec: list) -> tuple:
    """(template fragments of `wide_backward`, its Tensor arguments, why it cannot run or "").
    A step, in reverse: the state's adjoint is LAM (left by the step after) plus the products'
    transposes over GP of the step after; the step is recomputed from the history (SB); the
    adjoints of the rest of the step go back as in the fused backward, except that a product's
    adjoint is stored in GP (its matrix's and its state's shares are taken from there)."""
    lay, rec, A = K.lay, K.rec, K.A
    why = ""
    if any(not isinstance(rec.node(n), ir.Const) for n in K.invariant):
        why = "the step computes values from params alone"
    for n in lay.streams + [t.node for t in vec] + [o.node for o in lay.outputs] + [s.read for s in lay.states]:
        if len(rec.attr(n, "shape")) != 1 or lay.classes_of(n) != {A}:
            why = why or "a value it reads or writes is not a vector along the recurrent axis"
    if any(len(rec.attr(pr.param, "shape")) != 2 for pr in K.products):
        why = why or "a recurrent matrix has more than two axes"
    DY = [Tensor(f"DY{j}", o.node, ("B", "T"), store=True) for j, o in enumerate(lay.outputs)]
    LAM = [Tensor(f"LAM{j}", st.read, ("B",)) for j, st in enumerate(lay.states)]
    GP = [Tensor(f"GP{k}", pr.node, ("S", "B")) for k, pr in enumerate(K.products)]
    DX = [Tensor(f"DX{j}", t.node, ("B", "T")) for j, t in enumerate(X)]
    DP = [Tensor(f"DP{j}", t.node, ("S",)) for j, t in enumerate(vec)]
    ts = X + P + SB + DY + LAM + GP + DX + DP
    start = ["# gradient accumulators of the params read whole (the matrices' come from GP)"]
    start += [f"ga{t.node} = tl.zeros({shape_of(K.entries(t.node))}, tl.float32)" for t in vec]
    for t in SB + LAM + GP:
        start += K.access(t, "0")
    for t in X + DY + DX:
        start += K.access(t) + [f"base_{t.name} += (t1 - 1).to(tl.int64) * {K.step_stride(t)}"]
    step = ["# the adjoint of the state after step t: its block in LAM, plus the products' transposes"]
    for j, (t, st) in enumerate(zip(LAM, lay.states)):
        step.append(f"gs{st.read} = {full(K.load(t), K.entries(st.read))}")
    for pr, gt in sorted(zip(K.products, GP), key=lambda pg: pg[0].state):  # stable: by state
        read, g, m = lay.states[pr.state].read, gt.name, mats[pr.param]
        step += K.column_tiles() + [
                     f"    gk = tl.load(base_{g} + (t + 1) * {g}_s0 + ob[:, None] * {g}_s1 + ok[None, :] * {g}_s2, "
                     "mask=mb[:, None] & mk[None, :], other=0.0, cache_modifier=\".cg\")",
                     f"    w = tl.load(wbase_{m} + ok[:, None] * {m}_s{pr.out_axis} + o{A}[None, :] * {m}_s{pr.sum_axis}, "
                     f"mask=mk[:, None] & m{A}[None, :], other=0.0)",
                     f"    gs{read} += (tl.dot(gk, w, input_precision=DOT_PREC) "
                     f"if BLK_B >= 16 and BLK{A} >= 16 and BK >= 16 "
                     "else tl.sum(gk[:, :, None] * w[None, :, :], axis=1))"]
    step += ["# recompute step t from the state before it"]
    step += [f"v{t.node} = {K.slot_load(t, 't')}" for t in SB]
    step += [f"v{t.node} = {K.load(t)}" for t in X]
    step += K.product_block(SB, mats, slot="t") + K.body()
    step.append("# adjoints, in reverse order of the step")
    adj = Adjoints(rec, [t.node for t in vec])
    stored = {pr.node: f"tl.store(base_{g.name} + t * {g.name}_s0 + off_{g.name}, g{pr.node}, mask=msk_{g.name})"
              for pr, g in zip(K.products, GP)}
    step += K.step_adjoints(adj, DY, K.load, X, DX, stored)
    step.append("# the rest of the adjoint of the state before step t, for the next launch")
    for t, st in zip(LAM, lay.states):
        E = K.entries(st.read)
        new = full(f"g{st.read}", E) if st.read in adj.assigned else f"tl.zeros({shape_of(E)}, tl.float32)"
        if st.write is None:
            new = f"gs{st.read} + {new}"
        step.append(K.store(t, new))
    step += [f"base_{t.name} -= {K.step_stride(t)}" for t in X + DY + DX]
    end = ["# the params' gradients: this program's block, added to what earlier launches left"]
    for t in DP:
        end += K.access(t, "pid_b") + [K.store(t, f"{K.load(t)} + ga{t.node}")]
    return {"BWD_START": start, "BWD_STEP": step, "BWD_END": end}, ts, why
