"""ofdkern: fused kernels for feature knowledge distillation losses."""
from ._backends import BACKENDS, BackendUnavailableError, backend_status
from .ops import ofd_loss

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "backend_status", "ofd_loss"]
