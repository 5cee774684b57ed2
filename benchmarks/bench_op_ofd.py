"""Benchmark declaration of ``ofdkern.ofd_loss``: OFD's margin ReLU + partial L2 (Heo et al., ICCV 2019)."""
from __future__ import annotations

import torch

import ofdkern
from ofdkern import reference

import bench_cases as cases
from bench_cases import Case, LossInputs, Provider, Target

NAME = "ofd"
# The shape OFD's CPU targets are stated for: ResNet layer2 output at batch 64.
ACCEPTANCE_SHAPE = (64, 512, 28, 28)
ACCEPTANCE_DTYPE = "fp32"


def cifar_shapes(batch: int = 128) -> list[tuple[str, tuple[int, ...]]]:
    """Pre-ReLU stage outputs of WRN-40-2 (teacher) and WRN-16-2 (student): widths 16k with k = 2."""
    stages = [(32, 32), (64, 16), (128, 8)]
    return [(f"WRN-40-2→WRN-16-2 stage{i + 1} b{batch}", (batch, c, hw, hw)) for i, (c, hw) in enumerate(stages)]


def imagenet_shapes(batch: int) -> list[tuple[str, tuple[int, ...]]]:
    """Pre-ReLU outputs of layer1..layer4 of ResNet-152 (teacher) and ResNet-50 (student): the two share
    their stage widths and resolutions, so one shape serves both networks."""
    stages = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
    return [(f"ResNet-152→ResNet-50 layer{i + 1} b{batch}", (batch, c, hw, hw)) for i, (c, hw) in enumerate(stages)]


def detection_shapes(batch: int = 8) -> list[tuple[str, tuple[int, ...]]]:
    """FPN P2-P5 of 800x1333 images (256 channels at strides 4, 8, 16, 32; sizes rounded up)."""
    levels = [(2, 200, 334), (3, 100, 167), (4, 50, 84), (5, 25, 42)]
    return [(f"FPN P{p} 800x1333 b{batch}", (batch, 256, h, w)) for p, h, w in levels]


def segmentation_shapes(batch: int = 8) -> list[tuple[str, tuple[int, ...]]]:
    """1/8-resolution features of 512x1024 crops (64x128), as a dilated ResNet-50/101 backbone at output
    stride 8 (PSPNet, DeepLabV3) gives them: layer2 (512 channels) and layer4 (2048 channels)."""
    return [(f"dilated ResNet layer{layer} 512x1024 b{batch}", (batch, c, 64, 128))
            for layer, c in ((2, 512), (4, 2048))]


def sweep_shape(log2_numel: int) -> tuple[int, ...]:
    """2**log2_numel elements as (N, 64, 32, 32): a realistic channel count, the batch grows."""
    per_sample = 64 * 32 * 32
    if log2_numel < 16:
        raise ValueError("the sweep starts at 2**16 elements (one 64x32x32 sample)")
    return (2 ** log2_numel // per_sample, 64, 32, 32)


def plan(device: str, quick: bool) -> list[Case]:
    """CPU runs are trimmed to fit ~10-15 minutes of this op on 2 cores (batch 256, the detection and
    segmentation shapes and the sweep in fp32 only); --quick keeps the acceptance case and a few sizes."""
    on_gpu = device == "cuda"
    if quick:
        dtypes = ("fp32", "bf16") if on_gpu else ("fp32",)
        chosen = {
            "cifar": [(label, shape, ("fp32",)) for label, shape in cifar_shapes()[:1]],
            "imagenet": [(label, shape, dtypes) for label, shape in imagenet_shapes(64) if shape == ACCEPTANCE_SHAPE],
            "detection": [(label, shape, ("bf16",)) for label, shape in detection_shapes()[:1]] if on_gpu else [],
            "sweep": [(f"2^{k}", sweep_shape(k), ("fp32",)) for k in ((24,) if on_gpu else (20,))],
        }
    else:
        all_dtypes = ("fp32", "bf16", "fp16") if on_gpu else ("fp32", "bf16")
        large_dtypes = all_dtypes if on_gpu else ("fp32",)
        chosen = {
            "cifar": [(label, shape, all_dtypes) for label, shape in cifar_shapes()],
            "imagenet": [(label, shape, all_dtypes) for label, shape in imagenet_shapes(64)]
            + [(label, shape, large_dtypes) for label, shape in imagenet_shapes(256)],
            "detection": [(label, shape, large_dtypes) for label, shape in detection_shapes()],
            "segmentation": [(label, shape, large_dtypes) for label, shape in segmentation_shapes()],
            "sweep": [(f"2^{k}", sweep_shape(k), large_dtypes) for k in range(16, 27, 2)],
        }
    return [Case(NAME, group, label, shape, dtype,
                 acceptance=shape == ACCEPTANCE_SHAPE and dtype == ACCEPTANCE_DTYPE)
            for group, entries in chosen.items() for label, shape, dtypes in entries for dtype in dtypes]


def micro_cases(device: str) -> list[Case]:
    """Small versions of the real setups: CIFAR WRN stage 3 at batch 16, ResNet layer2 at batch 2."""
    return [Case(NAME, "micro", label, shape, dtype)
            for label, shape in (("wrn-stage3-b16", (16, 128, 8, 8)), ("resnet-layer2-b2", (2, 512, 28, 28)))
            for dtype in ("fp32", "bf16")]


def make_inputs(case: Case, device: str, seed: int = 0) -> LossInputs:
    """randn student (requires grad) and teacher (detached, like the teacher's features in training), and
    negative (C,) float32 margins in [-1.05, -0.05), like margin_from_bn gives."""
    generator = cases.seeded_generator(device, seed)
    student = cases.randn(case.shape, case, generator, device).requires_grad_()
    teacher = cases.randn(case.shape, case, generator, device)
    margin = -0.05 - torch.rand(case.shape[1], generator=generator, device=device)
    return LossInputs(args=(student, teacher, margin), grad_inputs=(student,))


def _fused(backend: str):
    return lambda student, teacher, margin: ofdkern.ofd_loss(student, teacher, margin, backend=backend)


def providers(device: str, compile_dynamic: bool) -> list[Provider]:
    base = cases.loss_providers(NAME, device, compile_dynamic, reference.ofd_loss, _fused)
    if "cpu" in cases.op_backends(NAME, device) and ofdkern.cpu_buffers.HAS_CACHE:
        # The cache is what a training loop gets; the uncached run shows how much of the speed-up it brings.
        base.append(Provider("ofdkern-cpu-nocache", lambda inputs: cases.loss_steps(_fused("cpu"), inputs),
                             cases.LOSS_MODES, context=cases.cpu_buffer_cache_off))
    return base + cases.copy_roofline_providers()


OP = cases.OpBench(
    name=NAME,
    title="OFD loss (`ofdkern.ofd_loss`)",
    plan=plan,
    make_inputs=make_inputs,
    providers=providers,
    floor=cases.COPY_ROOFLINE,
    # The loss computes in fp32 whatever the feature dtype: half-precision results differ by their rounding.
    tolerance={"fp32": 1e-4, "bf16": 1e-2, "fp16": 3e-3},
    size=lambda case: case.numel,
    size_label="elements per feature map",
    bytes_moved=cases.elementwise_bytes,
    unit_bytes=cases.feature_bytes,
    targets=(Target("speedup_vs_eager", ">=", 10.0), Target("speedup_vs_compile", ">=", 2.0),
             Target("ratio_vs_floor", "<=", 2.5)),
    upcast=cases.upcast_loss_inputs,
    micro_cases=micro_cases,
)
