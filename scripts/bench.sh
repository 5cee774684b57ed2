#!/usr/bin/env bash
# Sets up (scripts/env.sh) and runs the benchmark suite (benchmarks/run.py): every op by default; --op NAME[,NAME]
# for some, --quick for a short run (every op in under 3 minutes on 2 CPU cores), --help for the rest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
python benchmarks/run.py "$@"
