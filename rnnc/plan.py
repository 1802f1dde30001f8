"""Stage 4a: the plan, and the backend that runs it. Entry point: `choose`.

The plan comes from the analysis (`Analysis.plan`): sequential, elementwise_scan, chunked,
chunked_delta or dense_scan. The backend is the user's request, or for "auto" the best
backend that can run the plan on the inputs' device.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RnncError


@dataclass(frozen=True)
class Plan:
    kind: str    # sequential | elementwise_scan | chunked | chunked_delta | dense_scan
    reason: str  # one line, for humans


def choose(rec, analysis) -> Plan:
    return Plan(analysis.plan, analysis.plan_reason)


# Preference order for backend="auto": the first one that can run the recurrence wins.
AUTO_ORDER = ("scan", "sequential")


def pick_backend(requested: str, rec, analysis, available: dict, get) -> str:
    """The backend to use: `requested`, or for "auto" the first legal one in AUTO_ORDER."""
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in available and get(name).unsupported(rec, analysis) is None:
                return name
        return "sequential"
    if requested not in available:
        raise RnncError(f"unknown backend {requested!r} (available: auto, {', '.join(available)})")
    reason = get(requested).unsupported(rec, analysis)
    if reason is not None:
        # Point at the expression that blocks the plan, when the analysis found one.
        where = next((f.where for f in analysis.states if f.where is not None), None)
        raise RnncError(f"backend {requested!r} cannot run rnn {rec.name}: {reason}",
                        line=getattr(where, "line", None), col=getattr(where, "col", None))
    return requested


class DeviceDispatch:
    """backend="auto": the Triton runner for CUDA inputs when Triton applies, the CPU choice
    (scan or sequential) otherwise. The Triton runner is built on first CUDA use; a call it
    cannot take (float64, or a state too wide for its registers) runs on the CPU choice.
    Like the Triton runner it takes bfloat16/float16 inputs as they are (`native_inputs`);
    the CPU choice gets them cast to float32, the compute dtype, as the module would."""

    native_inputs = True

    def __init__(self, fallback, build_gpu):
        self.fallback, self._build_gpu, self._gpu = fallback, build_gpu, None

    def _cpu(self, sizes, params, inputs, state0):
        import torch
        inputs = {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v)
                  for k, v in inputs.items()}
        return self.fallback(sizes, params, inputs, state0)

    def __call__(self, sizes, params, inputs, state0):
        from .errors import RnncError
        ref = next(iter(inputs.values()), None)
        import torch
        if ref is None or ref.device.type != "cuda" or ref.dtype not in (
                torch.float32, torch.bfloat16, torch.float16):
            return self._cpu(sizes, params, inputs, state0)
        if self._gpu is None:
            self._gpu = self._build_gpu()
        try:
            return self._gpu(sizes, params, inputs, state0)
        except RnncError:  # not applicable at these sizes: the reference path still is
            return self._cpu(sizes, params, inputs, state0)
