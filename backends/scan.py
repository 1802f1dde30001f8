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
# ... for states of B*S ~ 16k elements (s6 at B=4: 32- and 128-step blocks within noise).
# Smaller states get longer blocks, up to about this many state elements per block: each block
# costs some 40 small PyTorch calls whatever its size, which dominated minGRU (S=[256]) at 64
# steps (measured on 2 threads, B=4, T=4096: 1024-step blocks 1.8x faster than 64-step ones,
# 256-1024 within noise of each other, 4096 steps 1.3x slower again).
ELEMENTWISE_BLOCK_ELEMENTS = 1 << 20
# Chunks per block: the kernels batch the chunks of a block together, in cache-sized groups
# (scan_kernels._GROUP_ELEMENTS), so a long block costs no cache misses; each block costs a
# copy of its slice of every input. 64 measured 10-15% faster than 16 for gla and retnet (B=4,
# H=4, T=4096, 2 threads), gated_deltanet within noise.
BLOCK_CHUNKS = 64


def unsupported(rec, analysis):
    if analysis.plan == "sequential":
        return f"the recurrence is not associative: {analysis.plan_reason}"
    return None


def build(rec, analysis, chunk_size=None):
    matrix = any(f.method in ("chunked", "chunked_delta") for f in analysis.states)
    if matrix:
        chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
        return BlockSolver(rec, analysis, scan_kernels, chunk_size, block=chunk_size * BLOCK_CHUNKS)
    if chunk_size is not None:  # a block length asked for is kept exactly
        return BlockSolver(rec, analysis, scan_kernels, chunk_size)
    return BlockSolver(rec, analysis, scan_kernels, ELEMENTWISE_CHUNK,
                       block_elements=ELEMENTWISE_BLOCK_ELEMENTS)
