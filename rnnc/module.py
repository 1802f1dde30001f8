"""The compiled `nn.Module`: params, the calling convention, and runtime input checks.

    y = m(*xs)                                   # each x [B, T, *shape] -> y [B, T, *shape]
    y, final = m(*xs, initial_state=None, output_final_state=True)
    y, final = m(*xs, cu_seqlens=cu, ...)       # N sequences packed: x [1, T_total, *shape]
    y_t, state = m.step(*x_ts, state=None)       # each x_t [B, *shape]

Several outputs come back as a tuple in header order. States are dicts {name: [B, *shape]}.
Computation runs in the promoted dtype of inputs and params, at least float32; outputs come
back in the inputs' dtype, states stay in the compute dtype. Inputs are cast to the compute
dtype before the backend sees them, except bfloat16/float16 inputs with a float32 compute
dtype on a backend runner that declares `native_inputs` (the Triton backend): it reads them
in their own dtype and writes the outputs in it (see `rnnc.backends`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ir, varlen
from .errors import RnncError
from .interpret import concrete


_MAX_ELEMENTS = 2 ** 40  # far beyond any machine: a size this large is a mistake


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def dims_for_params(rec: ir.Recurrence, given: dict) -> None:
    """Every dim a param uses must be given; every other dim must be inferable from inputs."""
    # A dim comes from the inputs when some input axis leaves it as the only unknown, once the
    # given dims and the dims solved so far are known (x[4*H] fixes H; x[H*K] alone fixes none).
    from_inputs, known = set(), set(given)
    progress = True
    while progress:
        progress = False
        for d in rec.inputs:
            for s in d.shape:
                unknown = {x.name for x in s.free_symbols} - known
                if len(unknown) == 1:
                    known |= unknown
                    from_inputs |= unknown
                    progress = True
    for p in rec.params:
        for s in p.shape:
            for x in sorted(s.free_symbols, key=lambda x: x.name):
                if x.name not in given:
                    raise RnncError(f"dim {x.name} has no size: param {p.name}{ir.shape_str(p.shape)} "
                                    f"needs it; pass {x.name}=... to rnnc.compile",
                                    line=p.pos.line, col=p.pos.col)
    in_inputs = {x.name for d in rec.inputs for s in d.shape for x in s.free_symbols}
    for name in rec.dims:
        if name not in given and name not in from_inputs:
            pos = rec.dim_pos[name]
            why = ("the inputs do not fix it on its own (it appears only in products of unknown "
                   "dims)" if name in in_inputs else "it appears in no input")
            raise RnncError(f"dim {name} has no size: {why}, so pass {name}=... to rnnc.compile",
                            line=pos.line, col=pos.col)


def check_indices(rec: ir.Recurrence, sizes: dict) -> None:
    """Integer indices on axes whose size is now known must be in range."""
    for i in rec.order():
        node = rec.node(i)
        if not isinstance(node, ir.Select):
            continue
        shape = rec.attr(node.arg, "shape")
        for k, v in enumerate(node.index):
            if not isinstance(v, int):
                continue
            if not {x.name for x in shape[k].free_symbols} <= set(sizes):
                continue
            n = concrete((shape[k],), sizes)[0]
            if not -n <= v < n:
                pos = rec.attr(i, "pos")
                raise RnncError(f"index {v} is out of range for an axis of size {shape[k]} = {n}",
                                line=pos.line, col=pos.col).located(rec.source, rec.filename)


def _init_param(p: ir.ParamDecl, shape: tuple) -> torch.Tensor:
    t = torch.empty(shape)
    kind, args = p.init.kind, p.init.args
    with torch.no_grad():
        if kind == "default":  # nn.Linear's rule: uniform(+-1/sqrt(fan_in)) over the last axis
            bound = 1.0 / math.sqrt(shape[-1]) if shape else 1.0
            t.uniform_(-bound, bound)
        elif kind == "const":
            t.fill_(args[0])
        elif kind == "normal":
            t.normal_(0.0, args[0])
        else:
            t.uniform_(args[0], args[1])
    return t


class RecurrentModule(nn.Module):
    """A compiled recurrence. Construct it with `rnnc.compile`."""

    def __init__(self, rec: ir.Recurrence, analysis, plan, backend, runner, dims: dict):
        super().__init__()
        self.recurrence = rec
        self.analysis = analysis
        self.plan = plan
        self.backend = backend
        self.gpu_backend = None  # backend="auto": the backend CUDA inputs use, when another
        self._runner = runner
        self._given = dict(dims)
        self._checked = set()
        for p in rec.params:
            shape = concrete(p.shape, dims)
            try:
                value = _init_param(p, shape)
            except (RuntimeError, MemoryError) as e:  # an absurd size: say which param
                raise RnncError(f"cannot allocate param {p.name}{list(shape)}: {str(e).splitlines()[0]}",
                                line=p.pos.line, col=p.pos.col).located(rec.source, rec.filename) from None
            self.register_parameter(p.name, nn.Parameter(value))

    def extra_repr(self) -> str:
        dims = "".join(f", {k}={v}" for k, v in self._given.items())
        return f"rnn {self.recurrence.name}, backend={self.backend}{dims}"

    def _error(self, message: str) -> RnncError:
        return RnncError(message, filename=f"rnn {self.recurrence.name}")

    # --- argument checking ---------------------------------------------------------------------
    def _bind(self, xs, lead: int) -> tuple:
        """Check inputs ([B, T, *shape] when lead == 2) and solve the dims they fix."""
        rec = self.recurrence
        names = ", ".join(d.name for d in rec.inputs)
        if len(xs) != len(rec.inputs):
            raise self._error(f"takes {len(rec.inputs)} input{'s' if len(rec.inputs) != 1 else ''} "
                              f"({names}), got {len(xs)}")
        sizes = dict(self._given)
        lead_names = ("B", "T")[:lead]
        lead_sizes, dtype, device = None, None, None
        pending = []
        for d, x in zip(rec.inputs, xs):
            if not isinstance(x, torch.Tensor):
                raise self._error(f"input {d.name!r} must be a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise self._error(f"input {d.name!r} must be a floating-point tensor, got {x.dtype}")
            want = [*lead_names, *d.shape]
            if x.dim() != len(want):
                raise self._error(f"input {d.name!r} must have shape {_shape_text(want)} "
                                  f"({len(want)} axes), got {list(x.shape)}")
            if lead_sizes is None:
                lead_sizes, dtype, device = tuple(x.shape[:lead]), x.dtype, x.device
            elif tuple(x.shape[:lead]) != lead_sizes:
                raise self._error(f"input {d.name!r} has {'/'.join(lead_names)} = "
                                  f"{list(x.shape[:lead])}, but earlier inputs have {list(lead_sizes)}")
            if x.dtype != dtype:
                raise self._error(f"input {d.name!r} is {x.dtype} but earlier inputs are {dtype}")
            if x.device != device:
                raise self._error(f"input {d.name!r} is on {x.device} but earlier inputs are on {device}")
            pending += [(d, s, n) for s, n in zip(d.shape, x.shape[lead:])]
        # Solve dims axis by axis: an axis with one unknown dim fixes it.
        progress = True
        while progress:
            progress = False
            for d, s, n in pending:
                unknown = [x for x in s.free_symbols if x.name not in sizes]
                if len(unknown) == 1:
                    rest = s.subs({x: sizes[x.name] for x in s.free_symbols if x.name in sizes})
                    coeff = rest / unknown[0]
                    if coeff.free_symbols or not coeff.is_Integer or n % int(coeff):
                        raise self._error(f"input {d.name!r}: axis {s} cannot have size {n}")
                    sizes[unknown[0].name] = n // int(coeff)
                    progress = True
        for name, value in sizes.items():
            if value < 1:
                raise self._error(f"dim {name} would be {value} from the inputs' shapes; dims must be >= 1")
        for d, s, n in pending:
            if concrete((s,), sizes)[0] != n:
                want = [*lead_names, *[concrete((e,), sizes)[0] for e in d.shape]]
                raise self._error(f"input {d.name!r} must have shape {_shape_text([*lead_names, *d.shape])} "
                                  f"= {_shape_text(want)}, got {list(xs[rec.inputs.index(d)].shape)}")
        key = tuple(sorted(sizes.items()))
        if key not in self._checked:
            check_indices(rec, sizes)
            self._checked.add(key)
        return sizes, lead_sizes, dtype, device

    def _compute_dtype(self, dtype):
        out = torch.promote_types(dtype, torch.float32)
        for p in self.parameters():
            out = torch.promote_types(out, p.dtype)
        return out

    def _state0(self, state, sizes, B, dtype, device) -> dict:
        rec = self.recurrence
        names = {s.name for s in rec.states}
        state = {} if state is None else state
        if not isinstance(state, dict):
            raise self._error("initial_state must be a dict {state name: tensor [B, *shape]} or None")
        for k in state:
            if k not in names:
                raise self._error(f"initial_state has no state {k!r} (states: {', '.join(sorted(names)) or 'none'})")
        out = {}
        for s in rec.states:
            shape = (B, *concrete(s.shape, sizes))
            v = state.get(s.name)
            if v is None:
                init = s.init
                if abs(init) != float("inf") and abs(init) > torch.finfo(dtype).max:
                    init = float("inf") if init > 0 else float("-inf")  # IEEE rounding
                out[s.name] = torch.full(shape, init, dtype=dtype, device=device)
                continue
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise self._error(f"initial state {s.name!r} must have shape [B, {', '.join(map(str, shape[1:]))}]"
                                  f" = {list(shape)}, got {got}")
            if v.device != device:
                raise self._error(f"initial state {s.name!r} is on {v.device} but the inputs are on {device}")
            out[s.name] = v.to(dtype)
        return out

    # --- calling ------------------------------------------------------------------------------------
    def _run(self, xs, state, lead):
        rec = self.recurrence
        sizes, lead_sizes, in_dtype, device = self._bind(xs, lead)
        dtype = self._compute_dtype(in_dtype)
        for name, p in self.named_parameters():
            if p.device != device:
                raise self._error(f"param {name!r} is on {p.device} but the inputs are on {device}; "
                                  "move the module with .to(device)")
        B = lead_sizes[0]
        for what, decl in [("state", s) for s in rec.states] + [("output", o) for o in rec.outputs]:
            n = B * (lead_sizes[1] if lead == 2 and what == "output" else 1)
            for size in concrete(decl.shape, sizes):
                n *= size
            if n > _MAX_ELEMENTS:
                raise self._error(f"{what} {decl.name!r} would hold {n:.3g} elements "
                                  f"(shape {list(concrete(decl.shape, sizes))}); that is beyond any memory")
        if lead == 1:
            xs = [x.unsqueeze(1) for x in xs]
        # A runner that reads bf16/fp16 inputs itself (computing in float32) gets them as they
        # are: a cast here would be one more pass over every input in float32.
        native = (dtype == torch.float32 and in_dtype in (torch.bfloat16, torch.float16)
                  and getattr(self._runner, "native_inputs", False) is True)
        inputs = {d.name: (x if native else x.to(dtype)) for d, x in zip(rec.inputs, xs)}
        params = {name: p.to(dtype) for name, p in self.named_parameters()}
        try:
            state0 = self._state0(state, sizes, B, dtype, device)
            outputs, final = self._runner(sizes, params, inputs, state0)
        except RnncError as err:  # a backend's refusal at call time names the recurrence
            if err.filename == "<spec>" and err.line is None:
                err.filename = f"rnn {rec.name}"
                err.args = (err.format(),)
            raise
        except (RuntimeError, MemoryError, TypeError) as e:
            text = str(e)
            if isinstance(e, MemoryError) or any(w in text for w in (
                    "allocate", "out of memory", "Overflow when unpacking", "DefaultCPUAllocator")):
                raise self._error(f"out of memory running this step at these sizes "
                                  f"({text.splitlines()[0][:160] if text else type(e).__name__})") from None
            raise
        outs = tuple(outputs[o.name].to(in_dtype) for o in rec.outputs)
        if lead == 1:
            outs = tuple(o.squeeze(1) for o in outs)
        return (outs[0] if len(outs) == 1 else outs), final

    def _gather(self, xs, named) -> tuple:
        """Inputs in header order from positional ones followed by ones named as in the
        header (m(q, k, v=v, g=g), as fla's functions are often called)."""
        if not named:
            return xs
        order = [d.name for d in self.recurrence.inputs]
        for name in named:
            if name not in order:
                raise self._error(f"has no input {name!r} (inputs: {', '.join(order)})")
            if order.index(name) < len(xs):
                raise self._error(f"input {name!r} is given twice, by position and by name")
        missing = [n for n in order[len(xs):] if n not in named]
        if missing:
            raise self._error(f"input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                              f"not given (inputs: {', '.join(order)})")
        return tuple(xs) + tuple(named[n] for n in order[len(xs):])

    def forward(self, *xs, initial_state=None, output_final_state=False, cu_seqlens=None, **named):
        """Run over whole sequences: inputs [B, T, *shape] in header order, or by their header
        names. With cu_seqlens ([N + 1] offsets, fla's convention), the inputs are N
        sequences packed back to back, [1, T_total, *shape]; states are then [N, *shape]
        (rnnc.varlen)."""
        xs = self._gather(xs, named)
        if cu_seqlens is None:
            out, final = self._run(xs, initial_state, lead=2)
        else:
            self._bind(xs, 2)   # the packed inputs checked as one batch first
            out, final = varlen.run_packed(lambda x, s: self._run(x, s, lead=2), xs, cu_seqlens,
                                           initial_state, self._error)
        return (out, final) if output_final_state else out

    def step(self, *xs, state=None, **named):
        """One step: inputs [B, *shape], positional or named as forward's; returns (outputs
        [B, *shape], new state dict)."""
        return self._run(self._gather(xs, named), state, lead=1)
