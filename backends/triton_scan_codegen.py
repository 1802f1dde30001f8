"""Code generation for the Triton backend's time-chunked scan kernel (diagonal recurrences).

When every state is updated elementwise, h' = a * h + b with a and b free of the state (the
`elementwise_scan` plan), the time loop of the fused kernel is latency-bound: each step waits
for the last. This kernel instead takes BLK_T steps at a time:

    inputs      [BLK_T, ...]   loaded per chunk (masked past T)
    a, b        [BLK_T, *state tile]   from the affine normal form (`StateFacts.terms`)
    (A, B)      = tl.associative_scan over time of the affine maps
    new states  h_t = A_t * carry + B_t;  carry = the chunk's last row
    outputs     every remaining expression of the step, for the whole chunk

The tiles are the fused kernel's (`triton_codegen.Layout`) with one change: the leading
`b` axis, which there is a block of batch rows, is the chunk's time axis here, and a program
owns one batch row and a block of one parallel axis (as the fused kernel does without a
recurrent matrix product). Generated text names that axis `ot` / `mt` / `BLK_T`.

Entry point: `generate(gen, rec, analysis) -> Scan` (`Scan.source` is None, with `Scan.why`,
when the spec has no such kernel). The kernel takes the fused `forward`'s arguments
(`Generated.fwd`) plus the constexpr BLK_T, and writes the same state history.

Training: `_scan_backward` (template `scan_bwd.py.tmpl`) takes the fused `backward`'s
arguments (`Generated.bwd`) and walks the chunks from the last to the first. The adjoint of
h_t = a_t * h_{t-1} + b_t is a recurrence in reverse time,

    lam_t = g_t + a_{t+1} * lam_{t+1}     (lam_t = dL/dh_t, g_t its direct part)

so per chunk it recomputes every value of the step for all BLK_T steps from the stored
history, propagates the outputs' gradients back to the new state (g), composes the maps
mu -> a * (g + mu) with the forward's `_affine_prev` scan, and back-propagates lam through the
rest of the step with the fused emitter's `vjp`. mu_t = a_t * lam_t is the gradient of the state
before step t; lam_t = g_t + mu_{t+1} is g plus the composition up to the step after, which
`_affine_prev` yields beside the inclusive one. The tiles' rows run backward in time (row r is
step t + BLK_T - 1 - r), so this forward scan over rows is a reverse scan over time
(`tl.associative_scan(reverse=True)` is not used: Triton has an open report of wrong results
for non-commutative combines with it in compiled code). What crosses a chunk boundary is mu of
the chunk's first step (dL/dh0 after the first chunk); the final state's gradient starts it.
`Scan.backward` says whether it exists, `Scan.why_backward` why not: it needs each state's
update to read no other state (one stratum) and nothing but the update to read a state's value
before the step; other specs train through the fused `backward` kernel, which is always correct.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import networkx as nx

from rnnc import ir

from .triton_codegen import (TEMPLATES, Adjoints, Tensor, Unsupported, _fill, _Kernels, _unit, align,
                             const_text, expand, full, mask, shape_of)


@dataclass
class Scan:
    source: str | None           # the kernel text, appended to the fused module (None: no kernel)
    why: str = ""                # why there is none
    layout: object = None        # the tile layout (batch_kept: tiles lead with the time chunk)
    kept: list = field(default_factory=list)   # classes with a tile axis (BLK<c>)
    grid: list = field(default_factory=list)   # parallel classes the grid runs over
    backward: bool = False       # whether `_scan_backward` (the reverse scan) is generated
    why_backward: str = ""       # why not (training then runs the fused `backward`)
    splits: dict = field(default_factory=dict)  # `_scan_backward`'s sink tensor -> grid dims it lacks


def _kept_parallel(lay):
    """The parallel class to tile: the innermost one of the first state (or output) with one."""
    for st in list(lay.states) + list(lay.outputs):
        node = st.read if hasattr(st, "read") else st.node
        for k in reversed(range(len(st.shape))):
            c = lay.cls.get((node, k))
            if c in lay.parallel:
                return c
    return None


_RENAME = [(re.compile(r"\bBLK_B\b"), "BLK_T"), (re.compile(r"\bob\b"), "ot"), (re.compile(r"\bmb\b"), "mt")]


def _rename(lines: list) -> list:
    """The shared emitter names the leading tile axis as a batch block; here it is time. Only
    code is renamed: comments may quote the spec."""
    out = []
    for line in lines:
        code, hash_, note = line.partition("#")
        for pat, new in _RENAME:
            code = pat.sub(new, code)
        out.append(code + hash_ + note)
    return out


class _ScanKernels(_Kernels):
    def __init__(self, lay, rec, analysis, reverse: bool = False):
        super().__init__(lay)
        self.reverse = reverse  # the tiles' rows run backward in time (the reverse scan)
        by_name = {s.name: s for s in analysis.states}
        order = {name: k for k, name in enumerate(analysis.strata)}
        self.order = sorted(range(len(lay.states)), key=lambda j: order.get(lay.states[j].name, j))
        self.facts = [by_name[s.name] for s in lay.states]
        self.arg_of = {rec.node(st.write).arg: j for j, st in enumerate(lay.states)}
        self.read_of = {st.read: j for j, st in enumerate(lay.states)}

    def batch_offsets(self) -> list:
        # the tiles' leading axis is the chunk's steps (its mask mb is set per chunk); the
        # backward reads them last step first
        if self.reverse:
            return ["ob = (BLK_B - 1 - tl.arange(0, BLK_B)).to(tl.int64)"]
        return ["ob = tl.arange(0, BLK_B).to(tl.int64)"]

    def static(self, node) -> list:
        return [e for e in self.entries(node) if e != "b"]

    def tile(self, t: Tensor) -> list:
        return (["b"] if "T" in t.lead else []) + self.static(t.node)

    def address(self, t: Tensor, E: list, split_expr=None) -> tuple:
        """(scalar base, offset tile, static mask or None) of tensor t read as tile E; a time
        axis in E adds the chunk's steps (the base walks from chunk to chunk); a split axis
        (gradient slices) takes `split_expr`."""
        n, strides = len(E), self.strides(t)
        base, terms = [t.name], []
        for d, L in enumerate(t.lead):
            if L == "S" and split_expr is not None:
                base.append(f"({split_expr}) * {strides[d]}")
            elif L == "B":
                base.append(f"pid_b * {strides[d]}")
            elif L == "T" and "b" in E:
                terms.append(f"{expand('ob', E.index('b'), n)} * {strides[d]}")
        lead = len(t.lead)
        for k, size in enumerate(self.rec.attr(t.node, "shape")):
            if _unit(size):
                continue
            c = self.lay.cls[(t.node, k)]
            at = [p for p, e in enumerate(E) if e != "b" and e[0] == k]
            if at:
                terms.append(f"{expand(f'o{c}', at[0], n)} * {strides[lead + k]}")
            else:
                base.append(f"pid{c} * {strides[lead + k]}")
        msk = " & ".join(expand(mask(e), p, n) for p, e in enumerate(E) if e != "b") or None
        return " + ".join(base), " + ".join(terms) or "0", msk

    def access(self, t: Tensor, split_expr=None) -> list:
        base, off, msk = self.address(t, self.tile(t), split_expr)
        return [f"base_{t.name} = {base}", f"off_{t.name} = {off}", f"msk_{t.name} = {msk}"]

    def chunk_mask(self, t: Tensor) -> str:
        """The mask of a time-tiled tensor in this chunk: its static mask and `mb`."""
        E = self.tile(t)
        _, _, msk = self.address(t, E)
        m = expand("mb", 0, len(E))
        return f"msk_{t.name} = {m} & {msk}" if msk else f"msk_{t.name} = {m}"

    # --- the coefficients a and b of state j, as tiles over its time-led entries -------------
    def coefficient(self, j, state_term: bool) -> str:
        st = self.lay.states[j]
        E = self.entries(st.read)
        parts = []
        for term in self.facts[j].terms:
            if (term.state is not None) != state_term:
                continue
            if term.state is not None and (term.state[0] != "old" or tuple(term.state[1]) != tuple(term.out)):
                raise Unsupported(f"state {st.name}: a term that is not diagonal in the state")
            num, den = [], []
            for f in term.factors:
                node = self.rec.node(f.node)
                if isinstance(node, ir.Const):
                    x = const_text(node.value)
                else:
                    pos = []
                    for e in self.entries(f.node):
                        if e == "b":
                            pos.append(E.index("b"))
                            continue
                        label = f.labels[e[0]]
                        k = term.out.index(label) if label in term.out else None
                        at = [p for p, e2 in enumerate(E) if e2 != "b" and e2[0] == k]
                        if not at:
                            raise Unsupported(f"state {st.name}: a coefficient sums over an axis")
                        pos.append(at[0])
                    if len(set(pos)) != len(pos):
                        raise Unsupported(f"state {st.name}: a coefficient reads a diagonal")
                    x = align(self.v(f.node), pos, len(E))
                if f.power == 1:
                    num.append(x)
                elif f.power == -1:
                    den.append(x)
                else:
                    raise Unsupported(f"state {st.name}: a coefficient factor to the power {f.power}")
            expr = " * ".join(num) or "1.0"
            if den:
                expr = f"({expr}) / " + " / ".join(f"({x})" for x in den)
            if term.scale != 1.0:
                expr = f"{const_text(term.scale)} * ({expr})"
            parts.append(f"({expr})")
        return full(" + ".join(parts) if parts else ("0.0"), E)

    def factors(self, j) -> set:
        return {f.node for term in self.facts[j].terms for f in term.factors
                if not isinstance(self.rec.node(f.node), ir.Const)}

    # --- what the chunk computes, in an order that respects the scans -------------------------
    def plan(self) -> tuple:
        """(loop nodes to compute, states whose value before each step is read)."""
        rec, lay = self.rec, self.lay
        known = set(lay.streams) | set(lay.params) | set(self.invariant)
        loop = set(self.loop)
        roots = [rec.node(o.node).arg for o in lay.outputs]
        for j in range(len(lay.states)):
            roots += sorted(self.factors(j))
        need, hold, stack = set(), set(), list(roots)
        while stack:
            n = stack.pop()
            if n in need or n in known or isinstance(rec.node(n), ir.Const):
                continue
            need.add(n)
            if n in self.arg_of:
                continue  # the scan gives the new state
            if n in self.read_of:
                hold.add(self.read_of[n])
                continue
            if n not in loop:
                raise Unsupported(f"a value the scan needs (node {n}) is not computed by the step")
            stack.extend(ir.operands(rec.node(n)))
        return sorted(n for n in need if n in loop and n not in self.arg_of), hold

    def scan(self, j, hold: bool) -> list:
        st = self.lay.states[j]
        E = self.entries(st.read)
        n = len(E)
        arg = self.rec.node(st.write).arg
        if self.entries(arg) != E:
            raise Unsupported(f"state {st.name}: its new value is tiled unlike the state")
        valid = expand("mb", 0, n)
        carry = align(f"cs{j}", list(range(1, n)), n)
        lines = [f"# state {j}: the chunk's coefficients (steps past T keep the state)",
                 f"ca{j} = tl.where({valid}, {self.coefficient(j, True)}, 1.0)",
                 f"cb{j} = tl.where({valid}, {self.coefficient(j, False)}, 0.0)"]
        if hold:
            lines += [f"cc{j} = tl.full({shape_of(E)}, 1.0, tl.float32)",
                      f"cd{j} = tl.zeros({shape_of(E)}, tl.float32)",
                      f"ca{j}, cb{j}, cc{j}, cd{j} = tl.associative_scan((ca{j}, cb{j}, cc{j}, cd{j}), 0, _affine_prev)",
                      f"v{st.read} = cc{j} * {carry} + cd{j}"]
        else:
            lines.append(f"ca{j}, cb{j} = tl.associative_scan((ca{j}, cb{j}), 0, _affine)")
        lines += [f"v{arg} = ca{j} * {carry} + cb{j}{self.note(arg)}",
                  f"cs{j} = tl.sum(tl.where({expand('ob', 0, n)} == BLK_B - 1, v{arg}, 0.0), axis=0)"]
        return lines

    def chunk_body(self) -> list:
        nodes, hold = self.plan()
        rec, lay = self.rec, self.lay
        avail = set(lay.streams) | set(lay.params) | set(self.invariant)
        ready = lambda n: all(a in avail or isinstance(rec.node(a), ir.Const)  # noqa: E731
                              for a in ir.operands(rec.node(n)))
        lines, pending, todo = [], list(nodes), list(self.order)
        while pending or todo:
            progress = False
            for j in list(todo):
                if self.factors(j) <= avail:
                    lines += self.scan(j, j in hold)
                    avail |= {lay.states[j].read, rec.node(lay.states[j].write).arg}
                    todo.remove(j)
                    progress = True
            rest = []
            for n in pending:
                if ready(n):
                    lines += self.fwd(n)
                    avail.add(n)
                    progress = True
                else:
                    rest.append(n)
            pending = rest
            if not progress:
                raise Unsupported("the states' coefficients depend on each other within a step")
        return lines


def generate(gen, rec, analysis) -> Scan:
    """The scan kernel for a recurrence whose states are all diagonal, or why there is none."""
    if analysis.plan != "elementwise_scan":
        return Scan(None, f"the plan is {analysis.plan}, not elementwise_scan")
    facts = {s.name: s for s in analysis.states}
    for st in rec.states:
        f = facts.get(st.name)
        if f is None or f.method != "elementwise" or st.write is None:
            return Scan(None, f"state {st.name} is not updated elementwise")
    lay = replace(gen.layout, batch_kept=True, kept_parallel=_kept_parallel(gen.layout))
    try:
        K = _ScanKernels(lay, rec, analysis)
        scan = Scan(_source(K, gen), "", lay, K.kept, K.grid)
    except Unsupported as e:
        return Scan(None, str(e))
    try:
        KB = _ScanKernels(lay, rec, analysis, reverse=True)
        text, splits = _backward_source(KB, gen, analysis)
    except Unsupported as e:
        scan.why_backward = e.message
        return scan
    scan.source += text
    scan.backward, scan.splits = True, splits
    return scan


def _source(K: _ScanKernels, gen) -> str:
    lay, rec = K.lay, K.rec
    X, P, H0, Y, HT, HS = _split(gen.fwd, len(lay.streams), len(lay.params), len(lay.states),
                                 len(lay.outputs))
    timed = X + Y + HS

    const = K.const_lines()

    pro = K.prologue(P)

    start = ["# initial state, carried from chunk to chunk"]
    for j, t in enumerate(H0):
        start += K.access(t) + [f"cs{j} = {full(K.load(t), K.static(t.node))}"]
    for t in timed:
        start += K.access(t)[:2]
    start.append("if STORE_HIST:  # hist[0]: the state before the first step")
    for j, t in enumerate(HS):
        base, off, msk = K.address(t, K.static(t.node))
        start.append(f"    tl.store({base} + {off}, cs{j}" + (f", mask={msk})" if msk else ")"))
        start.append(f"    base_{t.name} += {K.step_stride(t)}")
    start.append("    pass")

    chunk = ["mb = ob < T - t"] + [K.chunk_mask(t) for t in timed]
    chunk += ["# this chunk's inputs"] + [f"v{t.node} = {K.load(t)}" for t in X]
    chunk += ["# the chunk"] + K.chunk_body()
    for t, o in zip(Y, lay.outputs):
        chunk.append(K.store(t, K.output_value(o)))
    chunk.append("if STORE_HIST:  # hist[t + 1]: the state after step t")
    for t, st in zip(HS, lay.states):
        arg = rec.node(st.write).arg
        E = K.tile(t)
        chunk.append("    " + K.store(t, full(align(K.v(arg), K.pos(arg, E), len(E)), E)))
    chunk.append("    pass")
    chunk += [f"base_{t.name} += BLK_B * {K.step_stride(t)}" for t in timed]

    end = ["# final state"]
    for j, t in enumerate(HT):
        end += K.access(t) + [K.store(t, f"cs{j}")]

    fragments = {"FWD_ARGS": K.arg_lines(gen.fwd), "GRID_ARGS": "".join(f"NG{c}, " for c in K.grid),
                 "CONST_ARGS": const, "PROLOGUE": _rename(pro), "START": _rename(start),
                 "CHUNK": _rename(chunk), "END": _rename(end)}
    return _fill((TEMPLATES / "scan.py.tmpl").read_text(), fragments)


def _reverse_scan_blockers(K: _ScanKernels, analysis) -> str | None:
    """Why the reverse scan does not differentiate this spec (None when it does). Each state's
    lam is a scan of its own: its update reads no other state (one stratum; a state that read
    another's value before the step would send it a gradient one step late), and nothing but
    its update reads its value before the step (an output that does adds a gradient one step
    late, which the scan does not carry)."""
    rec, lay = K.rec, K.lay
    g = rec.graph
    for f in analysis.states:
        if f.depends_on:
            return (f"state {f.name}'s update reads {', '.join(f.depends_on)} (several strata): "
                    "not covered by the reverse scan yet")
    args = [rec.node(st.write).arg for st in lay.states]
    if len(set(args)) != len(args):
        return "two states take the same new value"
    loop = set(K.loop)
    for j, st in enumerate(lay.states):
        if args[j] not in loop:
            return f"state {st.name}'s new value is not computed by the step"
        anc = nx.ancestors(g, args[j])
        for k, other in enumerate(lay.states):
            if k != j and (other.read in anc or args[k] in anc):
                return f"state {st.name}'s update reads state {other.name} (several strata)"
        sinks = {o.node for o in lay.outputs} | {s.write for k, s in enumerate(lay.states) if k != j}
        if nx.descendants(g.subgraph(n for n in g.nodes if n != args[j]), st.read) & sinks:
            return (f"a value reads state {st.name} before its update (an old-state readout): its "
                    "gradient enters the reverse recurrence one step late")
    return None


def _backward_source(K: _ScanKernels, gen, analysis) -> tuple:
    """(text of `_scan_backward`, its splits): the adjoint of the chunked scan, by a scan of
    the adjoint recurrence in reverse time. Raises Unsupported where the spec is outside it."""
    why = _reverse_scan_blockers(K, analysis)
    if why:
        raise Unsupported(why)
    lay, rec = K.lay, K.rec
    nx_, np_, ns = len(lay.streams), len(lay.params), len(lay.states)
    cuts = [nx_, np_, ns, len(lay.outputs), ns, nx_, np_, ns]
    parts, k = [], 0
    for n in cuts:
        parts.append(gen.bwd[k:k + n])
        k += n
    X, P, HS, DY, DHT, DX, DP, DH0 = parts
    timed = X + HS + DY + DX
    arg_of = {rec.node(st.write).arg: j for j, st in enumerate(lay.states)}

    const = K.const_lines()

    def seed(t):  # a value replicated along a grid axis takes its gradient in one program
        lacking = [c for c in K.grid if c not in lay.classes_of(t.node)]
        value = K.load(t)
        if lacking:
            value = f"tl.where({' & '.join(f'(pid{c} == 0)' for c in lacking)}, {value}, 0.0)"
        return value

    splits = {}
    start = ["# gradient accumulators for params and the values computed from them"]
    acc_nodes = [t.node for t in P] + K.invariant
    for n in acc_nodes:
        E = K.entries(n)
        start.append(f"ga{n} = tl.zeros({shape_of(E)}, tl.float32)" if E else f"ga{n} = tl.zeros((), tl.float32)")
    start.append("# carried from chunk to chunk: the gradient of the state before the later chunk")
    for j, t in enumerate(DHT):
        start += K.access(t) + [f"cl{j} = {full(seed(t), K.static(t.node))}"]
    for t in X + HS + DY:
        start += K.access(t)[:2]
    for t in DX:
        lacking, expr = K.split(t, True)
        splits[t.name] = lacking
        start += K.access(t, expr)[:2]
    start.append("# start at the last chunk")
    start += [f"base_{t.name} += ((T - 1) // BLK_B * BLK_B).to(tl.int64) * {K.step_stride(t)}" for t in timed]

    chunk = ["t = (T - 1) // BLK_B * BLK_B - tt", "mb = ob < T - t"] + [K.chunk_mask(t) for t in timed]
    chunk += ["# recompute the chunk's steps from the states before them"]
    chunk += [f"v{t.node} = {K.load(t)}" for t in HS + X]
    chunk += K.body()
    chunk.append("# adjoints, in reverse order of the step")
    adj = Adjoints(rec, acc_nodes)
    assigned, accumulate = adj.assigned, adj.add
    for j, (t, o) in enumerate(zip(DY, lay.outputs)):
        chunk.append(f"dy{j} = {seed(t)}")
        arg = rec.node(o.node).arg
        SE = K.store_entries(o.node)
        accumulate(arg, K.reduce_to(f"dy{j}", SE, K.pos(arg, SE)), chunk)
    for i in reversed(K.loop):
        if i in arg_of:
            chunk += _adjoint_scan(K, arg_of[i], i, i in assigned)
            assigned.add(i)
        if i not in assigned:
            continue
        chunk.append(f"g{i} = {full(f'g{i}', K.entries(i))}")
        lines, contrib = K.vjp(i)
        chunk += lines
        for a, expr in contrib:
            accumulate(a, expr, chunk)
    for t, dx in zip(X, DX):
        if t.node in assigned:
            chunk.append(K.store(dx, full(f"g{t.node}", K.tile(dx))))
    chunk += [f"base_{t.name} -= BLK_B * {K.step_stride(t)}" for t in timed]

    end = ["# gradient of the initial state"]
    for j, t in enumerate(DH0):
        lacking, expr = K.split(t, True)
        splits[t.name] = lacking
        end += K.access(t, expr) + [K.store(t, f"cl{j}")]
    end.append("# through the values computed from params alone")
    for i in reversed(K.invariant):
        lines, contrib = K.vjp_invariant(i)
        end += lines
        for a, expr in contrib:
            accumulate(a, expr, end)
    end.append("# param gradients (one slice per program; the runner sums the slices)")
    for t in DP:
        lacking, expr = K.split(t, False)
        splits[t.name] = lacking
        end += K.access(t, expr) + [K.store(t, f"ga{t.node}")]

    fragments = {"BWD_ARGS": K.arg_lines(gen.bwd), "GRID_ARGS": "".join(f"NG{c}, " for c in K.grid),
                 "CONST_ARGS": const, "PROLOGUE": _rename(K.prologue(P)), "START": _rename(start),
                 "CHUNK": _rename(chunk), "END": _rename(end)}
    return _fill((TEMPLATES / "scan_bwd.py.tmpl").read_text(), fragments), splits


def _adjoint_scan(K: _ScanKernels, j: int, arg: int, direct: bool) -> list:
    """Lines that turn g<arg>, the direct gradient of state j's new value over the chunk, into
    lam, its whole gradient, and update the carry cl<j>. Row r of the tiles is step
    t + BLK_T - 1 - r, so composing rows in order runs time backward: row r maps the gradient
    of the state before the previous row (mu, entering as the carry at row 0) to its own,
    mu -> a * (g + mu); lam of a row is g plus the composition of the rows before it."""
    st = K.lay.states[j]
    E = K.entries(st.read)
    n = len(E)
    if K.entries(arg) != E:
        raise Unsupported(f"state {st.name}: its new value is tiled unlike the state")
    valid = expand("mb", 0, n)
    carry = align(f"cl{j}", list(range(1, n)), n)
    g = full(f"g{arg}", E) if direct else f"tl.zeros({shape_of(E)}, tl.float32)"
    return [f"# state {j}: the gradient of its new value, by a scan in reverse time (steps past T pass it on)",
            f"cg{j} = tl.where({valid}, {g}, 0.0)",
            f"ca{j} = tl.where({valid}, {K.coefficient(j, True)}, 1.0)",
            f"cb{j} = ca{j} * cg{j}",
            f"cc{j} = tl.full({shape_of(E)}, 1.0, tl.float32)",
            f"cd{j} = tl.zeros({shape_of(E)}, tl.float32)",
            f"ca{j}, cb{j}, cc{j}, cd{j} = tl.associative_scan((ca{j}, cb{j}, cc{j}, cd{j}), 0, _affine_prev)",
            f"g{arg} = cg{j} + cc{j} * {carry} + cd{j}",
            f"cl{j} = tl.sum(tl.where({expand('ob', 0, n)} == 0, ca{j} * {carry} + cb{j}, 0.0), axis=0)"]


def _split(ts, nx, np_, ns, no):
    """The fused forward's tensors: streams, params, initial, outputs, final, history."""
    cuts = [nx, np_, ns, no, ns, ns]
    out, k = [], 0
    for n in cuts:
        out.append(ts[k:k + n])
        k += n
    return out
