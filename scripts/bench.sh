#!/usr/bin/env bash
# Sets up (scripts/env.sh) and runs the benchmark table (benchmarks/run.py; pass --quick for a short run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
python benchmarks/run.py "$@"
