"""Numerics report (issue 9): how far each backend is from a float64 reference.

    python benchmarks/numerics.py                      # the full report -> benchmarks/numerics.md
    python benchmarks/numerics.py --quick              # small T everywhere, to check that it runs
    python benchmarks/numerics.py --T 1024 --long-T 8192 --extreme-T 1024 --out /tmp/n.md
    python benchmarks/numerics.py --only gla,s6 --device cuda --dtypes float32,bfloat16

For every example (tests/cases.py: small dims, the input distributions and random params)
and every backend that can run it (`sequential`, `scan`, and `triton` on CUDA):

1. **Accuracy.** max |y - y_ref| / max |y_ref| over all outputs and steps (the norm-wise
   relative error, as `rnnc bench` uses), at B=2, T=4096, against the sequential backend in
   float64 on the same inputs and params. The backend runs with its params and inputs cast to
   the tested dtype (float32; bfloat16 too on CUDA).
2. **Extreme gates**: every normal-distributed input times 100, for every example; and for the
   associative examples the log decay scaled by 30 (decays near 0) and by 1e-6 (decays near 1). How the log
   decay is scaled depends on the example (`DECAY`): log-decay inputs are multiplied; a gate
   a in (0, 1) becomes a**s; dt (which multiplies the log decay) is multiplied; an
   exp(log_dt) param gets log(s) added; mLSTM's forget-gate pre-activation is mapped so that
   sigmoid(fg) becomes sigmoid(fg)**s; RG-LRU's lam is set to +20 / -30. minGRU and minLSTM
   compute their gates from x and params: only the large-input row applies.
3. **Long sequences**: T=65536 at B=1 for every example, on every backend that runs it (the
   sequential float32 backend too, for the 10x rule), against sequential float64.

Reported as problems (**FLAG**): NaN or inf in a backend's output where the reference is
finite, and a backend more than 10x worse than the sequential float32 backend on the same
inputs (the denominator floored at float32's epsilon, 1.19e-7).

Writes a markdown report (with the machine it ran on) and, with --json, the raw records.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import rnnc  # noqa: E402
import rnnc.backends  # noqa: E402,F401
from cases import CASES, load_params, make_inputs, make_params  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
WORSE = 10.0
LARGE = 1e-3  # listed in the summary
LONG_DEFAULT = tuple(c.name for c in CASES)  # every example

# How to scale the log decay of each associative example by s (see the module docstring).
# (where, name, how): where is "input" or "param".
DECAY = {
    "hgrn": ("input", "g", "log"), "gla": ("input", "g", "log"), "rwkv6": ("input", "w", "log"),
    "s6": ("input", "dt", "log"), "mamba2": ("input", "dt", "log"),
    "s4d": ("param", "log_dt", "logexp"), "retnet": ("param", "gamma", "gate"),
    "gated_deltanet": ("input", "alpha", "gate"), "mlstm": ("input", "fg", "logsigmoid"),
    "rglru": ("param", "lam", "rglru"),
}
NO_DECAY = {"deltanet": "no decay (identity plus rank-1 transition)",
            "mingru": "gates computed from x and params", "minlstm": "gates computed from x and params"}


def _scale_log_decay(t: torch.Tensor, how: str, s: float) -> torch.Tensor:
    if how == "log":
        return t * s
    if how == "gate":  # a = exp(log a) -> exp(s log a)
        return torch.exp(s * torch.log(t))
    if how == "logexp":  # dt = exp(log_dt) multiplies the log decay
        return t + math.log(s)
    if how == "logsigmoid":  # decay sigmoid(fg) -> sigmoid(fg)**s, back to a pre-activation
        la = s * F.logsigmoid(t)
        return la - torch.log(-torch.expm1(la))
    if how == "rglru":  # log a = -8 r softplus(-lam): lam=+20 -> a near 1; lam=-30 -> a near 0
        return torch.full_like(t, 20.0 if s < 1 else -30.0)
    raise ValueError(how)


def scenario(case, name: str, inputs: list, params: dict):
    """(inputs, params) of a scenario, or None when it does not apply; plus a note."""
    if name == "normal":
        return inputs, params, ""
    if name == "large inputs x100":
        names = list(case.inputs)
        out = [x * 100 if case.inputs[n] == "normal" else x for n, x in zip(names, inputs)]
        which = [n for n in names if case.inputs[n] == "normal"]
        return (out, params, "x100: " + ", ".join(which)) if which else None
    if case.name not in DECAY:
        return None
    s = {"decay near 0 (log x30)": 30.0, "decay near 1 (log x1e-6)": 1e-6}[name]
    where, key, how = DECAY[case.name]
    if where == "input":
        names = list(case.inputs)
        k = names.index(key)
        out = list(inputs)
        out[k] = _scale_log_decay(inputs[k], how, s)
        return out, params, f"{key}: {how} x{s:g}"
    out = dict(params)
    out[key] = _scale_log_decay(params[key], how, s)
    return inputs, out, f"param {key}: {how} x{s:g}"


# --- running ----------------------------------------------------------------------------------------
_MODULES: dict = {}


def module(case, backend: str, dtype, device):
    key = (case.name, backend, dtype, device)
    if key not in _MODULES:
        m = rnnc.compile(str(case.path), backend=backend, **case.dims)
        _MODULES[key] = m.to(device=device, dtype=dtype)
    return _MODULES[key]


def run(case, backend, dtype, device, inputs, params):
    m = module(case, backend, dtype, device)
    load_params(m, {k: v.to(device=device, dtype=dtype) for k, v in params.items()})
    with torch.no_grad():
        out = m(*[x.to(device=device, dtype=dtype) for x in inputs])
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.detach().to("cpu", torch.float64) for o in out)


def compare(got, ref) -> dict:
    """Norm-wise relative error over the positions where the reference is finite."""
    num, den, bad, ref_bad = 0.0, 0.0, 0, 0
    for g, r in zip(got, ref):
        fin = torch.isfinite(r)
        ref_bad += int((~fin).sum())
        bad += int((fin & ~torch.isfinite(g)).sum())
        ok = fin & torch.isfinite(g)
        if ok.any():
            num = max(num, float((g[ok] - r[ok]).abs().max()))
            den = max(den, float(r[fin].abs().max()))
    return {"rel_err": num / den if den > 0 else num, "nonfinite": bad, "ref_nonfinite": ref_bad}


def support(case, backend) -> str | None:
    try:
        rnnc.compile(str(case.path), backend=backend, **case.dims)
    except rnnc.RnncError as e:
        return e.message.split(":")[0] if ":" in e.message else e.message
    return None


def measure(case, scen, B, T, dtypes, backends, device, seed, section) -> list:
    """Records for one example and scenario: the float64 reference once, then every
    backend x dtype on the same (rounded) values."""
    inputs = make_inputs(case, B, T, torch.float64, seed=seed)
    params = make_params(case, torch.float64)
    s = scenario(case, scen, inputs, params)
    if s is None:
        return []
    inputs, params, note = s
    t0 = time.perf_counter()
    ref = run(case, "sequential", torch.float64, "cpu", inputs, params)
    t_ref = time.perf_counter() - t0
    recs = []
    for dtype in dtypes:
        for backend in backends:
            rec = {"section": section, "example": case.name, "scenario": scen, "note": note,
                   "backend": backend, "dtype": str(dtype).replace("torch.", ""), "B": B, "T": T,
                   "ref_seconds": round(t_ref, 2)}
            why = support(case, backend)
            if why is not None:
                rec["status"] = "n/a"
                rec["why"] = why
                recs.append(rec)
                continue
            t0 = time.perf_counter()
            try:
                got = run(case, backend, dtype, device, inputs, params)
            except rnnc.RnncError as e:
                rec.update(status="refused", why=e.message[:160])
                recs.append(rec)
                continue
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                rec.update(status="crashed", why=f"{type(e).__name__}: {str(e)[:160]}")
                recs.append(rec)
                continue
            rec.update(status="ok", seconds=round(time.perf_counter() - t0, 2), **compare(got, ref))
            recs.append(rec)
    _flag(recs)
    return recs


def _flag(recs):
    """FLAG: non-finite where the reference is finite; > 10x the sequential float32 error."""
    by = {(r["dtype"], r["backend"]): r for r in recs if r.get("status") == "ok"}
    for r in recs:
        flags = []
        if r.get("status") == "crashed":
            flags.append("crashed")
        if r.get("status") == "ok":
            if r["nonfinite"]:
                flags.append(f"{r['nonfinite']} NaN/inf where the reference is finite")
            seq = by.get(("float32", "sequential"))
            if r["backend"] != "sequential" and seq is not None:
                base = max(seq["rel_err"], EPS32)
                r["vs_seq32"] = r["rel_err"] / base
                if r["dtype"] == "float32" and r["rel_err"] > WORSE * base:
                    flags.append(f"{r['vs_seq32']:.0f}x the sequential float32 error")
        r["flags"] = flags


# --- the report ----------------------------------------------------------------------------------------
def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}")
    if device == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return text


def _fmt(x) -> str:
    if x is None:
        return ""
    if x == 0:
        return "0"
    return f"{x:.2e}"


def _cell(r) -> str:
    if r is None:
        return ""
    if r["status"] == "n/a":
        return "n/a"
    if r["status"] != "ok":
        return f"{r['status']}: {r['why'][:60]}"
    text = _fmt(r["rel_err"])
    if r["nonfinite"]:
        text += f" ({r['nonfinite']} NaN/inf)"
    if r.get("flags"):
        text = f"**{text} FLAG**"
    return text


def _table(recs, scen_col: bool, dtypes, backends) -> list:
    cols = [(d, b) for d in dtypes for b in backends]
    head = ["example"] + (["scenario"] if scen_col else []) + [f"{b} {d}" for d, b in cols]
    if any(b != "sequential" for _, b in cols):
        head.append("scan / seq f32")
    head.append("notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {}
    for r in recs:
        groups.setdefault((r["example"], r["scenario"], r["T"]), []).append(r)
    for (ex, scen, T), rs in groups.items():
        cell = {(r["dtype"], r["backend"]): r for r in rs}
        row = [ex] + ([scen] if scen_col else [])
        row += [_cell(cell.get((d.replace("torch.", ""), b))) for d, b in cols]
        if any(b != "sequential" for _, b in cols):
            scan = cell.get(("float32", "scan"))
            row.append(f"{scan['vs_seq32']:.2g}x" if scan and "vs_seq32" in scan else "")
        notes = sorted({r["note"] for r in rs if r.get("note")})
        notes += sorted({f"{r['backend']} {r['dtype']}: {f}" for r in rs for f in r.get("flags", [])})
        na = sorted({f"{r['backend']}: {r['why']}" for r in rs if r["status"] == "n/a"})
        if rs[0].get("ref_nonfinite"):
            notes.append(f"reference has {rs[0]['ref_nonfinite']} NaN/inf")
        row.append("; ".join(notes + [n[:90] for n in na]))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def report(recs, args, machine_text, seconds) -> str:
    dtypes = [d for d in args.dtypes.split(",")]
    backends = args.backends
    flags = [r for r in recs if r.get("flags")]
    out = ["# Numerics report", "",
           f"Generated by `{' '.join(['python benchmarks/numerics.py', *sys.argv[1:]])}` on "
           f"{datetime.date.today().isoformat()} in {seconds / 60:.1f} min.", "",
           f"Machine: {machine_text}; device: {args.device}.", "",
           "Error = max |y - y_ref| / max |y_ref| over every output, step and batch row, "
           "against the sequential backend in float64 on the same inputs and params (rounded "
           "to the tested dtype). NaN/inf = positions where the backend is not finite but the "
           "reference is. **FLAG** = NaN/inf where the reference is finite, or more than 10x "
           "the sequential float32 error (floored at 1.19e-7). `scan / seq f32` = the scan "
           "backend's float32 error over the sequential backend's.", ""]
    out += [f"**{len(flags)} flagged**" + (": " + "; ".join(
        f"{r['example']} {r['scenario']} T={r['T']} {r['backend']} {r['dtype']}: {', '.join(r['flags'])}"
        for r in flags) if flags else "."), ""]
    large = {}
    for r in recs:
        if r.get("status") == "ok" and r["rel_err"] > LARGE:
            large.setdefault((r["example"], r["scenario"], r["T"]), []).append(r)
    if large:
        out += [f"Errors above {LARGE:g} (not flagged when every backend shares them: then the "
                "spec's own formulation loses the precision, not a backend):", ""]
        for (ex, scen, T), rs in large.items():
            errs = ", ".join(f"{r['backend']} {r['dtype']} {r['rel_err']:.2g}" for r in rs)
            out.append(f"- {ex}, {scen}, T={T}: {errs}")
        out.append("")
    sec = lambda name: [r for r in recs if r["section"] == name]  # noqa: E731
    out += [f"## Accuracy at T={args.T}, B={args.B}", ""]
    out += _table(sec("accuracy"), False, dtypes, backends) + [""]
    out += [f"## Extreme gates at T={args.extreme_T}, B={args.B}", ""]
    skipped = ", ".join(f"{k} ({v})" for k, v in NO_DECAY.items())
    out += [f"Decay rows apply to the associative examples except: {skipped}.", ""]
    out += _table(sec("extreme"), True, dtypes, backends) + [""]
    out += [f"## Long sequences: T={args.long_T}, B=1", ""]
    out += _table(sec("long"), False, dtypes, backends) + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=4096, help="sequence length of the accuracy table")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--extreme-T", type=int, default=4096, help="sequence length of the extreme-gate rows")
    p.add_argument("--long-T", type=int, default=65536)
    p.add_argument("--long", default=",".join(LONG_DEFAULT), help="examples for the long-T table")
    p.add_argument("--long-seq32", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the sequential float32 backend at the long T (for the 10x rule)")
    p.add_argument("--only", default=None, help="comma-separated examples (default: all)")
    p.add_argument("--dtypes", default=None, help="default: float32 on CPU, float32,bfloat16 on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="T=256, extreme T=256, long T=2048")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "numerics.md"))
    p.add_argument("--json", default=None, help="also write the records here")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.extreme_T, args.long_T = 256, 256, 2048
    if args.dtypes is None:
        args.dtypes = "float32,bfloat16" if args.device == "cuda" else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    wanted = ("sequential", "scan") + (("triton",) if args.device == "cuda" else ())
    args.backends = [b for b in wanted if b in rnnc.backends.AVAILABLE]
    only = set(args.only.split(",")) if args.only else None
    cases = [c for c in CASES if only is None or c.name in only]
    t0 = time.perf_counter()
    recs = []

    def progress(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    for c in cases:
        progress(f"accuracy {c.name} T={args.T}")
        recs += measure(c, "normal", args.B, args.T, dtypes, args.backends, args.device, args.seed, "accuracy")
    for c in cases:  # decays only where the plan has one to scale; large inputs everywhere
        decays = ("decay near 0 (log x30)", "decay near 1 (log x1e-6)") if support(c, "scan") is None else ()
        for scen in decays + ("large inputs x100",):
            progress(f"extreme {c.name}: {scen}")
            recs += measure(c, scen, args.B, args.extreme_T, dtypes, args.backends, args.device,
                            args.seed, "extreme")
    long_backends = args.backends if args.long_seq32 else [b for b in args.backends if b != "sequential"]
    for name in args.long.split(","):
        c = next((c for c in cases if c.name == name), None)
        if c is None:
            continue
        progress(f"long {c.name} T={args.long_T}")
        recs += measure(c, "normal", 1, args.long_T, [torch.float32], long_backends, args.device,
                        args.seed, "long")
    seconds = time.perf_counter() - t0
    text = report(recs, args, machine(args.device), seconds)
    Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1) + "\n")
    print(text)
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
