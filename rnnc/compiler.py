"""`rnnc.compile`: parse, check, analyse, plan, lower."""
from __future__ import annotations

import os
from pathlib import Path

from . import analysis as analysis_mod
from . import check as check_mod
from . import parse as parse_mod
from . import plan as plan_mod
from . import syntax
from .errors import RnncError


def _read(spec) -> tuple:
    """(source text, file name) for a path, or for .rnn text given directly."""
    if isinstance(spec, str) and (not spec.strip() or "\n" in spec or "{" in spec
                                  or spec.lstrip().startswith("rnn ")):
        return spec, "<spec>"
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        try:
            return path.read_text(), str(spec)
        except FileNotFoundError:
            raise RnncError("no such file", filename=str(spec)) from None
        except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a NUL in the path
            raise RnncError(f"cannot read the file: {e}", filename=str(spec)) from None
    raise RnncError(f"expected a path or .rnn source text, got {type(spec).__name__}")


def load(spec, name: str | None = None):
    """Parse and check a spec; return the `ir.Recurrence` called `name` (or the only one)."""
    if isinstance(spec, syntax.Program):
        program = spec
    elif hasattr(spec, "to_program"):  # a builder spec (rnnc.builder)
        program = spec.to_program()
    else:
        source, filename = _read(spec)
        program = parse_mod.parse(source, filename)
    recs = check_mod.check(program)
    if name is None:
        if len(recs) > 1:
            names = ", ".join(r.name for r in recs)
            raise RnncError(f"the file defines several recurrences ({names}); pass name=... "
                            "to rnnc.compile, or --name on the command line",
                            filename=program.filename)
        return recs[0]
    for r in recs:
        if r.name == name:
            return r
    names = ", ".join(r.name for r in recs)
    raise RnncError(f"no rnn named {name!r} (found: {names})", filename=program.filename)


def check_dims(rec, dims: dict) -> None:
    """Dim sizes given by a caller: names the recurrence has, positive integers, not absurd."""
    for k, v in dims.items():
        if k not in rec.dims:
            known = ", ".join(rec.dims) or "none"
            raise RnncError(f"unknown dim {k!r} (rnn {rec.name} has dims: {known})")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RnncError(f"dim {k} must be a positive integer, got {v!r}")
        if v > 2 ** 40:
            raise RnncError(f"dim {k}={v} is too large (at most 2**40)")


def compile(spec, name: str | None = None, backend: str = "sequential", chunk_size: int | None = None,
            **dims):
    """Compile a .rnn file, .rnn source text or builder spec into an `nn.Module`.

    backend: "sequential" (the reference loop), "scan" (parallel over time), "triton"
    (generated fused GPU kernels), or "auto" (triton for CUDA float32/bf16/fp16 inputs where it applies,
    else scan where the plan allows, else sequential).
    chunk_size: time steps per chunk: the scan backend's (default 64), the Triton scan kernel's
    (default 32) and the Triton chunk kernels' (16, 32 or 64; default: tuned on the GPU).
    dims: sizes of the spec's dims (`H=4, K=16`). Dims used by params must be given; the
    others may come from the inputs at call time.
    """
    def bad_chunk():
        return chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                           or chunk_size < 1)
    from .backends import AVAILABLE, get
    from .module import RecurrentModule, check_indices, dims_for_params

    rec = load(spec, name)
    try:
        if bad_chunk():
            raise RnncError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        check_dims(rec, dims)
        dims_for_params(rec, dims)
        check_indices(rec, dims)
    except RnncError as err:
        raise err.located(rec.source, rec.filename) from None
    facts = analysis_mod.analyse(rec)
    plan = plan_mod.choose(rec, facts)
    try:
        chosen = plan_mod.pick_backend(backend, rec, facts, AVAILABLE, get)
    except RnncError as err:
        raise err.located(rec.source, rec.filename) from None
    runner = get(chosen).build(rec, facts, chunk_size)
    module = RecurrentModule(rec, facts, plan, chosen, runner, dims)
    if backend == "auto" and "triton" in AVAILABLE:
        triton = get("triton")
        if triton.available() is None and triton.unsupported(rec, facts) is None:
            module._runner = plan_mod.DeviceDispatch(runner, lambda: triton.build(rec, facts))
            module.gpu_backend = "triton"  # used for CUDA float32/bf16/fp16 inputs
    return module
