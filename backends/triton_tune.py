"""A small autotuner for the Triton chunk kernels (`triton_chunk`, `triton_delta`).

What it chooses: a `Config` (chunk length, value block BV, num_warps, the walk or two levels,
the key block BK of the linear-attention kernels) for one kernel launch.
The chunk length changes the shapes of buffers the Python side allocates (the per-chunk
states that training stores), which is why this is not `triton.autotune`: its configs can only
change a kernel's meta-parameters, and it needs a GPU driver to benchmark. Every candidate
computes the same function; they differ only in the order of float32 sums.

How: the kernel modules build a short candidate list per call (their `configs()`), and
`choose(key, candidates, default, bench, device)` returns

- the default, untimed, when `RNNC_TRITON_TUNE=0`, or when the tensors are not on CUDA and no
  timer was injected (CPU under `TRITON_INTERPRET=1`: the interpreter's speed says nothing
  about a GPU's), or while a CUDA graph is being captured;
- else the winner cached for `key` in this process;
- else it times every candidate (and the default) once (with RNNC_TRITON_TUNE=N, N >= 2,
  only the default and N - 1 others spread over the list: `limit`), through `TIMER` when a test injected
  one and `cuda_timer` otherwise (one warm-up launch, which also compiles, then `REPS` timed
  launches between CUDA events; the fastest of them counts), caches the fastest and returns it.
  A candidate that fails (out of resources, out of memory) counts as infinitely slow; if every
  candidate fails, the default is returned and the real launch reports the error.

The key is built by the caller: the kernel family, B, H, K, V, L rounded up to a power of two
(`bucket`), the dtypes, the kernel's flags and the device's name. A forward chooses the chunk;
the backward, which must walk the forward's stored per-chunk states, is tuned under its own key
with the chunk fixed to the forward's (it chooses BV and num_warps only). Since a training
forward's chunk fixes its backward's, the callers' bench for a training forward launches each
candidate's forward followed by the backward at that chunk's default config.

Cost: a key is timed once per process, about (1 + REPS) launches of each of 10-25 candidates;
the first time a config is seen Triton also compiles it (cached on disk by Triton afterwards).
A training forward's candidates also compile the backward's default config at each distinct
chunk among them.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import torch

ENV = "RNNC_TRITON_TUNE"
CHUNKS = (16, 32, 64)     # chunk lengths tried (where the kernel takes them and L reaches them)
WARPS = (2, 4, 8)
PER_THREAD = (16, 32)     # state-tile values per thread that a warps candidate must give ...
SMALL_TILE = PER_THREAD[0] * 32 * min(WARPS)  # ... except below this, where the fewest warps do
OPERAND_LIMIT = 64        # values per thread of the kernel's largest other register tile
REPS = 3                  # timed launches per candidate (after one warm-up launch)


class Config(NamedTuple):
    chunk: int      # steps per chunk
    block_v: int    # value channels per program (BV)
    warps: int      # num_warps
    split: bool = False  # two-level kernels (a chunk-state pass, then every chunk in parallel)
    block_k: int = 0     # key channels per program (BK) where the key axis is split; 0: all K


# The timer: (key, config, run) -> seconds (any consistent unit), where run() launches the
# candidate once. None: cuda_timer, on CUDA tensors only. Tests inject a function here.
TIMER: Callable | None = None
_chosen: dict = {}


def enabled() -> bool:
    """False when RNNC_TRITON_TUNE is 0 (or off / false / no): the defaults, never timed."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def limit() -> int | None:
    """The most candidates a key may time, the default included: RNNC_TRITON_TUNE=N for an
    integer N >= 2 (each candidate's first launch compiles it, seconds apiece for the chunk
    kernels, so a short GPU session caps the list); None (every candidate) otherwise."""
    v = os.environ.get(ENV, "").strip()
    return int(v) if v.isdigit() and int(v) >= 2 else None


def _spread(cands: list, n: int) -> list:
    """n of cands, evenly spaced over the list (its first and last included), in order: the
    lists run from small chunks to large and walk to split, so a spread keeps each kind."""
    if n >= len(cands):
        return cands
    if n == 1:
        return cands[:1]
    return [cands[round(i * (len(cands) - 1) / (n - 1))] for i in range(n)]


def bucket(L: int) -> int:
    """L rounded up to a power of two: the part of a key that stands for the length."""
    return 1 << max(0, (int(L) - 1).bit_length())


def device_tag(device: torch.device) -> str:
    """The device part of a key: the GPU's name on CUDA (configs differ between GPUs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def warps_for(state_tile: int, operand_tile: int = 0) -> list:
    """num_warps candidates for a program holding a state tile of `state_tile` float32 values
    (plus an operand tile of `operand_tile`): those giving PER_THREAD state values per thread
    with at most OPERAND_LIMIT operand values per thread; the fewest warps for a small tile;
    none (the config is dropped) for a tile too big for any of them."""
    lo, hi = PER_THREAD
    ws = [w for w in WARPS if lo <= state_tile / (32 * w) <= hi]
    if not ws and state_tile < SMALL_TILE:
        ws = [min(WARPS)]
    return [w for w in ws if operand_tile / (32 * w) <= OPERAND_LIMIT]


def choose(key: tuple, candidates, default: Config, bench: Callable, device) -> Config:
    """The config to launch for `key` (see the module's docstring). bench(config) sets up a
    candidate (allocating its own output buffers, never the caller's) and returns a function
    of no arguments that launches it once."""
    if not enabled():
        return default
    if key in _chosen:
        return _chosen[key]
    timer = TIMER
    if timer is None:
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return default
        timer = cuda_timer
    others = [c for c in dict.fromkeys(candidates) if c != default]
    cap = limit()
    cands = [default] + (_spread(others, cap - 1) if cap else others)
    best, best_t = default, math.inf
    for c in cands:
        try:
            t = float(timer(key, c, bench(c)))
        except Exception:  # noqa: BLE001  a config this device cannot run is not a choice
            continue
        if t < best_t:   # ties keep the earlier one: the default first
            best, best_t = c, t
    _chosen[key] = best
    return best


def cuda_timer(key, config: Config, run: Callable) -> float:
    """Milliseconds of one launch: a warm-up launch (compiling the config the first time),
    then the fastest of REPS launches timed with CUDA events."""
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(REPS):
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def chosen() -> dict:
    """{key: config} chosen so far in this process."""
    return dict(_chosen)


def clear() -> None:
    """Forget every choice (the next call of each key times again)."""
    _chosen.clear()


__all__ = ["Config", "choose", "chosen", "clear", "enabled", "limit", "bucket", "device_tag", "warps_for",
           "cuda_timer", "CHUNKS", "WARPS"]
