"""LSRL-style programs with exact, hand-set weights: running parity and a counter mod k.

LSRL (Zancato et al. 2024, "Linear State-Space Recurrent Layers") writes programs as stacks of
linear recurrences and position-wise layers whose weights are set by hand. Here:

* running parity: a diagonal recurrence whose transition has the eigenvalue -1 on a 1,
      h_t = (1 - 2 x_t) * h_{t-1},  h_0 = 1   =>   h_t = (-1)^(x_1 + ... + x_t),
  then a position-wise readout (1 - h_t) / 2 in {0, 1}. Every value is exactly +-1, 0 or 1,
  so the result is exact in float32, on the sequential loop and on the parallel scan alike.
  (A transition with only positive eigenvalues cannot do this: see examples/search.py.)

* counter mod k: a 2-d state rotated by 2*pi/k on each 1 (a dense transition I + x (R - I)),
  read out by k fixed directions and an argmax.

Run:  python examples/lsrl_parity.py            (checks all 2^10 bit strings of length 10
                                                 and random longer ones, on both backends)
"""
from __future__ import annotations

import itertools
import math

import torch

from rnnc import builder as rb
from rnnc import layers as L


def parity_spec() -> rb.Spec:
    """rnn parity(x) -> h: h = (1 - 2x) * h from h = 1 (x a per-step scalar in {0, 1})."""
    s = rb.Spec("parity", doc="running parity as a sign: h_t = (-1)^(number of ones so far)")
    x = s.input("x")                      # one number per step
    h = s.state("h", init=1)              # a scalar state, h_0 = 1
    s[h] = (1 - 2 * x) * h                # eigenvalue +1 on a 0, -1 on a 1
    s.output(h, None)                     # emit the scalar state each step
    return s


def parity_model(backend: str = "auto") -> L.Stack:
    """[B, T, 1] bits -> [B, T, 1] running parity in {0, 1}, with exact hand-set weights."""
    rnn = L.RecurrentLayer(parity_spec(), 1, backend=backend, project=False)   # x_t -> h_t
    readout = L.Linear(1, 1, weight=[[-0.5]], bias=[0.5])                       # (1 - h) / 2
    return L.Stack([rnn, readout])


def counter_spec() -> rb.Spec:
    """rnn counter(x) -> h[2]: h = h + x * (R @ h - h), R a rotation set by hand."""
    s = rb.Spec("counter", doc="counter mod k: rotate the state by R on every 1")
    x = s.input("x")
    R = s.param("R", 2, 2, init=rb.zeros)  # set to the rotation by 2*pi/k below
    h = s.state("h", 2, init=1)            # h_0 = (1, 1)
    s[h] = h + x * (R @ h - h)             # dense transition I + x (R - I)
    s.output(h)
    return s


def counter_model(k: int = 3, backend: str = "auto") -> L.Stack:
    """[B, T, 1] bits -> [B, T, k] scores; argmax = number of ones so far, mod k."""
    a = 2 * math.pi / k
    rnn = L.RecurrentLayer(counter_spec(), 1, backend=backend, project=False)
    with torch.no_grad():
        rnn.rnn.R.copy_(torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]))
    h0 = torch.tensor([1.0, 1.0])
    # direction c is R^c h0: the state after c ones (mod k)
    dirs = torch.stack([torch.matrix_power(rnn.rnn.R.detach().double(), c).float() @ h0 for c in range(k)])
    readout = L.Linear(2, k, weight=dirs, bias=torch.zeros(k))
    return L.Stack([rnn, readout])


def all_bit_strings(n: int) -> torch.Tensor:
    """All 2^n bit strings of length n: [2^n, n, 1] float32."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n))).unsqueeze(-1)


def check(backends=("sequential", "scan"), n: int = 10, long_T: int = 200, long_B: int = 64, seed: int = 0):
    """Exactness checks; returns a list of (what, backend, ok) rows."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    batches = [("all 2^%d strings" % n, all_bit_strings(n)),
               (f"{long_B} random strings of length {long_T}",
                torch.randint(0, 2, (long_B, long_T, 1), generator=g).float())]
    for backend in backends:
        pm, cm = parity_model(backend), counter_model(3, backend)
        for what, bits in batches:
            count = bits.squeeze(-1).cumsum(1)
            with torch.no_grad():
                par = pm(bits).squeeze(-1)
                cnt = cm(bits).argmax(-1)
            rows.append((f"parity, {what}", pm[0].rnn.backend, torch.equal(par, count % 2)))
            rows.append((f"count mod 3, {what}", cm[0].rnn.backend, torch.equal(cnt, (count % 3).long())))
    return rows


def main():
    print(parity_spec().to_source())
    print(counter_spec().to_source())
    rows = check()
    for what, backend, ok in rows:
        print(f"{'EXACT' if ok else 'WRONG'}  {backend:<10} {what}")
    if not all(ok for *_, ok in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
