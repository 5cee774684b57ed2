"""Channel-wise distillation (ofdkern.cwd_loss) beyond the generic suite of op_cases.CWD: the reference against
mmrazor's formula, identical maps, accuracy against float64 next to eager's own, the layouts' bits, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ofdkern
from ofdkern import reference

from conftest import STATUS, backend_cases
from loss_checks import interpreted

BACKEND_CASES = backend_cases("cwd_loss")


def maps(shape, dtype=torch.float64, device="cpu", seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype) for _ in range(2)]


def test_reference_is_mmrazors_channel_wise_divergence():
    # mmrazor's ChannelWiseDivergence, written out: softmax over each (n, c) map's positions at temperature tau.
    s, t = maps((2, 5, 6, 7))
    tau = 3.0
    n, c, h, w = s.shape
    p_t = F.softmax(t.reshape(-1, h * w) / tau, dim=1)
    expected = torch.sum(p_t * F.log_softmax(t.reshape(-1, h * w) / tau, dim=1)
                         - p_t * F.log_softmax(s.reshape(-1, h * w) / tau, dim=1)) * tau**2 / (c * n)
    torch.testing.assert_close(reference.cwd_loss(s, t, tau), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_identical_maps_give_exactly_zero(device, backend):
    # Eager gives ~1e-7 here (log_softmax against the log of softmax); the kernels compute both sides alike.
    s, _ = maps((2, 3, 5, 6), torch.float32, device)
    s.requires_grad_()
    loss = ofdkern.cwd_loss(s, s.detach(), temperature=2.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_fp32_accuracy_is_at_least_eager(device, backend):
    shape = (1, 3, 4, 6) if interpreted(backend, device) else (2, 19, 32, 64)
    s, t = maps(shape, seed=1)
    t = s + 0.3 * t  # a student near its teacher, as in training

    def errors(fn):
        leaf = s.float().to(device).requires_grad_()
        loss = fn(leaf, t.float().to(device))
        (grad,) = torch.autograd.grad(loss, leaf)
        return abs(loss.item() - want.item()) / want.item(), ((grad.double().cpu() - want_grad).norm()
                                                                / want_grad.norm()).item()

    exact = s.clone().requires_grad_()
    want = reference.cwd_loss(exact, t, 2.0)
    (want_grad,) = torch.autograd.grad(want, exact)
    fused = errors(lambda a, b: ofdkern.cwd_loss(a, b, temperature=2.0, backend=backend))
    eager = errors(lambda a, b: reference.cwd_loss(a, b, 2.0))
    for ours, theirs in zip(fused, eager):
        assert ours <= max(2e-7, theirs), (fused, eager)


def loss_and_grads(s, t, memory_format, backend, temperature=1.0, teacher_grad=False):
    """cwd_loss (reduction "none") of s and t in memory_format, and the gradients of its sum: the student's, and
    the teacher's when teacher_grad."""
    student = s.to(memory_format=memory_format).requires_grad_()
    teacher = t.to(memory_format=memory_format).requires_grad_(teacher_grad)
    loss = ofdkern.cwd_loss(student, teacher, temperature=temperature, reduction="none", backend=backend)
    return (loss, *torch.autograd.grad(loss.sum(), (student, teacher) if teacher_grad else (student,)))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_channels_last_gives_the_bits_of_nchw(device, backend):
    s, t = maps((2, 4, 5, 6), torch.float32, device, seed=2)
    for a, b in zip(loss_and_grads(s, t, torch.contiguous_format, backend),
                    loss_and_grads(s, t, torch.channels_last, backend)):
        assert torch.equal(a, b)


needs_channels_last_kernel = pytest.mark.skipif(
    "ofdkern::cwd_channels_last_fused" not in STATUS["cpu"].get("ops", ()), reason="needs the extension")


@needs_channels_last_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cpu_channels_last_kernel_gives_the_bits_of_nchw(dtype):
    # The CPU runs channels_last maps through a kernel of their own (groups of 16 channels copied into rows):
    # 37 channels (a partial group), 70x70 positions (rows of two KD blocks), 5-D maps; the teacher's gradient
    # too. Its gradients keep the maps' layout, which the copying path would not.
    for shape, layout in (((2, 37, 9, 11), torch.channels_last), ((2, 20, 70, 70), torch.channels_last),
                          ((2, 5, 3, 4, 6), torch.channels_last_3d)):
        s, t = maps(shape, dtype, seed=3)
        nchw, channels_last = (loss_and_grads(s, t, memory_format, "cpu", temperature=2.0, teacher_grad=True)
                               for memory_format in (torch.contiguous_format, layout))
        for a, b in zip(nchw, channels_last):
            assert torch.equal(a, b), shape
        assert all(g.is_contiguous(memory_format=layout) for g in channels_last[1:]), shape


@needs_channels_last_kernel
def test_cpu_channels_last_kernel_refuses_other_layouts():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="channels innermost"):
        torch.ops.ofdkern.cwd_channels_last_fused(x, x, 1.0, True, False)
    y = x.to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        torch.ops.ofdkern.cwd_channels_last_fused(y[:, :, 0, 0], y[:, :, 0, 0], 1.0, True, False)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.ofdkern.cwd_channels_last_fused(y, y, 0.0, True, False)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        ofdkern.cwd_loss(x, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="student must have 2 to 5 dims"):
        ofdkern.cwd_loss(torch.randn(2), torch.randn(2))
    with pytest.raises(ValueError, match="temperature"):
        ofdkern.cwd_loss(x, x, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        ofdkern.cwd_loss(x, x, reduction="avg")
    with pytest.raises(TypeError, match="teacher must be float"):
        ofdkern.cwd_loss(x, x.long())
    with pytest.raises(ValueError, match="backend"):
        ofdkern.cwd_loss(x, x, backend="gpu")
