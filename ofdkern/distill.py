"""OFD distiller: wires a frozen teacher and a student together (Heo et al., ICCV 2019).

The distiller taps pre-ReLU features of both networks at the end of every stage, maps the student's through a
connector to the teacher's channels, and sums the stage losses like the reference ``Distiller`` and its
training script: ``alpha * sum_i ofd_loss_i / 2**(K-1-i) / batch_size``.

Taps are found automatically on torchvision-style networks:

* ResNet / WideResNet / ResNeXt (``BasicBlock``, ``Bottleneck``): the residual sum before the block's final
  ReLU in the last block of every stage; its margin comes from the BN before the add (``bn2`` / ``bn3``).
* MobileNetV2 (``InvertedResidual``): the block's (linear) output in the last block of every resolution; its
  margin comes from the block's last BN.

Any other network names its taps (module names or ``Tap``s) or gives a callable that returns the features.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .margins import DataMarginEstimator, margin_from_bn
from .modules import Connector, OFDLoss

__all__ = ["OFDDistiller", "Tap", "find_taps"]

# A callable tap spec: model, input -> (list of stage features, model output).
FeatureFn = Callable[[nn.Module, torch.Tensor], tuple[Sequence[torch.Tensor], object]]


@dataclass(frozen=True)
class Tap:
    """Where one stage feature of a model is read.

    Attributes:
        module: name of a module (as in ``model.named_modules()``). Without ``relu`` the feature is its output.
        relu: name of a ReLU module called inside ``module``: the feature is that ReLU's input at its last call
            during ``module``'s forward (the residual sum of a ResNet block, whose one ``relu`` is called twice
            or three times). An in-place ReLU's input is copied before it is overwritten.
        bn: name of the BatchNorm whose output the feature is (or whose output is added to the shortcut): the
            source of ``margin="bn"``, and of the channel count.
    """

    module: str
    relu: str | None = None
    bn: str | None = None


def _is_residual_block(module: nn.Module) -> bool:
    """torchvision BasicBlock / Bottleneck structure: conv2 + bn2 and a ReLU module named ``relu``."""
    return (isinstance(getattr(module, "relu", None), nn.ReLU)
            and isinstance(getattr(module, "conv2", None), nn.Conv2d)
            and isinstance(getattr(module, "bn2", None), _BatchNorm))


def _is_inverted_residual(module: nn.Module) -> bool:
    """torchvision MobileNetV2 InvertedResidual structure: ``conv`` Sequential ending in a BN (linear output)."""
    body = getattr(module, "conv", None)
    return isinstance(body, nn.Sequential) and len(body) > 0 and isinstance(body[-1], _BatchNorm)


def _output_bn(module: nn.Module, name: str) -> str | None:
    """Name of the BN that produces ``module``'s output: itself, or the last entry of a Sequential, recursively."""
    if isinstance(module, _BatchNorm):
        return name
    if isinstance(module, nn.Sequential) and len(module) > 0:
        last = str(len(module) - 1)
        return _output_bn(module[-1], f"{name}.{last}" if name else last)
    return None


def _block_tap(module: nn.Module, name: str) -> Tap | None:
    """The pre-ReLU tap of a recognized block, else None."""
    if _is_residual_block(module):
        bn = "bn3" if isinstance(getattr(module, "bn3", None), _BatchNorm) else "bn2"
        return Tap(name, relu=f"{name}.relu", bn=f"{name}.{bn}")
    if _is_inverted_residual(module):
        return Tap(name, bn=f"{name}.conv.{len(module.conv) - 1}")
    return None


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and any(s != 1 for s in m.stride) for m in module.modules())


def find_taps(model: nn.Module) -> list[Tap]:
    """The automatic taps of ``model``: the last recognized block (ResNet BasicBlock / Bottleneck, MobileNetV2
    InvertedResidual) of every stage, in forward order. A stage ends where the next block downsamples (a strided
    conv) or sits in another container (``layer1`` .. ``layer4``). Returns [] when no block is recognized.

    Slice the result to drop stages, e.g. ``OFDDistiller(t, s, student_taps=find_taps(s)[1:])``.
    """
    blocks = []  # (name, module, parent name) in registration order, which is forward order for these nets
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue  # a block's own submodules are not blocks of the stage
        tap = _block_tap(module, name)
        if tap is not None:
            inside.append(name)
            blocks.append((tap, module, name.rpartition(".")[0]))
    taps = []
    for index, (tap, _module, parent) in enumerate(blocks):
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if following is None or following[2] != parent or _downsamples(following[1]):
            taps.append(tap)
    return taps


def _tap_from_name(model: nn.Module, name: str) -> Tap:
    module = model.get_submodule(name)  # raises AttributeError naming the missing piece
    return _block_tap(module, name) or Tap(name, bn=_output_bn(module, name))


def _resolve_taps(model: nn.Module, spec, role: str) -> list[Tap] | FeatureFn:
    if spec is None:
        taps = find_taps(model)
        if not taps:
            raise ValueError(
                f"no {role} taps found automatically in {type(model).__name__} (it recognizes torchvision-style "
                f"ResNet BasicBlock/Bottleneck and MobileNetV2 InvertedResidual blocks): pass {role}_taps as "
                f"module names, ofdkern.distill.Tap objects or a callable (model, x) -> (features, output)")
        return taps
    if callable(spec):
        return spec
    if isinstance(spec, (str, Tap)) or not isinstance(spec, Iterable):
        raise TypeError(f"{role}_taps must be None, a sequence of module names / Tap objects or a callable, "
                        f"got {type(spec).__name__}")
    taps = []
    for item in spec:
        if isinstance(item, str):
            taps.append(_tap_from_name(model, item))
        elif isinstance(item, Tap):
            for name in (item.module, item.relu, item.bn):
                if name is not None:
                    model.get_submodule(name)
            taps.append(item)
        else:
            raise TypeError(f"{role}_taps entries must be module names or Tap objects, got {type(item).__name__}")
    if not taps:
        raise ValueError(f"{role}_taps is empty")
    return taps


class _FeatureCapture:
    """Forward hooks that record the tapped features of one forward pass; removed on exit."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap]):
        self.taps = taps
        self.features: list[torch.Tensor | None] = [None] * len(taps)
        self._handles = []
        for index, tap in enumerate(taps):
            module = model.get_submodule(tap.module)
            if tap.relu is None:
                self._handles.append(module.register_forward_hook(functools.partial(self._keep_output, index)))
                continue
            # The ReLU's input is kept at every call; the block's end decides which call was the last.
            pending: list[torch.Tensor] = []
            self._handles += [
                module.register_forward_pre_hook(lambda _m, _args, pending=pending: pending.clear()),
                model.get_submodule(tap.relu).register_forward_pre_hook(
                    functools.partial(self._keep_relu_input, pending)),
                module.register_forward_hook(functools.partial(self._take_pending, index, pending)),
            ]

    def _keep_output(self, index, _module, _args, output):
        self.features[index] = output

    @staticmethod
    def _keep_relu_input(pending, relu, args):
        feature = args[0]
        pending[:] = [feature.clone() if getattr(relu, "inplace", False) else feature]

    def _take_pending(self, index, pending, _module, _args, _output):
        if not pending:
            raise RuntimeError(f"tap {self.taps[index]}: {self.taps[index].relu} was not called during the "
                               f"forward of {self.taps[index].module}")
        self.features[index] = pending.pop()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        for handle in self._handles:
            handle.remove()

    def result(self) -> list[torch.Tensor]:
        missing = [str(tap) for tap, feature in zip(self.taps, self.features) if feature is None]
        if missing:
            raise RuntimeError(f"these taps were not reached by the forward pass: {missing}")
        return self.features


def _run_tapped(model: nn.Module, taps, x: torch.Tensor):
    """(stage features, model output) of one forward pass."""
    if callable(taps):
        features, output = taps(model, x)
        return list(features), output
    with _FeatureCapture(model, taps) as capture:
        output = model(x)
    return capture.result(), output


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Runs ``module`` in eval mode (no BN statistics update), then restores every submodule's own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def _shapes(features) -> list[tuple[int, ...]]:
    return [tuple(f.shape) for f in features]


class OFDDistiller(nn.Module):
    """Teacher/student wiring of OFD: ``forward(x)`` returns ``(student_output, distill_loss)``; train with
    ``task_loss(student_output, y) + distill_loss``.

    ``distill_loss = alpha * sum_i w_i * ofd_loss(connector_i(s_i), t_i, margin_i) / batch_size`` with stage
    weights ``w_i = 1 / 2**(K-1-i)`` (the deepest stage weighs 1), as the reference distiller and training script.

    Args:
        teacher: the trained teacher. Frozen here (``requires_grad_(False)``); its features are computed without
            autograd.
        student: the network to train.
        teacher_taps, student_taps: None (automatic, see ``find_taps``), a sequence of module names or ``Tap``
            objects (a name of a recognized block taps its pre-ReLU feature; another name taps the module's
            output), or a callable ``(model, x) -> (features, output)``. Both sides need as many stages, and each
            stage pair the same batch and spatial size.
        alpha: loss weight. Default 1e-4, the reference's ImageNet value; it used 1e-3 on CIFAR (32x32) and 1e-5
            for detection / segmentation.
        margin: "bn" (``margin_from_bn`` of each teacher tap's BN), "data" (measured by ``calibrate``, required
            before the first forward), or a sequence of per-stage (C,) margin tensors.
        teacher_bn_train: the teacher's BatchNorms use batch statistics while the distiller trains (the reference
            does this; the teacher's running statistics then keep updating). Its other modules (dropout) stay in
            eval mode. False: the whole teacher runs in eval mode.
        connector: "conv_bn" (``ofdkern.Connector``: 1x1 conv + BN), "none" (identity; channels must match) or a
            callable ``(student_channels, teacher_channels) -> nn.Module``.
        backend: ofd_loss backend ("auto" picks the fused kernel for the features' device).
        example_input: an input batch to run once (in eval mode, without autograd) to read the tapped channel
            counts and check the shapes now. Needed when a tap has no BN to read its channels from (callable
            taps, module names without a BN at their output).

    The margins are buffers of ``losses[i]`` (saved by ``state_dict``); the connectors are ``connectors[i]``,
    created on the CPU: move the distiller (``.to(device)``) and give the optimizer ``distiller.parameters()``
    (the student's and the connectors'; the teacher's are frozen). Under DistributedDataParallel wrap the distiller itself: only the student's and connectors' parameters
    require gradients. Not for ``nn.DataParallel`` replicas sharing one teacher.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_taps=None, student_taps=None, *,
                 alpha: float = 1e-4, margin="bn", teacher_bn_train: bool = True, connector="conv_bn",
                 backend: str = "auto", example_input: torch.Tensor | None = None):
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.alpha = float(alpha)
        self.teacher_bn_train = teacher_bn_train
        self._teacher_taps = _resolve_taps(teacher, teacher_taps, "teacher")
        self._student_taps = _resolve_taps(student, student_taps, "student")

        teacher_channels = self._channels(teacher, self._teacher_taps, example_input, "teacher")
        student_channels = self._channels(student, self._student_taps, example_input, "student")
        if len(teacher_channels) != len(student_channels):
            raise ValueError(
                f"the teacher has {len(teacher_channels)} tapped stages and the student {len(student_channels)} "
                f"(teacher taps {self._describe(self._teacher_taps)}, student taps "
                f"{self._describe(self._student_taps)}): pass teacher_taps / student_taps with as many stages")
        self.num_stages = len(teacher_channels)
        self.student_channels = student_channels
        self.margin_source = margin if isinstance(margin, str) else "given"
        margins = self._initial_margins(margin, teacher_channels)
        self.losses = nn.ModuleList(OFDLoss(m, reduction="sum", backend=backend) for m in margins)
        self.connectors = nn.ModuleList(
            self._connector(connector, s, t) for s, t in zip(student_channels, teacher_channels))
        self._margins_ready = self.margin_source != "data"
        self.register_load_state_dict_post_hook(OFDDistiller._margins_loaded)
        if example_input is not None:
            with torch.no_grad(), _eval_mode(self):
                self._check_shapes(*self._features(example_input)[:2])
        self.train()

    # -- construction helpers -------------------------------------------------------------------------------

    @staticmethod
    def _describe(taps) -> str:
        return repr(taps) if callable(taps) else str([tap.module for tap in taps])

    @staticmethod
    def _channels(model, taps, example_input, role) -> list[int]:
        if not callable(taps) and all(tap.bn is not None for tap in taps):
            return [model.get_submodule(tap.bn).num_features for tap in taps]
        if example_input is None:
            raise ValueError(f"the channel count of some {role} taps is unknown (no BN named for them): pass "
                             f"example_input, an input batch to run once")
        with torch.no_grad(), _eval_mode(model):
            features, _ = _run_tapped(model, taps, example_input)
        return [f.shape[1] for f in features]

    def _initial_margins(self, margin, teacher_channels) -> list[torch.Tensor]:
        if margin == "bn":
            if callable(self._teacher_taps) or any(tap.bn is None for tap in self._teacher_taps):
                raise ValueError('margin="bn" needs a BN for every teacher tap: name it with Tap(..., bn=...), '
                                 'or use margin="data" or explicit margin tensors')
            return [margin_from_bn(self.teacher.get_submodule(tap.bn)) for tap in self._teacher_taps]
        if margin == "data":
            device = next(self.teacher.parameters(), torch.empty(0)).device
            return [torch.zeros(c, device=device) for c in teacher_channels]
        if isinstance(margin, str):
            raise ValueError(f'margin must be "bn", "data" or a sequence of margin tensors, got {margin!r}')
        margins = list(margin)
        given = [tuple(m.shape) for m in margins]
        if given != [(c,) for c in teacher_channels]:
            raise ValueError(f"margin tensors must have shapes {[(c,) for c in teacher_channels]} (teacher "
                             f"channels per stage), got {given}")
        return margins

    @staticmethod
    def _connector(kind, student_channels: int, teacher_channels: int) -> nn.Module:
        if kind == "conv_bn":
            return Connector(student_channels, teacher_channels)
        if kind == "none":
            if student_channels != teacher_channels:
                raise ValueError(f'connector="none" needs equal channels, got student {student_channels} and '
                                 f'teacher {teacher_channels}')
            return nn.Identity()
        if callable(kind):
            return kind(student_channels, teacher_channels)
        raise ValueError(f'connector must be "conv_bn", "none" or a callable, got {kind!r}')

    # -- modes, margins --------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "OFDDistiller":
        super().train(mode)
        self.teacher.eval()
        if mode and self.teacher_bn_train:
            for module in self.teacher.modules():
                if isinstance(module, _BatchNorm):
                    module.train()
        return self

    @staticmethod
    def _margins_loaded(module: "OFDDistiller", _incompatible_keys) -> None:
        module._margins_ready = True  # a checkpoint carries calibrated margins

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
            features, _ = _run_tapped(self.teacher, self._teacher_taps, inputs)
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

    def _features(self, x: torch.Tensor):
        with torch.no_grad():
            teacher_features, _ = _run_tapped(self.teacher, self._teacher_taps, x)
        student_features, output = _run_tapped(self.student, self._student_taps, x)
        return teacher_features, student_features, output

    def _check_shapes(self, teacher_features, student_features) -> None:
        teacher_shapes, student_shapes = _shapes(teacher_features), _shapes(student_features)
        found = f"teacher stage shapes {teacher_shapes}, student stage shapes {student_shapes}"
        if len(teacher_shapes) != self.num_stages or len(student_shapes) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stages on both sides, got {found}")
        for stage, (t, s) in enumerate(zip(teacher_shapes, student_shapes)):
            if len(t) != len(s) or t[0] != s[0] or t[2:] != s[2:]:
                raise ValueError(f"stage {stage}: teacher and student features must have the same batch and "
                                 f"spatial sizes, got {found}")
            if t[1] != self.losses[stage].num_channels or s[1] != self.student_channels[stage]:
                raise ValueError(
                    f"stage {stage}: expected {self.losses[stage].num_channels} teacher and "
                    f"{self.student_channels[stage]} student channels, got {found}")

    def forward(self, x: torch.Tensor):
        if not self._margins_ready:
            raise RuntimeError('margin="data": call calibrate(batches) (or load a checkpoint) before training')
        teacher_features, student_features, output = self._features(x)
        self._check_shapes(teacher_features, student_features)
        total = None
        for weight, connector, loss, s, t in zip(self.stage_weights, self.connectors, self.losses,
                                                 student_features, teacher_features):
            stage = weight * loss(connector(s), t)
            total = stage if total is None else total + stage
        return output, total * (self.alpha / x.shape[0])

    def extra_repr(self) -> str:
        return (f"stages={self.num_stages}, alpha={self.alpha}, margin={self.margin_source!r}, "
                f"teacher_bn_train={self.teacher_bn_train}")
