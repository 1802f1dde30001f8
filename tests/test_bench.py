"""`rnnc bench` (rnnc/bench.py, rnnc/peers.py) through the CLI, at tiny sizes.

- the JSON records have the documented structure, and the numbers agree with each other;
- a backend that computes wrong outputs, or raises, is reported as failed and never timed;
  one that cannot run the spec is "n/a" with its reason;
- --plot writes a PNG;
- --peers runs on CPU: torch.nn.RNN for elman, fla's naive references for gla, hgrn2 and rwkv6;
- input distributions read off the spec equal the ones tests/cases.py declares by hand;
- errors come out as FILE:LINE:COL: error, never as tracebacks.

Timings are not checked (the machine may be busy): only that they exist where they must.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc import analysis
from rnnc.backends import AVAILABLE
from rnnc.bench import input_kinds
from rnnc.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GLA = str(ROOT / "examples" / "gla.rnn")
ELMAN = str(ROOT / "examples" / "elman.rnn")
TINY = ["--B", "1", "--T", "8,16", "--reps", "2", "--warmup", "1", "--device", "cpu"]

FIELDS = {"spec", "name", "backend", "T", "B", "dtype", "device", "pass", "status", "reason",
          "ms_median", "ms_min", "ms_max", "tokens_per_s", "speedup_vs_sequential",
          "peak_mem_bytes", "compile_ms", "dims", "plan", "machine"}
TIMINGS = ("ms_median", "ms_min", "ms_max", "tokens_per_s", "speedup_vs_sequential",
           "peak_mem_bytes", "compile_ms")


pytestmark = pytest.mark.usefixtures("one_thread")


def bench(tmp_path, *args) -> tuple:
    out = tmp_path / "out.json"
    rc = main(["bench", *args, "--json", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_json_structure(tmp_path, capsys):
    rc, recs = bench(tmp_path, GLA, "--dims", "H=2,K=8,V=8", *TINY, "--backward")
    assert rc == 0
    table = capsys.readouterr().out
    assert "sequential" in table and "scan" in table
    assert isinstance(recs, list)
    assert len(recs) == 2 * 2 * 2  # backends x T x passes
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["name"] == "gla" and r["spec"] == GLA and r["plan"] == "chunked"
        assert r["B"] == 1 and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["dims"] == {"H": 2, "K": 8, "V": 8}
        assert r["machine"]["torch"] == torch.__version__
        assert r["status"] == "ok", r["reason"]
        assert r["pass"] in ("forward", "forward+backward")
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert r["tokens_per_s"] == pytest.approx(r["B"] * r["T"] / (r["ms_median"] / 1e3))
        assert r["compile_ms"] > 0 and r["peak_mem_bytes"] >= 0 and r["reps"] == 2
        assert r["check_error"] <= 1e-6
    assert sorted({(r["backend"], r["T"], r["pass"]) for r in recs}) == sorted(
        (b, t, p) for b in ("sequential", "scan") for t in (8, 16)
        for p in ("forward", "forward+backward"))
    for r in recs:
        if r["backend"] == "sequential":
            assert r["speedup_vs_sequential"] == pytest.approx(1.0)
    assert recs[0]["inputs"] == {"q": "normal", "k": "normal", "v": "normal", "g": "logdecay"}


def _fake_backend(name: str, mode: str) -> types.ModuleType:
    """A backend module: "wrong" outputs off by 0.1 %, "raise" a RuntimeError, "unable"
    declines the spec."""
    from rnnc.backends import sequential
    mod = types.ModuleType(name)
    mod.NAME = name
    mod.unsupported = lambda rec, facts: "fake backend declines everything" if mode == "unable" else None

    def build(rec, facts, chunk_size=None):
        inner = sequential.build(rec, facts)

        def runner(sizes, params, inputs, state0):
            if mode == "raise":
                raise RuntimeError("kernel exploded")
            outs, final = inner(sizes, params, inputs, state0)
            return {k: v * 1.001 for k, v in outs.items()}, final
        return runner
    mod.build = build
    return mod


def test_broken_backend_is_failed_and_not_timed(tmp_path, capsys, monkeypatch):
    for mode in ("wrong", "raise", "unable"):
        mod = f"rnnc_fake_{mode}_backend"
        monkeypatch.setitem(sys.modules, mod, _fake_backend(mod, mode))
        monkeypatch.setitem(AVAILABLE, f"fake_{mode}", mod)
    rc, recs = bench(tmp_path, GLA, "--dims", "H=2,K=4,V=4", *TINY)
    assert rc == 1  # an rnnc backend failed its correctness check
    cap = capsys.readouterr()
    assert "fake_wrong" in cap.err and "Traceback" not in cap.err
    by = {}
    for r in recs:
        by.setdefault(r["backend"], []).append(r)
    assert set(by) == {"sequential", "scan", "fake_wrong", "fake_raise", "fake_unable"}
    for b in ("sequential", "scan"):
        assert all(r["status"] == "ok" for r in by[b])
    for b in ("fake_wrong", "fake_raise", "fake_unable"):
        assert [r["T"] for r in by[b]] == [8, 16]
        for r in by[b]:
            assert all(r[k] is None for k in TIMINGS), r  # never timed, no speed shown
    assert all(r["status"] == "failed" and "disagrees" in r["reason"]
               and r["check_error"] == pytest.approx(1e-3, rel=1e-6) for r in by["fake_wrong"])
    assert all(r["status"] == "failed" and "kernel exploded" in r["reason"] for r in by["fake_raise"])
    assert all(r["status"] == "n/a" and "declines everything" in r["reason"] for r in by["fake_unable"])
    # The table shows no row of timings for them, only the reason.
    rows = [line for line in cap.out.splitlines() if "fake_" in line]
    assert len(rows) == 3 and all(":" in line for line in rows)
    assert any("FAILED" in line for line in rows if "fake_wrong" in line)


def test_only_selected_backends(tmp_path):
    rc, recs = bench(tmp_path, GLA, "--dims", "H=2,K=4,V=4", *TINY, "--backend", "scan")
    assert rc == 0
    assert {r["backend"] for r in recs} == {"scan"}
    assert all(r["speedup_vs_sequential"] is None for r in recs)  # sequential not timed


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    rc = main(["bench", GLA, "--dims", "H=2,K=4,V=4", *TINY, "--backend", "sequential",
               "--plot", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peers_on_cpu(tmp_path):
    rc, recs = bench(tmp_path, ELMAN, "--dims", "D=3,H=5", *TINY, "--peers", "--backend", "sequential")
    assert rc == 0
    peer = [r for r in recs if r["kind"] == "peer"]
    assert {r["backend"] for r in peer} == {"torch.nn.RNN"}
    assert all(r["status"] == "ok" and r["ms_median"] > 0 and r["check_error"] < 1e-4 for r in peer)


@pytest.mark.parametrize("name,cpu_peer,cuda_peer", [
    ("gla", "fla naive_recurrent_gla", "fla chunk_gla"),
    ("hgrn2", "fla naive_recurrent_gla", "fla chunk_gla"),
    ("rwkv6", "fla naive_recurrent_rwkv6", "fla chunk_rwkv6"),
    ("kda", ("fla naive_recurrent_kda", "fla naive_chunk_kda"), "fla chunk_kda"),
    ("rwkv7", "fla dplr_recurrence", "fla chunk_rwkv7")])
def test_fla_peers_on_cpu(tmp_path, name, cpu_peer, cuda_peer):
    """gla, hgrn2 on fla's GLA (the key 1 - a, the log-decay log a), rwkv6 on fla's RWKV-6
    (its naive reference in [B, H, T, K]), kda on fla's KDA, rwkv7 on fla's diagonal-plus-
    low-rank recurrence: fla's CPU reference, where fla-core is installed,
    checked against the sequential backend before it is timed; the chunk kernels are
    CUDA-only."""
    from rnnc.peers import PEERS, unavailable
    rc, recs = bench(tmp_path, str(ROOT / "examples" / f"{name}.rnn"), "--dims", "H=2,K=4,V=4",
                     "--B", "1", "--T", "8", "--reps", "1", "--warmup", "0", "--device", "cpu",
                     "--peers", "--backend", "sequential")
    assert rc == 0
    peer = {r["backend"]: r for r in recs if r["kind"] == "peer"}
    cpu_peers = (cpu_peer,) if isinstance(cpu_peer, str) else cpu_peer
    assert set(peer) == {*cpu_peers, cuda_peer}
    assert peer[cuda_peer]["status"] == "n/a" and "CUDA" in peer[cuda_peer]["reason"]
    for cpu_name in cpu_peers:
        naive = peer[cpu_name]
        if unavailable(PEERS[name][0], "cpu") is None:  # fla-core (with triton) is installed
            assert naive["status"] == "ok" and naive["check_error"] < 1e-4 and naive["ms_median"] > 0
            assert "CPU reference" in naive["reason"]
        else:
            assert naive["status"] == "n/a" and "not installed" in naive["reason"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_input_distributions_match_cases(case):
    rec = rnnc.load(str(case.path))
    assert input_kinds(rec, analysis.analyse(rec)) == case.inputs


def test_errors_are_located(tmp_path, capsys):
    bad = tmp_path / "bad.rnn"
    bad.write_text("rnn f(x[D]) -> h[D] {\n    state h[D] = 0\n    h = tanh(y) + h\n}\n")
    assert main(["bench", str(bad), *TINY]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3:" in err and "error" in err and "Traceback" not in err
    assert main(["bench", GLA, "--dims", "Z=3", *TINY]) == 1
    assert "unknown dim 'Z'" in capsys.readouterr().err
    assert main(["bench", GLA, "--T", "0", "--device", "cpu"]) == 1
    assert "--T" in capsys.readouterr().err
    assert main(["bench", GLA, "--dist", "g=weird", *TINY]) == 1
    assert "--dist" in capsys.readouterr().err


def test_memory_method_and_fallback(tmp_path, monkeypatch):
    rc, recs = bench(tmp_path, GLA, "--dims", "H=2,K=4,V=4", *TINY, "--backend", "sequential")
    assert rc == 0 and all("torch.profiler" in r["mem_method"] for r in recs)

    import rnnc.bench as engine

    def broken(fn):
        raise RuntimeError("no kineto here")
    monkeypatch.setattr(engine, "_profiled_peak", broken)  # a torch built without kineto
    rc, recs = bench(tmp_path, GLA, "--dims", "H=2,K=4,V=4", *TINY, "--backend", "sequential")
    assert rc == 0
    for r in recs:
        assert ("psutil" in r["mem_method"] or "ru_maxrss" in r["mem_method"]) and r["peak_mem_bytes"] >= 0


def test_gpu_benchmark_chunk_cases_dry_run(tmp_path):
    """benchmarks/triton_gpu.py: the issue-6 cases have the issue's shapes and peers, and the
    dry run (CPU, tiny sizes) checks and times the rnnc rows, the CUDA-only peers saying so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import triton_gpu
    finally:
        sys.path.pop(0)
    cases = triton_gpu.build_cases(triton_gpu.parse_args(["--cases", "chunk"]).keys, "full", False)
    got = {(c.key, c.B, c.T, tuple(sorted(c.dims.items())), c.dtypes) for c in cases}
    want = set()
    for name in ("gla", "retnet", "mamba2", "gated_deltanet"):
        dims = dict(H=16, N=128, P=128) if name == "mamba2" else dict(H=16, K=128, V=128)
        for T in (2048, 8192):
            want.add((f"chunk_{name}", 8, T, tuple(sorted(dims.items())), ("bfloat16",)))
    assert got == want
    peers = {c.key: {ps.peer.name for ps in c.peers} for c in cases}
    assert peers["chunk_gla"] == {"fla chunk_gla"}
    assert peers["chunk_retnet"] == {"fla chunk_simple_gla"}
    assert peers["chunk_mamba2"] == {"fla chunk_simple_gla", "mamba_ssm mamba_chunk_scan_combined"}
    assert peers["chunk_gated_deltanet"] == {"fla chunk_gated_delta_rule"}
    # hgrn2, beyond the four (not in the "chunk" alias): the same shapes, fla's GLA
    more = triton_gpu.build_cases(["chunk_hgrn2", "chunk_rwkv6"], "full", False)
    assert [(c.label, c.B, c.T, c.dims, c.dtypes) for c in more] == [
        (n, 8, T, dict(H=16, K=128, V=128), ("bfloat16",)) for n in ("hgrn2", "rwkv6")
        for T in (2048, 8192)]
    assert [{ps.peer.name for ps in c.peers} for c in more[::2]] == [{"fla chunk_gla"},
                                                                      {"fla chunk_rwkv6"}]

    # In a child process: the dry run patches triton's autotuner and torch.cuda.device.
    import subprocess
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_gpu.py"), "--dry-run",
                           "--cases", "chunk_retnet", "--forward-only", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "triton_gpu.json").read_text())["rows"]
    assert [(r["label"], r["pass"], r["dtype"]) for r in rows] == [("retnet", "forward", "float32")]
    (row,) = rows
    assert row["rnnc_ok"] and row["rnnc_check_err"] < 1e-6 and row["rnnc_ms"] > 0
    assert row["peer"] == "fla chunk_simple_gla" and row["peer_error"] == "needs CUDA"


def test_gpu_benchmark_deadline_and_chunk_lengths(tmp_path):
    """triton_gpu.py for a GPU session with a fixed budget: --chunk-T picks the chunk cases'
    lengths, and a case due after --deadline-s is listed as not run (here every case, with a
    deadline already passed), the files still written."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import triton_gpu
    finally:
        sys.path.pop(0)
    args = triton_gpu.parse_args(["--cases", "chunk_gla,scan", "--chunk-T", "2048"])
    cases = triton_gpu.build_cases(args.keys, "full", False, args.chunk_T)
    assert [(c.key, c.T) for c in cases] == [("chunk_gla", 2048), ("scan", 4096)]
    import subprocess
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_gpu.py"), "--dry-run",
                           "--cases", "chunk_gla,scan", "--deadline-s", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "triton_gpu.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["chunk_gla", "scan", "scan"]
    assert all(not r["rnnc_ok"] and "deadline" in r["rnnc_error"] for r in rows)
    assert "deadline" in (tmp_path / "triton_gpu.md").read_text()
