"""The `rnnc` command line. Errors print as FILE:LINE:COL: error: MESSAGE, never as tracebacks."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import RnncError


def parse_dims(text: str | None) -> dict:
    """'H=4,K=8' -> {'H': 4, 'K': 8}."""
    dims = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip().isdigit() or int(value) < 1:
            raise RnncError(f"--dims expects NAME=POSITIVE_INT pairs separated by commas, got {item!r}")
        dims[key.strip()] = int(value)
    return dims


def _shape(shape, dims) -> str:
    from .interpret import concrete
    from .ir import shape_str
    text = shape_str(shape)
    if dims and all(s.free_symbols <= {x for x in s.free_symbols if x.name in dims} for s in shape):
        text += "=" + str(list(concrete(shape, dims))).replace(" ", "")
    return text


def describe(rec, dims: dict) -> dict:
    """The machine-readable summary of one recurrence (the `--json` record)."""
    from .ir import shape_str
    from . import analysis
    facts = analysis.analyse(rec)
    return {
        "name": rec.name,
        "file": rec.filename,
        "dims": list(rec.dims),
        "inputs": [{"name": d.name, "shape": [str(s) for s in d.shape]} for d in rec.inputs],
        "params": [{"name": d.name, "shape": [str(s) for s in d.shape], "init": d.init.kind,
                    "init_args": list(d.init.args)} for d in rec.params],
        "states": [{"name": s.name, "shape": [str(x) for x in s.shape], "init": s.init}
                   for s in rec.states],
        "outputs": [{"name": o.name, "shape": [str(s) for s in o.shape]} for o in rec.outputs],
        "hoisted": list(facts.hoisted_names),
        "associative": facts.associative,
        "plan": facts.plan,
        "plan_reason": facts.plan_reason,
        "strata": list(facts.strata),
        "analysis": [_state_json(f) for f in facts.states],
        "_facts": facts,
        "_text": {
            "inputs": ", ".join(d.name + _shape(d.shape, dims) for d in rec.inputs) or "(none)",
            "params": ", ".join(d.name + _shape(d.shape, dims) for d in rec.params) or "(none)",
            "states": ", ".join(f"{s.name}{_shape(s.shape, dims)} = {s.init:g}" for s in rec.states) or "(none)",
            "outputs": ", ".join(o.name + _shape(o.shape, dims) for o in rec.outputs),
            "shape_str": shape_str,
        },
    }


def _state_json(f) -> dict:
    t = f.transition
    trans = {"kind": t.kind, "varies_over": list(t.varies_over), "data_dependent": t.data_dependent}
    if t.mixed_axes:
        trans["mixed_axes"] = list(t.mixed_axes)
    if t.rank:
        trans["rank"] = t.rank
    out = {"name": f.name, "shape": list(f.shape), "update": f.update, "transition": trans,
           "rescaled_by": f.rescaled_by, "input": f.input, "method": f.method,
           "depends_on": list(f.depends_on)}
    if f.reason:
        out["reason"] = f.reason
        if f.where is not None:
            out["line"], out["col"] = f.where.line, f.where.col
    return out


def _state_line(f, associative: bool, plan: str) -> str:
    t = f.transition
    parts = [f"{f.name}[{','.join(f.shape)}]: {f.update}"]
    if f.update == "nonlinear":
        parts.append(f.reason or "")
    else:
        desc = f"transition {t.kind.replace('_', ' ')}"
        if t.varies_over:
            desc += f" over [{','.join(t.varies_over)}]"
        if t.mixed_axes:
            desc += f", mixing [{','.join(t.mixed_axes)}]"
        if t.rank:
            desc += f", rank {t.rank}"
        desc += ", data-dependent" if t.data_dependent else ", fixed"
        parts.append(desc)
        if f.input and f.input != "none":
            parts.append(f"input {f.input}")
        if f.rescaled_by:
            parts.append(f"affine after rescaling by exp({f.rescaled_by})")
        if f.depends_on:
            parts.append(f"reads {', '.join(f.depends_on)} (solved first)")
        parts.append("associative" if associative else "not associative")
        parts.append(f"method {f.method}")
    return "; ".join(parts)


def cmd_check(args) -> int:
    from . import check, parse
    dims = parse_dims(args.dims)
    records, failed = [], False
    for path in args.files:
        try:
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise RnncError(f"cannot read the file: {e.strerror if isinstance(e, OSError) else e}",
                                filename=path) from None
            recs = check.check(parse.parse(source, path))
            for rec in recs:
                unknown = [k for k in dims if k not in rec.dims]
                if unknown and len(args.files) == 1 and len(recs) == 1:
                    raise RnncError(f"unknown dim {unknown[0]!r} (rnn {rec.name} has dims: "
                                    f"{', '.join(rec.dims) or 'none'})", filename=path)
                records.append(describe(rec, dims))
        except RnncError as err:
            print(err, file=sys.stderr)
            failed = True
    if args.json:
        out = []
        for r in records:
            rec = {k: v for k, v in r.items() if not k.startswith("_") and k != "analysis"}
            # The declared states, merged with what the analysis found about each.
            rec["states"] = [{**s, **a} for s, a in zip(r["states"], r["analysis"])]
            out.append(rec)
        print(json.dumps({"recurrences": out}, indent=2))
    else:
        for r in records:
            t = r["_text"]
            print(f"{r['file']}: rnn {r['name']}")
            print(f"  inputs:  {t['inputs']}")
            print(f"  params:  {t['params']}")
            print(f"  states:  {t['states']}")
            print(f"  outputs: {t['outputs']}")
            print(f"  hoisted: {', '.join(r['hoisted']) or '(no whole statement)'}")
            for f in r["_facts"].states:
                print(f"  {_state_line(f, r['associative'], r['plan'])}")
            print(f"  plan:    {r['plan']} ({r['plan_reason']})")
    return 1 if failed else 0


def cmd_graph(args) -> int:
    from . import graph
    rec = _load_one(args.file, args.name)
    text = graph.to_dot(rec)
    out = args.output
    if out is None or out.endswith(".dot"):
        if out is None:
            print(text)
        else:
            with open(out, "w") as f:
                f.write(text)
        return 0
    fmt = out.rsplit(".", 1)[-1]
    if fmt not in ("svg", "png", "pdf"):
        raise RnncError(f"-o must end in .dot, .svg, .png or .pdf, got {out}")
    graph.render(text, out, fmt)
    return 0


def _int_list(text: str | None, flag: str) -> list | None:
    """'256,1024' -> [256, 1024]."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() and int(t) > 0 for t in items):
        raise RnncError(f"{flag} expects positive integers separated by commas, got {text!r}",
                        filename="rnnc bench")
    return [int(t) for t in items]


def _dists(text: str | None) -> dict:
    """'g=logdecay,k=unit' -> {'g': 'logdecay', 'k': 'unit'}."""
    out = {}
    for item in (text or "").split(","):
        if item.strip():
            key, eq, value = item.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise RnncError(f"--dist expects NAME=KIND pairs separated by commas, got {item.strip()!r}",
                                filename="rnnc bench")
            out[key.strip()] = value.strip()
    return out


def cmd_bench(args) -> int:
    from . import bench
    if not os.path.exists(args.file):
        raise RnncError(f"no such file: {args.file}", filename=bench.WHO)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RnncError("--plot needs matplotlib (pip install matplotlib)", filename=bench.WHO) from None
    for flag, out in (("--json", args.json), ("--plot", args.plot)):  # fail before the run, not after
        if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise RnncError(f"{flag} {out}: no such directory", filename=bench.WHO)
    kwargs = dict(name=args.name, dims=parse_dims(args.dims), B=args.B, T=_int_list(args.T, "--T"),
                  dtype=args.dtype, device=args.device, backends=args.backend,
                  backward=args.backward, peers=args.peers, reps=args.reps, warmup=args.warmup,
                  dists=_dists(args.dist), seed=args.seed)
    progress = None
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        console = Console(stderr=True)
        if console.is_terminal:
            progress = Progress(TextColumn("{task.description:<40}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                console=console, transient=True)
    except ImportError:
        pass
    if progress is None:
        records = bench.run_bench(args.file, **kwargs)
    else:
        with progress:
            task = progress.add_task("starting", total=None)

            def report(done, total, desc):
                progress.update(task, completed=done, total=total, description=desc)
            records = bench.run_bench(args.file, progress=report, **kwargs)
    bench.render_table(records)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=2)
                f.write("\n")
        except OSError as e:
            raise RnncError(f"cannot write {args.json}: {e.strerror or e}", filename=bench.WHO) from None
    if args.plot:
        bench.save_plot(records, args.plot)
    failed = sorted({r["backend"] for r in records if r["kind"] == "rnnc" and r["status"] == "failed"})
    if failed:
        print(f"rnnc bench: backend{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed "
              "(not timed; see above)", file=sys.stderr)
        return 1
    return 0


def cmd_compile(args) -> int:
    dims = parse_dims(args.dims)
    if args.emit:
        if args.backend not in (None, "triton"):
            print(RnncError("--emit shows generated Triton source; use --backend triton",
                            filename="rnnc compile"), file=sys.stderr)
            return 2
        sys.stdout.write(_emit_triton(args.file, args.name, dims))
        return 0
    from .compiler import compile as compile_spec
    if not os.path.isfile(args.file):
        raise RnncError("no such file", filename=args.file)
    try:
        module = compile_spec(args.file, name=args.name, backend=args.backend or "auto", **dims)
    except ImportError as e:  # a registered backend whose dependencies are missing
        raise RnncError(f"backend {args.backend!r} cannot be loaded: {e}", filename=args.file) from None
    count = sum(p.numel() for p in module.parameters())
    rec = module.recurrence
    given = ", ".join(f"{k}={v}" for k, v in dims.items())
    print(f"{rec.filename}: rnn {rec.name}" + (f" ({given})" if given else ""))
    print(f"  plan:    {module.plan.kind} ({module.plan.reason})")
    print(f"  backend: {module.backend}")
    print(f"  params:  {count:,} in {len(rec.params)} tensor{'s' if len(rec.params) != 1 else ''}")
    return 0


def _emit_triton(path, name, dims) -> str:
    """The Triton backend's generated source for one recurrence (`rnnc compile --emit`)."""
    from . import analysis, backends
    from .compiler import check_dims
    rec = _load_one(path, name)
    try:
        check_dims(rec, dims)
        facts = analysis.analyse(rec)
        # Only emit: no `unsupported` check, which may ask for a GPU that printing does not need.
        if "triton" not in backends.AVAILABLE:
            raise RnncError("unknown backend 'triton' (available: auto, "
                            f"{', '.join(backends.AVAILABLE)}); --emit needs the triton backend")
        text = backends.get("triton").emit(rec, facts)
    except RnncError as err:
        raise err.located(rec.source, rec.filename) from None
    except ImportError as e:
        raise RnncError(f"backend 'triton' cannot be loaded: {e}", filename=rec.filename) from None
    return text if text.endswith("\n") else text + "\n"


def _load_one(path, name):
    from .compiler import load
    if not os.path.isfile(path):  # a CLI argument is always a path, never spec text
        raise RnncError("no such file", filename=path)
    return load(path, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnc", description="A compiler for recurrent neural architectures.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="parse and check specs; print what each recurrence declares")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--dims", help="sizes, e.g. H=4,K=8 (shown next to the symbolic shapes)")
    c.add_argument("--json", action="store_true", help="print machine-readable JSON")
    c.set_defaults(run=cmd_check)
    g = sub.add_parser("graph", help="draw the IR: hoisted work and the recurrent core apart")
    g.add_argument("file", metavar="FILE")
    g.add_argument("--name", help="which rnn block, when the file has several")
    g.add_argument("-o", "--output", help="out.dot (default: print DOT), or .svg/.png/.pdf via graphviz")
    g.set_defaults(run=cmd_graph)
    m = sub.add_parser("compile", help="compile a spec and summarise the result, or print "
                       "the generated Triton source (--emit)",
                       description="Compile one rnn block as rnnc.compile would and print its "
                       "plan, the backend chosen and the parameter count. With --emit, print the "
                       "Python+Triton source the triton backend generates for it instead. Exit "
                       "code 1 on spec or compile errors, 2 on misused options.")
    m.add_argument("file", metavar="FILE")
    m.add_argument("--name", help="which rnn block, when the file has several")
    m.add_argument("--backend", choices=["auto", "sequential", "scan", "triton", "newton"], default=None,
                   help="default: auto, or triton with --emit")
    m.add_argument("--dims", help="sizes, e.g. H=4,K=8 (dims used by params are required)")
    m.add_argument("--emit", action="store_true",
                   help="print the generated Triton source (only with --backend triton)")
    m.set_defaults(run=cmd_compile)
    b = sub.add_parser("bench", help="check every backend against the reference, then time it",
                       description="Check each backend (and, with --peers, known external "
                       "implementations) against the sequential reference, then time it over T. "
                       "A backend that disagrees is reported as failed and never timed. Exit code "
                       "1 when an rnnc backend failed.")
    b.add_argument("file", metavar="FILE")
    b.add_argument("--name", help="which rnn block, when the file has several")
    b.add_argument("--dims", help="sizes, e.g. H=4,K=64 (default per dim name: H=4 heads or 256 "
                   "hidden, K=V=64, D=256, N=16, P=64, others 32)")
    b.add_argument("--B", type=int, default=None, help="batch size (default 4)")
    b.add_argument("--T", default=None, help="sequence lengths, e.g. 256,1024 (default 256,1024 on "
                   "CPU, 256,1024,4096 on CUDA)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    b.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    b.add_argument("--backend", default="all",
                   help="all, or a comma-separated list of backends (sequential, scan, ...)")
    b.add_argument("--backward", action="store_true", help="also time forward+backward")
    b.add_argument("--peers", action="store_true",
                   help="also time installed peers (torch.nn, fla, mamba-ssm, accelerated-scan)")
    b.add_argument("--json", metavar="OUT.json", help="write one record per measurement")
    b.add_argument("--plot", metavar="OUT.png", help="log-log plot of time against T (matplotlib)")
    b.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: adaptive, 3-10 on CPU, 10-100 on CUDA)")
    b.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 1 CPU, 3 CUDA)")
    b.add_argument("--dist", default=None, help="input distributions, e.g. g=logdecay,k=unit "
                   "(kinds: normal, unit, gate, logdecay, positive; default: read off the spec)")
    b.add_argument("--seed", type=int, default=0, help="seed for params and inputs (default 0)")
    b.set_defaults(run=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RnncError as err:
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `rnnc check ... | head` closed the pipe early
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # never a traceback for users; RNNC_DEBUG=1 shows it
        if os.environ.get("RNNC_DEBUG"):
            raise
        print(f"rnnc: internal error: {type(e).__name__}: {e} (set RNNC_DEBUG=1 for details)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
