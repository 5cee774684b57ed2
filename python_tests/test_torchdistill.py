"""ofdkern.integrations.torchdistill: registration, every loss through torchdistill's DistillationBox against an
eager computation on the true features (in-place ReLUs included), the refusal of what torchdistill's own hooks
record, and a short run of the torchvision resnet34 -> resnet18 example."""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchdistill")

from torchdistill.core.distillation import DistillationBox  # noqa: E402
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_mid_level_loss  # noqa: E402
from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT  # noqa: E402

import ofdkern.integrations.torchdistill as plugin  # noqa: E402
from distill_models import ResNet, TorchvisionBasicBlock, WideResNet, images  # noqa: E402
from ofdkern import ChannelAlignDistiller, FRSKDDistiller, reference  # noqa: E402
from ofdkern.taps import BlockTap, Tap  # noqa: E402
from ofdkern.margins import DataMarginEstimator, margin_from_bn  # noqa: E402

STAGES = ("layer1", "layer2", "layer3")
LABELS = torch.arange(4) % 5


def test_importing_registers_the_wrapper_and_the_losses():
    assert AUXILIARY_MODEL_WRAPPER_DICT[plugin.WRAPPER_KEY] is plugin.FeatureTaps
    classes = (plugin.OFDFeatureLoss, plugin.ChannelAlignFeatureLoss, plugin.AttentionTransferLoss,
               plugin.SoftTargetKDLoss)
    for key, cls in zip(plugin.LOSS_KEYS, classes):
        assert MIDDLE_LEVEL_LOSS_DICT[key] is cls
    kd = get_mid_level_loss({"key": "ofdkern.KDLoss", "kwargs": {"temperature": 2.0}})
    student, teacher = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    io = {".": {"output": student}}, {".": {"output": teacher}}
    torch.testing.assert_close(kd(*io, None), reference.kd_loss(student, teacher, 2.0, "batchmean"))


def test_cwd_loss_by_name():
    assert MIDDLE_LEVEL_LOSS_DICT["ofdkern.CWDLoss"] is plugin.ChannelWiseDistillationLoss
    assert "ofdkern.CWDLoss" in plugin.LOSS_KEYS
    pairs = {"logits": {"student": {"path": "decode_head"}, "teacher": {"path": "decode_head"}, "weight": 3.0}}
    cwd = get_mid_level_loss({"key": "ofdkern.CWDLoss", "kwargs": {"feature_pairs": pairs, "temperature": 2.0}})
    student, teacher = (torch.randn(2, 4, 5, 6, dtype=torch.float64) for _ in range(2))
    io = {"decode_head": {"output": student}}, {"decode_head": {"output": teacher}}
    torch.testing.assert_close(cwd(*io, None), 3 * reference.cwd_loss(student, teacher, 2.0, "mean"))


def box(teacher, student, teacher_kwargs, student_kwargs, teacher_hooks, student_hooks, sub_terms,
        teacher_input_hooks=()):
    """A DistillationBox with a FeatureTaps wrapper on each side, torchdistill's forward hooks on the given
    output (and teacher input) paths, and the given loss terms."""
    def side(kwargs, hooks, input_hooks=()):
        config = {"forward_proc": "forward_batch_only", "forward_hook": {"input": list(input_hooks), "output": hooks}}
        if kwargs is not None:
            config["auxiliary_model_wrapper"] = {"key": plugin.WRAPPER_KEY, "kwargs": kwargs}
        return config

    train_config = {"num_epochs": 1, "teacher": side(teacher_kwargs, teacher_hooks, teacher_input_hooks),
                    "student": side(student_kwargs, student_hooks),
                    "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}}}
    return DistillationBox(teacher, student, {}, train_config, torch.device("cpu"), None, False, 1)


def term(key, weight=1.0, **kwargs):
    return {"criterion": {"key": key, "kwargs": kwargs}, "weight": weight}


def loss_and_gradients(distillation, x):
    """The box's loss and the gradients of every trainable student-side parameter (student and wrapper)."""
    parameters = [p for p in distillation.student_model.parameters() if p.requires_grad]
    for p in parameters:
        p.grad = None
    loss = distillation.forward_process(x, LABELS)
    loss.backward()
    return loss, [p.grad.clone() for p in parameters], parameters


def ofd_pairs():
    return {stage: {"student": {"path": f"connectors.{stage}", "io": "output"},
                    "teacher": {"path": f"taps.{stage}", "io": "output"},
                    "margin": {"path": f"margins.{stage}", "io": "output"}} for stage in STAGES}


def test_ofd_through_a_distillation_box_equals_eager_on_torchvision_blocks_with_in_place_relus():
    teacher = ResNet(TorchvisionBasicBlock, widths=(8, 12, 16), blocks=2)
    student = ResNet(TorchvisionBasicBlock, seed=1)
    alpha = 1e-2
    distillation = box(
        teacher, student,
        {"taps": {s: s for s in STAGES}, "margins": {"layer1": "bn", "layer2": "layer2.1.bn2", "layer3": "data"}},
        {"taps": {s: s for s in STAGES}, "connectors": {"layer1": 8, "layer2": 12, "layer3": 16}},
        [f"{kind}.{s}" for s in STAGES for kind in ("taps", "margins")], [f"connectors.{s}" for s in STAGES],
        {"ofd": term("ofdkern.OFDLoss", alpha, feature_pairs=ofd_pairs()), "ce": {
            "criterion": {"key": "CrossEntropyLoss", "kwargs": {}}, "weight": 1.0, "criterion_wrapper": {
                "key": "SimpleLossWrapper", "kwargs": {"input": {"is_from_teacher": False, "module_path": ".",
                                                                 "io": "output"}, "target": {"uses_label": True}}}}})
    wrapper = distillation.student_model
    located_on_first_forward = distillation.teacher_model.resolved_taps
    assert located_on_first_forward == {s: BlockTap(f"{s}.1", bn=f"{s}.1.bn2") for s in STAGES}
    state = copy.deepcopy([teacher.state_dict(), wrapper.state_dict()])
    x = images()
    loss, grads, parameters = loss_and_gradients(distillation, x)
    assert distillation.teacher_model.resolved_taps == {
        s: Tap(f"{s}.1", relu=f"{s}.1.relu", bn=f"{s}.1.bn2") for s in STAGES}

    teacher.load_state_dict(state[0])
    wrapper.load_state_dict(state[1])
    with torch.no_grad():
        teacher(x)
    teacher_features = teacher.stage_pre_relu()
    output = student(x)
    data_margin = DataMarginEstimator(16)
    data_margin.update(teacher_features[2])
    margins = [margin_from_bn(teacher.layer1[1].bn2), margin_from_bn(teacher.layer2[1].bn2), data_margin.margin]
    ofd = sum(reference.ofd_loss(wrapper.connectors[s](f), t, m) / 2 ** (2 - i)
              for i, (s, f, t, m) in enumerate(zip(STAGES, student.stage_pre_relu(), teacher_features, margins)))
    expected = alpha * ofd / x.shape[0] + F.cross_entropy(output, LABELS)
    for p in parameters:
        p.grad = None
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    for got, parameter in zip(grads, parameters):
        torch.testing.assert_close(got, parameter.grad, rtol=1e-9, atol=1e-12)


def test_what_torchdistills_own_hooks_record_for_an_in_place_relu_is_refused():
    # The input of torchvision's relu at its last call is the pre-ReLU sum, but the reference torchdistill keeps
    # is overwritten by that in-place relu: OFD would train on post-ReLU features.
    teacher = ResNet(TorchvisionBasicBlock, widths=(8, 12, 16), blocks=2)
    student = ResNet(TorchvisionBasicBlock, seed=1)
    relus = [f"model.{s}.1.relu" for s in STAGES]
    pairs = {s: {"student": {"path": f"connectors.{s}"}, "teacher": {"path": relu, "io": "input"},
                 "margin": {"path": f"margins.{s}"}} for s, relu in zip(STAGES, relus)}
    distillation = box(
        teacher, student, {"taps": {s: s for s in STAGES}, "margins": {s: "bn" for s in STAGES}},
        {"taps": {s: s for s in STAGES}, "connectors": {"layer1": 8, "layer2": 12, "layer3": 16}},
        [f"margins.{s}" for s in STAGES], [f"connectors.{s}" for s in STAGES],
        {"ofd": term("ofdkern.OFDLoss", 1e-2, feature_pairs=pairs)}, teacher_input_hooks=relus)
    with pytest.raises(ValueError, match=r"teacher feature 'model.layer1.1.relu' of pair 'layer1' has no negative "
                                         r"value.*"
                                         r"'ofdkern.FeatureTaps' wrapper"):
        distillation.forward_process(images(), LABELS)


def test_attention_transfer_channel_alignment_and_kd_equal_eager_on_bn_taps_overwritten_by_in_place_relus():
    # WideResNet stage features: the next block's BN output, which its in-place relu1 overwrites.
    teacher, student = WideResNet(widths=(8, 12, 16)), WideResNet(seed=1)
    names = ("stage1", "stage2", "stage3")
    teacher_taps = dict(zip(names, teacher.bn_tap_names()))
    pairs = {n: {"student": {"path": f"taps.{n}"}, "teacher": {"path": f"taps.{n}"}} for n in names}
    align_pairs = {n: {**pairs[n], "aligner": {"path": f"aligners.{n}"}, "weight": 0.5} for n in names[1:]}
    align_pairs["stage3"]["margin"] = {"path": "margins.stage3"}
    distillation = box(
        teacher, student, {"taps": teacher_taps, "margins": {"stage3": "bn"}},
        {"taps": dict(zip(names, student.bn_tap_names())),
         "aligners": {"stage2": {"t_channels": 12, "hidden": 5}, "stage3": {"t_channels": 16}}},
        [f"taps.{n}" for n in names] + ["margins.stage3"],
        [f"taps.{n}" for n in names] + ["aligners.stage2", "aligners.stage3"],
        {"at": term("ofdkern.ATLoss", 100.0, feature_pairs=pairs),
         "align": term("ofdkern.ChannelAlignLoss", 1e-2, feature_pairs=align_pairs),
         "kd": term("ofdkern.KDLoss", 2.0, temperature=4.0)})
    aligners = distillation.student_model.aligners
    state = copy.deepcopy([teacher.state_dict(), distillation.student_model.state_dict()])
    x = images()
    loss, grads, parameters = loss_and_gradients(distillation, x)

    teacher.load_state_dict(state[0])
    distillation.student_model.load_state_dict(state[1])
    with torch.no_grad():
        teacher_logits = teacher(x)
    teacher_features = teacher.stage_pre_relu()
    student_logits = student(x)
    student_features = student.stage_pre_relu()
    assert all((f < 0).any() for f in teacher_features)  # really the BN outputs, not what relu1 left
    at = sum(reference.attention_transfer_loss(s, t) for s, t in zip(student_features, teacher_features))
    margin = margin_from_bn(teacher.bn1)
    align = sum(0.5 * reference.channel_align_loss(student_features[i], teacher_features[i], *aligners[n](),
                                                   margin=margin if n == "stage3" else None, reduction="batchmean")
                for i, n in ((1, "stage2"), (2, "stage3")))
    kd = reference.kd_loss(student_logits, teacher_logits, 4.0, "batchmean")
    expected = 100.0 * at + 1e-2 * align + 2.0 * kd
    for p in parameters:
        p.grad = None
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    for got, parameter in zip(grads, parameters):
        torch.testing.assert_close(got, parameter.grad, rtol=1e-9, atol=1e-12)
    assert aligners["stage3"].align.conv2.weight.grad.abs().sum() > 0


def test_stage_taps_give_channel_alignment_the_distillers_features_and_loss():
    teacher = ResNet(TorchvisionBasicBlock, widths=(8, 12, 16), blocks=2)
    student = ResNet(TorchvisionBasicBlock, seed=1)
    names = ("stage0", "stage1", "stage2")
    pairs = {n: {"student": {"path": f"taps.{n}"}, "teacher": {"path": f"taps.{n}"},
                 "aligner": {"path": f"aligners.{n}"}} for n in names}
    distillation = box(
        teacher, student, {"taps": "stages"},
        {"taps": "stages", "aligners": {n: {"t_channels": c} for n, c in zip(names, (8, 12, 16))}},
        [f"taps.{n}" for n in names], [f"taps.{n}" for n in names] + [f"aligners.{n}" for n in names],
        {"align": term("ofdkern.ChannelAlignLoss", 1e-2, feature_pairs=pairs)})
    wrapper = distillation.student_model
    assert wrapper.resolved_taps == {n: Tap(f"layer{i + 1}.0", bn=f"layer{i + 1}.0.bn2") for i, n in enumerate(names)}
    distiller = ChannelAlignDistiller(teacher, student, alpha=1e-2)
    for aligner, name in zip(distiller.aligners, names):
        aligner.load_state_dict(wrapper.aligners[name].align.state_dict())
    state = copy.deepcopy(student.state_dict())
    x = images()
    loss = distillation.forward_process(x, LABELS)
    student.load_state_dict(state)
    torch.testing.assert_close(loss, distiller(x)[1], rtol=1e-12, atol=0)


def test_frskd_in_a_training_box_equals_the_distiller():
    # Self-distillation: the self-teacher lives in the student's wrapper; no teacher model at all.
    from torchdistill.core.training import TrainingBox

    student = ResNet(TorchvisionBasicBlock, seed=1)
    names = ("stage0", "stage1", "stage2")
    own = {"from": "student"}
    hooks = [f"{kind}.{n}" for n in names for kind in ("taps", "refined")] + ["self_teacher_logits"]
    cross_entropy = {"criterion": {"key": "CrossEntropyLoss", "kwargs": {}}, "weight": 1.0, "criterion_wrapper": {
        "key": "SimpleLossWrapper", "kwargs": {"input": {"is_from_teacher": False, "module_path": "PATH",
                                                         "io": "output"}, "target": {"uses_label": True}}}}
    sub_terms = {
        "ce": copy.deepcopy(cross_entropy), "ce_self_teacher": copy.deepcopy(cross_entropy),
        "kd": term("ofdkern.KDLoss", 2.0, teacher={"path": "self_teacher_logits", **own}),
        "at": term("ofdkern.ATLoss", 100.0, feature_pairs={
            n: {"student": {"path": f"taps.{n}"}, "teacher": {"path": f"refined.{n}", **own}} for n in names})}
    sub_terms["ce"]["criterion_wrapper"]["kwargs"]["input"]["module_path"] = "."
    sub_terms["ce_self_teacher"]["criterion_wrapper"]["kwargs"]["input"]["module_path"] = "self_teacher_logits"
    wrapper_kwargs = {"taps": "stages", "self_teacher": {"num_classes": 5, "width": 1, "depth": 1}}
    train_config = {"num_epochs": 1, "model": {
        "forward_proc": "forward_batch_only", "forward_hook": {"input": [], "output": hooks},
        "auxiliary_model_wrapper": {"key": plugin.WRAPPER_KEY, "kwargs": wrapper_kwargs}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}}}
    training = TrainingBox(student, {}, train_config, torch.device("cpu"), None, False, 1)
    wrapper = training.model

    frskd = FRSKDDistiller(student, width=1, depth=1)
    frskd.self_teacher.load_state_dict(wrapper.self_teacher.state_dict())
    state = copy.deepcopy(wrapper.state_dict())
    x = images()
    loss = training.forward_process(x, LABELS)
    wrapper.load_state_dict(state)
    logits, teacher_logits, distill = frskd(x)
    expected = F.cross_entropy(logits, LABELS) + F.cross_entropy(teacher_logits, LABELS) + distill
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_bad_configurations_are_named():
    model = ResNet(TorchvisionBasicBlock)
    with pytest.raises(ValueError, match=r"connectors names \['layer9'\] are not taps"):
        plugin.FeatureTaps(student_model=model, taps={"layer1": "layer1"}, connectors={"layer9": 8})
    with pytest.raises(ValueError, match="tap names must be non-empty strings without dots"):
        plugin.FeatureTaps(student_model=model, taps={"layer.1": "layer1"})
    with pytest.raises(ValueError, match="pass teacher_model or student_model"):
        plugin.FeatureTaps(taps={"layer1": "layer1"})
    with pytest.raises(ValueError, match=r"the channels of tap 'fc' are unknown"):
        plugin.FeatureTaps(student_model=model, taps={"fc": "fc"}, connectors={"fc": 8})
    with pytest.raises(ValueError, match=r"feature_pairs\['a'\] needs a 'margin' entry"):
        plugin.OFDFeatureLoss({"a": {"student": {"path": "s"}, "teacher": {"path": "t"}}})
    loss = plugin.AttentionTransferLoss({"a": {"student": {"path": "taps.a"}, "teacher": {"path": "taps.a"}}})
    with pytest.raises(KeyError, match=r"the student I/O dict holds no 'output' of 'taps.a'"):
        loss({}, {})


def test_resnet34_to_resnet18_example_runs_a_short_setting():
    pytest.importorskip("sklearn")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "torchdistill", "distill_digits.py")
    run = subprocess.run([sys.executable, script, "--teacher-epochs", "1", "--epochs", "1", "--train-images", "96",
                          "--size", "32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"ofd loss ([\d.e+-]+)", run.stdout)]
    assert losses and all(v > 0 for v in losses), run.stdout
    assert re.search(r"student \(resnet18 \+ OFD\) test accuracy [\d.]+ %", run.stdout), run.stdout
