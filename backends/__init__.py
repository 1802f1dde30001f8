"""Backends: each lowers a planned recurrence to something that runs.

Every backend is one module exposing the same interface, and backends never import each
other. Shared semantics live in `rnnc.interpret`; shared machinery lives in library modules
beside the backends (`block_solver`: the block-wise solver of associative plans, run by the
scan backend with PyTorch primitives and by the Triton backend with its chunk kernels;
`chunk_plan`: how its matrix states map onto the chunk forms; `scan_kernels`: those PyTorch primitives; `triton_tune`: the launch-config tuner of the
Triton chunk kernels):

    NAME: str
    unsupported(rec, analysis) -> str | None
        Why this backend cannot run the recurrence (None when it can).
    build(rec, analysis, chunk_size=None) -> Runner
        Compile-time work (chunk_size: time steps per chunk, for backends that chunk); the
        Runner is called as
        runner(sizes, params, inputs, state0) -> (outputs, final_state)
        sizes:   {dim name: int}
        params:  {name: Tensor [*shape]} in the compute dtype
        inputs:  {name: Tensor [B, T, *shape]} in the compute dtype
        state0:  {name: Tensor [B, *shape]} in the compute dtype
        outputs: {name: Tensor [B, T, *shape]};  final_state: {name: Tensor [B, *shape]}
    Runner.native_inputs: bool (optional; absent means False)
        True: when the inputs are bfloat16 or float16 and the compute dtype is float32, the
        runner takes the inputs in their own dtype (params and state0 stay float32) and
        computes in float32 itself; its outputs come back in the inputs' dtype or in float32,
        its final states in float32. A runner without it always gets compute-dtype inputs.
        The attribute is read on the object the module calls (a wrapper that does not
        declare it gets cast inputs, whatever it wraps).
"""
from __future__ import annotations

import importlib

# Name -> module, imported on first use so that `import rnnc` stays light.
AVAILABLE = {
    "sequential": "rnnc.backends.sequential",
    "scan": "rnnc.backends.scan",
    "triton": "rnnc.backends.triton_backend",
    "newton": "rnnc.backends.newton",
}


def get(name: str):
    return importlib.import_module(AVAILABLE[name])
