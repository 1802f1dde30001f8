#!/usr/bin/env bash
# The GPU measurements the open issues ask for, in stages that each fit a 10-minute command on
# a machine without internet. Run from the repository root, with benchmarks/wheels/ carried
# over (bash benchmarks/fetch_wheels.sh on a machine with internet fills it):
#
#   bash benchmarks/gpu_session.sh STAGE [OUTDIR]
#
# A session lent 15 minutes of device time in all (the machine's start included) gets one
# command: run `bash benchmarks/gpu_session.sh session $OUT` with benchmarks/wheels carried and
# a 600 s limit. That stage starts no case after its deadline and writes its results after
# every case, so whatever ran comes back even if the command is cut off.
#
# Stages (each writes OUTDIR/<stage>/, default benchmarks/results/gpu/<stage>/):
#   session the one-command plan: first what is cheap and never measured (issue 5's scan
#           kernel on the first-order scan and on s6, and the wide kernels on lstm at H=768, a launch
#           per step and, as lstm_sync, one launch per pass
#           against cuDNN, a minute or two), then issue 6's four chunk
#           cases at T=2048 (bf16, forward and forward+backward, rnnc's tuner capped at 4
#           candidates a key: RNNC_TRITON_TUNE=4), then the multi-head LSTM and the fla fused
#           cases (measured in session 2) if time is left; no case starts after 390 s
#           (SESSION_DEADLINE), the whole stage is cut at 520 s (SESSION_LIMIT); the log is
#           OUTDIR/session/log.txt
#   check   full-size correctness of every example, fp32 and bf16 (benchmarks/triton_check.py)
#   scan    issue 5: first-order scan (B=8 T=4096 D=1536, fp32 and bf16) vs accelerated-scan,
#           and s6 (B=4 T=4096 D=1536 N=16) vs mamba-ssm's selective_scan_fn where it is built
#   rnn     issue 5: lstm, gru (B=16 T=1024 H=768) and multi-head lstm vs cuDNN
#   fla     issue 5: gla, retnet, gated_deltanet vs fla's fused_recurrent_* (B=4 T=2048 H=8 K=V=64)
#   chunk1  issue 6: gla at B=8 H=16 K=V=128 T=2048/8192 bf16 vs fla chunk_gla
#   chunk2  issue 6: retnet, same shapes, vs fla chunk_simple_gla
#   chunk3  issue 6: mamba2 (N=P=128) vs fla chunk_simple_gla and mamba-ssm's SSD
#   chunk4  issue 6: gated_deltanet vs fla chunk_gated_delta_rule
#           (one spec per stage: the first call of each shape compiles and tunes both sides)
#   chunk5  hgrn2 and rwkv6 at chunk4's shapes vs fla chunk_gla (hgrn2's gates computed in
#           rnnc's kernels, materialised for fla's) and fla chunk_rwkv6
#   chunk6  kda and rwkv7 at chunk4's shapes vs fla chunk_kda and chunk_rwkv7 (rnnc: the
#           triton_dplr chunk kernels, the gates computed in them, KDA on the shared w = p
#           path; never yet run on a GPU)
#   chunk6fused the same with RNNC_TRITON_KERNEL=fused (rnnc's fused recurrent kernel): which of
#           rnnc's two kernels should run a decay per key channel
#   newton  the newton backend (DEER) on small states over long sequences vs cuDNN: GRU H=64 and a
#           multi-head LSTM (16 heads of 16) at B=16 T=4096
#   chunkbf16 issue 6's four chunk cases at T=2048 again with RNNC_TRITON_DOT=bf16 (rnnc's
#           chunk-kernel products on bf16 operands, as fla's): whether that mode pays on a GPU
#   all     every stage in turn (longer than one 10-minute command)
#
# The environment: peers and rnnc's own pure-Python dependencies are installed from
# benchmarks/wheels/ into /tmp/rnnc-site (never over the machine's CUDA torch and triton), and
# rnnc is put on PYTHONPATH from this checkout.
set -u
STAGE=${1:?"usage: bash benchmarks/gpu_session.sh session|check|scan|rnn|fla|chunk1|chunk2|chunk3|chunk4|chunk5|chunk6|chunk6fused|newton|chunkbf16|all [OUTDIR]"}
OUT=${2:-benchmarks/results/gpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
SITE=/tmp/rnnc-site
if [ ! -f "$SITE/.done" ]; then
  mkdir -p "$SITE"
  if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" benchmarks/wheels/*.whl || echo "warning: some wheels did not install" >&2
  else
    echo "note: benchmarks/wheels/ has no wheels; peers that are not installed are reported so" >&2
  fi
  touch "$SITE/.done"
fi
# rnnc's packages: rnnc/ at the root, and its backends/ and grammar/ under the rnnc namespace
# (pyproject's package-dir); an editable install does the mapping.
"$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >/dev/null 2>&1 \
  || echo "warning: pip install -e . failed; rnnc must already be importable" >&2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || exit 1
import torch, triton, rnnc
print(f"torch {torch.__version__}, triton {triton.__version__}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: nothing to measure")
EOF

run() {  # run NAME ARGS...: benchmarks/triton_gpu.py into OUT/NAME
  local name=$1; shift
  mkdir -p "$OUT/$name"
  echo "== $name: python benchmarks/triton_gpu.py $* --out $OUT/$name"
  "$PY" benchmarks/triton_gpu.py "$@" --out "$OUT/$name"
}

stage() {
  case $1 in
    check)  mkdir -p "$OUT/check"
            "$PY" benchmarks/triton_check.py --out "$OUT/check/triton_check.md" ;;
    scan)   run scan --cases scan,s6 ;;
    rnn)    run rnn --cases lstm,gru,mhlstm ;;
    fla)    run fla --cases fla ;;
    chunk1) run chunk1 --cases chunk_gla ;;
    chunk2) run chunk2 --cases chunk_retnet ;;
    chunk3) run chunk3 --cases chunk_mamba2 ;;
    chunk4) run chunk4 --cases chunk_gated_deltanet ;;
    chunk5) run chunk5 --cases chunk_hgrn2,chunk_rwkv6 ;;
    chunk6) run chunk6 --cases chunk_kda,chunk_rwkv7 ;;
    chunk6fused) RNNC_TRITON_KERNEL=fused run chunk6fused --cases chunk_kda,chunk_rwkv7 ;;
    newton) run newton --cases gru_small,mhlstm_small --backend newton ;;
    chunkbf16) RNNC_TRITON_DOT=bf16 RNNC_TRITON_TUNE=${RNNC_TRITON_TUNE:-4} \
              run chunkbf16 --cases chunk --chunk-T 2048 ;;
    session) mkdir -p "$OUT/session"
            RNNC_TRITON_TUNE=${RNNC_TRITON_TUNE:-4} timeout "${SESSION_LIMIT:-520}" \
              "$PY" benchmarks/triton_gpu.py \
              --cases scan,s6,lstm,lstm_sync,chunk_gla,chunk_gated_deltanet,chunk_retnet,chunk_mamba2,mhlstm,fla \
              --chunk-T 2048 --rep-ms 50 --deadline-s "${SESSION_DEADLINE:-390}" \
              --out "$OUT/session" 2>&1 | tee "$OUT/session/log.txt" ;;
    *)      echo "unknown stage $1" >&2; return 2 ;;
  esac
}

if [ "$STAGE" = all ]; then
  for s in check scan rnn fla chunk1 chunk2 chunk3 chunk4 chunk5 chunk6; do stage "$s"; done
else
  stage "$STAGE"
fi
