"""The CPU backends' cache of feature-sized output buffers (csrc/cpu_buffers.h).

The fused CPU kernels write their feature-sized outputs (the gradient buffers) into 2 MiB-aligned blocks on
transparent huge pages. A freed block goes to a cache and serves the next request of the same size, so a
training loop that calls the loss with the same shapes every step does not fault in (and have the OS zero)
a fresh 100 MB buffer per step. It is the CPU counterpart of PyTorch's CUDA caching allocator, limited to
these buffers: the cache holds at most 2 GiB by default (``OFDKERN_CPU_CACHE_MB`` sets the cap in MiB at
import, ``set_cpu_buffer_cache_limit`` at run time; 0 turns caching off).

Without the C++ extension there is no cache: these functions then report and change nothing.
"""
from __future__ import annotations

import torch

from ._backends import backend_status

# Registered by ofdkern._C, which _backends imported if it could.
HAS_CACHE = backend_status()["cpu"]["built"] and hasattr(torch.ops.ofdkern, "cpu_buffer_cache_bytes")


def cpu_buffer_cache_bytes() -> int:
    """Bytes of freed buffers the cache holds for reuse."""
    return torch.ops.ofdkern.cpu_buffer_cache_bytes() if HAS_CACHE else 0


def set_cpu_buffer_cache_limit(limit_bytes: int) -> int:
    """Caps the cache at ``limit_bytes`` (0 turns it off), releasing the oldest buffers over the cap to the
    system. Returns the previous cap."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"set_cpu_buffer_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    return torch.ops.ofdkern.set_cpu_buffer_cache_limit(limit_bytes) if HAS_CACHE else 0


def empty_cpu_buffer_cache() -> None:
    """Releases every cached buffer to the system (the cap stays as it is)."""
    if HAS_CACHE:
        set_cpu_buffer_cache_limit(set_cpu_buffer_cache_limit(0))
