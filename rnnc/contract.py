"""Sums of products of several tensors (einsum) in a cheap pairwise order.

torch.einsum contracts its operands left to right unless opt_einsum is installed, which rnnc
does not depend on. Left to right can build an intermediate far larger than anything the
spec asks for: Gated DeltaProduct's cross term `b1 * k2[i] * (k2 . k1) * b2` meets k2[i] and
k1[c] before c is summed away, a [N, K, K] product where [N, K] would do (60% of that
example's chunked forward on CPU). `einsum` here picks, at each step, the pair of operands
whose product is smallest once every label that nothing else needs is summed out (the
usual greedy order), and hands each pair to torch.einsum.

Subscripts are letters after a shared leading "..." (the batch axes, broadcast as einsum
does); the leading axes are left out of the size estimate, since every operand carries
them.
"""
from __future__ import annotations

import torch


def einsum(subs: list, out: str, operands: list) -> torch.Tensor:
    """`torch.einsum(",".join("..." + s for s in subs) + "->..." + out, *operands)`, contracted
    pairwise, smallest result first. subs: one string of letters per operand (its trailing
    axes); out: the letters kept, in order."""
    subs, ops = list(subs), list(operands)
    if len(ops) <= 2:
        return torch.einsum(",".join("..." + s for s in subs) + "->..." + out, *ops)
    size = {}
    for s, x in zip(subs, ops):
        for c, n in zip(s, x.shape[x.dim() - len(s):]):
            size[c] = max(size.get(c, 1), int(n))
    while len(ops) > 2:
        best = None
        for i in range(len(ops)):
            for j in range(i + 1, len(ops)):
                others = set(out).union(*(subs[k] for k in range(len(ops)) if k not in (i, j)))
                keep = "".join(dict.fromkeys(c for c in subs[i] + subs[j] if c in others))
                cost = 1
                for c in keep:
                    cost *= size[c]
                if best is None or cost < best[0]:
                    best = (cost, i, j, keep)
        _, i, j, keep = best
        x = torch.einsum(f"...{subs[i]},...{subs[j]}->...{keep}", ops[i], ops[j])
        subs = [s for k, s in enumerate(subs) if k not in (i, j)] + [keep]
        ops = [o for k, o in enumerate(ops) if k not in (i, j)] + [x]
    return torch.einsum(",".join("..." + s for s in subs) + "->..." + out, *ops)
