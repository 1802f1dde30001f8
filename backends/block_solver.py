"""The block solver shared by the backends that run associative plans in parallel over time.

Time is cut into blocks. Per block:
1. hoisted work runs once over the block's B*L positions (so s6's [T, D, N] decay exists
   only block by block);
2. states are solved in dependency order (the analysis's strata): max-plus and elementwise
   states with a parallel scan, materialised per step; dense ones with a scan of matrix
   products; matrix states (chunked plans) are never materialised per step: only their
   readouts (o = q^T S) come out of the chunk form, and the state is carried between blocks;
3. the rest of the step's graph runs vectorised over B*L with those values.
Coefficients come from the affine normal form (`rnnc.affine`), evaluated exactly by einsum.

The numerical primitives are a parameter: the scan backend passes `scan_kernels` (PyTorch),
the Triton backend the same table with its generated chunk kernels in place of the
PyTorch chunk forms. This module is a library for backends, not a backend itself.
"""
from __future__ import annotations

import math

import networkx as nx
import torch

from rnnc import interpret, ir
from rnnc.affine import Factor, Term, eval_terms, state_labels as _labels
from rnnc.errors import RnncError
from rnnc.ir import Op

from .scan_kernels import _needs_grad, _shares  # tensor predicates, not the kernels table

LOW_PRECISION = (torch.bfloat16, torch.float16)  # inputs the chunk kernels read as they are
NO_DECAY = -1e4        # the log-decay the chunk forms get for a state that reads no old value
DENSE_LIMIT = 2 ** 28  # elements of the per-chunk transition matrices A_t, [B, L, n, n]


def _first_poisoned(kin: dict) -> tuple:
    """(t0, cleaned inputs) for a block's chunk-form inputs [B, L, ...]: t0 is the first step
    with a NaN or inf (None when there is none; a log-decay may be -inf, an exact zero
    decay, which the chunk forms handle), and the cleaned inputs have those entries zeroed."""
    # One sum per input first: a NaN or an infinity always makes its sum non-finite, so a
    # finite sum clears the whole input in one cheap pass (an overflowing sum of finite
    # values, or a -inf log-decay, only sends the block to the exact check below).
    live = [x for x in kin.values() if x is not None]
    if live and bool(torch.isfinite(torch.stack([x.sum() for x in live])).all()):
        return None, kin
    bad = {n: (torch.isnan(x) | (x == math.inf)) if n.startswith("log") else ~torch.isfinite(x)
           for n, x in kin.items() if x is not None}
    steps = None
    for b in bad.values():
        s = b.reshape(*b.shape[:2], -1).any(-1).any(0)
        steps = s if steps is None else steps | s
    if steps is None or not bool(steps.any()):
        return None, kin
    clean = {n: (x if x is None else torch.where(bad[n], 0.0, x)) for n, x in kin.items()}
    if kin.get("w") is not None and kin["w"] is kin.get("p"):
        clean["w"] = clean["p"]  # the kernel's fast path for w = p, as without the NaN
    return int(steps.nonzero()[0]), clean


def _solver_terms(f) -> list:
    """Every normal-form term the solver reads for one state: its update, its readouts and
    its max-plus terms."""
    terms = list(f.terms) + [t for ts in f.readouts.values() for t in ts]
    return terms + list(f.maxplus[0]) if f.maxplus is not None else terms


def _coef(t: Term) -> Term:
    """The coefficient of a state term: the same term with the state dropped."""
    return Term(t.scale, t.factors, None, t.out)


def _small_first(terms) -> list:
    """terms with each product's factors ordered by their axes, fewest first. einsum multiplies
    left to right, so factors over the same axes meet before the product grows: s6's input
    dt[d] * B[n] * x[d] costs one pass over [B*L, D, N] instead of two."""
    return [Term(t.scale, tuple(sorted(t.factors, key=lambda fc: (len(fc.labels), fc.labels))),
                 t.state, t.out) for t in terms]


class _Unfit(Exception):
    """A stream's leaf does not fit the chunk kernels' layout."""


class _Delta:
    """A delta-rule state's update alpha (S - w (r^T S)) + p v^T in the chunk kernels' terms:
    r (the factors of the low-rank term carrying the contracted key axis, over r's labels),
    w (the others, scaled), cancel (alpha taken out of the low-rank term exactly, so w holds
    no alpha) and same (w and p the same product: DeltaNet's beta*k)."""

    def __init__(self, lay):
        labels = lay.labels
        low = lay.low[0]
        x = low.state[1][lay.key]
        alpha_nodes = sorted(fc.node for t in lay.diag for fc in t.factors)
        factors = list(low.factors)
        self.cancel = len(lay.diag) == 1 and all(
            any(fc.node == a for fc in factors) for a in alpha_nodes)
        if self.cancel:  # alpha * (S - w r^T S): take alpha out of the low-rank term exactly
            for a in alpha_nodes:
                factors.remove(next(fc for fc in factors if fc.node == a))
        rf = tuple(fc for fc in factors if x in fc.labels)
        wf = tuple(fc for fc in factors if x not in fc.labels)
        scale = -low.scale / (lay.diag[0].scale if self.cancel else 1.0)
        r_labels = tuple(x if k == lay.key else labels[k] for k in range(len(labels)))
        self.r = Term(1.0, rf, None, r_labels)
        self.w = Term(scale, wf, None, labels)
        key = labels[lay.key]
        self.same = lay.input is not None and self.cancel and scale == lay.input.scale and sorted(
            (fc.node, fc.power) for fc in wf) == sorted(
            (fc.node, fc.power) for fc in lay.input.factors if key in fc.labels)


class _Chunked:
    """How one matrix state maps to the chunk kernels: axis groups and term pieces."""

    def __init__(self, rec, facts):
        self.facts = facts
        n = len(facts.shape)
        labels = _labels(n)
        self.labels = labels
        self.key = facts.key_axis
        terms = facts.terms
        self.diag = [t for t in terms if t.state is not None and t.state[1] == labels]
        self.low = [t for t in terms if t.state is not None and t.state[1] != labels]
        inputs = [t for t in terms if t.state is None]
        if len(inputs) > 1:
            raise RnncError(f"state {facts.name}: a chunked plan needs one outer-product input term")
        self.input = inputs[0] if inputs else None
        self.val = list(facts.value_axes)  # decided by the analysis
        self.ind = [k for k in range(n) if k != self.key and k not in self.val]
        self.perm = self.ind + [self.key] + self.val
        self.delta = _Delta(self) if facts.method == "chunked_delta" else None

    def sizes(self, shape):
        ind = math.prod(shape[k] for k in self.ind)
        return ind, shape[self.key], math.prod(shape[k] for k in self.val)

    def to_kernel(self, x, shape, B, L):
        """[B*L or 1, *state shape (size-1 where broadcast)] -> [B, L, Hflat, K, Vflat]. Axes
        that are flattened together are expanded together: a value over one of two head axes
        becomes one over both (a copy), since Hflat has no place for a broadcast part."""
        x = x.expand(B * L if x.shape[0] == 1 else x.shape[0], *x.shape[1:])
        grow = set()
        for group in (self.ind, self.val):
            if any(x.shape[1 + k] != 1 for k in group):
                grow |= set(group)
        x = x.expand(x.shape[0], *[shape[k] if x.shape[1 + k] != 1 or k in grow else 1
                                   for k in range(len(shape))])
        x = x.permute(0, *[1 + k for k in self.perm])
        h = [x.shape[1 + i] for i in range(len(self.ind))]
        kk = x.shape[1 + len(self.ind)]
        v = list(x.shape[2 + len(self.ind):])
        return x.reshape(B, L, math.prod(h) if h else 1, kk, math.prod(v) if v else 1)


def _rows(x, t0, L):
    """[B, T, ...] -> steps [t0, t0 + L) as [B*L, ...]."""
    x = x[:, t0:t0 + L]
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class _BlockEnv(dict):
    """A block's values by node id, where low-precision inputs are held as they are: reading
    one (env[node]) makes and keeps its float32 copy, so only the work that reads it in
    PyTorch pays for the cast; `raw` gives the kernels the input as it is."""

    def __init__(self, native):
        super().__init__()
        self.native = native

    def __missing__(self, node):
        if node not in self.native:
            raise KeyError(node)
        v = self[node] = self.native[node].to(torch.float32)
        return v

    def raw(self, node):
        return self.native[node] if node in self.native else self[node]


class BlockSolver:
    """A backend's Runner for associative plans, with `kernels` supplying the numerical
    primitives (`scan_kernels`' signatures: linear_scan, maxplus_scan, chunk_linear_attention,
    chunk_delta_rule, dense_scan). chunk_size is passed to the chunk forms as their `chunk`
    (None: kernels that choose their own, as the Triton ones do; then `block` is needed) and
    is the block length when `block` is not given; nothing else here uses it. block_elements
    (optional) lengthens the blocks of small states, see _block_length. When `kernels` has
    `gate_streams` (the triton_gates module), the chunk kernels get their operands as streams
    (_plan_streams, _solve_streamed): the gates are computed inside the kernels."""

    def __init__(self, rec, analysis, kernels, chunk_size=64, block=None, block_elements=None):
        self.rec, self.analysis, self.chunk = rec, analysis, chunk_size
        self.K = kernels
        # Hoisted work and materialised states exist one block at a time (bounded memory);
        # inside a block the chunk kernels work on all its chunks at once.
        self.block = block or chunk_size
        self.block_elements = block_elements
        if not self.block:
            raise RnncError("internal: the block solver needs a block length when the chunk "
                            "kernels choose their chunk")
        g = rec.graph
        self.hoisted = [i for i in rec.order() if i in analysis.hoisted]
        facts = {f.name: f for f in analysis.states}
        self.facts = facts
        self.order = [s for s in analysis.strata]
        decl = {s.name: s for s in rec.states}
        self.decl = decl
        self.layout = {n: _Chunked(rec, f) for n, f in facts.items()
                       if f.method in ("chunked", "chunked_delta")}
        # Values the solver supplies; nodes it must never evaluate (per-step matrix states).
        supplied, excluded = set(), set()
        for name, f in facts.items():
            st = decl[name]
            supplied.add(st.read)
            if st.write is not None:
                if name in self.layout:
                    dependent = {st.read} | nx.descendants(g, st.read)
                    excluded |= dependent - f.downstream - set(f.readouts)
                    supplied |= set(f.readouts)
                else:
                    supplied |= {st.write, rec.node(st.write).arg}
        # With streams, a term the step adds to a readout (mamba2's y = C·S + Dskip·x) is
        # added by the chunk kernels as they write their outputs: the sum is supplied too.
        self.epilogues = {}
        self.streams = self._plan_streams(supplied) if getattr(kernels, "gate_streams", None) else {}
        supplied |= {a for a, _, _ in self.epilogues.values()}
        self.supplied = supplied
        index = {name: k for k, name in enumerate(self.order)}
        reads = {decl[n].read: n for n in facts}
        phases = [[] for _ in range(len(self.order) + 1)]
        for n in analysis.core:
            if n in supplied or n in excluded:
                continue
            deps = {reads[a] for a in nx.ancestors(g, n) | {n} if a in reads}
            phases[max((index[d] + 1 for d in deps), default=0)].append(n)
        # What the solver itself reads: the outputs, and the factors of the normal forms
        # (never the materialised k ⊗ v that a chunked state only has in factors). `keep`: what
        # must be computed for every block; the rest of the roots only where a block is solved
        # another way (lazy, below).
        roots = {o.node for o in rec.outputs}
        keep = set(roots)
        # A chunked state's decay exp(x) is read by the chunk forms as x (_log_coef); the
        # decay itself only where a block is solved step by step or materialised. So it is
        # computed lazily, for those blocks only, unless something else reads it: gla's
        # exp(g) over each block was ~10% of its scan time. With streams every factor of the
        # state's update and queries is such a value: the kernels compute them from the leaves.
        lazy = set()
        for name, f in facts.items():
            if f.maxplus is not None:
                roots |= set(f.maxplus[1])
                keep |= set(f.maxplus[1])
            if name in self.streams:
                for prog in self.streams[name].values():
                    leaves = {n for n, _ in prog.leaves}
                    roots |= leaves
                    keep |= leaves
                    lazy |= prog.inlined
                fused = {fc.node for t in f.terms for fc in t.factors}
                for node, terms in f.readouts.items():
                    for t in terms:
                        qf, of = self._query_factors(name, t)
                        roots |= {fc.node for fc in of}
                        keep |= {fc.node for fc in of}
                        fused |= {fc.node for fc in qf}
                # values computed beside the states (mLSTM's gates) stay where they are
                stay = {n for n in fused if n not in analysis.hoisted}
                roots |= stay
                keep |= stay
                lazy |= fused
                continue
            lay = self.layout.get(name)
            exp_diag = lay.diag if lay and self._exp_factors([_coef(t) for t in lay.diag]) else ()
            for t in _solver_terms(f):
                for fc in t.factors:
                    roots.add(fc.node)
                    (lazy if t in exp_diag else keep).add(fc.node)
                    node = rec.node(fc.node)
                    if isinstance(node, ir.Elementwise) and node.op is Op.EXP:
                        roots.add(node.args[0])  # _log_coef reads the exponent itself
                        keep.add(node.args[0])
        # Phase nodes nothing reads are dropped: the step's own a * h_old of a diagonal update
        # is such a node (the scan supplies the new state), and evaluating it would cost a full
        # pass over the block and a copy of the old states (s6, mingru).
        live = set(roots)
        for n in reversed([n for p in phases for n in p]):  # phases run in topological order
            if n in live:
                live |= set(ir.operands(rec.node(n)))
        self.phases = [[n for n in p if n in live] for p in phases]
        # Hoisted work (and old state values) that something reads.
        phase_reads = {a for p in self.phases for n in p for a in ir.operands(rec.node(n))}
        self.want = want = roots | phase_reads
        lazy -= keep | phase_reads
        needed = set()
        for n in want - lazy:
            if n in analysis.hoisted:
                needed.add(n)
                needed |= nx.ancestors(g, n)
        self.hoisted = [i for i in self.hoisted if i in needed]
        self.lazy = [i for i in rec.order() if i in lazy and i not in needed]
        self._cache = {}

    def _query_factors(self, name, t: Term) -> tuple:
        """(q's factors, the others) of a readout term t of chunked state `name`: q's carry
        the key axis the readout sums over (t.state is None: no q)."""
        if t.state is None:
            return (), tuple(t.factors)
        summed = t.state[1][self.layout[name].key]
        return (tuple(fc for fc in t.factors if summed in fc.labels),
                tuple(fc for fc in t.factors if summed not in fc.labels))

    def _epilogue(self, name, node, terms, supplied):
        """(sum node, other operand) where readout `node` of linear-attention state `name` is
        one plain term q·S read only by one `+` of a state-free value of its own shape, which
        the chunk kernels then add to their outputs; else None."""
        rec, lay = self.rec, self.layout[name]
        if lay.delta is not None or len(terms) != 1:
            return None
        t = terms[0]
        if t.state is None or t.scale != 1.0 or self._query_factors(name, t)[1] \
                or not set(t.out) <= set(t.state[1]):
            return None
        users = list(rec.graph.successors(node))
        if len(users) != 1 or users[0] in supplied:
            return None
        add = rec.node(users[0])
        if not (isinstance(add, ir.Elementwise) and add.op is Op.ADD) or add.args.count(node) != 1:
            return None
        other = add.args[1] if add.args[0] == node else add.args[0]
        shape = rec.attr(node, "shape")
        if other not in self.analysis.hoisted or rec.attr(other, "shape") != shape \
                or rec.attr(users[0], "shape") != shape:
            return None
        return users[0], other

    def _plan_streams(self, supplied) -> dict:
        """{state: {operand: triton_gates.Program}} for the chunked states: "k" and "v" (the
        input's factors with and without the key axis: the delta rule's p and v), "g" (the
        log-decay), ("q", readout node, term index) per readout through the state, ("e",
        readout node) per readout with an epilogue (self.epilogues: {readout: (sum node,
        other operand, state)}), and for the delta rule "r" and "w" (w only where it is not
        p). Not for a delta rule whose decay stays inside w (no stream divides by it)."""
        G = self.K.gate_streams
        hoisted = set(self.analysis.hoisted)
        out = {}
        for name, lay in self.layout.items():
            f = self.facts[name]
            if lay.delta is not None and lay.diag and not lay.delta.cancel:
                continue
            labels = lay.labels
            key = labels[lay.key]
            t = lay.input
            factors = tuple(t.factors) if t is not None else ()
            diag = [_coef(d) for d in lay.diag]
            plans = {
                "k": G.plan_product(self.rec, hoisted, Term(t.scale if t is not None else 0.0, tuple(
                    fc for fc in factors if key in fc.labels), None, labels)),
                "v": G.plan_product(self.rec, hoisted, Term(1.0, tuple(
                    fc for fc in factors if key not in fc.labels), None, labels)),
                "g": G.plan_log(self.rec, hoisted, diag, self._exp_factors(diag), NO_DECAY)}
            if lay.delta is not None:
                plans["r"] = G.plan_product(self.rec, hoisted, lay.delta.r)
                if not lay.delta.same:
                    plans["w"] = G.plan_product(self.rec, hoisted, lay.delta.w)
            for node, terms in f.readouts.items():
                for i, r in enumerate(terms):
                    if r.state is not None:
                        qf, _ = self._query_factors(name, r)
                        plans[("q", node, i)] = G.plan_product(self.rec, hoisted,
                                                               Term(1.0, qf, None, r.state[1]))
                epi = self._epilogue(name, node, terms, supplied)
                if epi is not None:
                    t = terms[0]
                    plans[("e", node)] = G.plan_product(self.rec, hoisted, Term(
                        1.0, (Factor(epi[1], t.out),), None, t.state[1]))
                    self.epilogues[node] = (*epi, name)
            out[name] = plans
        return out

    def stream_signatures(self, name) -> tuple:
        """The operands' stream signatures of a streamed state, (q, k, v, g) for linear
        attention and (q, r, w, p, v, log_alpha) for the delta rule (q: its first readout's,
        or k's without one), with the leaf kinds that sizes above 1 give: the chunk kernels
        that `rnnc compile --emit` shows for it."""
        lay, plans, rec = self.layout[name], self.streams[name], self.rec
        inputs = {d.node for d in rec.inputs}

        def kinds(prog, labels, chan_axes):
            heads = {labels[k] for k in lay.ind}
            chans = {labels[k] for k in chan_axes}
            return tuple((bool((nx.ancestors(rec.graph, n) | {n}) & inputs), bool(heads & set(lab)),
                          bool(chans & set(lab))) for n, lab in prog.leaves)
        labels = lay.labels
        qs = [(k, self.facts[name].readouts[k[1]][k[2]].state[1]) for k in plans if k[0] == "q"]
        qkey, qlabels = qs[0] if qs else ("k", labels)
        if lay.delta is None:
            ops = ((qkey, qlabels, [lay.key]), ("k", labels, [lay.key]), ("v", labels, lay.val),
                   ("g", labels, [lay.key]))
        else:   # q, r, w, p, v, log_alpha (per head)
            ops = ((qkey, qlabels, [lay.key]), ("r", lay.delta.r.out, [lay.key]),
                   ("k" if lay.delta.same else "w", labels, [lay.key]), ("k", labels, [lay.key]),
                   ("v", labels, lay.val), ("g", labels, []))
        if qs and ("e", qkey[1]) in plans:   # the first readout's epilogue
            ops += ((("e", qkey[1]), qlabels, lay.val),)
        sigs = tuple((plans[op].key(), kinds(plans[op], lab, axes)) for op, lab, axes in ops)
        if lay.delta is not None and not lay.diag:
            sigs = sigs[:5] + ((plans["g"].key(), ()),)   # no log_alpha: nothing read
        return sigs

    def _exp_factors(self, terms) -> bool:
        """Whether terms (a coefficient) are one positive multiple of a product of exp(...)
        nodes, whose logarithm _log_coef takes from the exponents."""
        return len(terms) == 1 and terms[0].scale > 0 and bool(terms[0].factors) and all(
            isinstance(self.rec.node(fc.node), ir.Elementwise)
            and self.rec.node(fc.node).op is Op.EXP for fc in terms[0].factors)

    def _programs(self, sizes, dtype, device):
        key = (tuple(sorted(sizes.items())), dtype, device)
        if key not in self._cache:
            low = lambda ids: interpret.lower_nodes(self.rec, ids, sizes, dtype, device)  # noqa: E731
            self._cache[key] = (low(self.hoisted), [low(p) for p in self.phases], low(self.lazy))
        return self._cache[key]

    def _fill_lazy(self, env):
        """Computes the lazily evaluated decays (see __init__) for this block, once."""
        if self.lazy and self.lazy[0] not in env:
            interpret.run_program(self._lazy_prog, env)

    def __call__(self, sizes, params, inputs, state0):
        """inputs [B, T, ...] in the compute dtype, or, where `kernels` has gate_streams,
        also bfloat16/float16 with float32 params: the chunk kernels then read such inputs
        as they are, and everything else reads a float32 copy of a block, made on first use
        (_BlockEnv)."""
        rec = self.rec
        x0 = next(iter(inputs.values()))
        B, T = x0.shape[:2]
        device = x0.device
        native = {k: v for k, v in inputs.items() if v.dtype in LOW_PRECISION}
        if native and not hasattr(self.K, "gate_streams"):
            raise RnncError("internal: low-precision inputs reached a block solver without "
                            "gate streams")
        dtype = torch.float32 if native else x0.dtype
        wide = {k: v for k, v in inputs.items() if k not in native}
        if B == 0 or T == 0:  # nothing to scan: empty outputs, the initial state unchanged
            return ({o.name: x0.new_zeros(B, T, *interpret.concrete(o.shape, sizes)) for o in rec.outputs},
                    dict(state0))
        hoist_prog, phase_progs, self._lazy_prog = self._programs(sizes, dtype, device)
        self._sizes = sizes
        shapes = {s.name: interpret.concrete(s.shape, sizes) for s in rec.states}
        carry = {}
        for s in rec.states:
            if s.name in self.layout:
                lay = self.layout[s.name]
                carry[s.name] = lay.to_kernel(state0[s.name], shapes[s.name], B, 1)[:, 0]
            else:
                carry[s.name] = state0[s.name]
        # Without autograd each block's outputs go straight into [B, T, ...] tensors, while
        # they are still in cache, instead of a list of blocks concatenated at the end.
        grad = _needs_grad(*inputs.values(), *params.values(), *state0.values())
        outs = {o.name: [] for o in rec.outputs}
        block = self._block_length(B, shapes)
        single = block >= T  # one block: its outputs are returned as they are where they may be
        for t0 in range(0, T, block):
            L = min(block, T - t0)
            env = _BlockEnv({d.node: _rows(native[d.name], t0, L) for d in rec.inputs
                             if d.name in native})
            interpret.hoisted_env(rec, hoist_prog, params, wide, t0, L, env=env)
            for k, name in enumerate(self.order):
                interpret.run_program(phase_progs[k], env)
                self._solve(name, env, carry, shapes[name], B, L)
            interpret.run_program(phase_progs[-1], env)
            for o in rec.outputs:
                v = env[o.node]
                shape = interpret.concrete(o.shape, sizes)
                v = v.expand(B * L if v.shape[0] == 1 else v.shape[0], *shape).reshape(B, L, *shape)
                if grad or single:
                    outs[o.name].append(v)
                    continue
                if not outs[o.name]:
                    outs[o.name].append(v.new_empty(B, T, *shape))
                outs[o.name][0][:, t0:t0 + L] = v
        final = {}
        for s in rec.states:
            c = carry[s.name]
            if s.name in self.layout:
                c = self._from_kernel(s.name, c, shapes[s.name])
            final[s.name] = c
        outputs, taken = {}, [*inputs.values(), *params.values(), *state0.values(), *final.values()]
        for o in rec.outputs:
            v = outs[o.name][0]
            if grad or (single and not v.is_contiguous() or any(_shares(v, x) for x in taken)):
                # a fresh tensor, as the sequential backend gives: a single block's output may
                # be a view (of an input, a state, another output, or expanded over the batch)
                v = torch.cat(outs[o.name], 1)
            outputs[o.name] = v
            taken.append(v)
        return outputs, final

    def _block_length(self, B, shapes):
        """Steps per block: `block`, or with block_elements, the largest power-of-two multiple
        of it whose materialised states ([B, L, *shape] per elementwise or max-plus state,
        [B, L, n, n] transitions per dense one) stay within block_elements."""
        if not self.block_elements:
            return self.block
        per_step = 0
        for name, f in self.facts.items():
            if name in self.layout:
                continue
            n = math.prod(shapes[name])
            per_step += n * n if f.method == "dense" else n
        L = self.block
        while B * 2 * L * max(per_step, 1) <= self.block_elements:
            L *= 2
        return L

    # --- per-state solvers -------------------------------------------------------------------
    def _bl(self, x, shape, B, L):
        """[B*L or 1, *broadcastable] -> [B, L, *shape]."""
        x = x.expand(B * L if x.shape[0] == 1 else x.shape[0], *shape)
        return x.reshape(B, L, *shape)

    def _store(self, name, env, h, carry, B, L, shape):
        st = self.decl[name]
        if st.read in self.want:  # the old values, when something reads them (a full copy)
            prev = torch.cat([carry[name].unsqueeze(1), h[:, :-1]], 1)
            env[st.read] = prev.reshape(B * L, *shape)
        if st.write is not None:
            new = h.reshape(B * L, *shape)
            env[st.write] = new
            env[self.rec.node(st.write).arg] = new
        carry[name] = h[:, -1]

    def _solve(self, name, env, carry, shape, B, L):
        f = self.facts[name]
        labels = _labels(len(shape))
        if f.method == "constant":
            h = carry[name].unsqueeze(1).expand(B, L, *shape)
            self._store(name, env, h, carry, B, L, shape)
            return
        if f.method == "maxplus":
            a_terms, b_nodes = f.maxplus
            a = eval_terms(list(a_terms), env, labels) if a_terms else None
            a = self._bl(a, shape, B, L) if a is not None else carry[name].new_zeros(B, L, *shape)
            b = None
            for n in b_nodes:
                v = env[n]
                b = v if b is None else torch.maximum(b, v)
            h, _ = self.K.maxplus_scan(a, self._bl(b, shape, B, L), carry[name])
            self._store(name, env, h, carry, B, L, shape)
            return
        if f.method in ("chunked", "chunked_delta"):
            self._solve_chunked(name, env, carry, shape, B, L)
            for node, (add, other, state) in self.epilogues.items():
                if state == name and add not in env:   # the block was not solved by streams
                    self._fill_lazy(env)
                    env[add] = env[node] + env[other]
            return
        diag = _small_first(_coef(t) for t in f.terms if t.state is not None and t.state[1] == labels)
        inputs = _small_first(t for t in f.terms if t.state is None)
        b = (self._bl(eval_terms(inputs, env, labels), shape, B, L) if inputs
             else carry[name].new_zeros(B, L, *shape))
        if f.method == "elementwise":
            if any(t.state is not None and t.state[1] != labels for t in f.terms):
                raise RnncError(f"internal: state {name} has a non-diagonal term but an elementwise plan")
            if not diag:  # the new value reads no old value: no scan, and no 0 * inf
                h = b
            else:
                h, _ = self.K.linear_scan(self._bl(eval_terms(diag, env, labels), shape, B, L), b, carry[name])
            self._store(name, env, h, carry, B, L, shape)
            return
        if f.method == "dense":
            n = math.prod(shape)
            if B * L * n * n > DENSE_LIMIT:
                raise RnncError(f"state {name}: a dense scan over {n} elements needs {B * L * n * n} "
                                f"transition entries per chunk (limit {DENSE_LIMIT}); use "
                                "backend='sequential' or a smaller chunk_size")
            eye = torch.eye(n, dtype=b.dtype, device=b.device).reshape(n, 1, *shape)
            with_state = [t for t in f.terms if t.state is not None]
            cols = eval_terms(with_state, env, labels, state_value=eye, out_shape=shape)
            cols = cols.expand(n, B * L, *shape).reshape(n, B * L, n)
            A = cols.permute(1, 2, 0).reshape(B, L, n, n)
            h, _ = self.K.dense_scan(A, b.reshape(B, L, n), carry[name].reshape(B, n))
            self._store(name, env, h.reshape(B, L, *shape), carry, B, L, shape)
            return
        raise RnncError(f"internal: no solver for method {f.method!r} of state {name}")

    def _log_coef(self, terms, env, labels, what):
        """log of a positive coefficient; exact for products of exp(...) factors."""
        if self._exp_factors(terms):
            t = terms[0]
            parts = [Term(float(fc.power), (Factor(self.rec.node(fc.node).args[0], fc.labels),),
                          None, t.out) for fc in t.factors]
            out = eval_terms(parts, env, labels)
            return out + math.log(t.scale) if t.scale != 1.0 else out
        coef = eval_terms(terms, env, labels)
        if bool((coef < 0).any()):
            return None  # a negative decay: the caller solves this block exactly instead
        return torch.log(coef)  # exact zeros give -inf, which the chunk forms handle

    def _chunk_readouts(self, name, env, shape, B, L, through) -> tuple:
        """({readout node: value [B*L, *shape]}, S_last or None) of chunked state `name`, with
        through(node, i, term) -> (o [B, L, H, V], S_last) running the chunk form for the
        term's query."""
        f, lay = self.facts[name], self.layout[name]
        got, S_last = {}, None
        for node, terms in f.readouts.items():
            total = None
            for i, t in enumerate(terms):
                if t.state is None:
                    val = eval_terms([t], env, t.out)
                else:
                    o, S_last = through(node, i, t)
                    # o: [B, L, H, V] -> [B*L, *state shape without the key axis]
                    rest = [k for k in range(len(shape)) if k != lay.key]
                    o = o.reshape(B * L, *[shape[k] for k in lay.ind], *[shape[k] for k in lay.val])
                    order = lay.ind + lay.val
                    o = o.permute(0, *[1 + order.index(k) for k in rest])
                    st_labels = tuple(t.state[1][k] for k in rest)
                    of = self._query_factors(name, t)[1]
                    val = eval_terms([Term(t.scale, of, ("old", st_labels), t.out)], env, t.out,
                                     state_value=o)
                total = val if total is None else total + val
            shape_n = interpret.concrete(self.rec.attr(node, "shape"), self._sizes)
            got[node] = total.expand(total.shape[0], *shape_n)
        return got, S_last

    def _solve_streamed(self, name, env, carry, shape, B, L) -> bool:
        """A chunked state through the chunk kernels with its operands as streams (the gates
        computed in the kernels). False, with env and carry untouched,
        where a leaf does not fit the kernels' layout or a result is not finite: a NaN or inf
        in an operand (which the chunk form would spread to the earlier steps of its chunk) or
        a negative decay (whose log is NaN); the caller then solves the block exactly."""
        lay, plans = self.layout[name], self.streams[name]
        G = self.K.gate_streams
        labels = lay.labels
        H, Kd, V = lay.sizes(shape)

        def stream(prog, out_labels, pick, X, log=False):
            def place(node, leaf_labels):
                # a bf16/fp16 input is read by the kernels as it is (their loads widen it)
                x = eval_terms([Term(1.0, (Factor(node, leaf_labels),), None, out_labels)],
                               {node: env.raw(node)}, out_labels)
                return pick(lay.to_kernel(x, shape, B, L)), x.shape[0] != 1
            return G.Stream.build(prog, place, (B, L, H, X), squeeze=log)
        first = lambda x: x[..., 0]      # noqa: E731  [B, L, H, K, V] -> [B, L, H, K]
        value = lambda x: x[..., 0, :]   # noqa: E731  [B, L, H, K, V] -> [B, L, H, V]
        k = stream(plans["k"], labels, first, Kd)
        v = stream(plans["v"], labels, value, V)
        S0 = carry[name]
        if lay.delta is None:
            g = stream(plans["g"], labels, first, Kd, log=True)
            ops = [k, v, g]

            def run(q, include, e=None):
                return self.K.chunk_linear_attention(q, k, v, g, S0, include, chunk=self.chunk,
                                                     **({} if e is None else {"extra": e}))
        else:
            d = lay.delta
            r = stream(plans["r"], d.r.out, first, Kd)
            w = k if d.same else stream(plans["w"], labels, first, Kd)
            la = stream(plans["g"], labels, first, 1) if lay.diag else None
            ops = [k, v, r, w] + ([la] if lay.diag else [])

            def run(q, include):   # its readouts read the new state (the analysis says so)
                return self.K.chunk_delta_rule(q, r, w, k, v, la, S0, chunk=self.chunk)
        if any(x is None for x in ops):
            return False

        def through(node, i, t):
            q = stream(plans[("q", node, i)], t.state[1], first, Kd)
            if q is None:
                raise _Unfit
            if ("e", node) not in plans:
                return run(q, t.state[0] == "new")
            e = stream(plans[("e", node)], t.state[1], value, V)
            if e is None:
                raise _Unfit
            return run(q, t.state[0] == "new", e)
        try:
            got, S_last = self._chunk_readouts(name, env, shape, B, L, through)
        except _Unfit:
            return False
        for node in [n for n in got if ("e", n) in plans]:   # the kernels added the epilogue
            got[self.epilogues[node][0]] = got.pop(node)
        if S_last is None:
            _, S_last = run(None, True)
        sums = [x.sum() for x in got.values()] + [S_last.sum()]
        if not bool(torch.isfinite(torch.stack(sums)).all()):
            return False
        env.update(got)
        carry[name] = S_last
        return True

    def _solve_chunked(self, name, env, carry, shape, B, L):
        if name in self.streams:
            if self._solve_streamed(name, env, carry, shape, B, L):
                return
            self._fill_lazy(env)
        f, lay = self.facts[name], self.layout[name]
        labels = lay.labels
        key_label = labels[lay.key]
        H, Kd, V = lay.sizes(shape)
        S0 = carry[name]
        ref = S0

        def kern(x):  # [B*L or 1, *state shape] -> [B, L, H, K, V]
            return lay.to_kernel(x, shape, B, L)
        # Input p ⊗ v: the factors carrying the key axis form p, the others v.
        if lay.input is not None:
            t = lay.input
            kf = tuple(fc for fc in t.factors if key_label in fc.labels)
            vf = tuple(fc for fc in t.factors if key_label not in fc.labels)
            p = kern(eval_terms([Term(t.scale, kf, None, labels)], env, labels))[..., 0]
            v = kern(eval_terms([Term(1.0, vf, None, labels)], env, labels))[..., 0, :] if vf else \
                ref.new_ones(B, L, H, V)
            p = p.expand(B, L, H, Kd)
            v = v.expand(B, L, H, V)
        else:
            p = ref.new_zeros(B, L, H, Kd)
            v = ref.new_zeros(B, L, H, V)
        diag = [_coef(t) for t in lay.diag]
        log_decay = self._log_coef(diag, env, labels, name) if diag else None
        if diag and log_decay is None:
            if f.method == "chunked":
                self._solve_materialised(name, env, carry, shape, B, L)
                return
            raise RnncError(f"state {name}: the chunked delta rule needs a positive decay, and this "
                            "input produced a negative one; use backend='sequential' for it")
        if f.method == "chunked":
            if log_decay is None:
                log_decay = ref.new_full((B * L, *[1] * len(shape)), NO_DECAY)
            ld = kern(log_decay)[..., 0]  # [B, L, H, K or 1]
            if ld.shape[-1] != 1:
                ld = ld.expand(B, L, H, Kd)
            kin = {"k": p, "v": v, "log_decay": ld}
            run = lambda q, include, kin: self.K.chunk_linear_attention(  # noqa: E731
                q, kin["k"], kin["v"], kin["log_decay"], S0, include, chunk=self.chunk)
        else:
            d = lay.delta
            r = kern(eval_terms([d.r], env, d.r.out))[..., 0]
            # w and p the same product (DeltaNet: both beta*k): one tensor, the kernel's fast path
            w = p if d.same else kern(eval_terms([d.w], env, labels))[..., 0]
            if not d.cancel and log_decay is not None:
                w = w / kern(torch.exp(log_decay))[..., 0]
            la = None if log_decay is None else kern(log_decay)[..., 0, 0].expand(B, L, H)
            r = r.expand(B, L, H, Kd)
            w = w if w is p else w.expand(B, L, H, Kd)
            kin = {"r": r, "w": w, "p": p, "v": v, "log_alpha": la}
            run = lambda q, include, kin: self.K.chunk_delta_rule(  # noqa: E731
                q, kin["r"], kin["w"], kin["p"], kin["v"], kin["log_alpha"], S0, chunk=self.chunk)
        # The chunk forms mix a chunk's steps in matrix products, where 0 * NaN would carry a
        # non-finite input back to the steps before it. From the first such step t0 on, the block
        # is solved step by step; before it, the chunk forms run on inputs whose non-finite
        # entries are zeroed, which leaves the earlier steps' arithmetic exactly as it was.
        t0, clean = _first_poisoned(kin)

        def through(node, i, t):
            q_labels = t.state[1]
            qf, _ = self._query_factors(name, t)
            q = kern(eval_terms([Term(1.0, qf, None, q_labels)], env, q_labels))[..., 0]
            return run(q.expand(B, L, H, Kd), t.state[0] == "new", clean)
        got, S_last = self._chunk_readouts(name, env, shape, B, L, through)
        env.update(got)
        if t0 is not None:
            S_t0 = S0 if t0 == 0 else run(None, True, {n: x[:, :t0] for n, x in clean.items()})[1]
            self._solve_stepwise(name, env, carry, shape, B, L, t0, self._from_kernel(name, S_t0, shape))
            return
        if S_last is None:
            _, S_last = run(None, True, kin)
        carry[name] = S_last

    def _solve_materialised(self, name, env, carry, shape, B, L):
        """A chunked state solved by materialising it per step: exact for decays of any sign
        (the chunk forms need logarithms), used for blocks where a decay is negative."""
        lay = self.layout[name]
        labels = lay.labels
        self._fill_lazy(env)
        S0 = self._from_kernel(name, carry[name], shape)
        diag = [_coef(t) for t in lay.diag]
        a = self._bl(eval_terms(diag, env, labels), shape, B, L)
        b = self._bl(eval_terms([lay.input], env, labels), shape, B, L) if lay.input else torch.zeros_like(a)
        h, _ = self.K.linear_scan(a, b, S0)
        self._readouts(name, env, carry, S0, h, B, L, shape)

    def _solve_stepwise(self, name, env, carry, shape, B, L, t0, S):
        """Steps t0.. of a block's chunked state, one at a time from its affine normal form
        (as the sequential backend does), from S, the state before step t0 [B, *shape]."""
        f = self.facts[name]
        labels = self.layout[name].labels
        self._fill_lazy(env)
        S_t0 = S
        nodes = {fc.node for t in f.terms for fc in t.factors}
        per_step = {n: env[n].reshape(B, L, *env[n].shape[1:]) for n in nodes if env[n].shape[0] == B * L}
        fixed = {n: env[n] for n in nodes if n not in per_step}
        steps = []
        for t in range(t0, L):
            values = {**fixed, **{n: x[:, t] for n, x in per_step.items()}}
            S = eval_terms(list(f.terms), values, labels, state_value=S, out_shape=shape).expand(B, *shape)
            steps.append(S)
        self._readouts(name, env, carry, S_t0, torch.stack(steps, 1), B, L, shape, t0)

    def _readouts(self, name, env, carry, S0, h, B, L, shape, t0=0):
        """Readouts of a chunked state at steps t0.. of the block from its value after each of
        them, h [B, L - t0, *shape] (S0: the value before step t0); the last value is carried
        to the next block. Readouts of earlier steps are kept."""
        f, lay = self.facts[name], self.layout[name]
        n = L - t0
        prev = torch.cat([S0.unsqueeze(1), h[:, :-1]], 1)
        values = {"old": prev.reshape(B * n, *shape), "new": h.reshape(B * n, *shape)}

        def steps(x):  # [B*L or 1, ...] -> the rows of steps t0.. : [B*n or 1, ...]
            if t0 == 0 or x.shape[0] != B * L:
                return x
            return x.reshape(B, L, *x.shape[1:])[:, t0:].reshape(B * n, *x.shape[1:])
        for node, terms in f.readouts.items():
            total = None
            for t in terms:
                sv = None if t.state is None else values[t.state[0]]
                val = eval_terms([t], {fc.node: steps(env[fc.node]) for fc in t.factors}, t.out,
                                 state_value=sv)
                total = val if total is None else total + val
            shape_n = interpret.concrete(self.rec.attr(node, "shape"), self._sizes)
            total = total.expand(B * n if t0 else total.shape[0], *shape_n)
            if t0:
                whole = env[node].expand(B * L, *shape_n).reshape(B, L, *shape_n).clone()
                whole[:, t0:] = total.reshape(B, n, *shape_n)
                total = whole.reshape(B * L, *shape_n)
            env[node] = total
        carry[name] = lay.to_kernel(h[:, -1], shape, B, 1)[:, 0]

    def _from_kernel(self, name, c, shape):
        lay = self.layout[name]
        B = c.shape[0]
        c = c.reshape(B, *[shape[k] for k in lay.perm])
        inv = [lay.perm.index(k) for k in range(len(shape))]
        return c.permute(0, *[1 + i for i in inv]).contiguous()
