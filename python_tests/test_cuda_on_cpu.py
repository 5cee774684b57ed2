"""The CUDA kernels of csrc/*.cu, run without a GPU: built for the CPU under cuda_on_cpu.h's emulation of CUDA
and put behind the public ops in place of the CPU kernels (``backend="cpu"`` on CPU tensors), then checked like
every backend: parity with the reference (as accurate as eager against float64), every reduction, NaN/Inf,
layouts and ranks, plus shapes that take the kernels' other paths (several tiles, wide KD rows, channels past a
block) and the backward's scaling kernel. What the emulation leaves to a GPU run: races and the memory model
(compute-sanitizer), device math intrinsics, speed. The module runs once more under AddressSanitizer, for the
kernels' reads and writes outside their buffers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ofdkern
from ofdkern._dtypes import accumulation_dtype
from ofdkern.ops import align, attention_transfer, kd, ofd

import cuda_on_cpu
import op_cases
from conftest import STATUS
from loss_checks import attention_gradient_errors
from op_cases import ALIGN, ALIGN_OFD, ATTENTION, CASES, CWD, FLOAT_DTYPES, KD, OFD
from parity import assert_parity

pytestmark = [pytest.mark.skipif(not STATUS["cpu"]["built"],
                                 reason="builds with the C++ toolchain that built ofdkern's CPU kernels"),
              # One pytest-xdist worker builds and loads the emulated kernels once (--dist loadgroup).
              pytest.mark.xdist_group("cuda_on_cpu")]


@pytest.fixture(scope="module")
def emulated():
    return cuda_on_cpu.load(address_sanitizer=os.environ.get("OFDKERN_CUDA_ON_CPU_ASAN") == "1")


@pytest.fixture
def cuda_kernels(emulated, monkeypatch):
    """``backend="cpu"`` runs the emulated CUDA kernels (the backends' kernel lookups, patched)."""
    def attention_transfer_forward(student, teacher, p, count):
        # csrc/attention_transfer_op.cpp's composite on the emulated kernels. (attention_transfer_triton has its
        # Python twin, but Triton's
        # native library aborts on import in the AddressSanitizer run below.)
        map_student, map_teacher = emulated.attention_map(student, p), emulated.attention_map(teacher, p)
        dtype = torch.promote_types(map_student.dtype, map_teacher.dtype)
        row_loss, grad_student, grad_teacher = emulated.attention_transfer_maps(
            map_student.to(dtype), map_teacher.to(dtype), True, True)
        loss = row_loss.sum() if count == 1 else row_loss.sum() / count
        return (loss.to(torch.promote_types(student.dtype, teacher.dtype)), grad_student.to(map_student.dtype),
                grad_teacher.to(map_teacher.dtype))

    monkeypatch.setattr(ofd, "_fused_kernel", lambda backend: emulated.ofd_fused.default)
    monkeypatch.setattr(align, "_kernel", lambda backend: emulated.align_fused.default)
    monkeypatch.setattr(attention_transfer, "_kernels", lambda backend: attention_transfer._Kernels(
        attention_transfer_forward, emulated.attention_map_backward.default))
    monkeypatch.setattr(kd, "kd_kernel", lambda backend: emulated.kd_fused.default)
    return emulated


def _params(cases=CASES, dtypes=(torch.float32,), layouts=False):
    return [pytest.param(case, dtype, layout, id=f"{case.id}-{str(dtype)[6:]}-{layout}")
            for case in cases for dtype in dtypes for layout in (case.layouts if layouts else ("contiguous",))]


@pytest.mark.parametrize("case,dtype,layout", _params(dtypes=FLOAT_DTYPES, layouts=True))
def test_parity_with_the_reference(cuda_kernels, case, dtype, layout):
    assert_parity(case.fused("cpu"), case.reference, case.make("cpu", dtype, layout=layout), names=case.names)


@pytest.mark.parametrize("case,dtype,layout", _params(dtypes=(torch.float64,)))
def test_every_reduction(cuda_kernels, case, dtype, layout):
    for reduction in case.reductions:
        assert_parity(case.fused("cpu", reduction=reduction), lambda *xs: case.reference(*xs, reduction=reduction),
                      case.make("cpu", dtype, seed=1), names=case.names)


@pytest.mark.parametrize("case,dtype,layout", _params(dtypes=(torch.float32, torch.bfloat16)))
def test_nan_and_inf_follow_the_reference(cuda_kernels, case, dtype, layout):
    assert_parity(case.fused("cpu"), case.reference, case.plant_special(case.make("cpu", dtype)), names=case.names)


@pytest.mark.parametrize("case,dtype,layout", _params(cases=(OFD, ALIGN, ATTENTION, CWD)))
def test_feature_ranks_and_5d_channels_last(cuda_kernels, case, dtype, layout):
    for spatial, layout in (((), "contiguous"), ((5,), "contiguous"), ((2, 3, 2), "channels_last")):
        inputs = case.make("cpu", torch.float64, spatial=spatial, layout=layout)
        assert_parity(case.fused("cpu"), case.reference, inputs, names=case.names)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ofd_over_more_blocks_than_the_grid(cuda_kernels, layout):
    # 2 emulated SMs cap the grid at 8 blocks of 256 threads: 31,080 elements take each thread round the
    # grid-stride loop several times, and 37 channels make channel runs that cross the vectors.
    for dtype in (torch.float32, torch.bfloat16):
        inputs = OFD.make("cpu", dtype, spatial=(20, 21), layout=layout, batch=2, channels=37)
        assert_parity(OFD.fused("cpu"), OFD.reference, inputs, names=OFD.names)
        assert_parity(OFD.fused("cpu", reduction="none"), lambda *xs: OFD.reference(*xs, reduction="none"), inputs,
                      names=OFD.names)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_align_at_real_widths_over_several_tiles(cuda_kernels, layout):
    # 256 -> 512 -> 512 channels over 3 samples of 30 x 30: the pipeline's tiles hold at least 8 MiB of X, H, Y
    # and dH, so float32 takes three tiles of a sample and bfloat16 a tile of two samples, then one of one.
    gen = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for dtype in (torch.float32, torch.bfloat16):
        student = torch.randn(3, 256, 30, 30, generator=gen, dtype=torch.float64).to(dtype, memory_format=fmt)
        teacher = torch.randn(3, 512, 30, 30, generator=gen, dtype=torch.float64).to(dtype, memory_format=fmt)
        weights = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) / shape[-1] ** 0.5
                   for shape in ((512, 256), (512,), (512, 512), (512,))]
        margin = (-0.1 - torch.rand(512, generator=gen, dtype=torch.float64)).float()
        inputs = [x.requires_grad_() for x in (student, teacher, *weights)]
        assert_parity(ALIGN_OFD.fused("cpu"), ALIGN_OFD.reference, [*inputs, margin], names=ALIGN_OFD.names)


@pytest.mark.parametrize("case", [ALIGN, ALIGN_OFD], ids=lambda case: case.id)
def test_align_gradients_only_where_asked(cuda_kernels, case):
    inputs = case.make("cpu", torch.float32)
    student, teacher, weights = inputs[0], inputs[1], inputs[2:6]
    for wanted in ([student], [teacher], weights, [student, teacher, *weights]):
        for x in [student, teacher, *weights]:
            x.requires_grad_(any(x is w for w in wanted))
        assert_parity(case.fused("cpu"), case.reference, inputs, names=case.names)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ofd_gradients_only_where_asked(cuda_kernels, layout):
    # Every subset of student, teacher and margin gradients: the kernel's output variants.
    student, teacher, margin = (x.detach() for x in OFD.make("cpu", torch.float32, layout=layout))
    for mask in range(1, 8):
        inputs = [x.clone().requires_grad_(bool(mask >> i & 1)) for i, x in enumerate((student, teacher, margin))]
        for reduction in ("sum", "none"):
            assert_parity(OFD.fused("cpu", reduction=reduction),
                          lambda *xs: OFD.reference(*xs, reduction=reduction), inputs, names=OFD.names)


def test_attention_maps_past_a_warp_of_positions_and_channels(cuda_kernels):
    # 45 positions and 40 channels: past a warp's 32 lanes along either dim, in both layouts, p = 2, 3 and 1.5.
    for layout in ("contiguous", "channels_last"):
        for p in (2.0, 3.0, 1.5):
            student, teacher = op_cases._make_attention("cpu", torch.float32, spatial=(5, 9), layout=layout,
                                                        batch=3)
            student = student.detach().repeat(1, 10, 1, 1).abs().requires_grad_()  # 40 channels
            assert_parity(lambda s, t: ofdkern.attention_transfer_loss(s, t, p=p, backend="cpu"),
                          lambda s, t: ofdkern.attention_transfer_loss(s, t, p=p, backend="reference"),
                          [student, teacher.abs()], names=ATTENTION.names)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_attention_gradients_at_many_channels_are_as_accurate_as_eager(cuda_kernels, channels_last):
    ours, eager = attention_gradient_errors(lambda s, t: ofdkern.attention_transfer_loss(s, t, backend="cpu"),
                                            1024, channels_last)
    assert ours <= eager, (ours, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_kd_rows_wider_than_a_block(cuda_kernels, dtype):
    # 9,000 classes: three chunks of 4,096 merged per row, the teacher gradient in its own kernel; with a NaN
    # row and a -inf logit.
    inputs = KD.make("cpu", dtype, classes=9000, batch=3)
    assert_parity(KD.fused("cpu"), KD.reference, inputs, names=KD.names)
    assert_parity(KD.fused("cpu"), KD.reference, KD.plant_special(inputs), names=KD.names)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scale_kernel_rounds_once(emulated, dtype):
    # The backward's in-place scaling (on a GPU, ops/_autograd.py): the factor stays in the accumulation dtype.
    gradient = torch.randn(10_001, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    factor = torch.tensor(1 / 3, dtype=accumulation_dtype(dtype))
    for offset in (0, 1):  # 16-byte aligned, then not: the vector and the scalar kernel
        scaled = gradient.clone()[offset:]
        emulated.scale_(scaled, factor)
        assert torch.equal(scaled, (gradient[offset:].to(factor.dtype) * factor).to(dtype))


def test_launches_are_rewritten_as_calls():
    source = ("  if (vectorized)\n    kernel<T, decltype(kind)::value, (N > 2)>\n        <<<grid, dim3(32, 8), 0,\n"
              "           stream>>>(a, f(b, c));\n  else\n    other<<<g, kThreads>>>(x);\n")
    assert cuda_on_cpu.rewrite_launches(source) == (
        "  if (vectorized)\n    ::emu::launch(::emu::config(grid, dim3(32, 8), 0, stream), "
        "[&] { kernel<T, decltype(kind)::value, (N > 2)>(a, f(b, c)); });\n"
        "  else\n    ::emu::launch(::emu::config(g, kThreads), [&] { other(x); });\n")


def _libasan() -> str | None:
    """The C++ compiler's AddressSanitizer runtime, or None."""
    try:
        path = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libasan.so"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if Path(path).is_file() else None


@pytest.mark.skipif(os.environ.get("OFDKERN_CUDA_ON_CPU_ASAN") == "1", reason="inside the run it starts")
@pytest.mark.skipif(not sys.platform.startswith("linux") or _libasan() is None,
                    reason="needs the C++ compiler's AddressSanitizer runtime (Linux)")
def test_cuda_kernels_under_address_sanitizer(tmp_path):
    # The tests above once more, in a process with AddressSanitizer and the kernels built with it: a read or
    # write past a tensor's allocation (or a __shared__ array's, or a thread's locals) stops the run with a
    # report. The CPU counterpart of compute-sanitizer's memcheck over the same kernels.
    env = {**os.environ, "OFDKERN_CUDA_ON_CPU_ASAN": "1", "LD_PRELOAD": _libasan(),
           # Fibers switch stacks, which ASan tracks only in part: no use-after-return checks.
           "ASAN_OPTIONS": f"detect_leaks=0:detect_stack_use_after_return=0:log_path={tmp_path / 'asan'}"}
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
                         env=env, capture_output=True, text=True, timeout=1500)
    reports = "".join(path.read_text() for path in tmp_path.glob("asan*"))  # its warnings too
    assert run.returncode == 0 and "ERROR: AddressSanitizer" not in reports, (
        reports[-6000:] + (run.stdout + run.stderr)[-6000:])
    assert " passed" in run.stdout and " failed" not in run.stdout
