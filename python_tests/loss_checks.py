"""Checks the loss tests of attention transfer, KD and channel-wise distillation share: small inputs, the
float64 reference with its gradients, and which GPU backends run here."""
from __future__ import annotations

import pytest
import torch

from conftest import STATUS

def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def features(shape_s, shape_t, dtype=torch.float64, device="cpu", channels_last=False, nonnegative=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in (shape_s, shape_t):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        x = (x.abs() if nonnegative else x).to(device=device, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        tensors.append(x.requires_grad_())
    return tensors


def logits(rows, classes, dtype=torch.float64, device="cpu", seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(rows, classes, generator=gen, dtype=torch.float64)).to(device, dtype).requires_grad_()
            for _ in range(2)]


def expected_with_grads(fn, inputs, grad_output):
    """The reference in float64 on the same values, and its gradients wrt every input."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves, grad_output.double())


def check_against_reference(loss_fn, reference_fn, inputs, rtol):
    loss = loss_fn(*inputs)
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grad_output = grad_output.to(loss.device)
    expected, expected_grads = expected_with_grads(reference_fn, inputs, grad_output)
    assert loss.dtype == torch.promote_types(inputs[0].dtype, inputs[1].dtype)
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())
    grads = torch.autograd.grad(loss, inputs, grad_output.to(loss.dtype))
    for x, grad, want in zip(inputs, grads, expected_grads):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        scale = want.abs().max().item()
        torch.testing.assert_close(grad.double(), want, rtol=rtol, atol=rtol * scale)


def assert_same_nan_pattern(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=1e-5, atol=1e-6)


GPU_BACKENDS = [b for b in ("cuda", "triton") if "cuda" in STATUS[b]["devices"]] or ["cuda"]


def needs_gpu(backend):
    if backend not in GPU_BACKENDS or "cuda" not in STATUS[backend]["devices"]:
        pytest.skip(f"needs a CUDA device and the {backend} kernels")


def attention_gradient_errors(fused, channels, channels_last, device="cpu", batch=2, side=7):
    """The student gradient's norm-wise error against float64 of ``fused`` (an attention-transfer loss of
    float32 features) and of the eager reference, on features of many channels whose teacher is close to the
    student (as FRSKD's refined features are): the loss normalizes the maps' difference, which magnifies the
    rounding of the maps' channel sums in the gradient."""
    from ofdkern import reference

    gen = torch.Generator().manual_seed(11)
    shape = (batch, channels, side, side)
    student = torch.randn(shape, generator=gen, dtype=torch.float64)
    teacher = student + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    exact = student.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.attention_transfer_loss(exact, teacher), exact)

    def error(loss_fn):
        leaf = student.to(device, torch.float32, memory_format=layout).requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(leaf, teacher.to(device, torch.float32, memory_format=layout)), leaf)
        return ((grad.double().cpu() - want).norm() / want.norm()).item()

    return error(fused), error(reference.attention_transfer_loss)
