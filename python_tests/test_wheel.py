"""ofdkern as a user installs it: `pip wheel --no-build-isolation .` builds a wheel that carries the license, and
the package installed from it into a fresh virtual environment (not editable, the checkout nowhere on sys.path)
imports and runs every op on the CPU without its compiled extension, through the eager reference with one
warning per op. The wheel with the compiled extension is built and installed the same way by
scripts/test_oldest.sh, whose tests then import it from the environment."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One worker builds the module fixture once (pytest-xdist, --dist loadgroup).
pytestmark = pytest.mark.xdist_group("wheel")

# Run in the fresh environment: every op of op_cases.CASES on CPU float32, backend "auto", against the reference.
CHECK_OPS = textwrap.dedent("""
    import sys, warnings
    import torch
    import ofdkern
    import op_cases

    assert ofdkern.__file__.startswith(sys.prefix), f"ofdkern imported from {ofdkern.__file__}"
    status = ofdkern.backend_status()
    assert not status["cpu"]["built"] and not status["cuda"]["built"], status
    assert "not importable" in status["cpu"]["reason"], status["cpu"]["reason"]
    covered = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for case in op_cases.CASES:
            for _ in range(2):  # the fallback warns once per op and device type
                inputs = case.make("cpu", torch.float32, 0)
                loss = case.fused("auto")(*inputs)
                expected = case.reference(*inputs)
                torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
            covered.add(case.op)
            try:
                case.fused("cpu")(*case.make("cpu", torch.float32, 0))
            except ofdkern.BackendUnavailableError as error:
                assert "not importable" in str(error), error
            else:
                raise AssertionError(f"{case.op}: backend='cpu' ran without the extension")
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sorted(covered) == ofdkern.registered_ops(), (covered, ofdkern.registered_ops())
    for op in covered:
        assert sum(f"ofdkern.{op}:" in message for message in fallbacks) == 1, (op, fallbacks)
    print("ops checked:", sorted(covered))
""")


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def pure_python_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # pip builds in the source tree: build from a copy, so that nothing built in the checkout (its in-place
    # extension, a build/ folder) can slip into the wheel and the checkout stays untouched.
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "__pycache__", "results", "gpu-check"))
    env = {**os.environ, "OFDKERN_NO_EXTENSION": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(out), str(source)],
         env=env, cwd=out)
    (wheel,) = out.glob("ofdkern-*.whl")
    return wheel


def test_wheel_carries_the_license_and_the_package(pure_python_wheel):
    names = zipfile.ZipFile(pure_python_wheel).namelist()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    assert "ofdkern/__init__.py" in names and "ofdkern/ops/ofd.py" in names
    assert not any(name.startswith(("python_tests/", "benchmarks/", "csrc/")) for name in names)
    assert not any(name.endswith(".so") for name in names)  # OFDKERN_NO_EXTENSION=1


def test_installed_without_extension_runs_every_op_through_the_reference(pure_python_wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(pure_python_wheel)])
    # torch and the test helpers come from this environment's site-packages, added by path: its .pth files
    # (the checkout's among them) are not read there, so only the installed wheel provides ofdkern.
    site = Path(sysconfig.get_paths()["purelib"])
    (fresh_site,) = (venv / "lib").glob("python*/site-packages")
    (fresh_site / "outer-site-packages.pth").write_text(f"{site}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO / "python_tests")
    result = _run([str(python), "-c", CHECK_OPS], env=env, cwd=tmp_path)
    assert "ops checked" in result.stdout
