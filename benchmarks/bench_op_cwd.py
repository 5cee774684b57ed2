"""Benchmark declaration of ``ofdkern.cwd_loss`` (channel-wise distillation for dense prediction, Shu et al.,
ICCV 2021) between a student's and a detached teacher's logit or feature maps, at segmentation and detection
shapes."""
from __future__ import annotations

import torch

import ofdkern
from ofdkern import reference

import bench_cases as cases
from bench_cases import Case, Target

CWD = "cwd"
# mmrazor's segmentation configs use tau = 1 on the logits, its detection configs tau = 1 on the FPN levels.
CWD_TEMPERATURE = 1.0


CHANNELS_LAST = "channels_last"


def cwd_groups() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """(N, C, H, W): Cityscapes logits (19 classes at 1/8 of 1024x2048, batch 8), ADE20K-like logits (150 classes
    at 64x64, batch 16) and an FPN level of a detector (256 channels at 100x152, batch 2); in the group
    "channels_last", two of them in that memory format (heads run under it produce such maps)."""
    return {"segmentation": [("Cityscapes logits b8", (8, 19, 128, 256)), ("ADE20K logits b16", (16, 150, 64, 64))],
            "detection": [("FPN P3 b2", (2, 256, 100, 152))],
            CHANNELS_LAST: [("Cityscapes logits b8 channels_last", (8, 19, 128, 256)),
                            ("FPN P3 b2 channels_last", (2, 256, 100, 152))]}


def _cwd_inputs(case: Case, device: str) -> cases.LossInputs:
    inputs = cases.pair_inputs(case, device)
    if case.group != CHANNELS_LAST:
        return inputs
    student, teacher = (x.detach().to(memory_format=torch.channels_last) for x in inputs.args)
    return cases.LossInputs(args=(student.requires_grad_(), teacher), grad_inputs=(student,))


_CWD_ALL = tuple(label for entries in cwd_groups().values() for label, _ in entries)
_CWD_QUICK = {"cpu": [("segmentation", 0, "fp32"), ("detection", 0, "bf16")],
              "cuda": [("segmentation", 1, "fp32"), ("detection", 0, "bf16")]}


def _reference_cwd(student, teacher):
    return reference.cwd_loss(student, teacher, CWD_TEMPERATURE)


def _fused_cwd(backend: str):
    return lambda student, teacher: ofdkern.cwd_loss(student, teacher, temperature=CWD_TEMPERATURE, backend=backend)


OP = cases.OpBench(
    name=CWD,
    title="Channel-wise distillation (`ofdkern.cwd_loss`)",
    plan=lambda device, quick: cases.dtype_plan(CWD, cwd_groups(), _CWD_QUICK, device, quick),
    make_inputs=_cwd_inputs,
    providers=lambda device, compile_dynamic: cases.loss_providers(
        CWD, device, compile_dynamic, _reference_cwd, _fused_cwd) + cases.copy_roofline_providers(),
    floor=cases.COPY_ROOFLINE,
    # Against eager's math in fp32 (oracle_output), as KD's rows.
    tolerance={"fp32": 1e-4, "bf16": 5e-2, "fp16": 3e-2},
    size=lambda case: case.numel,
    size_label="elements per map tensor",
    bytes_moved=cases.elementwise_bytes,
    unit_bytes=cases.feature_bytes,
    upcast=cases.upcast_loss_inputs,
    micro_cases=lambda device: [Case(CWD, "micro", label, shape, dtype)
                                for label, shape in (("voc-logits-b2", (2, 21, 32, 32)), ("fpn-p5-b1", (1, 64, 25, 38)))
                                for dtype in ("fp32", "bf16")],
    notes=(f"Temperature {CWD_TEMPERATURE:g}, reduction \"mean\" (sum over maps / (N C), mmrazor's "
           "`ChannelWiseDivergence`); NCHW maps, except the group channels_last.",),
    targets=(
        Target("speedup_vs_best_baseline", ">=", 1.5, _CWD_ALL),
        Target("ratio_vs_floor", "<=", 2.0, _CWD_ALL),
        # 80 % of the bandwidth floor (read both maps, write the student gradient).
        Target("ratio_vs_floor", "<=", 1.25, _CWD_ALL, ("cuda",)),
    ),
)
