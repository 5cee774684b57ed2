"""Attention transfer (Zagoruyko & Komodakis; the feature loss of FRSKD, Ji et al., CVPR 2021) as a
torch.library custom op.

The forward reads each feature map once and writes only its (N, positions) attention map; normalization, loss
and the map gradients run on those small maps (one call of the backend's attention_transfer_forward); the
backward kernel reads each feature once more to write its gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import reference
from .._backends import Backend, register_op, resolve
from .._dtypes import result_dtype
from .._layout import as_positions
from .._validation import check_attention_transfer_args
from ._autograd import backward_scale, fused_op, input_gradient, setup_scaled_backward, tracing
from ._common import autocast_loss, autocast_off, reduction_count

# What attention_transfer_forward (a composite, csrc/attention_transfer_op.cpp) and the backward run on the
# device.
_ATTENTION_KERNELS = ("ofdkern::attention_map", "ofdkern::attention_map_backward", "ofdkern::attention_transfer_maps")
ATTENTION_TRANSFER = register_op("attention_transfer_loss", cpu=Backend(_ATTENTION_KERNELS),
                                 cuda=Backend(_ATTENTION_KERNELS), triton=Backend())


class _Kernels(NamedTuple):
    """A backend's attention-transfer kernels, with the contracts of csrc/attention_transfer_fused.h."""
    attention_transfer_forward: Callable
    attention_map_backward: Callable


def _kernels(backend: str) -> _Kernels:
    if backend == "triton":
        from ..kernels import attention_transfer_triton

        return _Kernels(attention_transfer_triton.attention_transfer_forward,
                        attention_transfer_triton.attention_map_backward)
    # "cpu" and "cuda" are the C++ ops; the tensors' device picks the kernel.
    ops = torch.ops.ofdkern
    return _Kernels(ops.attention_transfer_forward.default, ops.attention_map_backward.default)


def _map_shape(feature: torch.Tensor) -> torch.Size:
    """(N, positions): the shape of a feature's attention map."""
    return torch.Size((feature.shape[0], math.prod(feature.shape[2:])))


@fused_op("ofdkern::attention_transfer_fused")
def attention_transfer_fused(f_student: torch.Tensor, f_teacher: torch.Tensor, p: float, reduction: str,
                             backend: str, in_place_backward: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d loss/d student map, d loss/d teacher map); the map gradients are for a unit upstream
    gradient without the reduction's scaling, as (N, positions) float64 tensors (the maps' dtype)."""
    count = reduction_count(_map_shape(f_student), reduction)
    with autocast_off(f_student.device):
        return _kernels(backend).attention_transfer_forward(as_positions(f_student), as_positions(f_teacher), p,
                                                            count)


@attention_transfer_fused.register_fake
def _(f_student, f_teacher, p, reduction, backend, in_place_backward):
    def map_like(feature):
        return feature.new_empty(_map_shape(feature), dtype=torch.float64)

    loss = f_student.new_empty((), dtype=result_dtype(f_student, f_teacher))
    return loss, map_like(f_student), map_like(f_teacher)


def _feature_gradient(feature: torch.Tensor, grad_map: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    """d <grad_map, attention map of feature> / d feature: one more read of the feature."""
    with autocast_off(feature.device):
        attention_map_backward = _kernels(backend).attention_map_backward
        return attention_map_backward(as_positions(feature), grad_map.contiguous(), p).view(feature.shape)


@torch.library.custom_op("ofdkern::attention_map_grad", mutates_args=())
def attention_map_grad(feature: torch.Tensor, grad_map: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    """``_feature_gradient`` as an op of its own, for traced backward graphs."""
    return _feature_gradient(feature, grad_map, p, backend)


@attention_map_grad.register_fake
def _(feature, grad_map, p, backend):
    merged = as_positions(feature)
    return torch.empty_strided(merged.shape, merged.stride(), dtype=feature.dtype,
                               device=feature.device).view(feature.shape)


def _attention_setup_context(ctx, inputs, output):
    f_student, f_teacher, p, reduction, backend, in_place_backward = inputs
    maps = output[1:]
    setup_scaled_backward(ctx, maps, backend=backend, in_place_backward=in_place_backward,
                          count=reduction_count(maps[0].shape, reduction), dtypes=[m.dtype for m in maps],
                          keep=(f_student, f_teacher))
    ctx.p = p


def _attention_backward(ctx, grad_loss, *_unused):
    grads = [None] * 6
    scale = backward_scale(ctx, grad_loss, ATTENTION_TRANSFER.name)
    if scale is None:
        return tuple(grads)
    *grad_maps, f_student, f_teacher = ctx.saved_tensors
    for index, (feature, grad_map) in enumerate(zip((f_student, f_teacher), grad_maps)):
        if ctx.needs_input_grad[index]:
            # The (N, positions) map gradient is scaled; the feature gradient is then written once. A traced
            # graph records the custom op; eager calls the kernel without the op's dispatch.
            feature_gradient = attention_map_grad if tracing() else _feature_gradient
            grads[index] = feature_gradient(feature, input_gradient(ctx, index, grad_map, scale), ctx.p,
                                            ctx.backend)
    return tuple(grads)


attention_transfer_fused.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention_transfer_loss(f_student: torch.Tensor, f_teacher: torch.Tensor, *, p: float = 2,
                            reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Attention transfer loss of FRSKD / Zagoruyko & Komodakis: per sample, ``a = mean_c(f**p)`` at each
    position, L2-normalized over positions (eps 1e-12); the loss is the squared difference of the two maps.

    A drop-in for the reference ``at_loss(f_s, f_t)`` (= ``reduction="mean"``).

    Args:
        f_student, f_teacher: (N, C, ...) features with 2 to 5 dims and equal batch and spatial sizes (the
            channel counts may differ), any float dtype, NCHW or channels_last.
        p: the positive exponent of the attention map (2 in FRSKD).
        reduction: "mean" (over batch and positions), "batchmean" (sum / N) or "sum".
        backend: "auto", "triton", "cuda", "cpu" or "reference" (see ``ofdkern.backend_status()``).

    Returns:
        The loss in the promoted feature dtype; the maps are accumulated in float64 (see
        csrc/attention_transfer_fused.h), the feature math in float32 (float64 for float64 features).
        Gradients flow to both features when they require them (detach the teacher as the reference does).
    """
    p = check_attention_transfer_args(f_student, f_teacher, p, reduction)
    backend = resolve(ATTENTION_TRANSFER, backend, f_student.device)
    if backend == "reference":
        return reference.attention_transfer_loss(f_student, f_teacher, p, reduction)
    loss, *_ = attention_transfer_fused(f_student, f_teacher, p, reduction, backend,
                                        in_place_backward=True)
    return autocast_loss(loss, f_student.device)
