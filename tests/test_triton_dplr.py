"""Triton chunk kernels for the diagonal-plus-rank-1 form with a decay per key channel
(backends/triton_dplr.py: Kimi Delta Attention, RWKV-7) under Triton's CPU interpreter.

Forward and backward are judged against `scan_kernels.chunk_dplr` in float64, relative to that
PyTorch form's own float32 error (err <= 20 * err_torch32 + 1e-6, every output and every
gradient); that form is itself checked against a step-by-step loop in test_scan_kernels.py.
The kernels are also compiled to an sm_90 cubin in a process without the interpreter.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rnnc import RnncError
from rnnc.backends import scan_kernels as sk

triton = pytest.importorskip("triton")
from rnnc.backends import triton_dplr as td  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import compile_offline, kernel_against_torch  # noqa: E402

F64, F32 = torch.float64, torch.float32
B, H, K, V = 2, 2, 16, 24
NEG_INF = float("-inf")

pytestmark = pytest.mark.usefixtures("one_thread")


def make(L, kind="kda", seed=0, per_head=False, B=B):
    """float64 (q, r, w, p, v, log_alpha, S0). kind 'kda': decay before the erase (r = alpha k,
    w = p = beta k, one tensor); 'rwkv7': w = a kk, r = kk, p = k (three tensors); 'after':
    the decay after the erase (w = alpha beta k, r = k, p = beta k)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    k = torch.nn.functional.normalize(rn(B, L, H, K), dim=-1)
    la = -torch.rand(B, L, H, 1 if per_head else K, generator=g, dtype=F64)
    alpha = torch.exp(la)
    beta = torch.rand(B, L, H, 1, generator=g, dtype=F64)
    if kind == "kda":
        r, w = alpha * k, beta * k
        p = w
    elif kind == "rwkv7":
        a = torch.rand(B, L, H, K, generator=g, dtype=F64)
        r, w, p = k, a * k, 0.5 * torch.nn.functional.normalize(rn(B, L, H, K), dim=-1)
    else:
        r, w, p = k, alpha * beta * k, beta * k
    return [rn(B, L, H, K), r, w, p, rn(B, L, H, V), la, rn(B, H, K, V)]


def run(fn, xs, go, gs, dtype=None):
    """(o, S_last, grads of q, r, w, p, v, log_alpha, S0) of <o, go> + <S_last, gs>, the
    inputs cast to dtype; w and p stay one tensor where make() made them one."""
    shared = xs[2] is xs[3]
    leaves = [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]
    if shared:
        leaves[3] = leaves[2]
    o, S = fn(*leaves)
    loss = (S.to(F64) * gs).sum() + (0 if o is None else (o.to(F64) * go).sum())
    loss.backward()
    grads = [None if x is None or (shared and i == 3) else x.grad for i, x in enumerate(leaves)]
    return [o, S] + grads


NAMES = ["o", "S_last", "dq", "dr", "dw", "dp", "dv", "dlog_alpha", "dS0"]


def compare(L, kind="kda", inc=True, q=True, seed=0, per_head=False, edit=None, chunk=16,
            block_v=16, B=B):
    return kernel_against_torch(
        run, lambda *a: sk.chunk_dplr(*a, chunk=16, include_current=inc),
        lambda *a: td.chunk_dplr(*a, chunk=chunk, include_current=inc, block_v=block_v),
        make(L, kind, seed, per_head, B), [(B, L, H, V), (B, H, K, V)], NAMES, seed, edit, q)


@pytest.mark.parametrize("L,kind,batch", [(1, "kda", 1), (17, "kda", 2), (40, "kda", 1),
                                          (1, "rwkv7", 1), (33, "rwkv7", 1)])
def test_matches_reference(L, kind, batch):
    """Outputs, final state and every gradient at chunk 16: one chunk of one step, a chunk
    and a step, and three chunks (the last cut short); KDA's one w = p tensor, RWKV-7's
    three. V = 24 takes two V blocks of 16 (the K-side gradients are summed over them;
    compare's default). One batch entry where a second only costs interpreter time; the
    batch offsets are checked at L = 17 here and in the tests below."""
    compare(L, kind, seed=L, B=batch)


def test_old_state_readout_and_decay_after_the_erase():
    """o_t = S_{t-1}^T q_t (include_current=False), with the decay after the erase."""
    compare(21, "after", inc=False, seed=3, B=1)


def test_one_decay_per_head():
    """log_alpha [B, L, H, 1]: its gradient comes back summed over the key channels."""
    got = compare(9, "kda", seed=4, per_head=True)
    assert got[7].shape == (B, 9, H, 1)


def test_without_q():
    got = compare(9, "rwkv7", q=False, seed=5)
    assert got[0] is None and got[2] is None


def test_larger_chunk():
    compare(20, "kda", seed=6, chunk=32, block_v=None)   # one chunk of 32 steps


@pytest.mark.parametrize("kind", ["after", "kda"], ids=["w_ne_p", "w_is_p"])
def test_extreme_decays(kind):
    """Decays of exactly 0 (log alpha = -inf: the channel is wiped), e^-30 and 1 - 1e-6 in
    one block: finite, and every gradient as the reference's (0 where alpha = 0), through
    the general and the shared (w is p) path."""
    def extremes(xs):
        la = xs[5].clone()
        la[:, 2:5] = -30.0
        la[:, 9] = -1e-6
        la[0, 6, 0, :3] = la[1, 12, 1] = NEG_INF
        xs[5] = la
    got = compare(14, kind, seed=7, edit=extremes)
    assert not got[7][0, 6, 0, :3].any() and not got[7][1, 12, 1].any()


def _launch_flags(monkeypatch):
    """[(kernel, SHARED)] of every launch of the dplr kernels from now on."""
    seen, real = [], td.kernels

    class Module:
        def __init__(self, mod):
            self.mod = mod

        def __getattr__(self, name):
            fn = getattr(self.mod, name)

            class Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kw):
                        seen.append((name, kw["SHARED"]))
                        return fn[grid](*args, **kw)
                    return launch
            return Grid()
    monkeypatch.setattr(td, "kernels", lambda *a, **k: Module(real(*a, **k)))
    return seen


def test_w_is_p_takes_the_shared_path(monkeypatch):
    """One tensor passed as w and p (KDA) runs the kernels' SHARED path (half the pair scores,
    U = V - Y); two equal tensors run the general one. Both give the same outputs and state,
    and the shared w's gradient is the sum of the two tensors' (p's is not computed apart)."""
    seen = _launch_flags(monkeypatch)
    q, r, w, _, v, la, S0 = make(21, "kda", seed=11, B=1)
    g = torch.Generator().manual_seed(12)
    go, gs = torch.randn(1, 21, H, V, generator=g, dtype=F64), torch.randn(1, H, K, V, generator=g, dtype=F64)
    fn = lambda *a: td.chunk_dplr(*a, chunk=16, block_v=16)  # noqa: E731
    one = run(fn, [q, r, w, w, v, la, S0], go, gs, F32)
    assert seen == [("dplr_fwd", True), ("dplr_bwd", True)] and one[5] is None
    seen.clear()
    two = run(fn, [q, r, w, w.clone(), v, la, S0], go, gs, F32)
    assert seen == [("dplr_fwd", False), ("dplr_bwd", False)]
    for name, a, b in zip(NAMES, one, two):
        if name != "dp":
            b = b + two[5] if name == "dw" else b
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_inputs():
    """bfloat16 inputs are read as they are and computed in float32: the outputs against the
    float64 reference on the same (rounded) inputs."""
    xs = [x.to(torch.bfloat16) for x in make(18, "rwkv7", seed=8)]
    o, S = td.chunk_dplr(*xs)
    ref_o, ref_S = sk.chunk_dplr(*[x.to(F64) for x in xs], chunk=16)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.bfloat16
    assert (o.to(F64) - ref_o).abs().max() <= 2e-2 * ref_o.abs().max()
    assert (S.to(F64) - ref_S).abs().max() <= 2e-2 * ref_S.abs().max()


def test_fla_naive_kda_oracle():
    """fla-core's naive recurrent KDA (no one here wrote it) gives the kernel's outputs and
    final state: S <- (I - beta k k^T) diag(exp g) S + beta k v^T, o = S^T q * scale."""
    naive = pytest.importorskip("fla.ops.kda.naive")
    q, r, w, _, v, la, S0 = make(33, "kda", seed=9)
    k = r / torch.exp(la)             # make() built r = alpha k, w = beta k, |k| = 1
    beta = (w * k).sum(-1)
    o_fla, S_fla = naive.naive_recurrent_kda(q.float(), k.float(), v.float(), la.float(),
                                             beta.float(), scale=1.0, initial_state=S0.float(),
                                             output_final_state=True)
    ref = sk.chunk_dplr(q, r, w, w, v, la, S0, chunk=16)
    w32 = w.float()
    got = td.chunk_dplr(q.float(), r.float(), w32, w32, v.float(), la.float(), S0.float())
    for a, b, c, name in zip(ref, (o_fla, S_fla), got, ("o", "S_last")):
        bound = (b.to(F64) - a).abs().max().item() + (c.to(F64) - a).abs().max().item()
        assert (c - b).abs().max().item() <= 20 * bound + 1e-6, name


@pytest.mark.parametrize("bad,message", [
    (dict(chunk=12), "chunk must be one of"),
    (dict(block_v=24), "block_v must be a power of two"),
    (dict(r=torch.zeros(1, 3, 1, 2, 4)), "several erase or input terms"),
    (dict(v=torch.zeros(1, 4, 1, 3)), "v must be"),
    (dict(log_alpha=torch.zeros(1, 3, 1, 2)), "log_alpha must be"),
    (dict(q=torch.zeros(1, 3, 1, 4, dtype=F64), r=torch.zeros(1, 3, 1, 4, dtype=F64)), "float64"),
])
def test_bad_arguments_are_clear_errors(bad, message):
    args = dict(q=torch.zeros(1, 3, 1, 4), r=torch.zeros(1, 3, 1, 4), w=torch.zeros(1, 3, 1, 4),
                p=torch.zeros(1, 3, 1, 4), v=torch.zeros(1, 3, 1, 2),
                log_alpha=torch.zeros(1, 3, 1, 4), S0=torch.zeros(1, 1, 4, 2))
    chunk, block_v = bad.pop("chunk", 16), bad.pop("block_v", None)
    args.update(bad)
    with pytest.raises(RnncError, match=message):
        td.chunk_dplr(**args, chunk=chunk, block_v=block_v)


def test_compiles_for_sm90():
    """The forward and backward kernels compile to sm_90 cubins (tf32 and bf16 inputs, w and p
    apart and shared), and KDA's backward with its gates as streams (the loaders the block
    solver's stream signatures generate: r = exp(g) k, w = p = beta k)."""
    compile_offline(
        "import rnnc, rnnc.analysis\n"
        "from rnnc.backends import triton_backend as tb, triton_dplr as td\n"
        "a = td.compile_for(K=32, V=32, chunk=16, variants=[(True, True), (False, True)])\n"
        "b = td.compile_for(K=32, V=32, chunk=16, dtype='bf16', variants=[(True, False)],"
        " per_channel=False, shared=True)\n"
        "kda = rnnc.load('examples/kda.rnn')\n"
        "sigs = tb.chunk_signatures(kda, rnnc.analysis.analyse(kda))\n"
        "assert len(sigs[1][1]) == 2   # r's two leaves, k and g\n"
        "c = td.compile_for(K=32, V=32, chunk=16, dtype='bf16', variants=[(True, True)],"
        " shared=True, sigs=sigs, names=('dplr_bwd',))\n"
        "assert all(v['cubin'] > 0 for v in {**a, **b, **c}.values())\n"
        "print('compiled')\n")


def test_emit_shows_the_dplr_kernels():
    """`rnnc compile --emit` for a decay per key channel prints these kernels after the
    generated code; Gated DeltaProduct (three low-rank terms) says it has none."""
    import rnnc
    from rnnc.backends import triton_backend as tb
    root = Path(__file__).resolve().parent.parent / "examples"
    kda = rnnc.load(str(root / "kda.rnn"))
    lib = tb.emit(kda, rnnc.analysis.analyse(kda)).partition(tb.LIBRARY_MARKER)[2]
    assert "def dplr_fwd(" in lib and "def dplr_bwd(" in lib
    gdp = rnnc.load(str(root / "gated_deltaproduct.rnn"))
    lib = tb.emit(gdp, rnnc.analysis.analyse(gdp)).partition(tb.LIBRARY_MARKER)[2]
    assert lib.startswith(": none.") and "dplr_fwd" not in lib
