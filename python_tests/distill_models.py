"""Tiny models written in the conventions the distiller meets, each recording its true stage pre-ReLU features
(the oracle: ``model.stage_pre_relu()`` after a forward), and the parity helpers that check the OFD and channel
alignment distillers against eager computations on those features and on stage outputs read by plain hooks.

The conventions (structure only; the code is ours):
* torchvision: ``out += identity; return self.relu(out)`` with one ``nn.ReLU(inplace=True)`` module;
* mdistiller's CIFAR ResNets: a ReLU module after bn1, a functional ``F.relu`` at the end, the stage's last
  block returning ``(out, preact)``, ``forward`` returning ``(logits, feats)`` with ``feats["preact_feats"]``;
* pytorch-cifar (mdistiller's resnetv2 without ``is_last``): no ReLU module at all, ``return F.relu(out)``;
* the official OFD ResNets: the block ends with the sum and the next block starts with ``F.relu(x)``;
  ``extract_feature(x, preReLU=True)`` and ``get_bn_before_relu()``;
* the official / mdistiller WideResNets: pre-activation blocks, the stage feature is the next BN's output
  before its in-place ReLU.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ofdkern import reference


def record(module, pre_relu):
    """Keeps a copy of the true pre-ReLU feature as ``module.pre_relu`` (the oracle), unless recording is off."""
    if getattr(module, "records_pre_relu", True):
        module.pre_relu = pre_relu.clone()


def stop_recording(model):
    """No oracle copies: under torch.compile they would be graph outputs the backward consumes."""
    for module in model.modules():
        module.records_pre_relu = False
    return model


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def shortcut(in_channels, channels, stride):
    if stride == 1 and in_channels == channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))


def randomize_batch_norms(model, seed):
    """Non-trivial BN affine parameters, so margins differ per channel and from the defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model


class TorchvisionBasicBlock(nn.Module):
    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = shortcut(in_channels, channels, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        record(self, out)
        return self.relu(out)


class SharedReluBlock(nn.Module):
    """A BasicBlock that calls the model's ReLU module (in place), through a reference it does not register as
    its own child (``ResNet`` sets ``activation``)."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = shortcut(in_channels, channels, stride)
        self.activation = None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        record(self, out)
        return self.activation(out)


class TorchvisionBottleneck(nn.Module):
    """The BN before the add is bn3; one in-place ReLU called three times."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_channels, channels, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        record(self, out)
        return self.relu(out)


class PytorchCifarBlock(nn.Module):
    """No ReLU module: functional ReLUs, the residual add in place on bn2's output."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = shortcut(in_channels, channels, stride) or nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        record(self, out)
        return F.relu(out)


class OutOfPlaceSumBlock(PytorchCifarBlock):
    """A functional ReLU on an out-of-place sum: no module returns the pre-ReLU feature."""

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        record(self, out)
        return F.relu(out)


class MdistillerBasicBlock(nn.Module):
    """mdistiller's CIFAR BasicBlock: a ReLU module after bn1, ``F.relu`` at the end; the last block of a stage
    returns ``(out, preact)``."""

    def __init__(self, in_channels, channels, stride=1, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = shortcut(in_channels, channels, stride)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        preact = out
        record(self, preact)
        out = F.relu(out)
        return (out, preact) if self.is_last else out


class MovedReluBasicBlock(nn.Module):
    """The official OFD ResNet block: the previous block's ReLU at the start, the block ends with the sum."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = shortcut(in_channels, channels, stride)

    def forward(self, x):
        x = F.relu(x)
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        record(self, out)
        return out


class MovedReluBottleneck(nn.Module):
    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels // 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels // 2)
        self.conv2 = conv3x3(channels // 2, channels // 2, stride)
        self.bn2 = nn.BatchNorm2d(channels // 2)
        self.conv3 = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_channels, channels, stride)

    def forward(self, x):
        x = F.relu(x)
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += residual
        record(self, out)
        return out


class ResNet(nn.Module):
    """A CIFAR-style ResNet of any of the block types above, ``layer1`` .. ``layerK`` (stride 2 from the
    second), average pool, linear classifier."""

    def __init__(self, block, widths=(4, 6, 8), blocks=1, classes=5, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            layers = [self.make_block(block, in_channels if i == 0 else width, width,
                                      2 if stage and i == 0 else 1, i == blocks - 1) for i in range(blocks)]
            if block is SharedReluBlock:
                for layer in layers:
                    layer.activation = self.relu.__call__  # a bound method: not registered, hooks still run
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            in_channels = width
        self.fc = nn.Linear(in_channels, classes)
        randomize_batch_norms(self, seed)
        self.to(dtype)

    @staticmethod
    def make_block(block, in_channels, channels, stride, _is_last):
        return block(in_channels, channels, stride)

    def layers(self):
        return [module for name, module in self.named_children() if name.startswith("layer")]

    def stage_pre_relu(self):
        return [layer[-1].pre_relu for layer in self.layers()]

    def get_bn_before_relu(self):
        return [layer[-1].bn3 if hasattr(layer[-1], "bn3") else layer[-1].bn2 for layer in self.layers()]

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for layer in self.layers():
            x = layer(x)
        return self.fc(x.mean(dim=(2, 3)))


class MdistillerResNet(ResNet):
    """mdistiller's CIFAR ResNet: ``forward`` returns ``(logits, feats)``; ``preact_feats`` starts with the stem
    (post-ReLU) and pairs its last entries with ``get_bn_before_relu()``."""

    def __init__(self, **kwargs):
        super().__init__(MdistillerBasicBlock, **kwargs)

    @staticmethod
    def make_block(block, in_channels, channels, stride, is_last):
        return block(in_channels, channels, stride, is_last=is_last)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        feats, preact_feats = [x], [x]
        for layer in self.layers():
            x, pre = layer(x)
            feats.append(x)
            preact_feats.append(pre)
        logits = self.fc(x.mean(dim=(2, 3)))
        return logits, {"feats": feats, "preact_feats": preact_feats, "pooled_feat": x.mean(dim=(2, 3))}


class OfficialResNet(ResNet):
    """The official OFD ResNet files: moved ReLUs, the last stage's ReLU in ``forward``, and the
    ``extract_feature`` / ``get_bn_before_relu`` / ``get_channel_num`` API."""

    def __init__(self, block=MovedReluBasicBlock, **kwargs):
        super().__init__(block, **kwargs)

    def extract_feature(self, x, preReLU=False):  # noqa: N803 (the official signature)
        x = self.bn1(self.conv1(x))
        features = []
        for layer in self.layers():
            x = layer(x)
            features.append(x)
        logits = self.fc(F.relu(x).mean(dim=(2, 3)))
        if not preReLU:
            features = [F.relu(f) for f in features]
        return features, logits

    def get_channel_num(self):
        return [layer[-1].bn2.num_features for layer in self.layers()]

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        for layer in self.layers():
            x = layer(x)
        return self.fc(F.relu(x).mean(dim=(2, 3)))


class PreActBlock(nn.Module):
    """The WideResNet block: bn1 -> in-place relu1 -> conv1 -> bn2 -> relu2 -> conv2, plus the shortcut."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.equal_in_out = in_channels == channels and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x):
        normalized = self.bn1(x)
        record(self, normalized)  # the previous stage's pre-ReLU feature
        activated = self.relu1(normalized)
        if not self.equal_in_out:
            x = activated
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return torch.add(x if self.equal_in_out else self.shortcut(x), out)


class WideResNet(nn.Module):
    """The official WideResNet layout: ``blockK.layer`` Sequentials, a final bn1 + in-place ReLU, and the stage
    features ``extract_feature(preReLU=True)`` computes by running the next BN again."""

    def __init__(self, widths=(4, 6, 8), blocks=2, classes=5, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = conv3x3(3, widths[0])
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            group = nn.Module()
            group.layer = nn.Sequential(*(PreActBlock(in_channels if i == 0 else width, width,
                                                      2 if stage and i == 0 else 1) for i in range(blocks)))
            self.add_module(f"block{stage + 1}", group)
            in_channels = width
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_channels, classes)
        randomize_batch_norms(self, seed)
        self.to(dtype)

    def groups(self):
        return [module for name, module in self.named_children() if name.startswith("block")]

    def get_bn_before_relu(self):
        return [group.layer[0].bn1 for group in self.groups()[1:]] + [self.bn1]

    def bn_tap_names(self):
        return [f"block{stage + 2}.layer.0.bn1" for stage in range(len(self.groups()) - 1)] + ["bn1"]

    def stage_pre_relu(self):
        return [group.layer[0].pre_relu for group in self.groups()[1:]] + [self.pre_relu]

    def _trunk(self, x):
        features = []
        x = self.conv1(x)
        for group in self.groups():
            x = group.layer(x)
            features.append(x)
        normalized = self.bn1(x)
        record(self, normalized)
        logits = self.fc(self.relu(normalized).mean(dim=(2, 3)))
        return features, logits

    def extract_feature(self, x, preReLU=False):  # noqa: N803
        features, logits = self._trunk(x)
        if preReLU:
            features = [bn(f) for bn, f in zip(self.get_bn_before_relu(), features)]
        return features, logits

    def forward(self, x):
        return self._trunk(x)[1]


class MdistillerWideResNet(WideResNet):
    """mdistiller's WideResNet: the same trunk, ``forward`` returns ``(logits, feats)``."""

    def forward(self, x):
        features, logits = self._trunk(x)
        preact = [bn(f) for bn, f in zip(self.get_bn_before_relu(), features)]
        return logits, {"feats": features, "preact_feats": [features[0]] + preact}


class ConvBnRelu(nn.Sequential):
    """A conv-bn-relu stack with an in-place ReLU; the BN ("1") output is the pre-ReLU feature."""

    def __init__(self, channels=4, classes=5, seed=0, dtype=torch.float64):
        torch.manual_seed(seed)
        super().__init__(conv3x3(3, channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
        self[1].register_forward_hook(self._record)
        randomize_batch_norms(self, seed)
        self.to(dtype)

    def _record(self, _bn, _args, output):
        record(self, output)

    def stage_pre_relu(self):
        return [self.pre_relu]


def images(batch=4, size=8, seed=1, dtype=torch.float64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def logits_of(output):
    """The classifier output of a model that returns logits or (logits, feats)."""
    return output[0] if isinstance(output, tuple) else output


def eager_distill_loss(teacher_features, student_features, connectors, margins, alpha, batch_size):
    """The reference distiller and training script, written out: stage i of K weighs 1 / 2**(K-1-i), then
    ``alpha * sum / batch_size``."""
    stages = len(teacher_features)
    total = sum(reference.ofd_loss(connector(s), t, m) / 2 ** (stages - 1 - i)
                for i, (connector, s, t, m) in enumerate(zip(connectors, student_features, teacher_features, margins)))
    return alpha * total / batch_size


def assert_distiller_matches_eager(distiller, x, *, expected_margins=None, rtol=1e-9, atol=1e-12):
    """One forward/backward of ``distiller`` equals the eager computation on the models' true pre-ReLU features
    (their ``stage_pre_relu()`` oracle): loss, student output, and every student and connector gradient. Both
    runs start from the same state. Returns the loss."""
    teacher, student = distiller.teacher, distiller.student
    trainable = [p for p in list(student.parameters()) + list(distiller.connectors.parameters()) if p.requires_grad]
    state = copy.deepcopy(distiller.state_dict())
    for p in trainable:
        p.grad = None
    output, loss = distiller(x)
    (loss + logits_of(output).square().mean()).backward()
    got_grads = [p.grad.clone() for p in trainable]

    distiller.load_state_dict(state)
    for p in trainable:
        p.grad = None
    with torch.no_grad():
        teacher(x)
    teacher_features = teacher.stage_pre_relu()
    expected_output = student(x)
    student_features = student.stage_pre_relu()
    margins = expected_margins if expected_margins is not None else distiller.margins
    expected = eager_distill_loss(teacher_features, student_features, distiller.connectors, margins,
                                  distiller.alpha, x.shape[0])
    (expected + logits_of(expected_output).square().mean()).backward()

    torch.testing.assert_close(logits_of(output), logits_of(expected_output), rtol=0, atol=0)
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    assert loss > 0
    for got, parameter in zip(got_grads, trainable):
        torch.testing.assert_close(got, parameter.grad, rtol=rtol, atol=atol)
    return loss


def stage_outputs(model, taps, *inputs):
    """The stage outputs read by plain forward hooks (the oracle), and the model's output."""
    outputs = [None] * len(taps)

    def reader(index):
        def read(_module, _args, output):
            outputs[index] = output.clone()
        return read

    handles = [model.get_submodule(tap.module).register_forward_hook(reader(index)) for index, tap in enumerate(taps)]
    try:
        result = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, result


def eager_channel_align_loss(distiller, teacher_features, student_features, batch_size):
    total = 0
    for aligner, s, t in zip(distiller.aligners, student_features, teacher_features):
        if s.shape[2:] != t.shape[2:]:
            s = (F.adaptive_avg_pool2d(s, t.shape[2:]) if s.shape[2] >= t.shape[2]
                 else F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False))
        total = total + reference.channel_align_loss(s, t, aligner.conv1.weight, aligner.conv1.bias,
                                                     aligner.conv2.weight, aligner.conv2.bias)
    return distiller.alpha * total / batch_size


def assert_channel_align_matches_eager(distiller, *inputs, rtol=1e-9):
    state = copy.deepcopy(distiller.state_dict())
    distiller.zero_grad(set_to_none=True)
    output, loss = distiller(*inputs)
    loss.backward()
    trainable = [p for p in distiller.parameters() if p.grad is not None]  # the classifier head gets none
    got = [p.grad.clone() for p in trainable]
    distiller.load_state_dict(state)
    distiller.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher_features, _ = stage_outputs(distiller.teacher, distiller.teacher_taps, *inputs)
    student_features, expected_output = stage_outputs(distiller.student, distiller.student_taps, *inputs)
    expected = eager_channel_align_loss(distiller, teacher_features, student_features, student_features[0].shape[0])
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=0)
    assert loss > 0
    for grad, p in zip(got, trainable):
        torch.testing.assert_close(grad, p.grad, rtol=rtol, atol=1e-12)
    return output, expected_output
