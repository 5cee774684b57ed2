"""Benchmark declaration of ``ofdkern.channel_align_loss``: a per-pixel MLP (1x1 conv -> ReLU -> 1x1 conv) on
the student, then L2 against the teacher (Liu et al., ICCVW 2023). At real widths the op is GEMM-bound: its
floor is the six GEMMs of the same shapes and dtype, with the fastest GEMM library torch has here."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch

import ofdkern
from ofdkern import reference

import bench_cases as cases
from bench_cases import FORWARD, FORWARD_BACKWARD, Case, LossInputs, Provider, Target

NAME = "channel_align"
GEMM_FLOOR = "gemm-floor"


def paper_shapes(device: str) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(label, student shape, hidden, teacher channels) of the paper's student/teacher pairs (hidden = the
    teacher's width). MobileNetV1 -> ResNet-50 runs at batch 16 on CPU, 64 on GPU."""
    mobilenet_batch = 64 if device == "cuda" else 16
    return [
        (f"MobileNetV1→ResNet-50 7x7 b{mobilenet_batch}", (mobilenet_batch, 1024, 7, 7), 2048, 2048),
        ("ResNet-18→ResNet-34 7x7 b64", (64, 512, 7, 7), 512, 512),
        ("64→256 56x56 b32", (32, 64, 56, 56), 256, 256),
    ]


def cifar_shapes(batch: int = 128) -> list[tuple[str, tuple[int, ...], int, int]]:
    """CIFAR ResNet stages 1-3 (64, 128, 256 channels at 32, 16, 8 pixels), equal widths on both sides, and
    issue 14's 64 channels at 8x8."""
    stages = [(f"CIFAR stage{i + 1} {c}ch {hw}x{hw} b{batch}", (batch, c, hw, hw), c, c)
              for i, (c, hw) in enumerate(((64, 32), (128, 16), (256, 8)))]
    return stages + [(f"CIFAR 64ch 8x8 b{batch}", (batch, 64, 8, 8), 64, 64)]


def _case(group: str, entry, dtype: str) -> Case:
    label, shape, hidden, teacher_channels = entry
    return Case(NAME, group, label, shape, dtype, params=(("hidden", hidden), ("teacher_channels", teacher_channels)))


def plan(device: str, quick: bool) -> list[Case]:
    on_gpu = device == "cuda"
    paper, cifar = paper_shapes(device), cifar_shapes()
    if quick:
        chosen = ([("paper", paper[1], "fp32"), ("cifar", cifar[3], "fp32")] if not on_gpu else
                  [("paper", paper[0], "bf16"), ("paper", paper[1], "fp32"), ("paper", paper[2], "bf16")])
        return [_case(group, entry, dtype) for group, entry, dtype in chosen]
    dtypes = ("fp32", "bf16", "fp16") if on_gpu else ("fp32", "bf16")
    return [_case(group, entry, dtype) for group, entries in (("paper", paper), ("cifar", cifar))
            for entry in entries for dtype in dtypes]


def micro_cases(device: str) -> list[Case]:
    return [_case("micro", entry, dtype)
            for entry in (("tiny 32ch 8x8 b4", (4, 32, 8, 8), 64, 64), ("wide 256ch 7x7 b2", (2, 256, 7, 7), 512, 512))
            for dtype in ("fp32", "bf16")]


def _sizes(case: Case) -> tuple[int, int, int, int]:
    """(pixels, student channels, hidden, teacher channels)."""
    batch, student_channels, *spatial = case.shape
    return batch * math.prod(spatial), student_channels, case.param("hidden"), case.param("teacher_channels")


def make_inputs(case: Case, device: str, seed: int = 0) -> LossInputs:
    """randn features (the teacher detached), weights scaled by 1/sqrt(fan-in) so every layer stays O(1),
    small biases; the student and the four parameters require grad, all in the case's dtype."""
    generator = cases.seeded_generator(device, seed)
    _, student_channels, hidden, teacher_channels = _sizes(case)
    batch, _, *spatial = case.shape
    student = cases.randn(case.shape, case, generator, device)
    teacher = cases.randn((batch, teacher_channels, *spatial), case, generator, device)
    w1 = cases.randn((hidden, student_channels), case, generator, device, 1 / math.sqrt(student_channels))
    b1 = cases.randn((hidden,), case, generator, device, 0.1)
    w2 = cases.randn((teacher_channels, hidden), case, generator, device, 1 / math.sqrt(hidden))
    b2 = cases.randn((teacher_channels,), case, generator, device, 0.1)
    trained = tuple(t.requires_grad_() for t in (student, w1, b1, w2, b2))
    return LossInputs(args=(student, teacher, w1, b1, w2, b2), grad_inputs=trained)


def _fused(backend: str):
    return lambda *args: ofdkern.channel_align_loss(*args, backend=backend)


def _gemm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN's matmul (CPU; strided operands read in place)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _faster(*steps):
    """The step whose best of two runs (after a warm-up) is the shortest."""
    def best(step):
        step()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times)
    return min(steps, key=best)


def _six_gemms(x: torch.Tensor, d_y: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, out_dtype: torch.dtype):
    """The six GEMMs on x (pixels x Cs rows), d_y (pixels x Ct) and the weights, in their dtype, back to back:
    with torch.mm on preallocated outputs, and (for float32 on CPU) with oneDNN's matmul. Each step returns
    d x in ``out_dtype``, d w1 and d w2."""
    h = x.new_empty(x.shape[0], w1.shape[0])
    y, d_h, d_x = torch.empty_like(d_y), torch.empty_like(h), torch.empty_like(x)
    d_w1, d_w2 = torch.empty_like(w1), torch.empty_like(w2)

    def with_mm():
        torch.mm(x, w1.t(), out=h)
        torch.mm(h, w2.t(), out=y)
        torch.mm(d_y.t(), h, out=d_w2)
        torch.mm(d_y, w2, out=d_h)
        torch.mm(d_h.t(), x, out=d_w1)
        torch.mm(d_h, w1, out=d_x)
        return d_x.to(out_dtype), d_w1, d_w2

    def with_onednn():
        h = _gemm_nt(x, w1)
        _gemm_nt(h, w2)
        d_w2 = _gemm_nt(d_y.t(), h.t())
        d_h = _gemm_nt(d_y, w2.t())
        d_w1 = _gemm_nt(d_h.t(), x.t())
        return _gemm_nt(d_h, w1.t()).to(out_dtype), d_w1, d_w2

    onednn_here = x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    return [with_mm, with_onednn] if onednn_here else [with_mm]


def gemm_floor_steps(inputs: LossInputs):
    """The six GEMMs of forward + backward back to back: forward H = X W1^T (pixels x Cs @ Cs x hidden) and
    Y = H W2^T (pixels x hidden @ hidden x Ct); backward dW2 = dY^T H, dH = dY W2, dW1 = dH^T X, dX = dH W1.
    X is the student as (pixels, Cs) rows, dY the teacher as (pixels, Ct) rows (any values of the right shape
    would do). The floor is the fastest way torch has here to run them:
    - in the input dtype with torch.mm on preallocated outputs;
    - for float32 on CPU, where torch.mm's GEMMs are BLAS's, also with oneDNN's matmul (what eager's 1x1
      convolutions run on; about 2x BLAS's speed on the AMD EPYC of the committed results, though it allocates
      its outputs);
    - for half precision on CPU, also in float32 on float32 copies of the operands made beforehand (the
      fused kernel may run its GEMMs in either; bfloat16 GEMMs are the slower ones on CPUs without AMX and
      without AVX512-BF16, and on some Intel ones with it), writing d X in the input dtype."""
    student, teacher, w1, b1, w2, b2 = (t.detach() for t in inputs.args)
    channels = student.shape[1]
    x = student.movedim(1, -1).reshape(-1, channels).contiguous()
    d_y = teacher.movedim(1, -1).reshape(-1, teacher.shape[1]).contiguous()
    steps = _six_gemms(x, d_y, w1, w2, x.dtype)
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        steps += _six_gemms(x.float(), d_y.float(), w1.float(), w2.float(), x.dtype)
    return {FORWARD_BACKWARD: _faster(*steps) if len(steps) > 1 else steps[0]}


@contextlib.contextmanager
def _tf32(allowed: bool):
    """Both of torch's float32 switches on a GPU: cuDNN's (eager's 1x1 convolutions; on by default) and
    matmul's (the fused op's GEMMs; off by default)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def providers(device: str, compile_dynamic: bool) -> list[Provider]:
    """On a GPU, float32 is compared both ways: at torch's defaults eager's convolutions run in TF32 and the
    fused GEMMs in full float32, so ``eager-ieee-fp32`` (TF32 off) is eager like the fused defaults, and
    ``ofdkern-<backend>-tf32`` (TF32 on) the fused op like eager's defaults. They change nothing in half
    precision."""
    base = cases.loss_providers(NAME, device, compile_dynamic, reference.channel_align_loss, _fused)
    floor = Provider(GEMM_FLOOR, gemm_floor_steps, (FORWARD_BACKWARD,), check=cases.writes_like_eager_gradient)
    if device != "cuda":
        return base + [floor]
    both_ways = [
        Provider(cases.EAGER + "-ieee-fp32", lambda inputs: cases.loss_steps(reference.channel_align_loss, inputs),
                 cases.LOSS_MODES, context=lambda: _tf32(False)),
        *[dataclasses.replace(provider, name=provider.name + "-tf32", context=lambda: _tf32(True))
          for provider in base if provider.name.startswith(cases.FUSED_PREFIX)],
    ]
    return base + both_ways + [floor]


def flops(case: Case, mode: str) -> int:
    """The GEMMs' multiply-adds x 2: forward 2 P H (Cs + Ct); forward + backward three times that."""
    pixels, student_channels, hidden, teacher_channels = _sizes(case)
    forward = 2 * pixels * hidden * (student_channels + teacher_channels)
    return forward if mode == FORWARD else 3 * forward


def bytes_moved(case: Case, mode: str) -> int:
    """Read the student, the teacher and the weights; forward + backward also writes the student and weight
    gradients (the hidden and projected features never leave the chip in a fused kernel)."""
    pixels, student_channels, hidden, teacher_channels = _sizes(case)
    weights = hidden * student_channels + hidden + teacher_channels * hidden + teacher_channels
    read = pixels * (student_channels + teacher_channels) + weights
    written = 0 if mode == FORWARD else pixels * student_channels + weights
    return (read + written) * case.element_size


def shape_text(case: Case) -> str:
    _, _, hidden, teacher_channels = _sizes(case)
    return f"{'x'.join(map(str, case.shape))}→{hidden}→{teacher_channels}"


_PAPER = tuple(label for label, *_ in paper_shapes("cpu") + paper_shapes("cuda"))
_ISSUE14_CIFAR = ("CIFAR 64ch 8x8 b128",)
_LARGE_PAIR = ("64→256 56x56 b32",)

OP = cases.OpBench(
    name=NAME,
    title="Channel-wise alignment (`ofdkern.channel_align_loss`)",
    plan=plan,
    make_inputs=make_inputs,
    providers=providers,
    floor=GEMM_FLOOR,
    # fp32: eager's convolutions may run in TF32 on a GPU (cuDNN's default). Half precision, against eager's
    # math in fp32 (oracle_output): eager and compile round the hidden and projected features (3e-3 in bf16).
    tolerance={"fp32": 5e-3, "bf16": 2e-2, "fp16": 5e-3},
    size=lambda case: flops(case, FORWARD_BACKWARD),
    size_label="GEMM FLOPs of forward + backward",
    bytes_moved=bytes_moved,
    flops=flops,
    unit_bytes=cases.feature_bytes,
    shape_text=shape_text,
    # Issue 14's targets for the fused backends.
    targets=(
        Target("ratio_vs_floor", "<=", 1.25, _PAPER, ("cpu", "cuda")),
        Target("ratio_vs_floor", "<=", 1.6, _ISSUE14_CIFAR),
        Target("speedup_vs_best_baseline", ">=", 1.0, _PAPER + _ISSUE14_CIFAR, ("cpu", "cuda")),
        Target("memory_vs_eager", "<=", 0.3, _LARGE_PAIR),
        Target("memory_vs_eager", "<=", 0.3, _PAPER, ("cuda",)),
    ),
    upcast=cases.upcast_loss_inputs,
    micro_cases=micro_cases,
    notes=("Plain L2 against the teacher (no margin); hidden = teacher channels. Eager is "
           "`ofdkern.reference.channel_align_loss`: conv1x1 → ReLU → conv1x1 → loss.",),
)
