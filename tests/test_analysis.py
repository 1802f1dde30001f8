"""Stage 3, the analysis: what each recurrence allows, checked three independent ways.

1. One hand-verified table (EXPECTED, one entry per file in examples/) against the
   `rnnc check FILE --json` contract, through `rnnc.cli.main`.
2. Numerical probes of the compiled sequential module in float64: whatever the analysis
   claims about a state (affine, the structure of its Jacobian, where the transition
   varies, whether it is data-dependent, max-plus form, rescaling) must hold for the
   real step function. Run on every kind of `rnnc.random_spec`, on the examples and on a
   few hand-written edge cases.
3. The sympy associativity checker, and the fallbacks: what the analysis cannot put in a
   scan is nonlinear/sequential with a reason naming a line, and still a valid spec.

Known analysis bugs are kept as strict xfails (KNOWN_BUGS): fixing one makes its test
XPASS, which fails and asks for the marker to go.
"""
from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp
import torch

import rnnc
from rnnc import analysis
from rnnc.cli import main as cli_main
from rnnc.interpret import concrete
from rnnc.random_spec import KINDS, random_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
F64 = torch.float64

# ================================================================================================
# 1. The table
# ================================================================================================


def NL(line=None):
    """A nonlinear state; `line`: the line its reason must name (None: coupled to another)."""
    return {"update": "nonlinear", "kind": "nonlinear", "varies_over": [], "rescaled_by": None,
            "reason_line": line}


def AFF(kind, over, dd=True, rescaled_by=None, **extra):
    return {"update": "affine", "kind": kind, "varies_over": list(over), "data_dependent": dd,
            "rescaled_by": rescaled_by, **extra}


SEQ = dict(associative=False, plan="sequential", hoisted=[])

# name -> recurrence facts; states: [(name, shape, facts)] in declaration order
EXPECTED = {
    "elman": {**SEQ, "states": [("h", ["H"], NL(5))]},
    "lstm": {**SEQ, "states": [("h", ["H"], NL(10)), ("c", ["H"], NL())]},
    "gru": {**SEQ, "states": [("h", ["H"], NL(7))]},
    "slstm": {**SEQ, "states": [("h", ["H"], NL(11)), ("c", ["H"], NL()), ("n", ["H"], NL()),
                                ("m", ["H"], NL())]},
    "mingru": {"associative": True, "plan": "elementwise_scan", "hoisted": ["z"],
               "states": [("h", ["H"], AFF("diagonal", ["H"]))]},
    "minlstm": {"associative": True, "plan": "elementwise_scan", "hoisted": ["f", "i"],
                "states": [("h", ["H"], AFF("diagonal", ["H"]))]},
    "rglru": {"associative": True, "plan": "elementwise_scan", "hoisted": ["r", "i", "log_a"],
              "states": [("h", ["D"], AFF("diagonal", ["D"]))]},
    "hgrn": {"associative": True, "plan": "elementwise_scan", "hoisted": [],
             "states": [("h", ["D"], AFF("diagonal", ["D"]))]},
    "s6": {"associative": True, "plan": "elementwise_scan", "hoisted": [],
           "states": [("h", ["D", "N"], AFF("diagonal", ["D", "N"]))]},
    "s4d": {"associative": True, "plan": "elementwise_scan", "hoisted": ["dt"],
            "states": [("h", ["D", "N"], AFF("diagonal", ["D", "N"], dd=False))]},
    "gla": {"associative": True, "plan": "chunked", "hoisted": [],
            "states": [("S", ["H", "K", "V"], AFF("diagonal", ["H", "K"]))]},
    "hgrn2": {"associative": True, "plan": "chunked", "hoisted": ["a"],
              "states": [("S", ["H", "K", "V"], AFF("diagonal", ["H", "K"]))]},
    "rwkv6": {"associative": True, "plan": "chunked", "hoisted": [],
              "states": [("S", ["H", "K", "V"], AFF("diagonal", ["H", "K"]))]},
    "retnet": {"associative": True, "plan": "chunked", "hoisted": [],
               "states": [("S", ["H", "K", "V"], AFF("diagonal", ["H"], dd=False))]},
    "mamba2": {"associative": True, "plan": "chunked", "hoisted": [],
               "states": [("S", ["H", "N", "P"], AFF("diagonal", ["H"]))]},
    "deltanet": {"associative": True, "plan": "chunked_delta", "hoisted": [],
                 "states": [("S", ["H", "K", "V"], AFF("identity_plus_low_rank", [], rank=1,
                                                       mixed_axes=["K"]))]},
    "gated_deltanet": {"associative": True, "plan": "chunked_delta", "hoisted": [],
                       "states": [("S", ["H", "K", "V"], AFF("diagonal_plus_low_rank", ["H"], rank=1,
                                                             mixed_axes=["K"]))]},
    "kda": {"associative": True, "plan": "chunked_delta", "hoisted": [],
            "states": [("S", ["H", "K", "V"], AFF("diagonal_plus_low_rank", ["H", "K"], rank=1,
                                                  mixed_axes=["K"]))]},
    "gated_deltaproduct": {"associative": True, "plan": "chunked_delta", "hoisted": [],
                           "states": [("S", ["H", "K", "V"], AFF("diagonal_plus_low_rank", ["H"], rank=3,
                                                                 mixed_axes=["K"]))]},
    "rwkv7": {"associative": True, "plan": "chunked_delta", "hoisted": [],
              "states": [("S", ["H", "K", "V"], AFF("diagonal_plus_low_rank", ["H", "K"], rank=1,
                                                    mixed_axes=["K"]))]},
    "mlstm": {"associative": True, "plan": "chunked", "hoisted": ["lf"],
              "states": [("C", ["H", "K", "V"], AFF("diagonal", ["H"], rescaled_by="m")),
                         ("n", ["H", "K"], AFF("diagonal", ["H"], rescaled_by="m")),
                         ("m", ["H"], {"update": "maxplus", "kind": "maxplus", "varies_over": [],
                                       "data_dependent": True, "rescaled_by": None})]},
}

EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.rnn"))


def cli(capsys, *argv) -> tuple:
    """(exit code, stdout, stderr) of `rnnc ARGV` run in-process."""
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def check_json(capsys, path) -> dict:
    rc, out, err = cli(capsys, "check", path, "--json")
    assert rc == 0, err
    assert err == ""
    return json.loads(out)


def test_table_covers_every_example():
    assert EXAMPLE_NAMES, "no examples found"
    assert set(EXPECTED) == set(EXAMPLE_NAMES)


STATE_KEYS = {"name", "shape", "update", "transition", "rescaled_by"}
REC_KEYS = {"name", "associative", "plan", "hoisted", "states"}


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_analysis_json(capsys, name):
    doc = check_json(capsys, EXAMPLES / f"{name}.rnn")
    assert set(doc) == {"recurrences"}
    assert isinstance(doc["recurrences"], list) and len(doc["recurrences"]) == 1
    rec = doc["recurrences"][0]
    assert REC_KEYS <= set(rec), sorted(REC_KEYS - set(rec))
    want = EXPECTED[name]
    assert rec["name"] == name
    assert rec["associative"] is want["associative"]
    assert rec["plan"] == want["plan"]
    assert rec["hoisted"] == want["hoisted"]
    assert [s["name"] for s in rec["states"]] == [n for n, _, _ in want["states"]]
    for st, (sname, shape, facts) in zip(rec["states"], want["states"]):
        where = f"{name}.{sname}"
        assert STATE_KEYS <= set(st), (where, sorted(STATE_KEYS - set(st)))
        assert st["shape"] == shape, where
        assert st["update"] == facts["update"], where
        tr = st["transition"]
        assert {"kind", "varies_over", "data_dependent"} <= set(tr), where
        assert isinstance(tr["data_dependent"], bool), where
        assert tr["kind"] == facts["kind"], where
        assert tr["varies_over"] == facts["varies_over"], where
        if "data_dependent" in facts:
            assert tr["data_dependent"] is facts["data_dependent"], where
        if "rank" in facts:
            assert tr.get("rank") == facts["rank"], where
            assert tr.get("mixed_axes") == facts["mixed_axes"], where
        assert st["rescaled_by"] == facts["rescaled_by"], where
        if facts["update"] == "nonlinear":
            assert st.get("reason"), where
            line = facts["reason_line"]
            if line is not None:
                assert f"at line {line}" in st["reason"], (where, st["reason"])
                assert st.get("line") == line, where
            else:
                assert "coupled" in st["reason"], (where, st["reason"])


def test_json_matches_the_analysis_objects(capsys):
    """The CLI reports exactly what `analysis.analyse` finds (no re-derivation in the CLI)."""
    for name in EXAMPLE_NAMES:
        path = EXAMPLES / f"{name}.rnn"
        rec = check_json(capsys, path)["recurrences"][0]
        a = analysis.analyse(rnnc.load(path))
        assert rec["plan"] == a.plan and rec["associative"] == a.associative, name
        assert rec["hoisted"] == list(a.hoisted_names), name
        for st, f in zip(rec["states"], a.states):
            assert (st["name"], st["update"], st["transition"]["kind"], st["rescaled_by"]) == \
                (f.name, f.update, f.transition.kind, f.rescaled_by), name
            assert st["transition"]["varies_over"] == list(f.transition.varies_over), name


def test_check_all_examples_subprocess():
    """The installed entry point, all examples in one call: exit 0 and one record each."""
    files = [str(EXAMPLES / f"{n}.rnn") for n in EXAMPLE_NAMES]
    res = subprocess.run([sys.executable, "-m", "rnnc", "check", *files, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["name"] for r in doc["recurrences"]] == EXAMPLE_NAMES
    for r in doc["recurrences"]:
        assert r["plan"] == EXPECTED[r["name"]]["plan"]


# ================================================================================================
# 2. Numerical probes of the compiled sequential module
# ================================================================================================

TOL = 1e-9          # float64 agreement of two evaluations of the same affine map
NONZERO = 1e-6      # a difference that is certainly not rounding


def small(diff: torch.Tensor, ref: torch.Tensor) -> bool:
    """|diff| is rounding relative to the size of `ref` (raw inputs can make J large)."""
    return diff.abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


class Probe:
    """A compiled recurrence with random params, and its one-step state map."""

    def __init__(self, src, dims: dict, seed: int = 0, B: int = 2):
        self.m = rnnc.compile(src, backend="sequential", **dims).double()
        self.rec = self.m.recurrence
        self.facts = self.m.analysis
        self.dims = dims
        self.B = B
        self.g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():  # random params: constant default inits could hide a claim
            for p in self.m.parameters():
                p.copy_(torch.randn(p.shape, generator=self.g, dtype=F64))
        self.shape = {s.name: tuple(concrete(s.shape, dims)) for s in self.rec.states}

    def randn(self, shape, scale=1.0):
        return scale * torch.randn(shape, generator=self.g, dtype=F64)

    def inputs(self):
        return [self.randn((self.B, *concrete(d.shape, self.dims))) for d in self.rec.inputs]

    def states(self):
        return {s: self.randn((self.B, *sh)) for s, sh in self.shape.items()}

    def rand_state(self, name, scale=1.0):
        return self.randn((self.B, *self.shape[name]), scale)

    def step(self, xs, st) -> dict:
        return self.m.step(*xs, state=st)[1]

    def new(self, xs, st, name, S):
        """The new value of state `name` from old value S, everything else fixed."""
        return self.step(xs, {**st, name: S})[name]

    def jacobian(self, xs, st, name, S=None):
        """d new / d old per batch element: [B, n, n]; the batch elements must not interact."""
        S = st[name] if S is None else S
        J = torch.autograd.functional.jacobian(lambda s: self.new(xs, st, name, s), S)
        B, n = self.B, math.prod(self.shape[name])
        J = J.reshape(B, n, B, n)
        for b in range(B):
            for c in range(B):
                if b != c:
                    assert small(J[b, :, c, :], J), f"{name}: batch elements interact"
        return torch.stack([J[b, :, b, :] for b in range(B)])


def affine_defect(p: Probe, xs, st, names, trials=4) -> float:
    """max |f(c S1 + (1-c) S2) - c f(S1) - (1-c) f(S2)| over random S1, S2, c (relative to
    the size of the terms), with the states `names` varied together (the others fixed)."""
    worst = 0.0
    for k in range(trials):
        c = random.Random(len(names) * 7 + k).uniform(-1.0, 2.0)
        s1 = {n: p.rand_state(n, 2.0) for n in names}
        s2 = {n: p.rand_state(n, 2.0) for n in names}
        mix = {n: c * s1[n] + (1 - c) * s2[n] for n in names}
        f1, f2, fm = (p.step(xs, {**st, **s}) for s in (s1, s2, mix))
        for n in names:
            scale = max(1.0, (c * f1[n]).abs().max().item(), ((1 - c) * f2[n]).abs().max().item())
            worst = max(worst, (fm[n] - (c * f1[n] + (1 - c) * f2[n])).abs().max().item() / scale)
    return worst


def spread_along(arr: torch.Tensor, axis: int) -> float:
    """How far `arr` is from constant along `axis` (max abs deviation from its first slice)."""
    return (arr - arr.narrow(axis, 0, 1)).abs().max().item()


def check_varies(arr, names, varies, what, seen: dict):
    """arr[*names] must be constant along axes not in `varies`; the spread along axes in
    `varies` is recorded in `seen` (it must be nonzero for at least one probe: see
    `assert_varied`, since one data draw can hide it, e.g. a saturated max)."""
    for ax, dim in enumerate(names):
        spread = spread_along(arr, ax)
        if dim in varies:
            seen[(what, dim)] = max(seen.get((what, dim), 0.0), spread)
        else:
            assert spread < 1e-8 * max(1.0, arr.abs().max().item()), \
                f"{what}: varies along {dim} ({spread:.2e}), not in varies_over {list(varies)}"


def assert_varied(seen: dict):
    for (what, dim), spread in seen.items():
        assert spread > NONZERO, f"{what}: claimed to vary over {dim}, constant along it in every probe"


def block_mask(sizes, keep):
    """[*sizes, *sizes] mask: 1 where the out and in indices agree on every axis in `keep`."""
    r = len(sizes)
    mask = torch.ones(*sizes, *sizes, dtype=F64)
    for ax in keep:
        shape = [1] * (2 * r)
        shape[ax], shape[r + ax] = sizes[ax], sizes[ax]
        mask = mask * torch.eye(sizes[ax], dtype=F64).reshape(shape)
    return mask


def num_rank(M: torch.Tensor) -> int:
    sv = torch.linalg.svdvals(M)
    return int((sv > 1e-8 * max(1.0, sv.max().item())).sum())


def check_transition(p: Probe, f, J: torch.Tensor):
    """J [N, n, n] (one per batch element and data draw) against the claimed transition
    (kind, varies_over, mixed_axes, rank)."""
    t = f.transition
    seen = {}
    sizes = p.shape[f.name]
    names = list(f.shape)
    n = math.prod(sizes)
    eye = torch.eye(n, dtype=F64)
    what = f"state {f.name} ({t.kind})"
    for Jb in J:
        diag = torch.diagonal(Jb)
        off = Jb - torch.diag(diag)
        if t.kind == "identity":
            assert (Jb - eye).abs().max() < TOL, f"{what}: J != I"
        elif t.kind == "zero":
            assert Jb.abs().max() < TOL, f"{what}: J != 0"
        elif t.kind == "diagonal":
            assert small(off, Jb), f"{what}: J has off-diagonal entries"
            check_varies(diag.reshape(sizes), names, t.varies_over, what, seen)
        elif t.kind in ("identity_plus_low_rank", "diagonal_plus_low_rank", "dense"):
            assert off.abs().max() > NONZERO, f"{what}: J is diagonal, nothing is mixed"
            # positions of the mixed dims (all positions of a dim name that is mixed)
            mixed = [k for k, dim in enumerate(names) if dim in t.mixed_axes]
            keep = [k for k in range(len(sizes)) if k not in mixed]
            J2 = Jb.reshape(*sizes, *sizes)
            outside = J2 * (1 - block_mask(sizes, keep))
            assert small(outside, Jb), f"{what}: mixes axes outside {list(t.mixed_axes)}"
            if t.kind == "dense":
                continue
            r = len(sizes)
            perm = keep + mixed + [r + k for k in keep + mixed]
            nk = math.prod(sizes[k] for k in keep)
            nm = math.prod(sizes[k] for k in mixed)
            blocks = torch.diagonal(J2.permute(perm).reshape(nk, nm, nk, nm), dim1=0, dim2=2)
            blocks = blocks.permute(2, 0, 1)  # [nk, nm, nm]: one mixing block per kept index
            I = torch.eye(nm, dtype=F64)
            if t.kind == "identity_plus_low_rank":
                for M in blocks:
                    assert num_rank(M - I) <= t.rank, \
                        f"{what}: rank(J - I) = {num_rank(M - I)} > claimed rank {t.rank} in a block"
                continue
            if any(a in t.varies_over for a in t.mixed_axes) or nm - t.rank < 2:
                continue  # the diagonal part is not a multiple of I within a block
            lams = []
            for M in blocks:  # D = lam * I: lam is the eigenvalue of multiplicity >= nm - rank
                ev = [e.real.item() for e in torch.linalg.eigvals(M) if abs(e.imag.item()) < 1e-9]
                best = min(ev, key=lambda lam: num_rank(M - lam * I))
                assert num_rank(M - best * I) <= t.rank, f"{what}: no diagonal + rank-{t.rank} split"
                lams.append(best)
            lam = torch.tensor(lams, dtype=F64).reshape([sizes[k] for k in keep])
            check_varies(lam, [names[k] for k in keep], t.varies_over, what + " diagonal part", seen)
        else:
            raise AssertionError(f"unexpected transition kind {t.kind}")
    assert_varied(seen)


def maxplus_form(p: Probe, xs, st, name):
    """(a, b) read off the step: m' = max(m + a, b) gives b at m = -1e9 and m + a at m = 1e6."""
    shape = (p.B, *p.shape[name])
    b = p.new(xs, st, name, torch.full(shape, -1e9, dtype=F64))
    big = 1e6
    a = p.new(xs, st, name, torch.full(shape, big, dtype=F64)) - big
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a.abs().max() < 1e3 and b.abs().max() < 1e3, f"{name}: not of the form max(m + a, b)"
    return a, b


def check_maxplus(p: Probe, f, xs, st):
    a, b = maxplus_form(p, xs, st, f.name)
    first = second = False
    for _ in range(5):
        m = b - a + p.rand_state(f.name, 3.0)  # around the switch: both branches get hit
        want = torch.maximum(m + a, b)
        got = p.new(xs, st, f.name, m)
        assert (got - want).abs().max() < 1e-7, f"state {f.name}: m' != max(m + a, b)"
        first |= bool((m + a > b).any())
        second |= bool((m + a < b).any())
    assert first and second


def check_rescaled(p: Probe, f, xs, st):
    """S~ = S exp(r) (r the max-plus state, broadcast over S's trailing axes): the update of
    S~ is affine with coefficients and input free of r."""
    r = f.rescaled_by
    rs, ss = p.shape[r], p.shape[f.name]
    assert ss[:len(rs)] == rs, "test helper: the rescaling state must be a leading-axes prefix"

    def expand(v):
        return v.reshape(*v.shape, *([1] * (len(ss) - len(rs))))

    def tilde_map(m):
        def g(St):
            out = p.step(xs, {**st, r: m, f.name: St * torch.exp(-expand(m))})
            return out[f.name] * torch.exp(expand(out[r]))
        return g

    m1, m2 = p.rand_state(r), p.rand_state(r) + 1.5
    St = p.rand_state(f.name)
    g1, g2 = tilde_map(m1), tilde_map(m2)
    zero = torch.zeros_like(St)
    assert small(g1(zero) - g2(zero), g1(zero)), f"{f.name}: rescaled input depends on {r}"
    J1 = torch.autograd.functional.jacobian(g1, St)
    J2 = torch.autograd.functional.jacobian(g2, St)
    assert small(J1 - J2, J1), f"{f.name}: rescaled transition depends on {r}"
    # and without the rescaling the update does depend on r (the claim is not vacuous)
    plain = [p.new(xs, {**st, r: m}, f.name, St) for m in (m1, m2)]
    assert (plain[0] - plain[1]).abs().max() > NONZERO


def probe_dims(src, dims) -> dict:
    """Sizes for probing: mixed (low-rank) axes get at least rank + 3 entries so that the
    diagonal part of each block is determined."""
    a = analysis.analyse(rnnc.load(src))
    dims = dict(dims)
    for f in a.states:
        if f.transition.kind.endswith("low_rank"):
            for ax in f.transition.mixed_axes:
                if ax in dims:
                    dims[ax] = max(dims[ax], f.transition.rank + 3)
    return dims


def check_against_probe(src, dims, seed=0):
    """Every claim of the analysis about `src`, checked numerically. Returns the analysis."""
    dims = probe_dims(src, dims)
    p = Probe(src, dims, seed)
    facts = p.facts
    xs, st = p.inputs(), p.states()
    xs2, st2 = p.inputs(), p.states()
    checked = 0
    for f in facts.states:
        what = f"state {f.name}"
        if f.update == "affine":
            others = dict(st)
            assert affine_defect(p, xs, others, [f.name]) < TOL, f"{what}: claimed affine, is not"
            J = p.jacobian(xs, st, f.name)
            J_other_state = p.jacobian(xs, st, f.name, p.rand_state(f.name, 3.0))
            assert small(J - J_other_state, J), f"{what}: J depends on the old state"
            J_other_data = p.jacobian(xs2, {**st2, f.name: st[f.name]}, f.name)
            J_third = p.jacobian(p.inputs(), p.states(), f.name)
            check_transition(p, f, torch.cat([J, J_other_data, J_third]))
            changed = (J - J_other_data).abs().max().item() > NONZERO
            assert changed == f.transition.data_dependent, \
                f"{what}: data_dependent={f.transition.data_dependent}, but J changes: {changed}"
            if facts.plan in ("elementwise_scan", "chunked"):  # the plan fits the numbers
                off = J - torch.diag_embed(torch.diagonal(J, dim1=1, dim2=2))
                assert small(off, J), \
                    f"plan {facts.plan}, but state {f.name} has a non-diagonal transition"
            if f.rescaled_by:
                check_rescaled(p, f, xs, st)
            checked += 1
        elif f.update == "maxplus":
            check_maxplus(p, f, xs, st)
            a1, b1 = maxplus_form(p, xs, st, f.name)
            a2, b2 = maxplus_form(p, xs2, {**st2, f.name: st[f.name]}, f.name)
            changed = max((a1 - a2).abs().max().item(), (b1 - b2).abs().max().item()) > NONZERO
            assert changed == f.transition.data_dependent, \
                f"{what}: data_dependent={f.transition.data_dependent}, but (a, b) change: {changed}"
            checked += 1
        else:
            assert f.update == "nonlinear" and f.transition.kind == "nonlinear"
            alone = affine_defect(p, xs, st, [f.name])
            if "coupled" in (f.reason or ""):
                joint = affine_defect(p, xs, st, list(p.shape))
                assert alone > NONZERO or joint > NONZERO, f"{what}: claimed nonlinear, is affine"
            else:
                assert alone > NONZERO, f"{what}: claimed nonlinear, but is affine in itself"
            checked += 1
    assert checked == len(facts.states)
    nonlinear = any(f.update == "nonlinear" for f in facts.states)
    assert facts.associative == (not nonlinear)
    assert (facts.plan == "sequential") == nonlinear
    return facts


# The analysis class each generator kind must land in (transition kinds of its one state).
KIND_CLASS = {
    "diagonal": ({"diagonal"}, "elementwise_scan"),
    "chunked": ({"diagonal"}, "chunked"),
    "delta": ({"identity_plus_low_rank", "diagonal_plus_low_rank"}, "chunked_delta"),
    "delta_channel": ({"diagonal_plus_low_rank"}, "chunked_delta"),
    "dense": ({"dense"}, "dense_scan"),
    "maxplus": ({"maxplus"}, "elementwise_scan"),
    "nonlinear": ({"nonlinear"}, "sequential"),
}
SEEDS = range(6)


def test_kind_class_covers_kinds():
    assert set(KIND_CLASS) == set(KINDS)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS)
def test_random_spec_matches_probe(kind, seed):
    src, dims = random_spec(seed, kind)
    facts = check_against_probe(src, dims, seed)
    kinds, plan = KIND_CLASS[kind]
    assert len(facts.states) == 1
    assert facts.states[0].transition.kind in kinds, (src, facts.states[0].transition)
    assert facts.plan == plan, src


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_matches_probe(name):
    dims = {"H": 2, "K": 4, "V": 3, "D": 3, "N": 3, "P": 2}
    rec = rnnc.load(EXAMPLES / f"{name}.rnn")
    check_against_probe((EXAMPLES / f"{name}.rnn").read_text(),
                        {d: dims.get(d, 3) for d in rec.dims}, seed=EXAMPLE_NAMES.index(name))


# Hand-written edge cases the generators do not produce; the analysis must be right here too.
EDGE = {
    "decay_over_second_axis": ("""
rnn vn(x[D]) -> y[D] {
    param a[N], c[N]
    state h[D,N] = 0
    h[i,n] = a[n] * h[i,n] + x[i]
    y[i] = sum[n](c[n] * h[i,n])
}""", {"D": 3, "N": 4}, ("h", "diagonal", ("N",), None)),
    "strata": ("""
rnn sd(x[D]) -> C[D] {
    param p[D]
    state n[D] = 0, C[D] = 0
    n = n + p
    C = sigmoid(n) * C + x
}""", {"D": 3}, ("C", "diagonal", ("D",), None)),
    "transpose_is_dense": ("""
rnn swap(x[N,N]) -> S[N,N] {
    state S[N,N] = 0
    S[i,j] = 0.5 * S[j,i] + x[i,j]
}""", {"N": 3}, ("S", "dense", (), None)),
    "summed_coefficient": ("""
rnn diagsum(x[D]) -> h[D] {
    param A[D,E]
    state h[D] = 0
    h[i] = sum[e](A[i,e] * h[i]) + x[i]
}""", {"D": 3, "E": 2}, ("h", "diagonal", ("D",), None)),
    "two_keys_rank2": ("""
rnn twokeys(q[H,K], k[H,K], v[H,V]) -> o[H,V] {
    state S[H,K,V] = 0
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    w[h,j] = sum[i](q[h,i] * S[h,i,j])
    S[h,i,j] = S[h,i,j] - 0.5 * k[h,i] * u[h,j] - 0.25 * q[h,i] * w[h,j] + k[h,i] * v[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""", {"H": 2, "K": 5, "V": 2}, ("S", "identity_plus_low_rank", (), None)),
    "per_channel_decay_delta": ("""
rnn rih(k[H,K], v[H,V], g[H,K], b[H]) -> o[H,V] {
    state S[H,K,V] = 0
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    S[h,i,j] = exp(g[h,i]) * S[h,i,j] - b[h] * k[h,i] * u[h,j] + k[h,i] * v[h,j]
    o[h,j] = sum[i](k[h,i] * S[h,i,j])
}""", {"H": 2, "K": 4, "V": 3}, ("S", "diagonal_plus_low_rank", ("H", "K"), None)),
    # two Householder steps in turn: the cross term b1 b2 (k2.k1) k2 k1^T holds an inner
    # contraction over a label of its own, a scalar per head, not a chain (it was taken for
    # one, and the state for dense)
    "deltaproduct_cross_term": ("""
rnn dp(k1[H,K], v1[H,V], b1[H], k2[H,K], v2[H,V], b2[H]) -> o[H,V] {
    state S[H,K,V] = 0
    u1[h,j] = sum[i](k1[h,i] * S[h,i,j])
    S1[h,i,j] = S[h,i,j] + b1[h] * k1[h,i] * (v1[h,j] - u1[h,j])
    u2[h,j] = sum[i](k2[h,i] * S1[h,i,j])
    S[h,i,j] = S1[h,i,j] + b2[h] * k2[h,i] * (v2[h,j] - u2[h,j])
    o[h,j] = sum[i](k1[h,i] * S[h,i,j])
}""", {"H": 2, "K": 6, "V": 3}, ("S", "identity_plus_low_rank", (), None)),
    "mlstm_unstabilised_input": ("""
rnn mlv(k[H,K], v[H,V], ig[H], fg[H]) -> o[H,V] {
    state C[H,K,V] = 0, m[H] = -inf
    lf = logsigmoid(fg)
    m_new = max(lf + m, ig)
    a = exp(lf + m - m_new)
    C[h,i,j] = a[h] * C[h,i,j] + exp(ig[h]) * k[h,i] * v[h,j]
    m = m_new
    o[h,j] = sum[i](k[h,i] * C[h,i,j])
}""", {"H": 2, "K": 2, "V": 3}, ("C", "diagonal", ("H",), None)),
}

# Specs on which the analysis is wrong today (see the reasons). Strict: a fix makes them XPASS.
# Once bugs (now regression tests): spec, dims, what was wrong.
KNOWN_BUGS = {
    "low_rank_of_a_product": ("""
rnn ab(x[N]) -> h[N] {
    param A[N,N], B[N,N]
    state h[N] = 0
    h = h + A @ (B @ h) + x
}""", {"N": 4}, "J = I + A B has rank N, claimed identity_plus_low_rank of rank 1: a contraction "
                "chained through two factors (A[i,m] B[m,l]) is taken for an outer product"),
    "vector_low_rank_planned_elementwise": ("""
rnn lrvec(x[N]) -> h[N] {
    state h[N] = 0
    h[i] = h[i] + x[i] * sum[j](h[j])
}""", {"N": 3}, "identity_plus_low_rank on a vector state keeps method 'elementwise' and plan "
                "elementwise_scan (_choose_method returns early for len(shape) < 2); the scan "
                "backend then drops the low-rank term"),
    "matrix_low_rank_without_value_axis": ("""
rnn dbv(q[H,K], k[H,K], v[H,V], beta[H,V]) -> o[H,V] {
    state S[H,K,V] = 0
    u[h,j] = sum[i](k[h,i] * S[h,i,j])
    S[h,i,j] = S[h,i,j] + beta[h,j] * k[h,i] * (v[h,j] - u[h,j])
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""", {"H": 2, "K": 3, "V": 2}, "identity_plus_low_rank with no value axis keeps method "
                               "'elementwise' (_choose_method returns on `not value_axes`): plan "
                               "elementwise_scan, wrong results from the scan backend"),
    "delta_rule_decay_per_key_channel": ("""
rnn kda(q[H,K], k[H,K], v[H,V], g[H,K], beta[H]) -> o[H,V] {
    state S[H,K,V] = 0
    D[h,i,j] = exp(g[h,i]) * S[h,i,j]
    u[h,j] = sum[i](k[h,i] * D[h,i,j])
    S[h,i,j] = D[h,i,j] + beta[h] * k[h,i] * (v[h,j] - u[h,j])
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""", {"H": 2, "K": 3, "V": 2}, "a delta rule whose decay varies along its key axis (Kimi Delta "
                               "Attention's decay per key channel) got the chunked_delta plan, "
                               "whose chunk forms take one decay per head: they read key "
                               "channel 0's decay for all of them, 22% off on both backends"),
    "matrix_state_two_outer_products": ("""
rnn two(q[H,K], k[H,K], v[H,V], g[H,K], k2[H,K], v2[H,V]) -> o[H,V] {
    state S[H,K,V] = 0
    S[h,i,j] = exp(g[h,i]) * S[h,i,j] + k[h,i] * v[h,j] + k2[h,i] * v2[h,j]
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""", {"H": 2, "K": 3, "V": 2}, "an input of two outer products got the chunked plan, and "
                               "compiling it on scan or triton (auto included) raised 'a chunked "
                               "plan needs one outer-product input term' for a valid spec"),
    "matrix_state_outer_product_plus_constant": ("""
rnn plus(q[H,K], k[H,K], v[H,V], g[H,K]) -> o[H,V] {
    state S[H,K,V] = 0
    S[h,i,j] = exp(g[h,i]) * S[h,i,j] + k[h,i] * v[h,j] + 0.5
    o[h,j] = sum[i](q[h,i] * S[h,i,j])
}""", {"H": 2, "K": 3, "V": 2}, "k⊗v + 0.5 is two input terms: the same refusal as above"),
    "maxplus_fixed_transition": ("""
rnn mpc(x[N]) -> y[N] {
    param p[N]
    state m[N] = 0
    m = max(m + p, 0)
    y = m * x
}""", {"N": 3}, "max-plus transition with a = param, b = constant is reported data_dependent "
                "(data_dependent = ... or bool(b nodes), true whenever b exists)"),
}


@pytest.mark.parametrize("name", list(EDGE))
def test_edge_case_matches_probe(name):
    src, dims, (state, kind, over, rescaled_by) = EDGE[name]
    facts = check_against_probe(src, dims)
    f = facts.state(state)
    assert (f.transition.kind, f.transition.varies_over) == (kind, over), f.transition
    assert f.rescaled_by == rescaled_by


@pytest.mark.parametrize("name", list(KNOWN_BUGS))
def test_fixed_analysis_bugs(name):
    """Bugs this suite once found: the claim now matches the probe, and the plan that
    backend="auto" picks computes what the sequential reference computes."""
    src, dims, _ = KNOWN_BUGS[name]
    check_against_probe(src, dims)
    torch.manual_seed(0)
    ref = rnnc.compile(src, backend="sequential", **dims).double()
    auto = rnnc.compile(src, backend="auto", **dims).double()
    auto.load_state_dict(ref.state_dict())
    xs = [torch.randn(2, 9, *concrete(d.shape, dims), dtype=F64) for d in ref.recurrence.inputs]
    torch.testing.assert_close(auto(*xs), ref(*xs), rtol=1e-9, atol=1e-9)


def test_probe_catches_a_false_claim():
    """The probe itself is not vacuous: doctored claims about mingru are rejected."""
    import dataclasses
    src = (EXAMPLES / "mingru.rnn").read_text()
    p = Probe(src, {"D": 3, "H": 4})
    f = p.facts.states[0]
    xs, st = p.inputs(), p.states()
    J = p.jacobian(xs, st, "h")
    check_transition(p, f, J)  # the true claim passes
    for wrong in (dataclasses.replace(f.transition, kind="identity"),
                  dataclasses.replace(f.transition, varies_over=()),
                  dataclasses.replace(f.transition, kind="identity_plus_low_rank",
                                      mixed_axes=("H",), rank=1)):
        with pytest.raises(AssertionError):
            check_transition(p, dataclasses.replace(f, transition=wrong), J)
    # elman's h is not affine in h
    q = Probe((EXAMPLES / "elman.rnn").read_text(), {"D": 3, "H": 2})
    assert affine_defect(q, q.inputs(), q.states(), ["h"]) > NONZERO


# ================================================================================================
# 3. Associativity (sympy)
# ================================================================================================


def test_combines_proven():
    assert analysis.combine_proven("affine") is True
    assert analysis.combine_proven("maxplus") is True


def _pair(k):
    return sp.symbols(f"a{k} b{k}", real=True)


def _single(k):
    return (sp.Symbol(f"a{k}", real=True),)


def _matrix(k):
    return (sp.Matrix(2, 2, sp.symbols(f"M{k}_:4")),)


# (combine, element builder, truly associative?) -- the truth is also checked numerically below
CANDIDATES = {
    "affine_module": (analysis.affine_combine, analysis._affine_element, True),
    "maxplus_module": (analysis.maxplus_combine, analysis._maxplus_element, True),
    "scalar_affine": (lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]), _pair, True),
    "sum": (lambda x, y: (x[0] + y[0], x[1] + y[1]), _pair, True),
    "max": (lambda x, y: (sp.Max(x[0], y[0]),), _single, True),
    "matmul": (lambda x, y: (y[0] * x[0],), _matrix, True),
    "ab_plus_1": (lambda x, y: (x[0] * y[0] + 1, y[1]), _pair, False),
    "ab_plus_1_scalar": (lambda x, y: (x[0] * y[0] + 1,), _single, False),
    "difference": (lambda x, y: (x[0] - y[0],), _single, False),
    "mean": (lambda x, y: ((x[0] + y[0]) / 2,), _single, False),
    "affine_wrong_input": (lambda x, y: (x[0] * y[0], y[0] * x[1] + x[1]), _pair, False),
    "maxplus_wrong": (lambda x, y: (x[0] + y[0], sp.Max(x[1], y[1]) + y[0]), _pair, False),
    "matrix_wrong": (lambda x, y: (y[0] * x[0] + sp.eye(2),), _matrix, False),
}


def _numerically_associative(combine, element) -> bool:
    x, y, z = element(1), element(2), element(3)
    left, right = combine(combine(x, y), z), combine(x, combine(y, z))
    syms = set()
    for e in (*x, *y, *z):
        syms |= e.free_symbols
    rng = random.Random(0)
    for _ in range(5):
        sub = {s: rng.uniform(-2, 2) for s in syms}
        for l, r in zip(left, right):
            d = sp.Matrix([l - r]) if not isinstance(l, sp.MatrixBase) else (l - r)
            if any(abs(float(v.subs(sub))) > 1e-9 for v in d):
                return False
    return True


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_is_associative(name):
    combine, element, truth = CANDIDATES[name]
    assert _numerically_associative(combine, element) == truth  # guards the table itself
    assert analysis.is_associative(combine, element) == truth


# ================================================================================================
# 4. Fallbacks and errors
# ================================================================================================

FALLBACKS = {
    "integer_index": ("rnn idx(x[H]) -> h[H] {\n    state h[H] = 0\n    c = tanh(x)\n"
                      "    h[i] = 0.5 * h[0] + c[i]\n}\n", 4, "h[0]"),
    "state_squared": ("rnn sq(x[H]) -> h[H] {\n    state h[H] = 0\n    g = sigmoid(x)\n"
                      "    h = g * h * h + x\n}\n", 4, "h * h"),
    "max_over_state": ("rnn mx(x[H]) -> h[H] {\n    state h[H] = 0\n\n"
                       "    h[i] = 0.5 * max[j](h[j]) + x[i]\n}\n", 4, "max[j]"),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fallback_to_sequential(capsys, tmp_path, name):
    src, line, construct = FALLBACKS[name]
    assert construct in src.splitlines()[line - 1]  # guards the table
    path = tmp_path / f"{name}.rnn"
    path.write_text(src)
    rec = check_json(capsys, path)["recurrences"][0]
    assert rec["plan"] == "sequential" and rec["associative"] is False
    (st,) = rec["states"]
    assert st["update"] == "nonlinear" and st["transition"]["kind"] == "nonlinear"
    assert f"line {line}" in st["reason"], st["reason"]
    assert st["line"] == line
    assert f"line {line}" in rec["plan_reason"]
    rc, out, err = cli(capsys, "check", path)
    assert rc == 0 and err == ""
    assert "plan:    sequential" in out and f"line {line}" in out
    # a valid spec: it compiles and runs
    m = rnnc.compile(src, backend="sequential", H=3).double()
    out = m(torch.randn(2, 4, 3, dtype=F64))
    assert out.shape == (2, 4, 3) and torch.isfinite(out).all()


BAD_SPECS = {
    "unknown_name": ("rnn bad(x[H]) -> h[H] {\n    state h[H] = 0\n    h = 0.5 * hh + x\n}\n", 3, 15),
    "syntax": ("rnn bad(x[H]) -> h[H] {\n    state h[H] = 0\n    h = 0.5 * * h + x\n}\n", 3, 15),
}


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_bad_spec_is_a_front_end_error(capsys, tmp_path, name):
    src, line, col = BAD_SPECS[name]
    path = tmp_path / "bad.rnn"
    path.write_text(src)
    rc, out, err = cli(capsys, "check", path)
    assert rc == 1
    assert "Traceback" not in err and "internal error" not in err
    m = re.search(rf"^{re.escape(str(path))}:(\d+):(\d+): error: ", err, re.M)
    assert m, err
    assert int(m.group(1)) == line
    assert int(m.group(2)) == col
    rc, out, err = cli(capsys, "check", path, "--json")
    assert rc == 1 and f"{path}:{line}:" in err


def test_bad_spec_among_good_ones(capsys, tmp_path):
    bad = tmp_path / "bad.rnn"
    bad.write_text(BAD_SPECS["unknown_name"][0])
    rc, out, err = cli(capsys, "check", EXAMPLES / "gla.rnn", bad, "--json")
    assert rc == 1 and f"{bad}:3:15: error:" in err
    assert [r["name"] for r in json.loads(out)["recurrences"]] == ["gla"]


# ================================================================================================
# 5. Human output and the graph
# ================================================================================================


def test_graph_dot_colours(capsys, tmp_path):
    out = tmp_path / "mingru.dot"
    rc, stdout, err = cli(capsys, "graph", EXAMPLES / "mingru.rnn", "-o", out)
    assert rc == 0, err
    text = out.read_text()
    assert text.startswith('digraph "mingru"') and text.rstrip().endswith("}")
    hoisted, core = "#cfe2ff", "#ffd8a8"
    assert hoisted in text and core in text
    # the hoisted statement z is blue; the state update h is in the core
    z = [ln for ln in text.splitlines() if 'label="z = ' in ln]
    h = [ln for ln in text.splitlines() if 'label="h = ' in ln]
    assert z and all(hoisted in ln for ln in z)
    assert h and all(core in ln for ln in h)


def test_check_human_output_gla(capsys):
    rc, out, err = cli(capsys, "check", EXAMPLES / "gla.rnn")
    assert rc == 0 and err == ""
    assert "transition diagonal over [H,K]" in out
    assert "plan:" in out
    plan_line = [ln for ln in out.splitlines() if ln.strip().startswith("plan:")]
    assert len(plan_line) == 1 and "chunked" in plan_line[0]
