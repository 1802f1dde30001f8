"""The scan backend: PyTorch lowering that is parallel over time, for associative recurrences.

The work is done by `block_solver.BlockSolver` with the PyTorch primitives of
`scan_kernels`: time is cut into blocks, each block's hoisted work and gates run batched
over its steps, elementwise and max-plus states are solved by parallel scans, dense ones by
a scan of matrix products, and matrix states (chunked plans) by the chunk forms of linear
attention and the delta rule, whose readouts come out without materialising the state per
step. Everything is plain PyTorch: it runs on any device, in float32 and float64, and
autograd differentiates it.
"""
from __future__ import annotations

from . import scan_kernels
from .block_solver import BlockSolver

NAME = "scan"
DEFAULT_CHUNK = 64        # matrix states: the chunk forms cost O(L^2) per chunk
ELEMENTWISE_CHUNK = 64    # only materialised states: a block this size stays in cache (measured best on CPU)
BLOCK_CHUNKS = 16         # chunks per block: the kernels batch the chunks of a block together


def unsupported(rec, analysis):
    if analysis.plan == "sequential":
        return f"the recurrence is not associative: {analysis.plan_reason}"
    for f in analysis.states:
        if f.method == "chunked_delta":
            for terms in f.readouts.values():
                if any(t.state is not None and t.state[0] == "old" for t in terms):
                    return (f"state {f.name} is read before its delta-rule update; the chunked "
                            "delta rule computes readouts of the new state only")
    return None


def build(rec, analysis, chunk_size=None):
    matrix = any(f.method in ("chunked", "chunked_delta") for f in analysis.states)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK if matrix else ELEMENTWISE_CHUNK
    return BlockSolver(rec, analysis, scan_kernels, chunk_size,
                       block=chunk_size * BLOCK_CHUNKS if matrix else chunk_size)
