"""Full-size correctness of the Triton backend on a CUDA GPU (CI has none; run it by hand).

For every example: outputs, final states and gradients (inputs, params, initial state) of
the fp32 Triton kernels against the float64 sequential backend on the same GPU, judged
relative to the float32 sequential backend's own error; plus bf16 inputs (computed in fp32)
against the float64 reference. Writes a markdown table.

    python benchmarks/triton_check.py [--T 512] [--B 4] [--out benchmarks/results/triton_check.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import rnnc  # noqa: E402
from cases import CASES, run_case  # noqa: E402

FULL = {"s6": {"D": 256, "N": 16}, "s4d": {"D": 256, "N": 16}}


def full_dims(case):
    if case.name in FULL:
        return {**case.dims, **FULL[case.name]}
    return {k: 64 for k in case.dims}


def rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--cases", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/triton_check.md"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    dev = torch.device("cuda")
    rows, worst = [], 0.0
    for case in CASES:
        if a.cases and case.name not in a.cases.split(","):
            continue
        case = dataclasses.replace(case, dims=full_dims(case))
        t0 = time.time()
        try:
            for grad in (False, True):
                ref = run_case(case, "sequential", torch.float64, a.B, a.T, grad, dev)
                s32 = run_case(case, "sequential", torch.float32, a.B, a.T, grad, dev)
                tri = run_case(case, "triton", torch.float32, a.B, a.T, grad, dev)
                bf = None if grad else run_case(case, "triton", torch.float32, a.B, a.T, False, dev, torch.bfloat16)
                for k in ref:
                    if not torch.isfinite(ref[k]).all():
                        continue
                    e_s, e_t = rel(s32[k], ref[k]), rel(tri[k], ref[k])
                    ratio = e_t / max(e_s, 1e-12)
                    worst = max(worst, ratio if e_t > 1e-6 else 0)
                    rows.append((case.name, "bwd" if grad else "fwd", k, e_s, e_t, ratio,
                                 bool(torch.isfinite(tri[k]).all())))
                if bf is not None:
                    for k in ref:
                        rows.append((case.name, "fwd bf16 in", k, float("nan"), rel(bf[k], ref[k]),
                                     float("nan"), bool(torch.isfinite(bf[k]).all())))
            print(f"{case.name}: ok ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # keep going: one broken example must not hide the others
            print(f"{case.name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            rows.append((case.name, "error", type(e).__name__, float("nan"), float("nan"), float("nan"), False))
    lines = [f"# Triton backend correctness on {torch.cuda.get_device_name()}",
             "", f"B={a.B}, T={a.T}; relative max error vs the float64 sequential backend.", "",
             "| example | pass | value | seq fp32 err | triton err | ratio | finite |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{x:.2e}" if isinstance(x, float) else str(x) for x in r) + " |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    bad = [r for r in rows if r[1] == "error" or (r[1] != "fwd bf16 in" and r[5] > 50 and r[4] > 1e-5) or not r[6]]
    print(f"{len(rows)} values checked; {len(bad)} bad; worst fp32 error ratio {worst:.1f}")
    for r in bad:
        print("BAD", r)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
