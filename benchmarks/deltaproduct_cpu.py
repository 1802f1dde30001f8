"""Gated DeltaProduct on the CPU: the scan backend against sequential, timed in one run.

    python benchmarks/deltaproduct_cpu.py [--T 256,1024] [--reps 7]

B = 4, H = 4, K = V = 64, float32 (L2-normalised keys, strengths in (0, 1), a decay in
(0.9, 1)). The two backends are timed alternately, call for call; each figure is the best of
`reps` forward calls (without autograd) and of reps // 2 + 1 forward+backward calls. The
outputs are first checked to agree. Prints one line per T.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rnnc

SPEC = Path(__file__).resolve().parent.parent / "examples" / "gated_deltaproduct.rnn"
B, H, K, V = 4, 4, 64, 64


def inputs(T: int, g: torch.Generator) -> list:
    r = lambda *s: torch.randn(B, T, H, *s, generator=g)  # noqa: E731
    u = lambda: torch.rand(B, T, H, generator=g)           # noqa: E731
    return [r(K), F.normalize(r(K), dim=-1), r(V), u(), F.normalize(r(K), dim=-1), r(V), u(),
            0.9 + 0.1 * u()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="256,1024")
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    mods = {b: rnnc.compile(str(SPEC), backend=b, H=H, K=K, V=V) for b in ("sequential", "scan")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for T in (int(t) for t in a.T.split(",")):
        x = inputs(T, g)
        with torch.no_grad():
            want, got = mods["sequential"](*x), mods["scan"](*x)
        assert (got - want).abs().max() <= 1e-3 * want.abs().max(), "scan and sequential disagree"
        xg = [t.clone().requires_grad_() for t in x]
        fwd = {b: [] for b in mods}
        both = {b: [] for b in mods}
        for rep in range(a.reps):
            for b, m in mods.items():
                with torch.no_grad():
                    t0 = time.perf_counter()
                    m(*x)
                    fwd[b].append(time.perf_counter() - t0)
                if rep <= a.reps // 2:
                    t0 = time.perf_counter()
                    m(*xg).sum().backward()
                    both[b].append(time.perf_counter() - t0)
        ms = {k: {b: 1e3 * min(v[b]) for b in mods} for k, v in (("fwd", fwd), ("fwd+bwd", both))}
        print(f"T={T}: " + "; ".join(
            f"{k} sequential {v['sequential']:.0f} ms, scan {v['scan']:.0f} ms "
            f"({v['sequential'] / v['scan']:.2f}x)" for k, v in ms.items()))


if __name__ == "__main__":
    main()
