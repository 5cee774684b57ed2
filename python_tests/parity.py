"""Parity of a fused op with its eager reference, the one yardstick of every op's tests.

A fused result is compared with the reference evaluated in float64 on the same input values (the oracle):
it must be as accurate as the eager reference in the input dtype, or within a tolerance of the dtype's own
rounding, whichever is looser. That is, for the loss and every gradient:

    max |fused - oracle| <= max(rtol * max |oracle|, 2 * max |eager - oracle|)

over the oracle's finite entries, with NaN and +-inf exactly where the oracle has them, and the dtype and shape
that eager gives. ``rtol`` is the rounding of one value stored in the dtype (plus the factor it was scaled by),
so a gradient that is off by a reduction's count, a dropped mask, an ignored margin or a zeroed gradient fails:
python_tests/test_mutations.py checks that these helpers reject each of those defects.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# The rounding of a value stored in each dtype, and of the factor it was scaled by.
STORE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Losses accumulate many terms in float32 (float64) whatever the input dtype.
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def loss_rtol(dtype: torch.dtype) -> float:
    return LOSS_RTOL[torch.float64 if dtype == torch.float64 else torch.float32]


def _finite_max_abs(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return finite.abs().max().item() if finite.numel() else 0.0


def assert_close_to_oracle(name: str, actual: torch.Tensor, oracle: torch.Tensor, rtol: float,
                           eager: torch.Tensor | None = None) -> None:
    """``actual`` against the float64 ``oracle`` as the module docstring says; ``eager`` (the reference in the
    input dtype) sets the dtype and may widen the tolerance to twice its own error."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    if eager is not None:
        assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype}, the reference gives {eager.dtype}"
    a, o = actual.detach().double(), oracle.detach().double()
    for what, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(where(a), where(o)), (
            f"{name}: {what} at {where(a).sum().item()} places, the float64 reference has {where(o).sum().item()} "
            f"(first differing index {torch.nonzero(where(a) != where(o))[0].tolist()})")
    finite = torch.isfinite(o)
    if not finite.any():
        return
    error = (a - o)[finite].abs().max().item()
    allowed = rtol * _finite_max_abs(o)
    eager_error = None
    if eager is not None:
        # Where eager itself overflowed it earns no slack.
        e = eager.detach().double()
        both = finite & torch.isfinite(e)
        eager_error = (e - o)[both].abs().max().item() if both.any() else 0.0
        allowed = max(allowed, 2 * eager_error)
    assert error <= allowed, (f"{name}: max error {error:.3g} against the float64 reference exceeds {allowed:.3g} "
                              f"(rtol {rtol:g} of max |value| {_finite_max_abs(o):.3g}; eager's error "
                              f"{eager_error if eager_error is None else f'{eager_error:.3g}'})")


def _float64_leaves(inputs: Sequence) -> list:
    return [x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and
            x.is_floating_point() else x for x in inputs]


def _same_leaves(inputs: Sequence) -> list:
    return [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and x.is_floating_point()
            else x for x in inputs]


def _loss_and_grads(fn: Callable, inputs: Sequence, grad_output: torch.Tensor | None):
    loss = fn(*inputs)
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not wanted:
        return loss, []
    g = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.device, loss.dtype)
    return loss, list(torch.autograd.grad(loss, wanted, g))


def assert_parity(fused: Callable, reference: Callable, inputs: Sequence, *, names: Sequence[str] | None = None,
                  grad_output_seed: int | None = 0, loss_tolerance: float | None = None,
                  grad_tolerance: float | None = None) -> torch.Tensor:
    """``fused(*inputs)`` against ``reference(*inputs)``: the loss and the gradients of every input that
    requires grad, under a random upstream gradient (``grad_output_seed``; None: ones). Returns the fused loss.

    ``names`` names the inputs in messages. The tolerances default to the precision of the least precise
    floating input (a float64 loss of a float32 teacher is good to float32's precision): ``loss_rtol`` of it
    for the loss, and for each gradient that or the rounding of the gradient's own dtype (``STORE_RTOL``)."""
    names = list(names) if names is not None else [f"input {i}" for i in range(len(inputs))]
    grad_output = None
    if grad_output_seed is not None:
        with torch.no_grad():
            shape = reference(*inputs).shape
        grad_output = torch.randn(shape, generator=torch.Generator().manual_seed(grad_output_seed),
                                  dtype=torch.float64)
    loss, grads = _loss_and_grads(fused, inputs, grad_output)
    eager_loss, eager_grads = _loss_and_grads(reference, _same_leaves(inputs), grad_output)
    oracle_loss, oracle_grads = _loss_and_grads(reference, _float64_leaves(inputs), grad_output)
    dtypes = [x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    narrowest = max(dtypes, key=STORE_RTOL.__getitem__)
    assert_close_to_oracle("loss", loss, oracle_loss, loss_tolerance or loss_rtol(narrowest), eager_loss)
    differentiable = [(name, x) for name, x in zip(names, inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    for (name, x), got, eager, oracle in zip(differentiable, grads, eager_grads, oracle_grads, strict=True):
        rtol = grad_tolerance or max(STORE_RTOL[x.dtype], loss_rtol(narrowest))
        assert_close_to_oracle(f"grad {name}", got, oracle, rtol, eager)
    return loss
