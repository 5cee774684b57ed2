"""ofdkern: fused kernels for feature knowledge distillation losses."""
from ._backends import BACKENDS, BackendUnavailableError, backend_status
from .margins import DataMarginEstimator, margin_from_bn
from .modules import Connector, OFDLoss
from .ops import ofd_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Connector",
    "DataMarginEstimator",
    "OFDLoss",
    "backend_status",
    "margin_from_bn",
    "ofd_loss",
]
