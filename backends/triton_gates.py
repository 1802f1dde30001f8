"""Gate streams: the chunk kernels' operands computed inside the kernels from the spec's inputs.

A chunked linear-attention state reads four operands per step: the query q, the key k (the
state's rank-1 input p), the value v and the log-decay g (a delta rule also r and w). Each
is an expression of the step's state-free values: mamba2's value is dt[h] * x[h,p] and its
log-decay -exp(A_log[h]) * dt[h]; a gated spec's decay may be logsigmoid(x)/16.
Materialising each operand as a [B, L, H, K] tensor before the kernel runs costs a write and
a read of that tensor per operand. A *stream* instead gives the kernel the expression's
*leaves* (inputs, params, or values rnnc cannot compute inside a kernel such as projections)
and a small *program* over them; the generated loaders `_ld_<op>` and `_tile_<op>` (spliced
into templates/chunk_la.py.tmpl and chunk_delta.py.tmpl by `module_source`) load the leaves
and evaluate the program wherever the kernels read that operand, forward and backward. The
backward kernels give the gradient of each operand; `leaf_grads` carries it to the leaves by
recomputing the (cheap, elementwise) program with torch.

    leaf       [B|1, L|1, H|1, X|1] float32/bf16/fp16, contiguous; kind = (step, head, chan):
               which of the axes it varies along (X = K for q, k, g and V for v)
    program    instructions ("leaf", j) | ("const", value) | ("op", Op, operand indices);
               the last one is the operand's value

`plan_*` (static, per spec) turn normal-form terms into a program and leaf specs (node,
labels); `Stream.build` (per call) places the leaves in the kernel layout.
"""
from __future__ import annotations

import math
import os

import torch

from rnnc import ir
from rnnc.affine import Term
from rnnc.errors import RnncError
from rnnc.interpret import _BINARY as _TORCH_BINARY, _UNARY as _TORCH_UNARY
from rnnc.ir import Op

from .triton_codegen import _BINARY, _UNARY, const_text

PLAIN = (("leaf", 0),)  # the program of a materialised operand: its one leaf
MAX_LEAVES = 8          # leaves one operand may load; past it a factor is loaded as it is
MAX_STEPS = 48          # instructions one operand's program may have


class Program:
    """An operand's expression over its leaves, built from IR nodes (see the module doc)."""

    def __init__(self):
        self.code: list = []
        self.leaves: list = []       # (node, labels) per leaf
        self.inlined: set = set()    # the IR nodes it computes itself (nothing else needs to)
        self._memo: dict = {}

    def add(self, ins) -> int:
        if ins not in self._memo:
            self._memo[ins] = len(self.code)
            self.code.append(ins)
        return self._memo[ins]

    def leaf(self, node: int, labels: tuple) -> int:
        key = (node, tuple(labels))
        if key not in self.leaves:
            self.leaves.append(key)
        return self.add(("leaf", self.leaves.index(key)))

    def const(self, value: float) -> int:
        return self.add(("const", float(value)))

    def op(self, op: Op, *args) -> int:
        return self.add(("op", op, tuple(args)))

    def node(self, rec, hoisted: set, node: int, labels: tuple, depth: int = 0) -> int:
        """node's value: inlined while it is a state-free elementwise expression (operands
        of a node have its rank, so they share its labels), a leaf elsewhere (and past
        MAX_STEPS levels, which _small then refuses anyway)."""
        n = rec.node(node)
        if isinstance(n, ir.Const):
            self.inlined.add(node)
            return self.const(n.value)
        if node not in hoisted or depth > MAX_STEPS:
            return self.leaf(node, labels)
        d = depth + 1
        if isinstance(n, ir.Elementwise):
            self.inlined.add(node)
            return self.op(n.op, *[self.node(rec, hoisted, a, labels, d) for a in n.args])
        if isinstance(n, ir.Broadcast):   # the loads broadcast by themselves
            self.inlined.add(node)
            return self.node(rec, hoisted, n.arg, labels, d)
        if isinstance(n, ir.Select) and _unsqueeze(n):   # new size-1 axes: fewer labels
            self.inlined.add(node)
            return self.node(rec, hoisted, n.arg,
                             tuple(lab for lab, o in zip(labels, n.out) if o is not None), d)
        return self.leaf(node, labels)

    def key(self) -> tuple:
        return tuple(self.code)


def _unsqueeze(n: ir.Select) -> bool:
    """Whether a Select only inserts size-1 axes (its axes otherwise as they were)."""
    letters = [x for x in n.index]
    return (all(isinstance(x, str) for x in letters) and len(set(letters)) == len(letters)
            and [o for o in n.out if o is not None] == letters)


def _factor(prog: Program, rec, hoisted, fc, inline: bool) -> int:
    x = prog.node(rec, hoisted, fc.node, fc.labels) if inline else prog.leaf(fc.node, fc.labels)
    return prog.op(Op.DIV, prog.const(1.0), x) if fc.power == -1 else x


def _product(prog: Program, rec, hoisted, t: Term, inline: bool) -> int:
    acc = None
    for fc in t.factors:
        x = _factor(prog, rec, hoisted, fc, inline)
        acc = x if acc is None else prog.op(Op.MUL, acc, x)
    if acc is None:
        return prog.const(t.scale)
    return acc if t.scale == 1.0 else prog.op(Op.MUL, prog.const(t.scale), acc)


def _small(build) -> Program:
    """build(prog, inline) with the factors' expressions inlined, or, where that would load
    too much (MAX_LEAVES, MAX_STEPS), with the factors themselves as leaves."""
    prog = Program()
    build(prog, True)
    if len(prog.leaves) <= MAX_LEAVES and len(prog.code) <= MAX_STEPS:
        return prog
    prog = Program()
    build(prog, False)
    return prog


def plan_product(rec, hoisted: set, t: Term) -> Program:
    """k, v or q: scale times the product of the term's factors."""
    return _small(lambda prog, inline: _product(prog, rec, hoisted, t, inline))


def plan_log(rec, hoisted: set, terms: list, exp_factors: bool, empty: float) -> Program:
    """The log-decay from the decay's terms: with exp_factors (one positive term whose
    factors are all exp(x)) the sum of the exponents plus log(scale), exact for any decay;
    otherwise log of the terms' sum (a negative decay gives NaN, which makes the block's
    outputs non-finite and sends it to the exact path); `empty` without terms."""
    def build(prog, inline):
        if not terms:
            return prog.const(empty)
        if exp_factors:
            t = terms[0]
            acc = None
            for fc in t.factors:
                arg = rec.node(fc.node).args[0]
                x = prog.node(rec, hoisted, arg, fc.labels) if inline else prog.leaf(arg, fc.labels)
                x = prog.op(Op.NEG, x) if fc.power == -1 else x
                acc = x if acc is None else prog.op(Op.ADD, acc, x)
            return acc if t.scale == 1.0 else prog.op(Op.ADD, acc, prog.const(math.log(t.scale)))
        acc = None
        for t in terms:
            x = _product(prog, rec, hoisted, t, inline)
            acc = x if acc is None else prog.op(Op.ADD, acc, x)
        return prog.op(Op.LOG, acc)
    return _small(build)


class Stream:
    """One operand as (program, leaves); shape: the operand's [B, L, H, X] (X = 1 for a
    log-decay with one value per head)."""

    def __init__(self, code: tuple, leaves: list, kinds: tuple, shape: tuple):
        self.code, self.leaves, self.kinds, self.shape = code, leaves, kinds, tuple(shape)

    @staticmethod
    def plain(x: torch.Tensor) -> "Stream":
        """A materialised operand [B, L, H, X]: one leaf, read as it is."""
        return Stream(PLAIN, [x.contiguous()], ((True, True, x.shape[-1] != 1),), tuple(x.shape))

    @staticmethod
    def build(prog: Program, place, shape: tuple, squeeze: bool = False) -> "Stream | None":
        """The stream of `prog` with its leaves placed: place(node, labels) -> (the leaf's value
        in the kernel layout [B, L, H|1, X|1] (a broadcast view is fine), whether it varies
        over the steps). None where a leaf does not fit the layout (an axis that is neither 1
        nor the operand's size). squeeze: X is 1 when no leaf varies along it (a log-decay
        with one value per head)."""
        B, L, H, X = shape
        leaves, kinds = [], []
        for node, labels in prog.leaves:
            x, step = place(node, labels)
            if x.dim() != 4 or x.shape[2] not in (1, H) or x.shape[3] not in (1, X):
                return None
            head, chan = x.shape[2] != 1, x.shape[3] != 1
            leaves.append((x if step else x[:1, :1]).contiguous())
            kinds.append((bool(step), head, chan))
        if squeeze and not any(chan for _, _, chan in kinds):
            shape = (B, L, H, 1)
        return Stream(prog.key(), leaves, tuple(kinds), shape)

    @property
    def signature(self) -> tuple:
        return self.code, self.kinds

    @property
    def identity(self) -> bool:
        """Whether the operand is its one leaf, as it is, over all of [B, L, H, X]."""
        B, L, H, X = self.shape
        return self.code == PLAIN and tuple(self.leaves[0].shape) == self.shape

    @property
    def per_channel(self) -> bool:
        return any(chan for _, _, chan in self.kinds)

    def value(self, leaves=None) -> torch.Tensor:
        """The operand computed by torch from the leaves (broadcastable to the shape)."""
        leaves = self.leaves if leaves is None else leaves
        vals = []
        for ins in self.code:
            if ins[0] == "leaf":
                vals.append(leaves[ins[1]].float())
            elif ins[0] == "const":
                vals.append(torch.tensor(ins[1], dtype=torch.float32, device=leaves[0].device
                                         if leaves else None))
            else:
                op, args = ins[1], [vals[a] for a in ins[2]]
                if op is Op.WHERE:
                    vals.append(torch.where(args[0] != 0, args[1], args[2]))
                elif op in _TORCH_UNARY:
                    vals.append(_TORCH_UNARY[op](args[0]))
                else:
                    r = _TORCH_BINARY[op](*args)
                    vals.append(r.float() if r.dtype == torch.bool else r)
        return vals[-1]


DOT_ENV = "RNNC_TRITON_DOT"
DOT_MODES = ("auto", "tf32", "ieee", "bf16")


def dot_precision(leaves, want: str | None = None) -> str:
    """tl.dot's operand precision for one chunk-kernel call (the kernels' PREC / DOT_PREC).

    want (else RNNC_TRITON_DOT, else "auto"):
    - "auto": "tf32" where torch allows TF32 matmuls, or where an operand is read from
      bf16/fp16 leaves (TF32's 11 significant bits hold those values exactly, and round the
      float32 values computed from them by less than the inputs' own rounding); "ieee"
      otherwise, and always off CUDA;
    - "tf32", "ieee": that, on CUDA ("ieee" off CUDA);
    - "bf16": operands rounded to bfloat16, products accumulated in float32, as fla's
      kernels and torch's bf16 matmul do (faster tensor cores, fewer operand registers; every
      product then carries bf16's 8-bit rounding, the state's included). Off CUDA this is
      "bf16x", the same rounding before a float32 product: Triton's interpreter computes a
      bfloat16 tl.dot wrongly and truncates its casts to bfloat16.
    """
    want = (want or os.environ.get(DOT_ENV, "") or "auto").strip().lower()
    if want not in DOT_MODES:
        raise RnncError(f"{DOT_ENV} (the chunk kernels' dot precision) must be one of "
                        f"{', '.join(DOT_MODES)}; got {want!r}")
    on_cuda = any(x.is_cuda for x in leaves)
    if want == "bf16":
        return "bf16" if on_cuda else "bf16x"
    if not on_cuda:
        return "ieee"
    if want == "auto":
        low = any(x.dtype in (torch.bfloat16, torch.float16) for x in leaves)
        return "tf32" if low or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return want


def as_stream(x):
    """x as a Stream: a tensor becomes a plain one; a Stream or None stays as it is."""
    return x if x is None or isinstance(x, Stream) else Stream.plain(x)


def pack(streams, used) -> tuple:
    """(meta, leaves) of one kernel call's operand streams: meta, every stream's (code, kinds,
    shape); leaves, those of the streams in use, in order (the autograd Function's inputs)."""
    meta = tuple((s.code, s.kinds, s.shape) for s in streams)
    return meta, [x for s, u in zip(streams, used) if u for x in s.leaves]


def unpack(meta, leaves, used) -> list:
    """The streams of `pack`'s (meta, leaves); those not in use get no leaves (the caller puts
    what stands for them in their place)."""
    streams, at = [], 0
    for (code, kinds, shape), u in zip(meta, used):
        n = len(kinds) if u else 0
        streams.append(Stream(code, list(leaves[at:at + n]), kinds, shape))
        at += n
    return streams


def grads(streams, per_operand, used, needs) -> list:
    """The leaves' gradients, in `pack`'s order, from each used stream's operand gradient;
    needs: whether each of those leaves wants one (needs_input_grad)."""
    out, at = [], 0
    for s, d, u in zip(streams, per_operand, used):
        if u:
            n = len(s.leaves)
            out += leaf_grads(s, d, needs[at:at + n])
            at += n
    return out


def leaf_grads(stream: Stream, grad: torch.Tensor, needs: list) -> list:
    """d loss / d leaf for each leaf (None where needs is False) from grad = d loss / d operand
    [B, L, H, X]: directly for an identity stream, else through torch's gradient of the
    recomputed program."""
    if not any(needs):
        return [None] * len(stream.leaves)
    if stream.identity:
        return [grad.to(stream.leaves[0].dtype)]
    with torch.enable_grad():
        ls = [x.detach().requires_grad_(n) for x, n in zip(stream.leaves, needs)]
        val = stream.value(ls).expand(grad.shape)
        wanted = [x for x in ls if x.requires_grad]
        got = iter(torch.autograd.grad(val, wanted, grad, allow_unused=True))
    out = []
    for x, n in zip(ls, needs):
        g = next(got) if n else None
        out.append(None if g is None else g.to(x.dtype))
    return out


# --- the loaders' Triton source ------------------------------------------------------------
def _address(name: str, kind: tuple) -> str:
    """The pointer tile of a leaf at steps t, channels c: a scalar base for (b, h), plus t
    times the row stride (int64, as b is: t * H * X passes 2^31 in long blocks), plus c, plus
    z (zeros of the mask's shape) where t or c is missing, so the load has the mask's shape."""
    step, head, chan = kind
    row = {(True, True): "H * X", (True, False): "H", (False, True): "X", (False, False): "1"}[
        head, chan]
    parts = []
    if step:
        parts.append(f"b * L * {row}" if row != "1" else "b * L")
    if head:
        parts.append("h * X" if chan else "h")
    if step:
        parts.append(f"t * (b * 0 + {row})" if row != "1" else "t")
    if chan:
        parts.append("c")
    if not (step and chan):
        parts.append("z")
    return " + ".join([name] + parts)


def loader_source(op: str, sig: tuple) -> list:
    """The lines of `_ld_<op>` and `_tile_<op>` for a stream signature (code, kinds)."""
    code, kinds = sig
    names = [f"{op}_{j}" for j in range(len(kinds))]
    args = "".join(f"{n}, " for n in names)
    out = ["@triton.jit",
           f"def _ld_{op}({args}b, h, t, c, m, L, H, X):",
           f'    """{op} at steps t, channels c (broadcast to the mask m), 0 outside m."""',
           "    z = t * 0 + c * 0"]
    vals = []
    for j, ins in enumerate(code):
        if ins[0] == "leaf":
            k = ins[1]
            out.append(f"    x{j} = tl.load({_address(names[k], kinds[k])}, mask=m, "
                       "other=0.0).to(tl.float32)")
            vals.append(f"x{j}")
        elif ins[0] == "const":
            vals.append(const_text(ins[1]))
        else:
            o, a = ins[1], [vals[i] for i in ins[2]]
            if o is Op.WHERE:
                expr = f"tl.where({a[0]} != 0, {a[1]}, {a[2]})"
            elif o in _UNARY:
                expr = _UNARY[o].format(a[0])
            else:
                expr = _BINARY[o].format(*a)
            out.append(f"    x{j} = {expr}")
            vals.append(f"x{j}")
    # a leaf's masked load is 0 already; an expression of such zeros need not be
    result = vals[-1] if code == PLAIN else f"tl.where(m, {vals[-1]}, 0.0)"
    out += [f"    return {result}", "", "",
            "@triton.jit",
            f"def _tile_{op}({args}b, h, H, X, t0, L, offs, m, ROWS: tl.constexpr):",
            f'    """{op} at steps t0 .. t0+ROWS-1, channels offs: [ROWS, len(offs)]."""',
            "    t = t0 + tl.arange(0, ROWS)",
            f"    return _ld_{op}({args}b, h, t[:, None], offs[None, :], (t < L)[:, None] & m[None, :], "
            "L, H, X)", "", ""]
    return out


def module_source(template: str, ops: tuple, sigs: tuple, **fragments) -> str:
    """A chunk-kernel template filled for the operands `ops` with stream signatures `sigs`:
    the op helpers and the products' helper (templates/chunk_dot.py.tmpl), each operand's
    loaders, and its leaves' argument names ({{QS}} ...)."""
    from .triton_codegen import TEMPLATES, _fill, op_helpers
    loaders = [line for op, sig in zip(ops, sigs) for line in loader_source(op, sig)]
    dot = (TEMPLATES / "chunk_dot.py.tmpl").read_text()
    dot = dot[dot.index("@triton.jit"):].rstrip().splitlines()
    frags = {"HELPERS": op_helpers() + ["", ""] + dot, "LOADERS": loaders, **fragments}
    frags.update({f"{op.upper()}S": arg_list(op, sig) for op, sig in zip(ops, sigs)})
    return _fill(template, frags)


def arg_list(op: str, sig: tuple) -> str:
    """The leaves' argument names as the template splices them: 'k_0, k_1, '."""
    return "".join(f"{op}_{j}, " for j in range(len(sig[1])))


def cubin_usage(cubin: bytes) -> dict:
    """{"regs": registers per thread, "stack": stack bytes per thread (spills)} of the one
    kernel in an NVIDIA cubin, read by the cuobjdump that Triton bundles (both None where this
    Triton has none). For the chunk kernels' offline compiles (`compile_for`)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return dict(regs=None, stack=None)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    got = {k: int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", text)}
    return dict(regs=got.get("REG"), stack=got.get("STACK"))
