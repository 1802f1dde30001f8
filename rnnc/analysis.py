"""Stage 3: what a recurrence allows. Entry point: `analyse`.

- Dependence: hoisted work (reached from no state read) runs for all T at once; the
  recurrent core is everything a state read reaches.
- Linearity and structure, per state, from the affine normal form (`rnnc.affine`): the
  update is affine (S' = A(S) + b with A, b free of every state), max-plus affine
  (m' = max(m + a, b)), or nonlinear, with the first expression that breaks linearity.
- States whose coefficients read other states are solved in strata: a state may depend on
  states of earlier strata, which are then known for all steps. mLSTM's C and n read the
  max-plus state m; sympy confirms that rescaling by exp(m) makes them plainly affine.
- Readouts: how the core reads a matrix state (o = q^T S), which chunked plans need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from . import ir
from .affine import Expander, NotAffine, Term, state_labels as _labels
from .ir import Op


@dataclass(frozen=True)
class Transition:
    kind: str               # identity|diagonal|identity_plus_low_rank|diagonal_plus_low_rank|dense|maxplus|nonlinear|zero
    varies_over: tuple = ()  # dims along which the (diagonal part of the) transition varies
    data_dependent: bool = False
    mixed_axes: tuple = ()   # dims the transition mixes (low-rank or dense)
    rank: int = 0


@dataclass
class StateFacts:
    name: str
    shape: tuple
    update: str                    # affine | maxplus | nonlinear
    transition: Transition
    method: str                    # constant|elementwise|chunked|chunked_delta|dense|maxplus|sequential
    depends_on: tuple = ()         # other states its coefficients read (earlier strata)
    rescaled_by: str | None = None
    reason: str | None = None      # why nonlinear / why this method
    where: object = None           # Pos of the expression named in `reason`
    input: str = ""                # structure of the input term b
    terms: tuple = ()              # affine normal form of the update, out labels s0, s1, ...
    maxplus: tuple | None = None   # (a terms, b node ids) for m' = max(m + a, b)
    readouts: dict = field(default_factory=dict)  # cut node id -> terms (chunked methods)
    key_axis: int | None = None
    value_axes: tuple = ()         # chunked methods: axes neither the decay nor k nor q vary over
    downstream: frozenset = frozenset()  # nodes that read the state only through readouts
    decay_per_key: bool = False    # chunked_delta: the decay varies along the key axis (KDA)


@dataclass(frozen=True)
class Analysis:
    hoisted: frozenset
    core: tuple
    hoisted_names: tuple
    states: tuple = ()
    strata: tuple = ()             # state names, in an order where dependencies come first
    associative: bool = False
    plan: str = "sequential"
    plan_reason: str = ""

    def state(self, name: str) -> StateFacts:
        return next(s for s in self.states if s.name == name)


def partition(rec: ir.Recurrence) -> tuple:
    """(hoisted node ids, core node ids in order). Writes the `hoisted` node attribute."""
    core = set()
    for st in rec.states:
        core.add(st.read)
        core |= nx.descendants(rec.graph, st.read)
    hoisted = frozenset(i for i in rec.graph.nodes if i not in core)
    for i in rec.graph.nodes:
        rec.graph.nodes[i]["hoisted"] = i in hoisted
    return hoisted, tuple(i for i in rec.order() if i in core)


# --- helpers ------------------------------------------------------------------------------------
def canonical(ex: Expander, terms: list, out: tuple) -> list:
    return [ex._rename(t, dict(zip(t.out, out))) for t in terms]


def _states_of(rec, node: int) -> set:
    reads = {s.read: s.name for s in rec.states}
    anc = nx.ancestors(rec.graph, node) | {node}
    return {reads[a] for a in anc if a in reads}


def _dims_of(st, axes) -> tuple:
    return tuple(str(st.shape[a]) for a in sorted(axes))


def _carried(t: Term, labels: tuple) -> set:
    """Axes (positions in `labels`) that a term's factors vary over."""
    out = set()
    for f in t.factors:
        out |= {labels.index(x) for x in f.labels if x in labels}
    return out


# --- max-plus ---------------------------------------------------------------------------------
def _maxplus(rec, st):
    """(a terms, b node ids) if m' = max(m + a, b1, b2, ...), else None."""
    ex = Expander(rec, st.read)
    labels = _labels(len(st.shape))

    def form(n):
        node = rec.node(n)
        if isinstance(node, ir.Broadcast):
            return form(node.arg)
        if isinstance(node, ir.Elementwise) and node.op is Op.MAX:
            dep = [a for a in node.args if a in ex.dependent]
            if len(dep) != 1:
                return None
            inner = form(dep[0])
            if inner is None:
                return None
            free = [a for a in node.args if a not in ex.dependent]
            return inner[0], inner[1] + tuple(free)
        try:
            terms = canonical(ex, ex.terms(n), labels)
        except NotAffine:
            return None
        with_state = [t for t in terms if t.state is not None]
        if (len(with_state) != 1 or with_state[0].factors or with_state[0].scale != 1.0
                or with_state[0].state[1] != labels):
            return None
        return tuple(t for t in terms if t.state is None), ()
    if st.write is None:
        return None
    res = form(rec.node(st.write).arg)
    if res is None or not res[1]:
        return None
    return res


# --- rescaling (sympy) -----------------------------------------------------------------------
def _to_sympy(rec, n, symbols):
    """An elementwise IR subgraph as a sympy expression; `symbols` maps node ids to atoms."""
    import sympy as sp
    if n in symbols:
        return symbols[n]
    node = rec.node(n)
    if isinstance(node, ir.Const):
        return sp.Float(node.value) if node.value != int(node.value) else sp.Integer(int(node.value))
    # Rearrangements that keep every element (no integer picks) are transparent elementwise.
    if isinstance(node, ir.Broadcast) or (
            isinstance(node, ir.Select) and not any(isinstance(i, int) for i in node.index)):
        return _to_sympy(rec, node.arg, symbols)
    if isinstance(node, ir.Elementwise):
        a = [_to_sympy(rec, x, symbols) for x in node.args]
        ops = {Op.ADD: lambda x, y: x + y, Op.SUB: lambda x, y: x - y, Op.MUL: lambda x, y: x * y,
               Op.DIV: lambda x, y: x / y, Op.NEG: lambda x: -x, Op.EXP: sp.exp, Op.LOG: sp.log,
               Op.POW: lambda x, y: x ** y}
        if node.op in ops:
            return ops[node.op](*a)
    return sp.Symbol(f"x{n}")


def _rescale(rec, st, terms, by) -> bool:
    """Does substituting S = S~ exp(-m) make the update free of m (m = the state `by`)?"""
    import sympy as sp
    m_decl = next(s for s in rec.states if s.name == by)
    if m_decl.write is None:
        return False
    m, mp = sp.Symbol("m"), sp.Symbol("mp")
    symbols = {m_decl.read: m, rec.node(m_decl.write).arg: mp}
    for t in terms:
        expr = sp.Float(t.scale) if t.scale != 1 else sp.Integer(1)
        for f in t.factors:
            if by in _states_of(rec, f.node):
                expr = expr * _to_sympy(rec, f.node, symbols) ** f.power
        # new value: S~' e^{-mp} = coef * S~ e^{-m} + b  =>  S~' = coef e^{mp-m} S~ + b e^{mp}
        expr = expr * (sp.exp(mp - m) if t.state is not None else sp.exp(mp))
        expr = sp.powsimp(sp.expand_power_exp(sp.simplify(expr)), combine="exp")
        expr = sp.simplify(expr)
        if expr.has(m) or expr.has(mp):
            return False
    return True


# --- one state ----------------------------------------------------------------------------------
def _classify(rec, st) -> StateFacts:
    shape = tuple(str(s) for s in st.shape)
    if st.write is None:
        return StateFacts(st.name, shape, "affine", Transition("identity"), "constant",
                          reason="never assigned: keeps its initial value")
    labels = _labels(len(st.shape))
    ex = Expander(rec, st.read)
    try:
        terms = canonical(ex, ex.terms(rec.node(st.write).arg), labels)
    except NotAffine as na:
        mp = _maxplus(rec, st)
        if mp is not None:
            deps = set()
            for t in mp[0]:
                for f in t.factors:
                    deps |= _states_of(rec, f.node)
            for b in mp[1]:
                deps |= _states_of(rec, b)
            deps.discard(st.name)
            dd = any(rec.attr(f.node, "batched") for t in mp[0] for f in t.factors) or any(
                rec.attr(b, "batched") for b in mp[1])
            return StateFacts(st.name, shape, "maxplus", Transition("maxplus", data_dependent=dd),
                              "maxplus", tuple(sorted(deps)), maxplus=mp,
                              input="max-plus: m' = max(m + a, b)")
        pos = rec.attr(na.node, "pos")
        return StateFacts(st.name, shape, "nonlinear", Transition("nonlinear"), "sequential",
                          reason=f"{na.reason} at line {pos.line}", where=pos)
    deps = set()
    for t in terms:
        for f in t.factors:
            deps |= _states_of(rec, f.node)
    deps.discard(st.name)
    diag = [t for t in terms if t.state is not None and t.state[1] == labels]
    inputs = [t for t in terms if t.state is None]
    other = [t for t in terms if t.state is not None and t.state[1] != labels]
    dd = any(rec.attr(f.node, "batched") for t in diag + other for f in t.factors)
    varies = set()
    for t in diag:
        varies |= _carried(t, labels)
    low_axes, dense = set(), False
    for t in other:
        summed = [k for k, x in enumerate(t.state[1]) if x != labels[k]]
        if len(summed) != 1 or any(x in labels and x != labels[k] for k, x in enumerate(t.state[1])):
            dense = True
            continue
        p = summed[0]
        x = t.state[1][p]
        if any(x in f.labels and labels[p] in f.labels for f in t.factors):
            dense = True  # a full matrix over the mixed axis, not an outer product
        if _chained(t.factors, labels, x, labels[p]):
            dense = True  # a chain like A[i,m] B[m,l] h[l]: not an outer product either
        low_axes.add(p)
    if dense or len(low_axes) > 1:
        mixed = set(low_axes)
        for t in other:
            mixed |= {k for k, x in enumerate(t.state[1]) if x != labels[k]}
        kind = Transition("dense", _dims_of(st, varies), dd, _dims_of(st, mixed))
    elif other:
        identity = len(diag) == 1 and not diag[0].factors and diag[0].scale == 1.0
        kind = Transition("identity_plus_low_rank" if identity else "diagonal_plus_low_rank",
                          _dims_of(st, varies), dd, _dims_of(st, low_axes), len(other))
    elif not diag:
        kind = Transition("zero", (), False)
    elif len(diag) == 1 and not diag[0].factors and diag[0].scale == 1.0:
        kind = Transition("identity", (), False)
    else:
        kind = Transition("diagonal", _dims_of(st, varies), dd)
    facts = StateFacts(st.name, shape, "affine", kind, "elementwise", tuple(sorted(deps)),
                       terms=tuple(terms), input=_describe_input(rec, st, inputs, labels))
    if kind.kind == "dense":
        facts.method = "dense"
    if kind.kind.endswith("low_rank"):
        facts.key_axis = next(iter(low_axes))
    return facts


def _name(rec, n) -> str:
    node = rec.node(n)
    return getattr(node, "name", None) or rec.attr(n, "label") or f"%{n}"


def _describe_input(rec, st, inputs, labels) -> str:
    """'rank-1 k⊗v' when b is an outer product between the last axis and the others."""
    if not inputs:
        return "none"
    if len(inputs) > 1:
        return f"sum of {len(inputs)} terms"
    t = inputs[0]
    names = "*".join(_name(rec, f.node) for f in t.factors) or "constant"
    if len(labels) < 2:
        return names
    last = labels[-1]
    left = [f for f in t.factors if last not in f.labels]
    right = [f for f in t.factors if last in f.labels]
    keys = {x for f in left for x in f.labels} - {x for f in right for x in f.labels}
    if left and right and keys & set(labels):
        lhs = "*".join(_name(rec, f.node) for f in left)
        rhs = "*".join(_name(rec, f.node) for f in right)
        return f"rank-1 {lhs}⊗{rhs}"
    return names


# --- readouts of matrix states (for chunked plans) ---------------------------------------------
def _readouts(rec, st, facts: StateFacts):
    """Find the cut nodes through which the rest of the step reads state `st`.

    Returns ({cut node: terms}, key axis) or a reason string when the state is read any
    other way (then it must be materialised per step)."""
    g = rec.graph
    labels = _labels(len(st.shape))
    new = rec.node(st.write).arg
    dependent = {st.read} | nx.descendants(g, st.read)
    chain = (nx.ancestors(g, st.write) | {st.write}) & dependent
    ex = Expander(rec, st.read, new=new)
    cut, down, pre = {}, set(), set()
    key = facts.key_axis
    for n in sorted(dependent - chain):
        node = rec.node(n)
        ops = [a for a in ir.operands(node) if a in dependent]
        if ops and all(a in cut or a in down for a in ops):
            down.add(n)
            continue
        if any(a in cut or a in down for a in ops):
            return f"{_name(rec, n)} reads {st.name} both directly and through a readout"
        try:
            terms = ex.terms(n)
        except NotAffine as na:
            return f"{na.reason} ({_name(rec, na.node)})"
        form = _readout_form(terms)
        if form is None:
            pre.add(n)
            continue
        if key is not None and form != key:
            return f"{st.name} is read along two different axes"
        key = form
        cut[n] = terms
    for n in pre:
        if isinstance(rec.node(n), (ir.Output, ir.StateWrite)):
            return f"{st.name} is emitted or stored whole, not read out"
        if not set(g.successors(n)) <= set(cut) | pre:
            return f"{_name(rec, n)} uses {st.name} whole"
    for n in chain:  # the new value may only feed the update itself and readouts
        if n in (st.write,):
            continue
        outside = set(g.successors(n)) - chain - set(cut) - pre
        if outside:
            return f"{st.name} is used whole by {_name(rec, next(iter(outside)))}"
    if key is None:
        return f"no readout of {st.name} found"
    return cut, key, frozenset(down)


def _chained(factors, labels, x, out) -> bool:
    """Whether the factors of a low-rank term join the read axis x to the written axis out
    through labels of their own (A[i,m] B[m,l] h[l]: a full matrix, not an outer product).
    Labels of their own that join neither (DeltaProduct's k2[m] k1[m], a scalar per head)
    leave the term an outer product."""
    extra = {y for f in factors for y in f.labels if y not in labels and y != x}
    if not extra:
        return False
    group = list(range(len(factors)))   # union-find over factors sharing an extra label

    def find(i):
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i
    for y in extra:
        ids = [i for i, f in enumerate(factors) if y in f.labels]
        for i in ids[1:]:
            group[find(i)] = find(ids[0])
    reads = {find(i) for i, f in enumerate(factors) if x in f.labels}
    writes = {find(i) for i, f in enumerate(factors) if out in f.labels}
    linked = {find(i) for i, f in enumerate(factors) if set(f.labels) & extra}
    return bool(reads & writes & linked)


def _readout_form(terms):
    """The key axis if every state term sums the state over exactly one axis, else None."""
    key = None
    for t in terms:
        if t.state is None:
            continue
        summed = [k for k, x in enumerate(t.state[1]) if x not in t.out]
        if len(summed) != 1:
            return None
        if key is not None and summed[0] != key:
            return None
        key = summed[0]
    return key


def _choose_method(rec, st, facts: StateFacts):
    kind = facts.transition.kind
    if facts.update != "affine" or facts.method in ("constant", "dense"):
        return
    if kind.endswith("low_rank"):
        # Only the chunked delta rule handles low rank; otherwise a dense scan (never the
        # elementwise one, which would drop the low-rank terms).
        facts.method, facts.reason = "dense", "a low-rank transition that is not read out along its mixed axis"
    if len(st.shape) < 2:
        return  # a vector state: materialise it per step with a scan
    found = _readouts(rec, st, facts)
    if isinstance(found, str):
        if kind.endswith("low_rank"):
            facts.reason = found
        return
    cut, key, down = found
    facts.method = "dense" if kind.endswith("low_rank") else "elementwise"
    # A chunked plan pays off only with a value axis: one the decay and the keys do not
    # vary over (V in S[H,K,V]). Without one (s6's h[D,N]) an elementwise scan is cheaper.
    labels = _labels(len(st.shape))
    value_axes = _value_axes(facts.terms, cut, key, labels)
    if not value_axes:
        return
    # An input of several terms (k⊗v + k2⊗v2, k⊗v + 0.5) is chunked too: the block solver
    # runs the chunk form once per term (chunk_plan.Layout.pairs).
    if kind.endswith("low_rank"):
        if facts.key_axis != key:
            facts.reason = "the low-rank axis differs from the readout axis"
            return
        # A decay per key channel (Kimi Delta Attention, RWKV-7) is chunked too: the block
        # solver gives it the diagonal-plus-low-rank form (chunk_plan.Delta.channel).
        facts.method, facts.reason = "chunked_delta", None
        facts.decay_per_key = any(t.state is not None and t.state[1] == labels and
                                  any(labels[key] in f.labels for f in t.factors)
                                  for t in facts.terms)
    else:
        facts.method = "chunked"
    facts.readouts, facts.key_axis = cut, key
    facts.value_axes, facts.downstream = tuple(value_axes), down


def _value_axes(terms, readouts, key, labels) -> list:
    """State axes that no decay or low-rank factor, no key (an input factor on the key axis)
    and no query (a readout factor on the key axis) varies over."""
    carried = set()
    for t in terms:
        if t.state is None:  # the input: only its key side counts
            carried |= {x for f in t.factors if labels[key] in f.labels for x in f.labels}
        else:
            carried |= {x for f in t.factors for x in f.labels}
    for ts in readouts.values():
        for t in ts:
            if t.state is not None:
                summed = t.state[1][key]
                carried |= {labels[t.state[1].index(x)] for f in t.factors if summed in f.labels
                            for x in f.labels if x in t.state[1]}
    return [k for k in range(len(labels)) if k != key and labels[k] not in carried]


# --- associativity (sympy) ------------------------------------------------------------------------
def _distribute_max(e):
    """Normalise max-plus expressions: a + max(x, y) = max(a + x, a + y)."""
    import sympy as sp
    if e.args:
        e = e.func(*[_distribute_max(a) for a in e.args])
    if isinstance(e, sp.Add):
        for a in e.args:
            if isinstance(a, sp.Max):
                rest = e - a
                return _distribute_max(sp.Max(*[rest + x for x in a.args]))
    return e


def is_associative(combine, element) -> bool:
    """Check combine(combine(x, y), z) == combine(x, combine(y, z)) on symbolic elements.

    combine(x, y) applies x first, then y; element(k) builds the k-th symbolic element."""
    import sympy as sp
    x, y, z = element(1), element(2), element(3)
    left = combine(combine(x, y), z)
    right = combine(x, combine(y, z))
    for l, r in zip(left, right):
        d = _distribute_max(sp.expand(l - r)) if not isinstance(l, sp.MatrixBase) else sp.simplify(l - r)
        if isinstance(d, sp.MatrixBase):
            if any(sp.simplify(v) != 0 for v in d):
                return False
        elif sp.simplify(d) != 0:
            if not (isinstance(l, sp.Max) or isinstance(r, sp.Max)) or \
                    set(_distribute_max(l).args) != set(_distribute_max(r).args):
                return False
    return True


def affine_combine(x, y):
    """(A1, b1) then (A2, b2): h -> A2 (A1 h + b1) + b2."""
    return (y[0] * x[0], y[0] * x[1] + y[1])


def maxplus_combine(x, y):
    """(a1, b1) then (a2, b2): m -> max(max(m + a1, b1) + a2, b2)."""
    import sympy as sp
    return (x[0] + y[0], sp.Max(x[1] + y[0], y[1]))


def _affine_element(k):
    import sympy as sp
    return (sp.Matrix(2, 2, sp.symbols(f"A{k}_:4")), sp.Matrix(2, 1, sp.symbols(f"b{k}_:2")))


def _maxplus_element(k):
    import sympy as sp
    return sp.symbols(f"a{k} b{k}", real=True)


_PROVEN: dict = {}


def combine_proven(kind: str) -> bool:
    """Whether the combine for `kind` ("affine" or "maxplus") is proven associative."""
    if kind not in _PROVEN:
        if kind == "affine":
            _PROVEN[kind] = is_associative(affine_combine, _affine_element)
        else:
            _PROVEN[kind] = is_associative(maxplus_combine, _maxplus_element)
    return _PROVEN[kind]


_PLANS = {"chunked_delta": 4, "chunked": 3, "dense": 2, "elementwise": 1, "maxplus": 1, "constant": 0}
_PLAN_NAME = {"chunked_delta": "chunked_delta", "chunked": "chunked", "dense": "dense_scan",
              "elementwise": "elementwise_scan", "maxplus": "elementwise_scan",
              "constant": "elementwise_scan"}


def plan_of(a: "Analysis") -> tuple:
    """(plan, one-line reason) from the per-state methods."""
    bad = [f for f in a.states if f.update == "nonlinear"]
    if bad:
        return "sequential", f"state {bad[0].name} is nonlinear: {bad[0].reason}"
    if not a.states:
        return "elementwise_scan", "no state: every step is independent"
    top = max(a.states, key=lambda f: _PLANS[f.method])
    plan = _PLAN_NAME[top.method]
    why = {
        "chunked_delta": f"{top.name}: {top.transition.kind.replace('_', ' ')} of rank "
                         f"{top.transition.rank} over "
                         f"{','.join(top.transition.mixed_axes)}, read out along it: chunked WY/UT form"
                         + (", the decay per key channel inside the pair products"
                            if top.decay_per_key else ""),
        "chunked": f"{top.name}: diagonal decay over [{','.join(top.transition.varies_over)}] with "
                   f"input {top.input}: chunked linear attention",
        "dense_scan": f"{top.name}: {top.transition.kind.replace('_', ' ')} transition mixing "
                      f"[{','.join(top.transition.mixed_axes)}]: scan over matrix products",
        "elementwise_scan": "every state is elementwise (diagonal or max-plus): elementwise scan",
    }[plan]
    # why a matrix state did not get a chunk form (a decay per key channel in a delta rule,
    # an input of several terms), where the analysis said
    shy = [f for f in a.states if len(f.shape) >= 2 and f.reason and f.method in ("dense", "elementwise")]
    if shy and plan in ("dense_scan", "elementwise_scan"):
        why += f"; {shy[0].name}: {shy[0].reason}"
    return plan, why


# --- the recurrence ------------------------------------------------------------------------------
def analyse(rec: ir.Recurrence) -> Analysis:
    import sys
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20000))  # the normal form recurses along the step's graph
    try:
        return _analyse(rec)
    finally:
        sys.setrecursionlimit(old)


def _analyse(rec: ir.Recurrence) -> Analysis:
    hoisted, _ = partition(rec)
    core = tuple(i for i in rec.order() if not rec.attr(i, "hoisted"))
    names = []
    for label, _pos, node in rec.statements:
        if node in hoisted and label not in names and label not in {s.name for s in rec.states}:
            names.append(label)
    facts = []
    for st in rec.states:
        try:
            facts.append(_classify(rec, st))
        except RecursionError:  # a step too deep to expand: solve it sequentially
            facts.append(StateFacts(st.name, tuple(str(s) for s in st.shape), "nonlinear",
                                    Transition("nonlinear"), "sequential",
                                    reason="the update is too deeply nested to analyse"))
    by_name = {f.name: f for f in facts}
    dep = nx.DiGraph()
    dep.add_nodes_from(by_name)
    for f in facts:
        for d in f.depends_on:
            dep.add_edge(d, f.name)
    cyclic = set()
    for comp in nx.strongly_connected_components(dep):
        if len(comp) > 1:
            cyclic |= comp
    for f in facts:
        if f.update != "nonlinear" and (f.name in cyclic or any(
                by_name[d].update == "nonlinear" for d in f.depends_on)):
            other = sorted(set(f.depends_on) & (cyclic | {d for d in f.depends_on}))
            f.reason = (f"its coefficients read state {', '.join(other)}, which is not solved "
                        "before it (the states are coupled)")
            f.update, f.method = "nonlinear", "sequential"
            f.transition = Transition("nonlinear")
    for f in facts:
        if f.update == "affine" and f.depends_on:
            maxplus = [d for d in f.depends_on if by_name[d].update == "maxplus"]
            if len(maxplus) == 1 and _rescale(rec, next(s for s in rec.states if s.name == f.name),
                                              f.terms, maxplus[0]):
                f.rescaled_by = maxplus[0]
    for f, st in zip(facts, rec.states):
        _choose_method(rec, st, f)
    order = list(nx.topological_sort(dep.subgraph(set(by_name) - cyclic))) if facts else []
    associative = all(f.update in ("affine", "maxplus") and combine_proven(
        "maxplus" if f.update == "maxplus" else "affine") for f in facts)
    a = Analysis(hoisted, core, tuple(names), tuple(facts), tuple(order), associative)
    plan, reason = plan_of(a)
    object.__setattr__(a, "plan", plan)
    object.__setattr__(a, "plan_reason", reason)
    return a
