"""Every public fused op described the same way, so that one set of tests checks the op framework on all of
them (test_op_framework.py) and the parity helpers are checked against broken variants (test_mutations.py).

An ``OpCase`` makes small inputs, calls the public op on a backend, calls its eager reference, names the custom
op behind it (for opcheck) and plants NaN/Inf where the fused op must follow the reference exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import ofdkern
from ofdkern import reference
from ofdkern.ops.align import channel_align_fused
from ofdkern.ops.attention_transfer import attention_transfer_fused
from ofdkern.ops.cwd import cwd_loss_fused
from ofdkern.ops.kd import kd_loss_fused
from ofdkern.ops.ofd import ofd_loss_fused

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _randn(shape, dtype, device, generator, scale=1.0):
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


@dataclass(frozen=True)
class OpCase:
    id: str
    op: str  # the public op, as ofdkern.backend_status(op) names it
    names: tuple[str, ...]
    # (device, dtype, seed, spatial, layout) -> inputs in the order of ``names``, those to differentiate
    # requiring grad; ``spatial`` is the feature maps' spatial shape (unused by KD).
    make: Callable[..., list]
    # backend -> f(*inputs) -> loss
    fused: Callable[[str], Callable]
    reference: Callable
    # (inputs, backend) -> (the FusedOp, args) with in_place_backward=False: a purely functional op
    opcheck: Callable[[list, str], tuple]
    # inputs -> inputs with NaN / +-inf planted where the fused op must give what the reference gives
    plant_special: Callable[[list], list]
    layouts: tuple[str, ...] = ("contiguous", "channels_last")
    reductions: tuple[str, ...] = ("sum", "mean", "batchmean")


# ---- OFD ------------------------------------------------------------------------------------------------------

def _make_ofd(device, dtype, seed=0, spatial=(3, 4), layout="contiguous", batch=2, channels=5):
    g = torch.Generator().manual_seed(seed)
    student = _layout(_randn((batch, channels, *spatial), dtype, device, g), layout).requires_grad_()
    teacher = _layout(_randn((batch, channels, *spatial), dtype, device, g), layout)
    margin = (-0.05 - torch.rand(channels, generator=g, dtype=torch.float64)).to(device, torch.float32)
    return [student, teacher, margin]


def _plant_ofd(inputs):
    student, teacher, margin = (x.detach().clone() for x in inputs)
    student.view(-1)[0] = math.nan
    student.view(-1)[5] = math.inf
    student.view(-1)[9] = -math.inf  # t' < 0 there: inf * 0 = NaN, as the reference's mask multiplies
    teacher.view(-1)[13] = math.nan
    teacher.view(-1)[17] = -math.inf  # t' = m
    return [student.requires_grad_(), teacher, margin]


OFD = OpCase(
    "ofd", "ofd_loss", ("student", "teacher", "margin"), _make_ofd,
    fused=lambda backend, reduction="mean": (
        lambda s, t, m: ofdkern.ofd_loss(s, t, m, reduction=reduction, backend=backend)),
    reference=lambda s, t, m, reduction="mean": reference.ofd_loss(s, t, m, reduction),
    opcheck=lambda inputs, backend: (ofd_loss_fused, (*inputs, "mean", backend, True, True, True, False)),
    plant_special=_plant_ofd,
    reductions=("sum", "mean", "batchmean", "none"),
)


# ---- channel-wise alignment -----------------------------------------------------------------------------------

ALIGN_CHANNELS = (5, 7, 6)  # student, hidden, teacher


def _make_align(device, dtype, seed=0, spatial=(3, 4), layout="contiguous", batch=2, margin=False):
    g = torch.Generator().manual_seed(seed)
    cs, hidden, ct = ALIGN_CHANNELS
    student = _layout(_randn((batch, cs, *spatial), dtype, device, g), layout).requires_grad_()
    teacher = _layout(_randn((batch, ct, *spatial), dtype, device, g), layout)
    weights = [_randn(shape, dtype, device, g, 0.5).requires_grad_()
               for shape in ((hidden, cs), (hidden,), (ct, hidden), (ct,))]
    inputs = [student, teacher, *weights]
    if margin:
        inputs.append((-0.05 - torch.rand(ct, generator=g, dtype=torch.float64)).to(device, torch.float32))
    return inputs


def _plant_align(inputs):
    planted = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    with torch.no_grad():
        planted[0][0, 0, 0, 0] = math.nan  # one student pixel: NaN through both layers and relu's backward
        planted[1][1, 2, 1, 1] = math.inf  # one teacher value: an infinite loss term
    return planted


def _align_case(with_margin: bool) -> OpCase:
    names = ("student", "teacher", "w1", "b1", "w2", "b2") + (("margin",) if with_margin else ())

    def split(xs):
        return xs[:6], (xs[6] if with_margin else None)

    def fused(backend, reduction="mean"):
        def call(*xs):
            features_and_weights, margin = split(xs)
            return ofdkern.channel_align_loss(*features_and_weights, margin=margin, reduction=reduction,
                                              backend=backend)
        return call

    def ref(*xs, reduction="mean"):
        features_and_weights, margin = split(xs)
        return reference.channel_align_loss(*features_and_weights, margin, reduction)

    def opcheck(inputs, backend):
        features_and_weights, margin = split(inputs)
        return channel_align_fused, (*features_and_weights, margin, "mean", backend, True, True, True, False)

    return OpCase("channel_align_ofd" if with_margin else "channel_align", "channel_align_loss", names,
                  lambda *args, **kwargs: _make_align(*args, margin=with_margin, **kwargs),
                  fused=fused, reference=ref, opcheck=opcheck, plant_special=_plant_align)


ALIGN = _align_case(False)
ALIGN_OFD = _align_case(True)


# ---- FRSKD ----------------------------------------------------------------------------------------------------

def _make_attention(device, dtype, seed=0, spatial=(3, 5), layout="contiguous", batch=2):
    g = torch.Generator().manual_seed(seed)
    student = _layout(_randn((batch, 4, *spatial), dtype, device, g), layout).requires_grad_()
    teacher = _layout(_randn((batch, 6, *spatial), dtype, device, g), layout)
    return [student, teacher]


def _plant_attention(inputs):
    student, teacher = (x.detach().clone() for x in inputs)
    student.view(-1)[3] = math.nan  # the first sample's map and gradient become NaN
    teacher.view(-1)[-1] = math.inf  # the last sample's teacher map: inf / inf = NaN after normalizing
    return [student.requires_grad_(), teacher]


ATTENTION = OpCase(
    "attention_transfer", "attention_transfer_loss", ("f_student", "f_teacher"), _make_attention,
    fused=lambda backend, reduction="mean": (
        lambda s, t: ofdkern.attention_transfer_loss(s, t, reduction=reduction, backend=backend)),
    reference=lambda s, t, reduction="mean": reference.attention_transfer_loss(s, t, 2, reduction),
    opcheck=lambda inputs, backend: (attention_transfer_fused, (*inputs, 2.0, "mean", backend, False)),
    plant_special=_plant_attention,
    reductions=("mean", "sum", "batchmean"),
)


def _make_kd(device, dtype, seed=0, spatial=None, layout="contiguous", batch=3, classes=11):
    g = torch.Generator().manual_seed(seed)
    student = _randn((batch, classes), dtype, device, g, 3.0).requires_grad_()
    teacher = _randn((batch, classes), dtype, device, g, 3.0).requires_grad_()
    return [student, teacher]


def _plant_kd(inputs):
    student, teacher = (x.detach().clone() for x in inputs)
    student[0, 3] = math.nan  # a NaN row
    student[1, 2] = math.inf  # softmax of +inf: NaN
    student[2, 5] = -math.inf  # log p_s = -inf where p_t > 0: an infinite loss, finite student gradients
    return [student.requires_grad_(), teacher]


KD = OpCase(
    "kd", "kd_loss", ("student_logits", "teacher_logits"), _make_kd,
    fused=lambda backend, reduction="batchmean": (
        lambda s, t: ofdkern.kd_loss(s, t, reduction=reduction, backend=backend)),
    reference=lambda s, t, reduction="batchmean": reference.kd_loss(s, t, 4.0, reduction),
    opcheck=lambda inputs, backend: (kd_loss_fused, (*inputs, 4.0, "batchmean", backend, True, True, False)),
    plant_special=_plant_kd,
    layouts=("contiguous",),
    reductions=("batchmean", "sum", "mean", "none"),
)


# ---- channel-wise distillation --------------------------------------------------------------------------------

def _make_cwd(device, dtype, seed=0, spatial=(3, 5), layout="contiguous", batch=2, channels=3):
    g = torch.Generator().manual_seed(seed)
    student = _layout(_randn((batch, channels, *spatial), dtype, device, g, 2.0), layout).requires_grad_()
    teacher = _layout(_randn((batch, channels, *spatial), dtype, device, g, 2.0), layout)
    return [student, teacher]


def _plant_cwd(inputs):
    student, teacher = (x.detach().clone() for x in inputs)
    student[0, 0, 0, 1] = math.nan  # a NaN map
    student[0, 1, 1, 2] = math.inf  # softmax of +inf: NaN
    student[1, 0, 2, 0] = -math.inf  # log p_s = -inf where p_t > 0: an infinite term
    teacher[1, 1, 0, 3] = -math.inf  # p_t = 0 there: that position adds nothing
    return [student.requires_grad_(), teacher]


CWD = OpCase(
    "cwd", "cwd_loss", ("student", "teacher"), _make_cwd,
    fused=lambda backend, reduction="mean": (
        lambda s, t: ofdkern.cwd_loss(s, t, temperature=2.0, reduction=reduction, backend=backend)),
    reference=lambda s, t, reduction="mean": reference.cwd_loss(s, t, 2.0, reduction),
    opcheck=lambda inputs, backend: (cwd_loss_fused, (*inputs, 2.0, "mean", backend, True, True, False)),
    plant_special=_plant_cwd,
    reductions=("mean", "sum", "batchmean", "none"),
)

CASES = (OFD, ALIGN, ALIGN_OFD, ATTENTION, KD, CWD)
