"""The newton backend: any recurrence, nonlinear ones included, solved in parallel over time by
Newton's method (DEER, Lim et al. 2024; ParaRNN, Danieli et al. 2025).

All states are flattened into one vector h [B, n]. Over a block of L steps, a guess of every
state h_0 .. h_{L-1} is improved by linearising the step h_t = f(h_{t-1}, x_t) around it:

    h'_t = J_t h'_{t-1} + (f(h_{t-1}) - J_t h_{t-1}),   J_t = df/dh at the guess h_{t-1},

an affine recurrence in h', solved by a scan of matrix products (scan_kernels.dense_scan).
Steps 1..k are exact after k iterations whatever the guess, so a block needs at most L of
them; smooth cells converge in a handful. The Jacobians come from forward-mode autodiff of
the same step the sequential backend interprets (one batched jvp per state entry), so every
spec runs, whatever its ops. A block whose iterates turn non-finite, or that has not
converged after L iterations, is stepped through one step at a time instead: exact either way.

Gradients use the implicit function theorem at the solution, not the iterations: the
adjoint mu_t = d_t + J_{t+1}^T mu_{t+1} (d: what the rest of the graph sends back to h_t) is
one reverse scan of the transposed Jacobians, then one vector-Jacobian product of the step.

Cost: per iteration n evaluations of the step (the jvps) and about one [n, n] matrix product
per step of the block (dense_scan's two-level scan), so the backend suits small states (n up to a few hundred) and long
sequences on wide parallel hardware; on a CPU the sequential loop is usually faster. The
block length is chunk_size (default 64), shortened so that a block's Jacobians stay under
JACOBIAN_LIMIT entries. Where every state has an axis the step never mixes (heads), the
Jacobian is block-diagonal and is computed and scanned block by block (_Blocks): m jvps and
[m, m] products for blocks of m entries instead of n and [n, n].
"""
from __future__ import annotations

import math

import torch

from rnnc import interpret, ir
from rnnc.errors import RnncError

from .axes import axis_classes
from .scan_kernels import dense_scan

NAME = "newton"
DEFAULT_BLOCK = 64
JACOBIAN_LIMIT = 2 ** 24   # entries of one block's Jacobians [B, L, G, m, m] (n = G m)
MAX_STATE = 1024           # entries m of one block of the state (all of it without blocks)
# Converged: no entry moved by more than TOLERANCE eps (1 + the largest |h|) in an iteration
# (Newton's error is then about the square of that)
TOLERANCE = 64
TANGENTS = 2 ** 22         # entries of the tangents evaluated at once ([k, B*L, n]), memory


def unsupported(rec, analysis):
    return None   # every recurrence has a step to linearise


class Runner:
    def __init__(self, rec: ir.Recurrence, analysis, block: int):
        self.rec = rec
        self.program = interpret.StepProgram(rec, analysis)
        self.core = self.program.core
        self.block = block
        self._blocks = {}
        self.iterations = []   # Newton iterations per block of the last call (None: stepped)

    def __call__(self, sizes, params, inputs, state0):
        rec = self.rec
        x0 = next(iter(inputs.values()), None)
        ref = x0 if x0 is not None else next(iter(state0.values()))
        B = ref.shape[0]
        T = x0.shape[1] if x0 is not None else 1
        hoist_prog, core_prog = self.program.lowered(sizes, ref.dtype, ref.device)
        env = interpret.hoisted_env(rec, hoist_prog, params, inputs)
        per_step, fixed = self.program.values(core_prog, env, B, T)
        shapes = [interpret.concrete(s.shape, sizes) for s in rec.states]
        key = tuple(map(tuple, shapes))
        if key not in self._blocks:
            self._blocks[key] = blocks_of(rec, self.core, shapes)
        step = _Step(rec, core_prog, shapes, sorted(fixed), self._blocks[key])
        h = torch.cat([state0[s.name].reshape(B, -1) for s in rec.states], 1) if rec.states \
            else ref.new_zeros(B, 0)
        n, m = h.shape[1], step.blocks.m
        if m > MAX_STATE:
            raise RnncError(f"the newton backend linearises the state, here in blocks of {m} entries "
                            f"that the step mixes (at most {MAX_STATE}): its Jacobians would hold "
                            f"{m}x{m} entries per block and step; use backend='sequential', 'scan' "
                            "or 'triton'")
        L = max(1, min(self.block, JACOBIAN_LIMIT // max(1, B * n * m)))
        names = sorted(per_step)
        fixed_vals = [fixed[a] for a in step.fixed]
        steps = {o.name: [] for o in rec.outputs if o.node in self.core}
        self.iterations = []
        for t0 in range(0, T, L):
            l = min(L, T - t0)
            vals = [per_step[a][:, t0:t0 + l] for a in names]
            Z = _Solve.apply(self, step, names, l, h, *vals, *fixed_vals)  # [B, l, n]
            Hp = torch.cat([h.unsqueeze(1), Z[:, :-1]], 1).reshape(B * l, n)
            out_env = step.run(Hp, dict(zip(names, (v.reshape(B * l, *v.shape[2:]) for v in vals))),
                               fixed_vals)
            for o in rec.outputs:
                if o.name in steps:
                    y = out_env[o.node]
                    steps[o.name].append(y.expand(B * l, *y.shape[1:]).reshape(B, l, *y.shape[1:]))
            h = Z[:, -1]
        outputs = {}
        for o in rec.outputs:
            shape = interpret.concrete(o.shape, sizes)
            if o.name in steps:
                outputs[o.name] = torch.cat(steps[o.name], 1) if T else ref.new_zeros(B, 0, *shape)
            else:
                outputs[o.name] = self.program.state_free_output(o, per_step, fixed, B, T, shape)
        final, off = {}, 0
        for s, shape in zip(rec.states, shapes):
            size = math.prod(shape)
            final[s.name] = h[:, off:off + size].reshape(B, *shape)
            off += size
        return outputs, final

    # --- one block ------------------------------------------------------------------------
    def solve(self, step, names, l, h, vals, fixed_vals):
        """The states after each of the l steps of a block, [B, l, n], from h [B, n] before it;
        vals the block's per-step values [B, l, ...] in `names` order. No autograd."""
        B, n = h.shape
        flat = dict(zip(names, (v.reshape(B * l, *v.shape[2:]) for v in vals)))
        f = lambda Hp: step.states(Hp, flat, fixed_vals)  # noqa: E731
        H = h.unsqueeze(1).expand(B, l, n)
        tol = TOLERANCE * torch.finfo(h.dtype).eps
        blk = step.blocks
        for it in range(1, l + 2):
            Hp = torch.cat([h.unsqueeze(1), H[:, :-1]], 1).reshape(B * l, n)
            J = blk.jacobian(f, Hp)                                        # [B*l, G, m, m]
            c = blk.split(f(Hp)) - (J @ blk.split(Hp).unsqueeze(-1)).squeeze(-1)
            Hn = blk.join(blk.scan(J, c, blk.split(h), B, l))
            if not bool(torch.isfinite(Hn).all()):
                break
            moved = float((Hn - H).abs().max()) if n else 0.0
            H = Hn
            if moved <= tol * (1.0 + float(H.abs().max()) if n else 1.0):
                self.iterations.append(it)
                return H
        self.iterations.append(None)
        return step.stepwise(h, flat, fixed_vals, B, l)


class _Step:
    """The recurrent core as a batched function of the flattened states: M rows at once."""

    def __init__(self, rec, prog, shapes, fixed_names, blocks):
        self.rec, self.prog, self.shapes, self.fixed = rec, prog, shapes, fixed_names
        self.sizes = [math.prod(s) for s in shapes]
        self.blocks = blocks

    def run(self, Hp, vals: dict, fixed_vals) -> dict:
        """The core's values for rows of previous states Hp [M, n] and per-row values."""
        env = dict(zip(self.fixed, fixed_vals))
        env.update(vals)
        M, off = Hp.shape[0], 0
        for s, shape, size in zip(self.rec.states, self.shapes, self.sizes):
            env[s.read] = Hp[:, off:off + size].reshape(M, *shape)
            off += size
        return interpret.run_program(self.prog, env)

    def states(self, Hp, vals, fixed_vals):
        """The new states [M, n]."""
        env = self.run(Hp, vals, fixed_vals)
        M = Hp.shape[0]
        parts = [(env[s.write] if s.write is not None else env[s.read]).expand(M, *shape).reshape(M, -1)
                 for s, shape in zip(self.rec.states, self.shapes)]
        return torch.cat(parts, 1) if parts else Hp

    def stepwise(self, h, flat, fixed_vals, B, l):
        """The block one step at a time (exact): [B, l, n]."""
        rows = {a: v.view(B, l, *v.shape[1:]) for a, v in flat.items()}
        out = []
        for t in range(l):
            h = self.states(h, {a: v[:, t] for a, v in rows.items()}, fixed_vals)
            out.append(h)
        return torch.stack(out, 1)


class _Blocks:
    """The step's Jacobian is block-diagonal when every state has an axis along which the step
    never mixes (a head axis: ParaRNN's multi-head cells, or every axis of an elementwise
    state): entries with different indices along those axes never meet (backends/axes.py).
    perm [G, m] lists the flat state entries of each of the G blocks; the Jacobian is kept
    as its G diagonal blocks [m, m], found with m Jacobian-vector products (one tangent per
    in-block position, every block at once) and scanned as G independent recurrences."""

    def __init__(self, perm: torch.Tensor):
        self.perm = perm
        self.G, self.m = perm.shape

    def split(self, x):
        """[..., n] -> [..., G, m]"""
        return x[..., self.perm.to(x.device)]

    def join(self, x):
        """[..., G, m] -> [..., n]"""
        out = x.new_empty(*x.shape[:-2], self.G * self.m)
        out[..., self.perm.to(x.device).flatten()] = x.flatten(-2)
        return out

    def jacobian(self, f, Hp):
        """J [M, G, m, m]: J[r, g, i, j] = d f(Hp)[r, perm[g, i]] / d Hp[r, perm[g, j]]; row r
        of f reads only row r of Hp, and block g only its own entries."""
        M, n = Hp.shape
        if n == 0:
            return Hp.new_zeros(M, self.G, self.m, self.m)
        perm = self.perm.to(Hp.device)
        E = Hp.new_zeros(self.m, n)
        E[torch.arange(self.m, device=Hp.device).repeat(self.G), perm.flatten()] = 1.0
        cols = torch.func.vmap(lambda e: torch.func.jvp(f, (Hp,), (e.expand(M, n),))[1],
                               chunk_size=max(1, TANGENTS // max(1, M * n)))(E)   # [m, M, n]
        return cols[..., perm].permute(1, 2, 3, 0)

    def scan(self, J, c, h0, B, l, reverse=False):
        """The G recurrences h_t = J_t h_{t-1} + c_t of a block of l steps: J [B*l, G, m, m],
        c [B*l, G, m], h0 [B, G, m] -> [B, l, G, m]."""
        G, m = self.G, self.m
        A = J.view(B, l, G, m, m).transpose(1, 2).reshape(B * G, l, m, m)
        b = c.view(B, l, G, m).transpose(1, 2).reshape(B * G, l, m)
        out, _ = dense_scan(A, b, h0.reshape(B * G, m))
        return out.view(B, G, l, m).transpose(1, 2)


def blocks_of(rec, core, shapes) -> _Blocks:
    """The Jacobian's blocks: the parallel axis classes every state has (one block when some
    state has none)."""
    states = list(rec.states)
    n = sum(math.prod(s) for s in shapes)
    if not states:
        return _Blocks(torch.zeros(1, 0, dtype=torch.long))
    cls, _, parallel = axis_classes(rec, set(core) | {s.read for s in states})
    per = [{cls.get((s.read, k)): k for k in range(len(s.shape)) if cls.get((s.read, k)) in parallel}
           for s in states]
    common = sorted(set.intersection(*(set(p) for p in per)))
    parts, off = [], 0
    for s, shape, axes in zip(states, shapes, per):
        size = math.prod(shape)
        idx = torch.arange(off, off + size).reshape(shape)
        lead = [axes[c] for c in common]
        if shape:
            idx = idx.permute(*lead, *[k for k in range(len(shape)) if k not in lead])
        G = math.prod(shape[k] for k in lead)
        parts.append(idx.reshape(G, -1))
        off += size
    perm = torch.cat(parts, 1)
    assert perm.numel() == n
    return _Blocks(perm)


class _Solve(torch.autograd.Function):
    """Z [B, l, n], the states after each step of a block, as a function of the state h
    before it and the block's values; its backward is the implicit-function adjoint."""

    @staticmethod
    def forward(ctx, runner, step, names, l, h, *values):
        nvals = len(names)
        vals, fixed_vals = list(values[:nvals]), list(values[nvals:])
        Z = runner.solve(step, names, l, h, vals, fixed_vals)
        ctx.step, ctx.names, ctx.nvals = step, names, nvals
        ctx.save_for_backward(h, Z, *values)
        return Z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d):
        h, Z, *values = ctx.saved_tensors
        step, names, nvals = ctx.step, ctx.names, ctx.nvals
        B, l, n = Z.shape
        vals, fixed_vals = values[:nvals], values[nvals:]
        Hp = torch.cat([h.unsqueeze(1), Z[:, :-1]], 1).reshape(B * l, n)
        flat = [v.reshape(B * l, *v.shape[2:]) for v in vals]
        f = lambda Hp_: step.states(Hp_, dict(zip(names, flat)), list(fixed_vals))  # noqa: E731
        blk = step.blocks
        G, m = blk.G, blk.m
        J = blk.jacobian(f, Hp).view(B, l, G, m, m)
        # mu_t = d_t + J_{t+1}^T mu_{t+1}: a scan over reversed time, J shifted by one step
        A = torch.cat([J[:, 1:], J.new_zeros(B, 1, G, m, m)], 1).transpose(-1, -2).flip(1)
        mu = blk.scan(A.reshape(B * l, G, m, m), blk.split(d.flip(1)).reshape(B * l, G, m),
                      d.new_zeros(B, G, m), B, l)
        mu = blk.join(mu).flip(1).reshape(B * l, n)
        with torch.enable_grad():
            Hp_ = Hp.detach().requires_grad_()
            flat_ = [v.detach().requires_grad_(ctx.needs_input_grad[5 + k]) for k, v in enumerate(flat)]
            fixed_ = [v.detach().requires_grad_(ctx.needs_input_grad[5 + nvals + k])
                      for k, v in enumerate(fixed_vals)]
            S = step.states(Hp_, dict(zip(names, flat_)), fixed_)
            wrt = [Hp_] + [v for v in flat_ + fixed_ if v.requires_grad]
            grads = list(torch.autograd.grad(S, wrt, mu, allow_unused=True)) if S.requires_grad \
                else [None] * len(wrt)
        g_Hp = grads.pop(0)
        g_h = None if g_Hp is None else g_Hp.view(B, l, n)[:, 0]
        out = []
        for k, v in enumerate(flat_ + fixed_):
            g = grads.pop(0) if v.requires_grad else None
            if g is not None and k < nvals:
                g = g.view(vals[k].shape)
            out.append(g)
        return (None, None, None, None, g_h, *out)


def build(rec, analysis, chunk_size=None):
    return Runner(rec, analysis, DEFAULT_BLOCK if chunk_size is None else chunk_size)
