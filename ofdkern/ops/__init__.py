"""Fused ops: each module registers its custom ops (kernels, autograd, fake kernels) with torch.library."""
from .align import channel_align_loss, set_cpu_bfloat16_gemms
from .attention_transfer import attention_transfer_loss
from .cwd import cwd_loss
from .kd import kd_loss
from .ofd import ofd_loss

__all__ = ["attention_transfer_loss", "channel_align_loss", "cwd_loss", "kd_loss", "ofd_loss", "set_cpu_bfloat16_gemms"]
