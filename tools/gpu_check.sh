#!/usr/bin/env bash
# Everything a lent GPU is for, in one call under one time budget, on a machine with no network whose Python
# already has a CUDA build of torch, Triton and nvcc (torchvision, pytest-xdist, pytest-timeout and
# compute-sanitizer used where present):
#
#   1. build ofdkern in place for the visible GPU's arch only (whole log kept); stop at once, with the
#      compiler's errors in the summary, unless backend_status() says the CUDA backend is built;
#   2. tests: the GPU tests alone (-m gpu), a per-test timeout, failures named in the summary;
#   3. bench: every op's --quick GPU benchmark (eager, torch.compile, ofdkern cuda and triton, the floor);
#   4. sanitize: compute-sanitizer memcheck, then racecheck, over every CUDA kernel (tools/cuda_sanitize_driver.py).
#
# The stages run in that order of value under one total budget (BUDGET seconds, default 450): each stage may
# use what is left minus a small reserve for the stages after it, so an overrun cannot starve them all, and a
# stage stopped at its share is reported as such. Every file goes to $OUT when it is set (else ./gpu-check),
# at most 8: summary.md (rewritten as each stage ends), build.log, tests.log, bench.log, sanitize.log and
# results.tar.gz (benchmark results, JUnit XML, versions), each written as its stage runs, so a kill loses
# only the stage that was running.
#
#   tools/gpu_check.sh            # on the GPU machine: PYTHON=python3 by default
#   tools/gpu_check.sh --dry-run  # no GPU: the same plumbing on CPU in well under 2 minutes, installing and
#                                 # building nothing (it checks the ofdkern that $PYTHON imports)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    *) echo "usage: tools/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
python_bin=${PYTHON:-python3}
# `python -c` and `python -m` would put the working directory (this checkout) first on sys.path: the ofdkern
# checked is the one the given Python imports (the in-place build here, or an installed one in a dry run).
export PYTHONSAFEPATH=1
out=${OUT:-$repo/gpu-check}
budget=${BUDGET:-$([ "$dry_run" = 1 ] && echo 110 || echo 450)}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$SECONDS
summary=$out/summary.md
stage_lines=()

# Reserve, in seconds, kept for each stage that comes after the running one.
declare -A reserve=([tests]=0 [bench]=60 [sanitize]=40)
[ "$dry_run" = 1 ] && reserve=([tests]=0 [bench]=15 [sanitize]=5)

write_summary() {
  {
    echo "# ofdkern GPU check$([ "$dry_run" = 1 ] && echo " (dry run, no GPU)")"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- machine: ${device_line:-unknown}"
    echo "- versions: ${versions_line:-not read yet}"
    echo "- budget: ${budget} s; used: $((SECONDS - started)) s"
    echo
    echo "| stage | result | seconds | detail |"
    echo "|---|---|---|---|"
    for line in "${stage_lines[@]}"; do echo "$line"; done
    if [ -n "${details:-}" ]; then echo; echo "$details"; fi
  } >"$summary"
}

left() { echo $((budget - (SECONDS - started))); }

# The share of the budget the stage may use: what is left, minus the reserve of every later stage.
share() {
  local stage=$1 later=0 seen=0 name
  for name in tests bench sanitize; do
    if [ "$seen" = 1 ]; then later=$((later + reserve[$name])); fi
    [ "$name" = "$stage" ] && seen=1
  done
  echo $(($(left) - later))
}

# run_stage NAME LOG SECONDS COMMAND...: runs it under timeout, logging to LOG; sets stage_status/stage_seconds.
run_stage() {
  local name=$1 log=$2 seconds=$3
  shift 3
  local begin=$SECONDS
  if [ "$seconds" -lt 10 ]; then
    stage_status="skipped: the budget is spent"
    stage_seconds=0
    echo "== $name: $stage_status" | tee "$log"
    return
  fi
  echo "== $name (up to $seconds s)"
  timeout --kill-after=10 "$seconds" "$@" >"$log" 2>&1
  local code=$?
  stage_seconds=$((SECONDS - begin))
  if [ "$code" = 124 ] || [ "$code" = 137 ]; then
    stage_status="stopped at its share of the budget ($seconds s)"
  elif [ "$code" = 0 ]; then
    stage_status=ok
  else
    stage_status="FAILED (exit $code)"
  fi
  echo "== $name: $stage_status in $stage_seconds s"
}

if [ "$dry_run" = 1 ]; then
  device_line="$(uname -m), $(nproc) CPU cores, no GPU (dry run)"
else
  device_line=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
fi
write_summary

# ---- 1. build (never in a dry run: it checks what the given Python imports)
if [ "$dry_run" = 0 ]; then
  arch=$("$python_bin" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  # The build may not eat the tests' minimum (120 s) nor the later stages' reserves.
  run_stage build "$out/build.log" $(($(left) - reserve[bench] - reserve[sanitize] - 120)) \
    env OFDKERN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    "$python_bin" setup.py build_ext --inplace
  stage_lines+=("| build (sm_${arch/./}) | $stage_status | $stage_seconds | whole log: build.log |")
  export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
fi
# One interpreter start (each costs seconds): the backend matrix, then whether the CUDA backend is built.
backend_report=$("$python_bin" -c 'import ofdkern, ofdkern.__main__ as report
report.main()
print("cuda backend built:", ofdkern.backend_status()["cuda"]["built"])' 2>&1)
versions_line=$(echo "$backend_report" | head -2 | tr '\n' ' ')
if ! echo "$backend_report" | grep -q "^cuda backend built: True$"; then
  errors=$(grep -iE "error|fatal" "$out/build.log" 2>/dev/null | head -30)
  stage_lines+=("| extension check | FAILED | 0 | the CUDA backend is not built: nothing else ran |")
  details=$(printf '## python -m ofdkern\n\n```\n%s\n```\n\n## compiler errors (build.log)\n\n```\n%s\n```\n' \
            "$backend_report" "${errors:-none found in build.log}")
  write_summary
  echo "gpu_check: the CUDA backend is not built; see $summary" >&2
  exit 1
fi
stage_lines+=("| extension check | ok | 0 | backend_status(): cuda built |")
echo "$backend_report" >"$work/backends.txt"
nvidia-smi >"$work/nvidia-smi.txt" 2>&1 || true
write_summary
status=0

# ---- 2. tests: the GPU-marked tests alone (on CPU, in a dry run, they are collected and skip)
xdist=()
if [ "$dry_run" = 0 ] && "$python_bin" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
timeout_flag=()
if "$python_bin" -c "import pytest_timeout" 2>/dev/null; then timeout_flag=(--timeout 120); fi
run_stage tests "$out/tests.log" "$(share tests)" env OFDKERN_EXPECT_CUDA=1 OMP_NUM_THREADS=2 \
  "$python_bin" -m pytest python_tests -m gpu -q -rfEs -p no:cacheprovider "${xdist[@]}" "${timeout_flag[@]}" \
  --junitxml "$work/tests.xml"
[ "$stage_status" = ok ] || status=1
counts=$(grep -E "^=+ .*(passed|failed|skipped|error).* =+$|^[0-9]+ (passed|failed|skipped)" "$out/tests.log" | tail -1)
failed=$(grep -E "^(FAILED|ERROR) " "$out/tests.log" | head -15 | sed 's/^/    /')
stage_lines+=("| tests (-m gpu) | $stage_status | $stage_seconds | ${counts:-no pytest summary (see tests.log)} |")
[ -n "$failed" ] && details+=$(printf '\n## failed tests\n\n%s\n' "$failed")
write_summary

# ---- 3. bench: every op's quick benchmark on the device
bench_dir=$work/bench
mkdir -p "$bench_dir"
if [ "$dry_run" = 1 ]; then
  bench_args=(--device cpu --quick --op kd --groups classification --providers ofdkern-cpu --time-limit 1)
else
  bench_share=$(share bench)
  bench_args=(--device cuda --quick --time-limit $((bench_share > 90 ? bench_share - 60 : 30)))
fi
run_stage bench "$out/bench.log" "$(share bench)" env PYTHONPATH="$repo/benchmarks${PYTHONPATH:+:$PYTHONPATH}" \
  "$python_bin" benchmarks/run.py "${bench_args[@]}" \
  --out-dir "$bench_dir"
[ "$stage_status" = ok ] || status=1
targets=$(grep -cE "^(PASS|MISS) " "$out/bench.log")
misses=$(grep -E "^MISS " "$out/bench.log" | head -10 | sed 's/^/    /')
stage_lines+=("| bench | $stage_status | $stage_seconds | $targets targets checked, $(grep -cE '^MISS ' "$out/bench.log") missed |")
[ -n "$misses" ] && details+=$(printf '\n## missed benchmark targets\n\n%s\n' "$misses")
tar -czf "$out/results.tar.gz" -C "$work" . 2>/dev/null
write_summary

# ---- 4. sanitize: memcheck, then racecheck, over every CUDA kernel instance of the driver
if [ "$dry_run" = 1 ]; then
  # No GPU: the driver is reached and says so (exit 2: the cuda backend runs on no device here).
  run_stage sanitize "$out/sanitize.log" "$(share sanitize)" "$python_bin" tools/cuda_sanitize_driver.py
  [ "$(grep -c "cuda backend not available" "$out/sanitize.log")" = 1 ] && stage_status="ok (driver reached)"
else
  run_stage sanitize "$out/sanitize.log" "$(share sanitize)" env PYTHON="$python_bin" bash tools/sanitize_cuda.sh
fi
case "$stage_status" in ok*) ;; *) status=1 ;; esac
sanitizer=$(grep -E "^== .*(clean|FAILED)|ERROR SUMMARY" "$out/sanitize.log" | tr '\n' ' ' | head -c 300)
stage_lines+=("| sanitize | $stage_status | $stage_seconds | ${sanitizer:-see sanitize.log} |")
tar -czf "$out/results.tar.gz" -C "$work" . 2>/dev/null
write_summary
echo "gpu_check: $(left) s of the budget left; summary in $summary"
exit "$status"
