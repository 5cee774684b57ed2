#!/usr/bin/env bash
# Sets up (scripts/env.sh) and runs the test suite. Triton kernels run under its CPU interpreter when no GPU
# is visible; GPU-only tests run where a CUDA device is.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
python -m pytest python_tests -q -ra -p no:cacheprovider "$@"
