"""OFDLoss against the eager reference, and the Connector's construction and initialization."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import ofdkern
from ofdkern import reference
from ofdkern.margins import margin_from_bn
from ofdkern.modules import Connector, OFDLoss


def features(shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def margin_of(channels, seed):
    generator = torch.Generator().manual_seed(seed)
    return -torch.rand(channels, generator=generator) - 0.1


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_student_gradient_match_the_reference(backend, reduction, dtype):
    shape = (2, 4, 5, 3)
    margin = margin_of(4, seed=0).to(dtype)
    teacher = features(shape, seed=1, dtype=dtype)
    student = features(shape, seed=2, dtype=dtype).requires_grad_()
    expected_student = student.detach().clone().requires_grad_()
    upstream = features(shape, seed=3, dtype=dtype) if reduction == "none" else None

    loss = OFDLoss(margin, reduction=reduction, backend=backend)(student, teacher)
    expected = reference.ofd_loss(expected_student, teacher, margin, reduction)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(loss, expected, **tolerance)

    loss.backward(upstream)
    expected.backward(upstream)
    assert student.grad is not None and student.grad.abs().sum() > 0
    torch.testing.assert_close(student.grad, expected_student.grad, **tolerance)


def test_broadcast_margin_shape_is_stored_per_channel():
    margin = margin_of(3, seed=4)
    loss = OFDLoss(margin.reshape(1, 3, 1, 1))
    assert loss.margin.shape == (3,) and torch.equal(loss.margin, margin)
    assert loss.num_channels == 3
    student, teacher = features((2, 3, 4, 4), seed=5), features((2, 3, 4, 4), seed=6)
    torch.testing.assert_close(loss(student, teacher), reference.ofd_loss(student, teacher, margin))


def test_official_code_margin_shapes_give_the_per_channel_result():
    # The reference distiller keeps (1, C, 1, 1) buffers; code written against torch broadcasting keeps (C, 1, 1).
    margin = margin_of(3, seed=4)
    student, teacher = features((2, 3, 4, 4), seed=5), features((2, 3, 4, 4), seed=6)
    expected = reference.ofd_loss(student, teacher, margin)
    for shape in ((1, 3, 1, 1), (3, 1, 1)):
        assert torch.equal(OFDLoss(margin.reshape(shape)).margin, margin)
        torch.testing.assert_close(ofdkern.ofd_loss(student, teacher, margin.reshape(shape)), expected)
    shaped = margin.reshape(3, 1, 1).clone().requires_grad_()
    ofdkern.ofd_loss(student, teacher, shaped).backward()
    per_channel = margin.clone().requires_grad_()
    reference.ofd_loss(student, teacher, per_channel).backward()
    assert shaped.grad.shape == (3, 1, 1)
    torch.testing.assert_close(shaped.grad.reshape(3), per_channel.grad)
    with pytest.raises(ValueError, match=r"margin must have shape \(3,\) or \(1, 3, 1, 1\) or \(3, 1, 1\)"):
        ofdkern.ofd_loss(student, teacher, margin.reshape(1, 1, 3))


def test_margin_is_a_detached_copy_saved_in_the_state_dict():
    margin = margin_of(3, seed=7).requires_grad_()
    loss = OFDLoss(margin)
    assert not loss.margin.requires_grad
    with torch.no_grad():
        margin.zero_()
    assert (loss.margin < 0).all()
    assert list(loss.state_dict()) == ["margin"]
    restored = OFDLoss(torch.zeros(3))
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.margin, loss.margin)


def test_from_bn_uses_margin_from_bn():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3]))
        bn.bias.copy_(torch.tensor([0.2, -1.0, 1.0, 2.0]))
    loss = OFDLoss.from_bn(bn, reduction="batchmean", backend="reference")
    assert torch.equal(loss.margin, margin_from_bn(bn))
    assert loss.reduction == "batchmean" and loss.backend == "reference"


def test_repr_shows_channels_reduction_and_backend():
    text = repr(OFDLoss(margin_of(7, seed=8), reduction="mean", backend="cpu"))
    assert text == "OFDLoss(channels=7, reduction='mean', backend='cpu')"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="reduction must be one of"):
        OFDLoss(margin_of(3, seed=9), reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        OFDLoss(margin_of(3, seed=9), backend="gpu")
    with pytest.raises(ValueError, match=r"margin must have shape \(C,\), \(1, C, 1, ...\) or \(C, 1, ...\)"):
        OFDLoss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="margin must have shape"):
        OFDLoss(torch.zeros(1, 1, 3))  # a spatial broadcast, not a per-channel one
    with pytest.raises(TypeError, match="margin must be float"):
        OFDLoss(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="margin must have shape"):
        OFDLoss(margin_of(3, seed=9))(features((2, 4, 3, 3), seed=10), features((2, 4, 3, 3), seed=11))


# --- connector --------------------------------------------------------------------------------------------

def reference_connector(teacher_channels, student_channels):
    """The reference build_feature_connector, written out."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0, bias=False)
    bn = nn.BatchNorm2d(teacher_channels)
    fan = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    conv.weight.data.normal_(0, math.sqrt(2.0 / fan))
    bn.weight.data.fill_(1)
    bn.bias.data.zero_()
    return nn.Sequential(conv, bn)


def test_connector_init_statistics_and_bn_parameters():
    torch.manual_seed(0)
    connector = Connector(256, 128)
    weight = connector.conv.weight
    assert weight.shape == (128, 256, 1, 1) and connector.conv.bias is None
    # 32768 samples: the std estimate is within ~0.4% (1 sigma) of sqrt(2 / out_channels).
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.03)
    assert abs(weight.mean().item()) < 4 * math.sqrt(2 / 128) / math.sqrt(weight.numel())  # 4 sigma
    assert torch.equal(connector.bn.weight, torch.ones(128))
    assert torch.equal(connector.bn.bias, torch.zeros(128))
    assert connector.training


def test_connector_equals_the_reference_for_the_same_seed():
    torch.manual_seed(1)
    connector = Connector(16, 24)
    torch.manual_seed(1)
    expected = reference_connector(24, 16)
    assert list(connector.state_dict()) == list(expected.state_dict())
    for name, value in expected.state_dict().items():
        assert torch.equal(connector.state_dict()[name], value), name


@pytest.mark.parametrize("dims,shape", [(2, (3, 8, 5, 4)), (1, (3, 8, 7)), (3, (3, 8, 2, 3, 4))])
def test_connector_output_shape(dims, shape):
    connector = Connector(8, 12, dims=dims)
    output = connector(features(shape, seed=12))
    assert output.shape == (shape[0], 12, *shape[2:])
    # Train-mode BN with gamma 1, beta 0: every channel is standardized over the batch.
    channel_mean = output.transpose(0, 1).reshape(12, -1).mean(dim=1)
    torch.testing.assert_close(channel_mean, torch.zeros(12), atol=1e-5, rtol=0)


def test_connector_channel_counts_must_be_positive_ints():
    with pytest.raises(TypeError, match="in_channels must be a positive int, got str '3'"):
        Connector("3", 5)
    with pytest.raises(TypeError, match="out_channels must be a positive int, got bool"):
        Connector(3, True)
    with pytest.raises(TypeError, match="out_channels must be a positive int, got float"):
        Connector(3, 5.0)
    with pytest.raises(ValueError, match="out_channels must be a positive int, got 0"):
        Connector(3, 0)
    with pytest.raises(ValueError, match="in_channels must be a positive int, got -2"):
        Connector(-2, 5)
    assert Connector(np.int64(3), 5).conv.in_channels == 3


def test_connector_keeps_channels_last_and_takes_factory_arguments():
    connector = Connector(4, 6, dtype=torch.float64)
    assert connector.conv.weight.dtype == torch.float64 and connector.bn.weight.dtype == torch.float64
    output = connector(features((2, 4, 3, 3), seed=13, dtype=torch.float64).to(memory_format=torch.channels_last))
    assert output.shape == (2, 6, 3, 3)
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        Connector(4, 6, dims=4)


def test_gradient_flows_from_the_loss_into_the_connector():
    torch.manual_seed(2)
    connector = Connector(5, 3)
    loss = OFDLoss(margin_of(3, seed=14))
    student_feature = features((2, 5, 4, 4), seed=15).requires_grad_()
    loss(connector(student_feature), features((2, 3, 4, 4), seed=16)).backward()
    for tensor in (connector.conv.weight, connector.bn.weight, connector.bn.bias, student_feature):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
