"""Attention transfer (ofdkern.attention_transfer_loss) on every backend that runs here against the eager
reference (values, gradients, fp64 gradcheck, layouts, exponents, bad input), its accuracy against a float64
computation next to eager's own, the map ops, NaN/Inf and empty inputs, and the thread-count independence of
the CPU kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ofdkern
from ofdkern import reference

from conftest import assert_same_bits_with_one_thread, backend_cases
from loss_checks import (assert_same_nan_pattern, attention_gradient_errors, check_against_reference, features,
                         interpreted, needs_gpu)

BACKEND_CASES = backend_cases("attention_transfer_loss")
ALL_CASES = BACKEND_CASES + [pytest.param("cpu", "reference", id="reference-cpu")]


@pytest.mark.parametrize("device,backend", ALL_CASES)
@pytest.mark.parametrize("p", [2, 3, 1.5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_attention_transfer_matches_reference(device, backend, p, channels_last, reduction):
    # Channels differ between student and teacher, as for the self-teacher's widened features. p = 1.5 needs
    # non-negative (post-ReLU) features: a fractional power of a negative number is NaN.
    shape_s, shape_t = ((2, 3, 4, 5), (2, 6, 4, 5)) if interpreted(backend, device) else ((3, 16, 9, 11), (3, 32, 9, 11))
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        inputs = features(shape_s, shape_t, dtype, device, channels_last, nonnegative=p == 1.5)
        check_against_reference(
            lambda s, t: ofdkern.attention_transfer_loss(s, t, p=p, reduction=reduction, backend=backend),
            lambda s, t: reference.attention_transfer_loss(s, t, p, reduction), inputs, rtol)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_half_precision_and_layouts(device, backend):
    shape = (2, 4, 3, 5)
    for dtype in (torch.float16, torch.bfloat16):
        s, t = features(shape, shape, dtype, device)
        check_against_reference(
            lambda s, t: ofdkern.attention_transfer_loss(s, t, backend=backend),
            reference.attention_transfer_loss, [s, t], 2e-2)
    # Non-dense views, 2-D, 3-D and 5-D features.
    base_s, base_t = features((2, 3, 4, 10), (2, 3, 4, 10), device=device)
    for s, t in [(base_s[..., ::2], base_t[..., ::2]), (base_s[:, :, 0, 0], base_t[:, :, 0, 0]),
                 (base_s[:, :, 0], base_t[:, :, 0]), (base_s.unsqueeze(2), base_t.unsqueeze(2))]:
        check_against_reference(lambda s, t: ofdkern.attention_transfer_loss(s, t, backend=backend),
                                reference.attention_transfer_loss, [s, t], 1e-10)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_zero_map_follows_normalize_eps(device, backend):
    # An all-zero sample: its map norm is below F.normalize's eps, the gradient divides by eps instead.
    s, t = features((2, 3, 2, 2), (2, 3, 2, 2), device=device)
    with torch.no_grad():
        s[0].zero_()
    check_against_reference(lambda s, t: ofdkern.attention_transfer_loss(s, t, backend=backend),
                            reference.attention_transfer_loss, [s, t], 1e-10)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_gradcheck(device, backend):
    s, t = features((2, 2, 2, 3), (2, 3, 2, 3), device=device, seed=1)
    for p in (2, 3):
        assert torch.autograd.gradcheck(
            lambda s, t: ofdkern.attention_transfer_loss(s, t, p=p, backend=backend), (s, t), fast_mode=True)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_is_deterministic(device, backend):
    s, t = features((2, 8, 6, 7), (2, 8, 6, 7), torch.float32, device)

    def once():
        loss = ofdkern.attention_transfer_loss(s, t, backend=backend)
        return (loss, *torch.autograd.grad(loss, (s, t)))

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_fp32_accuracy_is_at_least_eager(device, backend):
    shape = (2, 6, 5, 7) if interpreted(backend, device) else (4, 32, 14, 14)
    s, t = (x.detach().float() for x in features(shape, shape, device=device, seed=3))

    def errors(fn):
        leaves = [x.clone().requires_grad_() for x in (s, t)]
        want_leaves = [x.double().requires_grad_() for x in (s, t)]
        got, want = fn(*leaves), reference.attention_transfer_loss(*want_leaves)
        grad, want_grad = torch.autograd.grad(got, leaves[0])[0], torch.autograd.grad(want, want_leaves[0])[0]
        return (abs(got.item() - want.item()) / want.item(),
                ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item())

    fused = errors(lambda s, t: ofdkern.attention_transfer_loss(s, t, backend=backend))
    eager = errors(reference.attention_transfer_loss)
    for ours, theirs in zip(fused, eager):
        assert ours <= max(2e-6, 2 * theirs), (fused, eager)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("channels", [1024, 2048])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradients_at_many_channels_are_as_accurate_as_eager(device, backend, channels, channels_last):
    # The maps' channel sums are pairwise: a float32 sum of 1024 channels one at a time left the gradient ~7x
    # less accurate than eager's (whose sums are cascaded).
    side = 3 if interpreted(backend, device) else 7
    ours, eager = attention_gradient_errors(lambda s, t: ofdkern.attention_transfer_loss(s, t, backend=backend),
                                            channels, channels_last, device, side=side)
    assert ours <= eager, (ours, eager)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_attention_transfer_every_dtype(device, backend, channels_last):
    shape_s, shape_t = ((2, 3, 4, 5), (2, 5, 4, 5)) if interpreted(backend, device) else ((3, 24, 9, 11), (3, 40, 9, 11))
    # fp16 gradients of this size (~1e-5) are subnormals, 6e-8 apart.
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)):
        inputs = features(shape_s, shape_t, dtype, device, channels_last)
        check_against_reference(lambda s, t: ofdkern.attention_transfer_loss(s, t, backend=backend),
                                reference.attention_transfer_loss, inputs, rtol)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="batch and spatial"):
        ofdkern.attention_transfer_loss(x, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="p must be"):
        ofdkern.attention_transfer_loss(x, x, p=0)
    with pytest.raises(ValueError, match="reduction"):
        ofdkern.attention_transfer_loss(x, x, reduction="none")
    with pytest.raises(TypeError, match="f_student must be float"):
        ofdkern.attention_transfer_loss(x.long(), x)
    with pytest.raises(ValueError, match="f_teacher must have 2 to 5 dims"):
        ofdkern.attention_transfer_loss(x, torch.randn(2))


def test_opcheck_of_the_attention_backward_op():
    # The forward custom ops are checked by test_op_framework.py; this one runs inside their backward.
    from ofdkern.ops.attention_transfer import attention_map_grad

    s, _ = features((2, 3, 4, 4), (2, 5, 4, 4), torch.float32)
    torch.library.opcheck(attention_map_grad, (s.detach(), torch.randn(2, 16, dtype=torch.float64), 2.0, "cpu"))


# --- the attention-map ops ---------------------------------------------------------------------------------------

def attention_maps_expected(map_student, map_teacher):
    leaves = [m.detach().clone().requires_grad_() for m in (map_student, map_teacher)]
    row_loss = (F.normalize(leaves[0]) - F.normalize(leaves[1])).pow(2).sum(1)
    return (row_loss.detach(), *torch.autograd.grad(row_loss.sum(), leaves))


def attention_op(backend, name):
    """The backend's entry point ``name`` (the contracts of csrc/attention_transfer_fused.h)."""
    if backend == "triton":
        from ofdkern.kernels import attention_transfer_triton
        return getattr(attention_transfer_triton, name)
    return getattr(torch.ops.ofdkern, name)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_maps_op(device, backend):
    gen = torch.Generator().manual_seed(8)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        maps = [torch.rand(4, 37, generator=gen, dtype=dtype).to(device) for _ in range(2)]
        maps[0][2] = 0  # norm below F.normalize's eps: the gradient divides by eps
        expected = attention_maps_expected(*maps)
        for grad_student, grad_teacher in ((True, True), (True, False), (False, True), (False, False)):
            got = attention_op(backend, "attention_transfer_maps")(*maps, grad_student, grad_teacher)
            torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=tol)
            for wanted, grad, want in zip((grad_student, grad_teacher), got[1:], expected[1:]):
                if wanted:
                    scale = want.abs().max().item()
                    torch.testing.assert_close(grad / scale, want / scale, rtol=tol, atol=tol)
                else:
                    assert grad.numel() == 0


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_forward_op(device, backend):
    # The composite the op's forward calls: both maps, their math, the summed loss over the count in the
    # features' promoted dtype, and the map gradients (of the undivided sum) in the maps' dtype, float64. A
    # float64 student against a float32 teacher of other channels.
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(3, 5, 37, generator=gen, dtype=torch.float64).to(device)
    teacher = torch.randn(3, 4, 37, generator=gen).to(device)
    row_loss, *want_grads = attention_maps_expected(*(f.double().pow(2).mean(1) for f in (student, teacher)))
    forward = attention_op(backend, "attention_transfer_forward")
    for count in (1, 3 * 37):
        loss, grad_student, grad_teacher = forward(student, teacher, 2.0, count)
        assert loss.dtype == torch.float64 and loss.dim() == 0
        torch.testing.assert_close(loss, row_loss.sum() / count, rtol=1e-6, atol=0)
        assert (grad_student.dtype, grad_teacher.dtype) == (torch.float64, torch.float64)
        for grad, want in zip((grad_student, grad_teacher), want_grads):
            scale = want.abs().max().item()
            torch.testing.assert_close(grad.double() / scale, want / scale, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="equal N and S"):
        forward(student, teacher[:, :, :5], 2.0, 1)


def test_attention_transfer_maps_bad_inputs():
    op = torch.ops.ofdkern.attention_transfer_maps
    m = torch.rand(2, 5)
    with pytest.raises(ValueError, match="map_student .* and map_teacher .* differ in shape"):
        op(m, torch.rand(2, 6), True, True)
    with pytest.raises(TypeError, match="map_teacher dtype"):
        op(m, m.double(), True, True)
    with pytest.raises(TypeError, match="float32 or float64"):
        op(m.half(), m.half(), True, True)
    with pytest.raises(ValueError, match="must be \\(N, S\\)"):
        op(m[0], m[0], True, True)
    with pytest.raises(ValueError, match="p must be positive"):
        torch.ops.ofdkern.attention_map(torch.rand(2, 3, 4), 0.0)


# --- NaN, Inf, empty inputs, threads ------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_nan_and_inf_follow_the_reference(device, backend):
    for value in (float("nan"), float("inf")):
        s, t = (x.detach().float() for x in features((2, 3, 4, 4), (2, 5, 4, 4), device=device, seed=6))
        s[1, 2, 1, 3] = value
        leaf = s.clone().requires_grad_()
        got = ofdkern.attention_transfer_loss(leaf, t, reduction="sum", backend=backend)
        (grad,) = torch.autograd.grad(got, leaf)
        ref_leaf = s.clone().requires_grad_()
        want = reference.attention_transfer_loss(ref_leaf, t, reduction="sum")
        (want_grad,) = torch.autograd.grad(want, ref_leaf)
        assert torch.isnan(got) and torch.isnan(want)
        assert_same_nan_pattern(grad, want_grad)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_half_precision_overflow_stays_finite(device, backend):
    # Deliberate difference: the reference computes f^2 and the KD exps in fp16, where 300^2 overflows; the fused
    # kernels compute in fp32 and return the float64 result rounded to fp16.
    f_s = torch.full((1, 2, 2, 2), 300.0, device=device)
    f_t = torch.rand((1, 2, 2, 2), generator=torch.Generator().manual_seed(0)).to(device)
    fused = ofdkern.attention_transfer_loss(f_s.half(), f_t.half(), backend=backend)
    assert not torch.isfinite(reference.attention_transfer_loss(f_s.half(), f_t.half()))
    torch.testing.assert_close(fused.double(), reference.attention_transfer_loss(f_s.half().double(),
                                                                                f_t.half().double()),
                               rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_empty_batch_sums_to_zero(device, backend):
    # The reference's view(N, -1) cannot take an empty batch; the fused losses give 0 like a sum over nothing.
    s = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    loss = ofdkern.attention_transfer_loss(s, torch.randn(0, 5, 4, 4, device=device), reduction="sum",
                                           backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0 and grad.shape == s.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("side", [40, 7], ids=["tiled", "few-positions"])
def test_cpu_attention_bits_do_not_depend_on_thread_count(dtype, channels_last, side):
    # 40x40: a sample's positions split into tiles; 7x7: a map's sums in registers, a sample's gradient one run.
    s, t = features((4, 16, side, side), (4, 24, side, side), dtype, channels_last=channels_last)

    def once():
        loss = ofdkern.attention_transfer_loss(s, t, backend="cpu")
        return (loss, *torch.autograd.grad(loss, (s, t)))

    assert_same_bits_with_one_thread(once)


# --- CUDA ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_kernels_match_the_cpu_kernels():
    needs_gpu("cuda")
    gen = torch.Generator().manual_seed(10)
    for layout in (torch.contiguous_format, torch.channels_last):
        f = torch.randn(4, 33, 7, 9, generator=gen).to(memory_format=layout).reshape(4, 33, 63)
        g = torch.randn(4, 63, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(torch.ops.ofdkern.attention_map(f.cuda(), 2.0).cpu(),
                                   torch.ops.ofdkern.attention_map(f, 2.0))
        torch.testing.assert_close(torch.ops.ofdkern.attention_map_backward(f.cuda(), g.cuda(), 3.0).cpu(),
                                   torch.ops.ofdkern.attention_map_backward(f, g, 3.0))