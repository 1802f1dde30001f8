"""How a matrix state of a chunked plan maps onto the chunk forms (a library for the block
solver, not a backend).

`Layout`: the state's axis groups (heads, the key axis, the value axes) and the pieces of its
normal form the chunk forms take: the decay terms, the rank-1 input, the delta rule's
low-rank term (`Delta`).

`StreamPlan` (for kernels that compute their own operands, the Triton chunk kernels): one
`triton_gates.Program` per operand, the spec's state-free expressions down to the leaves, and
what the kernels add to a readout as they write it: a term the step adds to the readout
(mamba2's `+ Dskip·x`, the *epilogue*) and a state-free term inside it that pairs a step with
itself (RWKV-6's bonus).
"""
from __future__ import annotations

import math

import networkx as nx

from rnnc import ir
from rnnc.affine import Factor, Term, state_labels as _labels
from rnnc.ir import Op

NO_DECAY = -1e4        # the log-decay the chunk forms get for a state that reads no old value


def coef(t: Term) -> Term:
    """The coefficient of a state term: the same term with the state dropped."""
    return Term(t.scale, t.factors, None, t.out)


def exp_factors(rec, terms) -> bool:
    """Whether terms (a coefficient) are one positive multiple of a product of exp(...) nodes,
    whose logarithm is the sum of the exponents."""
    return len(terms) == 1 and terms[0].scale > 0 and bool(terms[0].factors) and all(
        isinstance(rec.node(fc.node), ir.Elementwise)
        and rec.node(fc.node).op is Op.EXP for fc in terms[0].factors)


class Delta:
    """A delta-rule state's update alpha (S - w (r^T S)) + p v^T in the chunk kernels' terms:
    r (the factors of the low-rank term carrying the contracted key axis, over r's labels),
    w (the others, scaled), cancel (alpha taken out of the low-rank term exactly, so w holds
    no alpha) and same (w and p the same product: DeltaNet's beta*k).

    channel: the decay varies along the key axis (Kimi Delta Attention, RWKV-7). The update
    is then diag(alpha) S - w (r^T S) + p v^T as it stands (scan_kernels.chunk_dplr): alpha
    stays wherever the spec put it, in w (decay after the erase) or in r (before it).

    rank: the number of low-rank terms. Above 1 (a DeltaProduct step, whose Householder
    updates compose into several terms) the update is diag(alpha) S - sum_j w_j (r_j^T S)
    + p v^T, as it stands: `terms` holds the (r_j, w_j). general: the diagonal-plus-low-rank
    form runs (a decay per channel, or rank above 1)."""

    def __init__(self, lay):
        labels = lay.labels
        low = lay.low[0]
        x = low.state[1][lay.key]
        alpha_nodes = sorted(fc.node for t in lay.diag for fc in t.factors)
        factors = list(low.factors)
        self.rank = len(lay.low)
        self.channel = lay.facts.decay_per_key
        self.general = self.channel or self.rank > 1
        self.terms = [self._split(t, lay) for t in lay.low]
        self.cancel = not self.general and len(lay.diag) == 1 and all(
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
        self.same = self.rank == 1 and lay.p is not None and (self.cancel or self.channel) and \
            scale == lay.p.scale and sorted((fc.node, fc.power) for fc in wf) == sorted(
                (fc.node, fc.power) for fc in lay.p.factors)

    @staticmethod
    def _split(t, lay):
        """(r, w) of one low-rank term -w (r^T S), as it stands: r the factors with the term's
        contracted label (over r's labels), w the others (over the state's, labels of their
        own summed: DeltaProduct's k2 (k2 . k1))."""
        labels = lay.labels
        x = t.state[1][lay.key]
        r_labels = tuple(x if k == lay.key else labels[k] for k in range(len(labels)))
        return (Term(1.0, tuple(fc for fc in t.factors if x in fc.labels), None, r_labels),
                Term(-t.scale, tuple(fc for fc in t.factors if x not in fc.labels), None, labels))


class Layout:
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
        # The input: one outer product p ⊗ v, or a sum of them (k⊗v + k2⊗v2, k⊗v + 0.5), which
        # the chunk forms take one term at a time (the recurrence is linear in its input)
        self.inputs = [t for t in terms if t.state is None]
        self.input = self.inputs[0] if len(self.inputs) == 1 else None
        self.val = list(facts.value_axes)  # decided by the analysis
        self.ind = [k for k in range(n) if k != self.key and k not in self.val]
        self.perm = self.ind + [self.key] + self.val
        delta = facts.method == "chunked_delta"
        self.pairs = [self._input_split(t, delta) for t in self.inputs]
        self.p, self.v = self.pairs[0] if len(self.pairs) == 1 else (None, None)
        self.delta = Delta(self) if delta else None

    def _input_split(self, t: Term, delta: bool) -> tuple:
        """An input term p ⊗ v as two Terms: p the factors carrying the key axis (with the
        input's scale), v the others. For the delta rule a factor over head axes only (Gated
        DeltaNet's beta[h]) goes with p instead, so that p can be the same product as
        w = beta * k (Delta.same: the kernels' shorter path, 10 chunk-sized matmuls instead
        of 14)."""
        key = self.labels[self.key]
        heads = {self.labels[k] for k in self.ind}
        to_p = [key in fc.labels or (delta and set(fc.labels) <= heads) for fc in t.factors]
        return (Term(t.scale, tuple(fc for fc, x in zip(t.factors, to_p) if x), None, self.labels),
                Term(1.0, tuple(fc for fc, x in zip(t.factors, to_p) if not x), None, self.labels))

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

    def query_factors(self, t: Term) -> tuple:
        """(q's factors, the others) of a readout term t: q's carry the key axis the readout
        sums over (t.state is None: no q)."""
        if t.state is None:
            return (), tuple(t.factors)
        summed = t.state[1][self.key]
        return (tuple(fc for fc in t.factors if summed in fc.labels),
                tuple(fc for fc in t.factors if summed not in fc.labels))

    def plain(self, t: Term) -> bool:
        """Whether readout term t is what the kernels write for its query: q·S itself."""
        return (t.state is not None and t.scale == 1.0 and not self.query_factors(t)[1]
                and set(t.out) <= set(t.state[1]))


class StreamPlan:
    """The operand programs of the chunked states (`programs`: {state: {operand: Program}}):
    "k" and "v" (the input's factors with and without the key axis: the delta rule's p and
    v), "g" (the log-decay), ("q", readout node, term index) per readout through the state,
    for the delta rule "r" and "w" (w only where it is not p), and what the kernels add to a
    linear-attention readout's o: ("u", readout) and ("x", readout), a bonus (`bonuses`:
    {(readout, term index): state}), and ("e", readout), an epilogue (`epilogues`:
    {readout: (sum node, other operand, state)}). None for a delta rule whose decay stays
    inside w (no stream divides by it), unless it is the diagonal-plus-rank-1 form with one
    term (a decay per key channel: KDA, RWKV-7), whose kernels read the decay as it is. `supplied`: the nodes the solver supplies already
    (a sum one of them is cannot be an epilogue)."""

    def __init__(self, rec, analysis, layout: dict, supplied: set, gates):
        self.rec, self.analysis, self.layout = rec, analysis, layout
        self.epilogues, self.bonuses, self.programs = {}, {}, {}
        G, hoisted = gates, set(analysis.hoisted)
        for name, lay in layout.items():
            f = lay.facts
            d = lay.delta
            # a decay inside the delta rule's terms streams where it is the diagonal-plus-
            # rank-1 form (triton_dplr's kernels read it per key channel), not otherwise
            if (d is not None and lay.diag and not d.cancel and not (d.general and d.rank == 1)) \
                    or len(lay.inputs) > 1:
                continue   # materialised operands (_solve_chunked)
            labels = lay.labels
            diag = [coef(d) for d in lay.diag]
            none = Term(0.0, (), None, labels)   # no input: p = 0
            plans = {
                "k": G.plan_product(rec, hoisted, lay.p or none),
                "v": G.plan_product(rec, hoisted, lay.v or Term(1.0, (), None, labels)),
                "g": G.plan_log(rec, hoisted, diag, exp_factors(rec, diag), NO_DECAY)}
            if lay.delta is not None:
                plans["r"] = G.plan_product(rec, hoisted, lay.delta.r)
                if not lay.delta.same:
                    plans["w"] = G.plan_product(rec, hoisted, lay.delta.w)
            for node, terms in f.readouts.items():
                for i, r in enumerate(terms):
                    if r.state is not None:
                        qf, _ = lay.query_factors(r)
                        plans[("q", node, i)] = G.plan_product(rec, hoisted,
                                                               Term(1.0, qf, None, r.state[1]))
                if lay.delta is not None:
                    continue
                bonus = self._bonus(lay, terms)
                if bonus is not None:
                    i, u, x = bonus
                    plans[("u", node)] = G.plan_product(rec, hoisted, u)
                    plans[("x", node)] = G.plan_product(rec, hoisted, x)
                    self.bonuses[(node, i)] = name
                epi = self._epilogue(lay, node, terms, supplied)
                if epi is not None:
                    t = next(t for t in terms if t.state is not None)
                    plans[("e", node)] = G.plan_product(rec, hoisted, Term(
                        1.0, (Factor(epi[1], t.out),), None, t.state[1]))
                    self.epilogues[node] = (*epi, name)
            self.programs[name] = plans

    @staticmethod
    def _bonus(lay, terms) -> tuple | None:
        """(term index, u term, x term) where a readout is one plain term q·S plus one
        state-free term that sums over one axis, such as RWKV-6's sum_i r_i u_i k_i v_j: the
        kernels add it as (sum_i u_t,i) x_t, u the factors with the summed axis (over the key
        axis) and x the others (over the value axes), both in the state term's labels. None
        where the readout has another form."""
        plain = [t for t in terms if t.state is not None]
        free = [i for i, t in enumerate(terms) if t.state is None]
        if len(plain) != 1 or len(free) != 1 or len(terms) != 2 or not lay.plain(plain[0]):
            return None
        ts, tb = plain[0], terms[free[0]]
        st = ts.state[1]
        summed = {x for fc in tb.factors for x in fc.labels} - set(tb.out)
        if len(summed) != 1 or len(tb.out) != len(ts.out):
            return None
        rename = dict(zip(tb.out, ts.out))
        rename[summed.pop()] = key = st[lay.key]
        values = {st[k] for k in lay.val}
        u, x = [], []
        for fc in tb.factors:
            labels = tuple(rename[a] for a in fc.labels)
            if key in labels and values & set(labels):
                return None   # a factor over both the key and a value axis: not a bonus
            (u if key in labels else x).append(Factor(fc.node, labels, fc.power))
        return free[0], Term(tb.scale, tuple(u), None, st), Term(1.0, tuple(x), None, st)

    def _epilogue(self, lay, node, terms, supplied) -> tuple | None:
        """(sum node, other operand) where readout `node` is what the kernels write (one plain
        term q·S, and a bonus if any) and is read only by one `+` of a state-free value of its
        own shape, which the kernels then add to their outputs; else None."""
        rec = self.rec
        plain = [t for t in terms if t.state is not None]
        bonus = [i for i, t in enumerate(terms) if t.state is None and (node, i) in self.bonuses]
        if len(plain) != 1 or len(plain) + len(bonus) != len(terms) or not lay.plain(plain[0]):
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

    def signatures(self, name) -> tuple:
        """The operands' stream signatures of a streamed state, (q, k, v, g) for linear
        attention, then (name, signature) pairs of what the kernels add to o, and (q, r, w,
        p, v, log_alpha) for the delta rule (q: its first readout's, or k's without one),
        with the leaf kinds that sizes above 1 give: the chunk kernels that `rnnc compile
        --emit` shows for it."""
        lay, plans, rec = self.layout[name], self.programs[name], self.rec
        inputs = {d.node for d in rec.inputs}

        def kinds(prog, labels, chan_axes):
            heads = {labels[k] for k in lay.ind}
            chans = {labels[k] for k in chan_axes}
            return tuple((bool((nx.ancestors(rec.graph, n) | {n}) & inputs), bool(heads & set(lab)),
                          bool(chans & set(lab))) for n, lab in prog.leaves)
        labels = lay.labels
        qs = [(k, lay.facts.readouts[k[1]][k[2]].state[1]) for k in plans if k[0] == "q"]
        qkey, qlabels = qs[0] if qs else ("k", labels)
        if lay.delta is None:
            ops = ((qkey, qlabels, [lay.key]), ("k", labels, [lay.key]), ("v", labels, lay.val),
                   ("g", labels, [lay.key]))
        else:   # q, r, w, p, v, log_alpha (per head; per key channel in the dplr form)
            ops = ((qkey, qlabels, [lay.key]), ("r", lay.delta.r.out, [lay.key]),
                   ("k" if lay.delta.same else "w", labels, [lay.key]), ("k", labels, [lay.key]),
                   ("v", labels, lay.val), ("g", labels, [lay.key] if lay.delta.general else []))
        sigs = tuple((plans[op].key(), kinds(plans[op], lab, axes)) for op, lab, axes in ops)
        if qs:   # what the kernels add to the first readout's o
            axes = {"e": lay.val, "u": [lay.key], "x": lay.val}
            sigs += tuple((n, (plans[(n, qkey[1])].key(), kinds(plans[(n, qkey[1])], qlabels, axes[n])))
                          for n in ("e", "u", "x") if (n, qkey[1]) in plans)
        if lay.delta is not None and not lay.diag:
            sigs = sigs[:5] + ((plans["g"].key(), ()),)   # no log_alpha: nothing read
        return sigs
