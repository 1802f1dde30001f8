"""Fuzzing the front end, the compiler, compiled modules and `rnnc check` (issue 9).

For every input, each entry point either succeeds or raises `rnnc.RnncError` whose text
starts with `FILE:LINE:COL: error:` (or `FILE: error:` without a position) and shows the
right source line: never another exception, never a hang, never an "internal error".

    rnnc.load(text)                       parse + check
    rnnc.compile(text, **small dims)      every dim given; sequential backend, and the scan
                                          backend when the plan is associative
    module(*inputs) and module.step(...)  one call on small random inputs (B=2, T=3); where
                                          both backends run, they must agree in float64
    rnnc.cli.main(["check", FILE])        exit code 0 or 1, errors as FILE:LINE:COL: error:
    rnnc.graph.to_dot(rec)                well-formed DOT, spec names only as identifiers

Every case runs in-process under a time limit (`CASE_TIMEOUT`, SIGALRM; a hang inside C
code is caught by faulthandler, which dumps every thread and ends the run).

Inputs: deterministic mutations of every example (one test per example, every mutation kind
with fixed seeds); hypothesis strategies (random stacks of mutations, token soup from the
grammar's tokens, well-formed random expressions in a fixed header, random unicode inserted
into examples); generated nasty inputs (nesting of depth 50/500/5000, 10,000 statements,
1000-deep sums, many blocks); the regression corpus in tests/fuzz_corpus/.

Bugs this suite found (see tests/fuzz_corpus/index.json) are recognised by a narrow signature
(`known_bug`); all are fixed now, and a case that hits one again fails with the input that
caused it, as does anything else.

Knobs (environment): RNNC_FUZZ_SCALE multiplies every hypothesis example count (default 1);
RNNC_FUZZ_RANDOM=1 draws fresh hypothesis examples instead of the fixed derandomized ones;
RNNC_FUZZ_TIMEOUT is the per-case limit in seconds (default 10).
"""
from __future__ import annotations

import atexit
import contextlib
import faulthandler
import io
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnc
import rnnc.cli
import rnnc.graph
from rnnc import RnncError
from rnnc.interpret import concrete

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.rnn"))
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"

CASE_TIMEOUT = float(os.environ.get("RNNC_FUZZ_TIMEOUT", "10"))
SCALE = float(os.environ.get("RNNC_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("RNNC_FUZZ_RANDOM", "") not in ("", "0")
MIN_CASES = 1500  # the whole file runs at least this many cases (checked at the end)
# Under pytest-xdist the whole file runs in one worker, in file order, so that the count at
# the end sees every case (`--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("fuzz")

# What the fuzz tests ran and found; printed (pytest -s) and recorded by test_zz_case_count.
STATS: Counter = Counter()
KNOWN_HITS: Counter = Counter()
SLOWEST: list = []  # (seconds, label)
RAN: set = set()


def _hyp(n: int, **kw):
    """Hypothesis settings: n examples (times RNNC_FUZZ_SCALE), no deadline (each case is
    bounded by CASE_TIMEOUT instead), no example database, reproducible unless RNNC_FUZZ_RANDOM."""
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    derandomize=not RANDOM, print_blob=True,
                    suppress_health_check=list(HealthCheck), **kw)


# --- time limits -----------------------------------------------------------------------------------
class CaseTimeout(BaseException):
    """Raised by the alarm inside a case that ran too long (a BaseException, so that no
    `except Exception` in rnnc or torch can swallow it)."""


class KnownBug(AssertionError):
    """A case hit a known rnnc bug (and nothing else). Corpus and nasty-input tests that
    reproduce one are marked xfail(strict=True, raises=KnownBug): any other failure of those
    tests is a real failure, and a fixed bug shows up as XPASS, which fails (strict)."""


def expect_clean(o, bug: str | None = None):
    """No new problems; no known bug, or (when `bug` is given) only that one, as KnownBug."""
    assert not o.problems, o.problems
    if o.known:
        assert set(o.known) == {bug}, f"expected only known bug {bug!r}, got {sorted(set(o.known))}"
        raise KnownBug(f"known bug {bug}: hit {len(o.known)} time(s)")


# Bugs this suite found that are fixed now: their cases run as plain regression tests, and
# their signatures stay in `known_bug` so a recurrence fails loudly (no xfail covers it).
FIXED = {"deep-nesting", "int-digit-limit", "const-overflow-float32", "huge-allocation",
         "caret-line-splitlines", "nul-in-path", "scan-inf-state-init", "os-sys-not-reserved",
         "scan-nan-leaks-back"}


def xfail_bug(bug: str, reason: str):
    if bug in FIXED:
        return pytest.mark.regression  # a plain test now: the case must pass
    return pytest.mark.xfail(strict=True, raises=KnownBug, reason=f"known bug {bug}: {reason}")


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:  # pragma: no cover - Windows, or a worker thread
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"{what}: still running after {seconds:g} s (a hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # A hang in C code never returns to Python to take the alarm: dump and end the run.
    faulthandler.dump_traceback_later(3 * seconds + 60, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)


# --- the contract ------------------------------------------------------------------------------------
# Characters str.splitlines() treats as line breaks but the .rnn lexer does not.
_SPLITLINES_ONLY = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def error_problems(err: RnncError, filename: str, source: str | None) -> list:
    """What is wrong with an RnncError's text (empty when it follows the format)."""
    text = str(err)
    lines = text.split("\n")
    out = []
    if err.line is None:
        head = f"{filename}: error: "
    else:
        head = f"{filename}:{err.line}:{err.col or 1}: error: "
    if not lines[0].startswith(head):
        out.append(f"error text does not start with {head!r}: {lines[0][:200]!r}")
    if not err.message or not err.message.strip():
        out.append("empty error message")
    if "Traceback" in text:
        out.append("a traceback in the error text")
    if "internal" in err.message.lower() or "recursion" in err.message.lower():
        out.append(f"an internal error reported as RnncError: {err.message[:200]!r}")
    if err.line is not None and source is not None:
        src_lines = source.split("\n")
        if not 1 <= err.line <= len(src_lines):
            out.append(f"line {err.line} is outside the source ({len(src_lines)} lines)")
        elif len(lines) >= 3:
            want = src_lines[err.line - 1].rstrip("\r").replace("\t", " ")
            # A lone CR cannot be shown: the text up to it will do (the error is at the CR).
            if lines[1] not in ("    " + want, "    " + want.split("\r")[0]):
                out.append(f"the error shows source line {lines[1][4:][:80]!r}, not line "
                           f"{err.line} {want[:80]!r}")
            if err.col is not None and not 1 <= err.col <= len(want) + 2:
                out.append(f"column {err.col} is outside line {err.line} ({len(want)} characters)")
    return out


_RNNC_DIRS = tuple(str(Path(m.__file__).resolve().parent) + os.sep
                   for m in (rnnc, __import__("rnnc.backends", fromlist=["AVAILABLE"])))


def _rnnc_frame(tb) -> str:
    """'file.py:function' of the innermost frame inside rnnc (or the innermost frame)."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if str(Path(f.filename).resolve()).startswith(_RNNC_DIRS)]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.name}" if f else "?"


def known_bug(exc: BaseException | None, problem: str = "", source: str = "") -> str | None:
    """The corpus id of a known rnnc bug this failure is an instance of (None: a new one).

    Each signature is narrow on purpose: a new bug must not hide behind an old one."""
    msg = str(exc) if exc is not None else ""
    where = _rnnc_frame(exc.__traceback__) if exc is not None else ""
    if isinstance(exc, RecursionError) or "maximum recursion depth" in msg + problem:
        return "deep-nesting"
    if isinstance(exc, RuntimeError) and "value cannot be converted to type" in msg \
            and where in ("interpret.py:lower_node", "module.py:_state0"):
        return "const-overflow-float32"
    if isinstance(exc, (RuntimeError, TypeError, MemoryError)) and (
            "can't allocate memory" in msg or "Overflow when unpacking long" in msg
            or isinstance(exc, MemoryError)) and where.split(":")[0] in (
                "module.py", "interpret.py", "sequential.py", "scan.py", "scan_kernels.py"):
        return "huge-allocation"
    if "internal parser error: Exceeds the limit" in problem and "digits" in problem:
        return "int-digit-limit"
    if isinstance(exc, ValueError) and "embedded null byte" in msg and where == "compiler.py:_read":
        return "nul-in-path"
    if ("NaN/inf where the sequential backend is finite" in problem
            or "differs from the sequential backend" in problem) \
            and re.search(r"state[^\n]*=\s*-?inf\b", source):
        return "scan-inf-state-init"
    if "NaN/inf where the sequential backend is finite (and the sequential output is " \
            "non-finite elsewhere)" in problem:
        return "scan-nan-leaks-back"
    if problem.startswith("the error shows source line") and any(c in source for c in _SPLITLINES_ONLY):
        return "caret-line-splitlines"
    return None


@dataclass
class Outcome:
    problems: list = field(default_factory=list)  # new failures: "stage: what"
    known: list = field(default_factory=list)     # ids of known bugs hit
    stages: set = field(default_factory=set)      # how far the case got

    def add(self, stage: str, what: str, exc: BaseException | None = None, source: str = ""):
        bug = known_bug(exc, what, source)
        if bug is not None:
            self.known.append(bug)
        else:
            self.problems.append(f"{stage}: {what}")


SIZES = {"D": 3, "H": 2, "K": 3, "V": 4, "N": 2, "P": 3, "E": 2}
MAX_CALL_ELEMENTS = 10 ** 6   # skip the call when an input would be larger (not rnnc's fault)
HUGE_ELEMENTS = 10 ** 11      # ... but call when a state/output is absurd: that must fail cleanly


def small_dims(rec) -> dict:
    return {d: SIZES.get(d, 2) for d in rec.dims}


def _numel(shape, dims):
    try:
        return math.prod(concrete(shape, dims))
    except Exception:  # noqa: BLE001 - a symbolic size we cannot evaluate: treat as huge
        return float("inf")


def _guarded(out: Outcome, stage: str, source: str | None, fn, *args, _files=("<spec>",), **kwargs):
    """Call fn; RnncError is fine (checked for format, returned), anything else is recorded.
    Returns (ok, value or error). `_files`: the file names the error may carry; errors that
    name the spec are checked against `source` (line, caret)."""
    try:
        return True, fn(*args, **kwargs)
    except RnncError as err:
        if err.filename not in _files:
            out.add(stage, f"error names {err.filename!r}, expected one of {list(_files)}")
        for p in error_problems(err, err.filename, source if err.filename in _files[:1] else None):
            out.add(stage, p, None, source or "")
        return False, err
    except CaseTimeout:
        raise
    except Exception as exc:  # noqa: BLE001 - the point of the test
        out.add(stage, f"{type(exc).__name__} escaped: {str(exc)[:300]} "
                f"(at {_rnnc_frame(exc.__traceback__)})", exc, source or "")
        return False, exc


def _tensors(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _compare(out: Outcome, ref, got, name: str, source: str = ""):
    """A backend's float64 outputs against the sequential backend's."""
    for r, g in zip(_tensors(ref), _tensors(got)):
        if r.shape != g.shape:
            out.add("scan", f"{name}: shape {list(g.shape)} != sequential {list(r.shape)}", None, source)
            return
        finite = torch.isfinite(r) & (r.abs() < 1e30)
        if not bool(finite.any()):
            continue
        if not bool(torch.isfinite(g[finite]).all()):
            elsewhere = not bool(torch.isfinite(r).all())
            out.add("scan", f"{name}: NaN/inf where the sequential backend is finite"
                    + (" (and the sequential output is non-finite elsewhere)" if elsewhere else ""),
                    None, source)
            return
        err = (r[finite] - g[finite]).abs().max().item()
        scale = max(1.0, r[finite].abs().max().item())
        if err > 1e-6 * scale:
            out.add("scan", f"{name}: differs from the sequential backend by {err:.3g} "
                    f"(scale {scale:.3g})", None, source)
            return


def _call(out: Outcome, text: str, m, rec, dims, gen) -> dict | None:
    """One float32 call, one float64 call and one step; returns the float64 outputs."""
    shapes = [concrete(d.shape, dims) for d in rec.inputs]
    xs32 = [torch.randn(2, 3, *s, generator=gen) for s in shapes]
    files = ("<spec>", f"rnn {rec.name}")
    ok, y = _guarded(out, "call", text, m, *xs32, output_final_state=True, _files=files)
    if ok:
        out.stages.add("called")
        for t in _tensors(y[0]):
            if not isinstance(t, torch.Tensor) or t.shape[:2] != (2, 3):
                out.add("call", f"output of shape {getattr(t, 'shape', type(t))}, not [B=2, T=3, ...]")
    xs64 = [x.double() for x in xs32]
    ok, y64 = _guarded(out, "call", text, m, *xs64, _files=files)
    _guarded(out, "step", text, m.step, *[x[:, 0] for x in xs32], _files=files)
    return y64 if ok else None


def _check_dot(out: Outcome, rec):
    ok, dot = _guarded(out, "graph", rec.source or "", rnnc.graph.to_dot, rec)
    if ok:
        bad = dot_problems(dot, rec)
        for b in bad:
            out.add("graph", b)


_DOT_LINE = re.compile(
    r'^(digraph "[A-Za-z][A-Za-z0-9_]*" \{'
    r'|  rankdir=TB;'
    r'|  node \[shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10\];'
    r'|  label="rnn [A-Za-z][A-Za-z0-9_]*: [^"\n\\]*";'
    r'|  n\d+ \[label="[^"\n]*", fillcolor="#[0-9a-f]{6}"\];'
    r'|  n\d+ -> n\d+;'
    r'|  n\d+ -> n\d+ \[style=dashed, constraint=false, label="next step"\];'
    r'|\})$')
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def dot_problems(dot: str, rec) -> list:
    """DOT text built from a checked recurrence: every line one of the known forms, every
    label without quotes, newlines or backslashes other than DOT's own '\\n', and every name
    the spec introduced a checked identifier."""
    out = []
    for line in dot.rstrip("\n").split("\n"):
        if not _DOT_LINE.match(line):
            out.append(f"unexpected DOT line {line[:120]!r}")
    for label in re.findall(r'label="([^"]*)"', dot):
        if re.search(r"\\(?!n)", label):
            out.append(f"a backslash in a DOT label: {label[:80]!r}")
    names = [rec.name, *rec.dims, *(d.name for d in rec.inputs), *(d.name for d in rec.params),
             *(d.name for d in rec.states), *(d.name for d in rec.outputs)]
    names += [rec.attr(i, "label") for i in rec.order() if rec.attr(i, "label")]
    for n in names:
        if not _IDENT.match(n):
            out.append(f"spec name {n!r} is not a checked identifier")
    return out


_TMP = Path(tempfile.gettempdir()) / f"rnnc_fuzz_{os.getpid()}"
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def _cli_check(out: Outcome, text: str):
    _TMP.mkdir(exist_ok=True)
    path = _TMP / "case.rnn"
    path.write_text(text, encoding="utf-8", errors="surrogatepass", newline="")
    # The CLI reads with universal newlines: its positions refer to that text.
    seen = text.replace("\r\n", "\n").replace("\r", "\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = rnnc.cli.main(["check", str(path)])
    except CaseTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit included: main must return
        out.add("cli", f"rnnc check raised {type(exc).__name__}: {str(exc)[:200]}", exc, text)
        return
    err = stderr.getvalue()
    if rc == 0:
        out.stages.add("cli-ok")
        if "error" in err:
            out.add("cli", f"exit code 0 but stderr says {err[:200]!r}")
        return
    if rc != 1:
        why = err.strip().splitlines()[-1] if err.strip() else ""
        out.add("cli", f"exit code {rc}: {why[:300]}", None, text)
        return
    first = err.split("\n")[0]
    m = re.match(rf"^{re.escape(str(path))}(?::(\d+):(\d+))?: error: (.+)$", first)
    if not m:
        out.add("cli", f"stderr does not start with {str(path)}:LINE:COL: error: — {first[:200]!r}")
        return
    if "internal" in m.group(3).lower() or "recursion" in m.group(3).lower():
        out.add("cli", f"internal error: {m.group(3)[:200]}", None, text)
        return
    if m.group(1):
        line = int(m.group(1))
        src_lines = seen.split("\n")
        shown = err.split("\n")[1] if err.count("\n") >= 2 else None
        if not 1 <= line <= len(src_lines):
            out.add("cli", f"line {line} is outside the file")
        elif shown is not None and shown != "    " + src_lines[line - 1].replace("\t", " "):
            out.add("cli", f"the error shows source line {shown[4:][:80]!r}, not line {line}", None, seen)


def run_case(text: str, label: str = "", *, cli: bool = True, compile: bool = True,
             timeout: float | None = None, compare: bool = True) -> Outcome:
    """Every entry point on one input, under one time limit."""
    out = Outcome()
    t0 = time.perf_counter()
    STATS["cases"] += 1
    try:
        with time_limit(timeout or CASE_TIMEOUT, label or "case"):
            _run_case(out, text, cli=cli, compile=compile, compare=compare)
    except CaseTimeout as e:
        out.problems.append(f"timeout: {e}")
    dt = time.perf_counter() - t0
    SLOWEST.append((dt, label))
    SLOWEST.sort(reverse=True)
    del SLOWEST[5:]
    for s in out.stages:
        STATS[s] += 1
    for k in out.known:
        KNOWN_HITS[k] += 1
    return out


def _run_case(out: Outcome, text: str, *, cli: bool, compile: bool, compare: bool):
    ok, rec = _guarded(out, "load", text, rnnc.load, text)
    recs = []
    if ok:
        recs = [rec]
    elif isinstance(rec, RnncError) and "defines several recurrences" in rec.message:
        names = re.search(r"\(([^)]*)\); pass name=", rec.message).group(1).split(", ")
        for n in names[:3]:
            ok, r = _guarded(out, "load", text, rnnc.load, text, name=n)
            if ok:
                recs.append(r)
    if recs:
        out.stages.add("loaded")
    for rec in recs:
        _check_dot(out, rec)
        if not compile:
            continue
        dims = small_dims(rec)
        ok, m = _guarded(out, "compile", text, rnnc.compile, text, name=rec.name,
                         backend="sequential", **dims)
        if not ok:
            continue
        out.stages.add("compiled")
        sizes = [_numel(d.shape, dims) for d in rec.inputs]
        others = [_numel(s.shape, dims) for s in rec.states] + [_numel(o.shape, dims) for o in rec.outputs]
        if max(sizes, default=1) > MAX_CALL_ELEMENTS or any(
                MAX_CALL_ELEMENTS < n <= HUGE_ELEMENTS for n in others):
            out.stages.add("too-big-to-call")
            continue
        ref = _call(out, text, m, rec, dims, torch.Generator().manual_seed(len(text)))
        if getattr(m.analysis, "plan", "sequential") == "sequential":
            continue
        ok, ms = _guarded(out, "compile", text, rnnc.compile, text, name=rec.name,
                          backend="scan", **dims)
        if not ok:
            continue
        out.stages.add("scan-compiled")
        with torch.no_grad():
            for p_seq, p_scan in zip(m.parameters(), ms.parameters()):
                p_scan.copy_(p_seq)
        got = _call(out, text, ms, rec, dims, torch.Generator().manual_seed(len(text)))
        if compare and ref is not None and got is not None:
            out.stages.add("compared")
            _compare(out, ref, got, rec.name, text)
    if cli:
        _cli_check(out, text)


def assert_clean(outcomes: list, what: str):
    """Fail with every new problem, the input that caused it first."""
    bad = [(label, text, o) for label, text, o in outcomes if o.problems]
    if bad:
        lines = [f"{len(bad)} of {len(outcomes)} {what} cases broke the contract:"]
        for label, text, o in bad[:6]:
            lines.append(f"--- {label}: {o.problems[:3]}\n{text[:600]!r}")
        pytest.fail("\n".join(lines))


# --- tokens and mutations --------------------------------------------------------------------------
_TOKEN = re.compile(r"#[^\n]*|\r?\n|[ \t]+|->|\*\*|<=|>=|==|!=|[A-Za-z_][A-Za-z0-9_]*"
                    r"|(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?|.", re.S)
KEYWORDS = {"rnn", "param", "state", "inf", "sum", "max", "min", "where", "zeros", "ones",
            "normal", "uniform"} | set(__import__("rnnc.ir", fromlist=["FUNCTIONS"]).FUNCTIONS)


def tokens(text: str) -> list:
    return _TOKEN.findall(text)


def _is_name(t: str) -> bool:
    return bool(re.match(r"^[A-Za-z_]\w*$", t))


def _is_num(t: str) -> bool:
    return bool(re.match(r"^(?:\d|\.\d)", t))


def _solid(toks) -> list:
    """Indices of tokens that are not whitespace, newlines or comments."""
    return [i for i, t in enumerate(toks) if t.strip() and not t.startswith("#")]


def _bracket_names(toks, upper: bool) -> list:
    """Indices of names inside [...]: dims (upper) or index names (lower)."""
    depth, out = 0, []
    for i, t in enumerate(toks):
        if t == "[":
            depth += 1
        elif t == "]":
            depth = max(0, depth - 1)
        elif depth and _is_name(t) and t[0].isupper() == upper and t not in KEYWORDS:
            out.append(i)
    return out


HUGE_NUMBERS = ["1e309", "1e-400", "1e39", "3.5e38", "1e308", "0", "0.0", "1e-45",
                "99999999999999999999999", "4.9e-324", ".0", "nan", "inf", "-inf",
                "1" + "0" * 400, "2.5e+0010", "0.000000000000000000000000000000001"]
HUGE_DIMS = ["0", "1", "1000000000000", "9223372036854775808", "10" + "0" * 30, "-1", "D*0",
             "99999999999999999999999999999999999999999999"]
UNICODE = ["α", "变量", "\u200b", "\u202e", "\u200f", "\ufeff", "x\u0301", "ﬁ", "𝑥", "ｘ",
           "\x00", "\u2028", "\u0085", "\x0b", "\x0c", "\r", "\t", "\x1b[31m", "😀", "İ", "ß"]
INJECT = ['__import__("os")', "__import__('os').system('true')", 'eval("1")', "exec", '"', "'",
          '"""', "\\", "\\n", "`", "$x", "{", "}", ";", "lambda: 0", "os.system", "torch.zeros(1)",
          "x.__class__", "tl.load", "%", "!", "?", "&", "|", "^", "~", ":", "..."]


def mutate(text: str, kind: str, rng: random.Random) -> str:
    """One mutation of `kind` (MUTATIONS) at a place chosen by rng; the text unchanged
    when the kind does not apply."""
    toks = tokens(text)
    solid = _solid(toks)
    if not solid:
        return text
    pick = rng.choice
    if kind == "delete_token":
        del toks[pick(solid)]
    elif kind == "duplicate_token":
        i = pick(solid)
        toks.insert(i, toks[i])
    elif kind == "swap_tokens":
        i, j = pick(solid), pick(solid)
        toks[i], toks[j] = toks[j], toks[i]
    elif kind == "swap_index_names":
        idx = _bracket_names(toks, upper=False)
        names = sorted({toks[i] for i in idx})
        if len(names) < 2:
            return text
        a, b = rng.sample(names, 2)
        # swap within one statement (one line)
        line_of = [0]
        for t in toks:
            line_of.append(line_of[-1] + (1 if "\n" in t else 0))
        line = line_of[pick(idx)]
        for i, t in enumerate(toks):
            if line_of[i] == line and t in (a, b):
                toks[i] = b if t == a else a
    elif kind == "swap_dims":
        idx = _bracket_names(toks, upper=True)
        names = sorted({toks[i] for i in idx})
        if len(names) < 2:
            return text
        a, b = rng.sample(names, 2)
        i = pick([i for i in idx if toks[i] in (a, b)])
        toks[i] = b if toks[i] == a else a
    elif kind == "dim_value":
        idx = _bracket_names(toks, upper=True)
        if not idx:
            return text
        toks[pick(idx)] = pick(HUGE_DIMS)
    elif kind == "number_value":
        idx = [i for i in solid if _is_num(toks[i])]
        if not idx:  # make one: a name in an expression becomes a number
            idx = [i for i in solid if _is_name(toks[i]) and toks[i] not in KEYWORDS]
        if not idx:
            return text
        toks[pick(idx)] = pick(HUGE_NUMBERS)
    elif kind == "unicode_insert":
        toks.insert(pick(solid), pick(UNICODE))
    elif kind == "unicode_rename":
        idx = [i for i in solid if _is_name(toks[i]) and toks[i] not in KEYWORDS]
        if not idx:
            return text
        old, new = toks[pick(idx)], pick(UNICODE)
        suffix = rng.random() < 0.5
        toks = [(t + new if suffix else new) if t == old else t for t in toks]
    elif kind == "inject":
        i = pick(solid)
        if rng.random() < 0.5:
            toks.insert(i, pick(INJECT))
        else:
            toks[i] = pick(INJECT)
    elif kind == "newline_in_name":
        idx = [i for i in solid if _is_name(toks[i]) and len(toks[i]) >= 2]
        if not idx:
            return text
        i = pick(idx)
        cut = rng.randrange(1, len(toks[i]))
        toks[i] = toks[i][:cut] + pick(["\n", "\\\n", "\r\n", "\r", "\n\n", " \\\n "]) + toks[i][cut:]
    elif kind == "operator":
        ops = ["+", "-", "*", "/", "@", "**", "<", "==", ">=", "=", ","]
        idx = [i for i in solid if toks[i] in ops]
        if not idx:
            return text
        toks[pick(idx)] = pick(ops)
    elif kind == "function":
        fns = sorted(KEYWORDS) + ["foo", "sum", "max"]
        idx = [i for i in solid if toks[i] in KEYWORDS]
        if not idx:
            return text
        toks[pick(idx)] = pick(fns)
    elif kind == "nest":
        eq = [i for i in solid if toks[i] == "="]
        if not eq:
            return text
        i = pick(eq)
        j = next((k for k in range(i + 1, len(toks)) if "\n" in toks[k]), len(toks))
        depth = pick([2, 10, 50])
        opener = pick(["(", "-(", "tanh(", "exp(-exp(", "abs("])
        closer = ")" * opener.count("(")
        toks[i + 1:j] = [opener * depth, *toks[i + 1:j], closer * depth]
    elif kind == "line_op":
        lines = "".join(toks).split("\n")
        if len(lines) < 3:
            return text
        i, j = rng.randrange(1, len(lines) - 1), rng.randrange(1, len(lines) - 1)
        op = rng.random()
        if op < 0.3:
            del lines[i]
        elif op < 0.6:
            lines.insert(i, lines[j])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)
    elif kind == "truncate":
        return "".join(toks[:pick(solid)]) + "\n"
    elif kind == "bracket":
        idx = [i for i in solid if toks[i] in "()[]{}"]
        if not idx:
            return text
        i = pick(idx)
        toks[i] = pick(["(", ")", "[", "]", "{", "}", ""])
    else:
        raise ValueError(kind)
    return "".join(toks)


MUTATIONS = ["delete_token", "duplicate_token", "swap_tokens", "swap_index_names", "swap_dims",
             "dim_value", "number_value", "unicode_insert", "unicode_rename", "inject",
             "newline_in_name", "operator", "function", "nest", "line_op", "truncate", "bracket"]


# --- 1. deterministic mutations of every example -------------------------------------------------------
SEEDS_PER_KIND = 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_mutated_example(path):
    """Every mutation kind, twice, on every example (fixed seeds: the same cases each run)."""
    RAN.add("mutated_example")
    base = path.read_text()
    outcomes = [(f"{path.stem} unmutated", base, run_case(base, path.stem))]
    assert not outcomes[0][2].problems and "called" in outcomes[0][2].stages, outcomes[0][2]
    for kind in MUTATIONS:
        for seed in range(SEEDS_PER_KIND):
            rng = random.Random(f"{path.stem}:{kind}:{seed}")
            text = mutate(base, kind, rng)
            if "\n" not in text:
                text += "\n"
            label = f"{path.stem}/{kind}/{seed}"
            outcomes.append((label, text, run_case(text, label)))
    assert_clean(outcomes, f"mutated {path.stem}")


# --- 2. hypothesis: stacks of random mutations ---------------------------------------------------------
@_hyp(150)
@given(path=st.sampled_from(EXAMPLES),
       ops=st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2 ** 32 - 1)),
                    min_size=1, max_size=4))
def test_hypothesis_mutation_stacks(path, ops):
    RAN.add("hypothesis_mutation_stacks")
    text = path.read_text()
    for kind, seed in ops:
        text = mutate(text, kind, random.Random(seed))
    if "\n" not in text:
        text += "\n"
    o = run_case(text, f"{path.stem} {ops}")
    assert not o.problems, (o.problems, text)


# --- 3. hypothesis: token soup from the grammar's tokens ------------------------------------------------
GRAMMAR_TOKENS = ["rnn", "param", "state", "inf", "sum", "max", "min", "where", "exp", "tanh",
                  "sigmoid", "log", "sqrt", "zeros", "ones", "normal", "uniform", "f", "x", "y",
                  "h", "S", "W", "D", "H", "K", "i", "j", "0", "1", "2", "-1", "0.5", "1e309",
                  "1e39", "(", ")", "[", "]", "{", "}", ",", "=", "+", "-", "*", "/", "@", "**",
                  "->", "<", "<=", "==", "!=", ">", ">=", "\n", "# c\n", "\\\n", "\r\n", "\t"]
HEADERS = ["rnn f(x[D]) -> y[D] {\n", "rnn f(x[D], g[D]) -> (y[D], h[D]) {\n    state h[D] = 0\n",
           "rnn f(q[H,K], k[H,K], v[H,D]) -> o[H,D] {\n    state S[H,K,D] = 0\n",
           "rnn f(x[D]) -> h[H] {\n    param W[H,D], U[H,H], b[H]\n    state h[H]\n"]
soup = st.lists(st.sampled_from(GRAMMAR_TOKENS), max_size=40).map(" ".join)


@_hyp(200)
@given(header=st.sampled_from(HEADERS + [""]), body=soup, close=st.booleans())
def test_hypothesis_token_soup(header, body, close):
    RAN.add("hypothesis_token_soup")
    text = header + body + ("\n}\n" if close else "\n")
    o = run_case(text, "token soup")
    assert not o.problems, (o.problems, text)


# --- 4. hypothesis: well-formed random statements (they get past the checker) ------------------------------
NUMBERS = st.one_of(st.sampled_from(["0", "1", "2", "0.5", "1e-3", "1e30", "1e-30", "3", "1e39",
                                     "1e309", "1e-400", "4.9e-324", "inf"]),
                    st.floats(min_value=0, max_value=1e6, allow_nan=False).map(repr))
T_LEAVES = st.sampled_from(["x", "g", "h", "b", "c", "W @ x", "U @ h", "s"]) | NUMBERS
UNARY = ["exp", "log", "tanh", "sigmoid", "relu", "softplus", "silu", "logsigmoid", "sqrt", "abs", "-"]


def _texpr(leaves):
    def extend(inner):
        un = st.tuples(st.sampled_from(UNARY), inner).map(
            lambda t: f"-({t[1]})" if t[0] == "-" else f"{t[0]}({t[1]})")
        bi = st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})")
        mm = st.tuples(st.sampled_from(["max", "min"]), inner, inner).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})")
        wh = st.tuples(inner, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), inner, inner,
                       inner).map(lambda t: f"where({t[0]} {t[1]} {t[2]}, {t[3]}, {t[4]})")
        return un | bi | mm | wh
    return st.recursive(leaves, extend, max_leaves=8)


I_LEAVES = st.sampled_from(["x[i]", "g[i]", "h[i]", "b[i]", "c", "s", "x[-1]", "h[0]"]) | NUMBERS
IJ_LEAVES = I_LEAVES | st.sampled_from(["S[i,j]", "m[i,j]", "m[j,i]", "S[i,0]", "x[j]", "U[i,j]"])
TEXPR = _texpr(T_LEAVES)
IEXPR = _texpr(I_LEAVES)
IJEXPR = _texpr(IJ_LEAVES)
STRUCT_HEADER = ("rnn f(x[D], g[D], s, m[D,D]) -> (y[D], h[D]) {\n"
                 "    param W[D,D], U[D,D], b[D], c = 0.5\n"
                 "    state h[D] = @H0@, S[D,D] = 0\n")


@st.composite
def structured_spec(draw):
    """A fixed header (inputs of several shapes, params, a vector and a matrix state) and
    random statements in tensor and index form, mostly well-typed: each state assigned at
    most once, y always assigned, every left-hand index bound on the right."""
    h0 = draw(st.sampled_from(["0", "1", "-inf", "inf", "1e39", "-2", "0.5"]))
    lines = [STRUCT_HEADER.replace("@H0@", h0)]
    if draw(st.booleans()):
        lines.append(f"    a = {draw(TEXPR)}\n")
    order = draw(st.permutations(["h", "S", "y"]))
    for what in order:
        if what == "h":
            form = draw(st.sampled_from(["tensor", "index", "affine", "none"]))
            if form == "tensor":
                lines.append(f"    h = {draw(TEXPR)}\n")
            elif form == "index":
                lines.append(f"    h[i] = {draw(IEXPR)} * h[i] + {draw(IEXPR)}\n")
            elif form == "affine":
                lines.append(f"    h = {draw(TEXPR)} * h + {draw(TEXPR)}\n")
        elif what == "S":
            form = draw(st.sampled_from(["decay", "outer", "none"]))
            if form == "decay":
                lines.append(f"    S[i,j] = {draw(IJEXPR)} * S[i,j] + {draw(IJEXPR)}\n")
            elif form == "outer":
                lines.append(f"    S[i,j] = exp(-softplus({draw(IEXPR)})) * S[i,j] + x[i] * {draw(IJEXPR)}\n")
        else:
            form = draw(st.sampled_from(["tensor", "index", "readout", "sum"]))
            if form == "tensor":
                lines.append(f"    y = {draw(TEXPR)}\n")
            elif form == "index":
                lines.append(f"    y[i] = x[i] + {draw(IEXPR)}\n")
            elif form == "readout":
                lines.append(f"    y[i] = sum[j](S[i,j] * {draw(IJEXPR)})\n")
            else:
                lines.append(f"    y[i] = sum[j](m[i,j] * {draw(IJEXPR)})\n")
    lines.append("}\n")
    return "".join(lines)


@_hyp(150)
@given(text=structured_spec())
def test_hypothesis_structured_specs(text):
    """Random but mostly well-formed specs: many pass the checker, compile on both
    backends and are compared in float64."""
    RAN.add("hypothesis_structured_specs")
    o = run_case(text, "structured")
    assert not o.problems, (o.problems, text)


@_hyp(40)
@given(kind=st.sampled_from(["diagonal", "chunked", "delta", "delta_channel", "dense", "maxplus",
                            "nonlinear"]),
       seed=st.integers(0, 10 ** 6))
def test_hypothesis_random_spec(kind, seed):
    """rnnc.random_spec's well-typed specs of each analysis class: both backends agree."""
    RAN.add("hypothesis_random_spec")
    text, _ = rnnc.random_spec(seed, kind=kind)
    o = run_case(text, f"random_spec {kind} {seed}")
    assert not o.problems, (o.problems, text)
    assert "compiled" in o.stages


# --- 5. hypothesis: random text inserted into an example ------------------------------------------------
@_hyp(120)
@given(path=st.sampled_from(EXAMPLES), where=st.floats(0, 1),
       junk=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8))
def test_hypothesis_unicode_insertion(path, where, junk):
    RAN.add("hypothesis_unicode_insertion")
    base = path.read_text()
    k = int(where * len(base))
    text = base[:k] + junk + base[k:]
    o = run_case(text, "unicode insertion", compile=False)
    assert not o.problems, (o.problems, text)


# --- 6. generated nasty inputs ----------------------------------------------------------------------------
H1 = "rnn f(x[D]) -> y[D] {\n"


def nest(opener: str, closer: str, depth: int, core: str = "x") -> str:
    return H1 + "    y = " + opener * depth + core + closer * depth + "\n}\n"


def _long_block(n: int) -> str:
    return H1 + "".join(f"    a{i} = x * {i % 7}\n" for i in range(n)) + "    y = x\n}\n"


def _sum_nest(depth: int) -> str:
    """sum[i0](x[i0] * sum[i1](x[i1] * ...)): every level a scalar (nesting sums whose inner
    body keeps the outer indices free instead builds a D**depth intermediate: see the
    corpus entry intermediate_too_big)."""
    return ("rnn f(x[D]) -> y {\n    y = " + "".join(f"sum[i{k}](x[i{k}] * " for k in range(depth))
            + "1" + ")" * depth + "\n}\n")


DEEP_BUG = ("a RecursionError (or 'internal parser error: maximum "
            "recursion depth exceeded') escapes rnnc.load for nesting deeper than ~450: "
            "parse.py's lark Transformer and check.py's _Checker.expr recurse per level")


def _nasty():
    xfail = xfail_bug("deep-nesting", DEEP_BUG)
    digits = xfail_bug("int-digit-limit", "an integer literal of more than 4300 digits gives "
                       "'internal parser error: Exceeds the limit (4300 digits)' (no position)")
    cases = []
    for depth in (50, 500, 5000):
        deep = [] if depth == 50 else [xfail]
        cases += [
            pytest.param(nest("(", ")", depth), {}, id=f"parens-{depth}"),
            pytest.param(nest("-", "", depth), {}, id=f"minus-{depth}", marks=deep),
            pytest.param(nest("tanh(", ")", depth), {}, id=f"calls-{depth}", marks=deep),
            pytest.param(nest("max(x, ", ")", depth), {}, id=f"max-calls-{depth}", marks=deep),
            pytest.param(H1 + "    y = " + " + ".join(["x"] * depth) + "\n}\n", {},
                         id=f"sum-chain-{depth}", marks=deep),
            pytest.param(H1 + "    y = " + " ** ".join(["x"] * depth) + "\n}\n", {},
                         id=f"pow-chain-{depth}", marks=deep),
            pytest.param("rnn f(x[" + "(" * depth + "D" + ")" * depth + "]) -> y {\n    y = 1\n}\n",
                         {}, id=f"dim-parens-{depth}", marks=deep),
            pytest.param("rnn f(x[" + "*".join(["D"] * depth) + "]) -> y {\n    y = 1\n}\n",
                         {}, id=f"dim-product-{depth}"),
        ]
    cases += [
        pytest.param(nest("(", ")", 20000), {"timeout": 60}, id="parens-20000"),
        pytest.param(_long_block(10000), {"timeout": 120}, id="10000-statements"),
        pytest.param(_sum_nest(50), {}, id="sum-nest-50"),
        pytest.param(_sum_nest(1000), {"timeout": 60}, id="sum-nest-1000", marks=xfail),
        pytest.param("".join(f"rnn f{i}(x[D]) -> y[D] {{\n    y = x * {i}\n}}\n" for i in range(300)),
                     {"timeout": 60}, id="300-blocks"),
        pytest.param(H1 + "    y = x" + " " * 100000 + "\n}\n", {}, id="long-line"),
        pytest.param(H1 + "\n" * 100000 + "    y = x + q\n}\n", {}, id="100000-blank-lines"),
        pytest.param(H1 + "".join(f"    # {'#' * 500}\n" for _ in range(2000)) + "    y = x\n}\n",
                     {}, id="2000-long-comments"),
        pytest.param("rnn " + "f" * 100000 + "(x[D]) -> y[D] {\n    y = x\n}\n", {}, id="huge-name"),
        pytest.param(H1 + "    y = x * " + "9" * 5000 + "\n}\n", {}, id="5000-digit-number"),
        pytest.param(H1 + "    y = x * 0." + "0" * 5000 + "1\n}\n", {}, id="5000-digit-fraction"),
        pytest.param(H1 + "    y = x[" + "9" * 5000 + "]\n}\n", {"bug": "int-digit-limit"},
                     id="5000-digit-index", marks=digits),
        pytest.param("rnn f(x[" + "9" * 5000 + "]) -> y {\n    y = 1\n}\n", {"bug": "int-digit-limit"},
                     id="5000-digit-dim", marks=digits),
        pytest.param("rnn f(x[" + "9" * 4000 + "]) -> y {\n    y = 1\n}\n", {}, id="4000-digit-dim"),
        pytest.param("\n" * 10 + "}" * 10000, {}, id="10000-closing-braces"),
        pytest.param("rnn f(" + ", ".join(f"x{i}[D]" for i in range(2000)) + ") -> y[D] {\n    y = x0\n}\n",
                     {"timeout": 60}, id="2000-inputs"),
    ]
    return cases


@pytest.mark.parametrize("text,opts", _nasty())
def test_nasty_input(text, opts):
    RAN.add("nasty_input")
    o = run_case(text, "nasty", timeout=opts.get("timeout"))
    expect_clean(o, opts.get("bug", "deep-nesting"))


# --- 7. the corpus: cases that once failed, and the nastiest seeds ------------------------------------------
def _corpus():
    index = json.loads((CORPUS / "index.json").read_text())
    out = []
    for entry in index:
        marks = [xfail_bug(entry["bug"], entry["xfail"])] if entry.get("bug") else []
        out.append(pytest.param(entry, id=entry["id"], marks=marks))
    return out


def test_corpus_index_lists_every_file():
    index = json.loads((CORPUS / "index.json").read_text())
    listed = {e["file"] for e in index if "file" in e}
    on_disk = {p.name for p in CORPUS.glob("*.rnn")}
    assert listed == on_disk, (listed ^ on_disk)
    assert len({e["id"] for e in index}) == len(index)
    assert all(e.get("why") for e in index)
    assert all(bool(e.get("bug")) == bool(e.get("xfail")) for e in index)


@pytest.mark.parametrize("entry", _corpus())
def test_corpus(entry):
    """A corpus entry is a .rnn file (the whole pipeline, from the text and from the path),
    or a `load_arg` string handed to rnnc.load and rnnc.compile as it is."""
    RAN.add("corpus")
    if "file" in entry:
        path = CORPUS / entry["file"]
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        o = run_case(text, entry["id"], timeout=entry.get("timeout"))
        # From the path too: rnnc.load(path) names the file in errors.
        with time_limit(entry.get("timeout") or CASE_TIMEOUT, entry["id"]):
            seen = text.replace("\r\n", "\n").replace("\r", "\n")  # read_text's newlines
            _guarded(o, "load-path", seen, _load_path, path, _files=(str(path),))
    else:
        o = Outcome()
        STATS["cases"] += 1
        with time_limit(CASE_TIMEOUT, entry["id"]):
            files = ("<spec>", entry["load_arg"])  # a path is named as <spec> or as itself
            _guarded(o, "load", None, rnnc.load, entry["load_arg"], _files=files)
            _guarded(o, "compile", None, rnnc.compile, entry["load_arg"], _files=files)
    expect_clean(o, entry.get("bug"))


def _load_path(path: Path):
    try:
        rnnc.load(path)
    except RnncError as err:
        if err.filename != str(path):
            raise AssertionError(f"error names {err.filename!r}, not {str(path)!r}") from None
        raise


# --- 8. inputs that are not text --------------------------------------------------------------------------
@pytest.mark.parametrize("data", [
    b"\xff\xfe r\x00n\x00n\x00", "rnn f(x[D]) -> y[D] {\n    y = x\n}\n".encode("utf-16"),
    b"\xef\xbb\xbfrnn f(x[D]) -> y[D] {\n    y = x\n}\n", b"rnn f(x[D]) -> y[D] {\n    y = x\xe9\n}\n",
    bytes(range(256)), b"",
], ids=["utf16-junk", "utf16-spec", "utf8-bom", "latin1-byte", "all-bytes", "empty"])
def test_files_that_are_not_utf8(tmp_path, data):
    """Files in other encodings, binary files, a BOM: `rnnc check` and rnnc.load(path) say
    so with an RnncError naming the file, never a UnicodeDecodeError (as `PATH: error: ...`
    or, in older versions, `<spec>: error: cannot read PATH: ...`)."""
    RAN.add("not_utf8")
    path = tmp_path / "spec.rnn"
    path.write_bytes(data)
    o = Outcome()
    STATS["cases"] += 1
    with time_limit(CASE_TIMEOUT, "bytes"):
        ok, err = _guarded(o, "load-path", None, rnnc.load, path, _files=(str(path), "<spec>"))
        stderr = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            rc = rnnc.cli.main(["check", str(path)])
    assert not o.problems, o.problems
    if not ok:
        assert str(path) in str(err), str(err)
    assert rc in (0, 1), stderr.getvalue()
    if rc == 1:
        first = stderr.getvalue().split("\n")[0]
        assert first.startswith((f"{path}:", "<spec>: error: cannot read")), first
        assert str(path) in first, first


# --- 9. code injection ----------------------------------------------------------------------------------------
# Names that would shadow Python builtins, keywords, the generated code's own modules and
# symbols, or that smuggle in characters that end an identifier or a string.
INJECTION_NAMES = ["__import__", "exec", "eval", "compile", "open", "getattr", "setattr", "globals",
                   "locals", "vars", "input", "breakpoint", "print", "id", "type", "object",
                   "__builtins__", "__class__", "__dict__", "_", "_x", "torch", "tl", "triton",
                   "math", "self", "F", "nn", "np", "rnnc", "None", "True", "False", "lambda",
                   "import", "def", "class", "return", "yield", "await", "async", "match", "case",
                   "exp", "sum", "max", "inf", "nan", "rnn", "param", "state", "len", "range",
                   "list", "dict", "str", "float", "int", "Exception", "ArithmeticError"]
BAD_CHAR_NAMES = ['x"y', "x'y", 'x";import os;"', "x\\y", "xα", "变量", "x\u200b", "x\u202ey",
                  "ﬁ", "ｘ", "x-y", "x.y", "x$", "x y"]


def _name_places(n: str) -> list:
    """(place, source, token) for a name in every place a spec introduces one."""
    D = "D"
    return [
        ("input", f"rnn f({n}[{D}]) -> y[{D}] {{\n    y = 1\n}}\n", n),
        ("param", f"rnn f(x[{D}]) -> y[{D}] {{\n    param {n}[{D}]\n    y = x\n}}\n", n),
        ("state", f"rnn f(x[{D}]) -> y[{D}] {{\n    state {n}[{D}]\n    y = x\n}}\n", n),
        ("local", f"rnn f(x[{D}]) -> y[{D}] {{\n    {n} = x\n    y = x\n}}\n", n),
        ("output", f"rnn f(x[{D}]) -> {n}[{D}] {{\n    {n} = x\n}}\n", n),
        ("rnn", f"rnn {n}(x[{D}]) -> y[{D}] {{\n    y = x\n}}\n", n),
        ("dim", f"rnn f(x[{n}]) -> y {{\n    y = 1\n}}\n", n),
        ("index", f"rnn f(x[{D}]) -> y[{D}] {{\n    y[{n}] = x[{n}]\n}}\n", n),
    ]


GRAMMAR_KEYWORDS = {"rnn", "param", "state", "inf"}


def _must_reject(source: str, token: str | None, line_of: str | None = None):
    """rnnc.load rejects the spec with an RnncError whose caret points at `token` (or, with
    `line_of`, somewhere on the line where `line_of` is used as a name)."""
    STATS["cases"] += 1
    try:
        with time_limit(CASE_TIMEOUT, "injection"):
            rnnc.load(source)
    except RnncError as err:
        assert err.line is not None, str(err)
        line = source.split("\n")[err.line - 1]
        if token is not None:
            assert line[err.col - 1:].startswith(token), (str(err), token)
        else:
            assert re.search(rf"\b{line_of}\b", line), (str(err), line_of)
        assert not error_problems(err, "<spec>", source), error_problems(err, "<spec>", source)
        return err
    pytest.fail(f"accepted a spec with the name {token!r}:\n{source}")


@pytest.mark.parametrize("name", INJECTION_NAMES)
def test_reserved_names_rejected_in_every_place(name):
    """A reserved word as input, param, state, local, output, rnn or dim name (index names
    are bound, not declared: a reserved one is still an error) is an RnncError at the name."""
    RAN.add("injection_names")
    for place, source, token in _name_places(name):
        if place == "index":  # an index name is never code; it must still be rejected or harmless
            try:
                rnnc.load(source)
            except RnncError:
                pass
            continue
        # a dim must be upper-case; lower-case reserved names are still rejected, at the name
        if name in GRAMMAR_KEYWORDS:  # the lexer reads a keyword: the syntax error comes at
            _must_reject(source, None, line_of=token)  # the next token, on the same line
        else:
            _must_reject(source, token)


@pytest.mark.parametrize("name", BAD_CHAR_NAMES, ids=lambda n: n.encode("unicode_escape").decode())
def test_names_with_quotes_or_non_ascii_rejected(name):
    """Quotes, backslashes, non-ASCII letters (NFKC look-alikes included), zero-width and
    bidi characters in a name: rejected at the first bad character."""
    RAN.add("injection_chars")
    bad = next(k for k, ch in enumerate(name)
               if not (ch.isascii() and (ch.isalnum() or ch == "_")) or (k == 0 and ch == "_"))
    for place, source, _ in _name_places(name):
        line_no = next(k for k, line in enumerate(source.split("\n")) if name in line)
        err = _must_reject(source, (name[bad:] if bad else name).lstrip())
        assert err.line == line_no + 1, (place, str(err))


@xfail_bug("os-sys-not-reserved", "'os' and 'sys' (and subprocess, importlib, builtins) are "
           "accepted as spec names. Harmless today (no backend generates source), but issue 9 "
           "lists them among the names to reject before a code generator lands")
@pytest.mark.parametrize("name", ["os", "sys"])
def test_module_names_os_sys_rejected(name):
    RAN.add("injection_os_sys")
    accepted = []
    for place, source, token in _name_places(name)[:5]:
        try:
            _must_reject(source, token)
        except pytest.fail.Exception:
            accepted.append(place)
    if accepted:
        raise KnownBug(f"{name!r} accepted as {', '.join(accepted)} name")


def test_newline_inside_an_identifier_is_two_names():
    """A newline (or a line continuation) inside a name splits it into two tokens: an error
    at the second half, or, where two names are valid there, two names. Never one name with
    a newline in it (which a code generator would copy into its output)."""
    RAN.add("injection_newline")
    for source in [H1 + "    ab\ncd = x\n    y = x\n}\n", "rnn f(x[D]) -> y[D] {\n    param W\nb[D]\n    y = x\n}\n",
                   "rnn f\n g(x[D]) -> y[D] {\n    y = x\n}\n", H1 + "    y = x\\\n2\n}\n"]:
        STATS["cases"] += 1
        try:
            rec = rnnc.load(source)
        except RnncError as err:
            assert not error_problems(err, "<spec>", source)
            continue
        assert all(_IDENT.match(n) for n in dot_names(rec)), dot_names(rec)


def dot_names(rec) -> list:
    return [rec.name, *rec.dims, *(d.name for d in rec.inputs), *(d.name for d in rec.params),
            *(d.name for d in rec.states), *(d.name for d in rec.outputs)]


def _run_examples(spec_of) -> int:
    """Compile every example (given as `spec_of(path)`: the path or its text) on both backends,
    call it and step it; the number of modules run."""
    n = 0
    for path in EXAMPLES:
        spec = spec_of(path)
        rec = rnnc.load(spec)
        dims = small_dims(rec)
        for backend in ("sequential", "scan"):
            try:
                m = rnnc.compile(spec, backend=backend, **dims)
            except RnncError:
                continue
            xs = [torch.rand(2, 3, *concrete(d.shape, dims)) for d in rec.inputs]
            try:
                m(*xs, output_final_state=True)
                m.step(*[x[:, 0] for x in xs])
            except RnncError:
                pass
            n += 1
    return n


def test_nothing_reaches_eval_or_exec(monkeypatch):
    """rnnc.compile and a call, for every example and both backends, with builtins.eval,
    builtins.exec and builtins.compile replaced by functions that raise (after a warm-up, so
    that lazy imports, which exec module code, are done)."""
    import builtins
    RAN.add("no_eval")
    _run_examples(lambda path: path)  # the warm-up
    calls = []

    def trap(name):
        def f(*args, **kwargs):
            calls.append((name, repr(args[0])[:200] if args else ""))
            raise AssertionError(f"builtins.{name} called")
        return f
    with monkeypatch.context() as mp:
        for name in ("eval", "exec", "compile"):
            mp.setattr(builtins, name, trap(name))
        STATS["cases"] += _run_examples(lambda path: path.read_text())
    assert not calls, calls


def test_rnnc_source_has_no_eval_or_exec():
    """No module of rnnc or its backends calls eval, exec or compile() on text, except the one
    place that runs generated kernel source (built from the IR, never from spec text):
    rnnc/cache.py, after checking the cached file against the text the generator produced."""
    RAN.add("no_eval_source")
    offenders, allowed = [], []
    for path in list((ROOT / "rnnc").glob("*.py")) + list((ROOT / "backends").glob("*.py")):
        for k, line in enumerate(path.read_text().split("\n"), 1):
            code = line.split("#")[0]
            if re.search(r"(?<![\w.])(eval|exec|__import__)\s*\(", code) or \
                    re.search(r"(?<![\w.])compile\s*\(\s*(src|source|text|code|self\.text)", code):
                where = f"{path.name}:{k}: {line.strip()}"
                (allowed if path.name == "cache.py" and "exec(compile(self.text" in code
                 else offenders).append(where)
    assert not offenders, offenders
    assert len(allowed) == 1, allowed  # the cache's loader, and nothing else


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_graph_dot_has_only_checked_identifiers(path, tmp_path):
    """`rnnc graph` output: every line a known DOT form; spec names only as identifiers;
    nothing from comments (where a spec can hold any text) gets through."""
    RAN.add("dot")
    evil = '# "]; n0 -> n1; label="pwned\\" \u202e\n'
    text = evil + path.read_text().replace("{\n", "{  " + evil, 1)
    rec = rnnc.load(text)
    dot = rnnc.graph.to_dot(rec)
    assert not dot_problems(dot, rec), dot_problems(dot, rec)
    assert "pwned" not in dot and "\u202e" not in dot
    f = tmp_path / "spec.rnn"
    f.write_text(text)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert rnnc.cli.main(["graph", str(f)]) == 0
    assert stdout.getvalue().rstrip("\n") == dot.rstrip("\n")
    STATS["cases"] += 1


# --- 10. non-finite values stay where they are ------------------------------------------------------------
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_nan_in_an_input_does_not_reach_earlier_outputs(path):
    """A NaN in any input at step 10 leaves the outputs of steps 0..9 as they were, on
    every backend that runs the example (causality holds for non-finite values too), and the
    final state is non-finite exactly where the sequential backend's is."""
    RAN.add("nan_causality")
    rec = rnnc.load(path)
    dims = small_dims(rec)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(1, 20, *concrete(d.shape, dims), generator=g, dtype=torch.float64) * 0.5 + 0.25
          for d in rec.inputs]
    leaks, seq_finite = [], {}
    for backend in ("sequential", "scan"):
        try:
            m = rnnc.compile(path, backend=backend, **dims).double()
        except RnncError:
            continue
        clean = _tensors(m(*xs))
        for k, d in enumerate(rec.inputs):
            poisoned = [x.clone() for x in xs]
            poisoned[k][:, 10] = float("nan")
            STATS["cases"] += 1
            out, final = m(*poisoned, output_final_state=True)
            for a, b in zip(clean, _tensors(out)):
                if not torch.equal(a[:, :10], b[:, :10]):
                    leaks.append(f"{backend}: NaN in {d.name} at t=10 changed outputs before t=10")
                    break
            finite = {n: torch.isfinite(h) for n, h in final.items()}
            if backend == "sequential":
                seq_finite[k] = finite
            elif any(not torch.equal(finite[n], seq_finite[k][n]) for n in finite):
                leaks.append(f"{backend}: NaN in {d.name} left a final state finite where the "
                             "sequential backend's is not (or the reverse)")
    if leaks:
        raise KnownBug("; ".join(leaks))


# --- the count ------------------------------------------------------------------------------------------------
FUZZ_TESTS = {"mutated_example", "hypothesis_mutation_stacks", "hypothesis_token_soup",
              "hypothesis_structured_specs", "hypothesis_random_spec", "hypothesis_unicode_insertion",
              "nasty_input", "corpus", "nan_causality"}


def test_zz_case_count(record_property):
    """Runs last (file order): prints and records how many cases ran and what they found."""
    n = STATS["cases"]
    summary = (f"rnnc fuzz: {n} cases; " + ", ".join(f"{k} {v}" for k, v in sorted(STATS.items())
                                                      if k != "cases")
               + f"; known bugs hit: {dict(KNOWN_HITS) or 'none'}; slowest: "
               + ", ".join(f"{label[:40]} {dt:.1f}s" for dt, label in SLOWEST[:3]))
    print("\n" + summary)
    record_property("fuzz_cases", n)
    record_property("fuzz_summary", summary)
    if not FUZZ_TESTS <= RAN:
        pytest.skip(f"only part of the fuzz suite ran ({n} cases); the minimum applies to the whole file")
    assert n >= MIN_CASES * min(1.0, SCALE), summary
