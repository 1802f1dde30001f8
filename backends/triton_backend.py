"""The Triton backend: generated fused recurrent kernels, forward and backward.

`build` generates the kernel source from the IR (`triton_codegen`), loads it through the
disk cache (`rnnc.cache`: Triton needs its source in a file), and returns a Runner:

1. hoisted contractions (W @ x over all B*T) run as torch GEMMs, differentiable as usual;
2. one `forward` kernel runs the whole time loop with the state in registers; or, when
   every state is diagonal (`elementwise_scan` plans), `_scan_forward` takes the steps in
   chunks with `tl.associative_scan` (`triton_scan_codegen`);
3. a `torch.autograd.Function` ties them together: its backward runs the generated
   `backward` kernel over the stored states in reverse time (both forwards store them).

Which forward runs: `RNNC_TRITON_KERNEL` = `auto` (default: the scan kernel where there is
one and T > 1), `fused` or `scan` (an error where there is none); read at every call. The
scan kernel's chunk is `chunk_size=` of `build`, else `RNNC_TRITON_CHUNK` (default 32), a
power of two.

It runs on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (Triton's
interpreter: slow, for tests at small sizes).
"""
from __future__ import annotations

import collections
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
SCAN_CHUNK = 32          # steps per chunk of the scan kernel, by default
SCAN_TILE = 4096         # values of one [BLK_T, ...] tile of the scan kernel (a few live at once)
KERNELS = ("auto", "fused", "scan", "chunked")
CHUNK = 64               # steps per chunk of the chunk kernels, by default
CHUNKED_BLOCK = 8192     # steps per block of the block solver (hoisted work exists a block at a time); a multiple of every chunk
LAUNCHES = collections.Counter()  # forward kernel name -> launches (tests check which one ran)


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


def _generate(rec, analysis):
    """(fused kernels, scan kernel or why there is none, the module's whole source)."""
    from . import triton_codegen as cg
    from . import triton_scan_codegen as scg
    gen = cg.generate(rec, analysis)
    scan = scg.generate(gen, rec, analysis)
    return gen, scan, gen.source + (scan.source or "")


LIBRARY_MARKER = "# ---- chunk kernels"  # where emit's generated text ends and a fixed template follows


def emit(rec, analysis) -> str:
    """The generated source (Python + Triton) for a recurrence, as `rnnc compile --emit` shows:
    the fused kernels, then the scan kernel where the recurrence has one, or the chunk
    kernels that a chunked plan runs (templates: the same for every spec of the plan)."""
    text = _generate(rec, analysis)[2]
    if analysis.plan in ("chunked", "chunked_delta"):
        from . import triton_chunk, triton_delta
        lib = triton_chunk if analysis.plan == "chunked" else triton_delta
        text += (f"\n\n{LIBRARY_MARKER} for the {analysis.plan} plan (gates and readouts run in "
                 "PyTorch around them) ----\n" + lib.source())
    return text


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def _check_chunk(ct, where: str) -> int:
    if isinstance(ct, bool) or not isinstance(ct, int) or ct < 1 or ct > 256 or ct & (ct - 1):
        raise RnncError(f"the triton backend's scan chunk ({where}) must be a power of two from 1 "
                        f"to 256, got {ct!r}")
    return ct


class Runner:
    def __init__(self, rec, analysis, chunk: int | None = None):
        from rnnc import cache
        self.rec, self.plan = rec, analysis.plan
        self.gen, self.scan, source = _generate(rec, analysis)
        self.chunk = None if chunk is None else _check_chunk(chunk, "chunk_size")
        # Triton decides at decoration time whether a kernel is compiled or interpreted, so
        # the two kinds of module are cached apart.
        self.kernels = cache.load_module(source, "fused_interp" if _interpreting() else "fused")
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

    def kernel(self, T: int) -> str:
        """Which forward kernel runs a call of T steps: "fused" or "scan" (RNNC_TRITON_KERNEL)."""
        want = _wanted_kernel()
        if want == "chunked":
            raise RnncError(f"RNNC_TRITON_KERNEL=chunked, but rnn {self.rec.name} has an "
                            f"{self.plan} plan: the chunk kernels run matrix states (chunked plans)")
        if want == "scan" and self.scan.source is None:
            raise RnncError(f"RNNC_TRITON_KERNEL=scan, but rnn {self.rec.name} has no scan kernel: "
                            f"{self.scan.why}")
        if want == "auto":  # one step (.step()) gains nothing from a chunk
            return "scan" if self.scan.source is not None and T > 1 else "fused"
        return want

    def scan_geometry(self, sizes: dict, B: int, T: int) -> dict:
        """Blocks and grid of the scan kernel: one batch row per program, BLK_T steps per chunk,
        the kept parallel block sized so that a [BLK_T, ...] state tile holds about SCAN_TILE
        values and there are enough programs to fill the GPU."""
        lay = self.scan.layout
        env = os.environ.get("RNNC_TRITON_CHUNK", "")
        ct = self.chunk or _check_chunk(int(env) if env.strip().isdigit() else (env or SCAN_CHUNK),
                                        "RNNC_TRITON_CHUNK")
        ct = min(ct, _pow2(T))  # a short sequence needs no longer chunk
        sz = {c: interpret.concrete((lay.size[c],), sizes)[0] for c in self.gen.classes}
        blk = {c: _pow2(sz[c]) for c in self.scan.kept}
        kp = lay.kept_parallel
        others = 1
        for st in lay.states:
            prod = 1
            for e in lay.entries(st.read):
                if e != "b" and e[1] != kp:
                    prod *= blk[e[1]]
            others = max(others, prod)
        if kp is not None:
            blk[kp] = min(blk[kp], _pow2_floor(max(1, SCAN_TILE // (ct * others))), 1024)
        while ct > 1 and ct * others * blk.get(kp, 1) > REGISTER_LIMIT:
            ct //= 2
        tile = ct * others * blk.get(kp, 1)
        if tile > REGISTER_LIMIT:
            raise RnncError(f"the scan kernel's state tile would hold {tile} values per program "
                            f"(limit {REGISTER_LIMIT}); use RNNC_TRITON_KERNEL=fused, or split the "
                            "state into heads")

        def count():
            ng = {c: (math.ceil(sz[c] / blk[c]) if c in blk else sz[c]) for c in self.scan.grid}
            return ng, B * math.prod(ng.values())
        ng, programs = count()
        while kp is not None and programs < PROGRAMS_WANTED and blk[kp] > 16:
            blk[kp] //= 2
            ng, programs = count()
        return {"sz": sz, "blk": blk, "ng": ng, "nb": B, "programs": programs, "chunk": ct,
                "warps": 4 if tile <= SCAN_TILE else 8}

    def scan_constexprs(self, sgeo) -> dict:
        kw = {f"SZ{c}": v for c, v in sgeo["sz"].items()}
        kw.update({f"BLK{c}": v for c, v in sgeo["blk"].items()})
        kw["BLK_T"] = sgeo["chunk"]
        kw["DOT_PREC"] = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        kw["num_warps"] = sgeo["warps"]
        kw["NUM_STAGES"] = 2
        return kw

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
        _check_tensors(ref)
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
        sgeo = self.scan_geometry(sizes, B, T) if self.kernel(T) == "scan" else None
        meta = (self, sizes, geo, B, T, len(streams), len(ps), len(h0), out_shapes, sgeo)
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


def _wanted_kernel() -> str:
    want = os.environ.get("RNNC_TRITON_KERNEL", "auto") or "auto"
    if want not in KERNELS:
        raise RnncError(f"RNNC_TRITON_KERNEL must be one of {', '.join(KERNELS)}, got {want!r}")
    return want


def _check_tensors(ref):
    if ref.device.type != "cuda" and not _interpreting():
        raise RnncError("the triton backend runs on CUDA tensors (or on CPU under "
                        "TRITON_INTERPRET=1); these are on " + str(ref.device))
    if ref.dtype != torch.float32:
        raise RnncError(f"the triton backend computes in float32; the compute dtype here is {ref.dtype} "
                        "(float64 params or inputs): use backend='scan' or 'sequential' for float64")


class ChunkedRunner:
    """Chunked plans (a matrix state with a diagonal decay and a rank-1 write, or a delta
    rule): the block solver, as the scan backend runs it, with the Triton chunk kernels
    (`triton_chunk`, `triton_delta`) for the matrix states. Gates, readouts and any small
    states beside the matrix state run in PyTorch over the whole block. One step (.step()),
    or RNNC_TRITON_KERNEL=fused, runs the fused recurrent kernel instead."""

    def __init__(self, rec, analysis, chunk: int | None = None):
        import types
        from . import scan_kernels, triton_chunk, triton_delta
        from .block_solver import BlockSolver
        self.rec, self.analysis = rec, analysis
        chunk = CHUNK if chunk is None else chunk
        allowed = sorted(set(triton_chunk.CHUNKS) & set(triton_delta.CHUNKS))
        if chunk not in allowed:
            raise RnncError(f"the triton backend's chunk kernels take chunk_size in {allowed}, got {chunk!r}")
        table = types.SimpleNamespace(
            linear_scan=scan_kernels.linear_scan, maxplus_scan=scan_kernels.maxplus_scan,
            dense_scan=scan_kernels.dense_scan,
            chunk_linear_attention=triton_chunk.chunk_linear_attention,
            chunk_delta_rule=triton_delta.chunk_delta_rule)
        self.solver = BlockSolver(rec, analysis, table, chunk, block=CHUNKED_BLOCK)
        self._fused = None

    def kernel(self, T: int) -> str:
        want = _wanted_kernel()
        if want == "scan":
            raise RnncError(f"RNNC_TRITON_KERNEL=scan, but rnn {self.rec.name} has no scan kernel: "
                            f"its {self.analysis.plan} plan has a matrix state (the scan kernel runs "
                            "diagonal states)")
        if want == "auto":  # one step gains nothing from a chunk
            return "chunked" if T > 1 else "fused"
        return want

    def __call__(self, sizes, params, inputs, state0):
        x0 = next(iter(inputs.values()), None)
        ref = x0 if x0 is not None else next(iter(state0.values()))
        T = x0.shape[1] if x0 is not None else 1
        _check_tensors(ref)
        if self.kernel(T) == "fused":
            if self._fused is None:
                self._fused = Runner(self.rec, self.analysis)
            return self._fused(sizes, params, inputs, state0)
        LAUNCHES["chunked"] += 1
        with _on(ref.device):
            return self.solver(sizes, params, inputs, state0)


def _flat_strides(ts) -> list:
    return [s for t in ts for s in t.stride()]


class _Fused(torch.autograd.Function):
    """streams, params, initial states -> outputs [B, T, ...], final states [B, ...]."""

    @staticmethod
    def forward(ctx, meta, want_grad, *tensors):
        runner, sizes, geo, B, T, nx_, np_, nh, out_shapes, sgeo = meta
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
        with _on(ref.device):
            if sgeo is None:
                LAUNCHES["forward"] += 1
                runner.kernels.forward[(geo["programs"],)](
                    *ts, *_flat_strides(ts), T, B, geo["nb"], *geo["ng"].values(),
                    STORE_HIST=bool(want_grad), **runner.constexprs(geo))
            else:
                LAUNCHES["_scan_forward"] += 1
                runner.kernels._scan_forward[(sgeo["programs"],)](
                    *ts, *_flat_strides(ts), T, B, sgeo["nb"], *sgeo["ng"].values(),
                    STORE_HIST=bool(want_grad), **runner.scan_constexprs(sgeo))
        if want_grad:
            ctx.save_for_backward(*xs, *ps, *hs)
        ctx.meta = meta
        ctx.counts = (nx_, np_, nh)
        return (*ys, *hts)

    @staticmethod
    def backward(ctx, *grads):
        runner, sizes, geo, B, T, nx_, np_, nh, out_shapes, _ = ctx.meta
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
    if analysis.plan in ("chunked", "chunked_delta"):
        return ChunkedRunner(rec, analysis, chunk_size)
    return Runner(rec, analysis, chunk_size)  # chunk_size: the scan kernel's chunk


def compile_for(rec, analysis, sizes: dict, B: int = 16, arch: int = 90) -> dict:
    """Compile the generated kernels for an NVIDIA target without a GPU (Triton runs its whole
    pipeline down to a cubin on the CPU). {kernel name: cubin size}. Run it without
    TRITON_INTERPRET (interpreted kernels do not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    runner = Runner(rec, analysis)
    gen = runner.gen
    kernels = [("forward", gen.fwd, runner.constexprs(runner.geometry(sizes, B))),
               ("backward", gen.bwd, runner.constexprs(runner.geometry(sizes, B)))]
    if runner.scan.source is not None:
        kernels.append(("_scan_forward", gen.fwd,
                        runner.scan_constexprs(runner.scan_geometry(sizes, B, 4096))))
    out = {}
    for kname, tensors, const in kernels:
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
