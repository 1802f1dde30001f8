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
(`Generated.fwd`) plus the constexpr BLK_T, and writes the same state history, so the fused
`backward` kernel serves both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from rnnc import ir

from .triton_codegen import (TEMPLATES, Tensor, Unsupported, _fill, _Kernels, _unit, align,
                             const_text, expand, full, mask, shape_of)


@dataclass
class Scan:
    source: str | None           # the kernel text, appended to the fused module (None: no kernel)
    why: str = ""                # why there is none
    layout: object = None        # the tile layout (batch_kept: tiles lead with the time chunk)
    kept: list = field(default_factory=list)   # classes with a tile axis (BLK<c>)
    grid: list = field(default_factory=list)   # parallel classes the grid runs over


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
    def __init__(self, lay, rec, analysis):
        super().__init__(lay)
        by_name = {s.name: s for s in analysis.states}
        order = {name: k for k, name in enumerate(analysis.strata)}
        self.order = sorted(range(len(lay.states)), key=lambda j: order.get(lay.states[j].name, j))
        self.facts = [by_name[s.name] for s in lay.states]
        self.arg_of = {rec.node(st.write).arg: j for j, st in enumerate(lay.states)}
        self.read_of = {st.read: j for j, st in enumerate(lay.states)}

    def batch_offsets(self) -> list:
        # the tiles' leading axis is the chunk's steps (its mask mb is set per chunk)
        return ["ob = tl.arange(0, BLK_B).to(tl.int64)"]

    def static(self, node) -> list:
        return [e for e in self.entries(node) if e != "b"]

    def tile(self, t: Tensor) -> list:
        return (["b"] if "T" in t.lead else []) + self.static(t.node)

    def address(self, t: Tensor, E: list) -> tuple:
        """(scalar base, offset tile, static mask or None) of tensor t read as tile E; a time
        axis in E adds the chunk's steps (the base walks from chunk to chunk)."""
        n, strides = len(E), self.strides(t)
        base, terms = [t.name], []
        for d, L in enumerate(t.lead):
            if L == "B":
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
        base, off, msk = self.address(t, self.tile(t))
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
        return Scan(_source(K, gen), "", lay, K.kept, K.grid)
    except Unsupported as e:
        return Scan(None, str(e))


def _source(K: _ScanKernels, gen) -> str:
    lay, rec = K.lay, K.rec
    X, P, H0, Y, HT, HS = _split(gen.fwd, len(lay.streams), len(lay.params), len(lay.states),
                                 len(lay.outputs))
    timed = X + Y + HS

    def args(ts):
        out = [", ".join(t.name for t in ts) + ","] if ts else []
        return out + [", ".join(K.strides(t)) + "," for t in ts]

    const = [", ".join(f"SZ{c}: tl.constexpr" for c in sorted(lay.size)),
             ", ".join(f"BLK{c}: tl.constexpr" for c in K.kept)]
    const = [x + "," for x in const if x]

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

    fragments = {"FWD_ARGS": args(gen.fwd), "GRID_ARGS": "".join(f"NG{c}, " for c in K.grid),
                 "CONST_ARGS": const, "PROLOGUE": _rename(pro), "START": _rename(start),
                 "CHUNK": _rename(chunk), "END": _rename(end)}
    return _fill((TEMPLATES / "scan.py.tmpl").read_text(), fragments)


def _split(ts, nx, np_, ns, no):
    """The fused forward's tensors: streams, params, initial, outputs, final, history."""
    cuts = [nx, np_, ns, no, ns, ns]
    out, k = [], 0
    for n in cuts:
        out.append(ts[k:k + n])
        k += n
    return out
