"""A small architecture search over recurrent transitions, built with rnnc.builder.

Each variant is a spec made in Python (no .rnn text written by hand), compiled with
backend="auto" (so every variant here runs on the parallel scan), wrapped in
rnnc.layers as   Embedding -> RecurrentLayer -> Linear readout,   and trained briefly with
Adam on two synthetic tasks:

* parity: bit strings of length 24, trained on the running parity at every position and
  scored on the parity of the whole string (chance: 50%);
* MQAR (multi-query associative recall): 12 key-value pairs (16 keys, 16 values, one token
  per pair) followed by 12 queries of those keys; the answer is the value stored with the
  key (chance: 1/16).

The variants differ in the transition of the state (and in the output gate and the state
size):

    scalar+   h[h,n] = sigmoid(a[h]) * h[h,n] + u[h,n]         one decay per head, in (0, 1)
    diag+     h[h,n] = sigmoid(a[h,n]) * h[h,n] + u[h,n]       per channel, in (0, 1)
    diag-     h[h,n] = tanh(a[h,n]) * h[h,n] + u[h,n]          per channel, in (-1, 1)
    delta1    S = alpha (I - beta k k^T) S + beta k v^T, beta = sigmoid(b)    eigenvalues in (0, 1]
    delta2    the same with beta = 2 sigmoid(b) in (0, 2)                      eigenvalues in (-1, 1]

The known result (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues") shows up: transitions whose eigenvalues are all positive stay at
chance on parity, transitions that can reach negative eigenvalues solve it. MQAR needs a
matrix state (and profits from a bigger one).

    python examples/search.py                 # full run: 12 variants x 2 tasks, a few minutes
    python examples/search.py --quick         # smoke run: 3 variants, about 20 s
    python examples/search.py --out DIR       # where the table, plot and winner go

Writes DIR/results.json, DIR/search.png (matplotlib) and DIR/winner.rnn (the best variant's
spec, `Spec.to_source()`); DIR defaults to examples/out/.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import rnnc
from rnnc import builder as rb
from rnnc import layers as L


# ----------------------------------------------------------------------------- the variants
def diagonal_spec(name: str, decay: str, signed: bool, ogate: bool) -> rb.Spec:
    """A diagonal (elementwise) recurrence over a state h[H, N].

    decay: "scalar" (one gate a[H] per head) or "channel" (a[H, N]).
    signed: the gate is tanh(a) in (-1, 1) instead of sigmoid(a) in (0, 1).
    ogate: the output is h * sigmoid(z) with z[H, N] from the input, else h.
    """
    gate_fn = "tanh" if signed else "sigmoid"
    s = rb.Spec(name, doc=f"diagonal transition: {gate_fn} gate per "
                          f"{'head' if decay == 'scalar' else 'channel'}"
                          f"{', output gate' if ogate else ''}")
    a = s.input("a", "H") if decay == "scalar" else s.input("a", "H", "N")   # gate pre-activation
    u = s.input("u", "H", "N")                                               # what is written
    z = s.input("z", "H", "N") if ogate else None                            # output gate
    h_ = s.state("h", "H", "N", init=0)
    h, n = rb.indices("h n")
    pre = a[h] if decay == "scalar" else a[h, n]
    gate = rb.tanh(pre) if signed else rb.sigmoid(pre)
    s[h_[h, n]] = gate * h_[h, n] + u[h, n]
    if ogate:
        s.output(s.let("y", h_ * rb.sigmoid(z)), "H", "N")
    else:
        s.output(h_)
    return s


def delta_spec(name: str, beta_max: int, ogate: bool = False) -> rb.Spec:
    """Gated delta rule over a matrix state S[H, K, V] (Gated DeltaNet, Yang et al. 2025).

    S = alpha (S - beta kn (kn^T S)) + beta kn v^T with kn = k / |k|, alpha = exp(logsigmoid(a)):
    the transition alpha (I - beta kn kn^T) has eigenvalues alpha and alpha (1 - beta), so
    beta in (0, 2) (beta_max = 2) allows negative ones.
    """
    s = rb.Spec(name, doc=f"gated delta rule, beta in (0, {beta_max})")
    q, k = s.input("q", "H", "K"), s.input("k", "H", "K")
    v, a, b = s.input("v", "H", "V"), s.input("a", "H"), s.input("b", "H")
    z = s.input("z", "H", "V") if ogate else None
    S = s.state("S", "H", "K", "V", init=0)
    h, i, j, c = rb.indices("h i j c")
    kn = s.local("kn", "H", "K")
    s[kn[h, i]] = k[h, i] / rb.sqrt(rb.sum(c)(k[h, c] * k[h, c]) + 1e-6)
    beta = s.let("beta", rb.sigmoid(b) if beta_max == 1 else beta_max * rb.sigmoid(b))
    alpha = s.let("alpha", rb.exp(rb.logsigmoid(a)))
    u = s.local("u", "H", "V")
    s[u[h, j]] = rb.sum(i)(kn[h, i] * S[h, i, j])
    s[S[h, i, j]] = alpha[h] * (S[h, i, j] - beta[h] * kn[h, i] * u[h, j]) + beta[h] * kn[h, i] * v[h, j]
    o = s.local("o", "H", "V")
    read = rb.sum(i)(q[h, i] * S[h, i, j])
    s[o[h, j]] = read * rb.sigmoid(z[h, j]) if ogate else read
    s.output(o)
    return s


@dataclass
class Variant:
    name: str
    family: str            # scalar+ | diag+ | diag- | delta1 | delta2
    negative: bool         # can the transition have negative eigenvalues?
    ogate: bool
    dims: dict
    spec: rb.Spec = field(repr=False, default=None)

    @property
    def state_size(self) -> int:
        return math.prod(self.dims.values())


def variants(quick: bool = False) -> list:
    H = 4
    out = []

    def diag(family, N, ogate=False):
        decay = "scalar" if family == "scalar+" else "channel"
        name = f"{family[:-1]}_{'neg' if family.endswith('-') else 'pos'}_n{N}{'_og' if ogate else ''}"
        out.append(Variant(name, family, family.endswith("-"), ogate, dict(H=H, N=N),
                           diagonal_spec(name, decay, family.endswith("-"), ogate)))

    def delta(beta_max, K):
        name = f"delta_b{beta_max}_k{K}"
        out.append(Variant(name, f"delta{beta_max}", beta_max == 2, False, dict(H=2, K=K, V=K),
                           delta_spec(name, beta_max)))

    if quick:
        diag("diag+", 4)
        diag("diag-", 4)
        delta(2, 4)
        return out
    for N in (4, 16):
        diag("scalar+", N)
    for N in (4, 16):
        diag("diag+", N)
    diag("diag+", 16, ogate=True)
    for N in (4, 16):
        diag("diag-", N)
    diag("diag-", 16, ogate=True)
    for beta_max in (1, 2):
        for K in (4, 8):
            delta(beta_max, K)
    return out


TRANSITION = {
    "scalar+": "sigmoid per head", "diag+": "sigmoid per channel", "diag-": "tanh per channel",
    "delta1": "alpha(I - beta kk^T), beta<1", "delta2": "alpha(I - beta kk^T), beta<2",
}


# ----------------------------------------------------------------------------- the tasks
@dataclass
class Task:
    name: str
    vocab: int
    classes: int
    T: int
    steps: int
    lr: float

    def batch(self, B: int, g: torch.Generator):
        raise NotImplementedError

    def score(self, logits, y) -> float:
        raise NotImplementedError


class Parity(Task):
    """Bit strings; targets are the running parity; scored on the whole string's parity."""

    def batch(self, B, g):
        x = torch.randint(0, 2, (B, self.T), generator=g)
        return x, x.cumsum(1) % 2

    def score(self, logits, y):
        return (logits[:, -1].argmax(-1) == y[:, -1]).float().mean().item()


class MQAR(Task):
    """npairs (key, value) tokens with distinct keys, then a query token for each key."""

    def __init__(self, name, keys, values, npairs, steps, lr):
        super().__init__(name, keys * values + keys, values, 2 * npairs, steps, lr)
        self.keys, self.values, self.npairs = keys, values, npairs

    def batch(self, B, g):
        keys = torch.argsort(torch.rand(B, self.keys, generator=g), -1)[:, :self.npairs]
        vals = torch.randint(0, self.values, (B, self.npairs), generator=g)
        order = torch.argsort(torch.rand(B, self.npairs, generator=g), -1)
        x = torch.cat([keys * self.values + vals, self.keys * self.values + keys.gather(1, order)], 1)
        y = torch.cat([torch.full((B, self.npairs), -100), vals.gather(1, order)], 1)
        return x, y

    def score(self, logits, y):
        m = y != -100
        return (logits.argmax(-1)[m] == y[m]).float().mean().item()


def tasks(quick: bool = False) -> list:
    if quick:
        return [Parity("parity", 2, 2, 16, 150, 3e-3), MQAR("mqar", 8, 8, 4, 120, 1e-2)]
    return [Parity("parity", 2, 2, 24, 200, 3e-3), MQAR("mqar", 16, 16, 12, 300, 1e-2)]


# ----------------------------------------------------------------------------- training
D_MODEL, BATCH, EVAL_BATCH = 32, 64, 512


def build_model(v: Variant, task: Task) -> L.Stack:
    """Embedding -> one recurrent layer (projection into the spec's inputs) -> Linear."""
    rnn = L.RecurrentLayer(v.spec, D_MODEL, backend="auto", **v.dims)
    return L.Stack([L.Embedding(task.vocab, D_MODEL), rnn, L.Linear(rnn.d_out, task.classes)])


def train(v: Variant, task: Task, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(v, task)
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    g = torch.Generator().manual_seed(seed + 1)
    seconds = 0.0
    for _ in range(task.steps):
        x, y = task.batch(BATCH, g)
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, task.classes), y.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        x, y = task.batch(EVAL_BATCH, torch.Generator().manual_seed(10_000 + seed))
        acc = task.score(model(x), y)
    return dict(acc=acc, loss=loss.item(), tokens_per_s=task.steps * BATCH * task.T / seconds,
                params=L.count_params(model), rnn_params=L.count_params(model[1]),
                backend=model[1].rnn.backend, plan=model[1].rnn.plan.kind, seconds=seconds)


# ----------------------------------------------------------------------------- reporting
def print_table(rows, task_names):
    header = ["variant", "transition", "neg. eig.", "out gate", "state", "params",
              *[f"{t} acc" for t in task_names], "tokens/s", "plan"]
    body = []
    for r in rows:
        body.append([r["name"], TRANSITION[r["family"]], "yes" if r["negative"] else "no",
                     "yes" if r["ogate"] else "no", str(r["state_size"]), str(r["params"]),
                     *[f"{r[t]['acc'] * 100:5.1f}%" for t in task_names],
                     f"{r['tokens_per_s']:,.0f}", r["plan"]])
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="rnnc architecture search")
        for h in header:
            table.add_column(h, justify="right" if h not in ("variant", "transition", "plan") else "left")
        for b in body:
            table.add_row(*b)
        Console(width=160).print(table)
    except ImportError:
        widths = [max(len(h), *(len(b[k]) for b in body)) for k, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths)))


def plot(rows, task_names, chance: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw=dict(width_ratios=[2, 1]))
    width = 0.8 / len(task_names)
    for k, t in enumerate(task_names):
        ax1.bar([i + k * width for i in range(len(rows))], [r[t]["acc"] * 100 for r in rows],
                width, label=t)
    for t, style in zip(task_names, ("--", ":")):
        ax1.axhline(chance[t], color="gray", lw=0.8, ls=style)
    ax1.set_xticks([i + width * (len(task_names) - 1) / 2 for i in range(len(rows))])
    ax1.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_ylim(0, 105)
    ax1.legend()
    ax1.set_title("accuracy per variant (gray: chance, dashed parity, dotted MQAR)")
    for r in rows:
        color = "tab:red" if r["negative"] else "tab:blue"
        ax2.scatter(r["tokens_per_s"], r[task_names[0]]["acc"] * 100, color=color)
        ax2.annotate(r["name"], (r["tokens_per_s"], r[task_names[0]]["acc"] * 100), fontsize=6)
    ax2.set_xscale("log")
    ax2.set_xlabel("training throughput (tokens/s, log)")
    ax2.set_ylabel(f"{task_names[0]} accuracy (%)")
    ax2.set_title("red: negative eigenvalues allowed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class _Progress:
    """A rich progress bar, or one line per job without rich."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            self.bar = Progress(TextColumn("{task.description:<32}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn())
            self.task = self.bar.add_task("search", total=total)
        except ImportError:
            self.bar = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, what: str):
        if self.bar is not None:
            self.bar.update(self.task, description=what)
        else:
            print(f"[{self.done + 1}/{self.total}] {what}", flush=True)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)


def _show(path: Path) -> str:
    """A path relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run (3 variants, fewer steps)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                    help="output folder (default: examples/out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    wall = time.perf_counter()
    vs, ts = variants(args.quick), tasks(args.quick)
    task_names = [t.name for t in ts]
    rows = []
    with _Progress(len(vs) * len(ts)) as prog:
        for v in vs:
            row = dict(name=v.name, family=v.family, negative=v.negative, ogate=v.ogate,
                       state_size=v.state_size, dims=v.dims)
            tok, secs = [], 0.0
            for t in ts:
                prog.start(f"{v.name} / {t.name}")
                r = train(v, t, args.seed)
                row[t.name] = dict(acc=r["acc"], loss=r["loss"], tokens_per_s=r["tokens_per_s"])
                tok.append(r["tokens_per_s"])
                secs += r["seconds"]
                row.update(params=r["rnn_params"], backend=r["backend"], plan=r["plan"])
                prog.advance()
            row["tokens_per_s"] = sum(tok) / len(tok)
            row["train_seconds"] = secs
            rows.append(row)
    wall = time.perf_counter() - wall

    print_table(rows, task_names)
    print("params: the recurrent layer's (input projection + spec params); tokens/s: training "
          "(forward + backward + Adam), mean over the tasks")

    # the winner: best mean accuracy, then fewer params, then faster
    best = max(rows, key=lambda r: (round(sum(r[t]["acc"] for t in task_names) / len(task_names), 3),
                                    -r["params"], r["tokens_per_s"]))
    spec = next(v.spec for v in vs if v.name == best["name"])
    winner = out / "winner.rnn"
    spec.save(winner)
    rnnc.load(str(winner))  # the saved text parses and checks

    pos = [r["parity"]["acc"] for r in rows if not r["negative"]]
    neg = [r["parity"]["acc"] for r in rows if r["negative"]]
    confirmed = bool(pos and neg and max(pos) < 0.65 and min(neg) > 0.95)
    verdict = (f"verdict: {'CONFIRMED' if confirmed else 'NOT REPRODUCED'} - positive-only "
               f"transitions reach at most {max(pos) * 100:.1f}% on parity (chance 50%), "
               f"transitions with negative eigenvalues at least {min(neg) * 100:.1f}%")
    print(verdict)
    print(f"winner: {best['name']} -> {_show(winner)}")
    png = out / "search.png"
    if not args.no_plot and plot(rows, task_names, {t.name: 100 / t.classes for t in ts}, png):
        print(f"plot: {_show(png)}")
    (out / "results.json").write_text(json.dumps(dict(
        rows=rows, winner=best["name"], verdict=verdict, confirmed=confirmed,
        wall_seconds=wall, quick=args.quick, seed=args.seed,
        tasks=[dict(name=t.name, T=t.T, steps=t.steps, lr=t.lr) for t in ts]), indent=1))
    print(f"wall time: {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
