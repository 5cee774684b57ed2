"""The parity helpers must reject broken ops: each deliberately broken variant of each op below has to fail
``assert_parity`` against the op's reference, so that the tolerances of every parity test in this suite cannot
silently loosen until a real defect passes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ofdkern
from ofdkern import reference

from op_cases import ALIGN, ALIGN_OFD, ATTENTION, CWD, KD, OFD
from parity import assert_parity


class _ZeroGrad(torch.autograd.Function):
    """Identity whose backward drops the gradient: a kernel that never writes its gradient buffer."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class _NanDroppedGrad(torch.autograd.Function):
    """Identity whose backward replaces NaN by 0: a kernel whose select swallows NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.nan_to_num(grad, nan=0.0)


def _first_input_through(function):
    def wrap(fused):
        return lambda first, *rest: fused(function.apply(first), *rest)
    return wrap


def _count_off(case, reduction):
    """The summed loss divided by one more than the reduction's count."""
    def wrap(fused_sum):
        return lambda *xs: fused_sum(*xs) / (_count(case, xs, reduction) + 1)
    return wrap


def _count(case, inputs, reduction):
    """What the reduction divides by: the batch ("batchmean"), or every element of the loss ("mean": the
    teacher's for channel alignment, the attention map's for attention transfer, the maps' for CWD)."""
    feature = inputs[1] if case.op == "channel_align_loss" else inputs[0]
    if reduction == "batchmean":
        return feature.shape[0]
    if case.op == "cwd_loss":
        return feature.shape[0] * feature.shape[1]
    if case.op == "attention_transfer_loss":
        return feature.shape[0] * feature[0, 0].numel()
    return feature.numel()


def _ofd_without_mask(s, t, m):
    target = torch.max(t, reference.margin_as_channels(m, t.dim()))
    return F.mse_loss(s.to(target.dtype), target, reduction="mean")


def _ofd_without_margin(s, t, m):
    return reference.ofd_loss(s, t, torch.zeros_like(m), "mean")


def _align_without_relu(s, t, w1, b1, w2, b2, margin=None):
    hidden = reference.pointwise_conv(s, w1, b1)
    projected = reference.pointwise_conv(hidden, w2, b2)
    if margin is not None:
        return reference.ofd_loss(projected, t, margin, "mean")
    return F.mse_loss(projected, t, reduction="mean")


def _align_ofd_without_mask(s, t, w1, b1, w2, b2, margin):
    projected = reference.pointwise_conv(torch.relu(reference.pointwise_conv(s, w1, b1)), w2, b2)
    return _ofd_without_mask(projected, t, margin)


def _align_ofd_without_margin(s, t, w1, b1, w2, b2, margin):
    return ofdkern.channel_align_loss(s, t, w1, b1, w2, b2, margin=torch.zeros_like(margin), reduction="mean",
                                      backend="cpu")


def _attention_without_normalize(s, t):
    def raw_map(f):
        return f.pow(2).mean(1).view(f.shape[0], -1)
    return (raw_map(s) - raw_map(t)).pow(2).mean()


def _kd_without_temperature_squared(s, t):
    return ofdkern.kd_loss(s, t, backend="cpu") / 16.0


def _cwd_softmax_over_channels(s, t):
    """KD per position over the channels (the softmax on the wrong axis), normalized like CWD's "mean"."""
    def positions_by_channels(x):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    rows = reference.kd_loss(positions_by_channels(s), positions_by_channels(t), 2.0, "sum")
    return rows / (s.shape[0] * s.shape[1])


# (case, name of the defect, broken loss over the case's inputs, whether to plant NaN/Inf first)
BROKEN = []
for case in (OFD, ALIGN, ALIGN_OFD, ATTENTION, KD, CWD):
    fused = case.fused("cpu")
    BROKEN += [
        (case, "zeroed gradient", _first_input_through(_ZeroGrad)(fused), False),
        (case, "NaN dropped from the gradient", _first_input_through(_NanDroppedGrad)(fused), True),
        (case, "NaN dropped from the loss", lambda *xs, fused=fused: torch.nan_to_num(fused(*xs)), True),
        (case, "reduction count off by one", _count_off(case, "mean" if case is not KD else "batchmean")(
            case.fused("cpu", reduction="sum")), False),
    ]
BROKEN += [
    (OFD, "mask dropped", _ofd_without_mask, False),
    (OFD, "margin ignored", _ofd_without_margin, False),
    (ALIGN, "hidden ReLU dropped", _align_without_relu, False),
    (ALIGN_OFD, "mask dropped", _align_ofd_without_mask, False),
    (ALIGN_OFD, "margin ignored", _align_ofd_without_margin, False),
    (ATTENTION, "maps not normalized", _attention_without_normalize, False),
    (KD, "T^2 factor dropped", _kd_without_temperature_squared, False),
    (CWD, "softmax over channels", _cwd_softmax_over_channels, False),
]


@pytest.mark.parametrize("case,defect,broken,special", BROKEN,
                         ids=[f"{case.id}-{defect.replace(' ', '_')}" for case, defect, _, _ in BROKEN])
def test_parity_rejects_a_broken_op(case, defect, broken, special):
    for dtype in (torch.float32, torch.bfloat16):
        inputs = case.make("cpu", dtype)
        if special:
            inputs = case.plant_special(case.make("cpu", torch.float32))
        # The intact op passes, the broken one must not.
        assert_parity(case.fused("cpu"), case.reference, inputs, names=case.names)
        with pytest.raises(AssertionError):
            assert_parity(broken, case.reference, inputs, names=case.names)
