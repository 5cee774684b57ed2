"""torchdistill plug-in: ofdkern's fused losses and in-place-safe feature taps in torchdistill's registries.

Importing this module (torchdistill is an optional dependency of ofdkern) registers:

* the auxiliary model wrapper ``"ofdkern.FeatureTaps"`` (``FeatureTaps``), for the teacher and the student;
* the mid-level losses ``"ofdkern.OFDLoss"`` (``OFDFeatureLoss``), ``"ofdkern.ChannelAlignLoss"``
  (``ChannelAlignFeatureLoss``), ``"ofdkern.ATLoss"`` (``AttentionTransferLoss``) and ``"ofdkern.KDLoss"``
  (``SoftTargetKDLoss``), each computed by the fused op of the same name (``ofdkern.ofd_loss``, ...).

Why a wrapper: torchdistill's forward hooks keep a reference to a module's input or output without copying it, so
an in-place op later in the forward overwrites what they recorded: the input of torchvision's in-place ``relu``
(the pre-ReLU sum, which no torchvision module outputs), the output of a BN followed by
``nn.ReLU(inplace=True)``. ``FeatureTaps`` reads its features with ``ofdkern.taps`` (a stage or block name
taps the block's pre-ReLU feature, located and checked on the first forward; any other module its output; a
tensor that is overwritten later is copied) and passes each feature through an identity module
``taps.<name>``, whose output torchdistill's hooks then record unchanged. What needs the models lives in the
wrapper too: the student's connectors (``connectors.<name>``), channel aligners (``aligners.<name>``) and FRSKD
self-teacher (``refined.<name>``, ``self_teacher_logits``), whose parameters reach torchdistill's optimizer only
as submodules of the student model, and the teacher's margins (``margins.<name>``), read from its BNs or measured
on its features. The losses find everything by module path in the I/O dicts, like torchdistill's own (an entry
with ``"from": "student"`` reads the student's, for self-distillation).

A configuration (see ``examples/torchdistill/``)::

    teacher:
      auxiliary_model_wrapper:
        key: 'ofdkern.FeatureTaps'
        kwargs:
          taps: {layer3: 'layer3', layer4: 'layer4'}      # the last block's pre-ReLU sum
          margins: {layer3: 'bn', layer4: 'bn'}           # 'bn', a BN's module path, or 'data'
      forward_hook:
        output: ['taps.layer3', 'taps.layer4', 'margins.layer3', 'margins.layer4']
    student:
      auxiliary_model_wrapper:
        key: 'ofdkern.FeatureTaps'
        kwargs:
          taps: {layer3: 'layer3', layer4: 'layer4'}
          connectors: {layer3: 256, layer4: 512}          # teacher channels
      forward_hook:
        output: ['connectors.layer3', 'connectors.layer4']
    criterion:
      key: 'WeightedSumLoss'
      kwargs:
        sub_terms:
          ofd:
            criterion:
              key: 'ofdkern.OFDLoss'
              kwargs:
                feature_pairs:
                  layer3: {student: {path: 'connectors.layer3'}, teacher: {path: 'taps.layer3'},
                           margin: {path: 'margins.layer3'}}
                  layer4: {student: {path: 'connectors.layer4'}, teacher: {path: 'taps.layer4'},
                           margin: {path: 'margins.layer4'}}
            weight: 1.0e-4                                # alpha
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from torchdistill.losses.registry import register_mid_level_loss
    from torchdistill.models.registry import register_auxiliary_model_wrapper
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
except ImportError as error:  # pragma: no cover - exercised only without torchdistill
    raise ImportError("ofdkern.integrations.torchdistill needs torchdistill: pip install torchdistill") from error

from ..margins import DataMarginEstimator, margin_from_bn
from ..frskd import SelfTeacher
from ..modules import ChannelAlign, Connector
from ..ops import attention_transfer_loss, channel_align_loss, cwd_loss, kd_loss, ofd_loss
from ..taps import HookedTaps, Tap, find_stages, tap_channels, tap_from_name

__all__ = ["AttentionTransferLoss", "ChannelAlignFeatureLoss", "ChannelWiseDistillationLoss", "FeatureTaps",
           "LOSS_KEYS", "OFDFeatureLoss", "SoftTargetKDLoss", "WRAPPER_KEY"]

WRAPPER_KEY = "ofdkern.FeatureTaps"
LOSS_KEYS = ("ofdkern.OFDLoss", "ofdkern.ChannelAlignLoss", "ofdkern.ATLoss", "ofdkern.KDLoss", "ofdkern.CWDLoss")


# -- the wrapper -----------------------------------------------------------------------------------------------

class _FixedMargin(nn.Module):
    """A margin computed once (from a BN); its forward returns it, so torchdistill's hooks record it."""

    margin: torch.Tensor

    def __init__(self, margin: torch.Tensor):
        super().__init__()
        self.register_buffer("margin", margin)

    def forward(self, _feature: torch.Tensor) -> torch.Tensor:
        return self.margin


class _DataMargin(DataMarginEstimator):
    """The running mean of the negative values of every teacher feature seen so far; returns the estimate."""

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        self.update(feature)
        return self.margin


class _AlignerWeights(nn.Module):
    """An ``ofdkern.ChannelAlign`` of the student; its forward returns the MLP's (w1, b1, w2, b2) for the loss,
    which runs the fused op with the teacher feature."""

    def __init__(self, s_channels: int, t_channels: int, hidden: int | None = None, **factory):
        super().__init__()
        self.align = ChannelAlign(s_channels, t_channels, hidden, **factory)

    def forward(self) -> tuple[torch.Tensor, ...]:
        return (self.align.conv1.weight, self.align.conv1.bias, self.align.conv2.weight, self.align.conv2.bias)


def _as_tap(model: nn.Module, name: str, spec) -> Tap:
    if isinstance(spec, Tap):
        return spec
    if isinstance(spec, str):
        return tap_from_name(model, spec)
    if isinstance(spec, dict):
        tap = Tap(**spec)
        for path in (tap.module, tap.relu, tap.bn):
            if path is not None:
                model.get_submodule(path)
        return tap
    raise TypeError(f"taps[{name!r}] must be a module path or a mapping of ofdkern.Tap fields, got "
                    f"{type(spec).__name__}")


def _check_names(option: str, names, taps: dict) -> None:
    unknown = [name for name in names if name not in taps]
    if unknown:
        raise ValueError(f"{option} names {unknown} are not taps (taps: {list(taps)})")


@register_auxiliary_model_wrapper(key=WRAPPER_KEY)
class FeatureTaps(AuxiliaryModelWrapper):
    """torchdistill auxiliary model wrapper (key ``"ofdkern.FeatureTaps"``) that reads features with
    ``ofdkern.taps``' in-place-safe taps and exposes them, and what is built on them, as module outputs for
    torchdistill's forward hooks. ``forward(x)`` returns the model's output.

    Args:
        teacher_model / student_model: the wrapped model (torchdistill passes one of them).
        taps: ``{name: spec}``, in stage order. A spec is a module path (a stage or residual block: the last
            block's pre-ReLU feature, as ``OFDDistiller``'s names; any other module: its output) or a mapping of
            ``ofdkern.Tap`` fields. Or ``"stages"``: the stage outputs ``ofdkern.find_stages`` finds (what
            ``ChannelAlignDistiller`` and ``FRSKDDistiller`` read, any activation), named ``stage0``, ``stage1``,
            ... The feature is the output of ``taps.<name>``.
        margins: ``{name: source}`` for OFD's margin of a teacher tap: ``"bn"`` (``margin_from_bn`` of the tap's
            BN), the module path of a BN, or ``"data"`` (the running mean of the negative values of every
            feature the teacher has produced, updated at each forward). The margin is the output of
            ``margins.<name>``.
        connectors: ``{name: out_channels}`` or ``{name: {"out_channels": C, "in_channels": c}}``: an
            ``ofdkern.Connector`` (1x1 conv + BN) on a student tap, output of ``connectors.<name>``.
        aligners: ``{name: {"t_channels": C, "hidden": H, "in_channels": c}}`` (hidden and in_channels
            optional): an ``ofdkern.ChannelAlign`` MLP on a student tap for ``"ofdkern.ChannelAlignLoss"``; the
            output of ``aligners.<name>`` is its weights.
        self_teacher: ``{"num_classes": K, "width": 2, "depth": 2}`` (width and depth optional): FRSKD's
            ``ofdkern.SelfTeacher`` on the student's taps, in order; its refined features are the outputs of
            ``refined.<name>``, its logits the output of ``self_teacher_logits``. Self-distillation reads them from
            the student's I/O dict: give the losses' teacher entries ``"from": "student"`` (a ``TrainingBox``
            has no teacher).
        ``in_channels`` default to the channels the structure tells (``ofdkern.taps.tap_channels``: the tap's
        BN, a timm ``feature_info`` entry, the last convolution of the tapped module).

    Tap names must be valid module names (no dots).
    """

    def __init__(self, teacher_model: nn.Module | None = None, student_model: nn.Module | None = None, *,
                 taps: dict, margins: dict | None = None, connectors: dict | None = None,
                 aligners: dict | None = None, self_teacher: dict | None = None, **_torchdistill_kwargs):
        super().__init__()
        if (teacher_model is None) == (student_model is None):
            raise ValueError("FeatureTaps wraps one model: pass teacher_model or student_model")
        model = teacher_model if teacher_model is not None else student_model
        role = "teacher" if teacher_model is not None else "student"
        if taps == "stages":
            taps = {f"stage{index}": tap for index, tap in enumerate(find_stages(model))}
        if not isinstance(taps, dict) or not taps:
            raise ValueError(f"taps must be \"stages\" or a non-empty mapping of names to module paths, got "
                             f"{taps!r} (no stages found in {type(model).__name__} when \"stages\")")
        bad = [name for name in taps if not isinstance(name, str) or not name or "." in name]
        if bad:
            raise ValueError(f"tap names must be non-empty strings without dots, got {bad}")
        margins, connectors, aligners = dict(margins or {}), dict(connectors or {}), dict(aligners or {})
        for option, names in (("margins", margins), ("connectors", connectors), ("aligners", aligners)):
            _check_names(option, names, taps)
        self.model = model
        specs = {name: _as_tap(model, name, spec) for name, spec in taps.items()}
        self.tap_names = list(specs)
        self._source = HookedTaps(model, list(specs.values()), role, require_pre_relu=False)
        parameter = next(model.parameters(), torch.empty(0))
        factory = {"device": parameter.device, "dtype": parameter.dtype}

        def channels(name, given):
            if given is not None:
                return given
            known = tap_channels(model, specs[name])
            if known is None:
                raise ValueError(f"the channels of tap {name!r} are unknown (no BN or convolution at "
                                 f"{taps[name]!r}): give in_channels")
            return known

        self.taps = nn.ModuleDict({name: nn.Identity() for name in self.tap_names})
        self.margins = nn.ModuleDict()
        for name, source in margins.items():
            if source == "data":
                self.margins[name] = _DataMargin(channels(name, None), device=parameter.device)
            elif source == "bn" or isinstance(source, str):
                bn_path = specs[name].bn if source == "bn" else source
                if bn_path is None:
                    raise ValueError(f"margins[{name!r}] = 'bn': tap {name!r} has no BN; name one by module path")
                self.margins[name] = _FixedMargin(margin_from_bn(model.get_submodule(bn_path)))
            else:
                raise TypeError(f"margins[{name!r}] must be 'bn', a BN module path or 'data', got {source!r}")
        self.connectors = nn.ModuleDict()
        for name, config in connectors.items():
            config = {"out_channels": config} if not isinstance(config, dict) else dict(config)
            in_channels = channels(name, config.pop("in_channels", None))
            self.connectors[name] = Connector(in_channels, config.pop("out_channels"), **config, **factory)
        self.aligners = nn.ModuleDict()
        for name, config in aligners.items():
            config = dict(config)
            in_channels = channels(name, config.pop("in_channels", None))
            self.aligners[name] = _AlignerWeights(in_channels, config.pop("t_channels"), **config, **factory)
        self.self_teacher = None
        if self_teacher is not None:
            if not isinstance(self_teacher, dict) or "num_classes" not in self_teacher:
                raise ValueError(f"self_teacher must be a mapping with 'num_classes' (and 'width', 'depth'), got "
                                 f"{self_teacher!r}")
            stage_channels = [channels(name, None) for name in self.tap_names]
            self.self_teacher = SelfTeacher(stage_channels, **self_teacher).to(**factory)
            self.refined = nn.ModuleDict({name: nn.Identity() for name in self.tap_names})
            self.self_teacher_logits = nn.Identity()

    @property
    def resolved_taps(self) -> dict:
        """``{name: Tap}``: how each tap is read (a block's tap is resolved on the first forward)."""
        return dict(zip(self.tap_names, self._source.taps))

    def forward(self, x):
        features, output = self._source.run(self.model, x)
        for name, feature in zip(self.tap_names, features):
            self.taps[name](feature)
            if name in self.connectors:
                self.connectors[name](feature)
            if name in self.margins:
                self.margins[name](feature.detach())
            if name in self.aligners:
                self.aligners[name]()
        if self.self_teacher is not None:
            refined, logits = self.self_teacher(features)
            for name, feature in zip(self.tap_names, refined):
                self.refined[name](feature)
            self.self_teacher_logits(logits)
        return output


# -- the losses ------------------------------------------------------------------------------------------------

def _io_value(io_dicts: tuple[dict, dict], spec, role: str, loss: str):
    """The recorded value named by ``{"path": ..., "io": "output", "from": role}`` in one of the (student,
    teacher) torchdistill I/O dicts: the ``role``'s, or the one ``"from"`` names (``"student"`` for a teacher
    entry of self-distillation: FRSKD's self-teacher lives in the student's wrapper)."""
    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"{loss}: a {role} entry must be a mapping with 'path' (and 'io', default 'output'), got "
                         f"{spec!r}")
    path, io, side = spec["path"], spec.get("io", "output"), spec.get("from", role)
    if side not in ("student", "teacher"):
        raise ValueError(f"{loss}: a {role} entry's 'from' must be 'student' or 'teacher', got {side!r}")
    io_dict = io_dicts[0] if side == "student" else io_dicts[1]
    try:
        return io_dict[path][io]
    except KeyError:
        raise KeyError(f"{loss}: the {side} I/O dict holds no {io!r} of {path!r}: list {path!r} in the {side}'s "
                       f"forward_hook {io} paths") from None


def _pairs(feature_pairs, loss: str, required: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """The (name, config) pairs of a loss's ``feature_pairs``, each with 'student' and 'teacher' entries and the
    ``required`` ones (entry: what it is)."""
    if not isinstance(feature_pairs, dict) or not feature_pairs:
        raise ValueError(f"{loss}: feature_pairs must be a non-empty mapping of pair names to configs, got "
                         f"{feature_pairs!r}")
    for name, pair in feature_pairs.items():
        if not isinstance(pair, dict) or "student" not in pair or "teacher" not in pair:
            raise ValueError(f"{loss}: feature_pairs[{name!r}] needs 'student' and 'teacher' entries, got {pair!r}")
        for entry, what in (required or {}).items():
            if entry not in pair:
                raise ValueError(f"{loss}: feature_pairs[{name!r}] needs a {entry!r} entry ({what})")
    return list(feature_pairs.items())


def _batch_size(feature: torch.Tensor) -> int:
    return max(feature.shape[0], 1)  # an empty batch's loss is 0, not 0 / 0


@register_mid_level_loss(key="ofdkern.OFDLoss")
class OFDFeatureLoss(nn.Module):
    """OFD (Heo et al., ICCV 2019) over feature pairs: ``sum_i w_i * ofd_loss(s_i, t_i, m_i)``, divided by the
    batch size for ``reduction="batchmean"`` (the reference training script; its alpha is the sub-term weight)
    or not for ``"sum"`` (the reference ``Distiller``'s raw weighted sum).

    Args:
        feature_pairs: ``{name: {"student": {path, io}, "teacher": {path, io}, "margin": {path, io},
            "weight": w}}`` in stage order; student from the student I/O dict (a connector's output), teacher and
            margin from the teacher's (``FeatureTaps``' ``taps.<name>`` and ``margins.<name>``). ``weight``
            defaults to OFD's stage weight ``1 / 2**(K-1-i)``.
        reduction: "batchmean" or "sum".
        backend: the ``ofd_loss`` backend.

    The teacher features must be pre-ReLU: a teacher feature with no negative value on the first call (what
    torchdistill's own hooks record for torchvision's in-place ReLUs) is refused.
    """

    def __init__(self, feature_pairs: dict, reduction: str = "batchmean", backend: str = "auto", **_kwargs):
        super().__init__()
        self.pairs = _pairs(feature_pairs, "ofdkern.OFDLoss",
                            {"margin": "the teacher I/O dict path of FeatureTaps' margins.<name>"})
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"ofdkern.OFDLoss: reduction must be 'batchmean' or 'sum', got {reduction!r}")
        stages = len(self.pairs)
        self.weights = [float(pair.get("weight", 1.0 / 2 ** (stages - 1 - i)))
                        for i, (_, pair) in enumerate(self.pairs)]
        self.reduction, self.backend = reduction, backend
        self._checked = False

    def forward(self, student_io_dict, teacher_io_dict, *_args, **_kwargs):
        io_dicts = (student_io_dict, teacher_io_dict)
        total, batch = 0.0, 1
        for (name, pair), weight in zip(self.pairs, self.weights):
            student = _io_value(io_dicts, pair["student"], "student", "ofdkern.OFDLoss")
            teacher = _io_value(io_dicts, pair["teacher"], "teacher", "ofdkern.OFDLoss").detach()
            margin = _io_value(io_dicts, pair["margin"], "teacher", "ofdkern.OFDLoss").detach()
            if not self._checked and teacher.numel() and not bool((teacher < 0).any()):
                raise ValueError(
                    f"ofdkern.OFDLoss: teacher feature {pair['teacher']['path']!r} of pair {name!r} has no negative "
                    f"value: OFD needs pre-ReLU features. torchdistill's forward hooks keep references that "
                    f"in-place ReLUs overwrite: read the features through the {WRAPPER_KEY!r} wrapper's taps")
            total = total + weight * ofd_loss(student, teacher, margin, reduction="sum", backend=self.backend)
            batch = _batch_size(student)
        self._checked = True
        return total / batch if self.reduction == "batchmean" else total

    def __str__(self):
        return f"ofdkern.OFDLoss(pairs={[name for name, _ in self.pairs]}, weights={self.weights})"


@register_mid_level_loss(key="ofdkern.ChannelAlignLoss")
class ChannelAlignFeatureLoss(nn.Module):
    """Channel-wise alignment (Liu et al., ICCVW 2023) over feature pairs: ``sum_i w_i * channel_align_loss(s_i,
    t_i, *aligner_i weights, margin=m_i)``, the fused op (the projected student never materializes).

    Args:
        feature_pairs: ``{name: {"student": {path, io}, "teacher": {path, io}, "aligner": {path, io},
            "margin": {path, io}, "weight": w}}``: the raw student feature (``taps.<name>``) and the aligner's
            weights (``aligners.<name>``) from the student I/O dict, the teacher feature and the optional OFD
            margin (then margin ReLU + partial L2 instead of L2) from the teacher's. ``weight`` defaults to 1.
        reduction: "batchmean" (sum / N, the paper's), "sum" or "mean".
        backend: the ``channel_align_loss`` backend.
    """

    def __init__(self, feature_pairs: dict, reduction: str = "batchmean", backend: str = "auto", **_kwargs):
        super().__init__()
        self.pairs = _pairs(feature_pairs, "ofdkern.ChannelAlignLoss",
                            {"aligner": "the student I/O dict path of FeatureTaps' aligners.<name>"})
        self.reduction, self.backend = reduction, backend

    def forward(self, student_io_dict, teacher_io_dict, *_args, **_kwargs):
        io_dicts = (student_io_dict, teacher_io_dict)
        total = 0.0
        for _name, pair in self.pairs:
            student = _io_value(io_dicts, pair["student"], "student", "ofdkern.ChannelAlignLoss")
            weights = _io_value(io_dicts, pair["aligner"], "student", "ofdkern.ChannelAlignLoss")
            teacher = _io_value(io_dicts, pair["teacher"], "teacher", "ofdkern.ChannelAlignLoss").detach()
            margin = None
            if "margin" in pair:
                margin = _io_value(io_dicts, pair["margin"], "teacher", "ofdkern.ChannelAlignLoss").detach()
            total = total + float(pair.get("weight", 1.0)) * channel_align_loss(
                student, teacher, *weights, margin=margin, reduction=self.reduction, backend=self.backend)
        return total


class _FeaturePairLoss(nn.Module):
    """A fused loss summed over weighted (student, teacher) pairs that torchdistill's hooks recorded: the
    subclass names its registry ``key`` (for errors) and computes ``pair_loss`` (the teacher's side detached)."""

    key: str

    def __init__(self, feature_pairs: dict):
        super().__init__()
        self.pairs = _pairs(feature_pairs, self.key)

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_io_dict, teacher_io_dict, *_args, **_kwargs):
        io_dicts = (student_io_dict, teacher_io_dict)
        total = 0.0
        for _name, pair in self.pairs:
            student = _io_value(io_dicts, pair["student"], "student", self.key)
            teacher = _io_value(io_dicts, pair["teacher"], "teacher", self.key).detach()
            total = total + float(pair.get("weight", 1.0)) * self.pair_loss(student, teacher)
        return total


@register_mid_level_loss(key="ofdkern.ATLoss")
class AttentionTransferLoss(_FeaturePairLoss):
    """Attention transfer as in FRSKD over feature pairs: ``sum_i w_i * attention_transfer_loss(s_i, t_i)``,
    ``mean((AT(s) - AT(t))^2)`` with ``AT(f) = normalize(mean_c(f^p))``.

    Args:
        feature_pairs: ``{name: {"student": {path, io}, "teacher": {path, io}, "weight": w}}`` (weight
            default 1); the channel counts may differ.
        p: the exponent (2).
        reduction: "mean" (FRSKD's), "batchmean" or "sum".
        backend: the ``attention_transfer_loss`` backend.
    """

    key = "ofdkern.ATLoss"

    def __init__(self, feature_pairs: dict, p: float = 2, reduction: str = "mean", backend: str = "auto",
                 **_kwargs):
        super().__init__(feature_pairs)
        self.p, self.reduction, self.backend = p, reduction, backend

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return attention_transfer_loss(student, teacher, p=self.p, reduction=self.reduction, backend=self.backend)


@register_mid_level_loss(key="ofdkern.CWDLoss")
class ChannelWiseDistillationLoss(_FeaturePairLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021) over map pairs: ``sum_i w_i * cwd_loss(s_i, t_i)``, per
    channel ``T^2 * KL(softmax(t_c / T) || softmax(s_c / T))`` over positions, summed over channels and samples
    and divided by N * C (mmrazor's ``ChannelWiseDivergence``; its ``loss_weight`` is the pair's weight).

    Args:
        feature_pairs: ``{name: {"student": {path, io}, "teacher": {path, io}, "weight": w}}`` (weight
            default 1): logit maps (segmentation) or feature maps (an FPN level) of one shape per pair.
        temperature: T (mmrazor's tau; 1 in its segmentation and detection configs).
        reduction: "mean" (mmrazor's), "batchmean" or "sum".
        backend: the ``cwd_loss`` backend.
    """

    key = "ofdkern.CWDLoss"

    def __init__(self, feature_pairs: dict, temperature: float = 1.0, reduction: str = "mean",
                 backend: str = "auto", **_kwargs):
        super().__init__(feature_pairs)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return cwd_loss(student, teacher, temperature=self.temperature, reduction=self.reduction,
                        backend=self.backend)


@register_mid_level_loss(key="ofdkern.KDLoss")
class SoftTargetKDLoss(nn.Module):
    """Soft-label KD ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (``ofdkern.kd_loss``); add the cross-entropy as
    its own sub-term.

    Args:
        student, teacher: ``{path, io}`` of the logits; default the models' outputs (``{"path": "."}``).
        temperature: T (4, as FRSKD).
        reduction: "batchmean" (the reference), "sum", "mean" or "none".
        backend: the ``kd_loss`` backend.
    """

    def __init__(self, student: dict | None = None, teacher: dict | None = None, temperature: float = 4.0,
                 reduction: str = "batchmean", backend: str = "auto", **_kwargs):
        super().__init__()
        self.student = student or {"path": ".", "io": "output"}
        self.teacher = teacher or {"path": ".", "io": "output"}
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, student_io_dict, teacher_io_dict, *_args, **_kwargs):
        io_dicts = (student_io_dict, teacher_io_dict)
        student = _io_value(io_dicts, self.student, "student", "ofdkern.KDLoss")
        teacher = _io_value(io_dicts, self.teacher, "teacher", "ofdkern.KDLoss").detach()
        return kd_loss(student, teacher, temperature=self.temperature, reduction=self.reduction, backend=self.backend)
