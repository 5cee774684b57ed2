#!/usr/bin/env bash
# The tests at the oldest end of the tested torch range (requirements-oldest.txt: Python 3.12, torch 2.11,
# Triton 3.6, what the lent GPU machine runs): ofdkern built as a wheel with its CUDA kernels and installed
# into that environment, not editable; then the tests that touch every op, backend and kernel file, run from
# outside the checkout so that the installed package is the one imported. CI runs it after scripts/test.sh.
set -euo pipefail
export OFDKERN_ENV=oldest
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo/python_tests"
python - <<'PY'
import ofdkern, sys
assert "site-packages" in ofdkern.__file__, f"ofdkern imported from {ofdkern.__file__}, not the installed wheel"
PY
python -m pytest -q -ra -p no:cacheprovider --timeout 600 -n 2 --dist loadgroup "$@" $(grep -v "^#" "$repo/scripts/oldest_tests.txt")
