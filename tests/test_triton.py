"""The Triton backend's generated fused recurrent kernels against the sequential reference.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before
triton is imported), at small sizes: every
example forward and backward at T in {1, 5, 33} with a random initial state; .step();
deterministic generated source, with golden files; generated kernels also compile for an
sm_90 GPU target (no GPU needed: Triton compiles to a cubin on the CPU).

The kernels compute in float32; they are judged against the float64 sequential backend,
relative to the float32 sequential backend's own error (no hand-tuned atol).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import rnnc  # noqa: E402
import rnnc.analysis  # noqa: E402
from rnnc.backends import get  # noqa: E402

from cases import (CASES, compare_to_sequential, compile_offline, load_params, make_initial_state,  # noqa: E402
                   make_inputs, make_params, random_spec_against_sequential, rel_err)

triton = pytest.importorskip("triton")
F64 = torch.float64
GOLDEN = Path(__file__).resolve().parent / "golden"
EX = Path(__file__).resolve().parent.parent / "examples"
ids = lambda c: c.name  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fused_kernel(monkeypatch):
    # This file checks the fused recurrent kernels, which every spec has; the scan and chunk
    # kernels that backend="triton" prefers for some plans have their own files
    # (test_triton_scan.py, test_triton_chunked.py).
    monkeypatch.setenv("RNNC_TRITON_KERNEL", "fused")


def batch(T):
    """Two batch entries at T = 1 and 5; one at T = 33, where the interpreter's time grows
    with every program (batch offsets are checked at the shorter lengths)."""
    return 1 if T > 5 else 2


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_forward(case, T):
    compare_to_sequential(case, "triton", T, grad=False, B=batch(T))


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_backward(case, T):
    compare_to_sequential(case, "triton", T, grad=True, B=batch(T))


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("lstm", "gla", "mlstm", "s6")], ids=ids)
def test_step_matches_sequence(case):
    """Decoding one step at a time (the fused kernel at T=1) gives the full sequence's outputs
    and final state."""
    m = rnnc.compile(str(case.path), backend="triton", **case.dims)
    load_params(m, {k: v.float() for k, v in make_params(case, F64).items()})
    xs = [x.float() for x in make_inputs(case, 2, 6, F64)]
    h0 = {k: v.float() for k, v in make_initial_state(case, 2, F64).items()}
    full, final = m(*xs, initial_state=h0, output_final_state=True)
    full = full if isinstance(full, tuple) else (full,)
    state, steps = h0, []
    for t in range(6):
        y, state = m.step(*[x[:, t] for x in xs], state=state)
        steps.append(y if isinstance(y, tuple) else (y,))
    for j, f in enumerate(full):
        torch.testing.assert_close(torch.stack([s[j] for s in steps], 1), f, rtol=1e-5, atol=1e-6)
    for k in final:
        torch.testing.assert_close(state[k], final[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["diagonal", "chunked", "delta", "delta_channel", "dense", "maxplus",
                                  "nonlinear"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_specs(kind, seed):
    """Randomly built specs of every analysis class: forward and gradients match the float64
    sequential backend (computed in float32 by the kernels)."""
    random_spec_against_sequential(kind, seed, 9, out_tol=1e-4, grad_tol=1e-3)


SELECT_SPEC = """
rnn sel(x[D]) -> y[D] {
    param U[D,D]
    state h[D] = 0
    h[i] = tanh(U[i,i] * h[i] + x[i] + h[0] * U[1,i] + h[-1])
    y[i] = h[i] * U[i,i]
}
"""


def test_selects():
    """Integer picks (negative ones too) and diagonals, forward and gradients, in float32
    against the float64 sequential backend."""
    ref = rnnc.compile(SELECT_SPEC, backend="sequential", D=5).double()
    tri = rnnc.compile(SELECT_SPEC, backend="triton", D=5)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(2, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    x64, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y64, y32 = ref(x64), tri(x32)
    assert rel_err(y32.detach(), y64.detach()) < 1e-5
    g64 = torch.autograd.grad(y64.sum(), [x64, *ref.parameters()])
    g32 = torch.autograd.grad(y32.sum(), [x32, *tri.parameters()])
    for a, b in zip(g32, g64):
        assert rel_err(a, b) < 1e-5


# --- generated source --------------------------------------------------------------------------
def _generated(rec):
    """The spec-dependent part of `emit`: for chunked plans it is followed by the chunk kernel
    templates with the loaders generated for the spec's gates (test_triton_gates.py checks
    that those carry no spec text)."""
    backend = get("triton")
    analysis = rnnc.analysis.analyse(rec)
    text = backend.emit(rec, analysis)
    head, marker, tail = text.partition(backend.LIBRARY_MARKER)
    if marker and tail.startswith(": none."):   # several low-rank terms (gated_deltaproduct)
        assert "chunk_dplr" in tail and "@triton.jit" not in tail
        head = head.removesuffix("\n\n")
    elif marker:   # triton_dplr for a decay per key channel (kda, rwkv7)
        from rnnc.backends import triton_chunk, triton_delta, triton_dplr
        lib = (triton_dplr if "def dplr_fwd(" in tail else triton_delta
               if analysis.plan == "chunked_delta" else triton_chunk).source(
            backend.chunk_signatures(rec, analysis))
        assert tail.split("\n", 1)[1] == lib
        head = head.removesuffix("\n\n")  # the blank lines emit puts before the templates
    return head


def _source(name):
    return _generated(rnnc.load(str(Path(rnnc.__file__).resolve().parent.parent / "examples" / f"{name}.rnn")))


@pytest.mark.parametrize("name", ["elman", "gla", "s6"])
def test_golden_source(name):
    """The generated source is deterministic and matches its golden file (regenerate with
    RNNC_UPDATE_GOLDEN=1 after an intended change; the numbers are checked separately)."""
    text = _source(name)
    assert text == _source(name)
    path = GOLDEN / f"{name}.py.txt"
    if os.environ.get("RNNC_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"generated source for {name} changed; see {path}"


_VOCAB = re.compile(r"^(v|g|ga|gs|n|c|dy|o|m|pid|NG|SZ|BLK|X|Y|P|H0_|HT|HS|DY|DHT|DX|DP|DH0_|SB|GP|LAM|base_|off_|msk_|wbase_)"
                    r"[A-Za-z0-9_]*$")
_FIXED = {"import", "triton", "tl", "jit", "def", "return", "for", "in", "range", "if", "else", "and",
          "pass", "float", "x", "y", "c", "e", "r", "odd", "whole", "zeros", "pid", "pid_b", "rest",
          "ob", "mb", "t", "tt", "T", "B", "NB", "forward", "backward", "STORE_HIST", "DOT_PREC",
          "NUM_STAGES", "BLK_B", "not", "or", "True", "False", "None", "as",
          "axis", "mask", "other", "input_precision", "num_stages", "propagate_nan",
          "a", "x2", "small", "u", "d", "z",
          "wide_forward", "t0", "t1", "k0", "hk", "w", "BK", "FLAGS", "ERR", "NPROG", "NPROG_P2",
          "MAX_SPINS", "SYNC", "spins", "pf", "done", "sem", "scope", "cache_modifier", "while",
          "SLOTS", "step", "wide_backward", "gk", "tt"}
_TL = set(dir(__import__("triton.language", fromlist=["x"])))


def _names(text):
    import io
    import tokenize
    out, prev = set(), None
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and prev != ".":  # attributes belong to triton's modules
            out.add(tok.string)
        prev = tok.string
        if tok.type == tokenize.STRING:
            assert tok.string in ('"nan"', '"inf"', '"-inf"', '".cg"', '"release"', '"acquire"', '"gpu"'), \
                f"unexpected string {tok.string}"
    return out


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_source_carries_no_spec_text(case):
    """Outside comments, every identifier in the generated source comes from the generator's
    own vocabulary (node numbers, class numbers, fixed names), never from the spec."""
    text = _generated(rnnc.load(str(case.path)))
    bad = {n for n in _names(text) if not (_VOCAB.match(n) or n in _FIXED or n in _TL or n.startswith("_"))}
    assert not bad, f"unexpected identifiers in generated source: {sorted(bad)}"
    for line in text.splitlines():
        if "#" in line:
            assert "\\n" not in line and len(line) < 400


def test_hostile_names_stay_in_comments():
    """Spec names that look like Python or like the generator's own names are not emitted as
    code: the source is the same as for a renamed spec, except in comments."""
    src = ("rnn evil(pid[D]) -> v1[H] {\n    param ob[H,D], g2[H]\n    state v1[H] = 0\n"
           "    v1 = tanh(ob @ pid + g2 * v1)\n}\n")
    plain = ("rnn plain(x[D]) -> h[H] {\n    param W[H,D], b[H]\n    state h[H] = 0\n"
             "    h = tanh(W @ x + b * h)\n}\n")
    a = rnnc.load(src)
    b = rnnc.load(plain)
    strip = lambda t: "\n".join(line.split("#")[0].rstrip() for line in t.splitlines())  # noqa: E731
    ta = get("triton").emit(a, rnnc.analysis.analyse(a))
    tb = get("triton").emit(b, rnnc.analysis.analyse(b))
    assert strip(ta) == strip(tb)


def test_compiles_for_gpu_without_one():
    """The generated kernels of three examples compile down to an sm_90 cubin (Triton runs
    its whole pipeline on the CPU), in a process without the interpreter."""
    import subprocess
    code = ("import rnnc, rnnc.analysis, sys\n"
            "from rnnc.backends import triton_backend as tb\n"
            "for name, dims in [('elman', dict(D=8, H=32)), ('gla', dict()), ('s6', dict())]:\n"
            "    rec = rnnc.load(f'examples/{name}.rnn')\n"
            "    sizes = {d: dims.get(d, 16) for d in rec.dims}\n"
            "    out = tb.compile_for(rec, rnnc.analysis.analyse(rec), sizes)\n"
            "    assert out['forward'] > 0 and out['backward'] > 0, out\n"
            "print('compiled')\n")
    compile_offline(code)


def test_errors_are_clear():
    """float64, and states too wide for registers that the wide kernels cannot take either
    (test_triton_wide.py runs those they can), are refused with a clear RnncError."""
    m = rnnc.compile(str(EX / "elman.rnn"), backend="triton", D=4, H=8).double()
    with pytest.raises(rnnc.RnncError, match="float32"):
        m(torch.randn(1, 2, 4, dtype=F64))
    src = ("rnn normed(x[D]) -> h[H] {\n    param W[H,D], U[H,H]\n    state h[H] = 0\n"
           "    s = max[u](h[u])\n    h = tanh(W @ x + U @ h) / (2 + s)\n}\n")
    wide = rnnc.compile(src, backend="triton", D=4, H=1024)
    with pytest.raises(rnnc.RnncError, match="registers.*the wide kernel: a reduction"):
        wide(torch.randn(1, 2, 4))


def test_auto_uses_triton_only_on_cuda():
    m = rnnc.compile(str(EX / "gla.rnn"), backend="auto")
    assert m.backend == "scan" and m.gpu_backend == "triton"
    # seeded, and g a log-decay: unseeded inputs with g > 0 (growing states) once missed this
    # tolerance in a full run
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 4, 64, generator=gen) for _ in range(4)]
    xs[3] = torch.nn.functional.logsigmoid(xs[3])
    ref = rnnc.compile(str(EX / "gla.rnn"), backend="sequential")
    torch.testing.assert_close(m(*xs), ref(*xs), rtol=1e-4, atol=1e-5)  # CPU: the scan backend
