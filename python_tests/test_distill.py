"""OFDDistiller: automatic and explicit taps, margins, connectors, the scaled loss against the eager reference,
teacher freezing, checkpoints, shape errors, and DistributedDataParallel against a single process."""
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ofdkern import reference
from ofdkern.distill import OFDDistiller, Tap, find_taps
from ofdkern.margins import DataMarginEstimator, margin_from_bn
from ofdkern.modules import Connector


class BasicBlock(nn.Module):
    """torchvision's BasicBlock structure (one in-place ReLU called twice); keeps its pre-ReLU sum in
    ``pre_relu`` as the test oracle."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        self.pre_relu = out.clone()
        return self.relu(out)


class Bottleneck(BasicBlock):
    """torchvision's Bottleneck structure: the BN before the add is bn3."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__(in_channels, channels, stride)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.conv3 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        self.pre_relu = out.clone()
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, widths=(4, 8, 16), blocks=2, block=BasicBlock, classes=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            layers = [block(in_channels if i == 0 else width, width, 2 if stage and i == 0 else 1)
                      for i in range(blocks)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            in_channels = width
        self.fc = nn.Linear(in_channels, classes)
        # Non-trivial BN affine parameters, so margins differ per channel and from the defaults.
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)

    def stage_ends(self):
        return [getattr(self, name)[-1] for name in self._modules if name.startswith("layer")]

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self._modules:
            if name.startswith("layer"):
                x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block structure: ``conv`` Sequential ending in a BN, linear output."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        hidden = in_channels * 2
        self.use_res_connect = stride == 1 and in_channels == channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TinyMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU6()),
            InvertedResidual(4, 4, 1), InvertedResidual(4, 8, 1),  # stage 0
            InvertedResidual(8, 8, 2), InvertedResidual(8, 8, 1),  # stage 1
            InvertedResidual(8, 16, 2))                             # stage 2
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def images(batch=4, size=8, seed=1, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pair(teacher_block=BasicBlock, **kwargs):
    teacher = TinyResNet((8, 12, 16), blocks=2, block=teacher_block, seed=0)
    student = TinyResNet((4, 6, 8), blocks=1, seed=1)
    return teacher, student, OFDDistiller(teacher, student, **kwargs)


def test_automatic_taps_of_a_resnet_are_the_last_block_of_each_stage():
    assert find_taps(TinyResNet(blocks=2)) == [
        Tap(f"layer{s}.1", relu=f"layer{s}.1.relu", bn=f"layer{s}.1.bn2") for s in (1, 2, 3)]
    assert find_taps(TinyResNet(blocks=1, block=Bottleneck)) == [
        Tap(f"layer{s}.0", relu=f"layer{s}.0.relu", bn=f"layer{s}.0.bn3") for s in (1, 2, 3)]


def test_automatic_taps_of_a_mobilenet_are_the_last_block_of_each_resolution():
    assert find_taps(TinyMobileNet()) == [
        Tap("features.2", bn="features.2.conv.7"), Tap("features.4", bn="features.4.conv.7"),
        Tap("features.5", bn="features.5.conv.7")]
    assert find_taps(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) == []


def test_a_mobilenet_student_taps_block_outputs_and_learns_from_a_resnet_teacher():
    teacher, student = TinyResNet((8, 12, 16), seed=0), TinyMobileNet()
    distiller = OFDDistiller(teacher, student, example_input=images())
    blocks = [student.features[i] for i in (2, 4, 5)]
    outputs = []
    handles = [b.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for b in blocks]
    _teacher_features, student_features, _output = distiller._features(images())
    for handle in handles:
        handle.remove()
    assert all(torch.equal(f, o) for f, o in zip(student_features, outputs))
    _output, loss = distiller(images())
    loss.backward()
    assert student.features[1].conv[0].weight.grad.abs().sum() > 0


def test_whole_distiller_pickles():
    _teacher, _student, distiller = pair(margin="data")
    distiller.calibrate([images()])
    buffer = io.BytesIO()
    torch.save(distiller, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    x = images(seed=3)
    torch.testing.assert_close(restored(x)[1], distiller(x)[1])


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_features_are_the_pre_relu_residual_sums(block):
    teacher, student, distiller = pair(teacher_block=block)
    x = images()
    teacher_features, student_features, output = distiller._features(x)
    for features, model in ((teacher_features, teacher), (student_features, student)):
        expected = [b.pre_relu for b in model.stage_ends()]
        assert len(features) == len(expected) == 3
        for feature, pre_relu in zip(features, expected):
            assert torch.equal(feature, pre_relu)
            assert (feature < 0).any()  # really before the ReLU
    assert output.shape == (4, 5) and output.requires_grad
    assert all(not f.requires_grad for f in teacher_features)
    assert all(f.requires_grad for f in student_features)


def test_margins_are_those_of_the_bn_before_the_add_and_follow_the_state_dict():
    teacher, _student, distiller = pair(teacher_block=Bottleneck)
    for margin, block in zip(distiller.margins, teacher.stage_ends()):
        assert torch.equal(margin, margin_from_bn(block.bn3))
    keys = distiller.state_dict().keys()
    assert {"losses.0.margin", "losses.2.margin", "connectors.1.0.weight", "connectors.1.1.running_mean"} <= keys


def test_stage_weights_and_connector_shapes():
    _teacher, _student, distiller = pair()
    assert distiller.stage_weights == [0.25, 0.5, 1.0]
    shapes = [(c.conv.in_channels, c.conv.out_channels) for c in distiller.connectors]
    assert shapes == [(4, 8), (6, 12), (8, 16)]
    assert all(isinstance(c, Connector) for c in distiller.connectors)


@pytest.mark.parametrize("teacher_bn_train", [True, False])
def test_loss_and_gradients_match_the_reference_distiller(teacher_bn_train):
    alpha = 1e-3
    teacher, student, distiller = pair(alpha=alpha, teacher_bn_train=teacher_bn_train)
    x = images(batch=6)
    output, loss = distiller(x)
    (loss + output.square().mean()).backward()
    student_grads = [p.grad.clone() for p in student.parameters()]
    connector_grads = [p.grad.clone() for p in distiller.connectors.parameters()]
    distiller.zero_grad()

    # The reference: teacher features without autograd, stage weights, alpha / batch size.
    with torch.no_grad():
        teacher(x)
    teacher_features = [b.pre_relu for b in teacher.stage_ends()]
    expected_output = student(x)
    student_features = [b.pre_relu for b in student.stage_ends()]
    expected = sum(reference.ofd_loss(connector(s), t, margin) / 2 ** (2 - i)
                   for i, (connector, s, t, margin) in enumerate(
                       zip(distiller.connectors, student_features, teacher_features, distiller.margins)))
    expected = alpha * expected / x.shape[0]
    (expected + expected_output.square().mean()).backward()

    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
    assert loss > 0
    for got, parameter in zip(student_grads + connector_grads,
                              list(student.parameters()) + list(distiller.connectors.parameters())):
        torch.testing.assert_close(got, parameter.grad, rtol=1e-4, atol=1e-8)


def test_teacher_is_frozen_and_its_bn_mode_follows_the_option():
    teacher, student, distiller = pair()
    teacher.dropout = nn.Dropout()  # never called; only its mode is checked
    distiller.train()
    assert all(m.training for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    assert not teacher.training and not teacher.dropout.training
    assert student.training and all(c.training for c in distiller.connectors)
    _output, loss = distiller(images())
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # The distillation loss reaches every student parameter before the classifier.
    assert all(p.grad is not None for n, p in student.named_parameters() if not n.startswith("fc."))
    distiller.eval()
    assert not any(m.training for m in distiller.modules())

    _teacher, _student, frozen_bn = pair(teacher_bn_train=False)
    assert not any(m.training for m in frozen_bn.teacher.modules())
    assert frozen_bn.student.training


def test_explicit_taps_by_name_tap_and_callable():
    teacher, student, automatic = pair()
    names = ["layer1.1", "layer2.1", "layer3.1"]
    by_name = OFDDistiller(teacher, student, teacher_taps=names, student_taps=["layer1.0", "layer2.0", "layer3.0"])
    assert by_name._teacher_taps == automatic._teacher_taps
    assert by_name._student_taps == automatic._student_taps

    # A module's output (the BN before the add, not the pre-ReLU sum: only the wiring is tested here).
    bn_taps = [Tap(f"layer{s}.1.bn2", bn=f"layer{s}.1.bn2") for s in (1, 2, 3)]
    explicit = OFDDistiller(teacher, student, teacher_taps=bn_taps)
    assert [str(t.bn) for t in explicit._teacher_taps] == [f"layer{s}.1.bn2" for s in (1, 2, 3)]
    assert OFDDistiller(teacher, student, teacher_taps=[f"layer{s}.1.bn2" for s in (1, 2, 3)]
                        )._teacher_taps == bn_taps

    def last_two_stages(model, x):
        output = model(x)
        return [b.pre_relu for b in model.stage_ends()[1:]], output

    x = images()
    with pytest.raises(ValueError, match="example_input"):
        OFDDistiller(teacher, student, teacher_taps=last_two_stages, student_taps=last_two_stages,
                     margin="data")
    by_callable = OFDDistiller(teacher, student, teacher_taps=last_two_stages, student_taps=last_two_stages,
                               margin=[torch.full((12,), -0.5), torch.full((16,), -0.25)], example_input=x)
    assert by_callable.num_stages == 2 and by_callable.student_channels == [6, 8]
    _output, loss = by_callable(x)
    assert loss > 0
    with pytest.raises(ValueError, match='margin="bn" needs a BN'):
        OFDDistiller(teacher, student, teacher_taps=last_two_stages, student_taps=last_two_stages,
                     example_input=x)


def test_data_margins_calibrate_and_survive_a_state_dict_round_trip():
    teacher, student, distiller = pair(margin="data")
    batches = [(images(seed=s), torch.zeros(4)) for s in range(3)]
    with pytest.raises(RuntimeError, match="calibrate"):
        distiller(batches[0][0])
    margins = distiller.calibrate(batches)

    expected = [DataMarginEstimator(c) for c in (8, 12, 16)]
    for x, _y in batches:
        with torch.no_grad():
            teacher(x)
        for estimator, block in zip(expected, teacher.stage_ends()):
            estimator.update(block.pre_relu)
    for margin, estimator in zip(margins, expected):
        assert torch.equal(margin, estimator.margin) and (margin < 0).all()

    _teacher, _student, restored = pair(margin="data")
    restored.load_state_dict(distiller.state_dict())
    for got, want in zip(restored.margins, margins):
        assert torch.equal(got, want)
    for got, want in zip(restored.connectors.parameters(), distiller.connectors.parameters()):
        assert torch.equal(got, want)
    _output, loss = restored(images())
    assert torch.isfinite(loss)


def test_mismatched_taps_raise_errors_listing_the_shapes():
    teacher = TinyResNet((8, 12, 16), seed=0)
    with pytest.raises(ValueError, match=r"teacher has 3 tapped stages and the student 2.*layer1\.1"):
        OFDDistiller(teacher, TinyResNet((4, 6), seed=1))

    # Same number of stages, but the student does not downsample in its last stage.
    student = TinyResNet((4, 6, 8), seed=1)
    student.layer3[0].conv1.stride = (1, 1)
    student.layer3[0].downsample[0].stride = (1, 1)
    distiller = OFDDistiller(teacher, student, student_taps=["layer1.1", "layer2.1", "layer3.1"])
    with pytest.raises(ValueError, match=r"stage 2: .*teacher stage shapes .*\(4, 16, 2, 2\).*student stage "
                                         r"shapes .*\(4, 8, 4, 4\)"):
        distiller(images())
    with pytest.raises(ValueError, match="stage 2"):
        OFDDistiller(teacher, student, student_taps=["layer1.1", "layer2.1", "layer3.1"],
                     example_input=images())
    with pytest.raises(ValueError, match="no student taps found"):
        OFDDistiller(teacher, nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(AttributeError):
        OFDDistiller(teacher, student, student_taps=["layer1.1", "layer9.1", "layer3.1"])
    with pytest.raises(ValueError, match='connector="none" needs equal channels'):
        OFDDistiller(teacher, student, connector="none")
    with pytest.raises(ValueError, match="margin tensors must have shapes"):
        OFDDistiller(teacher, student, margin=[torch.zeros(8), torch.zeros(12)])


# -- DistributedDataParallel ---------------------------------------------------------------------------------
#
# Train-mode BatchNorm normalizes with each process's own batch statistics, and SyncBatchNorm does not run on
# CPU, so a 2-process run can only equal a single process on the global batch when no BN uses batch
# statistics. The comparison therefore runs every BN (teacher, student, connectors) in eval mode: what remains
# is exactly what DDP must get right for the distiller — the hooks under the DDP wrapper, the frozen teacher
# left out of gradient synchronization, and the per-process loss scaling (alpha / local batch) averaging to
# the global batch's loss. float64 makes the only difference, the order of the batch sums, negligible.

WORLD_SIZE, STEPS, GLOBAL_BATCH = 2, 3, 8


def _ddp_setup():
    teacher = TinyResNet((8, 12, 16), seed=0).double()
    student = TinyResNet((4, 6, 8), blocks=1, seed=1).double()
    distiller = OFDDistiller(teacher, student, alpha=1e-2, teacher_bn_train=False).double()
    distiller.train()
    for module in distiller.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    data = images(batch=GLOBAL_BATCH, seed=5, dtype=torch.float64)
    labels = torch.arange(GLOBAL_BATCH) % 5
    return distiller, data, labels


def _train(model, trainable, data, labels):
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(STEPS):
        output, distill_loss = model(data)
        loss = F.cross_entropy(output, labels) + distill_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _ddp_worker(rank, rendezvous, result_path):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        distiller, data, labels = _ddp_setup()
        model = nn.parallel.DistributedDataParallel(distiller)
        shard = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        _train(model, [p for p in distiller.parameters() if p.requires_grad], data[shard], labels[shard])
        if rank == 0:
            torch.save(distiller.state_dict(), result_path)
        # A rank that tears gloo down while the other still has traffic in flight can abort the other
        # ("terminate called without an active exception"): leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_processes_matches_one_process_on_the_global_batch(tmp_path):
    result_path = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(result_path)), nprocs=WORLD_SIZE)
    distributed = torch.load(result_path)

    distiller, data, labels = _ddp_setup()
    initial = {k: v.clone() for k, v in distiller.state_dict().items()}
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    assert len(trainable) == len(list(distiller.student.parameters())) + len(list(distiller.connectors.parameters()))
    _train(distiller, trainable, data, labels)

    for name, value in distiller.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12, msg=name)
    moved = [n for n, v in distiller.state_dict().items() if not torch.equal(v, initial[n])]
    assert any(n.startswith("student.") for n in moved) and any(n.startswith("connectors.") for n in moved)
    assert not any(n.startswith("teacher.") for n in moved)


@pytest.mark.parametrize("mode", [[], ["--validate"]], ids=["test-split", "validation-split"])
def test_digits_example_trains_all_three_models_and_prints_the_table(mode):
    # One short seed of the README's example: it must run end to end and report every model, the paired gain
    # and which images it evaluated on (accuracy after one epoch is not the point here).
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "distill_digits.py")
    run = subprocess.run([sys.executable, script, "--seeds", "1", "--epochs", "1", *mode], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    evaluated_on = "validation" if mode else "test"
    assert "OFD loss: fused C++ CPU kernel" in run.stdout or "OFD loss: eager reference" in run.stdout
    assert f"{evaluated_on} accuracy over 1 seeds" in run.stdout
    for model in ("teacher", "student (baseline)", "student (OFD)"):
        match = re.search(re.escape(model) + r"\s+\d+\s+([\d.]+) ± 0.00", run.stdout)
        assert match and 0.0 <= float(match.group(1)) <= 100.0, run.stdout
    assert re.search(r"OFD - baseline, same seed .*: -?[\d.]+ ± 0.00 points, better on [01] of 1 seeds", run.stdout)
