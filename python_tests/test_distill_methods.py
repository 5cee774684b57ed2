"""ChannelAlignDistiller and FRSKDDistiller on small models: stages, the spatial-size choice, checkpoints, and the
errors they give. (The models people train: test_distill_zoo.py; torch.compile and DDP: test_distill_scale.py.)"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_models import ResNet, TorchvisionBasicBlock, assert_channel_align_matches_eager, images
from ofdkern import ChannelAlignDistiller, FRSKDDistiller, Tap, reference


def resnets(teacher_seed=0, student_seed=1):
    return (ResNet(TorchvisionBasicBlock, widths=(8, 12, 16), blocks=2, seed=teacher_seed),
            ResNet(TorchvisionBasicBlock, widths=(4, 6, 8), seed=student_seed))


# -- channel alignment ------------------------------------------------------------------------------------------

def test_channel_alignment_reads_stage_outputs_and_equals_eager():
    teacher, student = resnets()
    distiller = ChannelAlignDistiller(teacher, student, alpha=1e-2)
    assert distiller.teacher_taps == [Tap(f"layer{i}.1", bn=f"layer{i}.1.bn2") for i in (1, 2, 3)]
    assert distiller.teacher_channels == [8, 12, 16] and distiller.student_channels == [4, 6, 8]
    for seed in (1, 2):
        output, expected_output = assert_channel_align_matches_eager(distiller, images(seed=seed))
        torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    assert all(not m.training for m in distiller.teacher.modules())  # the teacher runs in eval mode


def test_channel_alignment_brings_the_student_to_the_teacher_size():
    # Student stage 0 is half the teacher's size (interpolated up), stage 1 twice (average-pooled down).
    teacher, student = resnets()
    distiller = ChannelAlignDistiller(teacher, student, ["layer1", "layer2"], ["layer2", "layer1"], alpha=1e-2)
    teacher_features, student_features, _ = distiller._features(images())
    assert [f.shape[2:] for f in teacher_features] == [(8, 8), (4, 4)]
    assert [f.shape[2:] for f in student_features] == [(4, 4), (8, 8)]
    assert_channel_align_matches_eager(distiller, images(seed=2))
    pooled = F.adaptive_avg_pool2d(student_features[1], (4, 4))
    aligner = distiller.aligners[1]
    expected = reference.channel_align_loss(pooled, teacher_features[1], aligner.conv1.weight, aligner.conv1.bias,
                                            aligner.conv2.weight, aligner.conv2.bias)
    torch.testing.assert_close(aligner(pooled, teacher_features[1]), expected, rtol=1e-9, atol=0)


def test_channel_alignment_state_dict_round_trip():
    teacher, student = resnets()
    trained = ChannelAlignDistiller(teacher, student, hidden=5, reduction="sum")
    output, loss = trained(images())
    loss.backward()
    with torch.no_grad():
        for p in trained.aligners.parameters():
            p.sub_(0.1 * p.grad)
    restored = ChannelAlignDistiller(*resnets(teacher_seed=3, student_seed=4), hidden=5, reduction="sum")
    restored.load_state_dict(trained.state_dict())
    assert [a.conv1.out_channels for a in restored.aligners] == [5, 5, 5]
    assert "aligners.2.conv2.weight" in restored.state_dict()
    torch.testing.assert_close(restored(images(seed=5))[1], trained(images(seed=5))[1], rtol=0, atol=0)


def test_channel_alignment_errors_name_what_to_pass():
    teacher, student = resnets()
    with pytest.raises(ValueError, match=r"the teacher has 3 stages and the student 2 .*teacher_taps / student_taps"):
        ChannelAlignDistiller(teacher, student, student_taps=["layer1", "layer2"])
    with pytest.raises(ValueError, match="no student stages found automatically in Sequential.*student_taps"):
        ChannelAlignDistiller(teacher, nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match=r"reduction must be one of \('batchmean', 'sum'\), got 'mean'"):
        ChannelAlignDistiller(teacher, student, reduction="mean")
    with pytest.raises(TypeError, match="hidden must be a positive int"):
        ChannelAlignDistiller(teacher, student, hidden=2.5)
    with pytest.raises(ValueError, match="alpha must be a non-negative finite number"):
        ChannelAlignDistiller(teacher, student, alpha=-1)
    with pytest.raises(AttributeError):
        ChannelAlignDistiller(teacher, student, student_taps=["layer1", "layer9", "layer3"])

    def flat_features(model, x):
        output = model(x)
        return [f.flatten(2) for f in model.stage_pre_relu()], output

    with pytest.raises(ValueError, match="channel count of some student taps is unknown.*example_input"):
        ChannelAlignDistiller(teacher, student, student_taps=flat_features)
    with pytest.raises(ValueError, match=r"stage 0: teacher and student features must be \(N, C, H, W\)"):
        ChannelAlignDistiller(teacher, student, student_taps=flat_features, example_input=images())


# -- FRSKD ------------------------------------------------------------------------------------------------------

def test_frskd_on_a_small_resnet_trains_the_model_and_its_self_teacher():
    model = ResNet(TorchvisionBasicBlock, widths=(4, 6, 8), seed=1)
    frskd = FRSKDDistiller(model, width=1, depth=1)
    assert [tap.module for tap in frskd.taps] == ["layer1.0", "layer2.0", "layer3.0"]
    assert frskd.self_teacher.channels == (4, 6, 8) and frskd.self_teacher.fc.out_features == 5
    logits, teacher_logits, distill = frskd(images())
    targets = torch.arange(4) % 5
    (F.cross_entropy(logits, targets) + F.cross_entropy(teacher_logits, targets) + distill).backward()
    assert model.conv1.weight.grad.abs().sum() > 0 and frskd.self_teacher.fc.weight.grad.abs().sum() > 0
    # The distillation terms reach only the model: the self-teacher's side is detached.
    frskd.zero_grad(set_to_none=True)
    frskd(images())[2].backward()
    assert frskd.self_teacher.fc.weight.grad is None and model.conv1.weight.grad.abs().sum() > 0


def test_frskd_state_dict_round_trip_and_eval_output():
    trained = FRSKDDistiller(ResNet(TorchvisionBasicBlock, widths=(4, 6, 8), classes=7, seed=1))
    trained(images())
    restored = FRSKDDistiller(ResNet(TorchvisionBasicBlock, widths=(4, 6, 8), classes=7, seed=2))
    restored.load_state_dict(trained.state_dict())
    assert "self_teacher.fc.weight" in restored.state_dict() and restored.self_teacher.fc.out_features == 7
    for got, want in zip(restored(images(seed=3)), trained(images(seed=3))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(images()), restored.model(images()))


def test_frskd_errors_name_what_to_pass():
    model = ResNet(TorchvisionBasicBlock, widths=(4, 6, 8), seed=1)
    no_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="classes of Sequential are unknown.*pass num_classes"):
        FRSKDDistiller(no_linear, taps=["1"])
    with pytest.raises(ValueError, match="each stage feature must have the batch of the first and half the spatial "
                                         "size"):
        FRSKDDistiller(model, taps=["layer1", "layer1.0"], example_input=images())
    with pytest.raises(ValueError, match="channels must list at least two stage widths"):
        FRSKDDistiller(model, taps=["layer1"])
    for name, value in (("alpha", -1.0), ("beta", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be a non-negative finite number"):
            FRSKDDistiller(model, **{name: value})
    with pytest.raises(ValueError, match="temperature must be a positive"):
        FRSKDDistiller(model, temperature=0.0)

    def features_and_tuple(model, x):
        output = model(x)
        return [layer[-1].pre_relu for layer in model.layers()], (output, None)

    with pytest.raises(ValueError, match=r"needs the model to return \(N, 5\) logits .*, got tuple"):
        FRSKDDistiller(model, taps=features_and_tuple, example_input=images())(images())
    with pytest.raises(ValueError, match=r"needs the model to return \(N, 7\) logits .*, got \(4, 5\)"):
        FRSKDDistiller(model, num_classes=7)(images())
