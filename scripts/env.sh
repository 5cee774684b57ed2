# Sourced by scripts/test.sh and scripts/bench.sh: activates a cached virtual environment (built when missing
# or when requirements-dev.txt changes) and installs this checkout's ofdkern into it, CUDA kernels included
# whenever nvcc is present (compiled for sm_80 and sm_90 even with no GPU visible).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${OFDKERN_CACHE:-$HOME/.cache/ofdkern}
key=$( (cat "$repo/requirements-dev.txt"; python3 --version) | sha256sum | cut -c1-12)
venv=$cache/venv-$key

if [ ! -f "$venv/.ready" ]; then
  echo "ofdkern: building the environment in $venv (once; torch is large)"
  # Environments of older requirement sets are several GB each: keep only the one being built.
  rm -rf "$cache"/venv-*
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q -r "$repo/requirements-dev.txt"
  touch "$venv/.ready"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

if [ -z "${OFDKERN_NO_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then
  # The nvcc on PATH may be a wrapper script: ask it where its toolkit is rather than guessing.
  CUDA_HOME=${CUDA_HOME:-$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's|^#\$ TOP=\(.*\)/bin/\.\.$|\1|p' | head -1)}
  export CUDA_HOME
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
  export OFDKERN_FORCE_CUDA=1 OFDKERN_EXPECT_CUDA=1
  echo "ofdkern: building with CUDA kernels (CUDA_HOME=$CUDA_HOME, arch $TORCH_CUDA_ARCH_LIST)"
else
  export OFDKERN_NO_CUDA=1
  echo "ofdkern: no nvcc found, building the CPU kernels only"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
(cd "$repo" && pip install -q --no-build-isolation --no-deps -e .)
python -m ofdkern
