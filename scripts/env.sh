# Sourced by scripts/test.sh, scripts/bench.sh and scripts/test_oldest.sh: activates a cached virtual
# environment under ~/.cache/ofdkern (built when missing or when its requirements change) and makes this
# checkout's ofdkern importable with its compiled extension, compiling only when a C++/CUDA source, setup.py,
# a build flag or the environment changed (it says which). CUDA kernels are compiled whenever nvcc is present
# (for sm_80 and sm_90, even with no GPU visible).
#
# OFDKERN_ENV picks the end of the tested torch range:
#   newest (default): requirements-dev.txt on python3; the checkout is put on sys.path (edits need no install)
#   oldest:           requirements-oldest.txt on Python 3.12; ofdkern is built as a wheel and installed
#                     (not editable), as a user gets it
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${OFDKERN_CACHE:-$HOME/.cache/ofdkern}
env_name=${OFDKERN_ENV:-newest}
case "$env_name" in
  newest)
    requirements=$repo/requirements-dev.txt
    base_python=${OFDKERN_PYTHON:-python3} ;;
  oldest)
    requirements=$repo/requirements-oldest.txt
    base_python=${OFDKERN_PYTHON:-python3.12}
    # pyenv's shim answers for python3.12 even where that version is not selected: ask it to run.
    if ! "$base_python" --version >/dev/null 2>&1; then
      base_python=$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
    fi ;;
  *)
    echo "ofdkern: OFDKERN_ENV must be newest or oldest, got '$env_name'" >&2
    return 2 2>/dev/null || exit 2 ;;
esac
key=$( (cat "$requirements"; "$base_python" --version) | sha256sum | cut -c1-12)
venv=$cache/venv-$env_name-$key

if [ ! -f "$venv/.ready" ]; then
  echo "ofdkern: building the $env_name environment in $venv (once; torch is large)"
  # Environments of older requirement sets are several GB each: keep only the one being built.
  rm -rf "$cache/venv-$env_name-"*
  mkdir -p "$cache"
  start=$SECONDS
  "$base_python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q -r "$requirements"
  touch "$venv/.ready"
  echo "ofdkern: environment built in $((SECONDS - start)) s"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

if [ -z "${OFDKERN_NO_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then
  # The nvcc on PATH may be a wrapper script: ask it where its toolkit is rather than guessing.
  CUDA_HOME=${CUDA_HOME:-$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's|^#\$ TOP=\(.*\)/bin/\.\.$|\1|p' | head -1)}
  export CUDA_HOME
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
  export OFDKERN_FORCE_CUDA=1 OFDKERN_EXPECT_CUDA=1
  build_kind="CPU and CUDA kernels (CUDA_HOME=$CUDA_HOME, arch $TORCH_CUDA_ARCH_LIST)"
else
  export OFDKERN_NO_CUDA=1
  build_kind="CPU kernels only (no nvcc found)"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# What the extension is built from: its sources, the build scripts, the flags and the toolchain (and for the
# oldest end's wheel, which carries the package, the Python sources too). A build is cached under this stamp,
# so an unchanged checkout (or a fresh clone of the same sources) compiles nothing.
built_from=(csrc)
[ "$env_name" = oldest ] && built_from+=(ofdkern LICENSE README.md)
stamp=$( (cd "$repo" && find "${built_from[@]}" -type f ! -name '*.so' ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum
          sha256sum setup.py pyproject.toml
          python -c 'import sys, torch; print(sys.version, torch.__version__)'
          echo "${OFDKERN_NO_CUDA:-} ${OFDKERN_FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}"
          if [ -z "${OFDKERN_NO_CUDA:-}" ]; then nvcc --version | tail -2; fi
          c++ --version | head -1) | sha256sum | cut -c1-16)
built=$cache/builds-$env_name/$stamp
site_packages=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

if [ "$env_name" = newest ]; then
  if [ -f "$built/.ok" ]; then
    cp -f "$built"/_C*.so "$repo/ofdkern/"
    echo "ofdkern: extension up to date ($build_kind, build $stamp): nothing to compile"
  else
    echo "ofdkern: compiling the extension ($build_kind): a source, a flag or the environment changed"
    start=$SECONDS
    rm -f "$repo"/ofdkern/_C*.so
    # A persistent build folder: ninja recompiles only the sources that changed since the last build here.
    (cd "$repo" && python setup.py -q build_ext --inplace --build-temp "$cache/build-temp-$env_name" >/dev/null)
    mkdir -p "$built" && cp "$repo"/ofdkern/_C*.so "$built/" && touch "$built/.ok"
    echo "ofdkern: compiled in $((SECONDS - start)) s"
  fi
  # The checkout itself is the installed package (edits of the Python code need no reinstall).
  pip uninstall -q -y ofdkern >/dev/null 2>&1 || true
  echo "$repo" >"$site_packages/ofdkern-checkout.pth"
else
  if [ -f "$built/.ok" ]; then
    echo "ofdkern: wheel up to date ($build_kind, build $stamp): nothing to compile"
  else
    echo "ofdkern: building the wheel ($build_kind): a source, a flag or the environment changed"
    start=$SECONDS
    rm -rf "$built" "$repo"/build/lib.* && mkdir -p "$built"  # build/temp.* stays: ninja's incremental state
    (cd "$repo" && pip wheel -q --no-build-isolation --no-deps -w "$built" . >/dev/null)
    touch "$built/.ok"
    echo "ofdkern: wheel built in $((SECONDS - start)) s"
  fi
  rm -f "$site_packages/ofdkern-checkout.pth"
  pip install -q --no-deps --force-reinstall "$built"/ofdkern-*.whl
fi
# Keep the three latest builds.
(cd "$cache/builds-$env_name" && ls -1t | tail -n +4 | xargs -r rm -rf)
PYTHONSAFEPATH=1 python -m ofdkern  # the ofdkern this environment imports, not the working directory's
