"""CPU benchmark of the scan backend (issue 4): ratios measured side by side in one run.

    python benchmarks/scan_cpu.py [--T 4096] [--B 4] [--reps 3] [--threads N]

Writes benchmarks/results/scan_cpu.json and .md and prints the table. Every pairing is
checked for agreement on the same inputs before it is timed. Against fla's chunk references
the scan backend and the peer are timed alternately, call for call (2*reps+1 each), and the
ratio is of those medians.

The ceiling column bounds what any scan could reach: sequential_ms / hoisted_ms, where
hoisted_ms is the measured time of the spec's state-free ("hoisted") work alone, the part no
parallelisation over time removes (minGRU's two projections, S6's [B, T, D, N] decay
exp(-exp(A) dt)). It is timed by running the compiled modules' own hoisted programs on the
same inputs, with nothing else: the inputs and params the backend's runner receives are
captured from one real call, then the runner's lowered hoisted program (`_programs(...)[0]`)
is run as that runner runs it: the sequential backend's once over all B*T rows, the scan
backend's block by block over the same blocks as its forward (slicing the inputs included).
hoisted_ms is the faster of the two, so the ceiling is an upper bound for both ways of
doing that work. Where the scan needs no state-free work beyond reading its inputs (gla: the
chunk form reads the log-decay g itself, never exp(g)), hoisted_ms is near zero and the
ceiling says only that the bound lies elsewhere (in the state-dependent chunk work).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rnnc
from rnnc import interpret

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"
OUT = ROOT / "benchmarks" / "results"


def timed_pair(f, g, reps):
    """(timed stats of f, of g), their calls alternating: the two see the same machine state
    (on a shared 2-core machine a whole block of calls can run 30% slower than the next)."""
    f(), g()  # warm-up
    a, b = [], []
    for _ in range(reps):
        for fn, out in ((f, a), (g, b)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return ((statistics.median(a), min(a), max(a)), (statistics.median(b), min(b), max(b)))


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def hoisted_timer(module, xs):
    """fn() that runs `module`'s hoisted program on xs as its backend's runner does (see the
    module docstring): captures the runner's arguments from one call, then replays only the
    state-free program, block by block for the block solver, over all B*T rows otherwise."""
    runner, calls = module._runner, []

    def capture(sizes, params, inputs, state0):
        calls.append((sizes, params, inputs))
        return runner(sizes, params, inputs, state0)
    module._runner = capture
    try:
        module(*xs)
    finally:
        module._runner = runner
    sizes, params, inputs = calls[0]
    rec = module.recurrence
    x0 = next(iter(inputs.values()))
    B, T = x0.shape[:2]
    lower = runner.program.lowered if hasattr(runner, "program") else runner._programs  # sequential's
    prog = lower(sizes, x0.dtype, x0.device)[0]
    if hasattr(runner, "_block_length"):  # the block solver
        block = runner._block_length(B, {s.name: interpret.concrete(s.shape, sizes) for s in rec.states})
    else:
        block = T

    def run():
        for t0 in range(0, T, block):
            interpret.hoisted_env(rec, prog, params, inputs, t0, min(block, T - t0))
    return run


def inputs_for(name, B, T, g):
    r = lambda *s: torch.randn(B, T, *s, generator=g)  # noqa: E731
    if name == "mingru":
        return [r(256)]
    if name == "s6":
        return [r(256), F.softplus(r(256)), r(16), r(16)]
    if name in ("gla",):
        return [r(4, 64), r(4, 64), r(4, 64), F.logsigmoid(r(4, 64))]
    if name == "retnet":
        return [r(4, 64), r(4, 64), r(4, 64)]
    if name == "gated_deltanet":
        return [r(4, 64), F.normalize(r(4, 64), dim=-1), r(4, 64), torch.sigmoid(r(4)) * 0.1 + 0.9,
                torch.sigmoid(r(4))]
    raise KeyError(name)


DIMS = {"mingru": dict(D=256, H=256), "s6": dict(D=256, N=16), "gla": dict(H=4, K=64, V=64),
        "retnet": dict(H=4, K=64, V=64), "gated_deltanet": dict(H=4, K=64, V=64)}


def fla_peer(name):
    """(label, fn(module, xs) -> outputs [B,T,...]) for fla-core's pure-PyTorch chunk reference."""
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        from fla.ops.simple_gla.naive import naive_chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed here"
        return None, f"fla-core not importable: {type(e).__name__}"
    if name == "retnet":
        def run(m, xs):
            q, k, v = xs
            g = torch.log(m.gamma.detach()).expand(q.shape[0], q.shape[1], -1).contiguous()
            return naive_chunk_simple_gla(q, k, v, g, chunk_size=64, scale=1.0)[0]
        return ("fla naive_chunk_simple_gla", run), None
    if name == "gated_deltanet":
        def run(m, xs):
            q, k, v, alpha, beta = xs
            return naive_chunk_gated_delta_rule(q, k, v, torch.log(alpha), beta, chunk_size=64,
                                                scale=1.0)[0]
        return ("fla naive_chunk_gated_delta_rule", run), None
    return None, None


def bench(name, B, T, reps):
    g = torch.Generator().manual_seed(0)
    xs = inputs_for(name, B, T, g)
    seq = rnnc.compile(EX / f"{name}.rnn", backend="sequential", **DIMS[name])
    scan = rnnc.compile(EX / f"{name}.rnn", backend="scan", **DIMS[name])
    scan.load_state_dict(seq.state_dict())
    row = {"spec": name, "B": B, "T": T, "dims": DIMS[name], "plan": scan.analysis.plan}
    with torch.no_grad():
        # Agreement first, on a prefix (the sequential loop is slow).
        short = [x[:, :256] for x in xs]
        ref = seq(*short)
        err = ((scan(*short) - ref).norm() / ref.norm()).item()
        row["scan_rel_err"] = err
        if err > 1e-4:
            row["status"] = f"scan disagrees with sequential (rel err {err:.1e}); not timed"
            return row
        row["sequential_ms"] = [1e3 * v for v in timed(lambda: seq(*xs), max(1, reps - 1))]
        row["scan_ms"] = [1e3 * v for v in timed(lambda: scan(*xs), reps)]
        row["scan_vs_sequential"] = row["sequential_ms"][0] / row["scan_ms"][0]
        row["hoisted_sequential_ms"] = [1e3 * v for v in timed(hoisted_timer(seq, xs), reps)]
        row["hoisted_scan_ms"] = [1e3 * v for v in timed(hoisted_timer(scan, xs), reps)]
        row["hoisted_ms"] = min(row["hoisted_sequential_ms"][0], row["hoisted_scan_ms"][0])
        row["ceiling"] = row["sequential_ms"][0] / row["hoisted_ms"]
        peer, why = fla_peer(name)
        if peer is not None:
            label, fn = peer
            out = fn(scan, xs)
            ours = scan(*xs)
            perr = ((out.float() - ours).norm() / ours.norm()).item()
            row["peer"] = label
            row["peer_rel_err"] = perr
            if perr < 1e-3:
                ours, theirs = timed_pair(lambda: scan(*xs), lambda: fn(scan, xs), 2 * reps + 1)
                row["scan_beside_peer_ms"] = [1e3 * v for v in ours]
                row["peer_ms"] = [1e3 * v for v in theirs]
                row["scan_vs_peer"] = row["peer_ms"][0] / row["scan_beside_peer_ms"][0]
            else:
                row["peer_status"] = f"disagrees (rel err {perr:.1e}); not timed"
        elif why:
            row["peer_status"] = why
    row["status"] = "ok"
    return row


MEMORY_CHILD = """
import resource, sys, torch, rnnc
torch.manual_seed(0)
B, T = int(sys.argv[1]), int(sys.argv[2])
m = rnnc.compile(sys.argv[3], backend="scan", H=4, K=64, V=64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q, k, v = (torch.randn(B, T, 4, 64) for _ in range(3))
g = torch.nn.functional.logsigmoid(torch.randn(B, T, 4, 64))
with torch.no_grad():
    o = m(q, k, v, g)
assert torch.isfinite(o).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024, peak * 1024, 5 * B * T * 4 * 64 * 4)
"""


def memory_row(B, T):
    res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(B), str(T), str(EX / "gla.rnn")],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return {"status": "failed", "stderr": res.stderr[-2000:]}
    base, peak, io = map(int, res.stdout.split()[-3:])
    return {"status": "ok", "B": B, "T": T, "peak_rss_bytes": peak, "import_rss_bytes": base,
            "inputs_outputs_bytes": io, "within_4GiB": peak < 4 * 2 ** 30}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-T", type=int, default=65536)
    ap.add_argument("--specs", default="mingru,gla,s6,gated_deltanet,retnet")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    rows = []
    for name in args.specs.split(","):
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(bench(name, args.B, args.T, args.reps))
    mem = memory_row(args.B, args.memory_T) if args.memory_T else None
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scan_cpu.json").write_text(json.dumps({"machine": machine, "rows": rows, "memory": mem}, indent=2))
    lines = [f"Machine: {machine['processor']}, {machine['platform']}, torch {machine['torch']}, "
             f"{machine['threads']} threads. B={args.B}, T={args.T}, float32, forward, median of {args.reps}; "
             f"scan vs peer: medians of {2 * args.reps + 1} calls of each, alternating.",
             "", "| spec | plan | sequential ms | scan ms | scan vs sequential | hoisted ms | ceiling "
             "| peer | peer ms | scan vs peer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['spec']} | {r.get('plan', '')} | – | – | {r.get('status')} | | | | | |")
            continue
        ceiling = f"{r['ceiling']:.1f}×" if r["ceiling"] < 1000 else "> 1000×"
        hoisted = f"{r['hoisted_ms']:.{1 if r['hoisted_ms'] >= 1 else 2}f}"
        peer = r.get("peer", r.get("peer_status", "–"))
        pms = f"{r['peer_ms'][0]:.1f}" if "peer_ms" in r else "–"
        ratio = f"{r['scan_vs_peer']:.2f}×" if "scan_vs_peer" in r else "–"
        lines.append(f"| {r['spec']} | {r['plan']} | {r['sequential_ms'][0]:.1f} | {r['scan_ms'][0]:.1f} | "
                     f"{r['scan_vs_sequential']:.1f}× | {hoisted} | {ceiling} | {peer} | {pms} | {ratio} |")
    if mem:
        if mem["status"] == "ok":
            lines += ["", f"Memory: gla (H=4, K=V=64) at B={mem['B']}, T={mem['T']} forward on the scan "
                      f"backend peaks at {mem['peak_rss_bytes'] / 2**30:.2f} GiB RSS "
                      f"(inputs and output alone are {mem['inputs_outputs_bytes'] / 2**30:.2f} GiB): "
                      f"{'within' if mem['within_4GiB'] else 'OVER'} 4 GiB."]
        else:
            lines += ["", f"Memory run failed: {mem.get('stderr', '')[-300:]}"]
    text = "\n".join(lines) + "\n"
    (OUT / "scan_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
