"""The sequential backend: a PyTorch loop over time, and the reference semantics.

Hoisted work (no state dependence) runs once over all B*T positions; the recurrent core
runs once per step with the IR interpreter of `rnnc.interpret`.
"""
from __future__ import annotations

import torch

from rnnc import interpret, ir

NAME = "sequential"


def unsupported(rec, analysis):
    return None  # every recurrence has a sequential meaning


class Runner:
    def __init__(self, rec: ir.Recurrence, analysis):
        self.rec = rec
        self.program = interpret.StepProgram(rec, analysis)
        self.core = self.program.core

    def __call__(self, sizes, params, inputs, state0):
        rec = self.rec
        x0 = next(iter(inputs.values()), None)
        ref = x0 if x0 is not None else next(iter(state0.values()))
        dtype, device = ref.dtype, ref.device
        B = ref.shape[0]
        T = x0.shape[1] if x0 is not None else 1
        hoist_prog, core_prog = self.program.lowered(sizes, dtype, device)

        # Hoisted work: inputs flattened to [B*T, ...], params with a batch axis of 1.
        env = interpret.hoisted_env(rec, hoist_prog, params, inputs)

        # Values the core reads from hoisted work: per-step slices, or as they are when
        # they do not vary over the batch.
        per_step, fixed = self.program.values(core_prog, env, B, T)
        # unbind, not v[:, t] per step: the backward of T selects would fill a zero gradient
        # of the whole [B, T, ...] tensor each, O(T^2) (13 s for gated_deltanet's hoisted
        # input at T = 512); unbind's is one stack
        steps_of = {a: v.unbind(1) for a, v in per_step.items()}

        state = {s.name: state0[s.name] for s in rec.states}
        steps = {o.name: [] for o in rec.outputs if o.node in self.core}
        for t in range(T):
            step_env = dict(fixed)
            for a, v in steps_of.items():
                step_env[a] = v[t]
            for s in rec.states:
                step_env[s.read] = state[s.name]
            interpret.run_program(core_prog, step_env)
            for s in rec.states:
                if s.write is not None:  # a write that reads no state may be unbatched
                    state[s.name] = step_env[s.write].expand_as(state[s.name])
            for o in rec.outputs:
                if o.name in steps:
                    steps[o.name].append(step_env[o.node])

        outputs = {}
        for o in rec.outputs:
            shape = interpret.concrete(o.shape, sizes)
            if o.name in steps:
                seq = torch.stack(steps[o.name], dim=1) if T else ref.new_zeros(B, 0, *shape)
            else:  # the output depends on no state: it was computed for all T at once
                seq = self.program.state_free_output(o, per_step, fixed, B, T, shape)
            outputs[o.name] = seq
        return outputs, state


def build(rec, analysis, chunk_size=None):
    return Runner(rec, analysis)  # chunk_size: the loop has no chunks
