"""FRSKD: attention-transfer and KD losses on every backend that runs here against the eager reference
(values, gradients, fp64 gradcheck, layouts, exponents, wide rows, bad input, torch.compile), the self-teacher's
structure, and a short FRSKD training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ofdkern
from ofdkern import reference

from conftest import assert_same_bits_with_one_thread, backend_cases

# Both FRSKD losses have kernels on the same backends (C++ on CPU, Triton on CPU and CUDA; no CUDA C++).
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


def test_opcheck():
    from ofdkern.ops.frskd import attention_map_grad, attention_transfer_fused, kd_loss_fused

    s, t = features((2, 3, 4, 4), (2, 5, 4, 4), torch.float32)
    torch.library.opcheck(attention_transfer_fused, (s, t, 2.0, "mean", "cpu", False))
    torch.library.opcheck(attention_map_grad, (s.detach(), torch.randn(2, 16), 2.0, "cpu"))
    zs, zt = logits(2, 9, torch.float32)
    torch.library.opcheck(kd_loss_fused, (zs, zt, 4.0, "batchmean", "cpu", True, True, False))


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


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_empty_batch_sums_to_zero(device, backend):
    # The reference's view(N, -1) cannot take an empty batch; the fused losses give 0 like a sum over nothing.
    s = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    loss = ofdkern.attention_transfer_loss(s, torch.randn(0, 5, 4, 4, device=device), reduction="sum", backend=backend)
    assert loss.item() == 0 and torch.autograd.grad(loss, s)[0].shape == s.shape
    z = torch.randn(0, 10, device=device, requires_grad=True)
    loss = ofdkern.kd_loss(z, z.detach(), reduction="sum", backend=backend)
    assert loss.item() == 0 and torch.autograd.grad(loss, z)[0].shape == z.shape


def test_cpu_results_do_not_depend_on_thread_count():
    s, t = features((4, 16, 40, 40), (4, 16, 40, 40), torch.float32)
    zs, zt = logits(4, 30000, torch.float32)

    def once():
        loss = ofdkern.attention_transfer_loss(s, t, backend="cpu") + ofdkern.kd_loss(zs, zt, backend="cpu")
        return (loss, *torch.autograd.grad(loss, (s, t, zs, zt)))

    assert_same_bits_with_one_thread(once)
