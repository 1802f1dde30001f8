"""`rnnc compile FILE`: a summary of what rnnc.compile builds, or with --emit the generated
Triton source; errors as FILE:LINE:COL: error: MESSAGE, never a traceback."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

import rnnc.backends
from rnnc.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GRU, ELMAN = str(EXAMPLES / "gru.rnn"), str(EXAMPLES / "elman.rnn")


def cli(capsys, *argv) -> tuple:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def test_summary_sequential(capsys):
    rc, out, err = cli(capsys, "compile", GRU, "--backend", "sequential", "--dims", "D=3,H=5")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{GRU}: rnn gru (D=3, H=5)"
    assert lines[1].startswith("  plan:    sequential (")
    assert lines[2] == "  backend: sequential"
    # 6 matrices and 4 biases: 3*H*D + 3*H*H + 4*H
    assert lines[3] == f"  params:  {3 * 5 * 3 + 3 * 5 * 5 + 4 * 5} in 10 tensors"


def test_summary_auto_picks_scan(capsys):
    rc, out, _ = cli(capsys, "compile", EXAMPLES / "gla.rnn", "--dims", "H=2,K=4,V=4")
    assert rc == 0
    assert "  plan:    chunked (" in out and "  backend: scan" in out


@pytest.mark.parametrize("argv, message", [
    (["nothere.rnn"], "nothere.rnn: error: no such file"),
    ([GRU, "--backend", "sequential"], "error: dim H has no size"),
    ([GRU, "--dims", "D=x"], "--dims expects NAME=POSITIVE_INT"),
    ([GRU, "--dims", "D=2,H=2,Q=3"], "unknown dim 'Q'"),
    ([GRU, "--name", "lstm", "--dims", "D=2,H=2"], "no rnn named 'lstm'"),
])
def test_errors_exit_1_without_traceback(capsys, argv, message):
    rc, out, err = cli(capsys, "compile", *argv)
    assert rc == 1 and out == ""
    assert message in err


def test_unavailable_backend_is_an_error(capsys, monkeypatch):
    monkeypatch.delitem(rnnc.backends.AVAILABLE, "triton", raising=False)
    rc, out, err = cli(capsys, "compile", ELMAN, "--backend", "triton", "--dims", "D=2,H=2")
    assert rc == 1 and out == ""
    assert err.startswith(f"{ELMAN}: error: unknown backend 'triton'")


def test_emit_rejected_with_another_backend(capsys):
    rc, out, err = cli(capsys, "compile", GRU, "--emit", "--backend", "scan")
    assert rc == 2 and out == ""
    assert err.strip() == "rnnc compile: error: --emit shows generated Triton source; use --backend triton"


def test_emit_without_triton_backend_is_an_error(capsys, monkeypatch):
    monkeypatch.delitem(rnnc.backends.AVAILABLE, "triton", raising=False)
    rc, out, err = cli(capsys, "compile", ELMAN, "--emit")
    assert rc == 1 and out == "" and "unknown backend 'triton'" in err


def fake_triton(monkeypatch, emit):
    """Register a stand-in triton backend whose emit is `emit`."""
    fake = types.SimpleNamespace(NAME="triton", emit=emit)
    real_get = rnnc.backends.get
    monkeypatch.setitem(rnnc.backends.AVAILABLE, "triton", "fake.triton")
    monkeypatch.setattr(rnnc.backends, "get", lambda name: fake if name == "triton" else real_get(name))


def test_emit_prints_what_the_backend_generates(capsys, monkeypatch):
    seen = []

    def emit(rec, analysis):
        seen.append((rec.name, analysis.plan))
        return f"# generated for {rec.name}\n@triton.jit\ndef step(): pass"
    fake_triton(monkeypatch, emit)
    for argv in (["--emit"], ["--emit", "--backend", "triton"]):  # triton is the default with --emit
        rc, out, err = cli(capsys, "compile", ELMAN, *argv)
        assert rc == 0 and err == ""
        assert out == "# generated for elman\n@triton.jit\ndef step(): pass\n"
    assert seen == [("elman", "sequential")] * 2


def test_emit_error_is_printed_located(capsys, monkeypatch):
    def emit(rec, analysis):
        raise rnnc.RnncError("triton cannot lower this", line=4, col=9)
    fake_triton(monkeypatch, emit)
    rc, out, err = cli(capsys, "compile", ELMAN, "--emit")
    assert rc == 1 and out == ""
    assert err.splitlines()[0] == f"{ELMAN}:4:9: error: triton cannot lower this"
    assert err.splitlines()[2].strip() == "^"


@pytest.mark.skipif("triton" not in rnnc.backends.AVAILABLE, reason="the triton backend is not registered")
def test_real_emit_is_deterministic(capsys):
    rc1, out1, err1 = cli(capsys, "compile", ELMAN, "--emit")
    rc2, out2, _ = cli(capsys, "compile", ELMAN, "--emit", "--backend", "triton")
    assert rc1 == rc2 == 0, err1
    assert "@triton.jit" in out1
    assert out1 == out2
