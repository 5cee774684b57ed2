"""The channel-wise alignment loss (Liu et al., ICCVW 2023) as a torch.library custom op.

``loss = sum (W2 relu(W1 s + b1) + b2 - t)^2`` over every pixel (a 1x1 conv -> ReLU -> 1x1 conv on the student),
or OFD's margin ReLU + partial L2 on the projected student when a margin is given.

Forward computes the loss and every gradient of the unit-weighted loss in one walk over the pixels; backward only
scales them by ``grad_output`` (``_autograd.scale_saved_gradient``). Neither the projected student nor the hidden
activation ever exists at full size:

- "cpu" and "cuda": the C++ tile pipeline of csrc/align_fused.h: tiles of pixels through six GEMMs (MKL/oneDNN in
  the accumulation dtype on CPU, cuBLAS in the inputs' dtype on CUDA: tensor cores for half precision, TF32 as
  torch's matmul precision allows) with fused elementwise passes in between.
- "triton": for narrow layers one kernel whose programs walk tiles of pixels with the whole MLP in registers;
  for wide ones the same tile pipeline as two Triton kernels with K-loops over channel blocks
  (ofdkern/kernels/align_triton.py, align_tiled_triton.py).
"""
from __future__ import annotations

import torch

from .. import reference
from .._backends import Backend, has_kernel, register_op, resolve
from .._dtypes import accumulation_dtype, result_dtype
from .._layout import walkable
from .._validation import check_channel_align_args
from ._autograd import backward_scale, fused_op, input_gradient, setup_scaled_backward
from ._common import autocast_loss, autocast_off, divide_by_count, reduction_count

ALIGN = register_op("channel_align_loss", cpu=Backend(("ofdkern::align_fused",)),
                    cuda=Backend(("ofdkern::align_fused",)), triton=Backend())


_BFLOAT16_GEMM_MODES = {None: -1, False: 0, True: 1}


def set_cpu_bfloat16_gemms(enabled: bool | None) -> bool | None:
    """Whether the "cpu" backend runs the GEMMs of bfloat16 channel alignment in bfloat16 (True) or in float32
    on converted tiles (False). None, the default: in bfloat16 only on CPUs where those GEMMs are the faster
    ones (Intel CPUs with AMX; other CPUs with AVX512-BF16). Returns the previous setting; changes nothing
    (and returns None) where the C++ CPU kernels are not built."""
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_cpu_bfloat16_gemms: enabled must be True, False or None, got {enabled!r}")
    if not has_kernel("cpu", "ofdkern::align_fused"):
        return None
    previous = torch.ops.ofdkern.set_cpu_bfloat16_gemms(_BFLOAT16_GEMM_MODES[enabled])
    return {mode: setting for setting, mode in _BFLOAT16_GEMM_MODES.items()}[previous]


def _compute_dtype(student, teacher, w1, b1, w2, b2) -> torch.dtype:
    """The dtype the reference computes the MLP in: every feature and weight promoted together."""
    return result_dtype(student, teacher, w1, b1, w2, b2)


def _loss_dtype(student, teacher, w1, b1, w2, b2, margin) -> torch.dtype:
    """What the eager reference returns: the promoted dtype; with a margin, OFD's promotion (at least float32)."""
    return result_dtype(student, teacher, w1, b1, w2, b2, margin, at_least_float32=margin is not None)


def _kernel(backend: str):
    """The fused op of ``backend``, with the contract of csrc/align_fused.h."""
    if backend == "triton":
        from ..kernels.align_triton import align_fused_triton

        return align_fused_triton
    # "cpu" and "cuda" are the C++ op; the tensors' device picks its kernel.
    return torch.ops.ofdkern.align_fused.default


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


@fused_op("ofdkern::channel_align_fused")
def channel_align_fused(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                        w2: torch.Tensor, b2: torch.Tensor, margin: torch.Tensor | None, reduction: str,
                        backend: str, grad_student: bool, grad_teacher: bool, grad_weights: bool,
                        in_place_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d/d student, d/d teacher, d/d w1, d/d b1, d/d w2, d/d b2) of the unit-weighted summed
    loss; w1 is (hidden, Cs) and w2 (Ct, hidden). Feature gradients are in the feature dtypes, weight gradients
    in the accumulation dtype; those not asked for are empty."""
    with autocast_off(student.device):
        compute = _compute_dtype(student, teacher, w1, b1, w2, b2)
        params = [p.to(compute).contiguous() for p in (w1, b1, w2, b2)]
        margin_acc = None if margin is None else margin.reshape(-1).to(accumulation_dtype(compute)).contiguous()
        total, *grads = _kernel(backend)(walkable(student), walkable(teacher), *params, margin_acc, grad_student,
                                         grad_teacher, grad_weights)
        loss = divide_by_count(total, reduction_count(teacher.shape, reduction))
        return loss.to(_loss_dtype(student, teacher, w1, b1, w2, b2, margin)), *grads


@channel_align_fused.register_fake
def _(student, teacher, w1, b1, w2, b2, margin, reduction, backend, grad_student, grad_teacher, grad_weights,
      in_place_backward):
    acc = accumulation_dtype(_compute_dtype(student, teacher, w1, b1, w2, b2))

    def like(wanted, feature):
        feature = walkable(feature)
        return torch.empty_strided(feature.shape, feature.stride(), dtype=feature.dtype,
                                   device=feature.device) if wanted else _empty(feature, feature.dtype)

    weights = [student.new_empty(p.shape, dtype=acc) if grad_weights else _empty(student, acc)
               for p in (w1, b1, w2, b2)]
    loss = student.new_empty((), dtype=_loss_dtype(student, teacher, w1, b1, w2, b2, margin))
    return loss, like(grad_student, student), like(grad_teacher, teacher), *weights


def _setup_context(ctx, inputs, output):
    student, teacher, w1, b1, w2, b2, _margin, reduction, backend, *_wanted, in_place_backward = inputs
    setup_scaled_backward(ctx, output[1:], backend=backend, in_place_backward=in_place_backward,
                          count=reduction_count(teacher.shape, reduction),
                          dtypes=[x.dtype for x in (student, teacher, w1, b1, w2, b2)])


def _backward(ctx, grad_loss, *_unused):
    grads = [None] * 13
    scale = backward_scale(ctx, grad_loss, ALIGN.name)
    if scale is None:
        return tuple(grads)
    for index, buffer in enumerate(ctx.saved_tensors):
        if ctx.needs_input_grad[index]:
            grads[index] = input_gradient(ctx, index, buffer, scale)
    return tuple(grads)


channel_align_fused.register_autograd(_backward, setup_context=_setup_context)


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], weight.shape[1])


def channel_align_loss(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, *, margin: torch.Tensor | None = None,
                       reduction: str = "sum", backend: str = "auto") -> torch.Tensor:
    """Channel-wise transformation distillation loss (Liu et al., ICCVW 2023):
    ``sum (W2 relu(W1 s + b1) + b2 - t)^2`` with the MLP applied at every pixel, or with ``margin`` OFD's
    margin ReLU on the teacher and partial L2 (``ofd_loss(MLP(s), t, margin)``).

    Args:
        student: (N, Cs, ...) features with 2 to 5 dims, NCHW or channels_last, any float dtype.
        teacher: (N, Ct, ...) features with the student's batch and spatial sizes.
        w1, b1: first 1x1 conv, (hidden, Cs) or (hidden, Cs, 1, 1), and (hidden,).
        w2, b2: second 1x1 conv, (Ct, hidden) or (Ct, hidden, 1, 1), and (Ct,).
        margin: optional per-teacher-channel margins, (Ct,) or (1, Ct, 1, ...); a constant (no gradient) on
            the fused backends.
        reduction: "sum", "mean" (over the teacher's elements) or "batchmean" (sum / N). "none" is not offered:
            it would materialize the projected feature, which this op exists to avoid.
        backend: "auto", "triton", "cuda", "cpu" or "reference" (see the module docstring).

    Returns:
        The loss in the inputs' promoted dtype (at least float32 with a margin, like ``ofd_loss``), accumulated
        in float32 (float64 for float64). Gradients flow to the student, the weights and biases, and the teacher
        when it requires grad.
    """
    check_channel_align_args(student, teacher, w1, b1, w2, b2, margin, reduction)
    backend = resolve(ALIGN, backend, student.device)
    if backend == "reference":
        return reference.channel_align_loss(student, teacher, w1, b1, w2, b2, margin, reduction)
    if margin is not None and margin.requires_grad and torch.is_grad_enabled():
        raise ValueError("channel_align_loss: margin gradients are not computed by the fused backends; detach "
                         "the margin or use backend='reference'")
    needs_grad = torch.is_grad_enabled()
    loss, *_ = channel_align_fused(
        student, teacher, _as_matrix(w1), b1, _as_matrix(w2), b2, margin, reduction, backend,
        needs_grad and student.requires_grad, needs_grad and teacher.requires_grad,
        needs_grad and any(p.requires_grad for p in (w1, b1, w2, b2)), in_place_backward=True)
    return autocast_loss(loss, student.device)
