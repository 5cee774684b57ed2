"""FRSKD (Ji et al., CVPR 2021): its two losses in one compiled step and one CUDA graph, the self-teacher's
structure, gradient routing and a short training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ofdkern
from ofdkern import reference

from conftest import backend_cases
from loss_checks import GPU_BACKENDS, features, logits, needs_gpu

# The two FRSKD losses have kernels on the same backends (C++ on CPU and CUDA, Triton).
BACKEND_CASES = backend_cases("attention_transfer_loss", "kd_loss")


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


# --- CUDA ---------------------------------------------------------------------------------------------------------

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
