"""Inputs and the float64 oracle shared by the OFD loss tests."""
from __future__ import annotations

import torch

from ofdkern import reference
from ofdkern.ops.ofd import compute_dtype

# Relative tolerance of a value stored in each dtype (its rounding, plus the rounding of the scale).
STORE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_features(shape, dtype, device, layout="contiguous", seed=0):
    """Student, teacher in ``layout``: contiguous, channels_last (4-D/5-D), or a non-dense strided view."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(2):
        if layout == "strided":
            # Every other element of the last dim: non-dense, the kernels must copy.
            full = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)
            x = full.to(device=device, dtype=dtype)[..., ::2]
        else:
            x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            if layout == "channels_last":
                fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
                x = x.to(memory_format=fmt)
        tensors.append(x)
    return tensors


def make_margin(channels, dtype, device, form="flat", seed=0, ndim=4):
    gen = torch.Generator().manual_seed(seed + 1)
    margin = -torch.rand(channels, generator=gen).to(device=device, dtype=dtype)
    return margin if form == "flat" else margin.reshape(1, channels, *([1] * (ndim - 2)))


def oracle(student, teacher, margin, reduction, grad_output=None):
    """The reference evaluated in float64 on the same values: (loss, grads wrt student, teacher, margin)
    in the dtypes the reference returns. Grads of inputs that do not require grad are None."""
    leaves = [x.detach().double().requires_grad_(x.requires_grad) for x in (student, teacher, margin)]
    loss = reference.ofd_loss(*leaves, reduction)
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grads = [None, None, None]
    if wanted:
        g = torch.ones_like(loss) if grad_output is None else grad_output.double()
        got = iter(torch.autograd.grad(loss, wanted, g))
        grads = [next(got).to(x.dtype) if x.requires_grad else None for x in (student, teacher, margin)]
    return loss.detach().to(compute_dtype(student, teacher, margin)), grads


def assert_close(actual, expected, name, rtol):
    """Dtype, shape and values (NaN where the expected value is NaN) within ``rtol`` of the magnitude."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    # The absolute tolerance scales with the values: a gradient of 1e-4 ("mean") must be right to 1e-4 * rtol.
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def loss_rtol(dtype):
    """Losses are computed and accumulated in float32 (float64): a tolerance of that precision."""
    return 1e-10 if dtype == torch.float64 else 2e-5
