"""Packed sequences of different lengths, in flash-linear-attention's `cu_seqlens` convention.

    y, final = m(*xs, cu_seqlens=cu, initial_state=None, output_final_state=True)

Each input holds N sequences back to back along time, [1, T_total, *shape]: sequence i is
steps cu[i]:cu[i+1], with cu [N + 1] integers, cu[0] = 0, cu[N] = T_total. Every sequence
starts from its own initial state (`initial_state` {name: [N, *shape]}, or the spec's
initial values) and never sees another's steps. Outputs come back packed the same way,
[1, T_total, *shape], and final states per sequence, {name: [N, *shape]}.

How: the sequences are run as one ordinary batch per distinct length, never padded. With
the distinct lengths l_1 < l_2 < ... < l_m, stage j runs steps l_{j-1}..l_j - 1 of every
sequence at least l_j long, from the states the previous stage left. So equal lengths cost
one call, and any backend (and plan) computes packed batches exactly as it computes
batches: padding would have needed steps that leave a state alone, which differ per spec.
"""
from __future__ import annotations

import itertools

import torch


def lengths_of(cu_seqlens, total: int, error) -> list:
    """The N sequence lengths from cu_seqlens ([N + 1] integers, as a tensor or a list),
    checked against the inputs' T_total; error(message) makes the exception to raise."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex() \
                or cu_seqlens.dtype == torch.bool:
            raise error(f"cu_seqlens must be a 1-D integer tensor [N + 1], got "
                        f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
    elif isinstance(cu_seqlens, (list, tuple)) and all(
            isinstance(c, int) and not isinstance(c, bool) for c in cu_seqlens):
        cu = list(cu_seqlens)
    else:
        raise error("cu_seqlens must be a 1-D integer tensor or a list of ints [N + 1]")
    if len(cu) < 2:
        raise error(f"cu_seqlens must hold at least two offsets (one sequence), got {cu}")
    if cu[0] != 0 or cu[-1] != total:
        raise error(f"cu_seqlens must start at 0 and end at the inputs' length T = {total}, "
                    f"got {cu[0]} ... {cu[-1]}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 1), None)
    if bad is not None:
        raise error(f"cu_seqlens must increase strictly (every sequence at least one step): "
                    f"sequence {bad} runs from {cu[bad]} to {cu[bad + 1]}")
    return lengths


def run_packed(run, xs, cu_seqlens, initial_state, error):
    """run(xs, initial_state) -> (outputs, final): the module on an ordinary batch, xs
    [B, T, *shape]. Returns (outputs, final) for the packed batch: outputs as run returns
    them (a tensor or a tuple), each [1, T_total, *shape]; final {name: [N, *shape]}."""
    if any(not isinstance(x, torch.Tensor) or x.dim() < 2 for x in xs):
        raise error("with cu_seqlens every input must be a tensor [1, T_total, *shape]")
    wide = [x.shape[0] for x in xs if x.shape[0] != 1]
    if wide:
        raise error(f"with cu_seqlens the inputs hold the sequences back to back, batch size 1; "
                    f"got batch size {wide[0]}")
    total = xs[0].shape[1]
    if any(x.shape[1] != total for x in xs):
        raise error("with cu_seqlens every input must have the same length T_total")
    lengths = lengths_of(cu_seqlens, total, error)
    N, device = len(lengths), xs[0].device
    if len(set(lengths)) == 1:   # equal lengths: one batch [N, L]
        L = lengths[0]
        out, final = run([x.reshape(N, L, *x.shape[2:]) for x in xs], initial_state)
        pack = lambda o: o.reshape(1, N * L, *o.shape[2:])  # noqa: E731
        return (tuple(map(pack, out)) if isinstance(out, tuple) else pack(out)), final
    starts = torch.tensor([0, *itertools.accumulate(lengths[:-1])], device=device)
    size = torch.tensor(lengths, device=device)
    cur, done, pieces, where = initial_state, 0, [], []
    for end in sorted(set(lengths)):
        active = torch.nonzero(size >= end).flatten()      # the sequences with steps done..end-1
        steps = starts[active, None] + torch.arange(done, end, device=device)  # [n, end - done]
        whole = cur is None or len(active) == N
        state = cur if whole else {k: v[active] for k, v in cur.items()}
        out, final = run([x[0][steps] for x in xs], state)
        pieces.append([o.flatten(0, 1) for o in (out if isinstance(out, tuple) else (out,))])
        where.append(steps.flatten())
        cur = final if whole else {k: v.index_copy(0, active, final[k]) for k, v in cur.items()}
        done = end
    order = torch.argsort(torch.cat(where))
    outs = tuple(torch.cat([p[j] for p in pieces])[order].unsqueeze(0) for j in range(len(pieces[0])))
    return (outs if isinstance(out, tuple) else outs[0]), cur
