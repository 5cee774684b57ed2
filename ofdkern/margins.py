"""Per-channel OFD margins: from the teacher's BatchNorm before the ReLU, or from the teacher's features.

The margin of a channel is the expected value of its negative pre-ReLU responses (Heo et al., ICCV 2019,
Eq. 10 and Appendix A). ``margin_from_bn`` derives it from the BN's affine parameters assuming a Gaussian
response; ``DataMarginEstimator`` measures it on real teacher features (reference issue #7).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ._validation import check_positive_int, check_tensor

# Below this negative-side probability the reference replaces the conditional mean by -3 * sigma
# (1 / Phi would blow up).
_MIN_NEGATIVE_PROBABILITY = 0.001


def is_batch_norm(module) -> bool:
    """A torch BatchNorm, or a frozen one (``torchvision.ops.FrozenBatchNorm2d``, timm's): per-channel
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` tensors and an ``eps``, always normalizing with the
    running statistics. Frozen ones are how torchvision's detection and segmentation backbones ship."""
    if isinstance(module, _BatchNorm):
        return True
    if not isinstance(module, nn.Module) or isinstance(module, _InstanceNorm) or not hasattr(module, "eps"):
        return False
    tensors = [getattr(module, name, None) for name in ("weight", "bias", "running_mean", "running_var")]
    return all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape == tensors[0].shape for t in tensors)


def batch_norm_channels(bn: nn.Module) -> int:
    """The channel count of a module for which ``is_batch_norm`` holds."""
    return bn.num_features if isinstance(bn, _BatchNorm) else bn.weight.numel()


def margin_as_vector(margin: torch.Tensor) -> torch.Tensor:
    """A per-channel margin of shape (C,), (1, C, 1, ...) (the reference's buffer) or (C, 1, ...) (what broadcasts
    against (N, C, H, W) from the right) as a detached (C,) copy."""
    check_tensor("margin", margin, min_dim=1, max_dim=5)
    shape = tuple(margin.shape)
    leading_one = shape[0] == 1 and all(size == 1 for size in shape[2:])
    trailing_ones = all(size == 1 for size in shape[1:])
    if margin.dim() > 1 and not (leading_one or trailing_ones):
        raise ValueError(f"margin must have shape (C,), (1, C, 1, ...) or (C, 1, ...), got {shape}")
    return margin.detach().reshape(-1).clone()


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) in float64, with the branches of the cephes ``ndtr`` that the reference's
    ``scipy.stats.norm.cdf`` runs: ``erf`` near 0 and ``erfc`` in the tails, so the left tail keeps its
    relative accuracy (``torch.special.ndtr`` loses about a hundred ulps near Phi = 0.001, the threshold)."""
    scaled = x * math.sqrt(0.5)
    magnitude = scaled.abs()
    near_zero = 0.5 + 0.5 * torch.erf(scaled)
    tail = 0.5 * torch.erfc(magnitude)
    tail = torch.where(scaled > 0, 1.0 - tail, tail)
    return torch.where(magnitude < math.sqrt(0.5), near_zero, tail)


@torch.no_grad()
def margin_from_bn(bn: nn.Module) -> torch.Tensor:
    """The OFD margin of every channel from the BatchNorm that precedes the teacher's ReLU.

    For a channel with ``s = |gamma|`` and ``b = beta`` the BN output is taken as ``N(b, s^2)`` and the margin
    is ``E[x | x < 0] = b - s * phi(b/s) / Phi(-b/s)`` when ``Phi(-b/s) > 0.001``, else ``-3 s`` — the reference
    ``get_margin_from_BN``, evaluated in float64 with its operation order and rounded once to float32.
    torch's float64 ``exp``/``erf``/``erfc`` may differ from the reference's libm/scipy ones in the last bits
    (up to ~100 float64 ulps of the margin just above the threshold, where the subtraction cancels), which
    changes the float32 result only for a value that close to a float32 rounding boundary: about one channel
    in 10^6 at worst; none of 3 * 10^5 random channels differ.

    Defined where the reference is not: ``gamma = 0`` (the reference divides by zero) makes the feature the
    constant ``beta``, so its margin is ``min(beta, 0)``. A BN without affine parameters (``affine=False``)
    outputs ``N(0, 1)`` features: ``gamma = 1, beta = 0``, margin ``-sqrt(2/pi)`` for every channel. NaN
    parameters give what the reference gives (NaN, or ``-3 s`` when only beta is NaN).

    Args:
        bn: any ``torch.nn`` BatchNorm (1d/2d/3d, SyncBatchNorm, an initialized lazy one), or a frozen BatchNorm
            (``torchvision.ops.FrozenBatchNorm2d``, timm's; its ``weight`` and ``bias`` buffers are gamma and
            beta); parameters of any float dtype.

    Returns:
        A detached float32 tensor of shape (C,) on the device of ``bn``'s parameters (buffers when it has
        none, CPU when it has neither).
    """
    if not is_batch_norm(bn):
        raise TypeError(f"bn must be a torch.nn BatchNorm module or a frozen BatchNorm, got {type(bn).__name__}")
    if not isinstance(bn, _BatchNorm):
        gamma, beta = bn.weight.double(), bn.bias.double()
    elif bn.affine:
        if nn.parameter.is_lazy(bn.weight):
            raise ValueError("bn is a lazy BatchNorm that has not seen an input yet: run a forward pass first")
        gamma, beta = bn.weight.double(), bn.bias.double()
    else:
        device = bn.running_mean.device if bn.running_mean is not None else torch.device("cpu")
        gamma = torch.ones(bn.num_features, dtype=torch.float64, device=device)
        beta = torch.zeros_like(gamma)
    sigma = gamma.abs()
    # The reference's expression, operation by operation (z = m / s there).
    z = beta / sigma
    negative_probability = _normal_cdf(-z)
    conditional_mean = -sigma * torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi) / negative_probability + beta
    margin = torch.where(negative_probability > _MIN_NEGATIVE_PROBABILITY, conditional_mean, -3 * sigma)
    margin = torch.where(sigma == 0, beta.clamp(max=0), margin)
    return margin.float()


class DataMarginEstimator(nn.Module):
    """Running per-channel mean of the negative teacher responses: the OFD margin measured on data
    (reference issue #7), instead of the Gaussian assumption of ``margin_from_bn``.

    ``update`` adds a batch's per-channel sum and count of negative values to float64 / int64 buffers, so the
    estimate is the exact mean over every value seen (not a momentum average), independent of how the data was
    split into batches, and it is saved by ``state_dict``. Both buffers are additive: to combine data-parallel
    ranks, all-reduce (sum) ``negative_sum`` and ``negative_count``. Keep it out of ``.half()`` / ``.to(dtype)``
    calls: those would cast the float64 sum like any floating-point buffer.

    Example::

        estimator = DataMarginEstimator(256).to(device)
        for images, _ in loader:
            estimator.update(teacher_stage(images))
        loss = OFDLoss(estimator.margin)
    """

    negative_sum: torch.Tensor
    negative_count: torch.Tensor

    def __init__(self, num_channels: int, device: torch.device | str | None = None):
        super().__init__()
        num_channels = check_positive_int("num_channels", num_channels)
        self.num_channels = num_channels
        self.register_buffer("negative_sum", torch.zeros(num_channels, dtype=torch.float64, device=device))
        self.register_buffer("negative_count", torch.zeros(num_channels, dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, teacher_features: torch.Tensor) -> None:
        """Accumulate the negative values of a batch of teacher features, shape (N, C, ...) with 2 to 5 dims,
        any float dtype and memory layout, on this module's device. No host synchronization."""
        check_tensor("teacher_features", teacher_features, min_dim=2, max_dim=5)
        if teacher_features.shape[1] != self.num_channels:
            raise ValueError(
                f"teacher_features must have {self.num_channels} channels on dim 1, got shape "
                f"{tuple(teacher_features.shape)}")
        if teacher_features.device != self.negative_sum.device:
            raise ValueError(
                f"teacher_features is on {teacher_features.device} but the estimator is on "
                f"{self.negative_sum.device}: move one of them (estimator.to(device))")
        reduce_dims = [d for d in range(teacher_features.dim()) if d != 1]
        # Positive values become 0 (NaN stays NaN and poisons its channel, like it would the loss).
        negatives = teacher_features.clamp(max=0)
        self.negative_sum += negatives.sum(dim=reduce_dims, dtype=torch.float64)
        self.negative_count += (teacher_features < 0).sum(dim=reduce_dims)

    @property
    def margin(self) -> torch.Tensor:
        """The float32 (C,) margin: mean of the negative values seen per channel, always <= 0. A channel with no
        negative value yet gets 0: on such data ``max(t, m)`` and the partial L2 are the same for every
        ``m <= 0``, and 0 turns the margin ReLU into a plain ReLU."""
        mean = self.negative_sum / self.negative_count.clamp(min=1)
        return mean.float()

    def reset(self) -> None:
        """Forget every value seen."""
        self.negative_sum.zero_()
        self.negative_count.zero_()

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"
