#!/usr/bin/env bash
# The GPU checks in one call, on a machine whose python already has a CUDA build of torch, Triton and nvcc (no
# package registry needed; torchvision optional): builds ofdkern in place for the visible GPU when its extension
# is missing or stale, then runs the stages asked for, each logged to LOG_DIR/<stage>.log.
#
#   tools/gpu_check.sh tests sanitize bench     # all three (the default)
#   LOG_DIR=/tmp/logs tools/gpu_check.sh tests
#
# Stages: tests (the whole suite, GPU-marked tests included; 8 pytest-xdist workers of 2 CPU threads each where
# xdist is installed), sanitize (tools/sanitize_cuda.sh: compute-sanitizer memcheck and racecheck over every CUDA
# kernel), bench (benchmarks/run.py --device cuda --quick: every op, the distillation step included unless
# torchvision is missing; JSON, md and one png per op into benchmarks/results/, named by device and date).
# Environment: PYTHON (default python3), LOG_DIR (default ./gpu-logs), TORCH_CUDA_ARCH_LIST (default: the visible
# GPU's), BENCH_TIME_LIMIT (seconds after which the benchmark starts no new case, default 170).
#
# Budget on an H100/H200, about 8 minutes in all: build ~1 min, tests 2-3 min, sanitizer ~1 min, benchmarks ~3 min.
# Each stage runs under a hard cap (tests 210 s, sanitize 90 s, bench 230 s), so one call stays within the device
# tool's 10 minutes per command even when a stage hangs; a capped stage fails the check.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python_bin=${PYTHON:-python3}
log_dir=${LOG_DIR:-gpu-logs}
mkdir -p "$log_dir"
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(tests sanitize bench)

# Rebuild when a source is newer than the built extension (or there is none).
built=$(ls ofdkern/_C*.so 2>/dev/null | head -1 || true)
if [[ -z "$built" ]] || [[ -n "$(find csrc setup.py -newer "$built" -print -quit)" ]]; then
  arch=${TORCH_CUDA_ARCH_LIST:-$("$python_bin" -c \
    'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
  echo "== building ofdkern for sm_${arch/./}"
  start=$SECONDS
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) \
    "$python_bin" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$log_dir/build.log"
  echo "== built in $((SECONDS - start)) s"
fi
"$python_bin" -m ofdkern

status=0
for stage in "${stages[@]}"; do
  echo "== $stage"
  start=$SECONDS
  case "$stage" in
    tests)
      # Spread over 8 pytest-xdist workers where it is installed: on a GPU, Triton compiles every kernel
      # specialization the tests reach, and those compiles are single-threaded per process.
      workers=()
      if "$python_bin" -c "import xdist" 2>/dev/null; then workers=(-n 8); fi
      OFDKERN_EXPECT_CUDA=1 OMP_NUM_THREADS=2 timeout 210 "$python_bin" -m pytest python_tests -q -ra \
        -p no:cacheprovider "${workers[@]}" >"$log_dir/tests.log" 2>&1 || status=1
      tail -25 "$log_dir/tests.log" ;;
    sanitize)
      PYTHON=$python_bin timeout 90 bash tools/sanitize_cuda.sh >"$log_dir/sanitize.log" 2>&1 || status=1
      grep -E "^== |failures|FAIL|ERROR SUMMARY" "$log_dir/sanitize.log" | head -40 ;;
    bench)
      timeout 230 "$python_bin" benchmarks/run.py --device cuda --quick --time-limit "${BENCH_TIME_LIMIT:-170}" \
        >"$log_dir/bench.log" 2>&1 || status=1
      grep -vE "measurement/s|s/measurement" "$log_dir/bench.log" | tail -40 ;;
    *)
      echo "unknown stage $stage (tests, sanitize, bench)" >&2
      exit 2 ;;
  esac
  echo "== $stage: $((SECONDS - start)) s"
done
exit "$status"
