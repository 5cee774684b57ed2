"""Which kernels exist on this machine, and which one an op call runs on."""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built, or cannot run on the tensors' device."""


def _load_extension():
    if os.environ.get("OFDKERN_DISABLE_EXTENSION", "0") == "1":
        return None, "disabled by OFDKERN_DISABLE_EXTENSION=1"
    try:
        return importlib.import_module("ofdkern._C"), None
    except ImportError as error:  # not built (OFDKERN_NO_EXTENSION=1) or built against another torch
        return None, f"ofdkern._C is not importable ({error}); reinstall ofdkern without OFDKERN_NO_EXTENSION"


_EXTENSION, _EXTENSION_ERROR = _load_extension()


def _compiled_kernels() -> dict[str, tuple[str, ...]]:
    """For the C++ backends ("cpu", "cuda"): the ofdkern ops of the extension that have a kernel there."""
    ops = [] if _EXTENSION is None else [
        name for name in torch._C._dispatch_get_all_op_names() if name.startswith("ofdkern::")]
    return {backend: tuple(sorted(op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, key)))
            for backend, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_CPP_KERNELS = _compiled_kernels()


def _triton_problem() -> str | None:
    """Why Triton cannot be imported, or None. Checked without importing it (that takes seconds)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def _status() -> dict[str, dict]:
    cuda_device = torch.cuda.is_available()
    triton_problem = _triton_problem()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    cpu_built = bool(_CPP_KERNELS["cpu"])
    cuda_built = bool(_CPP_KERNELS["cuda"])

    def entry(built, devices, why_not):
        return {"built": built, "devices": devices, "available": bool(devices), "reason": why_not}

    triton_devices = []
    if triton_problem is None:
        if cuda_device:
            triton_devices.append("cuda")
        if interpret:
            triton_devices.append("cpu")
    if triton_problem is not None:
        triton_why = triton_problem
    elif not triton_devices:
        triton_why = "no CUDA device; on CPU tensors it runs only under TRITON_INTERPRET=1 (set before import)"
    else:
        triton_why = None

    if not cuda_built:
        cuda_why = _EXTENSION_ERROR or (
            "ofdkern._C was built without CUDA kernels (CPU-only torch, no nvcc, or no GPU at build time; "
            "rebuild with OFDKERN_FORCE_CUDA=1)")
    elif not cuda_device:
        cuda_why = "built, but torch sees no CUDA device"
    else:
        cuda_why = None

    return {
        "triton": entry(triton_problem is None, triton_devices, triton_why),
        "cuda": entry(cuda_built, ["cuda"] if cuda_built and cuda_device else [], cuda_why),
        "cpu": entry(cpu_built, ["cpu"] if cpu_built else [], None if cpu_built else _EXTENSION_ERROR),
        "reference": entry(True, ["cpu", "cuda"] if cuda_device else ["cpu"], None),
    }


# Computed once: op calls consult it on every call (also while torch.compile traces them).
_STATUS = _status()
# Whether the C++ CPU kernels run on torch's intra-op threads (the extension was built with OpenMP).
_CPU_KERNELS_PARALLEL = bool(_CPP_KERNELS["cpu"]) and torch.ops.ofdkern.cpu_kernels_parallel()


def backend_status() -> dict[str, dict]:
    """For each backend: ``built``, ``available`` (on some device of this machine), ``devices``
    (the tensor device types it runs on), ``reason`` (why it is unavailable, or None) and, for the C++
    backends, ``ops`` (the compiled ops that have a kernel there); for "cpu", ``parallel`` (whether its kernels
    run on ``torch.get_num_threads()`` threads: the extension was built with OpenMP)."""
    status = {name: dict(entry, devices=list(entry["devices"])) for name, entry in _STATUS.items()}
    for name, ops in _CPP_KERNELS.items():
        status[name]["ops"] = list(ops)
    status["cpu"]["parallel"] = _CPU_KERNELS_PARALLEL
    return status


# Preference of "auto" per device type: fastest first.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
_warned_fallback: set[tuple[str, str]] = set()


def _runs(backend: str, device_type: str, cpp_op: str) -> bool:
    if device_type not in _STATUS[backend]["devices"]:
        return False
    return backend not in _CPP_KERNELS or cpp_op in _CPP_KERNELS[backend]


def triton_status() -> dict:
    """Triton's entry of the status computed at import (read-only: not a copy, unlike ``backend_status``)."""
    return _STATUS["triton"]


def resolve_backend(backend: str, device: torch.device, cpp_op: str) -> str:
    """The backend that runs an op on tensors of ``device``; raises if ``backend`` cannot. ``cpp_op`` is the
    extension op the "cpu" and "cuda" backends would call (not every op has a kernel on every device)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            if _runs(name, device.type, cpp_op):
                return name
        if (device.type, cpp_op) not in _warned_fallback:
            _warned_fallback.add((device.type, cpp_op))
            warnings.warn(
                f"ofdkern: no fused kernel for {cpp_op} is available for {device.type} tensors, using the eager "
                f"reference (see ofdkern.backend_status())", RuntimeWarning, stacklevel=3)
        return "reference"
    if not _runs(backend, device.type, cpp_op):
        reason = _STATUS[backend]["reason"]
        if reason is None and device.type in _STATUS[backend]["devices"]:
            reason = f"the extension has no {backend} kernel for {cpp_op}"
        reason = reason or f"it does not run on {device.type} tensors"
        available = [name for name in _STATUS if name == "reference" or _runs(name, device.type, cpp_op)]
        raise BackendUnavailableError(
            f"backend {backend!r} cannot run on {device.type} tensors: {reason}. Available here: {available}")
    return backend
