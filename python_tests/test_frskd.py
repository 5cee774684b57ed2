"""FRSKD: attention-transfer and KD losses on every backend that runs here against the eager reference
(values, gradients, fp64 gradcheck, layouts, exponents, wide rows, bad input, torch.compile), their accuracy
against a float64 computation next to eager's own, NaN/Inf and empty inputs, thread-count and instruction-set
independence of the CPU kernels, the self-teacher's structure, and a short FRSKD training run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ofdkern
from ofdkern import reference

from conftest import STATUS, assert_same_bits_with_one_thread, backend_cases

# Both FRSKD losses have kernels on the same backends (C++ on CPU and CUDA, Triton).
BACKEND_CASES = backend_cases("attention_transfer_loss", "kd_loss")
ALL_CASES = BACKEND_CASES + [pytest.param("cpu", "reference", id="reference-cpu")]


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


# --- attention transfer -------------------------------------------------------------------------------------

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


# --- KD -------------------------------------------------------------------------------------------------------

def logits(rows, classes, dtype=torch.float64, device="cpu", seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(rows, classes, generator=gen, dtype=torch.float64)).to(device, dtype).requires_grad_()
            for _ in range(2)]


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


# --- errors and torch integration ----------------------------------------------------------------------------

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


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_torch_compile(device, backend):
    torch._dynamo.reset()
    s, t = features((2, 3, 4, 4), (2, 6, 4, 4), torch.float32, device)
    zs, zt = logits(2, 9, torch.float32, device)

    def step(s, t, zs, zt):
        return (ofdkern.attention_transfer_loss(s, t, backend=backend)
                + ofdkern.kd_loss(zs, zt, backend=backend))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    expected = step(s, t, zs, zt)
    got = compiled(s, t, zs, zt)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (s, t, zs, zt)), torch.autograd.grad(expected, (s, t, zs, zt))):
        torch.testing.assert_close(a, b)


def test_opcheck_of_the_attention_backward_op():
    # The forward custom ops are checked by test_op_framework.py; this one runs inside their backward.
    from ofdkern.ops.frskd import attention_map_grad

    s, _ = features((2, 3, 4, 4), (2, 5, 4, 4), torch.float32)
    torch.library.opcheck(attention_map_grad, (s.detach(), torch.randn(2, 16), 2.0, "cpu"))


# --- self-teacher and training ---------------------------------------------------------------------------------

def reference_bifpnc_parameter_count(channels, num_classes, width, depth):
    """Parameters of the reference BiFPNc (one layer) counted from its definition: 1x1 DepthConvBlocks are
    conv + BN; 3x3 blocks are ``depth`` x (depthwise 3x3 + pointwise 1x1 + BN)."""
    def pointwise(cin, cout):
        return cin * cout + 2 * cout

    def separable(c):
        return depth * (9 * c + c * c + 2 * c)

    wide = [c * width for c in channels]
    levels = len(channels)
    total = sum(pointwise(c, w) for c, w in zip(channels, wide))                                 # lat_conv
    for i in range(1, levels):
        total += pointwise(channels[i], wide[i]) + separable(wide[i])                            # lat_conv2, down_conv
        total += (3 if i < levels - 1 else 2) + pointwise(wide[i - 1], wide[i])                 # down weights, sample
    for i in range(levels - 1):
        total += pointwise(wide[i + 1], wide[i]) + separable(wide[i]) + 2                        # up_sample, up_conv
    return total + wide[-1] * num_classes + num_classes                                          # fc


def test_self_teacher_resnet18_shapes_and_parameter_count():
    channels = (64, 128, 256, 512)
    teacher = ofdkern.SelfTeacher(channels, num_classes=100, width=2, depth=2)
    n_params = sum(p.numel() for p in teacher.parameters())
    assert n_params == reference_bifpnc_parameter_count(channels, 100, 2, 2)
    # CIFAR stage sizes are 32, 16, 8, 4; a quarter of them keeps the test fast.
    feats = [torch.randn(2, c, 8 // 2**i, 8 // 2**i) for i, c in enumerate(channels)]
    refined, out = teacher(feats)
    assert [tuple(f.shape) for f in refined] == [(2, 2 * c, 8 // 2**i, 8 // 2**i) for i, c in enumerate(channels)]
    assert out.shape == (2, 100)
    assert all((f >= 0).all() for f in refined)
    # Every parameter, fusion weights included, gets a gradient from the self-teacher's loss.
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in teacher.parameters())


def test_self_teacher_other_configurations():
    teacher = ofdkern.SelfTeacher((4, 8, 16), num_classes=5, width=1, depth=3)
    assert sum(p.numel() for p in teacher.parameters()) == reference_bifpnc_parameter_count((4, 8, 16), 5, 1, 3)
    # Odd sizes: same-padded pooling gives ceil(H / 2), nearest upsampling returns to the stage's size.
    refined, out = teacher([torch.randn(1, 4, 7, 7), torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)])
    assert [tuple(f.shape[-2:]) for f in refined] == [(7, 7), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="feature 1 must be"):
        teacher([torch.randn(1, 4, 7, 7), torch.randn(1, 9, 4, 4), torch.randn(1, 16, 2, 2)])


class TinyCNN(nn.Module):
    """Two stages of conv-BN-ReLU (8 and 16 channels) and a linear head."""

    def __init__(self, num_classes):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        return [f1, f2], self.fc(F.adaptive_avg_pool2d(f2, 1).flatten(1))


def test_frskd_gradient_routing():
    torch.manual_seed(0)
    student = TinyCNN(4)
    teacher = ofdkern.SelfTeacher((8, 16), num_classes=4, width=2, depth=1)
    criterion = ofdkern.FRSKDLoss(alpha=2, beta=100, temperature=4, backend="cpu")
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    feats, z_s = student(x)
    refined, z_t = teacher(feats)
    # With alpha = beta = 0 removed, the self-teacher's gradients come from its cross-entropy alone.
    full = criterion(z_s, z_t, feats, refined, y)
    ce_only = F.cross_entropy(z_s, y) + F.cross_entropy(z_t, y)
    for p in teacher.parameters():
        g_full, g_ce = torch.autograd.grad(full, p, retain_graph=True)[0], torch.autograd.grad(ce_only, p, retain_graph=True)[0]
        torch.testing.assert_close(g_full, g_ce)
    expected = ce_only + 2 * reference.kd_loss(z_s, z_t) + 100 * sum(
        reference.attention_transfer_loss(f, t) for f, t in zip(feats, refined))
    torch.testing.assert_close(full, expected)


def test_frskd_training_smoke():
    torch.manual_seed(0)
    student = TinyCNN(4)
    teacher = ofdkern.SelfTeacher((8, 16), num_classes=4, width=2, depth=2)
    criterion = ofdkern.FRSKDLoss(backend="cpu")
    optimizer = torch.optim.SGD([*student.parameters(), *teacher.parameters()], lr=0.02, momentum=0.9)
    # A learnable task: the class is which quadrant is bright.
    y = torch.arange(16) % 4
    x = 0.3 * torch.randn(16, 3, 8, 8)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.0
    losses = []
    for _ in range(15):
        feats, z_s = student(x)
        refined, z_t = teacher(feats)
        loss = criterion(z_s, z_t, feats, refined, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses




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
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_attention_transfer_every_dtype(device, backend, channels_last):
    shape_s, shape_t = ((2, 3, 4, 5), (2, 5, 4, 5)) if interpreted(backend, device) else ((3, 24, 9, 11), (3, 40, 9, 11))
    # fp16 gradients of this size (~1e-5) are subnormals, 6e-8 apart.
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)):
        inputs = features(shape_s, shape_t, dtype, device, channels_last)
        check_against_reference(lambda s, t: ofdkern.attention_transfer_loss(s, t, backend=backend),
                                reference.attention_transfer_loss, inputs, rtol)


# --- the attention-map op -----------------------------------------------------------------------------------------

def attention_maps_expected(map_student, map_teacher):
    leaves = [m.detach().clone().requires_grad_() for m in (map_student, map_teacher)]
    row_loss = (F.normalize(leaves[0]) - F.normalize(leaves[1])).pow(2).sum(1)
    return (row_loss.detach(), *torch.autograd.grad(row_loss.sum(), leaves))


def frskd_op(backend, name):
    """The backend's entry point ``name`` (the contracts of csrc/frskd_fused.h)."""
    if backend == "triton":
        from ofdkern.kernels import frskd_triton
        return getattr(frskd_triton, name)
    return getattr(torch.ops.ofdkern, name)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_maps_op(device, backend):
    gen = torch.Generator().manual_seed(8)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        maps = [torch.rand(4, 37, generator=gen, dtype=dtype).to(device) for _ in range(2)]
        maps[0][2] = 0  # norm below F.normalize's eps: the gradient divides by eps
        expected = attention_maps_expected(*maps)
        for grad_student, grad_teacher in ((True, True), (True, False), (False, True), (False, False)):
            got = frskd_op(backend, "attention_transfer_maps")(*maps, grad_student, grad_teacher)
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
    # features' promoted dtype, and the map gradients (of the undivided sum) in each map's dtype. A float64
    # student against a float32 teacher of other channels: the maps' math runs in float64.
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(3, 5, 37, generator=gen, dtype=torch.float64).to(device)
    teacher = torch.randn(3, 4, 37, generator=gen).to(device)
    row_loss, *want_grads = attention_maps_expected(*(f.double().pow(2).mean(1) for f in (student, teacher)))
    forward = frskd_op(backend, "attention_transfer_forward")
    for count in (1, 3 * 37):
        loss, grad_student, grad_teacher = forward(student, teacher, 2.0, count)
        assert loss.dtype == torch.float64 and loss.dim() == 0
        torch.testing.assert_close(loss, row_loss.sum() / count, rtol=1e-6, atol=0)
        assert (grad_student.dtype, grad_teacher.dtype) == (torch.float64, torch.float32)
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


# --- NaN, Inf, empty inputs -----------------------------------------------------------------------------------------

def assert_same_nan_pattern(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_attention_transfer_empty_batch_sums_to_zero(device, backend):
    # The reference's view(N, -1) cannot take an empty batch; the fused losses give 0 like a sum over nothing.
    s = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    loss = ofdkern.attention_transfer_loss(s, torch.randn(0, 5, 4, 4, device=device), reduction="sum",
                                           backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0 and grad.shape == s.shape


# --- thread counts, instruction sets, determinism ----------------------------------------------------------------

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


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kd_wide_rows_are_deterministic(device, backend):
    zs, zt = logits(2, 9000, torch.float32, device, seed=9)

    def once():
        loss = ofdkern.kd_loss(zs, zt, reduction="none", backend=backend)
        return (loss, *torch.autograd.grad(loss.sum(), (zs, zt)))

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def cpu_capabilities():
    """The instruction sets the CPU kernels have a variant for that this CPU runs, best last."""
    order = ["default", "avx2", "avx512"]
    best = torch.backends.cpu.get_cpu_capability().lower()
    return order[:order.index(best) + 1] if best in order else ["default"]


CAPABILITY_SCRIPT = r"""
import torch, ofdkern
from ofdkern import reference
gen = torch.Generator().manual_seed(0)
worst = 0.0
for shape in ((4, 300), (2, 9000)):
    s, t = (3 * torch.randn(shape, generator=gen) for _ in range(2))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        leaf = s.to(dtype).requires_grad_()
        got = ofdkern.kd_loss(leaf, t.to(dtype), temperature=3.0, reduction="none", backend="cpu")
        (grad,) = torch.autograd.grad(got.sum(), leaf)
        ref = leaf.detach().double().requires_grad_()
        want = reference.kd_loss(ref, t.to(dtype).double(), 3.0, "none")
        (want_grad,) = torch.autograd.grad(want.sum(), ref)
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-13}[dtype]
        worst = max(worst, ((got.double() - want).abs() / want.abs()).max().item() / tol,
                    ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item() / tol)
for layout in (torch.contiguous_format, torch.channels_last):
    f = [torch.randn(3, c, 9, 11, generator=gen).to(memory_format=layout).requires_grad_() for c in (20, 36)]
    got = ofdkern.attention_transfer_loss(*f, p=3, backend="cpu")
    grads = torch.autograd.grad(got, f)
    ref = [x.detach().double().requires_grad_() for x in f]
    want = reference.attention_transfer_loss(*ref, 3)
    want_grads = torch.autograd.grad(want, ref)
    worst = max(worst, abs(got.item() - want.item()) / want.item() / 1e-5,
                *(((g.double() - w).abs().max() / w.abs().max()).item() / 1e-5 for g, w in zip(grads, want_grads)))
print(torch.backends.cpu.get_cpu_capability(), worst)
"""


@pytest.mark.parametrize("capability", cpu_capabilities())
def test_cpu_kernels_of_every_instruction_set(capability):
    # The CPU kernels are compiled per instruction set and follow torch's choice, which ATEN_CPU_CAPABILITY
    # overrides: each variant this CPU can run, in a fresh process, against float64.
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    reported, worst = result.stdout.split()
    assert reported.lower() == capability
    assert float(worst) <= 1, worst


# --- CUDA ---------------------------------------------------------------------------------------------------------

GPU_BACKENDS = [b for b in ("cuda", "triton") if "cuda" in STATUS[b]["devices"]] or ["cuda"]


def needs_gpu(backend):
    if backend not in GPU_BACKENDS or "cuda" not in STATUS[backend]["devices"]:
        pytest.skip(f"needs a CUDA device and the {backend} kernels")


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
    for layout in (torch.contiguous_format, torch.channels_last):
        f = torch.randn(4, 33, 7, 9, generator=gen).to(memory_format=layout).reshape(4, 33, 63)
        g = torch.randn(4, 63, generator=gen)
        torch.testing.assert_close(torch.ops.ofdkern.attention_map(f.cuda(), 2.0).cpu(),
                                   torch.ops.ofdkern.attention_map(f, 2.0))
        torch.testing.assert_close(torch.ops.ofdkern.attention_map_backward(f.cuda(), g.cuda(), 3.0).cpu(),
                                   torch.ops.ofdkern.attention_map_backward(f, g, 3.0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    needs_gpu(backend)
    f_s, f_t = (torch.randn(4, c, 8, 8, device="cuda") for c in (16, 24))
    z_s, z_t = (torch.randn(8, 5000, device="cuda") for _ in range(2))
    f_s.requires_grad_()
    z_s.requires_grad_()

    def step():
        loss = ofdkern.attention_transfer_loss(f_s, f_t, backend=backend) + ofdkern.kd_loss(z_s, z_t, backend=backend)
        return (loss, *torch.autograd.grad(loss, (f_s, z_s)))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # Triton compiles and the allocator settles outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        f_s.mul_(0.5)
        z_s.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        torch.testing.assert_close(got, want)


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
