"""rnnc.contract.einsum: the same sums as torch.einsum, in an order that keeps products small."""
import random

import pytest
import torch

from rnnc import contract


@pytest.mark.parametrize("seed", range(40))
def test_matches_torch_einsum(seed):
    """Random products of 1 to 5 operands over up to 5 letters, some summed, some kept,
    with size-1 (broadcast) axes and a leading batch axis that some operands lack."""
    rng = random.Random(seed)
    letters = "abcde"[:rng.randint(1, 5)]
    size = {c: rng.choice([1, 2, 3, 4]) for c in letters}
    subs, ops = [], []
    for _ in range(rng.randint(1, 5)):
        s = "".join(c for c in letters if rng.random() < 0.6) or rng.choice(letters)
        lead = (rng.choice([1, 3]),)
        subs.append(s)
        ops.append(torch.randn(*lead, *(size[c] if rng.random() < 0.8 else 1 for c in s),
                               dtype=torch.float64))
    present = "".join(dict.fromkeys("".join(subs)))
    out = "".join(c for c in present if rng.random() < 0.5)
    want = torch.einsum(",".join("..." + s for s in subs) + "->..." + out, *ops)
    got = contract.einsum(subs, out, ops)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cross_term_never_builds_the_outer_product(monkeypatch):
    """Gated DeltaProduct's cross term b1[n] k2[n, i] (k2 . k1)[n] b2[n]: left to right,
    torch.einsum would build k2[n, i] k1[n, c] as [N, K, K]; here nothing larger than [N, K]."""
    N, K = 64, 32
    b1, b2 = torch.randn(N, 1), torch.randn(N, 1)
    k1, k2 = torch.randn(N, 1, K), torch.randn(N, 1, K)
    subs = ["a", "ab", "ac", "a", "ac", "a"]
    ops = [b1, k2, k1, b2, k2, torch.randn(N, 1)]
    sizes = []
    real = torch.einsum

    def spy(eq, *xs):
        y = real(eq, *xs)
        sizes.append((y.numel(), len(xs)))
        return y
    monkeypatch.setattr(torch, "einsum", spy)
    got = contract.einsum(subs, "ab", ops)
    monkeypatch.setattr(torch, "einsum", real)
    # pairs only, so every intermediate is one of the recorded outputs
    assert all(n <= 2 for _, n in sizes)
    assert max(size for size, _ in sizes) <= N * K
    want = torch.einsum(",".join("..." + s for s in subs) + "->...ab", *ops)
    torch.testing.assert_close(got, want)
