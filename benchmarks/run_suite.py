#!/usr/bin/env python
"""The standard benchmark suite: every example spec, every backend, and the peers.

    python benchmarks/run_suite.py              # CPU rows; GPU rows too when CUDA is present
    python benchmarks/run_suite.py --quick      # tiny sizes, to check that everything runs (~1 min;
                                                # results go to benchmarks/results/quick/)
    python benchmarks/run_suite.py --readme     # also write the tables into benchmarks/README.md

For each example it calls `rnnc.bench.run_bench` (the engine behind `rnnc bench`: each
backend and peer is checked against the sequential reference before it is timed) and writes

    benchmarks/results/<example>.<device>.json   one record per measurement
    benchmarks/results/summary.md                the tables below, also printed

Defaults (sizes per dim name from rnnc.bench.DEFAULT_DIMS, B=4):
    CPU:  T = 256, 1024, forward only; peers on  (about 10 minutes on 2 quiet cores)
    CUDA: T = 256, 1024, 4096, forward and forward+backward; peers on
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"
RESULTS = HERE / "results"

CPU = dict(T=[256, 1024], backward=False)
CUDA = dict(T=[256, 1024, 4096], backward=True)
QUICK = dict(T=[16, 64], B=1, reps=2, warmup=0)


def quick_dims(rec_dims: dict) -> dict:
    """Small sizes for --quick: every dim at most 16 (H at most 2)."""
    return {k: min(v, 2 if k == "H" and v <= 4 else 16) for k, v in rec_dims.items()}


def run(examples, devices, args, results_dir: Path) -> dict:
    import rnnc
    from rnnc.bench import run_bench, sizes_for

    results_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for device in devices:
        cfg = dict(CUDA if device == "cuda" else CPU)
        if args.T:
            cfg["T"] = args.T
        if args.backward is not None:
            cfg["backward"] = args.backward
        for path in examples:
            name = path.stem
            t0 = time.perf_counter()
            dims = None
            kwargs = dict(T=cfg["T"], backward=cfg["backward"], B=args.B, dtype=args.dtype,
                          device=device, peers=not args.no_peers, reps=args.reps, warmup=args.warmup)
            if args.quick:
                rec = rnnc.load(str(path))
                dims = quick_dims(sizes_for(rec, {}))
                kwargs.update(T=QUICK["T"], B=QUICK["B"], reps=QUICK["reps"], warmup=QUICK["warmup"])
            try:
                records = run_bench(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                                    dims=dims, **kwargs)
                error = None
            except rnnc.RnncError as e:
                records, error = [], str(e)
            dest = results_dir / f"{name}.{device}.json"
            dest.write_text(json.dumps(records, indent=1) + "\n")
            out[(name, device)] = (records, error)
            bad = sorted({f"{r['backend']} {r['status']}" for r in records
                          if r["status"] == "failed"})
            print(f"[{device}] {name:16s} {time.perf_counter() - t0:6.1f}s  {len(records)} records"
                  + (f"  ERROR: {error.splitlines()[0]}" if error else "")
                  + (f"  ({', '.join(bad)})" if bad else ""), file=sys.stderr, flush=True)
    return out


def _ms(r) -> str:
    if r is None:
        return ""
    if r["status"] == "ok":
        x = r["ms_median"]
        return f"{x:.3g}" if x < 1000 else f"{x:.0f}"
    return "FAILED" if r["status"] == "failed" else "n/a"


def tables(results: dict) -> str:
    """Markdown: one table per device and pass; a row per example and T."""
    from rnnc.backends import AVAILABLE
    lines = []
    devices = sorted({d for _, d in results}, key=lambda d: d != "cpu")
    for device in devices:
        recs_all = [r for (n, d), (recs, _) in results.items() if d == device for r in recs]
        passes = [p for p in ("forward", "forward+backward") if any(r["pass"] == p for r in recs_all)]
        machine = next((r["machine"] for r in recs_all), None)
        for p in passes or ["forward"]:
            ref = next((r for r in recs_all if r["pass"] == p), None)
            head = f"### {device.upper()}, {p}"
            if ref:
                head += f" (B={ref['B']}, {ref['dtype']})"
            lines += [head, ""]
            if machine:
                where = machine.get("gpu") or machine["cpu"]
                lines += [f"Machine: {where}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
                          f"({machine['torch_threads']} threads). Times in ms (median).", ""]
            backends = [b for b in AVAILABLE if any(r["backend"] == b and r["kind"] == "rnnc"
                                                    for r in recs_all)]
            hdr = ["example", "plan", "dims", "T"] + [f"{b} ms" for b in backends] + \
                  [f"{b} vs seq" for b in backends if b != "sequential"] + ["peers (ms, vs seq)"]
            lines.append("| " + " | ".join(hdr) + " |")
            lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(hdr) - 1)) + "|---|")
            notes, elsewhere = [], False
            for (name, d), (recs, error) in sorted(results.items()):
                if d != device:
                    continue
                if error:
                    lines.append(f"| {name} | error | | | " + " | ".join("" for _ in hdr[4:]) + " |")
                    notes.append(f"- {name}: {error.splitlines()[0]}")
                    continue
                recs = [r for r in recs if r["pass"] == p]
                for T in sorted({r["T"] for r in recs}):
                    at = {(r["backend"], r["kind"]): r for r in recs if r["T"] == T}
                    r0 = next(iter(at.values()))
                    dims = ",".join(f"{k}={v}" for k, v in r0["dims"].items())
                    row = [name, r0["plan"], dims, str(T)]
                    row += [_ms(at.get((b, "rnnc"))) for b in backends]
                    for b in backends:
                        if b == "sequential":
                            continue
                        r = at.get((b, "rnnc"))
                        s = r and r["speedup_vs_sequential"]
                        row.append(f"{s:.2f}x" if s else "")
                    peers = []
                    for (b, kind), r in at.items():
                        if kind == "peer" and r["status"] == "ok":
                            s = r["speedup_vs_sequential"]
                            peers.append(f"{b}: {_ms(r)}" + (f" ({s:.2f}x)" if s else ""))
                    row.append("; ".join(peers))
                    lines.append("| " + " | ".join(row) + " |")
                for r in recs:
                    if r["kind"] == "peer" and r["reason"].startswith("needs "):
                        elsewhere = True  # a GPU-only peer on the CPU, or the reverse
                        continue
                    if r["status"] != "ok":
                        note = f"- {name}: {r['backend']}{' (peer)' if r['kind'] == 'peer' else ''} " \
                               f"{r['status']}: {r['reason']}"
                        if note not in notes:
                            notes.append(note)
            lines.append("")
            if notes:
                lines += ["Not timed:", ""] + notes + [""]
            if elsewhere:
                lines += [f"Peers that run only on {'CUDA' if device == 'cpu' else 'the CPU'} are left out "
                          "of this table.", ""]
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = HERE / "README.md"
    src = readme.read_text()
    new, n = re.subn(r"(<!-- results:begin -->\n).*?(<!-- results:end -->)",
                     lambda m: m.group(1) + text + "\n" + m.group(2), src, flags=re.S)
    if not n:
        raise SystemExit("benchmarks/README.md has no <!-- results:begin --> ... <!-- results:end --> block")
    readme.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("examples", nargs="*", help="example names (default: every examples/*.rnn)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="all: CPU, and CUDA when present (default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that the suite runs")
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    bw = p.add_mutually_exclusive_group()
    bw.add_argument("--backward", dest="backward", action="store_true", default=None)
    bw.add_argument("--no-backward", dest="backward", action="store_false")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--readme", action="store_true",
                   help="also write the tables into benchmarks/README.md (between the results markers)")
    args = p.parse_args(argv)

    names = args.examples or sorted(x.stem for x in EXAMPLES.glob("*.rnn"))
    missing = [n for n in names if not (EXAMPLES / f"{n}.rnn").exists()]
    if missing:
        p.error(f"no such example: {', '.join(missing)}")
    examples = [EXAMPLES / f"{n}.rnn" for n in names]
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")

    if args.quick and args.readme:
        p.error("--readme is for full runs, not --quick")
    results_dir = RESULTS / "quick" if args.quick else RESULTS

    t0 = time.perf_counter()
    results = run(examples, devices, args, results_dir)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = " ".join(["python benchmarks/run_suite.py", *(sys.argv[1:] if argv is None else argv)])
    text = (f"Generated by `{cmd}` on {stamp} in {time.perf_counter() - t0:.0f} s.\n\n"
            + tables(results))
    (results_dir / "summary.md").write_text(text)
    print(text)
    if args.readme:
        write_readme(text)
    failed = any(r["status"] == "failed" and r["kind"] == "rnnc"
                 for recs, _ in results.values() for r in recs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
