"""ofdkern: fused kernels for feature knowledge distillation losses."""
from ._backends import BACKENDS, BackendUnavailableError, backend_status, registered_ops
from .cpu_buffers import cpu_buffer_cache_bytes, empty_cpu_buffer_cache, set_cpu_buffer_cache_limit
from .distill import ChannelAlignDistiller, FRSKDDistiller, OFDDistiller
from .frskd import FRSKDLoss, SelfTeacher
from .margins import DataMarginEstimator, margin_from_bn
from .modules import ChannelAlign, Connector, OFDLoss
from .ops import attention_transfer_loss, channel_align_loss, cwd_loss, kd_loss, ofd_loss, set_cpu_bfloat16_gemms
from .taps import BlockTap, Tap, find_stages, find_taps

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "BlockTap",
    "ChannelAlign",
    "ChannelAlignDistiller",
    "Connector",
    "DataMarginEstimator",
    "FRSKDDistiller",
    "FRSKDLoss",
    "OFDDistiller",
    "OFDLoss",
    "SelfTeacher",
    "Tap",
    "attention_transfer_loss",
    "backend_status",
    "channel_align_loss",
    "cpu_buffer_cache_bytes",
    "cwd_loss",
    "empty_cpu_buffer_cache",
    "find_stages",
    "find_taps",
    "kd_loss",
    "margin_from_bn",
    "ofd_loss",
    "registered_ops",
    "set_cpu_bfloat16_gemms",
    "set_cpu_buffer_cache_limit",
]
