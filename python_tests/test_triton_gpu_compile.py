"""The Triton kernels as a GPU compiles them, checked on any machine: every specialization the entry points
launch compiles to a cubin for sm_90 and sm_80, fits the shared memory of a block, and launches a grid within
CUDA's limits (triton_gpu_compile.py). Triton's interpreter, which runs them in the other tests here, checks
none of this: it took a non-constexpr global, dots of two dtypes and a 65,536-block grid axis that a GPU would
refuse. And torch's float32 matmul setting, which picks the dots' TF32, read however it was set."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _without_interpreter() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_every_triton_kernel_compiles_for_gpus():
    result = subprocess.run([sys.executable, str(HERE / "triton_gpu_compile.py")], capture_output=True, text=True,
                            env=_without_interpreter(), timeout=1500)
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["failures"] == [], "\n".join(report["failures"][:40])
    assert result.returncode == 0, result.stderr[-3000:]
    # Every kernel of every op was reached, in both targets' builds.
    assert set(report["kernels"]) >= {
        "_ofd_fused_kernel", "_scale_kernel", "_align_kernel", "_pixel_gemm_kernel", "_weight_gradient_kernel",
        "_attention_map_kernel", "_attention_map_backward_kernel", "_attention_maps_kernel", "_kd_stats_kernel",
        "_kd_terms_kernel", "_kd_finish_kernel", "_kd_teacher_grad_kernel"}
    assert report["specializations"] >= 300


_PRECISION_CASES = {
    "default": ("", False),
    "legacy allow_tf32": ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    "legacy matmul precision high": ('torch.set_float32_matmul_precision("high")', True),
    "legacy matmul precision highest": ('torch.set_float32_matmul_precision("highest")', False),
    "new cuda.matmul tf32": ('torch.backends.cuda.matmul.fp32_precision = "tf32"', True),
    "new cuda.matmul ieee": ('torch.backends.cuda.matmul.fp32_precision = "ieee"', False),
    "new generic tf32": ('torch.backends.fp32_precision = "tf32"', True),
}


@needs_triton
@pytest.mark.parametrize("setting", list(_PRECISION_CASES))
def test_float32_dots_follow_torch_matmul_setting(setting):
    # A process of its own: once the new flags are set, torch's legacy getter raises for the rest of the process.
    statement, tf32 = _PRECISION_CASES[setting]
    if "fp32_precision" in statement and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision flags (torch < 2.9)")
    code = (f"import torch\n{statement}\nfrom ofdkern.kernels.triton_helpers import float32_matmul_uses_tf32\n"
            f"print(float32_matmul_uses_tf32())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_without_interpreter(),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(tf32)
