"""`rnnc bench`: check every backend against the reference, then time it. Entry point: `run_bench`.

    records = run_bench("examples/gla.rnn", T=[256, 1024], backends="all", peers=True)

What it does, in order:

1. Sizes: the dims the user gave, the rest from `DEFAULT_DIMS` (small, laptop-sized).
2. Inputs: one distribution per input, read off the spec's affine normal form
   (`input_kinds`): an input that is the whole argument of exp() in a state's transition is a
   log decay (logsigmoid(randn)); one that scales the state directly is a gate
   (sigmoid(randn)); one that appears twice in a transition term (the k k^T of a delta rule)
   is an L2-normalised key; one that multiplies inside such an exp (mamba's dt) is positive
   (softplus(randn)); an input under log() or sqrt() is positive; everything else is randn.
   Params keep the spec's own initialisation, drawn once (seeded) and shared by every
   backend and peer.
3. Correctness first: every selected backend runs at B=2, T=37 and T=131 (one chunk, and
   several with a partial last one) in float64 and is compared with the sequential backend.
   A relative error (max |got - want| / max |want|) above 1e-6, or an exception, marks the
   backend "failed": it is not timed and no speed of it is ever shown. A backend that cannot
   run the recurrence (an RnncError from rnnc.compile) is "n/a" with its reason. A backend
   that rejects float64 with an RnncError is checked in float32 against 1e-4 instead. Then
   the same inputs, rounded to the benchmark's dtype, must run and stay within a loose bound
   (1e-3 in float32, 5e-2 in bfloat16/float16) of the float64 reference on the rounded
   values, so a backend that only breaks in the timed dtype fails here, not while timed.
   On CUDA every float32 bound is at least 5e-3, since matrix products may run in TF32.
4. Timing, per T and backend: the first call is timed on its own and reported, with
   rnnc.compile, as compile_ms; then warm-up calls, then repetitions (median, min, max). On
   CUDA each repetition is timed with CUDA events after a synchronize; on CPU with
   perf_counter. Forward runs under torch.no_grad(); with backward=True a second pass times
   forward + backward of the sum of all outputs (grads w.r.t. inputs and params).
5. Peers (peers=True): the adapters of `rnnc.peers` for the block's name, each checked in
   float32 against the sequential reference (relative error <= 1e-4 on CPU, where fla's naive
   code computes in fp32; <= 5e-3 on CUDA, for TF32) before it is timed the same way.

Memory (peak_mem_bytes) is what the calls needed on top of what was allocated before them
(inputs, params, other modules), with the method in mem_method:
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the
  allocation before, over the timed calls;
- CPU: one extra, untimed call under torch.profiler(profile_memory=True): the highest running
  total of the allocations minus frees it records, which is what max_memory_allocated measures
  on CUDA. (The process's RSS says little here: after the warm-up the allocator reuses memory
  it already holds.) Where the profiler is unavailable: psutil's peak RSS, sampled every
  millisecond, minus the RSS before; without psutil, the growth of resource.getrusage's
  ru_maxrss, a process-wide high-water mark that reads 0 when an earlier run peaked higher.

Bandwidth (GPU, forward, elementwise_scan plans only): such a plan is memory-bound, and the
model counts each input and output element once: bytes = (input elements + output elements
per step) * B * T * element size. gbps = bytes / median time; bw_fraction = gbps / the
device's peak (from the memory clock and bus width, or RNNC_PEAK_GBPS).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter

import torch
import torch.nn.functional as F

from .errors import RnncError

__all__ = ["run_bench", "render_table", "save_plot", "input_kinds", "sizes_for", "DEFAULT_DIMS"]

# Default sizes per dim name; any dim not listed gets OTHER_DIM. H is a number of heads (4)
# when some input, state or output has another axis after it (q[H,K], S[H,K,V]), otherwise a
# hidden width (elman's h[H]): HIDDEN_H.
DEFAULT_DIMS = {"H": 4, "K": 64, "V": 64, "D": 256, "N": 16, "P": 64}
HIDDEN_H = 256
OTHER_DIM = 32
DEFAULT_T = {"cpu": (256, 1024), "cuda": (256, 1024, 4096)}
DEFAULT_B = 4

CHECK_B = 2
CHECK_T = (37, 131)
CHECK_TOL = 1e-6       # float64 backends against the float64 reference
CHECK_TOL_F32 = 1e-4   # backends that only run float32
# On CUDA, float32 matrix products may run in TF32 (Triton's tl.dot, cuDNN RNNs): about 1e-3.
CHECK_TOL_TF32 = 5e-3
# Then the same check in the benchmark's dtype (inputs rounded to it, the reference computed in
# float64 on the rounded values): a loose bound that catches crashes and gross errors.
CHECK_TOL_DTYPE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2, "float64": CHECK_TOL}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
KINDS = ("normal", "unit", "gate", "logdecay", "positive")
_PRIORITY = {"normal": 0, "gate": 1, "positive": 2, "logdecay": 3, "unit": 4}

# Repetitions when the caller does not fix them: at least MIN, at most MAX, stopping once the
# timed calls have taken BUDGET seconds.
_AUTO_REPS = {"cpu": (3, 10, 2.0), "cuda": (10, 100, 1.0)}
_AUTO_WARMUP = {"cpu": 1, "cuda": 3}

PASSES = ("forward", "forward+backward")
WHO = "rnnc bench"  # errors about the request rather than the spec: "rnnc bench: error: ..."


# ---------------------------------------------------------------------------------------------
# sizes and inputs
# ---------------------------------------------------------------------------------------------

def _default_dims(rec) -> dict:
    head_axis = False
    for d in [*rec.inputs, *rec.states, *rec.outputs]:
        for s in d.shape[:-1]:
            if any(x.name == "H" for x in s.free_symbols):
                head_axis = True
    out = {}
    for name in rec.dims:
        if name == "H" and not head_axis:
            out[name] = HIDDEN_H
        else:
            out[name] = DEFAULT_DIMS.get(name, OTHER_DIM)
    return out


def sizes_for(rec, given: dict) -> dict:
    """Every dim of the recurrence: the given sizes, the rest from the defaults."""
    for k, v in given.items():
        if k not in rec.dims:
            raise RnncError(f"unknown dim {k!r} (rnn {rec.name} has dims: {', '.join(rec.dims) or 'none'})",
                            filename=rec.filename)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RnncError(f"dim {k} must be a positive integer, got {v!r}", filename=rec.filename)
    return {**_default_dims(rec), **given}


def _base_input(rec, n):
    """The input a node is, up to Select/Broadcast (g[h,i] is still g), or None."""
    from . import ir
    while True:
        node = rec.node(n)
        if isinstance(node, ir.Input):
            return node.name
        if isinstance(node, (ir.Select, ir.Broadcast)):
            n = node.arg
            continue
        return None


def _product_inputs(rec, n) -> set:
    """Inputs that are factors of a product (through *, unary -, the numerator of /)."""
    from . import ir
    from .ir import Op
    name = _base_input(rec, n)
    if name is not None:
        return {name}
    node = rec.node(n)
    if isinstance(node, (ir.Select, ir.Broadcast)):
        return _product_inputs(rec, node.arg)
    if isinstance(node, ir.Elementwise):
        if node.op in (Op.MUL, Op.NEG):
            return set().union(*(_product_inputs(rec, a) for a in node.args))
        if node.op is Op.DIV:
            return _product_inputs(rec, node.args[0])
    return set()


def input_kinds(rec, facts, overrides: dict | None = None) -> dict:
    """{input name: distribution kind} for a recurrence (see the module docstring)."""
    from . import ir
    from .ir import Op
    kinds = {d.name: "normal" for d in rec.inputs}

    def vote(name, kind):
        if _PRIORITY[kind] > _PRIORITY[kinds[name]]:
            kinds[name] = kind

    for st in facts.states:
        for t in st.terms or ():
            if t.state is None:
                continue  # the input term b: any distribution is fine
            counts = Counter()
            for f in t.factors:
                name = _base_input(rec, f.node)
                if name is not None:
                    counts[name] += 1
                    continue
                node = rec.node(f.node)
                if isinstance(node, ir.Elementwise) and node.op is Op.EXP:
                    inner = _base_input(rec, node.args[0])
                    if inner is not None:
                        vote(inner, "logdecay")
                    else:
                        for x in _product_inputs(rec, node.args[0]):
                            vote(x, "positive")
            for name, c in counts.items():
                vote(name, "unit" if c >= 2 else "gate")
    for i in rec.order():
        node = rec.node(i)
        if isinstance(node, ir.Elementwise) and node.op in (Op.LOG, Op.SQRT):
            name = _base_input(rec, node.args[0])
            if name is not None:
                vote(name, "positive")
    for name, kind in (overrides or {}).items():
        if name not in kinds:
            raise RnncError(f"--dist names no input {name!r} (rnn {rec.name} has inputs: "
                            f"{', '.join(kinds) or 'none'})", filename=rec.filename)
        if kind not in KINDS:
            raise RnncError(f"--dist {name}={kind}: the kind must be one of {', '.join(KINDS)}",
                            filename=rec.filename)
        kinds[name] = kind
    return kinds


def _sample(kind: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if kind == "unit":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if kind == "gate":
        return torch.sigmoid(x)
    if kind == "logdecay":
        return F.logsigmoid(x)
    if kind == "positive":
        return F.softplus(x)
    return x


def _make_inputs(rec, kinds, sizes, B, T, dtype, device, seed) -> list:
    """Inputs in header order, [B, T, *shape], drawn in float64 on the CPU (so one seed gives
    the same values whatever the dtype and device), then cast and moved."""
    from .interpret import concrete
    gen = torch.Generator().manual_seed(seed)
    return [_sample(kinds[d.name], (B, T, *concrete(d.shape, sizes)), gen).to(device=device, dtype=dtype)
            for d in rec.inputs]


def _outs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _rel_err(got, want) -> float:
    """max |got - want| / max |want| over all outputs; inf when anything is not finite."""
    num, den = 0.0, 0.0
    for g, w in zip(got, want):
        g = g.detach().to(torch.float64)
        w = w.detach().to(torch.float64)
        if g.shape != w.shape:
            raise ValueError(f"output shape {list(g.shape)} != reference {list(w.shape)}")
        if not bool(torch.isfinite(g).all()):
            return math.inf
        if g.numel():
            num = max(num, float((g - w).abs().max()))
            den = max(den, float(w.abs().max()))
    return num / den if den > 0 else num


def _short(e: BaseException) -> str:
    text = e.message if isinstance(e, RnncError) else str(e)
    line = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {line}" if not isinstance(e, RnncError) else line


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class _MemProbe:
    """Peak memory of the calls made inside the `with` block, above what was allocated before."""

    def __init__(self, device: str):
        self.device = device
        self.bytes = None
        self.method = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated - allocated before"
            return self
        try:
            import psutil
        except ImportError:
            import resource
            self._ru = resource
            self.base = self._maxrss()
            self.method = "ru_maxrss growth (process high-water mark; 0 if an earlier run peaked higher)"
            return self
        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self._peak = self.base
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._proc.memory_info().rss)
                self._stop.wait(0.001)
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        self.method = "psutil peak RSS - RSS before (sampled every 1 ms)"
        return self

    def _maxrss(self) -> int:
        r = self._ru.getrusage(self._ru.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = max(0, torch.cuda.max_memory_allocated() - self.base)
        elif hasattr(self, "_proc"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.bytes = max(0, self._peak - self.base)
        else:
            self.bytes = max(0, self._maxrss() - self.base)
        return False


def _measure(fn, device: str, reps, warmup) -> dict:
    """Time fn(): the first call alone, `warmup` untimed calls, then the repetitions; then
    (CPU) one more, untimed call for the memory peak."""
    _sync(device)
    t0 = time.perf_counter()
    first = fn()
    _sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    del first
    for _ in range(_AUTO_WARMUP[device] if warmup is None else warmup):
        fn()
        _sync(device)
    lo, hi, budget = _AUTO_REPS[device]
    if reps is not None:
        lo = hi = reps
    times = []
    with _MemProbe(device) if device == "cuda" else _nothing() as mem:
        while len(times) < hi and (len(times) < lo or sum(times) < budget * 1e3):
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
    if device == "cuda":
        peak, method = mem.bytes, mem.method
    else:
        try:
            peak, method = _profiled_peak(fn), PROFILER_METHOD
        except Exception:  # a torch without kineto: fall back on the process's RSS
            with _MemProbe(device) as mem:
                fn()
            peak, method = mem.bytes, mem.method
    return {"first_ms": first_ms, "times": times, "mem": peak, "mem_method": method}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


PROFILER_METHOD = "peak of torch's CPU allocations during one extra call (torch.profiler, profile_memory)"


class _quiet_stderr:
    """Silence file descriptor 2 (kineto logs profiler start/stop there from C++)."""

    def __enter__(self):
        self.saved = None
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except (OSError, AttributeError, ValueError):
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def _profiled_peak(fn) -> int:
    """Bytes: the highest running total of torch's CPU allocations minus frees during fn()."""
    from torch.profiler import ProfilerActivity, profile
    # fd 2 stays quiet for the whole call: kineto logs start/stop, and the allocator warns about
    # every block allocated before profiling and freed during it. The call is untimed and has
    # already run (first call, warm-up, repetitions), so nothing new can be hidden.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    total = peak = 0
    for _, n in events:
        total += n
        peak = max(peak, total)
    return peak


def _module_fns(m, xs):
    """(forward, forward+backward) closures for a compiled module."""
    def fwd():
        with torch.no_grad():
            return _outs(m(*xs))

    leaves = [x.detach().clone().requires_grad_(True) for x in xs]

    def fwd_bwd():
        m.zero_grad(set_to_none=True)
        for x in leaves:
            x.grad = None
        outs = _outs(m(*leaves))
        sum(o.float().sum() for o in outs).backward()
        return outs
    return fwd, fwd_bwd


def _peer_fns(peer, params, xs, sizes):
    """(forward, forward+backward) closures for a peer (prepared once per pass)."""
    prep_f = peer.prepare(params, xs, sizes, False)

    def fwd():
        with torch.no_grad():
            return prep_f.run()

    state = {}

    def fwd_bwd():
        if "prep" not in state:
            state["prep"] = peer.prepare(params, xs, sizes, True)
        prep = state["prep"]
        for x in prep.leaves:
            x.grad = None
        out = prep.output(prep.run())
        out.float().sum().backward()
        return out
    return fwd, fwd_bwd


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_PEAK_GBPS = [  # fallback by device name, when the driver does not report clock and bus width
    ("H200", 4800), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000), ("B200", 8000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864),
    ("L4", 300), ("A10G", 600), ("A10", 600), ("V100", 900), ("T4", 320), ("4090", 1008),
    ("3090", 936),
]


def _peak_gbps() -> float | None:
    env = os.environ.get("RNNC_PEAK_GBPS")
    if env:
        try:
            return float(env)
        except ValueError:
            pass
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock = getattr(props, "memory_clock_rate", None)  # kHz
    bus = getattr(props, "memory_bus_width", None)     # bits
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8 / 1e9  # double data rate
    for key, gbps in _PEAK_GBPS:
        if key in props.name:
            return float(gbps)
    return None


def _machine(device: str) -> dict:
    m = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
         "torch": torch.__version__}
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
        m["cuda"] = torch.version.cuda
        m["peak_gbps"] = _peak_gbps()
    return m


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------

def _device(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device not in ("cpu", "cuda"):
        raise RnncError(f"--device must be cpu or cuda, got {device!r}", filename=WHO)
    if device == "cuda" and not torch.cuda.is_available():
        raise RnncError("--device cuda: CUDA is not available to this PyTorch "
                        f"({torch.__version__}); use --device cpu", filename=WHO)
    return device


# Backends "all" leaves out: named explicitly or not run (newton linearises the whole state,
# n evaluations of the step and [n, n] matrix products per step and iteration: at the bench's
# default sizes on a CPU, minutes)
OPT_IN = ("newton",)


def _backend_names(backends, available) -> list:
    if backends is None or backends == "all":
        return [n for n in available if n not in OPT_IN]
    if isinstance(backends, str):
        backends = [b.strip() for b in backends.split(",") if b.strip()]
    names = []
    for b in backends:
        if b == "all":
            names += [n for n in available if n not in names and n not in OPT_IN]
        elif b not in available:
            raise RnncError(f"unknown backend {b!r} (available: all, {', '.join(available)})", filename=WHO)
        elif b not in names:
            names.append(b)
    if not names:
        raise RnncError("--backend names no backend", filename=WHO)
    return names


def run_bench(spec, *, name=None, dims=None, B=None, T=None, dtype="float32", device=None,
              backends="all", backward=False, peers=False, reps=None, warmup=None,
              dists=None, seed=0, progress=None) -> list:
    """Check, then time, every selected backend (and peer) on one recurrence.

    spec: a .rnn path or source text; name: which rnn block. dims: {dim: size} (the rest
    default); B: batch (4); T: sequence lengths (default: 256, 1024 on CPU, up to 4096 on
    CUDA); dtype: "float32" | "bfloat16" | "float16" | "float64"; device: "cpu" | "cuda"
    (default: cuda when available); backends: "all" or names from backends.AVAILABLE;
    backward: also time forward+backward; peers: also time rnnc.peers adapters; reps/warmup:
    fixed counts (default: adaptive); dists: {input: kind} overrides; progress: called as
    progress(done, total, description).

    Returns one record (a dict) per backend or peer, T and pass; see the module docstring.
    Raises RnncError for a bad spec or request.
    """
    from . import analysis, compiler
    from .backends import AVAILABLE
    from .compiler import compile as rnnc_compile
    from .interpret import concrete

    device = _device(device)
    if dtype not in DTYPES:
        raise RnncError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", filename=WHO)
    dt = DTYPES[dtype]
    B = DEFAULT_B if B is None else B
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise RnncError(f"--B must be a positive integer, got {B!r}", filename=WHO)
    Ts = list(DEFAULT_T[device] if T is None else ([T] if isinstance(T, int) else T))
    if not Ts or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in Ts):
        raise RnncError(f"--T must be positive integers, got {Ts!r}", filename=WHO)
    for what, v in (("--reps", reps), ("--warmup", warmup)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if what == "--reps" else 0)):
            raise RnncError(f"{what} must be a {'positive' if what == '--reps' else 'non-negative'} "
                            f"integer, got {v!r}", filename=WHO)
    names = _backend_names(backends, AVAILABLE)
    if device == "cpu" and backends in (None, "all"):
        # Triton's CPU interpreter is for tests, not timings: name it to time it anyway.
        names = [n for n in names if n != "triton"]

    rec = compiler.load(spec, name)
    facts = analysis.analyse(rec)
    if not rec.inputs:
        raise RnncError(f"rnn {rec.name} has no inputs: there is no sequence to time", filename=rec.filename)
    sizes = sizes_for(rec, dict(dims or {}))
    kinds = input_kinds(rec, facts, dists)
    passes = PASSES if backward else PASSES[:1]

    from . import peers as peers_mod
    peer_list = list(peers_mod.peers_for(rec.name)) if peers else []

    total = len(names) + len(peer_list) + len(Ts) * (len(names) + len(peer_list)) * len(passes)
    done = [0]

    def step(desc):
        if progress is not None:
            progress(done[0], total, desc)
        done[0] += 1

    base = {"spec": rec.filename, "name": rec.name, "B": B, "dtype": dtype, "device": device,
            "dims": sizes, "plan": facts.plan, "inputs": kinds, "machine": _machine(device)}

    def record(backend, kind, T, pass_, status, reason="", **extra):
        r = {**base, "backend": backend, "kind": kind, "T": T, "pass": pass_, "status": status,
             "reason": reason, "ms_median": None, "ms_min": None, "ms_max": None,
             "tokens_per_s": None, "speedup_vs_sequential": None, "peak_mem_bytes": None,
             "mem_method": None, "compile_ms": None, "reps": 0, "check_error": None,
             "gbps": None, "peak_gbps": None, "bw_fraction": None}
        r.update(extra)
        return r

    # The reference: the sequential backend, params drawn once (seeded) for everyone.
    step("reference")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = rnnc_compile(spec, name=rec.name, backend="sequential", **sizes)
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ref.to(device=device, dtype=torch.float64)
    checks = []
    for Tc in CHECK_T:
        xs = _make_inputs(rec, kinds, sizes, CHECK_B, Tc, torch.float64, device, seed + 1)
        with torch.no_grad():
            want = _outs(ref(*xs))
        if not all(bool(torch.isfinite(w).all()) for w in want):
            raise RnncError(f"the sequential reference gives non-finite outputs on the generated inputs "
                            f"({', '.join(f'{k}={v}' for k, v in kinds.items())}); choose input "
                            f"distributions with --dist NAME=KIND (kinds: {', '.join(KINDS)})",
                            filename=rec.filename)
        checks.append((xs, want))
    check_desc = f"float64, B={CHECK_B}, T={'/'.join(map(str, CHECK_T))}"
    checks_dt = []  # the check inputs rounded to the benchmark dtype, and the reference on them
    if dt != torch.float64:
        for xs, _ in checks:
            x_dt = [x.to(dt) for x in xs]
            with torch.no_grad():
                checks_dt.append((x_dt, _outs(ref(*[x.double() for x in x_dt]))))

    # Compile and check every backend.
    entries = []  # (name, kind, status, reason, module-or-peer, compile_ms, check_error)
    for bname in names:
        step(f"check {bname}")
        try:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                m = rnnc_compile(spec, name=rec.name, backend=bname, **sizes)
            compile_ms = (time.perf_counter() - t0) * 1e3
        except RnncError as e:
            entries.append((bname, "rnnc", "n/a", e.message, None, None, None))
            continue
        except Exception as e:
            entries.append((bname, "rnnc", "failed", f"rnnc.compile raised {_short(e)}", None, None, None))
            continue
        status, reason, err = "ok", "", None
        stage = check_desc
        try:
            m.load_state_dict(ref_state)
            err, tol = None, CHECK_TOL
            try:
                m.to(device=device, dtype=torch.float64)
                err = max(_rel_err(_outs(_no_grad(m, xs)), want) for xs, want in checks)
            except RnncError:  # e.g. a kernel without float64: check in float32
                m.to(device=device, dtype=torch.float32)
                tol = CHECK_TOL_F32 if device == "cpu" else CHECK_TOL_TF32
                stage = check_desc.replace("float64", "float32")
                err = max(_rel_err(_outs(_no_grad(m, [x.float() for x in xs])), want)
                          for xs, want in checks)
            if not err <= tol:
                status = "failed"
                reason = (f"disagrees with the sequential reference: relative error "
                          f"{err:.2e} > {tol:g} ({stage})")
            elif checks_dt:
                # The same check in the benchmark's dtype, loosely: it must run and stay close.
                stage = stage.replace("float64", dtype).replace("float32", dtype)
                m.to(dtype=dt)
                err_dt = max(_rel_err(_outs(_no_grad(m, xs)), want) for xs, want in checks_dt)
                tol_dt = CHECK_TOL_DTYPE[dtype]
                if device == "cuda" and dtype == "float32":
                    tol_dt = CHECK_TOL_TF32
                if not err_dt <= tol_dt:
                    status = "failed"
                    reason = (f"disagrees with the sequential reference in {dtype}: relative error "
                              f"{err_dt:.2e} > {tol_dt:g} ({stage})")
        except RnncError as e:
            status, reason = "n/a", e.message
        except Exception as e:
            status, reason = "failed", f"raised {_short(e)} in the correctness check ({stage})"
        entries.append((bname, "rnnc", status, reason, m if status == "ok" else None, compile_ms, err))

    # Check every peer: float32 inputs, compared with the float64 reference on the same values.
    params32 = {k: v.to(device=device, dtype=torch.float32) for k, v in ref_state.items()}
    for peer in peer_list:
        step(f"check {peer.name}")
        why = peers_mod.unavailable(peer, device)
        if why:
            entries.append((peer.name, "peer", "n/a", why, None, None, None))
            continue
        try:
            err = 0.0
            for xs, _ in checks:
                x32 = [x.float() for x in xs]
                with torch.no_grad():
                    want = _outs(ref(*[x.double() for x in x32]))[:1]
                    prep = peer.prepare(params32, x32, sizes, False)
                    got = (prep.output(prep.run()),)
                err = max(err, _rel_err(got, want))
            tol = peer.tol if device == "cpu" else max(peer.tol, CHECK_TOL_TF32)
            if err <= tol:
                entries.append((peer.name, "peer", "ok", peer.note, peer, None, err))
            else:
                entries.append((peer.name, "peer", "failed",
                                f"disagrees with rnnc's sequential reference: relative error {err:.2e} > "
                                f"{tol:g} (float32, B={CHECK_B}, T={'/'.join(map(str, CHECK_T))})",
                                None, None, err))
        except Exception as e:
            entries.append((peer.name, "peer", "failed", f"raised {_short(e)} in the correctness check",
                            None, None, None))
    del checks, checks_dt

    # Timing.
    in_elems = sum(math.prod(concrete(d.shape, sizes)) for d in rec.inputs)
    out_elems = sum(math.prod(concrete(o.shape, sizes)) for o in rec.outputs)
    peak = base["machine"].get("peak_gbps")
    params_dt = {k: v.to(device=device, dtype=dt) for k, v in ref_state.items()}
    records = []
    for T_ in Ts:
        xs = _make_inputs(rec, kinds, sizes, B, T_, dt, device, seed + 2)
        for bname, kind, status, reason, obj, compile_ms, err in entries:
            if status != "ok":
                for p in passes:
                    step(f"{bname} T={T_} {p}")
                    records.append(record(bname, kind, T_, p, status, reason, check_error=err))
                continue
            try:
                if kind == "rnnc":
                    obj.to(dtype=dt)
                    fns, prep_ms = _module_fns(obj, xs), 0.0
                else:  # the peer's set-up (weights copied in, layouts) counts as its compile time
                    t0 = time.perf_counter()
                    fns = _peer_fns(obj, params_dt, xs, sizes)
                    prep_ms = (time.perf_counter() - t0) * 1e3
            except Exception as e:
                for p in passes:
                    step(f"{bname} T={T_} {p}")
                    records.append(record(bname, kind, T_, p, "failed",
                                          f"raised {_short(e)} while timed ({dtype}, B={B})", check_error=err))
                continue
            for p, fn in zip(passes, fns):
                step(f"{bname} T={T_} {p}")
                try:
                    res = _measure(fn, device, reps, warmup)
                except Exception as e:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    records.append(record(bname, kind, T_, p, "failed",
                                          f"raised {_short(e)} while timed ({dtype}, B={B})",
                                          check_error=err))
                    continue
                ts = res["times"]
                med = statistics.median(ts)
                extra = {}
                if device == "cuda" and p == "forward" and facts.plan == "elementwise_scan":
                    nbytes = (in_elems + out_elems) * B * T_ * torch.empty((), dtype=dt).element_size()
                    gbps = nbytes / (med * 1e-3) / 1e9
                    extra = {"gbps": gbps, "peak_gbps": peak,
                             "bw_fraction": gbps / peak if peak else None}
                records.append(record(
                    bname, kind, T_, p, "ok", reason, ms_median=med, ms_min=min(ts), ms_max=max(ts),
                    tokens_per_s=B * T_ / (med * 1e-3), peak_mem_bytes=res["mem"],
                    mem_method=res["mem_method"], reps=len(ts), check_error=err,
                    compile_ms=(compile_ms or 0.0) + (prep_ms if p == "forward" else 0.0) + res["first_ms"],
                    **extra))
        del xs
    # Speed-up against the sequential backend at the same T and pass.
    seq = {(r["T"], r["pass"]): r["ms_median"] for r in records
           if r["backend"] == "sequential" and r["kind"] == "rnnc" and r["status"] == "ok"}
    for r in records:
        s = seq.get((r["T"], r["pass"]))
        if r["status"] == "ok" and s:
            r["speedup_vs_sequential"] = s / r["ms_median"]
    if progress is not None:
        progress(total, total, "done")
    return records


def _no_grad(m, xs):
    with torch.no_grad():
        return m(*xs)


# ---------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------

def _fmt_ms(x) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_si(x, unit="") -> str:
    if x is None:
        return "-"
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g}{s}{unit}"
    return f"{x:.3g}{unit}"


def _fmt_bytes(x) -> str:
    if x is None:
        return "-"
    for p, s in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= p:
            return f"{x / p:.3g} {s}"
    return f"{x} B"


def _rows(records) -> tuple:
    """(header, rows of ok records, [(backend, kind, status, reason)] of the rest)."""
    if not records:
        return [], [], []
    backward = any(r["pass"] == "forward+backward" for r in records)
    gpu_bw = any(r["gbps"] is not None for r in records)
    header = ["backend", "T"] + (["pass"] if backward else []) + \
             ["ms (median)", "min-max", "tokens/s", "vs seq", "peak mem", "compile ms", "check err"] + \
             (["GB/s (% peak)"] if gpu_bw else [])
    order = []
    for r in records:
        if (r["backend"], r["kind"]) not in order:
            order.append((r["backend"], r["kind"]))
    ok = sorted((r for r in records if r["status"] == "ok"),
                key=lambda r: (PASSES.index(r["pass"]), r["T"], order.index((r["backend"], r["kind"]))))
    rows = []
    for r in ok:
        label = r["backend"] + (" (peer)" if r["kind"] == "peer" else "")
        row = [label, str(r["T"])] + ([r["pass"]] if backward else [])
        row += [_fmt_ms(r["ms_median"]), f"{_fmt_ms(r['ms_min'])}-{_fmt_ms(r['ms_max'])}",
                _fmt_si(r["tokens_per_s"]),
                "-" if r["speedup_vs_sequential"] is None else f"{r['speedup_vs_sequential']:.2f}x",
                _fmt_bytes(r["peak_mem_bytes"]), _fmt_ms(r["compile_ms"]),
                "-" if r["check_error"] is None else f"{r['check_error']:.1e}"]
        if gpu_bw:
            row.append("-" if r["gbps"] is None else
                       f"{r['gbps']:.0f}" + (f" ({100 * r['bw_fraction']:.0f}%)" if r["bw_fraction"] else ""))
        rows.append(row)
    # Rows that were not timed: one line per backend and reason, with the T's and passes it
    # covers when that is not all of them.
    all_T = sorted({r["T"] for r in records})
    all_p = [p for p in PASSES if any(r["pass"] == p for r in records)]
    groups = {}
    for r in records:
        if r["status"] != "ok":
            g = groups.setdefault((r["backend"], r["kind"], r["status"], r["reason"]), [set(), set()])
            g[0].add(r["T"])
            g[1].add(r["pass"])
    rest = []
    for (b, kind, status, reason), (Ts, ps) in groups.items():
        where = []
        if sorted(Ts) != all_T:
            where.append("T=" + ",".join(map(str, sorted(Ts))))
        if len(all_p) > 1 and len(ps) < len(all_p):
            where.append(", ".join(p for p in PASSES if p in ps))
        rest.append((b, kind, status, reason + (f" [{'; '.join(where)}]" if where else "")))
    return header, rows, rest


def _notes(records) -> list:
    r0 = records[0]
    notes = []
    methods = {r["mem_method"] for r in records if r["mem_method"]}
    if methods:
        notes.append("peak mem: " + "; ".join(sorted(methods)))
    notes.append(f"each backend was checked against the sequential backend first ({'float64'}, "
                 f"B={CHECK_B}, T={'/'.join(map(str, CHECK_T))}); peers in float32")
    notes.append("compile ms = rnnc.compile (or the peer's set-up) + the first call at that T")
    peer_notes = {(r["backend"], r["reason"]) for r in records
                  if r["kind"] == "peer" and r["status"] == "ok" and r["reason"]}
    for b, n in sorted(peer_notes):
        notes.append(f"{b}: {n}")
    if any(r["gbps"] is not None for r in records):
        notes.append("GB/s: (inputs + outputs) x B x T x element size / median time "
                     "(elementwise_scan plans, forward)")
    m = r0["machine"]
    where = m.get("gpu") or m["cpu"]
    notes.append(f"machine: {where}; {m['platform']}; torch {m['torch']}, {m['torch_threads']} threads")
    return notes


def _title(records) -> str:
    r = records[0]
    dims = ",".join(f"{k}={v}" for k, v in r["dims"].items())
    return (f"rnn {r['name']} ({r['spec']}), plan {r['plan']}, B={r['B']}, {dims}, "
            f"{r['dtype']}, {r['device']}")


def render_table(records, file=None) -> None:
    """Print the records as a table (rich when installed, else plain text)."""
    file = file or sys.stdout
    if not records:
        print("no measurements", file=file)
        return
    header, rows, rest = _rows(records)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        console = Console(file=file)
        table = Table(title=_title(records), title_justify="left")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 or h == "pass" else "right",
                             no_wrap=True)
        for row in rows:
            style = "dim" if row[0].endswith("(peer)") else None
            table.add_row(*row, style=style)
        need = console.measure(table, options=console.options.update_width(10_000)).maximum
        if need > console.width:  # never truncate numbers: let a narrow terminal wrap lines
            console = Console(file=file, width=need)
        if rows:
            console.print(table)
        else:
            console.print(_title(records))
        for b, kind, status, reason in rest:
            tag = "[red]FAILED[/red]" if status == "failed" else status
            label = b + (" (peer)" if kind == "peer" else "")
            console.print(f"  {label}: {tag}: {reason}", highlight=False, markup=True,
                          soft_wrap=True)
        for n in _notes(records):
            console.print(f"  [dim]{n}[/dim]", highlight=False, soft_wrap=True)
        return
    print(_title(records), file=file)
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        left = {0, header.index("pass")} if "pass" in header else {0}
        fmt = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        print(fmt(header), file=file)
        print("  ".join("-" * w for w in widths), file=file)
        for row in rows:
            print(fmt(row), file=file)
    for b, kind, status, reason in rest:
        label = b + (" (peer)" if kind == "peer" else "")
        print(f"  {label}: {status.upper() if status == 'failed' else status}: {reason}", file=file)
    for n in _notes(records):
        print(f"  {n}", file=file)


def save_plot(records, path) -> None:
    """Log-log plot of median time against T, one line per backend/peer and pass (PNG)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RnncError("--plot needs matplotlib (pip install matplotlib)", filename=WHO) from None
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lines = {}
    for r in records:
        if r["status"] == "ok":
            lines.setdefault((r["backend"], r["kind"], r["pass"]), []).append((r["T"], r["ms_median"]))
    for (b, kind, p), pts in lines.items():
        pts.sort()
        label = b + (" (peer)" if kind == "peer" else "") + (" fwd+bwd" if p != "forward" else "")
        ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o",
                linestyle="--" if kind == "peer" else "-", alpha=1.0 if p == "forward" else 0.6,
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    Ts = sorted({t for pts in lines.values() for t, _ in pts})
    if Ts:
        from matplotlib.ticker import NullLocator
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("T (sequence length)")
    ax.set_ylabel("time (ms, median)")
    if records:
        ax.set_title(_title(records), fontsize=8)
    if lines:
        ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=120)
    except OSError as e:
        raise RnncError(f"cannot write {path}: {e.strerror or e}", filename=WHO) from None
