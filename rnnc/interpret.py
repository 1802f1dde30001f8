"""What each IR node means in PyTorch: the semantics every backend shares.

`lower_nodes` turns a list of node ids into closures, once per set of dim sizes, so the
sequential backend's time loop only calls them. Runtime values carry a leading batch axis
(size B, B*T for hoisted work, or 1 for values that depend on no input or state) ahead of
the node's per-sample shape.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import contract, ir
from .ir import Op

_UNARY = {
    Op.NEG: torch.neg, Op.EXP: torch.exp, Op.LOG: torch.log, Op.SIGMOID: torch.sigmoid,
    Op.TANH: torch.tanh, Op.RELU: torch.relu, Op.SOFTPLUS: F.softplus, Op.SILU: F.silu,
    Op.LOGSIGMOID: F.logsigmoid, Op.SQRT: torch.sqrt, Op.ABS: torch.abs,
}
_BINARY = {
    Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div,
    Op.POW: torch.pow, Op.MAX: torch.maximum, Op.MIN: torch.minimum,
    Op.LT: torch.lt, Op.LE: torch.le, Op.GT: torch.gt, Op.GE: torch.ge,
    Op.EQ: torch.eq, Op.NE: torch.ne,
}
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def concrete(shape, sizes: dict) -> tuple:
    """A symbolic per-sample shape with the dims substituted: a tuple of ints."""
    out = []
    for s in shape:
        if s.is_Integer:
            out.append(int(s))
        elif s.is_Symbol:
            out.append(int(sizes[s.name]))
        else:
            out.append(_substituted(s, tuple(sorted((sym.name, sizes[sym.name])
                                                    for sym in s.free_symbols))))
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _substituted(expr, values: tuple) -> int:
    # sympy's subs costs ~0.1 ms; the block solver asks for the same shapes in every block
    given = dict(values)
    return int(expr.subs({sym: given[sym.name] for sym in expr.free_symbols}))


def _select(node: ir.Select):
    """A closure for Select: integer picks, then permutation/diagonal, then new axes."""
    picks = [(k, v) for k, v in enumerate(node.index) if isinstance(v, int)]
    names = [v for v in node.index if not isinstance(v, int)]
    letter = {}
    for n in names:
        letter.setdefault(n, _LETTERS[len(letter)])
    src = "".join(letter[n] for n in names)
    kept = [a for a in node.out if a is not None]
    dst = "".join(letter[a] for a in kept)
    equation = None if src == dst else f"...{src}->...{dst}"
    new_axes = [k + 1 for k, a in enumerate(node.out) if a is None]

    def run(x):
        for k, v in reversed(picks):
            x = x.select(k + 1, v)
        if equation is not None:
            x = torch.einsum(equation, x)
        for k in new_axes:
            x = x.unsqueeze(k)
        return x
    return run


def lower_node(rec: ir.Recurrence, i: int, sizes: dict, dtype, device):
    """A closure computing node `i` from its operands' values (or None for leaves)."""
    node = rec.node(i)
    if isinstance(node, ir.Const):
        # Through float64, so a constant beyond the dtype's range rounds to inf as IEEE says.
        value = torch.full((1,), node.value, dtype=torch.float64, device=device).to(dtype)
        return lambda: value
    if isinstance(node, ir.Elementwise):
        if node.op is Op.WHERE:
            return torch.where
        return _UNARY.get(node.op) or _BINARY[node.op]
    if isinstance(node, ir.Contract):
        subs, out = list(node.subscripts), node.out
        return lambda *xs: contract.einsum(subs, out, xs)
    if isinstance(node, ir.Reduce):
        dims = tuple(a + 1 for a in node.axes)
        if node.op is Op.ADD:
            return lambda x: x.sum(dim=dims)
        return lambda x: x.amax(dim=dims)
    if isinstance(node, ir.Select):
        return _select(node)
    if isinstance(node, ir.Broadcast):
        shape = concrete(rec.attr(i, "shape"), sizes)
        return lambda x: x.expand(x.shape[0], *shape)
    if isinstance(node, (ir.StateWrite, ir.Output)):
        return lambda x: x
    return None  # Input, Param, StateRead: supplied by the caller


def lower_nodes(rec: ir.Recurrence, ids, sizes: dict, dtype, device) -> list:
    """[(node id, closure, operand ids)] for the non-leaf nodes among `ids`, in order."""
    prog = []
    for i in ids:
        fn = lower_node(rec, i, sizes, dtype, device)
        if fn is not None:
            prog.append((i, fn, ir.operands(rec.node(i))))
    return prog


def run_program(prog: list, env: dict) -> dict:
    """Evaluate a lowered program; `env` maps node ids to values and is filled in."""
    for i, fn, args in prog:
        env[i] = fn(*(env[a] for a in args))
    return env


def hoisted_env(rec: ir.Recurrence, prog: list, params: dict, inputs: dict, t0: int = 0,
                L: int | None = None, env: dict | None = None) -> dict:
    """The values of steps [t0, t0 + L) (every step by default) that need no state: each input
    [B, T, ...] sliced and flattened to [B*L, ...], each param with a batch axis of 1, and what
    the state-free program `prog` (from `lower_nodes`) computes from them. env: the dict to
    fill (default a new one); an input missing from `inputs` must be supplied by it."""
    env = {} if env is None else env
    for d in rec.inputs:
        if d.name not in inputs:
            continue
        x = inputs[d.name]
        x = x[:, t0:] if L is None else x[:, t0:t0 + L]
        env[d.node] = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    for d in rec.params:
        env[d.node] = params[d.name].unsqueeze(0)
    run_program(prog, env)
    return env


class StepProgram:
    """A recurrence split for the loop backends (sequential, newton): the hoisted program
    (state-free work, run once over all B*T positions) and the core (one step), lowered once
    per (sizes, dtype, device)."""

    def __init__(self, rec: ir.Recurrence, analysis):
        self.rec = rec
        self.hoisted = [i for i in rec.order() if i in analysis.hoisted]
        self.core = list(analysis.core)
        self._cache = {}

    def lowered(self, sizes, dtype, device) -> tuple:
        """(hoisted program, core program), as lower_nodes gives them."""
        key = (tuple(sorted(sizes.items())), dtype, device)
        if key not in self._cache:
            self._cache[key] = (lower_nodes(self.rec, self.hoisted, sizes, dtype, device),
                                lower_nodes(self.rec, self.core, sizes, dtype, device))
        return self._cache[key]

    def values(self, core_prog, env: dict, B: int, T: int) -> tuple:
        """(per_step, fixed): the hoisted values the core, the outputs and the state writes
        read from outside the core. per_step {node: [B, T, ...]} for values that vary over
        the batch, fixed {node: value with a batch axis of 1} for those that do not."""
        rec, core = self.rec, set(self.core)
        used = {a for _, _, args in core_prog for a in args if a not in core}
        used |= {o.node for o in rec.outputs if o.node not in core}
        used |= {s.write for s in rec.states if s.write is not None and s.write not in core}
        per_step, fixed = {}, {}
        for a in sorted(used):
            if rec.attr(a, "batched"):
                per_step[a] = env[a].reshape(B, T, *env[a].shape[1:])
            else:
                fixed[a] = env[a]
        return per_step, fixed

    def state_free_output(self, o, per_step, fixed, B, T, shape):
        """An output that reads no state, computed for all T at once: [B, T, *shape]."""
        v = per_step[o.node] if o.node in per_step else fixed[o.node].unsqueeze(1)
        return v.expand(B, T, *shape)
