"""Affine normal form: a state-dependent IR value as a sum of products.

Each `Term` is `scale * prod(factors) * S` (or without S): factors are IR nodes that do not
depend on the analysed state, each with one label per axis; the state appears at most once,
with its own labels. Labels shared between factors (and the state) are contracted unless they
are `out` labels, exactly like einsum. This is what the analysis classifies (a diagonal
term has state labels equal to `out`; a rank-1 term sums the state over one label) and what
the scan backend evaluates to get exact coefficient tensors, without numerical probing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from . import contract, ir
from .ir import Op


@dataclass(frozen=True)
class Factor:
    node: int
    labels: tuple
    power: int = 1  # -1 for a divisor


@dataclass(frozen=True)
class Term:
    scale: float
    factors: tuple          # of Factor
    state: tuple | None     # (tag, labels): tag "old" (the state read) or "new" (its new value)
    out: tuple              # one label per axis of the value


def state_labels(k: int) -> tuple:
    """The canonical labels of a state's k axes in its normal form: s0, s1, ..."""
    return tuple(f"s{i}" for i in range(k))


class NotAffine(Exception):
    """The value is not affine in the state; `node` is the first operation that breaks it."""

    def __init__(self, node: int, reason: str):
        super().__init__(reason)
        self.node = node
        self.reason = reason


@dataclass
class Expander:
    """Expands IR nodes into affine normal form with respect to one state.

    `old`: the StateRead node; `new`: optionally the node holding the state's new value, which
    is then a base symbol too (used for readouts, which may read either value)."""
    rec: ir.Recurrence
    old: int
    new: int | None = None
    _memo: dict = field(default_factory=dict)
    _fresh: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self):
        g = self.rec.graph
        self.dependent = {self.old} | set(_descendants(g, self.old))

    def fresh(self) -> str:
        return f"l{next(self._fresh)}"

    def leaf(self, n: int) -> list:
        node = self.rec.node(n)
        if isinstance(node, ir.Const):
            return [] if node.value == 0 else [Term(node.value, (), None, ())]
        labels = tuple(self.fresh() for _ in self.rec.attr(n, "shape"))
        return [Term(1.0, (Factor(n, labels),), None, labels)]

    def _multiplicative(self, n: int) -> bool:
        """State-free nodes worth splitting into factors (so k*v stays k and v)."""
        node = self.rec.node(n)
        if isinstance(node, ir.Broadcast):
            return True
        if isinstance(node, ir.Contract):
            # An outer product splits; a real contraction (W @ x) stays one computed value.
            return set(node.out) == set("".join(node.subscripts))
        if isinstance(node, ir.Select):
            return not any(isinstance(i, int) for i in node.index) and len(set(node.index)) == len(node.index)
        if isinstance(node, ir.Elementwise):
            return node.op in (Op.MUL, Op.NEG, Op.DIV)
        return False

    def terms(self, n: int) -> list:
        if n not in self.dependent and n != self.new and not self._multiplicative(n):
            return self.leaf(n)
        if n not in self._memo:
            terms = self._expand(n)
            rank = len(self.rec.attr(n, "shape"))
            self._memo[n] = [self._pad(t, rank) for t in terms]
        return [self._refresh(t) for t in self._memo[n]]

    # -- label plumbing --------------------------------------------------------------------
    def _pad(self, t: Term, rank: int) -> Term:
        if len(t.out) >= rank:
            return t
        extra = tuple(self.fresh() for _ in range(rank - len(t.out)))
        return Term(t.scale, t.factors, t.state, extra + t.out)

    def _rename(self, t: Term, mapping: dict) -> Term:
        """Rename labels by `mapping`; every other label gets a fresh name."""
        m = dict(mapping)

        def r(label):
            if label not in m:
                m[label] = self.fresh()
            return m[label]
        factors = tuple(Factor(f.node, tuple(r(x) for x in f.labels), f.power) for f in t.factors)
        state = None if t.state is None else (t.state[0], tuple(r(x) for x in t.state[1]))
        return Term(t.scale, factors, state, tuple(r(x) for x in t.out))

    def _refresh(self, t: Term) -> Term:
        return self._rename(t, {})

    def _mul(self, n: int, a: Term, b: Term) -> Term:
        if a.state is not None and b.state is not None:
            raise NotAffine(n, "a product of two state-dependent values")
        if len(b.out) > len(a.out):
            a, b = b, a
        k = len(a.out) - len(b.out)  # rank-aligned operands; rank-0 constants broadcast
        b = self._rename(b, {x: y for x, y in zip(b.out, a.out[k:])})
        return Term(a.scale * b.scale, a.factors + b.factors, a.state or b.state, a.out)

    # -- the rules -----------------------------------------------------------------------------
    def _expand(self, n: int) -> list:
        node = self.rec.node(n)
        if n == self.old or n == self.new:
            labels = tuple(self.fresh() for _ in self.rec.attr(n, "shape"))
            return [Term(1.0, (), ("old" if n == self.old else "new", labels), labels)]
        if isinstance(node, (ir.StateWrite, ir.Output, ir.Broadcast)):
            return self.terms(node.arg)
        if isinstance(node, ir.Elementwise):
            return self._elementwise(n, node)
        if isinstance(node, ir.Contract):
            letter = {}
            for s in node.subscripts:
                for c in s:
                    letter.setdefault(c, self.fresh())
            parts = []
            for arg, subs in zip(node.args, node.subscripts):
                ts = self.terms(arg)
                parts.append([self._rename(t, {x: letter[c] for x, c in zip(t.out, subs)}) for t in ts])
            out = tuple(letter[c] for c in node.out)
            result = []
            for combo in itertools.product(*parts):
                scale, factors, state = 1.0, (), None
                for t in combo:
                    if t.state is not None and state is not None:
                        raise NotAffine(n, "a product of two state-dependent values")
                    scale *= t.scale
                    factors += t.factors
                    state = state or t.state
                result.append(Term(scale, factors, state, out))
            return result
        if isinstance(node, ir.Reduce):
            if node.op is not Op.ADD:
                raise NotAffine(n, "a max over a state-dependent value")
            return [Term(t.scale, t.factors, t.state,
                         tuple(x for k, x in enumerate(t.out) if k not in node.axes))
                    for t in self.terms(node.arg)]
        if isinstance(node, ir.Select):
            if any(isinstance(i, int) for i in node.index) or len(set(node.index)) < len(node.index):
                raise NotAffine(n, "selecting part of a state-dependent value")
            out = []
            for t in self.terms(node.arg):
                lab = dict(zip(node.index, t.out))
                out.append(Term(t.scale, t.factors, t.state,
                                tuple(lab[a] if a is not None else self.fresh() for a in node.out)))
            return out
        raise NotAffine(n, f"{type(node).__name__} of a state-dependent value")

    def _elementwise(self, n: int, node: ir.Elementwise) -> list:
        op, args = node.op, node.args
        if op in (Op.ADD, Op.SUB):
            a, b = self.terms(args[0]), self.terms(args[1])
            if op is Op.SUB:
                b = [Term(-t.scale, t.factors, t.state, t.out) for t in b]
            return a + b
        if op is Op.NEG:
            return [Term(-t.scale, t.factors, t.state, t.out) for t in self.terms(args[0])]
        if op is Op.MUL:
            return [self._mul(n, x, y) for x in self.terms(args[0]) for y in self.terms(args[1])]
        if op is Op.DIV:
            if args[1] in self.dependent:
                raise NotAffine(n, "division by a state-dependent value")
            den = self.rec.node(args[1])
            if isinstance(den, ir.Const):
                return [Term(t.scale / den.value if den.value else float("nan"), t.factors,
                             t.state, t.out) for t in self.terms(args[0])]
            labels = tuple(self.fresh() for _ in self.rec.attr(args[1], "shape"))
            inv = Term(1.0, (Factor(args[1], labels, -1),), None, labels)
            return [self._mul(n, t, inv) for t in self.terms(args[0])]
        what = op.value if op.value.isalpha() else f"'{op.value}'"
        raise NotAffine(n, f"{what} of a state-dependent value")


def _descendants(g, n):
    import networkx as nx
    return nx.descendants(g, n)


# --- evaluation ------------------------------------------------------------------------------------
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def eval_terms(terms, values: dict, out: tuple, state_value=None, state_labels=None,
               out_shape=None):
    """Sum of `terms` as a tensor [N, *shape of out], einsum over their factors.

    values: node id -> tensor [N or 1, *node shape]. state_value: [N, *state shape] (or with
    extra leading probe axes folded into N) for terms that contain the state. Labels of `out`
    that no factor carries are broadcast (size 1) and then expanded to `out_shape` if given.
    """
    total = None
    for t in terms:
        mapping = {x: y for x, y in zip(t.out, out)}
        letter = {}

        def L(x):
            x = mapping.get(x, x)
            if x not in letter:
                letter[x] = _LETTERS[len(letter)]
            return letter[x]
        operands, subs = [], []
        for f in t.factors:
            v = values[f.node]
            operands.append(v if f.power == 1 else 1.0 / v)
            subs.append("..." + "".join(L(x) for x in f.labels))
        if t.state is not None:
            operands.append(state_value)
            subs.append("..." + "".join(L(x) for x in t.state[1]))
        present = set()
        for s in subs:
            present |= set(s[3:])
        out_letters = [L(x) for x in out]
        kept = "".join(c for c in out_letters if c in present)
        if operands:
            v = contract.einsum([x[3:] for x in subs], kept, operands)
        else:  # a constant term: match the dtype and device of the values around it
            like = state_value if state_value is not None else next(
                (x for x in values.values() if isinstance(x, torch.Tensor)), None)
            v = torch.ones((1,), dtype=like.dtype if like is not None else torch.get_default_dtype(),
                           device=like.device if like is not None else None)
        if t.scale != 1.0:
            v = v * t.scale
        # Insert size-1 axes for out labels that no operand carries.
        lead = v.shape[:v.dim() - len(kept)]
        sizes = iter(v.shape[v.dim() - len(kept):])
        v = v.reshape(*lead, *[next(sizes) if c in kept else 1 for c in out_letters])
        total = v if total is None else total + v
    if total is None:
        return None
    if out_shape is not None:
        total = total.expand(*total.shape[:total.dim() - len(out)], *out_shape)
    return total
