"""Where the distillers read a model's stage features, located by the model's structure and read by forward hooks.

Two kinds of feature, two finders:

* **Pre-ReLU features** (OFD, ``find_taps``): the residual sum of the last residual block of every stage, before
  its final ReLU. The blocks recognized: any module with ``conv1``, ``bn1``, ``conv2``, ``bn2`` (torchvision and
  timm ResNet / ResNet-D / Wide ResNet / ResNeXt / SE-ResNet, mdistiller, pytorch-cifar, the official OFD
  ResNets; Bottleneck with ``bn3``), timm's RegNet blocks (``conv1`` .. ``conv3`` conv-norm-act units),
  torchvision's RegNet blocks (a transform ``f`` of units ``a``, ``b``, ``c``), wherever they sit (also in
  the backbones of detection and segmentation models), with BatchNorms or frozen BatchNorms. Whatever applies
  the final ReLU — a ReLU module, in place or not, a functional ``F.relu``, a block returning ``(out, preact)``
  (mdistiller), or the next block (the official OFD ResNets) — the first forward records which tensor the final
  ReLU really receives (``_ReluTrace``) and picks the hook point that holds that very tensor, unmodified (the same
  object at the same in-place version: structure, not values; a zero-initialized residual branch, whose sum equals
  the non-negative shortcut, is tapped like any other). A block whose feature no hook can read is a clear error.
  MobileNetV2 ``InvertedResidual`` blocks are tapped at their (linear) output.
* **Stage outputs** (channel alignment, FRSKD, ``find_stages``): the outputs of the model's stages, whatever
  their activation: a timm model's ``feature_info``, the blocks ``find_taps`` recognizes, or the stages of a
  ``features`` Sequential (torchvision MobileNet, EfficientNet, ConvNeXt, ...).

Taps are read by hooks registered once (``HookedTaps``), idle outside the distillers' own forwards, so a whole
training step compiles with ``torch.compile`` without graph breaks from them; the first forward (which locates and
checks the taps) runs eagerly. A tapped tensor that the rest of the forward overwrites in place (a BN tap followed
by ``nn.ReLU(inplace=True)``, the input of an in-place ReLU) is copied when it is read; the first forward finds
which taps need it from the tensors' version counters. For OFD, a tap that reads a ReLU's result is refused on
the first forward (it is post-ReLU).
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .margins import batch_norm_channels, is_batch_norm

__all__ = ["BlockTap", "FeatureFn", "FunctionTaps", "HookedTaps", "MODEL_CONVENTIONS", "Tap", "eval_mode",
           "find_stages", "find_taps", "non_relu_activations", "resolve_stages", "resolve_taps", "tap_channels",
           "tap_from_name"]

# A callable tap spec: (model, *inputs) -> (list of stage features, model output).
FeatureFn = Callable[..., tuple[Sequence[torch.Tensor], object]]

MODEL_CONVENTIONS = ("extract_feature", "preact_feats")

# Every spelling of a ReLU call that a TorchFunctionMode sees (nn.ReLU calls F.relu).
_RELU_FUNCTIONS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})

# Activation modules of the families OFD's margin ReLU does not describe (matched by class name, so that timm's
# own classes count too).
_NON_RELU_ACTIVATIONS = frozenset({"SiLU", "Swish", "GELU", "GELUTanh", "QuickGELU", "Hardswish", "HardSwish",
                                   "Mish", "ELU", "CELU", "SELU", "LeakyReLU", "PReLU", "Tanh", "Softplus"})

_ALTERNATIVES = ("pass {role}_taps as module names or ofdkern.Tap objects of modules whose output is the "
                 "pre-ReLU feature, as one of the model conventions " + str(MODEL_CONVENTIONS) + ", or as a "
                 "callable (model, *inputs) -> (features, output)")


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


# -- finding taps by structure -----------------------------------------------------------------------------------

def _is_conv_norm_unit(module) -> bool:
    """timm's ConvNormAct: a ``conv`` and a ``bn`` (possibly with its activation inside)."""
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


def _output_bn(module: nn.Module, name: str) -> str | None:
    """Name of the BN that produces ``module``'s output: itself, or the last entry of a Sequential, recursively."""
    if is_batch_norm(module):
        return name
    if isinstance(module, nn.Sequential) and len(module) > 0:
        last = str(len(module) - 1)
        return _output_bn(module[-1], f"{name}.{last}" if name else last)
    return None


def _residual_block_bn(module: nn.Module, name: str) -> str | None:
    """The name of the BN before the residual add of a recognized residual block; None for anything else."""
    if (all(isinstance(getattr(module, part, None), nn.Conv2d) for part in ("conv1", "conv2"))
            and all(is_batch_norm(getattr(module, part, None)) for part in ("bn1", "bn2"))):
        # BasicBlock / Bottleneck: torchvision, timm, mdistiller, the official OFD ResNets, pytorch-cifar.
        return f"{name}.bn3" if is_batch_norm(getattr(module, "bn3", None)) else f"{name}.bn2"
    if all(_is_conv_norm_unit(getattr(module, f"conv{i}", None)) for i in (1, 2, 3)):
        return f"{name}.conv3.bn"  # timm's RegNet Bottleneck
    transform = getattr(module, "f", None)
    if hasattr(module, "proj") and all(isinstance(getattr(transform, unit, None), nn.Sequential) for unit in "abc"):
        return _output_bn(transform.c, f"{name}.f.c")  # torchvision's RegNet ResBottleneckBlock
    return None


def _is_inverted_residual(module: nn.Module) -> bool:
    """torchvision MobileNetV2 InvertedResidual structure: ``conv`` Sequential ending in a BN (linear output)."""
    body = getattr(module, "conv", None)
    return isinstance(body, nn.Sequential) and len(body) > 0 and is_batch_norm(body[-1])


def _block_tap(module: nn.Module, name: str) -> Tap | BlockTap | None:
    """The pre-ReLU tap of a recognized block, else None."""
    bn = _residual_block_bn(module, name)
    if bn is not None:
        return BlockTap(name, bn=bn)
    if _is_inverted_residual(module):
        return Tap(name, bn=f"{name}.conv.{len(module.conv) - 1}")
    return None


def _strides(module: nn.Module) -> int:
    """The product of the strides of ``module``'s convolutions (first spatial dim): its downsampling factor."""
    factor = 1
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            factor *= conv.stride[0]
    return factor


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and any(s != 1 for s in m.stride) for m in module.modules())


def find_taps(model: nn.Module) -> list[Tap | BlockTap]:
    """The pre-ReLU taps of ``model`` for OFD: the last recognized block (residual block: a ``BlockTap``;
    MobileNetV2 InvertedResidual: a ``Tap`` of its output) of every stage, in forward order. A stage ends where the
    next block downsamples (a strided conv) or sits in another container (``layer1`` .. ``layer4``). Returns []
    when no block is recognized.

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


def tap_from_name(model: nn.Module, name: str) -> Tap | BlockTap:
    """The pre-ReLU tap that a module name stands for: a recognized block's; a stage's (a container of blocks):
    its last block's; else the module's output."""
    module = model.get_submodule(name)  # raises AttributeError naming the missing piece
    tap = _block_tap(module, name)
    if tap is not None:
        return tap
    inner = find_taps(module) if name and not is_batch_norm(module) else []
    if inner:
        return _prefixed(inner[-1], name)
    return Tap(name, bn=_output_bn(module, name))


def non_relu_activations(model: nn.Module) -> list[str]:
    """The class names of ``model``'s activation modules that are not ReLUs (SiLU, hard-swish, GELU, ...)."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if name in _NON_RELU_ACTIVATIONS and name not in found:
            found.append(name)
    return found


def _output_tap(model: nn.Module, name: str) -> Tap:
    model.get_submodule(name)  # raises AttributeError naming the missing piece
    return Tap(name)


def _timm_stages(model: nn.Module) -> list[Tap] | None:
    """A timm model's ``feature_info``: the last entry of every reduction from 4 on (the stem is left out)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not all(isinstance(entry, dict) and "module" in entry
                                                      and "reduction" in entry for entry in info):
        return None
    last_per_reduction = {}
    for entry in info:
        if entry["reduction"] >= 4:
            last_per_reduction[entry["reduction"]] = entry["module"]
    names = [last_per_reduction[r] for r in sorted(last_per_reduction)]
    return [_output_tap(model, name) for name in names]


def _trunk_stages(model: nn.Module) -> list[Tap] | None:
    """The stages of a ``features`` Sequential (torchvision's MobileNets, EfficientNets, ConvNeXts, VGGs): the
    last child before each downsampling child, and the last child, from a reduction of 4 on."""
    for name, trunk in model.named_modules():
        if name.rpartition(".")[2] != "features" or not isinstance(trunk, nn.Sequential):
            continue
        children = list(trunk.named_children())
        taps, reduction = [], 1
        for index, (child_name, child) in enumerate(children):
            reduction *= _strides(child)
            following = children[index + 1][1] if index + 1 < len(children) else None
            if reduction >= 4 and (following is None or _downsamples(following)):
                taps.append(Tap(f"{name}.{child_name}"))
        return taps or None
    return None


def find_stages(model: nn.Module) -> list[Tap]:
    """The stage outputs of ``model`` for channel alignment and FRSKD, shallow to deep, whatever its activation:

    * a timm model: its ``feature_info``, the last module of every reduction from 4 on (the stem is left out);
    * else a ``features`` Sequential's stages (torchvision's MobileNets, EfficientNets, ConvNeXts): the last child
      of every resolution from a reduction of 4 on;
    * else the outputs of the blocks ``find_taps`` finds (ResNets, RegNets, also inside detection and segmentation
      models).

    Returns [] when none of these applies.
    """
    stages = _timm_stages(model) or _trunk_stages(model)
    if stages:
        return stages
    return [Tap(tap.module, bn=tap.bn) for tap in find_taps(model)]


def tap_channels(model: nn.Module, tap: Tap | BlockTap) -> int | None:
    """The channel count of a tapped feature as the structure tells it: its BN's, a timm ``feature_info``
    entry's, or the output channels of the last convolution inside the tapped module (checked against the
    feature on the first forward); None where there is none."""
    if tap.bn is not None:
        return batch_norm_channels(model.get_submodule(tap.bn))
    for entry in getattr(model, "feature_info", None) or []:
        if isinstance(entry, dict) and entry.get("module") == tap.module and "num_chs" in entry:
            return int(entry["num_chs"])
    convs = [m for m in model.get_submodule(tap.module).modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


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


class _ReluTrace(TorchFunctionMode):
    """Sees every ReLU call of one forward: tells the block probes its input before and its result after, and
    remembers every result (at its in-place version) so that a tap can tell whether it reads a ReLU's output."""

    def __init__(self, probes: Sequence["_BlockProbe"] = ()):
        super().__init__()
        self.probes = probes
        self._results: dict[int, tuple[weakref.ref, int | None]] = {}

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
        self._results[id(result)] = (weakref.ref(result), _version(result))
        return result

    def returned(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``, as it is now, is what a ReLU call returned."""
        ref, version = self._results.get(id(tensor), (None, None))
        return ref is not None and ref() is tensor and version == _version(tensor)


class _TapCapture:
    """Forward hooks that read a model's tapped features while ``active`` (during the distiller's forwards).

    Registered once and idle otherwise: hooks added inside a compiled region would break its graph. A tap
    whose tensor the rest of the forward modifies in place is copied when read. Until a tap has been measured
    (its first eager forward) it is always copied, and the version counter of the original tells whether the
    copy is needed; later eager forwards check that the taps read without a copy were left alone. While a
    ``trace`` is set (the first forward), each read notes whether it is a ReLU's result.
    """

    def __init__(self, count: int):
        self.active = False
        self.taps: list[Tap | None] = [None] * count
        self.copies = [True] * count
        self.measured = [False] * count
        self.trace: _ReluTrace | None = None
        self.read_relu_result = [False] * count
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
        if self.trace is not None:
            self.read_relu_result[index] = self.trace.returned(tensor)
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


class _BlockProbe:
    """Finds, during one forward, the hook point that reads a residual block's pre-ReLU feature.

    The truth comes from the ReLU calls (``_ReluTrace``): the tensor passed to the call whose result the block
    returns, at its version then; or, when the block returns its sum un-activated, that output itself if a later
    ReLU call receives it unchanged (the official OFD ResNets apply it at the start of the next block). The
    candidates are the hook points a ``Tap`` can name, in this order: each ReLU module's input at its last call in
    the block, the block's output (each tensor of a tuple output), and the BN output as the block leaves it. The
    tap is the first candidate that read the very tensor of the truth at the same version: identity, never a
    comparison of values (a zero-initialized residual branch makes the sum equal the shortcut, and a non-negative
    sum equals its ReLU). Each candidate is copied when read, and its original's version counter tells whether
    steady-state reads need the copy.
    """

    def __init__(self, model: nn.Module, spec: BlockTap, role: str):
        self.spec, self.role = spec, role
        self.block = model.get_submodule(spec.module)
        self.inside = False
        self.relu_input = self.relu_input_version = self.relu_result = None
        self.output = self.output_version = None
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
            self.relu_input, self.relu_input_version = relu_input, _version(relu_input)
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
        self.output_version = _version(self.output)
        for item, tensor in tensors:
            self._keep(Tap(self.spec.module, bn=self.spec.bn, item=item), tensor)
        if self.held_bn_output is not None:
            self._keep(Tap(self.spec.module, bn=self.spec.bn, bn_output_at_end=True), self.held_bn_output)

    def resolve(self) -> tuple[Tap, bool, torch.Tensor]:
        """(the tap that reads the pre-ReLU feature, whether it needs a copy, this forward's feature)."""
        block = f"{self.role} block {self.spec.module!r} ({type(self.block).__name__})"
        alternatives = _ALTERNATIVES.format(role=self.role)
        if self.output is None:
            raise ValueError(f"{block} did not return a tensor: {alternatives}")
        if self.relu_result is not None and self.relu_result is self.output:
            truth, truth_version = self.relu_input, self.relu_input_version
        elif self.fed_to_relu:
            truth, truth_version = self.output, self.output_version
        else:
            activations = non_relu_activations(self.block)
            if activations:
                raise ValueError(
                    f"{block} ends in {', '.join(activations)}, not a ReLU: OFD's margin ReLU and pre-ReLU "
                    f"features are defined for ReLU networks. Distil it with ofdkern.ChannelAlignDistiller "
                    f"(channel-wise alignment, any activation), or {alternatives}")
            raise ValueError(
                f"{block} has no pre-ReLU feature: its output is neither the result of a ReLU call in the block "
                f"nor the input of a later one (pre-activation blocks such as WideResNet's normalize it first: "
                f"tap the BN whose output feeds the ReLU by name). Else {alternatives}")
        for tap, (copy, original, version) in self.candidates.items():
            if original is truth and version == truth_version:
                overwritten = version is None or _version(original) != version
                return tap, overwritten, copy
        raise ValueError(
            f"{block}: its final ReLU receives a tensor that no module returns (for example a functional ReLU after "
            f"an out-of-place residual add, out = out + identity), so no hook can read its pre-ReLU feature: "
            f"{alternatives}")


def _refuse_unchecked_forward(args, kwargs, role: str) -> None:
    """The first forward checks the taps: it needs eager execution and data."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"the {role} taps are checked on the first forward, which must run eagerly: run one forward before "
            f"torch.compile, or pass example_input to the distiller")
    first = args[0] if args else None
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 0:
        raise ValueError(f"the {role} taps are checked on the first forward, which needs a non-empty batch "
                         f"(got input of shape {tuple(first.shape)})")


def _refuse_relu_results(read_relu_result: Sequence[bool], role: str, describe: Callable[[int], str]) -> None:
    for stage, post_relu in enumerate(read_relu_result):
        if post_relu:
            raise ValueError(
                f"{role} stage {stage} ({describe(stage)}) reads what a ReLU returned: OFD needs pre-ReLU features "
                f"and this one is post-ReLU. Tap the block or stage by name (its pre-ReLU sum), or the module whose "
                f"output the ReLU receives")


class HookedTaps:
    """Stage features read by forward hooks: ``Tap``s as given, ``BlockTap``s resolved on the first forward.
    ``require_pre_relu`` (OFD): a tap that reads a ReLU's result is refused on the first forward.

    ``run(model, *inputs, **kwargs)`` returns ``(stage features, model output)`` of one forward pass."""

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

    def bns(self, model: nn.Module) -> list[nn.Module] | None:
        if any(spec.bn is None for spec in self.specs):
            return None
        return [model.get_submodule(spec.bn) for spec in self.specs]

    def run(self, model: nn.Module, *args, **kwargs):
        if not self.checked:
            return self._first_run(model, args, kwargs)
        self.capture.begin()
        try:
            output = model(*args, **kwargs)
        finally:
            self.capture.active = False
        return self.capture.finish(check=not torch.compiler.is_compiling()), output

    def _first_run(self, model: nn.Module, args, kwargs):
        _refuse_unchecked_forward(args, kwargs, self.role)
        probes = {index: _BlockProbe(model, spec, self.role) for index, spec in enumerate(self.specs)
                  if isinstance(spec, BlockTap) and self.capture.taps[index] is None}
        # The trace sees every torch call of the forward: only what needs it (block probes, OFD's check) pays.
        trace = _ReluTrace(list(probes.values())) if probes or self.require_pre_relu else None
        self.capture.begin()
        self.capture.trace = trace
        try:
            with trace if trace is not None else contextlib.nullcontext():
                output = model(*args, **kwargs)
        finally:
            self.capture.active = False
            self.capture.trace = None
            for probe in probes.values():
                probe.remove()
        features = self.capture.finish(check=True, skip=probes)
        resolved = {index: probe.resolve() for index, probe in probes.items()}
        for index, (tap, copy, feature) in resolved.items():
            self.capture.set_tap(model, index, tap, copy=copy)
            features[index] = feature
        if self.require_pre_relu:
            _refuse_relu_results(self.capture.read_relu_result, self.role, self.describe)
        self.checked = True
        return features, output


def _features_by_extract_feature(model: nn.Module, *args, **kwargs):
    features, output = model.extract_feature(*args, preReLU=True, **kwargs)
    return features, output


def _features_by_preact_feats(model: nn.Module, *args, stages: int | None, **kwargs):
    result = model(*args, **kwargs)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], dict)
            and "preact_feats" in result[1]):
        raise ValueError(f'taps="preact_feats" needs {type(model).__name__}.forward to return (logits, feats) '
                         f'with feats["preact_feats"] (the mdistiller convention), got {type(result).__name__}')
    output, feats = result
    preact = list(feats["preact_feats"])
    # mdistiller's first entry is the stem (post-ReLU); get_bn_before_relu() pairs with the last ones.
    return (preact[-stages:] if stages else preact[1:]), output


class FunctionTaps:
    """Stage features returned by a function of ``(model, *inputs)``: a model convention or the user's callable.
    ``require_pre_relu`` (OFD): a feature that is a ReLU's result is refused on the first forward."""

    def __init__(self, fn: FeatureFn, role: str, name: str, bns: list[nn.Module] | None = None,
                 require_pre_relu: bool = True):
        self.fn, self.role, self.name, self._bns = fn, role, name, bns
        self.require_pre_relu = require_pre_relu
        self.checked = False

    @property
    def taps(self):
        return self.name if self.name in MODEL_CONVENTIONS else self.fn

    def describe(self, stage: int) -> str:
        return f"feature {stage} of {self.name}"

    def bns(self, _model: nn.Module) -> list[nn.Module] | None:
        return self._bns

    def run(self, model: nn.Module, *args, **kwargs):
        if self.checked:
            features, output = self.fn(model, *args, **kwargs)
            return list(features), output
        _refuse_unchecked_forward(args, kwargs, self.role)
        with _ReluTrace() as trace:
            features, output = self.fn(model, *args, **kwargs)
        features = list(features)
        if self.require_pre_relu:
            _refuse_relu_results([trace.returned(f) for f in features], self.role, self.describe)
        self.checked = True
        return features, output


def _convention_taps(model: nn.Module, convention: str, role: str) -> FunctionTaps:
    bns = None
    if hasattr(model, "get_bn_before_relu"):
        bns = list(model.get_bn_before_relu())
        if not all(is_batch_norm(bn) for bn in bns):
            raise TypeError(f"{role}.get_bn_before_relu() must return BatchNorm modules, got "
                            f"{[type(bn).__name__ for bn in bns]}")
    if convention == "extract_feature":
        if not callable(getattr(model, "extract_feature", None)):
            raise ValueError(f'{role}_taps="extract_feature" needs {role}.extract_feature(x, preReLU=True) (the '
                             f'official OFD models\' method), which {type(model).__name__} does not have')
        return FunctionTaps(_features_by_extract_feature, role, convention, bns)
    stages = None if bns is None else len(bns)
    return FunctionTaps(functools.partial(_features_by_preact_feats, stages=stages), role, convention, bns)


def _explicit_taps(model: nn.Module, spec, role: str, from_name: Callable[[nn.Module, str], Tap | BlockTap],
                   accepted: str) -> list[Tap | BlockTap]:
    if isinstance(spec, (Tap, BlockTap, str)) or not isinstance(spec, Iterable):
        raise TypeError(f"{role}_taps must be None, {accepted}, got {type(spec).__name__}")
    taps = []
    for item in spec:
        if isinstance(item, str):
            taps.append(from_name(model, item))
        elif isinstance(item, (Tap, BlockTap)):
            for name in (item.module, getattr(item, "relu", None), item.bn):
                if name is not None:
                    model.get_submodule(name)
            taps.append(item)
        else:
            raise TypeError(f"{role}_taps entries must be module names or Tap objects, got {type(item).__name__}")
    if not taps:
        raise ValueError(f"{role}_taps is empty")
    return taps


def resolve_taps(model: nn.Module, spec, role: str) -> HookedTaps | FunctionTaps:
    """OFD's pre-ReLU taps of ``model`` from a ``teacher_taps`` / ``student_taps`` argument (see
    ``OFDDistiller``): None (``find_taps``), module names / ``Tap`` objects, a model convention or a callable."""
    if spec is None:
        taps = find_taps(model)
        if not taps:
            activations = non_relu_activations(model)
            if activations:
                raise ValueError(
                    f"{type(model).__name__} has no ReLU residual blocks and uses {', '.join(activations)} "
                    f"activations: OFD's margin ReLU and pre-ReLU features are defined for ReLU networks. Distil "
                    f"it with ofdkern.ChannelAlignDistiller (channel-wise alignment, any activation), or "
                    f"{_ALTERNATIVES.format(role=role)}")
            raise ValueError(
                f"no {role} taps found automatically in {type(model).__name__} (it recognizes ResNet and RegNet "
                f"residual blocks and MobileNetV2 InvertedResidual blocks): {_ALTERNATIVES.format(role=role)}")
        return HookedTaps(model, taps, role)
    if isinstance(spec, str):
        if spec not in MODEL_CONVENTIONS:
            raise ValueError(f"{role}_taps as a string must be one of the model conventions {MODEL_CONVENTIONS}, "
                             f"got {spec!r} (module names go in a list)")
        return _convention_taps(model, spec, role)
    if callable(spec):
        return FunctionTaps(spec, role, getattr(spec, "__name__", repr(spec)))
    accepted = f"a sequence of module names / Tap objects, one of {MODEL_CONVENTIONS} or a callable"
    return HookedTaps(model, _explicit_taps(model, spec, role, tap_from_name, accepted), role)


def resolve_stages(model: nn.Module, spec, role: str) -> HookedTaps | FunctionTaps:
    """Stage-output taps of ``model`` (channel alignment, FRSKD) from a taps argument: None (``find_stages``),
    module names (their outputs) / ``Tap`` objects, or a callable ``(model, *inputs) -> (features, output)``."""
    if spec is None:
        taps = find_stages(model)
        if not taps:
            raise ValueError(
                f"no {role} stages found automatically in {type(model).__name__} (it reads a timm model's "
                f"feature_info, ResNet / RegNet / MobileNetV2 blocks, or a `features` Sequential): pass {role}_taps "
                f"as module names (their outputs are the stage features), ofdkern.Tap objects or a callable "
                f"(model, *inputs) -> (features, output)")
        return HookedTaps(model, taps, role, require_pre_relu=False)
    if callable(spec) and not isinstance(spec, nn.Module):
        return FunctionTaps(spec, role, getattr(spec, "__name__", repr(spec)), require_pre_relu=False)
    accepted = "a sequence of module names / Tap objects or a callable"
    return HookedTaps(model, _explicit_taps(model, spec, role, _output_tap, accepted), role, require_pre_relu=False)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Runs ``module`` in eval mode (no BN statistics update), then restores every submodule's own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training
