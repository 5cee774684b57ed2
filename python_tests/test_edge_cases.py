"""Edge cases a fuzzer found (issue 18), each pinned by a test: silently wrong values, unclear errors, and the
places where the fused backends deliberately differ from the reference (README, "What differs from the
reference")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ofdkern
from ofdkern import reference

from conftest import backends_for
from op_cases import ALIGN
from parity import assert_parity

CPU_FUSED = {op: backends_for("cpu", op) for op in ofdkern.registered_ops()}


def _params(op):
    return pytest.mark.parametrize("backend", CPU_FUSED[op])


# ---- values ---------------------------------------------------------------------------------------------------

def test_the_reference_promotes_a_float64_student_against_a_bfloat16_teacher():
    # The official formula, mse_loss(source, target), promotes to float64; the reference once cast the student
    # down to the teacher's dtype and returned float32.
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t, m = torch.randn(2, 3, 4, 4, generator=g).bfloat16(), -torch.rand(3, generator=g).bfloat16()
    expected = ((s - torch.max(t, m.view(1, 3, 1, 1)).double()) ** 2
                * ((s > torch.max(t, m.view(1, 3, 1, 1)).double()) | (torch.max(t, m.view(1, 3, 1, 1)) > 0))).sum()
    for backend in ["reference", *CPU_FUSED["ofd_loss"]]:
        loss = ofdkern.ofd_loss(s, t, m, backend=backend)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


@_params("channel_align_loss")
def test_channel_align_with_half_features_and_float64_weights(backend):
    # The weights promote everything to float64; the student gradient comes back in bfloat16. (The Triton
    # interpreter once cast the float64 gradient to bfloat16 through uint16: garbage.)
    inputs = ALIGN.make("cpu", torch.float64)
    inputs[0] = inputs[0].detach().bfloat16().requires_grad_()
    inputs[1] = inputs[1].detach().bfloat16()
    assert_parity(ALIGN.fused(backend), ALIGN.reference, inputs, names=ALIGN.names)


@_params("channel_align_loss")
def test_a_nan_student_pixel_reaches_every_gradient_like_autograd(backend):
    inputs = ALIGN.make("cpu", torch.float32)
    with torch.no_grad():
        inputs[0][0, 0, 0, 0] = math.nan
    loss = ALIGN.fused(backend)(*inputs)
    grads = torch.autograd.grad(loss, [x for x in inputs if x.requires_grad])
    assert loss.isnan()
    assert grads[0][0, :, 0, 0].isnan().all()  # relu's backward passes the NaN on
    assert all(g.isnan().any() for g in grads[1:])  # b1, w1, w2, b2: their sums over pixels see it


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
@_params("channel_align_loss")
def test_an_empty_batch_gives_zero_weight_gradients(backend, reduction):
    inputs = ALIGN.make("cpu", torch.float32, batch=0)
    loss = ALIGN.fused(backend, reduction=reduction)(*inputs)
    assert loss.isnan()  # 0 / 0, like the reference
    for grad in torch.autograd.grad(loss, inputs[2:]):
        assert torch.equal(grad, torch.zeros_like(grad))


# ---- errors ---------------------------------------------------------------------------------------------------

def test_temperature_and_p_accept_numpy_numbers_and_0_dim_tensors():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    expected = reference.kd_loss(s, t, 4.0)
    for temperature in (torch.tensor(4.0), np.float32(4), np.int64(4), 4):
        torch.testing.assert_close(ofdkern.kd_loss(s, t, temperature=temperature), expected)
    f = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ofdkern.attention_transfer_loss(f, f + 1, p=np.float64(2)),
                               reference.attention_transfer_loss(f, f + 1, 2))
    for bad, error in ((torch.ones(2), TypeError), (True, TypeError), ("4", TypeError), (np.float32(-1), ValueError)):
        with pytest.raises(error, match="temperature must be"):
            ofdkern.kd_loss(s, t, temperature=bad)


def test_channel_align_refuses_empty_layers():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match="at least one channel in every layer"):  # no hidden unit
        ofdkern.channel_align_loss(s, t, torch.randn(0, 3), torch.randn(0), torch.randn(5, 0), torch.randn(5))
    with pytest.raises(ValueError, match="at least one channel in every layer"):
        ofdkern.channel_align_loss(torch.randn(2, 0, 4, 4), t, torch.randn(4, 0), torch.randn(4), torch.randn(5, 4),
                                   torch.randn(5))


def test_channel_align_module_names_the_feature_it_was_given():
    module = ofdkern.ChannelAlign(3, 5)
    with pytest.raises(ValueError, match=r"student must have 3 channels on dim 1 \(ChannelAlign\(3, 5\)\)"):
        module(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"teacher must have 5 channels"):
        module(torch.randn(2, 3, 3, 3), torch.randn(2, 6, 3, 3))


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if "triton" in CPU_FUSED["channel_align_loss"] else []))
def test_a_direct_call_of_the_kernel_checks_its_contract(backend):
    # The custom op behind channel_align_loss passes its arguments to the kernel unchecked: the kernel's own
    # checks must stop inconsistent weights (the Triton path once wrote past its weight-gradient buffers).
    from ofdkern.ops.align import _kernel

    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    good = [torch.randn(7, 3), torch.randn(7), torch.randn(5, 7), torch.randn(5)]
    for index, bad in ((0, torch.randn(7, 4)), (1, torch.randn(6)), (2, torch.randn(5, 6)), (3, torch.randn(4))):
        weights = list(good)
        weights[index] = bad
        with pytest.raises(ValueError, match="must have shape"):
            _kernel(backend)(s, t, *weights, None, True, True, True)
    with pytest.raises(TypeError, match="dtype"):
        _kernel(backend)(s, t, good[0].double(), *good[1:], None, True, True, True)
    with pytest.raises(ValueError, match="margin"):
        _kernel(backend)(s, t, *good, torch.zeros(4), True, True, True)


def test_self_teacher_refuses_bad_widths_and_mismatched_stages():
    for channels, error in (([3.7, 5.2], TypeError), (["3", "5"], TypeError), ([3], ValueError), ([3, 0], ValueError)):
        with pytest.raises(error, match="channels"):
            ofdkern.SelfTeacher(channels, 10)
    with pytest.raises(TypeError, match="num_classes must be a positive int"):
        ofdkern.SelfTeacher([4, 8], 10.0)
    teacher = ofdkern.SelfTeacher([4, 8], 5)
    with pytest.raises(ValueError, match="half the spatial size"):
        teacher([torch.randn(2, 4, 8, 8), torch.randn(2, 8, 3, 3)])
    with pytest.raises(ValueError, match="batch of the first"):
        teacher([torch.randn(2, 4, 8, 8), torch.randn(3, 8, 4, 4)])


def test_frskd_loss_weights_must_be_finite_and_non_negative():
    for name in ("alpha", "beta"):
        for bad in (math.nan, -1.0, math.inf):
            with pytest.raises(ValueError, match=f"{name} must be a non-negative finite number"):
                ofdkern.FRSKDLoss(**{name: bad})


# ---- what the fused backends do differently from the reference, on purpose ---------------------------------

@_params("ofd_loss")
def test_half_precision_ofd_loss_computes_in_float32_where_the_reference_overflows(backend):
    # All-float16 inputs: the reference squares 300.5 in float16 (inf); the fused kernels compute in float32.
    s = torch.tensor([300.0], dtype=torch.float16).view(1, 1, 1, 1)
    t = torch.zeros_like(s)
    m = torch.tensor([-0.5], dtype=torch.float16)
    assert reference.ofd_loss(s, t, m).isinf()
    assert ofdkern.ofd_loss(s, t, m, backend=backend).item() == 90000.0


@_params("attention_transfer_loss")
def test_half_precision_attention_maps_compute_in_float32_where_the_reference_overflows(backend):
    f = torch.full((1, 2, 2, 2), 300.0, dtype=torch.float16)  # 300^2 overflows float16: inf / inf = NaN
    g = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0)).half()
    assert reference.attention_transfer_loss(f, g).isnan()
    expected = reference.attention_transfer_loss(f.float(), g.float())
    torch.testing.assert_close(ofdkern.attention_transfer_loss(f, g, backend=backend).float(), expected,
                               rtol=2e-3, atol=1e-5)
