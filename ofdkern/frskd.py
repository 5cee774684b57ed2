"""FRSKD (Ji et al., CVPR 2021): the BiFPN-style self-teacher and the training loss.

The self-teacher follows the reference ``BiFPNc`` (MingiJi/FRSKD, classification/models/bifpnc.py) with one
BiFPN layer: lateral 1x1 convs widen stage i to ``width * c_i`` channels, a top-down path (nearest 2x
upsampling) and a bottom-up path (same-padded 3x3/2 max pooling) merge neighbouring stages with fast normalized
fusion ``relu(w) / (sum relu(w) + 1e-6)``, each merge feeds a stack of depthwise-separable 3x3 convs, and a
linear head on the pooled last refined feature gives the self-teacher's logits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._backends import check_backend_name
from ._validation import check_non_negative_number, check_positive_int, check_positive_number
from .ops import attention_transfer_loss, kd_loss

FUSION_EPS = 1e-6


def _pointwise(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv + BN + ReLU: the lateral and resampling projections."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


def _separable_stack(channels: int, depth: int) -> nn.Sequential:
    """``depth`` depthwise 3x3 + pointwise 1x1 + BN units, ReLU between units (none after the last)."""
    units = []
    for index in range(depth):
        unit = [] if index == 0 else [nn.ReLU()]
        unit += [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                 nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)]
        units.append(nn.Sequential(*unit))
    return nn.Sequential(*units)


class _SamePadMaxPool(nn.Module):
    """3x3 stride-2 max pooling with TensorFlow "same" zero padding: output ceil(H/2) x ceil(W/2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            extra = (math.ceil(size / 2) - 1) * 2 - size + 3
            pads += [extra // 2, extra - extra // 2]
        return F.max_pool2d(F.pad(x, pads), kernel_size=3, stride=2)


def _fusion_weights(weights: torch.Tensor) -> torch.Tensor:
    w = F.relu(weights)
    return w / (w.sum() + FUSION_EPS)


class SelfTeacher(nn.Module):
    """The FRSKD self-teacher: refines the classifier's stage features and classifies from them.

    Args:
        channels: channels of the classifier stages fed in, shallow to deep (e.g. (64, 128, 256, 512) for a
            CIFAR ResNet-18); each stage halves the spatial size of the one before.
        num_classes: classes of the logits head.
        width: channel multiplier of the refined features (stage i gets ``width * channels[i]``).
        depth: depthwise-separable units per fusion node.

    ``forward(features)`` takes the list of stage features and returns ``(refined, logits)``: the refined
    features T_i (after ReLU, ``width * channels[i]`` channels, the stage's spatial size) and (N, num_classes)
    logits.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, width: int = 2, depth: int = 2):
        super().__init__()
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) < 2:
            raise ValueError(f"channels must list at least two stage widths, got {channels!r}")
        channels = [check_positive_int(f"channels[{index}]", c) for index, c in enumerate(channels)]
        num_classes = check_positive_int("num_classes", num_classes)
        width = check_positive_int("width", width)
        depth = check_positive_int("depth", depth)
        wide = [c * width for c in channels]
        levels = len(channels)
        self.channels = tuple(channels)
        # Lateral projections of every stage into the top-down path, and of stages 1.. into the bottom-up path.
        self.lateral = nn.ModuleList(_pointwise(c, w) for c, w in zip(channels, wide))
        self.lateral_bottom_up = nn.ModuleList(_pointwise(c, w) for c, w in zip(channels[1:], wide[1:]))
        # Top-down node i (< levels - 1) fuses lateral i with the upsampled node i + 1.
        self.upsample_proj = nn.ModuleList(_pointwise(wide[i + 1], wide[i]) for i in range(levels - 1))
        self.top_down = nn.ModuleList(_separable_stack(wide[i], depth) for i in range(levels - 1))
        self.top_down_weights = nn.ParameterList(nn.Parameter(torch.ones(2)) for _ in range(levels - 1))
        # Bottom-up node i (>= 1) fuses lateral i, top-down node i (not at the deepest level) and the
        # downsampled bottom-up node i - 1.
        self.downsample = nn.ModuleList(
            nn.Sequential(_SamePadMaxPool(), _pointwise(wide[i - 1], wide[i])) for i in range(1, levels))
        self.bottom_up = nn.ModuleList(_separable_stack(wide[i], depth) for i in range(1, levels))
        self.bottom_up_weights = nn.ParameterList(
            nn.Parameter(torch.ones(3 if i < levels - 1 else 2)) for i in range(1, levels))
        self.fc = nn.Linear(wide[-1], num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        if len(features) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} stage features, got {len(features)}")
        for index, (feature, c) in enumerate(zip(features, self.channels)):
            if not isinstance(feature, torch.Tensor) or feature.dim() != 4 or feature.shape[1] != c:
                got = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
                raise ValueError(f"feature {index} must be (N, {c}, H, W), got {got}")
        shapes = [tuple(f.shape) for f in features]
        for index in range(1, len(features)):
            # The bottom-up path pools stage i - 1 (3x3, stride 2, same padding) onto stage i.
            halved = tuple(-(-size // 2) for size in shapes[index - 1][2:])
            if shapes[index][0] != shapes[0][0] or shapes[index][2:] != halved:
                raise ValueError(f"each stage feature must have the batch of the first and half the spatial size "
                                 f"of the one before (rounded up): feature {index} should be (N={shapes[0][0]}, "
                                 f"{self.channels[index]}, {halved[0]}, {halved[1]}), got stage shapes {shapes}")
        activated = [F.relu(f) for f in features]
        lateral = [proj(f) for proj, f in zip(self.lateral, activated)]
        lateral_up = [proj(f) for proj, f in zip(self.lateral_bottom_up, activated[1:])]

        levels = len(features)
        top_down = [None] * levels
        top_down[-1] = lateral[-1]
        for i in reversed(range(levels - 1)):
            w = _fusion_weights(self.top_down_weights[i])
            upsampled = F.interpolate(F.relu(top_down[i + 1]), size=lateral[i].shape[-2:], mode="nearest")
            top_down[i] = self.top_down[i](w[0] * F.relu(lateral[i]) + w[1] * self.upsample_proj[i](upsampled))

        refined = [top_down[0]]
        for i in range(1, levels):
            w = _fusion_weights(self.bottom_up_weights[i - 1])
            fused = w[0] * F.relu(lateral_up[i - 1]) + w[-1] * self.downsample[i - 1](F.relu(refined[-1]))
            if i < levels - 1:
                fused = fused + w[1] * F.relu(top_down[i])
            refined.append(self.bottom_up[i - 1](fused))

        refined = [F.relu(f) for f in refined]
        logits = self.fc(F.adaptive_avg_pool2d(refined[-1], 1).flatten(1))
        return refined, logits


class FRSKDLoss(nn.Module):
    """The FRSKD training loss ``CE(z_s) + CE(z_t) + alpha * KD(z_s, z_t) + beta * sum_i AT(F_i, T_i)``.

    The distillation terms update only the classifier, as in the paper: the self-teacher's logits and refined
    features are detached inside KD and AT (the self-teacher learns from its own cross-entropy).

    Args:
        alpha: weight of the soft-label KD term (2 on CIFAR-100).
        beta: weight of the attention-transfer term (100 on CIFAR-100).
        temperature: KD temperature (4).
        backend: backend of the fused losses ("auto", "triton", "cuda", "cpu" or "reference").

    ``forward(student_logits, teacher_logits, student_features, teacher_features, targets)`` returns the
    scalar loss; the classifier's features F_i and the refined T_i must pair up in batch and spatial size.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 100.0, temperature: float = 4.0, backend: str = "auto"):
        super().__init__()
        alpha = check_non_negative_number("alpha", alpha)
        beta = check_non_negative_number("beta", beta)
        temperature = check_positive_number("temperature", temperature)
        check_backend_name(backend)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.backend = backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        if len(student_features) != len(teacher_features):
            raise ValueError(f"got {len(student_features)} student features and {len(teacher_features)} "
                             f"teacher features")
        loss = F.cross_entropy(student_logits, targets) + F.cross_entropy(teacher_logits, targets)
        loss = loss + self.alpha * kd_loss(student_logits, teacher_logits.detach(), temperature=self.temperature,
                                           backend=self.backend)
        feature_loss = sum(attention_transfer_loss(f, t.detach(), backend=self.backend)
                           for f, t in zip(student_features, teacher_features))
        return loss + self.beta * feature_loss
