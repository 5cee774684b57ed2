"""The channel-wise alignment loss (Liu et al., ICCVW 2023) as a torch.library custom op.

``loss = sum (W2 relu(W1 s + b1) + b2 - t)^2`` over every pixel (a 1x1 conv -> ReLU -> 1x1 conv on the student),
or OFD's margin ReLU + partial L2 on the projected student when a margin is given.

Forward computes the loss and every gradient of the unit-weighted loss in one walk over the pixels; backward only
scales them by ``grad_output`` (a device tensor: no host sync). Neither the projected student nor the hidden
activation ever exists at full size:

- "triton": one kernel; each program walks tiles of pixels, recomputes the MLP in registers and back-propagates
  the tile at once, keeping its weight-gradient sums in registers (written once per program, summed afterwards in
  a fixed order). It handles channel counts up to ``TRITON_MAX_CHANNELS``: beyond them "auto" takes the next
  backend and an explicit "triton" is refused.
- "cpu" and "cuda": the chunked ATen path: ``CHUNK_PIXELS`` pixels at a time through GEMMs (MKL/OpenBLAS on CPU,
  cuBLAS on CUDA), accumulating the weight gradients in place. These backends are plain ATen code, not
  extension ops, so they run whether or not ``ofdkern._C`` is built; on CUDA, cuBLAS GEMMs on large chunks
  are the fast choice for wide channels, where a register-tiled kernel would need a K-loop over channels.
"""
from __future__ import annotations

import torch

from .. import reference
from .._backends import Backend, register_op, resolve
from .._dtypes import accumulation_dtype, result_dtype
from .._validation import check_channel_align_args
from ._autograd import backward_scale, input_gradient, setup_scaled_backward
from ._common import (as_positions, autocast_loss, autocast_off, divide_by_count, empty_like_positions,
                      reduction_count)

# Pixels per chunk of the ATen path: the hidden activation of a chunk is CHUNK_PIXELS x hidden.
CHUNK_PIXELS = 16384
# Largest channel count (student, hidden or teacher) the Triton kernel keeps in one tile, per accumulation
# dtype: its dot operands are staged in shared memory, which for sm_90 PTX came to 96 KiB at 64 fp32 channels
# (64-pixel tiles) and 57 KiB at 32 fp64 channels (16-pixel tiles); the next power of two would pass the
# 164 KiB an A100 block can have.
TRITON_MAX_CHANNELS = {torch.float32: 64, torch.float64: 32}


def _triton_limit(channels: tuple[int, int, int], dtype: torch.dtype) -> str | None:
    bound = TRITON_MAX_CHANNELS[dtype]
    if max(channels) > bound:
        return f"channels (student, hidden, teacher) {channels} exceed its bound of {bound} in {dtype}"
    return None


ALIGN = register_op("channel_align_loss", cpu=Backend(), cuda=Backend(), triton=Backend(limit=_triton_limit))


def _loss_dtype(student, teacher, w1, b1, w2, b2, margin) -> torch.dtype:
    """What the eager reference returns: the promoted dtype; with a margin, OFD's promotion (at least float32)."""
    return result_dtype(student, teacher, w1, b1, w2, b2, margin, at_least_float32=margin is not None)


def _pixel_chunks(batch: int, positions: int, chunk: int):
    """(first sample, end sample, first position, end position) of consecutive blocks of about ``chunk``
    pixels: whole samples when a sample is smaller than a chunk, slices of one sample otherwise."""
    if positions >= chunk:
        for n in range(batch):
            for start in range(0, positions, chunk):
                yield n, n + 1, start, min(start + chunk, positions)
    else:
        samples = max(chunk // max(positions, 1), 1)
        for n in range(0, batch, samples):
            yield n, min(n + samples, batch), 0, positions


def _rows(feature3: torch.Tensor, block, dtype: torch.dtype) -> torch.Tensor:
    """The block's pixels as a (pixels, channels) matrix in ``dtype``."""
    n0, n1, s0, s1 = block
    return feature3[n0:n1, :, s0:s1].permute(0, 2, 1).reshape(-1, feature3.shape[1]).to(dtype)


def _store_rows(out3: torch.Tensor, block, rows: torch.Tensor) -> None:
    n0, n1, s0, s1 = block
    out3[n0:n1, :, s0:s1].copy_(rows.reshape(n1 - n0, s1 - s0, out3.shape[1]).permute(0, 2, 1))


def _loss_terms(projected: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor | None):
    """Per-element loss, its derivative wrt the projected student, and the teacher's share of it (the OFD
    math of csrc/ofd_math.h when a margin is given)."""
    if margin is None:
        diff = projected - teacher
        d_projected = 2 * diff
        return diff * diff, d_projected, -d_projected
    target = torch.where((teacher > margin) | teacher.isnan(), teacher, margin)
    mask = ((projected > target) | (target > 0)).to(projected.dtype)
    diff = projected - target
    d_projected = 2 * diff * mask
    d_teacher = torch.where(teacher == margin, -0.5 * d_projected, -d_projected)
    return diff * diff * mask, d_projected, torch.where(teacher < margin, 0.0, d_teacher)


def chunked_align(student3, teacher3, w1, b1, w2, b2, margin, d_student3, d_teacher3, grad_weights: bool):
    """The ATen path. Features are (N, C, positions); weights, biases and margin are 2-D/1-D in the accumulation
    dtype. Writes the unit gradients into ``d_student3`` / ``d_teacher3`` when given; returns the loss sum
    and (d w1, d b1, d w2, d b2) (None when not asked)."""
    acc = w1.dtype
    loss = torch.zeros((), dtype=acc, device=w1.device)
    weight_grads = [torch.zeros_like(p) for p in (w1, b1, w2, b2)] if grad_weights else None
    batch, _, positions = student3.shape
    for block in _pixel_chunks(batch, positions, CHUNK_PIXELS):
        x = _rows(student3, block, acc)
        pre = torch.addmm(b1, x, w1.t())
        hidden = torch.relu(pre)
        projected = torch.addmm(b2, hidden, w2.t())
        terms, d_projected, d_teacher = _loss_terms(projected, _rows(teacher3, block, acc), margin)
        loss += terms.sum()
        if d_teacher3 is not None:
            _store_rows(d_teacher3, block, d_teacher)
        if d_student3 is None and not grad_weights:
            continue
        # relu's backward as autograd takes it: 0 where relu(pre) <= 0, so a NaN pre-activation passes NaN on.
        d_hidden = torch.where(pre <= 0, 0.0, d_projected @ w2)
        if grad_weights:
            d_w1, d_b1, d_w2, d_b2 = weight_grads
            d_w2.addmm_(d_projected.t(), hidden)
            d_b2 += d_projected.sum(0)
            d_w1.addmm_(d_hidden.t(), x)
            d_b1 += d_hidden.sum(0)
        if d_student3 is not None:
            _store_rows(d_student3, block, d_hidden @ w1)
    return loss, weight_grads


def _kernel(backend: str):
    if backend == "triton":
        from ..kernels.align_triton import align_fused_triton

        return align_fused_triton
    return chunked_align


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("ofdkern::channel_align_fused", mutates_args=())
def channel_align_fused(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                        w2: torch.Tensor, b2: torch.Tensor, margin: torch.Tensor | None, reduction: str,
                        backend: str, grad_student: bool, grad_teacher: bool, grad_weights: bool,
                        in_place_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d/d student, d/d teacher, d/d w1, d/d b1, d/d w2, d/d b2) of the unit-weighted summed
    loss; w1 is (hidden, Cs) and w2 (Ct, hidden). Feature gradients are in the feature dtypes, weight gradients
    in the accumulation dtype; those not asked for are empty."""
    with autocast_off(student.device):
        loss_dtype = _loss_dtype(student, teacher, w1, b1, w2, b2, margin)
        acc = accumulation_dtype(loss_dtype)
        student3, teacher3 = as_positions(student), as_positions(teacher)
        d_student = empty_like_positions(student) if grad_student else _empty(student, student.dtype)
        d_teacher = empty_like_positions(teacher) if grad_teacher else _empty(teacher, teacher.dtype)
        d_student3 = as_positions(d_student) if grad_student else None
        d_teacher3 = as_positions(d_teacher) if grad_teacher else None
        params = [p.to(acc).contiguous() for p in (w1, b1, w2, b2)]
        margin_acc = None if margin is None else margin.reshape(-1).to(acc).contiguous()
        kernel = _kernel(backend)
        total, weight_grads = kernel(student3, teacher3, *params, margin_acc, d_student3, d_teacher3, grad_weights)
        loss = divide_by_count(total, reduction_count(teacher.shape, reduction)).to(loss_dtype)
        weights = weight_grads if grad_weights else [_empty(student, acc) for _ in range(4)]
        return loss, d_student, d_teacher, *weights


@channel_align_fused.register_fake
def _(student, teacher, w1, b1, w2, b2, margin, reduction, backend, grad_student, grad_teacher, grad_weights,
      in_place_backward):
    loss_dtype = _loss_dtype(student, teacher, w1, b1, w2, b2, margin)
    acc = accumulation_dtype(loss_dtype)
    features = [empty_like_positions(f) if wanted else _empty(f, f.dtype)
                for wanted, f in ((grad_student, student), (grad_teacher, teacher))]
    weights = [student.new_empty(p.shape, dtype=acc) if grad_weights else _empty(student, acc)
               for p in (w1, b1, w2, b2)]
    return student.new_empty((), dtype=loss_dtype), *features, *weights


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
    channels = (student.shape[1], w1.shape[0], teacher.shape[1])
    acc = accumulation_dtype(_loss_dtype(student, teacher, w1, b1, w2, b2, margin))
    backend = resolve(ALIGN, backend, student.device, channels=channels, dtype=acc)
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
