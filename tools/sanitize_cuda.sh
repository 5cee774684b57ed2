#!/usr/bin/env bash
# Runs tools/cuda_sanitize_driver.py under compute-sanitizer memcheck and racecheck (on a GPU machine,
# with ofdkern built with its CUDA kernels). Exits non-zero on any sanitizer error or driver mismatch.
#
#   tools/sanitize_cuda.sh              # both tools
#   tools/sanitize_cuda.sh memcheck     # a subset
# Environment: PYTHON (default python), COMPUTE_SANITIZER (default: on PATH, else $CUDA_HOME/bin).
set -euo pipefail

cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python}"
sanitizer="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
if [[ ! -x "$sanitizer" ]]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(memcheck racecheck)

# Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees out-of-bounds
# accesses that would otherwise land inside a cached block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

status=0
for tool in "${tools[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  if ! "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$python_bin" tools/cuda_sanitize_driver.py; then
    echo "== $tool: FAILED" >&2
    status=1
  else
    echo "== $tool: clean"
  fi
done
exit "$status"
