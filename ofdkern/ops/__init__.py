"""Fused ops: each module registers its custom ops (kernels, autograd, fake kernels) with torch.library."""
from .ofd import ofd_loss

__all__ = ["ofd_loss"]
