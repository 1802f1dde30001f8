"""The Triton backend: generated fused recurrent kernels, forward and backward.

`build` generates the kernel source from the IR (`triton_codegen`), loads it through the
disk cache (`rnnc.cache`: Triton needs its source in a file), and returns a Runner:

1. hoisted contractions (W @ x over all B*T) run as torch GEMMs, differentiable as usual;
2. one `forward` kernel runs the whole time loop with the state in registers;
3. a `torch.autograd.Function` ties them together: its backward runs the generated
   `backward` kernel over the stored states in reverse time.

It runs on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (Triton's
interpreter: slow, for tests at small sizes).
"""
from __future__ import annotations

import contextlib
import math
import os

import networkx as nx
import torch

from rnnc import interpret, ir
from rnnc.errors import RnncError

NAME = "triton"
HISTORY_LIMIT = 2 ** 31  # elements of the stored states that training keeps
PROGRAMS_WANTED = int(os.environ.get("RNNC_TRITON_PROGRAMS", 512))  # ~4 programs per SM of an H100
REGISTER_LIMIT = 32768   # values one program may hold (64K 32-bit registers per SM)
NUM_STAGES = 3           # software pipelining of the per-step loads
DEEP_STAGES = int(os.environ.get("RNNC_TRITON_STAGES", 8))  # ... when the per-step work is a few loads


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> str | None:
    """Why Triton cannot run here (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'rnnc[triton]')"
    return None


def unsupported(rec, analysis):
    why = available()
    if why:
        return why
    from . import triton_codegen as cg
    try:
        cg.generate(rec, analysis)
    except cg.Unsupported as e:
        return str(e)
    return None


def emit(rec, analysis) -> str:
    """The generated source (Python + Triton) for a recurrence, as `rnnc compile --emit` shows."""
    from . import triton_codegen as cg
    return cg.generate(rec, analysis).source


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Runner:
    def __init__(self, rec, analysis):
        from rnnc import cache
        from . import triton_codegen as cg
        self.rec = rec
        self.gen = cg.generate(rec, analysis)
        # Triton decides at decoration time whether a kernel is compiled or interpreted, so
        # the two kinds of module are cached apart.
        self.kernels = cache.load_module(self.gen.source, "fused_interp" if _interpreting() else "fused")
        lay = self.gen.layout
        need = set()
        for n in lay.pre:
            need |= {n} | nx.ancestors(rec.graph, n)
        self.pre_nodes = [i for i in rec.order() if i in need]
        self._progs = {}

    # --- launch geometry ---------------------------------------------------------------------
    def geometry(self, sizes: dict, B: int) -> dict:
        lay = self.gen.layout
        sz = {c: interpret.concrete((lay.size[c],), sizes)[0] for c in self.gen.classes}
        blk = {c: _pow2(sz[c]) for c in self.gen.kept}
        if lay.kept_parallel is not None:
            c = lay.kept_parallel
            others = 1
            for st in lay.states:
                prod = 1
                for k in range(len(st.shape)):
                    d = lay.cls.get((st.read, k))
                    if d is not None and d != c and d in blk:
                        prod *= blk[d]
                others = max(others, prod)
            cap = max(1, _pow2(max(1, 4096 // others)))
            blk[c] = min(blk[c], cap, 1024)
        bb = min(16, _pow2(B)) if lay.batch_kept else 1

        def count():
            ng = {c: (math.ceil(sz[c] / blk[c]) if c in blk else sz[c]) for c in self.gen.grid}
            return ng, math.ceil(B / bb) * math.prod(ng.values())
        ng, programs = count()
        if lay.kept_parallel is not None:  # enough programs to fill the GPU's SMs
            while programs < PROGRAMS_WANTED and blk[lay.kept_parallel] > 16:
                blk[lay.kept_parallel] //= 2
                ng, programs = count()
        # Registers hold the params and states of a program for the whole loop.
        held = 0
        for n in list(lay.params) + [s.read for s in lay.states]:
            elems = bb if n in lay.batched else 1
            for e in self.gen.layout.entries(n):
                if e != "b":
                    elems *= blk.get(e[1], 1)
            held += elems
        if held > REGISTER_LIMIT:
            raise RnncError(
                f"the fused kernel would hold {held} values per program in registers (params and "
                f"states at these sizes; limit {REGISTER_LIMIT}): a dense recurrence this wide needs a "
                "tiled matrix-vector product that the Triton backend does not generate yet; use "
                "backend='sequential' (or 'scan' if the plan allows), or split the state into heads")
        return {"sz": sz, "blk": blk, "bb": bb, "ng": ng, "nb": math.ceil(B / bb),
                "programs": programs, "warps": 4 if held <= 8192 else 8,
                # Small per-program tiles leave latency to hide: prefetch more steps ahead.
                "stages": DEEP_STAGES if held <= 4096 and not lay.batch_kept else NUM_STAGES}

    def constexprs(self, geo) -> dict:
        kw = {f"SZ{c}": v for c, v in geo["sz"].items()}
        kw.update({f"BLK{c}": v for c, v in geo["blk"].items()})
        if self.gen.layout.batch_kept:
            kw["BLK_B"] = geo["bb"]
        tf32 = torch.backends.cuda.matmul.allow_tf32
        kw["DOT_PREC"] = "tf32" if tf32 else "ieee"
        kw["num_warps"] = geo["warps"]
        kw["NUM_STAGES"] = geo["stages"]
        return kw

    def split_count(self, name, geo) -> int:
        return math.prod(geo["nb"] if d == "B" else geo["ng"][d] for d in self.gen.splits[name])

    # --- running -----------------------------------------------------------------------------
    def __call__(self, sizes, params, inputs, state0):
        rec, lay = self.rec, self.gen.layout
        x0 = next(iter(inputs.values()), None)
        ref = x0 if x0 is not None else next(iter(state0.values()))
        B = ref.shape[0]
        T = x0.shape[1] if x0 is not None else 1
        dtype, device = ref.dtype, ref.device
        if device.type != "cuda" and not _interpreting():
            raise RnncError("the triton backend runs on CUDA tensors (or on CPU under "
                            "TRITON_INTERPRET=1); these are on " + str(device))
        if dtype != torch.float32:
            raise RnncError(f"the triton backend computes in float32; the compute dtype here is {dtype} "
                            "(float64 params or inputs): use backend='scan' or 'sequential' for float64")
        out_shapes = {o.name: interpret.concrete(o.shape, sizes) for o in rec.outputs}
        if B == 0 or T == 0:
            return ({o.name: ref.new_zeros(B, T, *out_shapes[o.name]) for o in rec.outputs},
                    dict(state0))
        streams = self.streams(sizes, params, inputs, B, T)
        ps = [params[rec.node(n).name].contiguous() for n in lay.params]
        h0 = [state0[s.name].contiguous() for s in lay.states]
        geo = self.geometry(sizes, B)
        want_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in streams + ps + h0)
        hist = sum(B * (T + 1) * math.prod(interpret.concrete(s.shape, sizes)) for s in lay.states)
        if want_grad and hist > HISTORY_LIMIT:
            raise RnncError(f"training through the fused kernel stores every step's state ({hist:.3g} "
                            "elements here); use backend='scan' for this associative recurrence, "
                            "or shorter sequences")
        meta = (self, sizes, geo, B, T, len(streams), len(ps), len(h0), out_shapes)
        res = _Fused.apply(meta, want_grad, *streams, *ps, *h0)
        ys = res[:len(rec.outputs)]
        finals = res[len(rec.outputs):]
        return ({o.name: y for o, y in zip(rec.outputs, ys)},
                {s.name: f for s, f in zip(lay.states, finals)})

    def streams(self, sizes, params, inputs, B, T) -> list:
        """[B, T, *shape] tensors the kernel reads per step: inputs and hoisted contractions."""
        rec, lay = self.rec, self.gen.layout
        env = {}
        if lay.pre:
            key = tuple(sorted(sizes.items()))
            if key not in self._progs:
                x = next(iter(inputs.values()))
                self._progs[key] = interpret.lower_nodes(rec, self.pre_nodes, sizes, x.dtype, x.device)
            for d in rec.inputs:
                env[d.node] = inputs[d.name].reshape(B * T, *inputs[d.name].shape[2:])
            for d in rec.params:
                env[d.node] = params[d.name].unsqueeze(0)
            interpret.run_program(self._progs[key], env)
        out = []
        for n in lay.streams:
            node = rec.node(n)
            shape = interpret.concrete(rec.attr(n, "shape"), sizes)
            if isinstance(node, ir.Input):
                out.append(inputs[node.name].contiguous())
            else:
                v = env[n]
                out.append(v.expand(B * T, *shape).reshape(B, T, *shape).contiguous())
        return out


def _flat_strides(ts) -> list:
    return [s for t in ts for s in t.stride()]


class _Fused(torch.autograd.Function):
    """streams, params, initial states -> outputs [B, T, ...], final states [B, ...]."""

    @staticmethod
    def forward(ctx, meta, want_grad, *tensors):
        runner, sizes, geo, B, T, nx_, np_, nh, out_shapes = meta
        rec, lay = runner.rec, runner.gen.layout
        xs = tensors[:nx_]
        ps = tensors[nx_:nx_ + np_]
        h0 = tensors[nx_ + np_:]
        ref = h0[0] if h0 else xs[0]
        ys = [ref.new_empty(B, T, *out_shapes[o.name]) for o in rec.outputs]
        hts = [torch.empty_like(h) for h in h0]
        if want_grad:
            hs = [h.new_empty(B, T + 1, *h.shape[1:]) for h in h0]
        else:
            hs = [h.new_empty(1, 1, *([1] * (h.dim() - 1))) for h in h0]  # never written
        ts = [*xs, *ps, *h0, *ys, *hts, *hs]
        grid = (geo["programs"],)
        with _on(ref.device):
            runner.kernels.forward[grid](*ts, *_flat_strides(ts), T, B, geo["nb"],
                                         *geo["ng"].values(), STORE_HIST=bool(want_grad),
                                         **runner.constexprs(geo))
        if want_grad:
            ctx.save_for_backward(*xs, *ps, *hs)
        ctx.meta = meta
        ctx.counts = (nx_, np_, nh)
        return (*ys, *hts)

    @staticmethod
    def backward(ctx, *grads):
        runner, sizes, geo, B, T, nx_, np_, nh, out_shapes = ctx.meta
        rec = runner.rec
        saved = ctx.saved_tensors
        xs, ps, hs = saved[:nx_], saved[nx_:nx_ + np_], saved[nx_ + np_:]
        no = len(rec.outputs)
        dys = [g.contiguous() if g is not None else torch.zeros(B, T, *out_shapes[o.name], device=hs[0].device if hs else xs[0].device)
               for g, o in zip(grads[:no], rec.outputs)]
        dhts = [g.contiguous() if g is not None else torch.zeros_like(h[:, 0])
                for g, h in zip(grads[no:], hs)]
        dxs = [x.new_zeros(runner.split_count(f"DX{j}", geo), *x.shape) for j, x in enumerate(xs)]
        dps = [p.new_zeros(runner.split_count(f"DP{j}", geo), *p.shape) for j, p in enumerate(ps)]
        dh0 = [h.new_zeros(runner.split_count(f"DH0_{j}", geo), h.shape[0], *h.shape[2:]) for j, h in enumerate(hs)]
        ts = [*xs, *ps, *hs, *dys, *dhts, *dxs, *dps, *dh0]
        with _on(ts[0].device):
            runner.kernels.backward[(geo["programs"],)](
                *ts, *_flat_strides(ts), T, B, geo["nb"], *geo["ng"].values(), **runner.constexprs(geo))
        gx = [d.sum(0) for d in dxs]
        gp = [d.sum(0) for d in dps]
        gh = [d.sum(0) for d in dh0]
        return (None, None, *gx, *gp, *gh)


def _on(device):
    """Launch on the inputs' GPU (Triton launches on the current device), or as it is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def build(rec, analysis, chunk_size=None):
    why = available()
    if why:
        raise RnncError(why)
    return Runner(rec, analysis)  # chunk_size: the fused kernel has no chunks


def compile_for(rec, analysis, sizes: dict, B: int = 16, arch: int = 90) -> dict:
    """Compile the generated kernels for an NVIDIA target without a GPU (Triton runs its whole
    pipeline down to a cubin on the CPU). {kernel name: cubin size}. Run it without
    TRITON_INTERPRET (interpreted kernels do not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    runner = Runner(rec, analysis)
    geo = runner.geometry(sizes, B)
    const = runner.constexprs(geo)
    gen = runner.gen
    out = {}
    for kname, tensors in (("forward", gen.fwd), ("backward", gen.bwd)):
        fn = getattr(runner.kernels, kname)
        sig, consts = {}, {}
        for name in fn.arg_names:
            if name in const or name == "STORE_HIST":
                sig[name] = "constexpr"
                consts[name] = const.get(name, True)
            elif any(t.name == name for t in tensors):
                sig[name] = "*fp32"
            else:
                sig[name] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        out[kname] = len(triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["cubin"])
    return out
