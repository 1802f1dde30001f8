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

from .chunk_plan import NO_DECAY, Layout, StreamPlan, coef as _coef, exp_factors
from .scan_kernels import _needs_grad, _shares  # tensor predicates, not the kernels table

LOW_PRECISION = (torch.bfloat16, torch.float16)  # inputs the chunk kernels read as they are
# The chunk passed to the kernels table's chunk_dplr when none was asked for (the Triton
# table's picks its own: triton_dplr's kernels, or scan_kernels' form where they do not apply)
DPLR_CHUNK = 64
DENSE_LIMIT = 2 ** 28  # elements of the per-chunk transition matrices A_t, [B, L, n, n]
# On a CPU the scan of dense transitions costs about B n^3 multiply-adds a step, the step loop
# B n^2 plus a fixed overhead; past B n^3 = 2^19 the loop was faster (2026-12-07, 2 cores,
# T = 512: B = 32, n = 32 loop 36 ms, scan 63 ms; B = 4, n = 48 loop 33 ms, scan 24 ms)
DENSE_CPU_WORK = 2 ** 19


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


def _small_first(terms) -> list:
    """terms with each product's factors ordered by their axes, fewest first. einsum multiplies
    left to right, so factors over the same axes meet before the product grows: s6's input
    dt[d] * B[n] * x[d] costs one pass over [B*L, D, N] instead of two."""
    return [Term(t.scale, tuple(sorted(t.factors, key=lambda fc: (len(fc.labels), fc.labels))),
                 t.state, t.out) for t in terms]


class _Unfit(Exception):
    """A stream's leaf does not fit the chunk kernels' layout."""


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
    (chunk_plan.StreamPlan, _solve_streamed): the gates are computed inside the kernels."""

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
        self.layout = {n: Layout(rec, f) for n, f in facts.items()
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
        G = getattr(kernels, "gate_streams", None)
        self._plan = StreamPlan(rec, analysis, self.layout, supplied, G) if G else None
        self.streams = self._plan.programs if G else {}
        self.epilogues = self._plan.epilogues if G else {}
        self.bonuses = self._plan.bonuses if G else {}
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
                    for i, t in enumerate(terms):
                        qf, of = self.layout[name].query_factors(t)
                        roots |= {fc.node for fc in of}
                        # a bonus term's factors are computed by the kernels too
                        (fused if (node, i) in self.bonuses else keep).update(fc.node for fc in of)
                        fused |= {fc.node for fc in qf}
                # values computed beside the states (mLSTM's gates) stay where they are
                stay = {n for n in fused if n not in analysis.hoisted}
                roots |= stay
                keep |= stay
                lazy |= fused
                continue
            lay = self.layout.get(name)
            exp_diag = lay.diag if lay and exp_factors(self.rec, [_coef(t) for t in lay.diag]) else ()
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

    def stream_signatures(self, name) -> tuple:
        """The stream signatures of streamed state `name`'s chunk kernels (StreamPlan)."""
        return self._plan.signatures(name)

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
        out_shapes = {o.name: interpret.concrete(o.shape, sizes) for o in rec.outputs}
        if B == 0 or T == 0:  # nothing to scan: empty outputs, the initial state unchanged
            return ({o.name: x0.new_zeros(B, T, *out_shapes[o.name]) for o in rec.outputs},
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
                shape = out_shapes[o.name]
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
            if B * L * n * n > DENSE_LIMIT or (b.device.type == "cpu" and B * n ** 3 > DENSE_CPU_WORK):
                # the transitions would not fit (a delta rule decayed per key channel at
                # K = V = 64 has n = H*K*V), or on a CPU the loop is faster: step through the
                # block instead, exactly, at the sequential backend's pace
                self._store(name, env, self._steps(name, env, carry[name], shape, B, L, b=b),
                            carry, B, L, shape)
                return
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
        if exp_factors(self.rec, terms):
            t = terms[0]
            parts = [Term(float(fc.power), (Factor(self.rec.node(fc.node).args[0], fc.labels),),
                          None, t.out) for fc in t.factors]
            out = eval_terms(parts, env, labels)
            return out + math.log(t.scale) if t.scale != 1.0 else out
        coef = eval_terms(terms, env, labels)
        if bool((coef < 0).any()):
            return None  # a negative decay: the caller solves this block exactly instead
        return torch.log(coef)  # exact zeros give -inf, which the chunk forms handle

    def _chunk_readouts(self, name, env, shape, B, L, through, skip=()) -> tuple:
        """({readout node: value [B*L, *shape]}, S_last or None) of chunked state `name`, with
        through(node, i, term) -> (o [B, L, H, V], S_last) running the chunk form for the
        term's query; skip: the (node, term index) of state-free terms it adds to o itself."""
        f, lay = self.facts[name], self.layout[name]
        got, S_last = {}, None
        for node, terms in f.readouts.items():
            total = None
            for i, t in enumerate(terms):
                if (node, i) in skip:
                    continue
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
                    of = self.layout[name].query_factors(t)[1]
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

            def run(q, include, **extras):
                return self.K.chunk_linear_attention(q, k, v, g, S0, include, chunk=self.chunk,
                                                     **extras)
        elif lay.delta.general:   # diag(alpha) S - w (r^T S) + p v^T, alpha per key channel
            d = lay.delta
            r = stream(plans["r"], d.r.out, first, Kd)
            w = k if d.same else stream(plans["w"], labels, first, Kd)   # KDA: one object
            la = stream(plans["g"], labels, first, Kd, log=True)   # [B, L, H, 1] per head
            ops = [k, v, r, w, la]
            fits = getattr(self.K, "dplr_fits", None)
            if fits is None or any(x is None for x in ops) or fits(r, k) is not None:
                return False   # the kernels' limits (K): the PyTorch form, materialised

            def run(q, include):
                return self.K.chunk_dplr(q, r, w, k, v, la, S0, chunk=self.chunk or DPLR_CHUNK,
                                         include_current=include)
        else:
            d = lay.delta
            r = stream(plans["r"], d.r.out, first, Kd)
            w = k if d.same else stream(plans["w"], labels, first, Kd)
            la = stream(plans["g"], labels, first, 1) if lay.diag else None
            ops = [k, v, r, w] + ([la] if lay.diag else [])

            def run(q, include):
                if not include:   # a read of the state before the update: _solve_chunked's
                    raise _Unfit  # PyTorch form takes it (it once ran as a new-state read here)
                return self.K.chunk_delta_rule(q, r, w, k, v, la, S0, chunk=self.chunk)
        if any(x is None for x in ops):
            return False

        def fitted(key, labels, pick, X):
            s = stream(plans[key], labels, pick, X)
            if s is None:
                raise _Unfit
            return s

        def through(node, i, t):
            labels = t.state[1]
            q = fitted(("q", node, i), labels, first, Kd)
            extras = {}   # what the kernels add to o: the epilogue, the bonus
            if ("e", node) in plans:
                extras["extra"] = fitted(("e", node), labels, value, V)
            if ("u", node) in plans:
                extras["bonus"] = (fitted(("u", node), labels, first, Kd),
                                   fitted(("x", node), labels, value, V))
            return run(q, t.state[0] == "new", **extras)
        try:
            got, S_last = self._chunk_readouts(name, env, shape, B, L, through, skip=self.bonuses)
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
        H, Kd, V = lay.sizes(shape)
        S0 = carry[name]
        ref = S0

        def kern(x):  # [B*L or 1, *state shape] -> [B, L, H, K, V]
            return lay.to_kernel(x, shape, B, L)
        # Input p ⊗ v: the factors carrying the key axis form p, the others v (Layout.pairs).
        # A sum of such terms runs the chunk form once per term, the entry state with the
        # first (the recurrence is linear in its input and its entry state); kin holds the
        # first term's p and v as "p"/"k" and "v", the others as "p1", "v1", ...
        ps, vs = [], []
        for pt, vt in lay.pairs:
            p = kern(eval_terms([pt], env, labels))[..., 0]
            v = kern(eval_terms([vt], env, labels))[..., 0, :] if vt.factors else \
                ref.new_ones(B, L, H, V)
            ps.append(p.expand(B, L, H, Kd))
            vs.append(v.expand(B, L, H, V))
        if not ps:
            ps, vs = [ref.new_zeros(B, L, H, Kd)], [ref.new_zeros(B, L, H, V)]
        p, v = ps[0], vs[0]
        more = {f"{n}{j}": x for j in range(1, len(ps)) for n, x in (("p", ps[j]), ("v", vs[j]))}
        diag = [_coef(t) for t in lay.diag]
        log_decay = self._log_coef(diag, env, labels, name) if diag else None
        if diag and log_decay is None:   # a decay <= 0 somewhere: the chunk forms need its log
            if f.method == "chunked":
                self._solve_materialised(name, env, carry, shape, B, L)
            else:   # exact, one step at a time (a delta rule's state has no cheaper exact form)
                self._solve_stepwise(name, env, carry, shape, B, L, 0, self._from_kernel(name, S0, shape))
            return
        if f.method == "chunked":
            if log_decay is None:
                log_decay = ref.new_full((B * L, *[1] * len(shape)), NO_DECAY)
            ld = kern(log_decay)[..., 0]  # [B, L, H, K or 1]
            if ld.shape[-1] != 1:
                ld = ld.expand(B, L, H, Kd)
            kin = {"k": p, "v": v, "log_decay": ld, **more}

            def run1(q, include, kin, p, v, S):
                return self.K.chunk_linear_attention(q, p, v, kin["log_decay"], S, include,
                                                     chunk=self.chunk)
            first = "k"
        else:
            d = lay.delta
            if d.rank > 1:   # diag(alpha) S - sum_j w_j (r_j^T S) + p v^T: [B, L, H, R, K]
                r = torch.stack([kern(eval_terms([rt], env, rt.out))[..., 0].expand(B, L, H, Kd)
                                 for rt, _ in d.terms], 3)
                w = torch.stack([kern(eval_terms([wt], env, labels))[..., 0].expand(B, L, H, Kd)
                                 for _, wt in d.terms], 3)
            else:
                r = kern(eval_terms([d.r], env, d.r.out))[..., 0]
                # w and p the same product (DeltaNet: both beta*k): one tensor, the kernel's
                # fast path
                w = p if d.same else kern(eval_terms([d.w], env, labels))[..., 0]
                if not d.cancel and not d.general and log_decay is not None:
                    w = w / kern(torch.exp(log_decay))[..., 0]
                r = r.expand(B, L, H, Kd)
                w = w if w is p else w.expand(B, L, H, Kd)
            dplr_chunk = self.chunk or DPLR_CHUNK
            if d.general:   # diag(alpha) S - w (r^T S) + p v^T, alpha per key channel
                # one decay per head stays [B, L, H, 1]: the form's plain-product path
                la = ref.new_zeros(B, L, H, 1) if log_decay is None else kern(log_decay)[..., 0]
                la = la.expand(B, L, H, la.shape[-1])
                form, chunk = self.K.chunk_dplr, dplr_chunk
                if len(ps) > 1:   # the form takes every input term in one pass: [B, L, H, M, *]
                    p, v = torch.stack(ps, 3), torch.stack(vs, 3)
                    ps, vs, more = [p], [v], {}
            else:
                la = None if log_decay is None else kern(log_decay)[..., 0, 0].expand(B, L, H)
                form, chunk = self.K.chunk_delta_rule, self.chunk
            kin = {"r": r, "w": w, "p": p, "v": v, "log_alpha": la, **more}
            first = "p"

            def run1(q, include, kin, p, v, S0):
                if include or q is None:
                    return form(q, kin["r"], kin["w"], p, v, kin["log_alpha"], S0, chunk=chunk)
                # A readout of the state before the update: the diagonal-plus-low-rank form,
                # whose old-state reads are its erase reads y_t = S_{t-1}^T r_t with q for r.
                # The per-head form alpha (S - w r^T S) is diag(alpha) S - (alpha w) r^T S there.
                w_, la_ = kin["w"], kin["log_alpha"]
                if not d.general:
                    if la_ is None:
                        la_ = kin["r"].new_zeros(*kin["r"].shape[:3], 1)
                    else:
                        la_ = la_.unsqueeze(-1)
                        w_ = w_ * torch.exp(la_)
                p_ = w_ if kin["w"] is p and d.general else p
                return self.K.chunk_dplr(q, kin["r"], w_, p_, v, la_, S0, chunk=dplr_chunk,
                                         include_current=False)

        def run(q, include, kin):
            """The chunk form over every input term, summed; the entry state goes with the
            first."""
            o, S = run1(q, include, kin, kin[first], kin["v"], S0)
            for j in range(1, len(ps)):
                oj, Sj = run1(q, include, kin, kin[f"p{j}"], kin[f"v{j}"], torch.zeros_like(S0))
                o, S = (None if o is None else o + oj), S + Sj
            return o, S
        # The chunk forms mix a chunk's steps in matrix products, where 0 * NaN would carry a
        # non-finite input back to the steps before it. From the first such step t0 on, the block
        # is solved step by step; before it, the chunk forms run on inputs whose non-finite
        # entries are zeroed, which leaves the earlier steps' arithmetic exactly as it was.
        t0, clean = _first_poisoned(kin)

        def through(node, i, t):
            q_labels = t.state[1]
            qf, _ = self.layout[name].query_factors(t)
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
        b = self._bl(eval_terms(lay.inputs, env, labels), shape, B, L) if lay.inputs else torch.zeros_like(a)
        h, _ = self.K.linear_scan(a, b, S0)
        self._readouts(name, env, carry, S0, h, B, L, shape)

    def _steps(self, name, env, h, shape, B, L, t0=0, b=None):
        """[B, L - t0, *shape]: a state's values after steps t0.. of the block, one step at a
        time from its affine normal form (as the sequential backend does), from h [B, *shape],
        its value before step t0. b: the state-free terms already evaluated, [B, L, *shape]
        (None: evaluated per step with the rest)."""
        f = self.facts[name]
        terms = list(f.terms) if b is None else [t for t in f.terms if t.state is not None]
        nodes = {fc.node for t in terms for fc in t.factors}
        # unbind, not x[:, t]: T selects would each fill a whole zero gradient in the backward
        per_step = {n: env[n].reshape(B, L, *env[n].shape[1:])[:, t0:].unbind(1)
                    for n in nodes if env[n].shape[0] == B * L}
        fixed = {n: env[n] for n in nodes if n not in per_step}
        bs = None if b is None else b[:, t0:].unbind(1)
        labels, out = _labels(len(shape)), []
        for t in range(L - t0):
            values = {**fixed, **{n: x[t] for n, x in per_step.items()}}
            h = eval_terms(terms, values, labels, state_value=h, out_shape=shape).expand(B, *shape)
            if b is not None:
                h = h + bs[t]
            out.append(h)
        return torch.stack(out, 1)

    def _solve_stepwise(self, name, env, carry, shape, B, L, t0, S):
        """Steps t0.. of a block's chunked state, one at a time (`_steps`), from S, the state
        before step t0 [B, *shape], and their readouts."""
        self._fill_lazy(env)
        self._readouts(name, env, carry, S, self._steps(name, env, S, shape, B, L, t0), B, L,
                       shape, t0)

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
