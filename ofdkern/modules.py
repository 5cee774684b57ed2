"""nn.Modules of OFD (Heo et al., ICCV 2019): the loss with its margin buffer, and the student connector; and the
channel-wise alignment of Liu et al. (ICCVW 2023)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._backends import check_backend_name
from ._validation import ALIGN_REDUCTIONS, check_positive_int, check_reduction, check_tensor
from .margins import margin_as_vector, margin_from_bn
from . import reference
from .ops import channel_align_loss, ofd_loss


class OFDLoss(nn.Module):
    """OFD distillation loss with its per-channel margins: margin ReLU on the teacher feature, partial L2 to
    the (connected) student feature. ``forward(student, teacher)`` is ``ofdkern.ofd_loss``.

    Args:
        margin: per-channel margins, shape (C,), (1, C, 1, ...) or (C, 1, ...), any float dtype (it takes part in dtype
            promotion like the reference's ``torch.max(t, m)``). Kept as a (C,) buffer, so it follows
            ``.to(device)`` and is saved by ``state_dict``.
        reduction: "sum" (the reference), "mean", "batchmean" or "none".
        backend: "auto", "triton", "cuda", "cpu" or "reference"; resolved for the features' device at each call.

    The teacher feature is used as given: detach it (as the reference distiller does) unless gradients to the
    teacher are wanted.
    """

    margin: torch.Tensor

    def __init__(self, margin: torch.Tensor, reduction: str = "sum", backend: str = "auto"):
        super().__init__()
        check_reduction(reduction)
        check_backend_name(backend)
        self.register_buffer("margin", margin_as_vector(margin))
        self.reduction = reduction
        self.backend = backend

    @classmethod
    def from_bn(cls, bn: _BatchNorm, **kwargs) -> "OFDLoss":
        """The loss with the margins of the teacher BatchNorm before the ReLU (``margin_from_bn``)."""
        return cls(margin_from_bn(bn), **kwargs)

    @property
    def num_channels(self) -> int:
        return self.margin.numel()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return ofd_loss(student, teacher, self.margin, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"channels={self.num_channels}, reduction={self.reduction!r}, backend={self.backend!r}"


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Connector(nn.Sequential):
    """The OFD student transform: a 1x1 convolution (no bias) to the teacher's channel count, then BatchNorm
    (used in train mode).

    Initialized like the reference ``build_feature_connector``: conv weights ~ N(0, 2 / (k * k * out_channels))
    (He-normal over the fan-out), BN gamma 1 and beta 0. Being a Sequential of (conv, bn), its ``state_dict``
    keys ("0.weight", "1.running_mean", ...) match the reference's, so reference checkpoints load.

    Args:
        in_channels: student channels, a positive int.
        out_channels: teacher channels, a positive int.
        dims: spatial dims of the features: 2 for (N, C, H, W) (default), 1 for (N, C, L), 3 for (N, C, D, H, W).
        device, dtype: of the parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        in_channels = check_positive_int("in_channels", in_channels)
        out_channels = check_positive_int("out_channels", out_channels)
        if dims not in _CONVS:
            raise ValueError(f"dims must be 1, 2 or 3 (spatial dims of the features), got {dims!r}")
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            _CONVS[dims](in_channels, out_channels, kernel_size=1, bias=False, **factory),
            _BATCH_NORMS[dims](out_channels, **factory),
        )
        self.reset_parameters()

    @property
    def conv(self) -> nn.Module:
        return self[0]

    @property
    def bn(self) -> nn.Module:
        return self[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_out = math.prod(self.conv.kernel_size) * self.conv.out_channels
        self.conv.weight.normal_(0, math.sqrt(2.0 / fan_out))
        self.bn.reset_parameters()  # gamma 1, beta 0, fresh running statistics


class ChannelAlign(nn.Module):
    """Channel-wise transformation distillation (Liu et al., ICCVW 2023): a per-pixel MLP on the student feature
    (1x1 conv -> ReLU -> 1x1 conv), then L2 to the teacher feature, or OFD's margin ReLU + partial L2 when
    ``ofd_margin`` is given. ``forward(student, teacher)`` is ``ofdkern.channel_align_loss`` with this module's
    weights: the projected student is never materialized.

    Args:
        s_channels, t_channels: student and teacher channels.
        hidden: width of the hidden layer (default: ``t_channels``).
        ofd_margin: optional per-teacher-channel margins, (Ct,) or (1, Ct, 1, ...); kept as a (Ct,) buffer.
        reduction: "sum", "mean" or "batchmean".
        backend: "auto", "triton", "cuda", "cpu" or "reference".
        device, dtype: of the parameters.

    The two convolutions are ``nn.Conv2d`` 1x1 layers with bias and their default initialization; their (out, in,
    1, 1) weights serve features of any spatial rank.
    """

    margin: torch.Tensor | None

    def __init__(self, s_channels: int, t_channels: int, hidden: int | None = None,
                 ofd_margin: torch.Tensor | None = None, reduction: str = "sum", backend: str = "auto", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        s_channels = check_positive_int("s_channels", s_channels)
        t_channels = check_positive_int("t_channels", t_channels)
        hidden = t_channels if hidden is None else check_positive_int("hidden", hidden)
        check_reduction(reduction, ALIGN_REDUCTIONS)
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(s_channels, hidden, kernel_size=1, **factory)
        self.conv2 = nn.Conv2d(hidden, t_channels, kernel_size=1, **factory)
        margin = None
        if ofd_margin is not None:
            margin = margin_as_vector(ofd_margin)
            if margin.numel() != t_channels:
                raise ValueError(f"ofd_margin must have {t_channels} values (teacher channels), got {margin.numel()}")
            margin = margin.to(device=device)
        self.register_buffer("margin", margin)
        self.reduction = reduction
        self.backend = backend

    def project(self, student: torch.Tensor) -> torch.Tensor:
        """The transformed student feature, materialized (eager; for inspection, not for the loss)."""
        hidden = torch.relu(reference.pointwise_conv(student, self.conv1.weight, self.conv1.bias))
        return reference.pointwise_conv(hidden, self.conv2.weight, self.conv2.bias)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        # Named for the module's arguments: the weights' shapes would otherwise be what the op complains about.
        for name, feature, channels in (("student", student, self.conv1.in_channels),
                                        ("teacher", teacher, self.conv2.out_channels)):
            check_tensor(name, feature, min_dim=2, max_dim=5)
            if feature.shape[1] != channels:
                raise ValueError(f"{name} must have {channels} channels on dim 1 (ChannelAlign"
                                 f"({self.conv1.in_channels}, {self.conv2.out_channels})), got shape "
                                 f"{tuple(feature.shape)}")
        return channel_align_loss(student, teacher, self.conv1.weight, self.conv1.bias, self.conv2.weight,
                                  self.conv2.bias, margin=self.margin, reduction=self.reduction,
                                  backend=self.backend)

    def extra_repr(self) -> str:
        return (f"margin={self.margin is not None}, reduction={self.reduction!r}, backend={self.backend!r}")
