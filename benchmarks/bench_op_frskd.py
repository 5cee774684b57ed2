"""Benchmark declarations of the FRSKD losses (Ji et al., CVPR 2021): ``ofdkern.attention_transfer_loss``
between a classifier's stage features and the self-teacher's refined ones, and ``ofdkern.kd_loss`` between
logits (temperature 4). In both the teacher side is detached, as FRSKD's distillation terms train only the
classifier."""
from __future__ import annotations

import ofdkern
from ofdkern import reference

import bench_cases as cases
from bench_cases import Case, LossInputs, Target

KD_TEMPERATURE = 4.0


def _pair_inputs(case: Case, device: str, seed: int = 0) -> LossInputs:
    """randn student (requires grad) and teacher (detached) of the case's shape."""
    generator = cases.seeded_generator(device, seed)
    student = cases.randn(case.shape, case, generator, device).requires_grad_()
    teacher = cases.randn(case.shape, case, generator, device)
    return LossInputs(args=(student, teacher), grad_inputs=(student,))


def _plan(name: str, groups: dict[str, list[tuple[str, tuple[int, ...]]]], quick_picks, device: str,
          quick: bool) -> list[Case]:
    """Every shape of ``groups`` in fp32 and bf16 (fp16 too on GPU); quick: ``quick_picks[device]``, a list of
    (group, index, dtype)."""
    if quick:
        return [Case(name, group, *groups[group][index], dtype) for group, index, dtype in quick_picks[device]]
    dtypes = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    return [Case(name, group, label, shape, dtype)
            for group, entries in groups.items() for label, shape in entries for dtype in dtypes]


# ---- attention transfer ------------------------------------------------------------------------------------

AT = "attention_transfer"


def attention_groups() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """FRSKD's stage features: CIFAR ResNet-18 at batch 128 (64x32x32 ... 512x4x4) and ImageNet ResNet-50
    at batch 64 (256x56x56 ... 2048x7x7); the refined (teacher) features have the same shapes."""
    cifar = [(f"CIFAR ResNet-18 stage{i + 1} b128", (128, c, hw, hw))
             for i, (c, hw) in enumerate(((64, 32), (128, 16), (256, 8), (512, 4)))]
    imagenet = [(f"ResNet-50 layer{i + 1} b64", (64, c, hw, hw))
                for i, (c, hw) in enumerate(((256, 56), (512, 28), (1024, 14), (2048, 7)))]
    return {"cifar": cifar + [(_AT_WIDE_CIFAR, (128, 256, 16, 16))], "imagenet": imagenet}


# A CIFAR stage twice as wide as ResNet-18's at 16x16 (the second case of the CPU target).
_AT_WIDE_CIFAR = "CIFAR 256ch 16x16 b128"
_AT_IMAGENET = tuple(f"ResNet-50 layer{i + 1} b64" for i in range(4))
_AT_CPU_TARGET = ("ResNet-50 layer2 b64", _AT_WIDE_CIFAR)


_AT_QUICK = {"cpu": [("cifar", 0, "fp32"), ("imagenet", 3, "fp32")],
             "cuda": [("cifar", 0, "fp32"), ("imagenet", 0, "bf16")]}


def _fused_attention(backend: str):
    return lambda student, teacher: ofdkern.attention_transfer_loss(student, teacher, backend=backend)


ATTENTION_TRANSFER = cases.OpBench(
    name=AT,
    title="FRSKD attention transfer (`ofdkern.attention_transfer_loss`)",
    plan=lambda device, quick: _plan(AT, attention_groups(), _AT_QUICK, device, quick),
    make_inputs=_pair_inputs,
    providers=lambda device, compile_dynamic: cases.loss_providers(
        AT, device, compile_dynamic, reference.attention_transfer_loss, _fused_attention)
    + cases.copy_roofline_providers(),
    floor=cases.COPY_ROOFLINE,
    # Against eager's math in fp32 (oracle_output): torch.compile of the bf16 reference keeps bf16 maps and is
    # off by up to 4e-2 at 2048x7x7 (eager itself 9e-2); the fused kernels by 3e-3.
    tolerance={"fp32": 1e-4, "bf16": 1e-1, "fp16": 2e-2},
    size=lambda case: case.numel,
    size_label="elements per feature map",
    bytes_moved=cases.elementwise_bytes,
    unit_bytes=cases.feature_bytes,
    upcast=cases.upcast_loss_inputs,
    micro_cases=lambda device: [Case(AT, "micro", label, shape, dtype)
                                for label, shape in (("cifar-stage3-b8", (8, 256, 8, 8)), ("stage1-b2", (2, 64, 32, 32)))
                                for dtype in ("fp32", "bf16")],
    notes=("p = 2, reduction \"mean\" (the reference `at_loss`); the student and teacher features have the "
           "same shape.",),
    targets=(
        Target("speedup_vs_compile", ">=", 2.0, _AT_CPU_TARGET),
        Target("ratio_vs_floor", "<=", 2.5, _AT_CPU_TARGET),
        # 80 % of the 4-pass floor at ImageNet stage sizes.
        Target("ratio_vs_floor", "<=", 1.25, _AT_IMAGENET, ("cuda",)),
        Target("speedup_vs_compile", ">=", 1.0, _AT_IMAGENET, ("cuda",)),
    ),
)


# ---- soft-label KD -----------------------------------------------------------------------------------------

KD = "kd"


def kd_groups() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """(rows, classes): CIFAR-100 at batch 128, ImageNet at 256, and language-model vocabularies (32k at 64
    rows, 256k at 8 rows; Llama 3's 128256 over 4096 tokens, GPU only: see ``plan``)."""
    return {"classification": [("CIFAR-100 b128", (128, 100)), ("ImageNet b256", (256, 1000))],
            "vocabulary": [("32k vocab 64 rows", (64, 32000)), ("256k vocab 8 rows", (8, 256000)),
                           ("Llama-3 vocab 4096 rows", (4096, 128256))]}


_KD_VOCABULARY = tuple(label for label, _ in kd_groups()["vocabulary"])
_KD_ALL = tuple(label for entries in kd_groups().values() for label, _ in entries)

_KD_QUICK = {"cpu": [("classification", 0, "fp32"), ("vocabulary", 0, "fp32")],
             "cuda": [("classification", 1, "fp32"), ("vocabulary", 2, "bf16")]}


def _kd_plan(device: str, quick: bool) -> list[Case]:
    groups = kd_groups()
    if device != "cuda":  # 4096 x 128256 is 2 GiB per fp32 tensor: a GPU case
        groups["vocabulary"] = [entry for entry in groups["vocabulary"] if entry[1] != (4096, 128256)]
    return _plan(KD, groups, _KD_QUICK, device, quick)


def _reference_kd(student, teacher):
    return reference.kd_loss(student, teacher, KD_TEMPERATURE)


def _fused_kd(backend: str):
    return lambda student, teacher: ofdkern.kd_loss(student, teacher, temperature=KD_TEMPERATURE, backend=backend)


KD_LOSS = cases.OpBench(
    name=KD,
    title="FRSKD soft-label KD (`ofdkern.kd_loss`)",
    plan=_kd_plan,
    make_inputs=_pair_inputs,
    providers=lambda device, compile_dynamic: cases.loss_providers(
        KD, device, compile_dynamic, _reference_kd, _fused_kd) + cases.copy_roofline_providers(),
    floor=cases.COPY_ROOFLINE,
    # Against eager's math in fp32 (oracle_output): compile and the fused kernels are within 5e-3 in bf16; fp16
    # gradients of 256k-class rows are partly subnormal (1.5e-2).
    tolerance={"fp32": 1e-4, "bf16": 5e-2, "fp16": 3e-2},
    size=lambda case: case.numel,
    size_label="logits per tensor",
    bytes_moved=cases.elementwise_bytes,
    unit_bytes=cases.feature_bytes,
    upcast=cases.upcast_loss_inputs,
    micro_cases=lambda device: [Case(KD, "micro", label, shape, dtype)
                                for label, shape in (("cifar-100-b32", (32, 100)), ("32k-vocab-4-rows", (4, 32000)))
                                for dtype in ("fp32", "bf16")],
    notes=(f"Temperature {KD_TEMPERATURE:g}, reduction \"batchmean\" (the reference `DistillKL`).",),
    targets=(
        Target("speedup_vs_compile", ">=", 1.5, _KD_VOCABULARY[:2]),
        Target("speedup_vs_compile", ">=", 1.0, ("ImageNet b256",)),
        # 80 % of the bandwidth floor (read both logit tensors, write the gradient) from 32k classes on.
        Target("ratio_vs_floor", "<=", 1.25, _KD_VOCABULARY, ("cuda",)),
        Target("speedup_vs_compile", ">=", 1.0, _KD_ALL, ("cuda",)),
    ),
)
