"""The Triton backend: generated fused recurrent kernels, forward and backward.

`build` generates the kernel source from the IR (`triton_codegen`), loads it through the
disk cache (`rnnc.cache`: Triton needs its source in a file), and returns a Runner:

1. hoisted contractions (W @ x over all B*T) run as torch GEMMs, differentiable as usual;
2. one `forward` kernel runs the whole time loop with the state in registers; or, when
   every state is diagonal (`elementwise_scan` plans), `_scan_forward` takes the steps in
   chunks with `tl.associative_scan` (`triton_scan_codegen`);
3. a `torch.autograd.Function` ties them together: its backward runs the generated
   `backward` kernel over the stored states in reverse time (both forwards store them),
   one step at a time; after `_scan_forward`, where the spec allows it (`Scan.backward`),
   `_scan_backward` instead, which scans the adjoint recurrence in reverse over chunks
   (`LAUNCHES` counts each kernel's launches by name).

Which forward runs: `RNNC_TRITON_KERNEL` = `auto` (default: the scan kernel where there is
one and T > 1), `fused` or `scan` (an error where there is none); read at every call. The
scan kernel's chunk is `chunk_size=` of `build`, else `RNNC_TRITON_CHUNK` (default 32), a
power of two.

It runs on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (Triton's
interpreter: slow, for tests at small sizes).

Low precision: the runners declare `native_inputs` (see `rnnc.backends`), so bfloat16/float16
inputs arrive as they are. The kernels read them directly (every load converts to float32)
and store the outputs in the inputs' dtype; hoisted contractions run in float32 on a float32
copy of the inputs they read; states, the state history and every gradient accumulator stay
float32, and the input gradients are cast to the inputs' dtype once, at the end.
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
LOW_PRECISION = (torch.bfloat16, torch.float16)  # input dtypes the kernels read natively
KERNELS = ("auto", "fused", "scan", "chunked")
CHUNK = None             # steps per chunk of the chunk kernels, by default; None: tuned (triton_tune)
CHUNKED_BLOCK = 8192     # steps per block of the block solver (hoisted work exists a block at a time); a multiple of every chunk
WIDE_BLOCK = 16          # state entries per program of the wide kernel (twice that past 2048)
WIDE_SPINS = 1 << 20     # waits a persistent wide launch may spend (plus 64 per step) before it gives up
WIDE_BK = 32             # columns per tile of its recurrent products (sm_90, H = 768: no spills at 8 warps)
LAUNCHES = collections.Counter()  # kernel name -> launches (tests check which ones ran)


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


class _TooWide(RnncError):
    """The fused kernel would not fit one program's registers at these sizes."""


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
    gen, _, text = _generate(rec, analysis)
    from . import triton_wide_codegen as wcg
    wide = wcg.generate(gen, rec)
    if wide.source is not None:
        text += ("\n\n# ---- wide kernel: the module generated for states too wide for the fused "
                 "kernel's registers ----\n" + wide.source)
    if analysis.plan not in ("chunked", "chunked_delta"):
        return text
    runner = ChunkedRunner(rec, analysis)
    if runner.fused_only:
        text += (f"\n\n{LIBRARY_MARKER}: none. This chunked_delta plan's form (several low-rank "
                 "or input terms per step) has no Triton chunk kernel yet: the fused kernel above "
                 "runs it (RNNC_TRITON_KERNEL=chunked: the PyTorch chunk form "
                 "scan_kernels.chunk_dplr).\n")
    else:
        from . import triton_chunk, triton_delta, triton_dplr
        dplr = bool(runner.dplr)
        lib = triton_chunk if analysis.plan == "chunked" else triton_dplr if dplr else triton_delta
        sigs = runner.signatures()
        added = (", terms added to the readout by _tile_e, _tile_u and _tile_x"
                 if analysis.plan == "chunked" else "")
        how = (f"the spec's gates computed by the generated loaders _ld_* and _tile_*{added}, "
               "the readouts' other terms in PyTorch" if sigs is not None else
               "operands computed in PyTorch and loaded as they are, such as an input of several "
               "terms, run once per term")
        what = "the chunked_delta plan with a decay per key channel" if dplr else \
            f"the {analysis.plan} plan"
        text += f"\n\n{LIBRARY_MARKER} for {what} ({how}) ----\n" + lib.source(sigs)
    return text


def chunk_signatures(rec, analysis) -> tuple | None:
    """ChunkedRunner.signatures of a chunked plan."""
    return ChunkedRunner(rec, analysis).signatures()


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
    native_inputs = True  # bf16/fp16 inputs as they are (module.py): read by the kernels

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
        self.pre_inputs = {d.name for d in rec.inputs if d.node in need}
        self._progs = {}
        self._wide = None
        self._wide_fell_back = False

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
            raise _TooWide(
                f"the fused kernel would hold {held} values per program in registers (params and "
                f"states at these sizes; limit {REGISTER_LIMIT}): a dense recurrence this wide needs a "
                "tiled matrix-vector product (the wide kernel), which does not apply here; use "
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
        _check_tensors(ref, [*params.values(), *state0.values()])
        # outputs in the inputs' dtype (bf16/fp16 inputs are read natively); states float32
        out_dtype = x0.dtype if x0 is not None else torch.float32
        out_shapes = {o.name: interpret.concrete(o.shape, sizes) for o in rec.outputs}
        if B == 0 or T == 0:
            return ({o.name: ref.new_zeros(B, T, *out_shapes[o.name], dtype=out_dtype) for o in rec.outputs},
                    dict(state0))
        reads, streams = self.streams(sizes, params, inputs, B, T)
        # what the kernels read where autograd follows another tensor of the same values
        raw = tuple(r if r is not x else None for r, x in zip(reads, streams))
        ps = [params[rec.node(n).name].contiguous() for n in lay.params]
        h0 = [state0[s.name].contiguous() for s in lay.states]
        want_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in streams + ps + h0)
        try:
            geo = self.geometry(sizes, B)
        except _TooWide as err:
            return self._wide_call(sizes, B, T, raw, streams, ps, h0, want_grad, out_shapes,
                                   out_dtype, err)
        hist = sum(B * (T + 1) * math.prod(interpret.concrete(s.shape, sizes)) for s in lay.states)
        if want_grad and hist > HISTORY_LIMIT:
            raise RnncError(f"training through the fused kernel stores every step's state ({hist:.3g} "
                            "elements here); use backend='scan' for this associative recurrence, "
                            "or shorter sequences")
        sgeo = self.scan_geometry(sizes, B, T) if self.kernel(T) == "scan" else None
        meta = (self, sizes, geo, B, T, len(streams), len(ps), len(h0), out_shapes, sgeo, out_dtype)
        res = _Fused.apply(meta, want_grad, raw, *streams, *ps, *h0)
        ys = res[:len(rec.outputs)]
        finals = res[len(rec.outputs):]
        return ({o.name: y for o, y in zip(rec.outputs, ys)},
                {s.name: f for s, f in zip(lay.states, finals)})

    # --- the wide kernel (triton_wide_codegen) ----------------------------------------------------
    def wide(self):
        """(Wide, its loaded module or None): generated on first need."""
        if self._wide is None:
            from rnnc import cache

            from . import triton_wide_codegen as wcg
            w = wcg.generate(self.gen, self.rec)
            mod = None if w.source is None else cache.load_module(
                w.source, "wide_interp" if _interpreting() else "wide")
            self._wide = (w, mod)
        return self._wide

    def wide_geometry(self, w, sizes: dict, B: int) -> dict:
        sz = {c: interpret.concrete((self.gen.layout.size[c],), sizes)[0] for c in w.classes}
        A = w.axis
        blk = WIDE_BLOCK if sz[A] <= 2048 else 2 * WIDE_BLOCK
        ng = {c: math.ceil(sz[c] / blk) if c == A else sz[c] for c in w.grid}
        bb = min(16, _pow2(B))
        nb = math.ceil(B / bb)
        const = {f"SZ{c}": v for c, v in sz.items()}
        const.update({f"BLK{A}": blk, "BLK_B": bb, "BK": min(WIDE_BK, max(16, _pow2(sz[A]))),
                      "DOT_PREC": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
                      "num_warps": 8})
        programs = nb * math.prod(ng.values())
        const["NPROG_P2"] = _pow2(programs)
        return {"ng": ng, "nb": nb, "programs": programs, "const": const}

    def _wide_sync(self, device, programs: int) -> bool:
        """Whether one launch runs every step (programs wait for each other between steps):
        RNNC_TRITON_WIDE = step (the default: the one-launch form has not yet run on a GPU, and
        a memory-ordering mistake there would give wrong numbers, not an error), persistent
        (always; the interpreter runs programs one after another, so there it only completes
        with one program, else falls back), or auto (on CUDA when every program can be
        resident at once, one per SM at most, and no earlier call had to fall back)."""
        mode = os.environ.get("RNNC_TRITON_WIDE", "step") or "step"
        if mode not in ("auto", "step", "persistent"):
            raise RnncError(f"RNNC_TRITON_WIDE must be auto, step or persistent, got {mode!r}")
        if mode != "auto":
            return mode == "persistent"
        return (device.type == "cuda" and not self._wide_fell_back
                and programs <= torch.cuda.get_device_properties(device).multi_processor_count)

    def _wide_call(self, sizes, B, T, raw, streams, ps, h0, want_grad, out_shapes, out_dtype, err):
        """Through the wide kernels: a dense recurrence too wide for the fused kernel. The
        arguments are __call__'s: the wide kernels take the fused kernel's streams, params (in
        `Layout.params` order, as `Wide.params`) and initial states."""
        rec, lay = self.rec, self.gen.layout
        w, mod = self.wide()
        if mod is None:
            raise RnncError(f"{err.message} (the wide kernel: {w.why})")
        if want_grad and w.why_backward:
            raise RnncError(
                "at these sizes the recurrent matrices do not fit the fused kernel's "
                f"registers, and the wide kernel that runs them has no backward here ({w.why_backward}): "
                "train with backend='sequential' (or 'auto', which does so), or run under torch.no_grad()")
        meta = (self, w, mod, self.wide_geometry(w, sizes, B), B, T, len(streams), len(ps),
                out_shapes, out_dtype)
        res = _Wide.apply(meta, want_grad, raw, *streams, *ps, *h0)
        no = len(rec.outputs)
        return ({o.name: y for o, y in zip(rec.outputs, res[:no])},
                {s.name: f for s, f in zip(lay.states, res[no:])})

    def wide_launch(self, kernel, name: str, T: int, ts: list, geo: dict, per_step, whole, reset) -> None:
        """Runs a wide kernel over T steps: one launch for all (`whole`, the programs waiting
        for each other) where `_wide_sync` allows, else one launch per step (`per_step(t)` gives
        the launch's (t0, t1)); a whole launch that some program gave up on is redone per step,
        after `reset()` has set the buffers it writes back to their starting values."""
        ref = ts[0]
        sync = self._wide_sync(ref.device, geo["programs"])
        launch = kernel[(geo["programs"],)]
        spins = WIDE_SPINS + 64 * T
        while True:
            reset()
            flags = torch.zeros(geo["programs"] if sync else 1, dtype=torch.int32, device=ref.device)
            failed = torch.zeros(1, dtype=torch.int32, device=ref.device)
            args = (*ts, *_flat_strides(ts), flags, failed)
            with _on(ref.device):
                for t0, t1, rest in ([whole] if sync else (per_step(t) for t in range(T))):
                    launch(*args, t0, t1, *rest, geo["programs"], spins, SYNC=sync, **geo["const"])
                    LAUNCHES[name] += 1
            if not sync or not bool(failed.item()):
                return
            # some program waited past the cap (not all were resident): a step a launch
            LAUNCHES["wide_fallback"] += 1
            self._wide_fell_back, sync = True, False

    def streams(self, sizes, params, inputs, B, T) -> tuple:
        """(reads, grads): the [B, T, *shape] tensors the kernel reads per step, inputs (in
        their own dtype: the kernel converts as it loads) and hoisted contractions (float32);
        and the tensors autograd follows for them, the same except for a bf16/fp16 input that
        the hoisted contractions read too: its float32 copy, so that the input's gradients
        from the kernel and from the contractions add up in float32 and are rounded once."""
        rec, lay = self.rec, self.gen.layout
        env, copies = {}, {}
        if lay.pre:
            key = tuple(sorted(sizes.items()))
            if key not in self._progs:
                x = next(iter(inputs.values()))
                self._progs[key] = interpret.lower_nodes(rec, self.pre_nodes, sizes, torch.float32, x.device)
            for d in rec.inputs:
                if d.name in self.pre_inputs:  # the GEMMs run in float32, on a float32 copy
                    x = copies[d.name] = inputs[d.name].to(torch.float32)
                    env[d.node] = x.reshape(B * T, *x.shape[2:])
            for d in rec.params:
                env[d.node] = params[d.name].unsqueeze(0)
            interpret.run_program(self._progs[key], env)
        reads, grads = [], []
        for n in lay.streams:
            node = rec.node(n)
            shape = interpret.concrete(rec.attr(n, "shape"), sizes)
            if isinstance(node, ir.Input):
                x = inputs[node.name].contiguous()
                reads.append(x)
                grads.append(copies[node.name] if node.name in copies and x.dtype != torch.float32 else x)
            else:
                v = env[n]
                reads.append(v.expand(B * T, *shape).reshape(B, T, *shape).contiguous())
                grads.append(reads[-1])
        return reads, grads


def _wanted_kernel() -> str:
    want = os.environ.get("RNNC_TRITON_KERNEL", "auto") or "auto"
    if want not in KERNELS:
        raise RnncError(f"RNNC_TRITON_KERNEL must be one of {', '.join(KERNELS)}, got {want!r}")
    return want


def _check_tensors(ref, others=()):
    """`ref`: the first input (else a state); `others`: params and initial states. Inputs may
    be float32, bfloat16 or float16 (read natively); everything else must be float32."""
    if ref.device.type != "cuda" and not _interpreting():
        raise RnncError("the triton backend runs on CUDA tensors (or on CPU under "
                        "TRITON_INTERPRET=1); these are on " + str(ref.device))
    for t in [ref, *others]:
        if t.dtype == torch.float64:
            raise RnncError("the triton backend computes in float32; the compute dtype here is "
                            "torch.float64 (float64 params or inputs): use backend='scan' or "
                            "'sequential' for float64")
    if ref.dtype not in (torch.float32, *LOW_PRECISION):
        raise RnncError(f"the triton backend reads float32, bfloat16 or float16 inputs, got {ref.dtype}")
    bad = next((t.dtype for t in others if t.dtype != torch.float32), None)
    if bad is not None:
        raise RnncError(f"the triton backend computes in float32: params and states must be "
                        f"float32 (bfloat16/float16 is for inputs only), got {bad}")


class ChunkedRunner:
    """Chunked plans (a matrix state with a diagonal decay and a rank-1 write, or a delta
    rule): the block solver, as the scan backend runs it, with the Triton chunk kernels
    (`triton_chunk`, `triton_delta`) for the matrix states. The chunk kernels compute their
    operands, the spec's gates, themselves (`triton_gates`), and add a term the step adds to
    a linear-attention readout or a bonus inside it (`chunk_plan.StreamPlan`); the readouts'
    other terms and any small states beside the matrix state run in PyTorch over the whole
    block. One step (.step()), or RNNC_TRITON_KERNEL=fused, runs the fused recurrent kernel
    instead.

    bf16/fp16 inputs go to the fused kernel, and to the block solver, as they are: the chunk
    kernels read them (a stream's loads widen them to float32), and whatever runs in PyTorch
    reads a float32 copy of a block, made on first use. The chunk kernels' tl.dot then runs
    in TF32 (gates.dot_precision)."""

    native_inputs = True

    def __init__(self, rec, analysis, chunk: int | None = None):
        import types
        from . import scan_kernels, triton_chunk, triton_delta, triton_dplr, triton_gates
        from .block_solver import BlockSolver
        self.rec, self.analysis = rec, analysis
        chunk = CHUNK if chunk is None else chunk
        allowed = sorted(set(triton_chunk.CHUNKS) & set(triton_delta.CHUNKS) & set(triton_dplr.CHUNKS))
        if chunk is not None and chunk not in allowed:
            raise RnncError(f"the triton backend's chunk kernels take chunk_size in {allowed}, got {chunk!r}")
        # chunk None: each chunk-kernel call chooses its own (triton_tune); the block solver
        # needs no chunk of its own here (its block is CHUNKED_BLOCK)
        table = types.SimpleNamespace(
            linear_scan=scan_kernels.linear_scan, maxplus_scan=scan_kernels.maxplus_scan,
            dense_scan=scan_kernels.dense_scan,
            chunk_linear_attention=triton_chunk.chunk_linear_attention,
            chunk_delta_rule=triton_delta.chunk_delta_rule, gate_streams=triton_gates,
            chunk_dplr=self._dplr, dplr_fits=triton_dplr.fits)
        self._dplr_chunk = chunk   # None: triton_dplr's default (the solver passes its own)
        self.solver = BlockSolver(rec, analysis, table, chunk, block=CHUNKED_BLOCK)
        self._fused = None
        # A delta rule with several low-rank terms (DeltaProduct) or several input terms
        # beside a decay per key channel runs the generated fused kernel: triton_dplr takes
        # one of each, and the form for more exists only in PyTorch (many small launches
        # per chunk on a GPU), run where RNNC_TRITON_KERNEL=chunked asks for it
        self.dplr = [lay for lay in self.solver.layout.values()
                     if lay.delta is not None and lay.delta.general]   # the dplr form's states
        self.fused_only = any(lay.delta.rank > 1 or len(lay.pairs) > 1 for lay in self.dplr)

    def _dplr(self, q, r, w, p, v, log_alpha, S0, chunk=None, include_current=True):
        """The diagonal-plus-low-rank form: triton_dplr's kernels where they take it (one
        erase and one input term), scan_kernels' PyTorch form otherwise."""
        from . import scan_kernels, triton_dplr
        if triton_dplr.fits(r, p) is None:
            return triton_dplr.chunk_dplr(q, r, w, p, v, log_alpha, S0, chunk=self._dplr_chunk,
                                          include_current=include_current)
        return scan_kernels.chunk_dplr(q, r, w, p, v, log_alpha, S0, chunk=chunk,
                                       include_current=include_current)

    def signatures(self) -> tuple | None:
        """The operand stream signatures of the first matrix state (q, k, v, g for linear
        attention; q, r, w, p, v, log_alpha for the delta rule), as its chunk kernels are
        generated (None: the materialised operands' defaults)."""
        name = next(iter(self.solver.streams), None)
        return self.solver.stream_signatures(name) if name else None

    def kernel(self, T: int) -> str:
        want = _wanted_kernel()
        if want == "scan":
            raise RnncError(f"RNNC_TRITON_KERNEL=scan, but rnn {self.rec.name} has no scan kernel: "
                            f"its {self.analysis.plan} plan has a matrix state (the scan kernel runs "
                            "diagonal states)")
        if want == "auto":  # one step gains nothing from a chunk
            return "chunked" if T > 1 and not self.fused_only else "fused"
        return want

    def __call__(self, sizes, params, inputs, state0):
        x0 = next(iter(inputs.values()), None)
        ref = x0 if x0 is not None else next(iter(state0.values()))
        T = x0.shape[1] if x0 is not None else 1
        _check_tensors(ref, [*params.values(), *state0.values()])
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
    def forward(ctx, meta, want_grad, raw, *tensors):
        """raw[j], where not None, is what the kernels read for stream j: the same values as
        tensors[j] (which autograd follows) in a narrower dtype."""
        runner, sizes, geo, B, T, nx_, np_, nh, out_shapes, sgeo, out_dtype = meta
        rec, lay = runner.rec, runner.gen.layout
        ctx.x_dtypes = [x.dtype for x in tensors[:nx_]]
        xs = [x if r is None else r for x, r in zip(tensors[:nx_], raw)]
        ps = tensors[nx_:nx_ + np_]
        h0 = tensors[nx_ + np_:]
        ref = h0[0] if h0 else xs[0]
        # outputs in the inputs' dtype: tl.store rounds the float32 value to the pointer's type
        ys = [ref.new_empty(B, T, *out_shapes[o.name], dtype=out_dtype) for o in rec.outputs]
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
        runner, sizes, geo, B, T, nx_, np_, nh, out_shapes, sgeo, _ = ctx.meta
        rec = runner.rec
        saved = ctx.saved_tensors
        xs, ps, hs = saved[:nx_], saved[nx_:nx_ + np_], saved[nx_ + np_:]
        no = len(rec.outputs)
        dys = [g.contiguous() if g is not None else torch.zeros(B, T, *out_shapes[o.name], device=hs[0].device if hs else xs[0].device)
               for g, o in zip(grads[:no], rec.outputs)]
        dhts = [g.contiguous() if g is not None else torch.zeros_like(h[:, 0])
                for g, h in zip(grads[no:], hs)]
        if sgeo is not None and runner.scan.backward:  # scan forward: the reverse scan
            return (None, None, None,
                    *_scan_backward(runner, sgeo, B, T, xs, ps, hs, dys, dhts, ctx.x_dtypes))
        # dy may be bf16/fp16 (the kernel converts it as it loads); the stream gradients
        # accumulate in float32 and are cast to the streams' dtype once, after the sum
        dxs = [x.new_zeros(runner.split_count(f"DX{j}", geo), *x.shape, dtype=torch.float32)
               for j, x in enumerate(xs)]
        dps = [p.new_zeros(runner.split_count(f"DP{j}", geo), *p.shape) for j, p in enumerate(ps)]
        dh0 = [h.new_zeros(runner.split_count(f"DH0_{j}", geo), h.shape[0], *h.shape[2:]) for j, h in enumerate(hs)]
        ts = [*xs, *ps, *hs, *dys, *dhts, *dxs, *dps, *dh0]
        with _on(ts[0].device):
            runner.kernels.backward[(geo["programs"],)](
                *ts, *_flat_strides(ts), T, B, geo["nb"], *geo["ng"].values(), **runner.constexprs(geo))
        gx = [d.sum(0).to(dt) for d, dt in zip(dxs, ctx.x_dtypes)]
        gp = [d.sum(0) for d in dps]
        gh = [d.sum(0) for d in dh0]
        return (None, None, None, *gx, *gp, *gh)


class _Wide(torch.autograd.Function):
    """streams, params, initial states -> outputs [B, T, ...], final states [B, ...], through
    the wide kernels (`triton_wide_codegen`). Training keeps every step's state: the state
    buffer gets T + 1 slots instead of two, and is the history the backward replays."""

    @staticmethod
    def forward(ctx, meta, want_grad, raw, *tensors):
        runner, w, mod, geo, B, T, nx_, np_, out_shapes, out_dtype = meta
        rec, lay = runner.rec, runner.gen.layout
        ctx.x_dtypes = [x.dtype for x in tensors[:nx_]]
        xs = [x if r is None else r for x, r in zip(tensors[:nx_], raw)]
        ps, h0 = tensors[nx_:nx_ + np_], tensors[nx_ + np_:]
        slots = T + 1 if want_grad else 2
        sbs = [h.new_empty(slots, *h.shape) for h in h0]

        def reset():  # every slot starts as the initial state: a constant state is read from any
            for sb, h in zip(sbs, h0):
                sb.copy_(h.unsqueeze(0).expand_as(sb))
        ref = h0[0]
        ys = [ref.new_empty(B, T, *out_shapes[o.name], dtype=out_dtype) for o in rec.outputs]
        tail = (slots, B, geo["nb"], *geo["ng"].values())
        runner.wide_launch(mod.wide_forward, "wide_forward", T, [*xs, *ps, *sbs, *ys], geo,
                           lambda t: (t, t + 1, tail), (0, T, tail), reset)
        if want_grad:
            ctx.save_for_backward(*xs, *ps, *sbs)
        ctx.meta = meta
        return (*ys, *[sb[T % slots] for sb in sbs])

    @staticmethod
    def backward(ctx, *grads):
        runner, w, mod, geo, B, T, nx_, np_, out_shapes, _ = ctx.meta
        rec, lay = runner.rec, runner.gen.layout
        saved = ctx.saved_tensors
        xs, ps, sbs = saved[:nx_], saved[nx_:nx_ + np_], saved[nx_ + np_:]
        no = len(rec.outputs)
        dev = sbs[0].device
        dys = [g.contiguous() if g is not None else torch.zeros(B, T, *out_shapes[o.name], device=dev)
               for g, o in zip(grads[:no], rec.outputs)]
        # LAM: the adjoint of the state after the step being undone, the final state's first
        dhts = [g.to(torch.float32) if g is not None else torch.zeros_like(sb[0])
                for g, sb in zip(grads[no:], sbs)]
        lams = [torch.empty_like(sb[0]) for sb in sbs]
        mats = {pr.param for pr in w.products}
        gps = [torch.empty(T + 1, B, *sbs[pr.state].shape[2:], device=dev) for pr in w.products]
        dxs = [torch.empty(x.shape, device=dev) for x in xs]
        vec = [j for j, n in enumerate(w.params) if n not in mats]
        dps = [torch.empty(geo["nb"], *ps[j].shape, device=dev) for j in vec]

        def reset():
            for lam, d in zip(lams, dhts):
                lam.copy_(d)
            for z in gps + dxs + dps:  # GP's slot T (after the last step) stays zero
                z.zero_()
        ts = [*xs, *ps, *sbs, *dys, *lams, *gps, *dxs, *dps]
        tail = (T, B, geo["nb"], *geo["ng"].values())
        runner.wide_launch(mod.wide_backward, "wide_backward", T, ts, geo,
                           lambda t: (T - 1 - t, T - t, tail), (0, T, tail), reset)
        # What the kernel leaves to GEMMs: each matrix's gradient, sum over steps and batch of
        # g_t h_{t-1}^T, and the initial state's share of the products of the first step.
        gp = [None] * len(ps)
        for pr, g in zip(w.products, gps):
            order = (pr.out_axis, pr.sum_axis)
            hist = sbs[pr.state][:T]
            dW = torch.einsum("tbe,tbu->eu", g[:T], hist)
            dW = dW if order == (0, 1) else dW.t()
            gp_j = w.params.index(pr.param)
            gp[gp_j] = dW if gp[gp_j] is None else gp[gp_j] + dW
            W = ps[gp_j] if order == (0, 1) else ps[gp_j].t()
            lams[pr.state] = lams[pr.state] + g[0] @ W
        for j, d in zip(vec, dps):
            gp[j] = d.sum(0)
        gx = [d.to(dt) for d, dt in zip(dxs, ctx.x_dtypes)]
        return (None, None, None, *gx, *gp, *lams)


def _scan_backward(runner, sgeo, B, T, xs, ps, hs, dys, dhts, x_dtypes) -> tuple:
    """Gradients of streams, params and initial states by the generated `_scan_backward`
    (`triton_scan_codegen`): the adjoint recurrence scanned in reverse time, chunk by chunk,
    over the history the scan forward stored. Same buffers as the fused backward (a leading
    split axis summed here), split by the scan kernel's own grid (`runner.scan.splits`)."""
    def count(name):
        return math.prod(sgeo["nb"] if d == "B" else sgeo["ng"][d] for d in runner.scan.splits[name])
    f32 = torch.float32
    dxs = [x.new_zeros(count(f"DX{j}"), *x.shape, dtype=f32) for j, x in enumerate(xs)]
    dps = [p.new_zeros(count(f"DP{j}"), *p.shape, dtype=f32) for j, p in enumerate(ps)]
    dh0 = [h.new_zeros(count(f"DH0_{j}"), h.shape[0], *h.shape[2:], dtype=f32) for j, h in enumerate(hs)]
    ts = [*xs, *ps, *hs, *dys, *dhts, *dxs, *dps, *dh0]
    LAUNCHES["_scan_backward"] += 1
    with _on(ts[0].device):
        runner.kernels._scan_backward[(sgeo["programs"],)](
            *ts, *_flat_strides(ts), T, B, sgeo["nb"], *sgeo["ng"].values(), **_scan_backward_constexprs(runner, sgeo))
    return (*[d.sum(0).to(dt) for d, dt in zip(dxs, x_dtypes)],
            *[d.sum(0).to(p.dtype) for d, p in zip(dps, ps)], *[d.sum(0).to(h.dtype) for d, h in zip(dh0, hs)])


def _scan_backward_constexprs(runner, sgeo) -> dict:
    """The forward's blocks and chunk (the same grid, so the same split slices), with twice the
    warps: the backward holds about twice as many tiles live (values and their adjoints); at
    one warp group per 4096-value tile, S6's spilled to the stack on sm_90."""
    kw = runner.scan_constexprs(sgeo)
    kw["num_warps"] = min(16, 2 * kw["num_warps"])
    return kw


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


def signature(rec, arg_names, tensors, const: dict, dtype: str = "fp32", flags=()) -> tuple:
    """(signature, constexprs) of one generated kernel for `triton.compile`: its pointer
    arguments `tensors` (`Generated.fwd` or `.bwd`), `const` its constexpr values. dtype is
    the inputs' dtype, "fp32", "bf16" or "fp16": the tensors a call with such inputs passes
    in it are typed so (the raw input streams, the outputs, and the outputs' gradients as the
    backward reads them); hoisted contractions, params, states, the history and every
    gradient the kernels write stay fp32. `flags` names int32 pointer arguments (the wide
    kernels' `Wide.flag_args`)."""
    import re
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
    by_name = {t.name: t for t in tensors}

    def element(t) -> str:
        low = (re.fullmatch(r"(Y|DY)\d+", t.name)
               or (re.fullmatch(r"X\d+", t.name) and isinstance(rec.node(t.node), ir.Input)))
        return dtype if low else "fp32"
    sig, consts = {}, {}
    for name in arg_names:
        if name in const or name == "STORE_HIST":
            sig[name] = "constexpr"
            consts[name] = const.get(name, True)
        elif name in by_name:
            sig[name] = "*" + element(by_name[name])
        elif name in flags:
            sig[name] = "*i32"
        else:
            sig[name] = "i32"
    return sig, consts


def compile_for(rec, analysis, sizes: dict, B: int = 16, arch: int = 90, dtype: str = "fp32") -> dict:
    """Compile the generated kernels for an NVIDIA target without a GPU (Triton runs its whole
    pipeline down to a cubin on the CPU): the fused forward and backward where they fit at
    these sizes, the wide kernel where the spec has one, the scan kernels where it has them.
    {kernel name: cubin size}. Run it without
    TRITON_INTERPRET (interpreted kernels do not compile). dtype: the inputs' dtype ("fp32",
    "bf16" or "fp16"; see `signature`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    runner = Runner(rec, analysis)
    gen = runner.gen
    fused = runner.kernels
    try:
        geo = runner.geometry(sizes, B)
        kernels = [(fused, "forward", gen.fwd, runner.constexprs(geo)),
                   (fused, "backward", gen.bwd, runner.constexprs(geo))]
    except _TooWide:  # only the wide kernels run at these sizes
        kernels = []
    w, wmod = runner.wide()
    if wmod is not None:
        wconst = {**runner.wide_geometry(w, sizes, B)["const"], "SYNC": True}
        kernels.append((wmod, "wide_forward", w.args, wconst))
        if not w.why_backward:
            kernels.append((wmod, "wide_backward", w.bwd_args, wconst))
    if not kernels:
        raise RnncError(w.why)
    if runner.scan.source is not None:
        kernels.append((fused, "_scan_forward", gen.fwd,
                        runner.scan_constexprs(runner.scan_geometry(sizes, B, 4096))))
    if runner.scan.backward:
        kernels.append((fused, "_scan_backward", gen.bwd,
                        _scan_backward_constexprs(runner, runner.scan_geometry(sizes, B, 4096))))
    out = {}
    for mod, kname, tensors, const in kernels:
        fn = getattr(mod, kname)
        sig, consts = signature(rec, fn.arg_names, tensors, const, dtype, w.flag_args)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        out[kname] = len(triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["cubin"])
    return out
