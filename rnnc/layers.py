"""Compose compiled recurrences with position-wise layers into multi-layer models (LSRL-style).

Every layer here is an `nn.Module` that maps a sequence `[B, T, d_in]` to `[B, T, d_out]`
(`Embedding` maps token ids `[B, T]` instead) and exposes `d_in` / `d_out` (None where
any size works). `Stack` chains them and checks that neighbouring sizes agree.

    import rnnc
    from rnnc import layers as L

    model = L.Stack([
        L.Embedding(2, 16),                                   # [B, T] ids -> [B, T, 16]
        L.RecurrentLayer("examples/gla.rnn", 16, H=2, K=4, V=4),  # -> [B, T, H*V = 8]
        L.RMSNorm(8),
        L.MLP(8, 32, 2),                                      # -> [B, T, 2]
    ])

`RecurrentLayer` is the adapter around a recurrence: one `Linear` projects `d_model` to
every input of the recurrence at once, the result is split and reshaped into the inputs'
per-step shapes (in header order), the recurrence runs (`backend="auto"` picks the
parallel scan when it is legal), and its outputs are flattened and concatenated.
A compiled `RecurrentModule` whose single input is a vector can also be put in a `Stack`
directly: it is wrapped in a `RecurrentLayer` fed by the previous layer's width.

All weights are ordinary `nn.Parameter`s, so layers can be trained, or set by hand (as
LSRL does) with `Linear(d_in, d_out, weight=..., bias=...)`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import RnncError

__all__ = ["Layer", "Linear", "MLP", "LayerNorm", "RMSNorm", "Fn", "Residual", "Embedding",
           "RecurrentLayer", "Stack", "count_params"]


def _err(message: str) -> RnncError:
    return RnncError(message, filename="<rnnc.layers>")


def _size(x, what: str, allow_none: bool = False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise _err(f"{what} must be a positive int, got {x!r}")
    return x


def count_params(module: nn.Module) -> int:
    """The number of trainable scalars of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Layer(nn.Module):
    """Base class: a position-wise or sequence layer [B, T, d_in] -> [B, T, d_out]."""
    d_in: int | None = None
    d_out: int | None = None
    keeps_width: bool = False  # True: d_out == d_in whatever the width


class Linear(Layer):
    """`x @ W.T + b` at every position: [B, T, d_in] -> [B, T, d_out].

    weight ([d_out, d_in]) and bias ([d_out]) may be given to set the layer by hand;
    otherwise nn.Linear's initialisation is used. bias=False drops the bias.
    """

    def __init__(self, d_in: int, d_out: int, bias=True, weight=None):
        super().__init__()
        self.d_in, self.d_out = _size(d_in, "d_in"), _size(d_out, "d_out")
        self.linear = nn.Linear(d_in, d_out, bias=bias is not False)
        with torch.no_grad():
            if weight is not None:
                w = torch.as_tensor(weight, dtype=self.linear.weight.dtype)
                if tuple(w.shape) != (d_out, d_in):
                    raise _err(f"Linear weight must have shape [{d_out}, {d_in}], got {list(w.shape)}")
                self.linear.weight.copy_(w)
            if bias is not True and bias is not False and bias is not None:
                b = torch.as_tensor(bias, dtype=self.linear.weight.dtype)
                if tuple(b.shape) != (d_out,):
                    raise _err(f"Linear bias must have shape [{d_out}], got {list(b.shape)}")
                self.linear.bias.copy_(b)

    def forward(self, x):
        return self.linear(x)


_ACTIVATIONS = {
    "relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "exp": torch.exp, "abs": torch.abs,
    "softplus": nn.functional.softplus, "identity": lambda x: x,
    "sign": torch.sign, "square": torch.square,
}


def _activation(fn):
    if callable(fn):
        return fn
    if fn not in _ACTIVATIONS:
        raise _err(f"unknown function {fn!r} (known: {', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[fn]


class Fn(Layer):
    """An elementwise function at every position, by name ("relu", "tanh", ...) or a callable.
    [B, T, d] -> [B, T, d]."""
    keeps_width = True

    def __init__(self, fn="relu"):
        super().__init__()
        self.name = fn if isinstance(fn, str) else getattr(fn, "__name__", "fn")
        self.fn = _activation(fn)

    def extra_repr(self):
        return self.name

    def forward(self, x):
        return self.fn(x)


class MLP(Layer):
    """Linear(d_in, d_hidden) -> activation -> Linear(d_hidden, d_out) at every position."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, activation="relu"):
        super().__init__()
        self.d_in, self.d_out = _size(d_in, "d_in"), _size(d_out, "d_out")
        self.up = Linear(d_in, _size(d_hidden, "d_hidden"))
        self.act = Fn(activation)
        self.down = Linear(d_hidden, d_out)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class LayerNorm(Layer):
    """nn.LayerNorm over the last axis: [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.d_in = self.d_out = _size(d, "d")
        self.norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x):
        return self.norm(x)


class RMSNorm(Layer):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis: [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.d_in = self.d_out = _size(d, "d")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Residual(Layer):
    """x + inner(x); inner must keep the width: [B, T, d] -> [B, T, d]."""
    keeps_width = True

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = _as_layer(inner, None)
        a, b = getattr(self.inner, "d_in", None), getattr(self.inner, "d_out", None)
        if a is not None and b is not None and a != b:
            raise _err(f"Residual needs a layer that keeps the width, got {a} -> {b}")
        self.d_in = self.d_out = a if a is not None else b

    def forward(self, x):
        return x + self.inner(x)


class Embedding(Layer):
    """Token ids [B, T] (int64) -> [B, T, d]. weight ([vocab, d]) may be set by hand."""

    def __init__(self, vocab: int, d: int, weight=None):
        super().__init__()
        self.vocab, self.d_out = _size(vocab, "vocab"), _size(d, "d")
        self.d_in = None
        self.embed = nn.Embedding(vocab, d)
        if weight is not None:
            w = torch.as_tensor(weight, dtype=self.embed.weight.dtype)
            if tuple(w.shape) != (vocab, d):
                raise _err(f"Embedding weight must have shape [{vocab}, {d}], got {list(w.shape)}")
            with torch.no_grad():
                self.embed.weight.copy_(w)

    def forward(self, ids):
        return self.embed(ids)


class RecurrentLayer(Layer):
    """A recurrence as a sequence layer: [B, T, d_model] -> [B, T, d_out].

    rnn: a compiled module (`rnnc.compile(...)`), or anything `rnnc.compile` takes (a
        builder `Spec`, a path, .rnn text), compiled here with `backend` and `dims`.
    d_model: the width of the incoming sequence.
    project: True: one `Linear(d_model, sum of input sizes)` (bias per `bias`) produces all
        inputs; False: the incoming features are split directly (d_model must equal the sum
        of the input sizes); "auto" (default): False exactly when it already does and the
        recurrence has a single input.
    out_features: if given, a final `Linear(sum of output sizes, out_features)`.
    dims: sizes of the spec's dims; together with the module's own they must fix every
        input shape. Inputs are produced in header order, each `[B, T, *shape]` (a scalar
        input `[B, T]`); outputs are flattened to `[B, T, prod(shape)]` and concatenated in
        header order.

    `layer.rnn` is the compiled module, `layer.proj` the input projection (or None),
    `layer.input_sizes` / `layer.output_sizes` give {name: per-step shape}.
    """

    def __init__(self, rnn, d_model: int, *, backend: str = "auto", project="auto", bias=True,
                 out_features: int | None = None, name: str | None = None, **dims):
        super().__init__()
        from .compiler import compile as _compile
        from .interpret import concrete
        from .module import RecurrentModule

        self.d_in = _size(d_model, "d_model")
        if isinstance(rnn, RecurrentModule):
            if dims:
                for k, v in dims.items():
                    if k in rnn._given and rnn._given[k] != v:
                        raise _err(f"dim {k}={v} disagrees with the compiled module's {k}={rnn._given[k]}")
            self.rnn = rnn
        else:
            self.rnn = _compile(rnn, name=name, backend=backend, **dims)
        rec = self.rnn.recurrence
        sizes = {**self.rnn._given, **dims}

        def shape_of(decl, what):
            missing = sorted({x.name for s in decl.shape for x in s.free_symbols} - set(sizes))
            if missing:
                raise _err(f"RecurrentLayer needs the size of dim {missing[0]} for {what} "
                           f"{decl.name!r} of rnn {rec.name}: pass {missing[0]}=...")
            return concrete(decl.shape, sizes)

        self.input_sizes = {d.name: shape_of(d, "input") for d in rec.inputs}
        self.output_sizes = {d.name: shape_of(d, "output") for d in rec.outputs}
        self._in_numel = [math.prod(s) for s in self.input_sizes.values()]
        total_in = sum(self._in_numel)
        if project == "auto":
            project = not (len(rec.inputs) == 1 and total_in == d_model)
        if project:
            self.proj = Linear(d_model, total_in, bias=bias)
        else:
            if total_in != d_model:
                raise _err(f"project=False needs d_model = {total_in} (the inputs' total size), got {d_model}")
            self.proj = None
        width = sum(math.prod(s) for s in self.output_sizes.values())
        self.out = Linear(width, out_features) if out_features is not None else None
        self.d_out = out_features if out_features is not None else width

    def extra_repr(self):
        ins = ", ".join(f"{k}{list(v)}" for k, v in self.input_sizes.items())
        outs = ", ".join(f"{k}{list(v)}" for k, v in self.output_sizes.items())
        return f"d_model={self.d_in} -> ({ins}) -> rnn -> ({outs}) -> d_out={self.d_out}"

    def split(self, x):
        """The recurrence's inputs from features [B, T, d_model] (after the projection)."""
        z = self.proj(x) if self.proj is not None else x
        B, T = z.shape[:2]
        parts = torch.split(z, self._in_numel, dim=-1)
        return [p.reshape(B, T, *shape) for p, shape in zip(parts, self.input_sizes.values())]

    def forward(self, x, initial_state=None, output_final_state: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.d_in:
            raise _err(f"RecurrentLayer({self.rnn.recurrence.name}) takes [B, T, {self.d_in}], "
                       f"got {list(x.shape)}")
        ys, final = self.rnn(*self.split(x), initial_state=initial_state, output_final_state=True)
        ys = ys if isinstance(ys, tuple) else (ys,)
        B, T = x.shape[:2]
        y = torch.cat([o.reshape(B, T, -1) for o in ys], -1) if len(ys) > 1 else ys[0].reshape(B, T, -1)
        if self.out is not None:
            y = self.out(y)
        return (y, final) if output_final_state else y


def _as_layer(layer, d_prev):
    from .module import RecurrentModule
    if isinstance(layer, RecurrentModule):
        rec = layer.recurrence
        if len(rec.inputs) != 1 or len(rec.inputs[0].shape) != 1:
            raise _err(f"rnn {rec.name} takes {len(rec.inputs)} input(s); wrap it as "
                       "rnnc.layers.RecurrentLayer(module, d_model, ...) to project into them")
        if d_prev is None:
            raise _err(f"the width before rnn {rec.name} is unknown; wrap it as "
                       "rnnc.layers.RecurrentLayer(module, d_model)")
        dim = rec.inputs[0].shape[0]
        dims = {}
        if dim.is_Symbol and dim.name not in layer._given:
            dims[dim.name] = d_prev
        return RecurrentLayer(layer, d_prev, **dims)
    if not isinstance(layer, nn.Module):
        raise _err(f"a layer must be an nn.Module, got {type(layer).__name__}")
    return layer


class Stack(Layer):
    """Layers applied in order, like nn.Sequential, with their widths checked.

    layers: rnnc.layers layers, any nn.Module mapping [B, T, a] -> [B, T, b], or compiled
    recurrences with one vector input (wrapped as `RecurrentLayer`). d_in (optional) is
    the input width, needed only when the first layer is a bare recurrence.
    """

    def __init__(self, layers, d_in: int | None = None):
        super().__init__()
        mods, d_prev, first = [], d_in, True
        for k, layer in enumerate(layers):
            layer = _as_layer(layer, d_prev)
            a = getattr(layer, "d_in", None)
            if not first and a is not None and d_prev is not None and a != d_prev:
                raise _err(f"layer {k} ({type(layer).__name__}) takes width {a}, but the "
                           f"layer before it gives {d_prev}")
            if first:
                self.d_in = a if a is not None else d_in
            d_out = getattr(layer, "d_out", None)
            if d_out is None and getattr(layer, "keeps_width", False):
                d_out = d_prev
            d_prev = d_out
            mods.append(layer)
            first = False
        if not mods:
            raise _err("Stack needs at least one layer")
        self.layers = nn.ModuleList(mods)
        self.d_out = d_prev

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def __getitem__(self, k):
        return self.layers[k]

    def __len__(self):
        return len(self.layers)
