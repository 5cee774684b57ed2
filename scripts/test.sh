#!/usr/bin/env bash
# Sets up (scripts/env.sh) and runs the test suite on two pytest-xdist workers (tests that share a costly
# module fixture stay on one worker: their xdist_group). Triton kernels run under its CPU interpreter when no
# GPU is visible; GPU-only tests run where a CUDA device is. Extra arguments go to pytest (-n 0: one process).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
python -m pytest python_tests -q -ra -p no:cacheprovider -n 2 --dist loadgroup "$@"
