#!/usr/bin/env bash
# Download the peers of benchmarks/triton_gpu.py as files into benchmarks/wheels/, on a machine
# with internet, for a GPU machine without it (Python 3.11, Linux x86_64):
#
#   bash benchmarks/fetch_wheels.sh            # then carry benchmarks/wheels/ over and run
#   pip install --no-index --no-deps benchmarks/wheels/*.whl
#
# Wheels only (--only-binary=:all:): a package published only as an sdist (mamba-ssm,
# causal-conv1d) is reported as such and skipped, since building it needs CUDA and nvcc.
# mamba-ssm's Python files are laid out in wheels/mamba_ssm_triton/ instead (its Triton SSD
# kernels run without the CUDA build; see the end of this script).
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

# mamba-ssm has no wheel, and its build needs nvcc. Its Triton SSD kernels
# (mamba_chunk_scan_combined, the mamba2 peer) need no build: lay out its Python files in
# wheels/mamba_ssm_triton/, with a package __init__ that does not import the CUDA selective
# scan. benchmarks/triton_gpu.py puts that folder on sys.path when mamba_ssm is not installed.
"$PY" - "$DEST" <<'PYEOF'
import io, re, sys, tarfile, urllib.request
from pathlib import Path
dest = Path(sys.argv[1]) / "mamba_ssm_triton"
version = "2.3.2.post1"
try:
    page = urllib.request.urlopen("https://pypi.org/simple/mamba-ssm/", timeout=60).read().decode()
    url = next(u for u in re.findall(r'href="([^"]+)"', page) if f"mamba_ssm-{version}.tar.gz" in u)
    data = urllib.request.urlopen(url.split("#")[0], timeout=120).read()
except Exception as e:  # no internet, or the index changed
    sys.exit(f"mamba-ssm {version} sdist not fetched: {e}")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if len(parts) > 1 and parts[1] == "mamba_ssm" and m.isfile() and m.name.endswith(".py"):
            out = dest.joinpath(*parts[1:])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
(dest / "mamba_ssm" / "__init__.py").write_text(
    f'__version__ = "{version}"\n# Python files only: the CUDA selective scan is not built\n')
print(f"mamba-ssm {version}: Python files in {dest}")
PYEOF
