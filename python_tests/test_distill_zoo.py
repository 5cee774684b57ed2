"""The distillers on the models people train, in their default constructors (timm and torchvision; weights are
never downloaded): OFD's taps against the true pre-ReLU features (zero-initialized residuals, RegNets, frozen
BatchNorms, detection and segmentation backbones), its refusal of non-ReLU families, and channel alignment and
FRSKD on ReLU and non-ReLU families, against eager computations on independently hooked features."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_models import assert_channel_align_matches_eager, stage_outputs
from ofdkern import ChannelAlignDistiller, FRSKDDistiller, OFDDistiller, find_stages, reference
from ofdkern.margins import margin_from_bn
from ofdkern.taps import BlockTap, Tap

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from torchvision.models import detection, segmentation  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402


def batch(size=32, count=2, seed=0):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def blocks_of(model, taps):
    return [model.get_submodule(tap.module) for tap in taps]


class BlockInputs:
    """Records the input of each block at its last call (the distiller's own forward runs inside)."""

    def __init__(self, blocks):
        self.inputs = [None] * len(blocks)
        self.handles = [block.register_forward_pre_hook(self._hook(index)) for index, block in enumerate(blocks)]

    def _hook(self, index):
        def record(_block, args):
            self.inputs[index] = args[0].detach().clone()
        return record

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        for handle in self.handles:
            handle.remove()


def without_final_activation(block):
    """A copy of a block whose final activation is a module of its own, replaced by the identity: its output
    is the pre-activation sum (timm ResNet / RegNet, torchvision RegNet)."""
    block = copy.deepcopy(block)
    for name in ("act3", "act2", "activation"):
        if isinstance(getattr(block, name, None), nn.ReLU) and (name != "act2" or not hasattr(block, "act3")):
            setattr(block, name, nn.Identity())
            return block
    raise AssertionError(f"no final activation module in {type(block).__name__}")


def torchvision_residual_sum(block, x):
    """torchvision's BasicBlock / Bottleneck (one ReLU module called two or three times) written out."""
    out = torch.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "bn3"):
        out = block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(out)))))
    else:
        out = block.bn2(block.conv2(out))
    return out + (x if block.downsample is None else block.downsample(x))


@torch.no_grad()
def true_pre_relu(blocks, inputs):
    sums = []
    for block, x in zip(blocks, inputs):
        if isinstance(block, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)):
            sums.append(torchvision_residual_sum(block, x))
        else:
            oracle = without_final_activation(block)
            oracle.eval()
            sums.append(oracle(x))
    return sums


def assert_taps_read_the_true_pre_relu_features(distiller, *inputs):
    """Eval mode (BN running statistics, so a block recomputed alone gives the same sum): each tapped feature
    equals its block recomputed without the final activation; returns the features, teacher then student."""
    distiller.eval()
    found = []
    for _first_then_steady in range(2):
        blocks = [blocks_of(distiller.teacher, distiller.teacher_taps),
                  blocks_of(distiller.student, distiller.student_taps)]
        with BlockInputs(blocks[0]) as teacher_inputs, BlockInputs(blocks[1]) as student_inputs:
            teacher_features, student_features, _output = distiller._features(*inputs)
        for features, side_blocks, recorded in ((teacher_features, blocks[0], teacher_inputs),
                                                (student_features, blocks[1], student_inputs)):
            for feature, expected in zip(features, true_pre_relu(side_blocks, recorded.inputs)):
                torch.testing.assert_close(feature, expected, rtol=1e-5, atol=1e-5)
        found = [teacher_features, student_features]
    distiller.train()
    return found


# -- OFD ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_resnets():
    # timm's default zero_init_last=True: each block's last BN has gamma 0.
    return timm.create_model("resnet50", num_classes=5), timm.create_model("resnet18", num_classes=5)


def test_zero_initialized_residual_blocks_are_tapped_at_their_true_pre_relu_sums(timm_resnets):
    teacher, student = timm_resnets
    assert all(not block.bn2.weight.any() for block in student.modules() if hasattr(block, "act2")
               and not hasattr(block, "act3"))
    for student in (student, torchvision.models.resnet18(num_classes=5, zero_init_residual=True)):
        distiller = OFDDistiller(teacher, student)
        assert distiller.teacher_taps[0] == BlockTap("layer1.2", bn="layer1.2.bn3")
        _teacher_features, student_features = assert_taps_read_the_true_pre_relu_features(distiller, batch())
        # At initialization the sum is the non-negative shortcut: a value check would call it post-ReLU.
        assert all(not (feature < 0).any() for feature in student_features)
        relu = "layer4.1.act2" if hasattr(student.layer4[1], "act2") else "layer4.1.relu"
        assert distiller.student_taps[3] == Tap("layer4.1", relu=relu, bn="layer4.1.bn2")
        output, loss = distiller(batch(seed=1))
        (F.cross_entropy(output, torch.tensor([0, 1])) + loss).backward()
        assert torch.isfinite(loss) and loss > 0
        assert student.conv1.weight.grad.abs().sum() > 0  # the zero-initialized branches pass no gradient yet


def test_resnet_d_and_se_resnext_blocks_are_tapped_at_their_true_pre_relu_sums():
    # ResNet-D: deep stem, average-pool shortcuts; SE-ResNeXt: grouped convs, the sum added onto the SE output.
    teacher = timm.create_model("seresnext26d_32x4d", num_classes=5)
    student = timm.create_model("resnet26d", num_classes=5)
    distiller = OFDDistiller(teacher, student)
    assert [tap.module for tap in distiller.teacher_taps] == [f"layer{i}.1" for i in range(1, 5)]
    assert_taps_read_the_true_pre_relu_features(distiller, batch())
    assert all(tap.relu == f"{tap.module}.act3" for tap in distiller.teacher_taps + distiller.student_taps)


def test_regnets_of_timm_and_torchvision_are_tapped_at_their_true_pre_relu_sums():
    teacher = timm.create_model("regnety_002", num_classes=5)
    student = torchvision.models.regnet_y_400mf(num_classes=5)
    distiller = OFDDistiller(teacher, student)
    assert distiller.teacher_taps == [BlockTap("s1.b1", bn="s1.b1.conv3.bn"), BlockTap("s2.b1", bn="s2.b1.conv3.bn"),
                                      BlockTap("s3.b4", bn="s3.b4.conv3.bn"), BlockTap("s4.b7", bn="s4.b7.conv3.bn")]
    assert distiller.student_taps[0] == BlockTap("trunk_output.block1.block1-0",
                                                 bn="trunk_output.block1.block1-0.f.c.1")
    assert_taps_read_the_true_pre_relu_features(distiller, batch())
    assert all(isinstance(tap, Tap) and tap.relu for tap in distiller.teacher_taps + distiller.student_taps)
    _output, loss = distiller(batch(seed=1))
    loss.backward()
    assert loss > 0


def test_frozen_batch_norms_give_margins_and_taps_like_batch_norms():
    teacher = torchvision.models.resnet18(num_classes=5, norm_layer=FrozenBatchNorm2d)
    generator = torch.Generator().manual_seed(0)
    for module in teacher.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    distiller = OFDDistiller(teacher, torchvision.models.resnet18(num_classes=5))
    assert distiller.teacher_taps[1] == BlockTap("layer2.1", bn="layer2.1.bn2")
    for margin, tap in zip(distiller.margins, distiller.teacher_taps):
        frozen = teacher.get_submodule(tap.bn)
        as_batch_norm = nn.BatchNorm2d(frozen.weight.numel())
        as_batch_norm.weight.data.copy_(frozen.weight)
        as_batch_norm.bias.data.copy_(frozen.bias)
        assert torch.equal(margin, margin_from_bn(as_batch_norm)) and (margin < 0).all()
    assert_taps_read_the_true_pre_relu_features(distiller, batch())


def faster_rcnn(depth):
    """A Faster R-CNN on a ResNet-FPN backbone with frozen BatchNorms, as torchvision's pretrained detection
    backbones ship, at a small input size."""
    backbone = detection.backbone_utils.resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None,
                                                            norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    return detection.FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    return faster_rcnn(34), faster_rcnn(18)


def detection_batch():
    images = list(batch(size=64, count=2))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 2.0, 30.0, 60.0]]), "labels": torch.tensor([2])}]
    return images, targets


def test_detection_models_distil_their_backbones_with_images_and_targets(detectors):
    teacher, student = detectors
    distiller = OFDDistiller(teacher, student, alpha=1e-5)
    assert [tap.module for tap in distiller.teacher_taps] == [f"backbone.body.layer{i}.{j}" for i, j in
                                                               ((1, 2), (2, 3), (3, 5), (4, 2))]
    images, targets = detection_batch()
    assert_taps_read_the_true_pre_relu_features(distiller, images)  # eval mode: images only
    loss_dict, distill_loss = distiller(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(loss_dict)
    (sum(loss_dict.values()) + distill_loss).backward()
    assert distill_loss > 0 and student.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_segmentation_models_distil_their_backbones():
    torch.manual_seed(0)
    teacher = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3)
    student = segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    distiller = OFDDistiller(teacher, student, alpha=1e-5)
    assert [tap.module for tap in distiller.student_taps] == [f"backbone.layer{i}.{j}" for i, j in
                                                               ((1, 2), (2, 3), (3, 5), (4, 2))]
    assert_taps_read_the_true_pre_relu_features(distiller, batch(size=48))
    output, loss = distiller(batch(size=48, seed=1))
    assert output["out"].shape == (2, 3, 48, 48)
    (output["out"].square().mean() + loss).backward()
    assert loss > 0


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "convnext_atto"])
def test_non_relu_families_are_refused_naming_channel_alignment(name, timm_resnets):
    model = timm.create_model(name, num_classes=5)
    with pytest.raises(ValueError, match=r"uses .*(SiLU|Hardswish|GELU).*defined for ReLU networks.*"
                                         r"ofdkern.ChannelAlignDistiller"):
        OFDDistiller(timm_resnets[0], model)


def test_a_residual_block_ending_in_silu_is_refused_naming_channel_alignment(timm_resnets):
    student = timm.create_model("resnet18", num_classes=5, act_layer=nn.SiLU)
    distiller = OFDDistiller(timm_resnets[0], student)
    with pytest.raises(ValueError, match=r"student block 'layer1.1' \(BasicBlock\) ends in SiLU, not a ReLU.*"
                                         r"ofdkern.ChannelAlignDistiller"):
        distiller(batch())


# -- channel alignment ------------------------------------------------------------------------------------------

def test_channel_alignment_distils_non_relu_families_equal_to_eager():
    teacher = timm.create_model("convnext_atto", num_classes=5).double()
    student = timm.create_model("mobilenetv3_small_100", num_classes=5).double()
    distiller = ChannelAlignDistiller(teacher, student, alpha=1e-3)
    assert [tap.module for tap in distiller.teacher_taps] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert [tap.module for tap in distiller.student_taps] == ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]
    assert distiller.teacher_channels == [40, 80, 160, 320] and distiller.student_channels == [16, 24, 48, 576]
    assert [a.conv1.out_channels for a in distiller.aligners] == [40, 80, 160, 320]  # hidden = teacher channels
    for seed in (0, 1):  # the first forward checks the taps, the second reads them as in training
        output, expected_output = assert_channel_align_matches_eager(distiller, batch(seed=seed).double())
        torch.testing.assert_close(output, expected_output, rtol=0, atol=0)


def test_channel_alignment_finds_the_stages_of_torchvision_models():
    assert [tap.module for tap in find_stages(torchvision.models.mobilenet_v3_small())] == [
        "features.1", "features.3", "features.8", "features.12"]
    assert [tap.module for tap in find_stages(torchvision.models.efficientnet_b0())] == [
        "features.2", "features.3", "features.5", "features.8"]
    assert [tap.module for tap in find_stages(torchvision.models.resnet18())] == [
        f"layer{i}.1" for i in range(1, 5)]


def test_channel_alignment_distils_detection_models(detectors):
    teacher, student = detectors
    distiller = ChannelAlignDistiller(teacher, student, alpha=1e-5)
    images, targets = detection_batch()
    loss_dict, distill_loss = distiller(images, targets)
    (sum(loss_dict.values()) + distill_loss).backward()
    assert distill_loss > 0 and all(a.conv1.weight.grad is not None for a in distiller.aligners)


# -- FRSKD ------------------------------------------------------------------------------------------------------

def test_frskd_builds_its_self_teacher_on_the_stages_of_a_non_relu_family_and_equals_eager():
    model = timm.create_model("mobilenetv3_small_100", num_classes=5).double()
    frskd = FRSKDDistiller(model, width=1, depth=1)
    assert frskd.self_teacher.channels == tuple(e["num_chs"] for e in model.feature_info[1:])
    x = batch(seed=0).double()
    for _first_then_steady in range(2):
        logits, teacher_logits, distill = frskd(x)
        with torch.no_grad():
            features, expected_logits = stage_outputs(model, frskd.taps, x)
            refined, expected_teacher_logits = frskd.self_teacher(features)
        expected = 2.0 * reference.kd_loss(expected_logits, expected_teacher_logits, temperature=4.0)
        expected = expected + 100.0 * sum(reference.attention_transfer_loss(f, t) for f, t in zip(features, refined))
        torch.testing.assert_close(logits, expected_logits, rtol=1e-12, atol=0)
        torch.testing.assert_close(teacher_logits, expected_teacher_logits, rtol=1e-12, atol=0)
        torch.testing.assert_close(distill, expected, rtol=1e-9, atol=0)
    targets = torch.tensor([0, 1])
    (F.cross_entropy(logits, targets) + F.cross_entropy(teacher_logits, targets) + distill).backward()
    assert all(p.grad is not None for p in frskd.self_teacher.fc.parameters())
    frskd.eval()
    with torch.no_grad():
        torch.testing.assert_close(frskd(x), model(x), rtol=0, atol=0)
