"""Soft-label KD (ofdkern.kd_loss) on every backend that runs here against the eager reference (values,
gradients, fp64 gradcheck, wide rows, bad input), its accuracy against a float64 computation next to eager's
own, NaN/Inf and empty inputs, and the thread-count independence of the CPU kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ofdkern
from ofdkern import reference

from conftest import assert_same_bits_with_one_thread, backend_cases
from loss_checks import GPU_BACKENDS, assert_same_nan_pattern, check_against_reference, logits, needs_gpu

BACKEND_CASES = backend_cases("kd_loss")
ALL_CASES = BACKEND_CASES + [pytest.param("cpu", "reference", id="reference-cpu")]


@pytest.mark.parametrize("device,backend", ALL_CASES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [4.0, 1.0])
def test_kd_matches_reference(device, backend, reduction, temperature):
    # 1500 classes: several kernel blocks and a tail.
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        inputs = logits(3, 1500, dtype, device)
        check_against_reference(
            lambda s, t: ofdkern.kd_loss(s, t, temperature=temperature, reduction=reduction, backend=backend),
            lambda s, t: reference.kd_loss(s, t, temperature, reduction), inputs, rtol)


def test_kd_reference_is_the_frskd_distill_kl():
    # FRSKD's DistillKL: kl_div(log_softmax(s/T), softmax(t/T), "sum") * T^2 / N.
    s, t = logits(4, 10)
    expected = F.kl_div(F.log_softmax(s / 4, dim=1), F.softmax(t / 4, dim=1), reduction="sum") * 16 / 4
    torch.testing.assert_close(ofdkern.kd_loss(s, t, backend="cpu"), expected)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kd_half_precision_and_extreme_logits(device, backend):
    for dtype in (torch.float16, torch.bfloat16):
        check_against_reference(lambda s, t: ofdkern.kd_loss(s, t, backend=backend), reference.kd_loss,
                                logits(2, 300, dtype, device, scale=1.0), 2e-2)
    # Huge logits (no overflow: online max) and -inf teacher entries (zero probability: no NaN).
    # The teacher is detached there: autograd through the reference's log(0) gives NaN teacher gradients.
    s, t = logits(2, 50, device=device, scale=1e3)
    t = t.detach()
    t[0, :10] = float("-inf")
    loss = ofdkern.kd_loss(s, t, backend=backend)
    expected = reference.kd_loss(s, t)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(expected, s)[0])


def test_kd_wide_rows_on_cpu():
    s, t = logits(2, 40000, torch.float32)
    check_against_reference(lambda s, t: ofdkern.kd_loss(s, t, backend="cpu"), reference.kd_loss, [s, t], 2e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kd_gradcheck_and_teacher_grad_only_when_asked(device, backend):
    s, t = logits(2, 7, device=device, seed=2)
    for reduction in ("batchmean", "none"):
        assert torch.autograd.gradcheck(
            lambda s, t: ofdkern.kd_loss(s, t, temperature=2.0, reduction=reduction, backend=backend), (s, t),
            fast_mode=True)
    loss = ofdkern.kd_loss(s, t.detach(), backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert grad.shape == s.shape


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    y = torch.randn(2, 10)
    with pytest.raises(ValueError, match="same shape"):
        ofdkern.kd_loss(y, torch.randn(2, 11))
    with pytest.raises(ValueError, match="temperature"):
        ofdkern.kd_loss(y, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ofdkern.kd_loss(y, y, temperature=float("nan"))
    with pytest.raises(ValueError, match="student_logits must have 2 to 2 dims"):
        ofdkern.kd_loss(x, x)
    with pytest.raises(ValueError, match="reduction"):
        ofdkern.kd_loss(y, y, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        ofdkern.kd_loss(y, y, backend="gpu")
    with pytest.raises(ValueError, match="kd_fused: student must be"):
        torch.ops.ofdkern.kd_fused(x, x, 4.0, False, False)


# --- accuracy against float64, next to eager's ------------------------------------------------------------------

def kd_errors(loss_fn, s, t, temperature):
    """(per-row loss error, student-gradient error) of loss_fn(s, t, T) -> per-row losses, against the float64
    reference on the same values: the largest relative row error, and the largest gradient error relative to the
    largest gradient."""
    s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
    want = reference.kd_loss(s64, t64, temperature, "none")
    (want_grad,) = torch.autograd.grad(want.sum(), s64)
    leaf = s.detach().requires_grad_()
    got = loss_fn(leaf, t.detach(), temperature)
    (grad,) = torch.autograd.grad(got.sum(), leaf)
    loss_error = ((got.double() - want).abs() / want.abs()).max().item()
    grad_error = ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item()
    return loss_error, grad_error


def kd_accuracy_case(name, device):
    gen = torch.Generator().manual_seed(11)
    rows, classes, temperature = 256, 1000, 4.0
    s = 3 * torch.randn(rows, classes, generator=gen)
    t = 3 * torch.randn(rows, classes, generator=gen)
    if name == "shift 1e3":
        s = s + 1e3
    elif name == "T=100":
        temperature = 100.0
    elif name == "close rows":
        t = s + 1e-2 * torch.randn(rows, classes, generator=gen)
    elif name == "wide rows":
        s, t = 3 * torch.randn(2, 9000, generator=gen), 3 * torch.randn(2, 9000, generator=gen)
    return s.to(device), t.to(device), temperature


# Issue 15/18: fp32 gradients at 1000 classes (4x eager's error before), logits shifted by 1e3 (2.1e-5 vs 1.7e-7),
# T = 100 (3e-3 vs 2.4e-4); also close rows (where sum p_t r cancels) and rows split into blocks.
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("case", ["1000 classes", "shift 1e3", "T=100", "close rows", "wide rows"])
def test_kd_fp32_accuracy_is_at_least_eager(device, backend, case):
    s, t, temperature = kd_accuracy_case(case, device)
    fused = kd_errors(lambda s, t, T: ofdkern.kd_loss(s, t, temperature=T, reduction="none", backend=backend),
                      s, t, temperature)
    eager = kd_errors(lambda s, t, T: reference.kd_loss(s, t, T, "none"), s, t, temperature)
    for ours, theirs in zip(fused, eager):
        # 1e-7: below fp32's epsilon, so that twice eager's error is the bound in every case here.
        assert ours <= max(1e-7, 2 * theirs), (case, fused, eager)


@pytest.mark.parametrize("device,backend", ALL_CASES)
def test_kd_single_class_is_exactly_zero(device, backend):
    s, t = (torch.randn(5, 1, generator=torch.Generator().manual_seed(seed)).mul(30).to(device).requires_grad_()
            for seed in (1, 2))
    loss = ofdkern.kd_loss(s, t, reduction="sum", backend=backend)
    grads = torch.autograd.grad(loss, (s, t))
    assert loss.item() == 0 and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kd_every_dtype_and_gradient_against_float64(device, backend):
    # Both gradients, every dtype, rows of one block and rows split into several (K > 4096).
    widths = (300, 5000)
    for classes in widths:
        for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
            s, t = logits(2, classes, dtype, device, seed=classes, scale=2.0)
            check_against_reference(lambda s, t: ofdkern.kd_loss(s, t, temperature=3.0, backend=backend),
                                    lambda s, t: reference.kd_loss(s, t, 3.0), [s, t], rtol)


# --- NaN, Inf, empty inputs, threads ------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kd_nan_and_inf_follow_the_reference(device, backend):
    # Row 0 is clean; row 1 gets the special value. A NaN or +inf logit makes its whole row NaN (the softmax's max
    # and sum are NaN); a -inf student logit where the teacher has mass makes the row's loss +inf.
    for which, value in (("student", float("nan")), ("teacher", float("nan")), ("student", float("inf")),
                         ("teacher", float("inf")), ("student", float("-inf"))):
        s, t = (x.detach() for x in logits(2, 30, torch.float32, device, seed=4))
        (s if which == "student" else t)[1, 3] = value
        leaf = s.clone().requires_grad_()
        got = ofdkern.kd_loss(leaf, t, reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(got.sum(), leaf)
        ref_leaf = s.clone().requires_grad_()
        want = reference.kd_loss(ref_leaf, t, reduction="none")
        (want_grad,) = torch.autograd.grad(want.sum(), ref_leaf)
        assert_same_nan_pattern(got, want)
        assert_same_nan_pattern(grad, want_grad)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kd_zero_teacher_probability_deliberate_differences(device, backend):
    # A -inf teacher logit is a class of probability 0. Its KL term is 0 and the student gradient is T p_s, like
    # the reference. Deliberate differences: the teacher gradient there is 0 (the limit), where autograd through
    # the reference's xlogy(0, 0) gives NaN to the whole row; and where the student logit is -inf too, the class
    # adds 0, where the reference's 0 * -inf makes the row's loss NaN.
    s, t = (x.detach().double() for x in logits(2, 30, device=device, seed=5))
    t[:, 4] = float("-inf")
    s[1, 4] = float("-inf")
    leaves = [s.clone().requires_grad_(), t.clone().requires_grad_()]
    got = ofdkern.kd_loss(*leaves, reduction="none", backend=backend)
    grad_s, grad_t = torch.autograd.grad(got.sum(), leaves)
    # The value without the zero-probability class, which contributes nothing to either softmax of row 0's
    # teacher, nor of row 1 at all.
    keep = [j for j in range(30) if j != 4]
    want_1 = reference.kd_loss(s[1:, keep], t[1:, keep], reduction="none")
    ref_leaf = s.clone().requires_grad_()
    want = reference.kd_loss(ref_leaf, t, reduction="none")
    (want_grad_s,) = torch.autograd.grad(want[0], ref_leaf)
    torch.testing.assert_close(got[0], want[0].detach())
    torch.testing.assert_close(got[1:], want_1)
    assert torch.isnan(want[1])
    torch.testing.assert_close(grad_s[0], want_grad_s[0])
    assert torch.isfinite(grad_t).all() and (grad_t[:, 4] == 0).all()


@pytest.mark.parametrize("device,backend", ALL_CASES)
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean", "none"])
def test_kd_empty_inputs_follow_the_reference(device, backend, reduction):
    # Issue 18: (3, 0) gave NaN for "sum"; KL over no classes is 0 (and "mean" over no elements 0 / 0).
    for shape in ((3, 0), (0, 10)):
        s = torch.randn(shape, device=device, requires_grad=True)
        t = torch.randn(shape, device=device)
        got = ofdkern.kd_loss(s, t, reduction=reduction, backend=backend)
        want = reference.kd_loss(s, t, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
        (grad,) = torch.autograd.grad(got.sum(), s)
        assert grad.shape == s.shape and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(8, 3000), (9, 9000), (1, 20000)], ids=["one-block", "rows", "blocks"])
def test_cpu_kd_bits_do_not_depend_on_thread_count(dtype, shape):
    # One-block rows; rows split into blocks and scheduled a row per task (9 >= 4 x threads with one thread) or
    # a block per task (one row): the same bits either way.
    zs, zt = logits(*shape, dtype, seed=7)

    def once():
        loss = ofdkern.kd_loss(zs, zt, temperature=3.0, reduction="none", backend="cpu")
        return (loss, *torch.autograd.grad(loss.sum(), (zs, zt)))

    assert_same_bits_with_one_thread(once)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kd_wide_rows_are_deterministic(device, backend):
    zs, zt = logits(2, 9000, torch.float32, device, seed=9)

    def once():
        loss = ofdkern.kd_loss(zs, zt, reduction="none", backend=backend)
        return (loss, *torch.autograd.grad(loss.sum(), (zs, zt)))

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


# --- CUDA ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_kernels_match_the_cpu_kernels():
    needs_gpu("cuda")
    gen = torch.Generator().manual_seed(10)
    for rows, classes in ((3, 7), (2, 4096), (2, 4097), (3, 20000)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            s, t = ((3 * torch.randn(rows, classes, generator=gen)).to(dtype) for _ in range(2))
            cpu = torch.ops.ofdkern.kd_fused(s, t, 3.0, True, True)
            gpu = torch.ops.ofdkern.kd_fused(s.cuda(), t.cuda(), 3.0, True, True)
            again = torch.ops.ofdkern.kd_fused(s.cuda(), t.cuda(), 3.0, True, True)
            tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
            for a, b, c in zip(gpu, cpu, again):
                torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
                assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    needs_gpu(backend)
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a CUDA device with 40 GiB")
    # 2^31 + 2^17 bf16 logits: the last row must be indexed right. Only it differs between student and teacher.
    rows, classes = 16385, 131072
    s = torch.zeros(rows, classes, dtype=torch.bfloat16, device="cuda")
    t = torch.zeros_like(s)
    t[-1, :2] = 8.0
    s.requires_grad_()
    loss = ofdkern.kd_loss(s, t, temperature=1.0, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss[-1], s)
    want = reference.kd_loss(s[-1:].detach().double(), t[-1:].double(), 1.0, "none")
    torch.testing.assert_close(loss[-1].double(), want[0], rtol=1e-2, atol=1e-4)
    assert torch.count_nonzero(loss[:-1]) == 0 and torch.count_nonzero(grad[:-1]) == 0
