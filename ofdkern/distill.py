"""OFD distiller: wires a frozen teacher and a student together (Heo et al., ICCV 2019).

The distiller taps pre-ReLU features of both networks at the end of every stage, maps the student's through a
connector to the teacher's channels, and sums the stage losses like the reference ``Distiller`` and its
training script: ``alpha * sum_i ofd_loss_i / 2**(K-1-i) / batch_size``.

Where the stage features are read (``teacher_taps`` / ``student_taps``):

* **Automatically** (``find_taps``, or the name of a recognized block or stage): the pre-ReLU feature of the last
  residual block of every stage. A residual block is any module with ``conv1``, ``bn1``, ``conv2`` and ``bn2``
  (BasicBlock, and Bottleneck with ``bn3``), whatever applies its final ReLU: a ReLU module, in place or not
  (torchvision), a functional ``F.relu`` (mdistiller's and pytorch-cifar's CIFAR ResNets), a block that returns
  ``(out, preact)`` (mdistiller's last blocks), or the next block (the official OFD ResNets, which move the ReLU
  to the start of the next block to expose the sum). On the first forward the distiller records which tensor
  the final ReLU really receives, picks the hook point that reads exactly that tensor, and raises an error
  naming the block when there is none. MobileNetV2 ``InvertedResidual`` blocks are tapped at their (linear)
  output.
* **Explicitly**: names of other modules (their output), or ``Tap`` objects.
* **By the model's own convention**: ``"extract_feature"`` (the official OFD models:
  ``extract_feature(x, preReLU=True)`` and ``get_bn_before_relu()``), ``"preact_feats"`` (mdistiller:
  ``forward`` returns ``(logits, feats)`` with ``feats["preact_feats"]``, and ``get_bn_before_relu()``), or a
  callable ``(model, x) -> (features, output)``.

A tapped tensor that the rest of the forward overwrites in place (a BN tap followed by ``nn.ReLU(inplace=True)``,
the input of an in-place ReLU) is copied when it is read; the first forward finds which taps need it from the
tensors' version counters. Every stage feature must have negative values on the first batch: a feature without
any is post-ReLU, and the distiller refuses it.

The hooks are registered once and idle outside the distiller's own forwards, so a whole training step compiles
with ``torch.compile`` without graph breaks from them; the first forward (the checks above) must run eagerly,
or at construction with ``example_input``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .margins import DataMarginEstimator, margin_from_bn
from ._validation import check_non_negative_number
from .modules import Connector, OFDLoss, _margin_as_vector

__all__ = ["BlockTap", "MODEL_CONVENTIONS", "OFDDistiller", "Tap", "find_taps"]

# A callable tap spec: model, input -> (list of stage features, model output).
FeatureFn = Callable[[nn.Module, torch.Tensor], tuple[Sequence[torch.Tensor], object]]

MODEL_CONVENTIONS = ("extract_feature", "preact_feats")

REDUCTIONS = ("batchmean", "sum")

# Every spelling of a ReLU call that a TorchFunctionMode sees (nn.ReLU calls F.relu).
_RELU_FUNCTIONS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})


@dataclass(frozen=True)
class Tap:
    """Where one stage feature of a model is read.

    Attributes:
        module: name of a module (as in ``model.named_modules()``). With no other option the feature is its
            output.
        relu: name of a ReLU module called inside ``module``: the feature is that ReLU's input at its last call
            during ``module``'s forward (the residual sum of a torchvision block, whose one ``relu`` is called
            two or three times).
        bn: name of the BatchNorm whose output the feature is (or whose output is added to the shortcut): the
            source of ``margin="bn"``, and of the channel count.
        item: index of the feature in a tuple or list output of ``module`` (mdistiller's last blocks return
            ``(out, preact)``).
        bn_output_at_end: the feature is the tensor ``bn`` returned, read when ``module`` returns: a residual
            add done in place on it (``out += identity``) makes it the pre-ReLU sum of a block whose final ReLU
            is a function call.
    """

    module: str
    relu: str | None = None
    bn: str | None = None
    item: int | None = None
    bn_output_at_end: bool = False


@dataclass(frozen=True)
class BlockTap:
    """The pre-ReLU feature of residual block ``module`` (its residual sum before the final ReLU), located on the
    first forward: the distiller then replaces it by the ``Tap`` that reads it (``OFDDistiller.teacher_taps``).

    Attributes:
        module: name of the block.
        bn: name of the BN before the residual add (``bn2``, or ``bn3`` in a Bottleneck): the margin source.
    """

    module: str
    bn: str | None = None


def _is_residual_block(module: nn.Module) -> bool:
    """BasicBlock / Bottleneck layout: conv1, bn1, conv2, bn2 (torchvision, mdistiller, the official OFD ResNets,
    pytorch-cifar). The final ReLU may be a module, a function call, or left to the next block."""
    parts = (("conv1", nn.Conv2d), ("bn1", _BatchNorm), ("conv2", nn.Conv2d), ("bn2", _BatchNorm))
    return all(isinstance(getattr(module, name, None), kind) for name, kind in parts)


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


def _block_tap(module: nn.Module, name: str) -> Tap | BlockTap | None:
    """The pre-ReLU tap of a recognized block, else None."""
    if _is_residual_block(module):
        bn = "bn3" if isinstance(getattr(module, "bn3", None), _BatchNorm) else "bn2"
        return BlockTap(name, bn=f"{name}.{bn}")
    if _is_inverted_residual(module):
        return Tap(name, bn=f"{name}.conv.{len(module.conv) - 1}")
    return None


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and any(s != 1 for s in m.stride) for m in module.modules())


def find_taps(model: nn.Module) -> list[Tap | BlockTap]:
    """The automatic taps of ``model``: the last recognized block (residual BasicBlock / Bottleneck: a
    ``BlockTap``; MobileNetV2 InvertedResidual: a ``Tap`` of its output) of every stage, in forward order. A
    stage ends where the next block downsamples (a strided conv) or sits in another container (``layer1`` ..
    ``layer4``). Returns [] when no block is recognized.

    Slice the result to drop stages, e.g. ``OFDDistiller(t, s, student_taps=find_taps(s)[1:])``.
    """
    blocks = []  # (tap, module, parent name) in registration order, which is forward order for these nets
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


def _prefixed(tap: Tap | BlockTap, prefix: str) -> Tap | BlockTap:
    def name(value):
        return None if value is None else f"{prefix}.{value}"

    if isinstance(tap, BlockTap):
        return BlockTap(name(tap.module), bn=name(tap.bn))
    return Tap(name(tap.module), bn=name(tap.bn))


def _tap_from_name(model: nn.Module, name: str) -> Tap | BlockTap:
    """A recognized block: its pre-ReLU tap; a stage (a container of blocks): its last block's; else the
    module's output."""
    module = model.get_submodule(name)  # raises AttributeError naming the missing piece
    tap = _block_tap(module, name)
    if tap is not None:
        return tap
    inner = find_taps(module) if name and not isinstance(module, _BatchNorm) else []
    if inner:
        return _prefixed(inner[-1], name)
    return Tap(name, bn=_output_bn(module, name))


# -- taps read by hooks --------------------------------------------------------------------------------------

def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None where it has none (inference-mode tensors)."""
    return None if tensor.is_inference() else tensor._version


def _output_tensors(output) -> list[tuple[int | None, torch.Tensor]]:
    """(item index, tensor) of a module output: (None, output) for a tensor, each tensor of a tuple / list."""
    if isinstance(output, torch.Tensor):
        return [(None, output)]
    if isinstance(output, (tuple, list)):
        return [(index, item) for index, item in enumerate(output) if isinstance(item, torch.Tensor)]
    return []


class _TapCapture:
    """Forward hooks that read a model's tapped features while ``active`` (during the distiller's forwards).

    Registered once and idle otherwise: hooks added inside a compiled region would break its graph. A tap
    whose tensor the rest of the forward modifies in place is copied when read. Until a tap has been measured
    (its first eager forward) it is always copied, and the version counter of the original tells whether the
    copy is needed; later eager forwards check that the taps read without a copy were left alone.
    """

    def __init__(self, count: int):
        self.active = False
        self.taps: list[Tap | None] = [None] * count
        self.copies = [True] * count
        self.measured = [False] * count
        self._reads: list = [None] * count  # per tap: (value, original tensor, its version when read)
        self._open: list = [None] * count  # per block tap: None outside the block, else [held BN output]

    def set_tap(self, model: nn.Module, index: int, tap: Tap, copy: bool | None = None) -> None:
        """Hooks for ``tap`` at position ``index``; ``copy`` given: already measured."""
        self.taps[index] = tap
        if copy is not None:
            self.copies[index], self.measured[index] = copy, True
        module = model.get_submodule(tap.module)
        if tap.relu is None and not tap.bn_output_at_end:
            module.register_forward_hook(functools.partial(self._read_output, index))
            return
        module.register_forward_pre_hook(functools.partial(self._open_block, index))
        if tap.relu is not None:
            model.get_submodule(tap.relu).register_forward_pre_hook(functools.partial(self._read_relu_input, index))
        else:
            model.get_submodule(tap.bn).register_forward_hook(functools.partial(self._hold_bn_output, index))
        module.register_forward_hook(functools.partial(self._close_block, index))

    def begin(self) -> None:
        self._reads = [None] * len(self.taps)
        self._open = [None] * len(self.taps)
        self.active = True

    def _store(self, index: int, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tap {self.taps[index]} reads a {type(tensor).__name__}, not a tensor: set Tap.item "
                            f"to pick the feature out of a tuple output")
        version = None if torch.compiler.is_compiling() else _version(tensor)
        self._reads[index] = (tensor.clone() if self.copies[index] else tensor, tensor, version)

    def _read_output(self, index, _module, _args, output):
        if self.active:
            item = self.taps[index].item
            self._store(index, output if item is None else output[item])

    def _open_block(self, index, _module, _args):
        if self.active:
            self._open[index] = [None]

    def _read_relu_input(self, index, _relu, args):
        # The last call inside the block wins; calls outside it (a shared ReLU module) are not the block's.
        if self.active and self._open[index] is not None:
            self._store(index, args[0])

    def _hold_bn_output(self, index, _bn, _args, output):
        if self.active and self._open[index] is not None:
            self._open[index][0] = output

    def _close_block(self, index, _module, _args, _output):
        if self.active and self._open[index] is not None:
            if self.taps[index].bn_output_at_end:
                self._store(index, self._open[index][0])
            self._open[index] = None

    def finish(self, check: bool, skip: Iterable[int] = ()) -> list[torch.Tensor | None]:
        """The features read by this forward (None at ``skip``); ``check``: measure or verify the copies."""
        self.active = False
        skip = set(skip)
        features = []
        for index, read in enumerate(self._reads):
            if index in skip:
                features.append(None)
                continue
            if read is None:
                raise RuntimeError(f"tap {self.taps[index]} was not reached by the forward pass")
            value, original, version = read
            if check:
                overwritten = version is None or _version(original) != version
                if not self.measured[index]:
                    self.copies[index], self.measured[index] = overwritten, True
                elif overwritten and not self.copies[index]:
                    raise RuntimeError(
                        f"tap {self.taps[index]}: its tensor was modified in place after it was read (on the "
                        f"first forward it was not), so the feature is lost: tap a module whose output nothing "
                        f"overwrites")
            features.append(value)
        self._reads = [None] * len(self.taps)
        return features


class _ReluTrace(TorchFunctionMode):
    """Tells the block probes of one forward about every ReLU call: its input before, its result after."""

    def __init__(self, probes: Sequence["_BlockProbe"]):
        super().__init__()
        self.probes = probes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RELU_FUNCTIONS:
            return func(*args, **kwargs)
        relu_input = args[0] if args else kwargs["input"]
        for probe in self.probes:
            probe.before_relu(relu_input)
        result = func(*args, **kwargs)
        for probe in self.probes:
            probe.after_relu(result)
        return result


class _BlockProbe:
    """Finds, during one forward, the hook point that reads a residual block's pre-ReLU feature.

    The truth comes from the ReLU calls (``_ReluTrace``): the input of the call whose result the block returns,
    or, when the block returns its sum un-activated, that output itself if a later ReLU call receives it
    unchanged (the official OFD ResNets apply it at the start of the next block). The candidates are the hook
    points a ``Tap`` can name, in this order: each ReLU module's input at its last call in the block, the block's
    output (each tensor of a tuple output), and the BN output as the block leaves it. Each is copied when read,
    and its original's version counter tells whether steady-state reads need the copy.
    """

    def __init__(self, model: nn.Module, spec: BlockTap, role: str):
        self.spec, self.role = spec, role
        self.block = model.get_submodule(spec.module)
        self.inside = False
        self.relu_input = self.relu_result = None
        self.output = self.output_version = self.output_copy = None
        self.fed_to_relu = False
        self.held_bn_output = None
        self.candidates: dict[Tap, tuple[torch.Tensor, torch.Tensor, int | None]] = {}
        self._handles = [self.block.register_forward_pre_hook(self._enter),
                         self.block.register_forward_hook(self._leave)]
        # Any ReLU module called inside the block: its own, or one the model shares between blocks.
        for relu_name, relu in model.named_modules():
            if isinstance(relu, nn.ReLU):
                tap = Tap(spec.module, relu=relu_name, bn=spec.bn)
                self._handles.append(relu.register_forward_pre_hook(functools.partial(self._read_relu, tap)))
        if spec.bn is not None:
            self._handles.append(model.get_submodule(spec.bn).register_forward_hook(self._hold_bn_output))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _keep(self, tap: Tap, tensor: torch.Tensor) -> None:
        self.candidates.pop(tap, None)  # insertion order is preference order; a later call replaces the read
        self.candidates[tap] = (tensor.clone(), tensor, _version(tensor))

    def _enter(self, _block, _args):
        self.inside = True

    def _read_relu(self, tap, _relu, args):
        if self.inside:
            self._keep(tap, args[0])

    def _hold_bn_output(self, _bn, _args, output):
        if self.inside:
            self.held_bn_output = output

    def before_relu(self, relu_input: torch.Tensor) -> None:
        if self.inside:
            self.relu_input = relu_input.clone()
        elif relu_input is self.output and _version(relu_input) == self.output_version:
            self.fed_to_relu = True

    def after_relu(self, result: torch.Tensor) -> None:
        if self.inside:
            self.relu_result = result

    def _leave(self, _block, _args, output):
        self.inside = False
        tensors = _output_tensors(output)
        if not tensors:
            return
        self.output = tensors[0][1]
        self.output_version, self.output_copy = _version(self.output), self.output.clone()
        for item, tensor in tensors:
            self._keep(Tap(self.spec.module, bn=self.spec.bn, item=item), tensor)
        if self.held_bn_output is not None:
            self._keep(Tap(self.spec.module, bn=self.spec.bn, bn_output_at_end=True), self.held_bn_output)

    def resolve(self) -> tuple[Tap, bool, torch.Tensor]:
        """(the tap that reads the pre-ReLU feature, whether it needs a copy, this forward's feature)."""
        block = f"{self.role} block {self.spec.module!r} ({type(self.block).__name__})"
        alternatives = (f"pass {self.role}_taps as module names or ofdkern.distill.Tap objects of modules whose "
                        f"output is the pre-ReLU feature, as one of the model conventions {MODEL_CONVENTIONS}, or "
                        f"as a callable (model, x) -> (features, output)")
        if self.output is None:
            raise ValueError(f"{block} did not return a tensor: {alternatives}")
        if self.relu_result is not None and self.relu_result is self.output:
            truth = self.relu_input
        elif self.fed_to_relu:
            truth = self.output_copy
        else:
            raise ValueError(
                f"{block} has no pre-ReLU feature: its output is neither the result of a ReLU call in the block "
                f"nor the input of a later one (pre-activation blocks such as WideResNet's normalize it first: "
                f"tap the BN whose output feeds the ReLU by name). Else {alternatives}")
        for tap, (copy, original, version) in self.candidates.items():
            if copy.shape == truth.shape and copy.dtype == truth.dtype and torch.equal(copy, truth):
                overwritten = version is None or _version(original) != version
                return tap, overwritten, copy
        raise ValueError(
            f"{block}: its final ReLU receives a tensor that no module returns (for example a functional ReLU after "
            f"an out-of-place residual add, out = out + identity), so no hook can read its pre-ReLU feature: "
            f"{alternatives}")


def _refuse_unchecked_forward(x: torch.Tensor, role: str) -> None:
    """The first forward checks the taps: it needs eager execution and data."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"the {role} taps are checked on the first forward, which must run eagerly: run one forward before "
            f"torch.compile, or pass example_input to OFDDistiller")
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0:
        raise ValueError(f"the {role} taps are checked on the first forward, which needs a non-empty batch "
                         f"(got input of shape {tuple(x.shape)})")


def _require_negative_values(features: Sequence[torch.Tensor], role: str, describe: Callable[[int], str]) -> None:
    for stage, feature in enumerate(features):
        if feature.numel() and not bool((feature < 0).any()):
            raise ValueError(
                f"{role} stage {stage} ({describe(stage)}) has no negative value on the first batch: OFD needs "
                f"pre-ReLU features and this one looks post-ReLU (overwritten by an in-place ReLU, or tapped after "
                f"the activation)")


class _HookedTaps:
    """Stage features read by forward hooks: ``Tap``s as given, ``BlockTap``s resolved on the first forward
    (``require_pre_relu``: then every feature must have negative values, OFD's check)."""

    def __init__(self, model: nn.Module, specs: Sequence[Tap | BlockTap], role: str, require_pre_relu: bool = True):
        self.specs, self.role, self.require_pre_relu = list(specs), role, require_pre_relu
        self.capture = _TapCapture(len(self.specs))
        for index, spec in enumerate(self.specs):
            if isinstance(spec, Tap):
                self.capture.set_tap(model, index, spec)
        self.checked = False

    @property
    def taps(self) -> list[Tap | BlockTap]:
        return [tap or spec for tap, spec in zip(self.capture.taps, self.specs)]

    def describe(self, stage: int) -> str:
        return str(self.taps[stage])

    def bns(self, model: nn.Module) -> list[_BatchNorm] | None:
        if any(spec.bn is None for spec in self.specs):
            return None
        return [model.get_submodule(spec.bn) for spec in self.specs]

    def run(self, model: nn.Module, x: torch.Tensor):
        """(stage features, model output) of one forward pass."""
        if not self.checked:
            return self._first_run(model, x)
        self.capture.begin()
        try:
            output = model(x)
        finally:
            self.capture.active = False
        return self.capture.finish(check=not torch.compiler.is_compiling()), output

    def _first_run(self, model: nn.Module, x: torch.Tensor):
        _refuse_unchecked_forward(x, self.role)
        probes = {index: _BlockProbe(model, spec, self.role) for index, spec in enumerate(self.specs)
                  if isinstance(spec, BlockTap) and self.capture.taps[index] is None}
        self.capture.begin()
        try:
            with _ReluTrace(list(probes.values())) if probes else contextlib.nullcontext():
                output = model(x)
        finally:
            self.capture.active = False
            for probe in probes.values():
                probe.remove()
        features = self.capture.finish(check=True, skip=probes)
        resolved = {index: probe.resolve() for index, probe in probes.items()}
        for index, (tap, copy, feature) in resolved.items():
            self.capture.set_tap(model, index, tap, copy=copy)
            features[index] = feature
        if self.require_pre_relu:
            _require_negative_values(features, self.role, self.describe)
        self.checked = True
        return features, output


def _features_by_extract_feature(model: nn.Module, x: torch.Tensor):
    features, output = model.extract_feature(x, preReLU=True)
    return features, output


def _features_by_preact_feats(model: nn.Module, x: torch.Tensor, stages: int | None):
    result = model(x)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], dict)
            and "preact_feats" in result[1]):
        raise ValueError(f'taps="preact_feats" needs {type(model).__name__}.forward to return (logits, feats) '
                         f'with feats["preact_feats"] (the mdistiller convention), got {type(result).__name__}')
    output, feats = result
    preact = list(feats["preact_feats"])
    # mdistiller's first entry is the stem (post-ReLU); get_bn_before_relu() pairs with the last ones.
    return (preact[-stages:] if stages else preact[1:]), output


class _FunctionTaps:
    """Stage features returned by a function of (model, x): a model convention or the user's callable."""

    def __init__(self, fn: FeatureFn, role: str, name: str, bns: list[_BatchNorm] | None = None):
        self.fn, self.role, self.name, self._bns = fn, role, name, bns
        self.checked = False

    @property
    def taps(self):
        return self.name if self.name in MODEL_CONVENTIONS else self.fn

    def describe(self, stage: int) -> str:
        return f"feature {stage} of {self.name}"

    def bns(self, _model: nn.Module) -> list[_BatchNorm] | None:
        return self._bns

    def run(self, model: nn.Module, x: torch.Tensor):
        if not self.checked:
            _refuse_unchecked_forward(x, self.role)
        features, output = self.fn(model, x)
        features = list(features)
        if not self.checked:
            _require_negative_values(features, self.role, self.describe)
            self.checked = True
        return features, output


def _convention_taps(model: nn.Module, convention: str, role: str) -> _FunctionTaps:
    bns = None
    if hasattr(model, "get_bn_before_relu"):
        bns = list(model.get_bn_before_relu())
        if not all(isinstance(bn, _BatchNorm) for bn in bns):
            raise TypeError(f"{role}.get_bn_before_relu() must return BatchNorm modules, got "
                            f"{[type(bn).__name__ for bn in bns]}")
    if convention == "extract_feature":
        if not callable(getattr(model, "extract_feature", None)):
            raise ValueError(f'{role}_taps="extract_feature" needs {role}.extract_feature(x, preReLU=True) (the '
                             f'official OFD models\' method), which {type(model).__name__} does not have')
        return _FunctionTaps(_features_by_extract_feature, role, convention, bns)
    stages = None if bns is None else len(bns)
    return _FunctionTaps(functools.partial(_features_by_preact_feats, stages=stages), role, convention, bns)


def _resolve_taps(model: nn.Module, spec, role: str) -> _HookedTaps | _FunctionTaps:
    if spec is None:
        taps = find_taps(model)
        if not taps:
            raise ValueError(
                f"no {role} taps found automatically in {type(model).__name__} (it recognizes residual blocks "
                f"with conv1/bn1/conv2/bn2 and MobileNetV2 InvertedResidual blocks): pass {role}_taps as module "
                f"names, ofdkern.distill.Tap objects, one of the model conventions {MODEL_CONVENTIONS} or a "
                f"callable (model, x) -> (features, output)")
        return _HookedTaps(model, taps, role)
    if isinstance(spec, str):
        if spec not in MODEL_CONVENTIONS:
            raise ValueError(f"{role}_taps as a string must be one of the model conventions {MODEL_CONVENTIONS}, "
                             f"got {spec!r} (module names go in a list)")
        return _convention_taps(model, spec, role)
    if callable(spec):
        return _FunctionTaps(spec, role, getattr(spec, "__name__", repr(spec)))
    if isinstance(spec, (Tap, BlockTap)) or not isinstance(spec, Iterable):
        raise TypeError(f"{role}_taps must be None, a sequence of module names / Tap objects, one of "
                        f"{MODEL_CONVENTIONS} or a callable, got {type(spec).__name__}")
    taps = []
    for item in spec:
        if isinstance(item, str):
            taps.append(_tap_from_name(model, item))
        elif isinstance(item, (Tap, BlockTap)):
            for name in (item.module, getattr(item, "relu", None), item.bn):
                if name is not None:
                    model.get_submodule(name)
            taps.append(item)
        else:
            raise TypeError(f"{role}_taps entries must be module names or Tap objects, got {type(item).__name__}")
    if not taps:
        raise ValueError(f"{role}_taps is empty")
    return _HookedTaps(model, taps, role)


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
    ``reduction="sum", alpha=1`` gives the reference ``Distiller``'s own output, the raw weighted stage sum, for a
    training script that scales it itself.

    Args:
        teacher: the trained teacher. Frozen here (``requires_grad_(False)``); its features are computed without
            autograd.
        student: the network to train.
        teacher_taps, student_taps: None (automatic, see ``find_taps``), a sequence of module names or ``Tap``
            objects (a name of a recognized block or stage taps its pre-ReLU feature; another name taps the
            module's output), a model convention (``"extract_feature"``: the official OFD models'
            ``extract_feature(x, preReLU=True)``; ``"preact_feats"``: mdistiller's ``forward`` returning
            ``(logits, feats)``, whose last ``len(get_bn_before_relu())`` ``feats["preact_feats"]`` are the
            stages), or a callable ``(model, x) -> (features, output)``. Both sides need as many stages, and each
            stage pair the same batch and spatial size.
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
            when a tap has no BN to read its channels from.

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
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise TypeError(f"teacher and student must be nn.Modules, got {type(teacher).__name__} and "
                            f"{type(student).__name__}")
        if not isinstance(teacher_bn_train, bool):
            raise TypeError(f"teacher_bn_train must be a bool, got {teacher_bn_train!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.alpha = check_non_negative_number("alpha", alpha)
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.teacher_bn_train = teacher_bn_train
        self.reduction = reduction
        self._teacher_source = _resolve_taps(teacher, teacher_taps, "teacher")
        self._student_source = _resolve_taps(student, student_taps, "student")

        teacher_channels = self._channels(teacher, self._teacher_source, example_input, "teacher")
        student_channels = self._channels(student, self._student_source, example_input, "student")
        if len(teacher_channels) != len(student_channels):
            raise ValueError(
                f"the teacher has {len(teacher_channels)} tapped stages and the student {len(student_channels)} "
                f"(teacher taps {self._describe(self._teacher_source)}, student taps "
                f"{self._describe(self._student_source)}): pass teacher_taps / student_taps with as many stages")
        self.num_stages = len(teacher_channels)
        self.student_channels = student_channels
        self.margin_source = margin if isinstance(margin, str) else "given"
        margins = self._initial_margins(margin, teacher_channels)
        self.losses = nn.ModuleList(OFDLoss(m, reduction="sum", backend=backend) for m in margins)
        reference_parameter = next(student.parameters(), torch.empty(0))
        factory = {"device": reference_parameter.device, "dtype": reference_parameter.dtype}
        self.connectors = nn.ModuleList(
            self._connector(connector, s, t, factory) for s, t in zip(student_channels, teacher_channels))
        self._margins_ready = self.margin_source != "data"
        self.register_load_state_dict_pre_hook(OFDDistiller._note_loaded_margins)
        if example_input is not None:
            with torch.no_grad(), _eval_mode(self):
                self._check_shapes(*self._features(example_input)[:2])
        self.train()

    # -- construction helpers -------------------------------------------------------------------------------

    @staticmethod
    def _describe(source) -> str:
        taps = source.taps
        return repr(taps) if not isinstance(taps, list) else str([tap.module for tap in taps])

    @staticmethod
    def _channels(model, source, example_input, role) -> list[int]:
        bns = source.bns(model)
        if bns is not None:
            return [bn.num_features for bn in bns]
        if example_input is None:
            raise ValueError(f"the channel count of some {role} taps is unknown (no BN named for them): pass "
                             f"example_input, an input batch to run once")
        with torch.no_grad(), _eval_mode(model):
            features, _ = source.run(model, example_input)
        return [f.shape[1] for f in features]

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
        margins = [_margin_as_vector(m) for m in margin]
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

    @property
    def teacher_taps(self):
        """The teacher's taps: ``Tap``s / ``BlockTap``s (a ``BlockTap`` becomes the ``Tap`` that reads it after the
        first forward), or the model convention / callable."""
        return self._teacher_source.taps

    @property
    def student_taps(self):
        return self._student_source.taps

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

    def _features(self, x: torch.Tensor):
        with torch.no_grad():
            teacher_features, _ = self._teacher_source.run(self.teacher, x)
        student_features, output = self._student_source.run(self.student, x)
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
            raise RuntimeError('margin="data": call calibrate(batches) (or load a checkpoint that carries '
                               'calibrated margins) before training')
        teacher_features, student_features, output = self._features(x)
        self._check_shapes(teacher_features, student_features)
        total = None
        for weight, connector, loss, s, t in zip(self.stage_weights, self.connectors, self.losses,
                                                 student_features, teacher_features):
            stage = weight * loss(connector(s), t)
            total = stage if total is None else total + stage
        # An empty batch has an empty (0) loss; the division by its size would be 0 / 0.
        batch = max(x.shape[0], 1) if self.reduction == "batchmean" else 1
        return output, total * (self.alpha / batch)

    def extra_repr(self) -> str:
        return (f"stages={self.num_stages}, alpha={self.alpha}, margin={self.margin_source!r}, "
                f"teacher_bn_train={self.teacher_bn_train}, reduction={self.reduction!r}")
