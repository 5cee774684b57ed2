"""The distillers: wire a teacher and a student (or a model and its self-teacher) together for one method each.

* ``OFDDistiller`` (Heo et al., ICCV 2019): pre-ReLU features of both networks at the end of every stage, the
  student's through a connector, margin ReLU + partial L2.
* ``ChannelAlignDistiller`` (Liu et al., ICCVW 2023): stage outputs of both networks, the student's through a
  per-pixel MLP, L2 — any activation.
* ``FRSKDDistiller`` (Ji et al., CVPR 2021): a self-teacher built on the model's stage outputs.

Each ``forward(*inputs, **kwargs)`` passes the inputs to the model(s) unchanged and returns what the student
returns plus the distillation loss, so a detection model's ``(images, targets)`` gives ``(loss_dict,
distill_loss)`` in training. Where the features are read is ``ofdkern.taps``' business: located by structure on the
first forward, which must run eagerly (or at construction with ``example_input``); afterwards a whole training
step compiles with ``torch.compile``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._backends import check_backend_name
from ._validation import check_non_negative_number, check_positive_int, check_positive_number
from .frskd import SelfTeacher
from .margins import DataMarginEstimator, batch_norm_channels, margin_as_vector, margin_from_bn
from .modules import ChannelAlign, Connector, OFDLoss
from .ops import attention_transfer_loss, kd_loss
from .taps import HookedTaps, eval_mode, resolve_stages, resolve_taps, tap_channels

__all__ = ["ChannelAlignDistiller", "FRSKDDistiller", "OFDDistiller"]

REDUCTIONS = ("batchmean", "sum")


def _inputs(example_input) -> tuple:
    """The positional arguments an ``example_input`` stands for: a tensor is one input, a tuple the arguments."""
    return tuple(example_input) if isinstance(example_input, tuple) else (example_input,)


def _shapes(features) -> list[tuple[int, ...]]:
    return [tuple(f.shape) for f in features]


def _describe(source) -> str:
    taps = source.taps
    return repr(taps) if not isinstance(taps, list) else str([tap.module for tap in taps])


def _batch_size(features: Sequence[torch.Tensor]) -> int:
    """The batch of the features (a detection model batches its list of images itself); an empty batch's loss
    is 0, so it divides by 1 rather than 0."""
    return max(features[0].shape[0], 1) if features else 1


def _check_models(**models) -> None:
    for role, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"{role} must be an nn.Module, got {type(model).__name__}")


def _factory(model: nn.Module) -> dict:
    parameter = next(model.parameters(), torch.empty(0))
    return {"device": parameter.device, "dtype": parameter.dtype}


def _stage_channels(model, source, example_input, role) -> list[int]:
    """The channel count of every tapped feature: from the structure where it tells (``tap_channels``), else
    measured on ``example_input``."""
    if isinstance(source, HookedTaps):
        known = [tap_channels(model, tap) for tap in source.taps]
        if all(c is not None for c in known):
            return known
    if example_input is None:
        raise ValueError(f"the channel count of some {role} taps is unknown (no BN or convolution to read it "
                         f"from): pass example_input, an input batch to run once")
    with torch.no_grad(), eval_mode(model):
        features, _ = source.run(model, *_inputs(example_input))
    return [f.shape[1] for f in features]


class _TeacherStudent(nn.Module):
    """What the teacher-student distillers share: both models' stage features from one forward, and the stage
    count checked."""

    @property
    def teacher_taps(self):
        """The teacher's taps: ``Tap``s / ``BlockTap``s (a ``BlockTap`` becomes the ``Tap`` that reads it after the
        first forward), or the model convention / callable."""
        return self._teacher_source.taps

    @property
    def student_taps(self):
        return self._student_source.taps

    def _features(self, *args, **kwargs):
        with torch.no_grad():
            teacher_features, _ = self._teacher_source.run(self.teacher, *args, **kwargs)
        student_features, output = self._student_source.run(self.student, *args, **kwargs)
        return teacher_features, student_features, output

    def _stage_shapes(self, teacher_features, student_features):
        """(teacher shape, student shape) per stage, and their description for an error; raises unless both
        sides have ``num_stages`` stages."""
        teacher_shapes, student_shapes = _shapes(teacher_features), _shapes(student_features)
        found = f"teacher stage shapes {teacher_shapes}, student stage shapes {student_shapes}"
        if len(teacher_shapes) != self.num_stages or len(student_shapes) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stages on both sides, got {found}")
        return list(zip(teacher_shapes, student_shapes)), found


class OFDDistiller(_TeacherStudent):
    """Teacher/student wiring of OFD: ``forward(*inputs)`` returns ``(student_output, distill_loss)``; train with
    ``task_loss(student_output, y) + distill_loss`` (a detection model in training returns its loss dict).

    ``distill_loss = alpha * sum_i w_i * ofd_loss(connector_i(s_i), t_i, margin_i) / batch_size`` with stage
    weights ``w_i = 1 / 2**(K-1-i)`` (the deepest stage weighs 1), as the reference distiller and training script.
    ``reduction="sum", alpha=1`` gives the reference ``Distiller``'s own output, the raw weighted stage sum, for a
    training script that scales it itself.

    Args:
        teacher: the trained teacher. Frozen here (``requires_grad_(False)``); its features are computed without
            autograd.
        student: the network to train.
        teacher_taps, student_taps: None (automatic, see ``ofdkern.find_taps``: ResNets and RegNets of
            torchvision and timm, zero-initialized residuals included, with BatchNorms or frozen BatchNorms, also
            as the backbones of detection and segmentation models; MobileNetV2), a sequence of module names or ``Tap``
            objects (a name of a recognized block or stage taps its pre-ReLU feature; another name taps the
            module's output), a model convention (``"extract_feature"``: the official OFD models'
            ``extract_feature(x, preReLU=True)``; ``"preact_feats"``: mdistiller's ``forward`` returning
            ``(logits, feats)``, whose last ``len(get_bn_before_relu())`` ``feats["preact_feats"]`` are the
            stages), or a callable ``(model, *inputs) -> (features, output)``. Both sides need as many stages, and
            each stage pair the same batch and spatial size. A tap that reads a ReLU's result is refused (OFD
            needs pre-ReLU features); so are networks without ReLUs (SiLU, hard-swish, GELU): OFD's margin ReLU
            is defined for ReLU networks, use ``ChannelAlignDistiller`` there.
        alpha: loss weight, a finite number >= 0. Default 1e-4, the reference's ImageNet value; it used 1e-3 on
            CIFAR (32x32) and 1e-5 for detection / segmentation.
        margin: "bn" (``margin_from_bn`` of each teacher tap's BN, or of the model convention's
            ``get_bn_before_relu()``), "data" (measured by ``calibrate``, required before the first forward), or
            a sequence of per-stage margins of shape (C,), (1, C, 1, 1) or (C, 1, 1).
        teacher_bn_train: the teacher's BatchNorms use batch statistics while the distiller trains (the reference
            does this; the teacher's running statistics then keep updating). Its other modules (dropout) stay in
            eval mode. False: the whole teacher runs in eval mode.
        connector: "conv_bn" (``ofdkern.Connector``: 1x1 conv + BN), "none" (identity; channels must match) or a
            callable ``(student_channels, teacher_channels) -> nn.Module``.
        reduction: "batchmean" (divide the weighted sum by the batch size, as the reference training script) or
            "sum" (the reference ``Distiller``'s raw weighted sum, times ``alpha``).
        backend: ofd_loss backend ("auto" picks the fused kernel for the features' device).
        example_input: an input batch to run once now (in eval mode, without autograd): it checks the taps
            (needed before ``torch.compile``), reads the tapped channel counts and checks the shapes. Needed
            when a tap has no BN to read its channels from. A tuple is the models' positional arguments.

    The margins are buffers of ``losses[i]`` (saved by ``state_dict``), on the teacher's device; the connectors
    are ``connectors[i]``, created with the student's device and dtype. Move the distiller as a whole
    (``.to(device)``) and give the optimizer ``distiller.parameters()``
    (the student's and the connectors'; the teacher's are frozen). Under DistributedDataParallel wrap the
    distiller itself; under FSDP2 shard the student (and connectors): only their parameters require gradients.
    Not for ``nn.DataParallel`` replicas sharing one teacher.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_taps=None, student_taps=None, *,
                 alpha: float = 1e-4, margin="bn", teacher_bn_train: bool = True, connector="conv_bn",
                 reduction: str = "batchmean", backend: str = "auto", example_input: torch.Tensor | None = None):
        super().__init__()
        _check_models(teacher=teacher, student=student)
        if not isinstance(teacher_bn_train, bool):
            raise TypeError(f"teacher_bn_train must be a bool, got {teacher_bn_train!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.alpha = check_non_negative_number("alpha", alpha)
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.teacher_bn_train = teacher_bn_train
        self.reduction = reduction
        self._teacher_source = resolve_taps(teacher, teacher_taps, "teacher")
        self._student_source = resolve_taps(student, student_taps, "student")

        teacher_channels = self._channels(teacher, self._teacher_source, example_input, "teacher")
        student_channels = self._channels(student, self._student_source, example_input, "student")
        if len(teacher_channels) != len(student_channels):
            raise ValueError(
                f"the teacher has {len(teacher_channels)} tapped stages and the student {len(student_channels)} "
                f"(teacher taps {_describe(self._teacher_source)}, student taps "
                f"{_describe(self._student_source)}): pass teacher_taps / student_taps with as many stages")
        self.num_stages = len(teacher_channels)
        self.student_channels = student_channels
        self.margin_source = margin if isinstance(margin, str) else "given"
        margins = self._initial_margins(margin, teacher_channels)
        self.losses = nn.ModuleList(OFDLoss(m, reduction="sum", backend=backend) for m in margins)
        factory = _factory(student)
        self.connectors = nn.ModuleList(
            self._connector(connector, s, t, factory) for s, t in zip(student_channels, teacher_channels))
        self._margins_ready = self.margin_source != "data"
        self.register_load_state_dict_pre_hook(OFDDistiller._note_loaded_margins)
        if example_input is not None:
            with torch.no_grad(), eval_mode(self):
                self._check_shapes(*self._features(*_inputs(example_input))[:2])
        self.train()

    # -- construction helpers -------------------------------------------------------------------------------

    @staticmethod
    def _channels(model, source, example_input, role) -> list[int]:
        bns = source.bns(model)
        if bns is not None:
            return [batch_norm_channels(bn) for bn in bns]
        return _stage_channels(model, source, example_input, role)

    def _initial_margins(self, margin, teacher_channels) -> list[torch.Tensor]:
        if isinstance(margin, str):
            if margin == "bn":
                bns = self._teacher_source.bns(self.teacher)
                if bns is None:
                    raise ValueError('margin="bn" needs a BN for every teacher tap: name it with Tap(..., bn=...), '
                                     'use a model with get_bn_before_relu(), or use margin="data" or explicit '
                                     'margin tensors')
                return [margin_from_bn(bn) for bn in bns]
            if margin == "data":
                # NaN until calibrated: a checkpoint saved before calibrate() carries no usable margins.
                device = next(self.teacher.parameters(), torch.empty(0)).device
                return [torch.full((c,), math.nan, device=device) for c in teacher_channels]
            raise ValueError(f'margin must be "bn", "data" or a sequence of margin tensors, got {margin!r}')
        if isinstance(margin, torch.Tensor) or not isinstance(margin, Iterable):
            raise TypeError(f'margin must be "bn", "data" or a sequence of per-stage margin tensors, got '
                            f'{type(margin).__name__}')
        margins = [margin_as_vector(m) for m in margin]
        expected = [(c,) for c in teacher_channels]
        if [tuple(m.shape) for m in margins] != expected:
            raise ValueError(f"margin tensors must have {teacher_channels} channels per stage (teacher channels; "
                             f"shapes (C,), (1, C, 1, 1) or (C, 1, 1)), got {[m.numel() for m in margins]}")
        return margins

    @staticmethod
    def _connector(kind, student_channels: int, teacher_channels: int, factory: dict) -> nn.Module:
        if kind == "conv_bn":
            return Connector(student_channels, teacher_channels, **factory)
        if kind == "none":
            if student_channels != teacher_channels:
                raise ValueError(f'connector="none" needs equal channels, got student {student_channels} and '
                                 f'teacher {teacher_channels}')
            return nn.Identity()
        if callable(kind):
            return kind(student_channels, teacher_channels)
        raise ValueError(f'connector must be "conv_bn", "none" or a callable, got {kind!r}')

    # -- modes, taps, margins --------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "OFDDistiller":
        super().train(mode)
        self.teacher.eval()
        if mode and self.teacher_bn_train:
            for module in self.teacher.modules():
                if isinstance(module, _BatchNorm):
                    module.train()
        return self

    @staticmethod
    def _note_loaded_margins(module: "OFDDistiller", state_dict, prefix, *_args) -> None:
        """Margins are ready after a load only if it carries every stage's margin, all calibrated (finite)."""
        keys = [f"{prefix}losses.{stage}.margin" for stage in range(module.num_stages)]
        if all(key in state_dict for key in keys):
            module._margins_ready = all(bool(torch.isfinite(state_dict[key]).all()) for key in keys)

    @property
    def stage_weights(self) -> list[float]:
        return [1.0 / 2 ** (self.num_stages - 1 - i) for i in range(self.num_stages)]

    @property
    def margins(self) -> list[torch.Tensor]:
        return [loss.margin for loss in self.losses]

    @torch.no_grad()
    def calibrate(self, batches: Iterable, max_batches: int | None = None) -> list[torch.Tensor]:
        """Set the margins to the mean negative teacher response per channel (``DataMarginEstimator``) over
        ``batches``: input tensors, or tuples / lists whose first item is the input (a DataLoader). The teacher
        runs in its current mode: call it after ``train()`` to measure the features training sees (batch
        statistics when ``teacher_bn_train``). Under torch.distributed the
        counts of every rank are summed, so all ranks get the margins of all their data. Returns the margins."""
        estimators = None
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            features, _ = self._teacher_source.run(self.teacher, inputs)
            if estimators is None:
                estimators = [DataMarginEstimator(f.shape[1], device=f.device) for f in features]
            for estimator, feature in zip(estimators, features):
                estimator.update(feature)
        if estimators is None:
            raise ValueError("calibrate got no batches")
        for estimator, loss in zip(estimators, self.losses):
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(estimator.negative_sum)
                dist.all_reduce(estimator.negative_count)
            loss.margin.copy_(estimator.margin)
        self._margins_ready = True
        return self.margins

    # -- forward ---------------------------------------------------------------------------------------------

    def _check_shapes(self, teacher_features, student_features) -> None:
        stages, found = self._stage_shapes(teacher_features, student_features)
        for stage, (t, s) in enumerate(stages):
            if len(t) != len(s) or t[0] != s[0] or t[2:] != s[2:]:
                raise ValueError(f"stage {stage}: teacher and student features must have the same batch and "
                                 f"spatial sizes, got {found}")
            if t[1] != self.losses[stage].num_channels or s[1] != self.student_channels[stage]:
                raise ValueError(
                    f"stage {stage}: expected {self.losses[stage].num_channels} teacher and "
                    f"{self.student_channels[stage]} student channels, got {found}")

    def forward(self, *args, **kwargs):
        if not self._margins_ready:
            raise RuntimeError('margin="data": call calibrate(batches) (or load a checkpoint that carries '
                               'calibrated margins) before training')
        teacher_features, student_features, output = self._features(*args, **kwargs)
        self._check_shapes(teacher_features, student_features)
        total = None
        for weight, connector, loss, s, t in zip(self.stage_weights, self.connectors, self.losses,
                                                 student_features, teacher_features):
            stage = weight * loss(connector(s), t)
            total = stage if total is None else total + stage
        batch = _batch_size(student_features) if self.reduction == "batchmean" else 1
        return output, total * (self.alpha / batch)

    def extra_repr(self) -> str:
        return (f"stages={self.num_stages}, alpha={self.alpha}, margin={self.margin_source!r}, "
                f"teacher_bn_train={self.teacher_bn_train}, reduction={self.reduction!r}")


def _resized_to(student: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The student feature at the teacher feature's spatial size: average-pooled where it is larger in every
    dimension, bilinearly interpolated otherwise."""
    if tuple(student.shape[2:]) == tuple(size):
        return student
    if all(s >= t for s, t in zip(student.shape[2:], size)):
        return F.adaptive_avg_pool2d(student, tuple(size))
    return F.interpolate(student, size=tuple(size), mode="bilinear", align_corners=False)


class ChannelAlignDistiller(_TeacherStudent):
    """Channel-wise transformation distillation (Liu et al., ICCVW 2023) between a teacher and a student:
    ``forward(*inputs)`` returns ``(student_output, distill_loss)``; train with ``task_loss + distill_loss``.

    ``distill_loss = alpha * sum_i sum (MLP_i(s_i) - t_i)^2 / N``: every stage's student feature goes through its
    own per-pixel MLP (``ofdkern.ChannelAlign``: 1x1 conv to ``hidden`` channels, ReLU, 1x1 conv to the teacher's
    channels), then plain L2 against the raw teacher feature, computed by the fused ``channel_align_loss`` (the
    projected student never materializes). Unlike OFD it needs no ReLU: it distils SiLU, hard-swish and GELU
    networks (EfficientNet, MobileNetV3, ConvNeXt) as well as ResNets.

    Where the paper is silent, this class chooses:

    * **stages**: the stage outputs ``ofdkern.find_stages`` finds (a timm model's ``feature_info`` from a
      reduction of 4 on; the last ResNet / RegNet / MobileNetV2 block of every stage; a ``features``
      Sequential's stages), every stage weighing 1, after the stage's activation: the features the next stage
      receives;
    * **spatial mismatch**: the student feature is brought to the teacher's size before the MLP (average pooling
      where it is larger, bilinear interpolation otherwise); batches must match;
    * **normalization**: none — the raw teacher feature and the sum over elements divided by the batch size
      (``reduction="batchmean"``), the paper's ``sum (MLP(F_s) - F_t)^2 / N``; ``"sum"`` leaves out the division;
    * **teacher mode**: eval (its BNs use their running statistics), without autograd;
    * **alpha** defaults to 1e-4, the scale of OFD's ImageNet weight for a loss of the same form (a sum of
      squares over the feature maps per sample); tune it per task.

    Args:
        teacher: the trained teacher; frozen here.
        student: the network to train.
        teacher_taps, student_taps: None (``find_stages``), a sequence of module names (their outputs) or
            ``ofdkern.Tap`` objects, or a callable ``(model, *inputs) -> (features, output)``. Both sides need as
            many stages.
        alpha: the loss weight, a finite number >= 0.
        hidden: the MLP's hidden width: None (each stage's teacher channels, the paper's) or a positive int.
        reduction: "batchmean" or "sum".
        backend: the ``channel_align_loss`` backend.
        example_input: an input batch to run once now (eval mode, no autograd): checks the taps (needed before
            ``torch.compile``), measures channel counts the structure does not tell, checks the shapes. A tuple
            is the models' positional arguments.

    The aligners are ``aligners[i]`` (saved by ``state_dict``), created with the student's device and dtype; give
    the optimizer ``distiller.parameters()``. Under DistributedDataParallel wrap the distiller itself.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_taps=None, student_taps=None, *,
                 alpha: float = 1e-4, hidden: int | None = None, reduction: str = "batchmean",
                 backend: str = "auto", example_input=None):
        super().__init__()
        _check_models(teacher=teacher, student=student)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_backend_name(backend)
        self.alpha = check_non_negative_number("alpha", alpha)
        if hidden is not None:
            hidden = check_positive_int("hidden", hidden)
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.reduction = reduction
        self._teacher_source = resolve_stages(teacher, teacher_taps, "teacher")
        self._student_source = resolve_stages(student, student_taps, "student")
        teacher_channels = _stage_channels(teacher, self._teacher_source, example_input, "teacher")
        student_channels = _stage_channels(student, self._student_source, example_input, "student")
        if len(teacher_channels) != len(student_channels):
            raise ValueError(
                f"the teacher has {len(teacher_channels)} stages and the student {len(student_channels)} (teacher "
                f"taps {_describe(self._teacher_source)}, student taps {_describe(self._student_source)}): pass "
                f"teacher_taps / student_taps with as many stages")
        self.num_stages = len(teacher_channels)
        self.teacher_channels, self.student_channels = teacher_channels, student_channels
        factory = _factory(student)
        self.aligners = nn.ModuleList(ChannelAlign(s, t, hidden, reduction="sum", backend=backend, **factory)
                                      for s, t in zip(student_channels, teacher_channels))
        if example_input is not None:
            with torch.no_grad(), eval_mode(self):
                self._check_shapes(*self._features(*_inputs(example_input))[:2])
        self.train()

    def train(self, mode: bool = True) -> "ChannelAlignDistiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def _check_shapes(self, teacher_features, student_features) -> None:
        stages, found = self._stage_shapes(teacher_features, student_features)
        for stage, (t, s) in enumerate(stages):
            if len(t) != 4 or len(s) != 4 or t[0] != s[0]:
                raise ValueError(f"stage {stage}: teacher and student features must be (N, C, H, W) with the same "
                                 f"batch, got {found}")
            if t[1] != self.teacher_channels[stage] or s[1] != self.student_channels[stage]:
                raise ValueError(f"stage {stage}: expected {self.teacher_channels[stage]} teacher and "
                                 f"{self.student_channels[stage]} student channels, got {found}: pass "
                                 f"example_input to measure them")

    def forward(self, *args, **kwargs):
        teacher_features, student_features, output = self._features(*args, **kwargs)
        self._check_shapes(teacher_features, student_features)
        total = None
        for aligner, s, t in zip(self.aligners, student_features, teacher_features):
            stage = aligner(_resized_to(s, t.shape[2:]), t)
            total = stage if total is None else total + stage
        batch = _batch_size(student_features) if self.reduction == "batchmean" else 1
        return output, total * (self.alpha / batch)

    def extra_repr(self) -> str:
        return f"stages={self.num_stages}, alpha={self.alpha}, reduction={self.reduction!r}"



def _num_classes(model: nn.Module) -> int | None:
    """The classes of a classifier: timm's ``num_classes``, else the output features of its last Linear."""
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0:
        return classes
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class FRSKDDistiller(nn.Module):
    """FRSKD (Ji et al., CVPR 2021): a classifier and the self-teacher built on its stage features.

    In training, ``forward(*inputs)`` returns ``(logits, self_teacher_logits, distill_loss)`` with
    ``distill_loss = alpha * KD(logits, self_teacher_logits) + beta * sum_i AT(F_i, T_i)``: soft-label KD at
    ``temperature`` and attention transfer between the model's stage features F_i and the self-teacher's refined
    T_i, both with the self-teacher's side detached (the distillation terms update only the classifier). Add the
    cross-entropy of both logits, as the paper does::

        logits, teacher_logits, distill_loss = frskd(x)
        loss = F.cross_entropy(logits, y) + F.cross_entropy(teacher_logits, y) + distill_loss

    In eval mode ``forward`` returns the model's own output, unchanged: the self-teacher is for training only.

    Args:
        model: the classifier to train; its output in training must be the logits tensor.
        num_classes: the self-teacher's classes; None: the model's (timm's ``num_classes``, else the output
            features of its last ``nn.Linear``).
        alpha, beta, temperature: the KD weight (2), the attention-transfer weight (100) and the KD temperature
            (4), the paper's CIFAR-100 values.
        width, depth: the self-teacher's channel multiplier and depthwise-separable units per node
            (``ofdkern.SelfTeacher``).
        taps: the stage features: None (``ofdkern.find_stages``: a timm model's ``feature_info`` from a
            reduction of 4 on, the last ResNet / RegNet / MobileNetV2 block of every stage, a ``features``
            Sequential's stages), module names (their outputs), ``ofdkern.Tap`` objects or a callable
            ``(model, *inputs) -> (features, output)``. At least two, each half the spatial size of the one
            before (the self-teacher's bottom-up path).
        backend: the backend of the fused KD and attention-transfer losses.
        example_input: an input batch to run once now (eval mode, no autograd): checks the taps, measures channel
            counts the structure does not tell. A tuple is the model's positional arguments.

    The self-teacher is ``self_teacher`` (saved by ``state_dict``), created with the model's device and dtype;
    give the optimizer ``distiller.parameters()``.
    """

    def __init__(self, model: nn.Module, *, num_classes: int | None = None, alpha: float = 2.0, beta: float = 100.0,
                 temperature: float = 4.0, width: int = 2, depth: int = 2, taps=None, backend: str = "auto",
                 example_input=None):
        super().__init__()
        _check_models(model=model)
        self.alpha = check_non_negative_number("alpha", alpha)
        self.beta = check_non_negative_number("beta", beta)
        self.temperature = check_positive_number("temperature", temperature)
        check_backend_name(backend)
        self.backend = backend
        if num_classes is None:
            num_classes = _num_classes(model)
            if num_classes is None:
                raise ValueError(f"the classes of {type(model).__name__} are unknown (no num_classes attribute, no "
                                 f"nn.Linear): pass num_classes")
        self.model = model
        self._source = resolve_stages(model, taps, "model")
        channels = _stage_channels(model, self._source, example_input, "model")
        self.self_teacher = SelfTeacher(channels, num_classes, width=width, depth=depth).to(**_factory(model))
        if example_input is not None:
            with torch.no_grad(), eval_mode(self):
                features, _ = self._source.run(model, *_inputs(example_input))
                self.self_teacher(features)  # checks the stage count, channels and spatial sizes
        self.train()

    @property
    def taps(self):
        return self._source.taps

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.model(*args, **kwargs)
        features, logits = self._source.run(self.model, *args, **kwargs)
        classes = self.self_teacher.fc.out_features
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != classes:
            raise ValueError(f"FRSKDDistiller needs the model to return (N, {classes}) logits (num_classes of the "
                             f"self-teacher), got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        refined, teacher_logits = self.self_teacher(features)
        distill = self.alpha * kd_loss(logits, teacher_logits.detach(), temperature=self.temperature,
                                       backend=self.backend)
        for feature, target in zip(features, refined):
            distill = distill + self.beta * attention_transfer_loss(feature, target.detach(), backend=self.backend)
        return logits, teacher_logits, distill

    def extra_repr(self) -> str:
        return (f"stages={len(self.self_teacher.channels)}, alpha={self.alpha}, beta={self.beta}, "
                f"temperature={self.temperature}")
