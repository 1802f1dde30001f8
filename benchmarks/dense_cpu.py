"""A dense linear recurrence on the CPU: the scan backend against sequential, timed in one run.

    python benchmarks/dense_cpu.py [--n 16,32,48,64] [--B 4,8,32] [--T 512] [--reps 5]

h = A @ h + W @ x with A [n, n] scaled to a spectral radius below 1, float32, forward without
autograd. The scan backend's plan is dense_scan: blocks scanned with scan_kernels.dense_scan,
or stepped where B n^3 passes block_solver.DENSE_CPU_WORK (printed as "stepped"). The two
backends are timed alternately, call for call, best of `reps`; the outputs are first checked
to agree. Prints one line per (n, B).
"""
from __future__ import annotations

import argparse
import time

import torch

import rnnc
from rnnc.backends import block_solver

SPEC = """rnn lin(x[D]) -> h[H] {
    param A[H,H], W[H,D]
    state h[H] = 0
    h = A @ h + W @ x
}"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="16,32,48,64")
    p.add_argument("--B", default="4,8,32")
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T = {a.T}")
    for n in (int(v) for v in a.n.split(",")):
        mods = {b: rnnc.compile(SPEC, backend=b, D=n, H=n) for b in ("sequential", "scan")}
        state = {"A": 0.9 * torch.randn(n, n, generator=g) / n ** 0.5,
                 "W": torch.randn(n, n, generator=g)}
        for m in mods.values():
            m.load_state_dict(state)
        for B in (int(v) for v in a.B.split(",")):
            x = torch.randn(B, a.T, n, generator=g)
            took = {b: [] for b in mods}
            with torch.no_grad():
                want, got = mods["sequential"](x), mods["scan"](x)
                assert (got - want).abs().max() <= 1e-4 * want.abs().max(), "scan and sequential disagree"
                for _ in range(a.reps):
                    for b, m in mods.items():
                        t0 = time.perf_counter()
                        m(x)
                        took[b].append(time.perf_counter() - t0)
            s, c = (1e3 * min(took[b]) for b in ("sequential", "scan"))
            how = "stepped" if B * n ** 3 > block_solver.DENSE_CPU_WORK else "scanned"
            print(f"n={n} B={B}: sequential {s:.1f} ms, scan {c:.1f} ms ({s / c:.2f}x, {how})")


if __name__ == "__main__":
    main()
