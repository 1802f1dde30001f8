#!/usr/bin/env bash
# Download the peers of benchmarks/triton_gpu.py as files into benchmarks/wheels/, on a machine
# with internet, for a GPU machine without it (Python 3.11, Linux x86_64):
#
#   bash benchmarks/fetch_wheels.sh            # then carry benchmarks/wheels/ over and run
#   pip install --no-index --no-deps benchmarks/wheels/*.whl
#
# Wheels only (--only-binary=:all:): a package published only as an sdist (mamba-ssm,
# causal-conv1d) is reported as such and skipped, since building it needs CUDA and nvcc.
# torch and triton are not fetched: the GPU machine's CUDA build of torch must be used.
set -u
cd "$(dirname "$0")"
DEST=wheels
mkdir -p "$DEST"
PY=${PYTHON:-python}
PKGS=(
  # rnnc's own dependencies (pure Python), in case the GPU machine lacks them
  "lark" "networkx" "sympy" "mpmath<1.4"
  # the peers
  "fla-core==0.6.0"
  "einops"
  "accelerated-scan==0.3.1"
  "mamba-ssm==2.3.2.post1"
  "causal-conv1d==1.7.0"
)
ok=(); failed=()
for p in "${PKGS[@]}"; do
  if "$PY" -m pip download --no-deps --only-binary=:all: -d "$DEST" \
       --python-version 3.11 --implementation cp --abi cp311 \
       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
       "$p" >"$DEST/.log-${p%%[=<>]*}" 2>&1; then
    ok+=("$p")
  else
    failed+=("$p")
    echo "no wheel for $p (see $DEST/.log-${p%%[=<>]*}; an sdist-only package needs CUDA to build)" >&2
  fi
done
echo "downloaded: ${ok[*]:-none}"
echo "not downloaded: ${failed[*]:-none}"
ls -l "$DEST"/*.whl 2>/dev/null
du -ch "$DEST"/*.whl 2>/dev/null | tail -1
