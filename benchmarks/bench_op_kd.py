"""Benchmark declaration of ``ofdkern.kd_loss`` between logits (temperature 4, as FRSKD and Hinton et al.); the
teacher side is detached."""
from __future__ import annotations

import ofdkern
from ofdkern import reference

import bench_cases as cases
from bench_cases import Case, Target

KD = "kd"
KD_TEMPERATURE = 4.0


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
    return cases.dtype_plan(KD, groups, _KD_QUICK, device, quick)


def _reference_kd(student, teacher):
    return reference.kd_loss(student, teacher, KD_TEMPERATURE)


def _fused_kd(backend: str):
    return lambda student, teacher: ofdkern.kd_loss(student, teacher, temperature=KD_TEMPERATURE, backend=backend)


OP = cases.OpBench(
    name=KD,
    title="FRSKD soft-label KD (`ofdkern.kd_loss`)",
    plan=_kd_plan,
    make_inputs=cases.pair_inputs,
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
