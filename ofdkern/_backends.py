"""The backend registry: which kernels exist on this machine, which backend can run which op on which device,
and the one rule that picks the backend of an op call.

Each op declares its fused backends once (``register_op``): the extension ops each one calls. Every op call
then resolves through ``resolve`` with the same
rules: an explicit backend runs or raises ``BackendUnavailableError`` naming why and what is available here;
"auto" takes the first backend of ``AUTO_ORDER`` for the tensors' device that runs the call, and falls back to
the eager reference with one warning per op and device type.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
FUSED_BACKENDS = ("triton", "cuda", "cpu")
# "auto", fastest first per device type (see docs/architecture.md); the reference is the last resort.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
# Device types the status reports per op (the reference runs on any device, meta included).
STATUS_DEVICES = ("cpu", "cuda")


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built, or cannot run this call on the tensors' device."""


def check_backend_name(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# ---- what this machine has (computed once at import: op calls consult it, also while torch.compile traces)

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


def _machine() -> dict[str, dict]:
    """Per backend: built, the device types it runs on here, and why it runs on none (or None)."""
    cuda_device = torch.cuda.is_available()
    # Checked without importing Triton (that takes seconds).
    triton_missing = importlib.util.find_spec("triton") is None
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"

    triton_devices = [] if triton_missing else ["cuda"] * cuda_device + ["cpu"] * interpret
    if triton_missing:
        triton_why = "triton is not installed (pip install triton)"
    elif not triton_devices:
        triton_why = "no CUDA device; on CPU tensors it runs only under TRITON_INTERPRET=1 (set before import)"
    else:
        triton_why = None

    cpu_built, cuda_built = bool(_CPP_KERNELS["cpu"]), bool(_CPP_KERNELS["cuda"])
    if not cuda_built:
        cuda_why = _EXTENSION_ERROR or (
            "ofdkern._C was built without CUDA kernels (CPU-only torch, no nvcc, or no GPU at build time; "
            "rebuild with OFDKERN_FORCE_CUDA=1)")
    else:
        cuda_why = None if cuda_device else "built, but torch sees no CUDA device"

    def entry(built, devices, why_not):
        return {"built": built, "devices": tuple(devices), "reason": why_not}

    return {
        "triton": entry(not triton_missing, triton_devices, triton_why),
        "cuda": entry(cuda_built, ["cuda"] if cuda_built and cuda_device else [], cuda_why),
        "cpu": entry(cpu_built, ["cpu"] if cpu_built else [], None if cpu_built else _EXTENSION_ERROR),
        "reference": entry(True, STATUS_DEVICES if cuda_device else ("cpu",), None),
    }


_MACHINE = _machine()
# Whether the C++ CPU kernels run on torch's intra-op threads (the extension was built with OpenMP).
_CPU_KERNELS_PARALLEL = bool(_CPP_KERNELS["cpu"]) and torch.ops.ofdkern.cpu_kernels_parallel()


def has_kernel(backend: str, op: str) -> bool:
    """Whether ofdkern._C has a kernel of extension op ``op`` ("ofdkern::...") for the C++ backend ``backend``."""
    return op in _CPP_KERNELS.get(backend, ())


# ---- the ops' declarations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """How one fused backend implements an op.

    kernels: the extension ops ("ofdkern::...") it calls; the "cpu" and "cuda" backends run only where
        ofdkern._C has a kernel of each for their device. Triton kernels are Python: it names none.
    """
    kernels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Op:
    name: str  # the public function, e.g. "ofd_loss"
    backends: Mapping[str, Backend] = field(default_factory=dict)


_OPS: dict[str, Op] = {}


def register_op(name: str, **backends: Backend) -> Op:
    """Declares the fused backends (keys among FUSED_BACKENDS) of the public op ``name``."""
    unknown = set(backends) - set(FUSED_BACKENDS)
    if unknown:
        raise ValueError(f"{name}: unknown backends {sorted(unknown)}; fused backends are {FUSED_BACKENDS}")
    op = Op(name, dict(backends))
    _OPS[name] = op
    return op


def _unavailable(op: Op, backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device_type`` tensors on this machine, or None."""
    if backend == "reference":
        return None
    spec = op.backends.get(backend)
    if spec is None:
        return f"{op.name} has no {backend} kernel"
    machine = _MACHINE[backend]
    if device_type not in machine["devices"]:
        return machine["reason"] or f"the {backend} backend does not run on {device_type} tensors"
    missing = [kernel for kernel in spec.kernels if not has_kernel(backend, kernel)]
    if missing:
        return f"ofdkern._C has no {backend} kernel for {', '.join(missing)} (rebuild ofdkern)"
    return None


_warned_fallback: set[tuple[str, str]] = set()


def resolve(op: Op, backend: str, device: torch.device) -> str:
    """The backend that runs this call of ``op`` on tensors of ``device``: ``backend`` itself when it can (else
    BackendUnavailableError, naming why and what can), or for "auto" the first of ``AUTO_ORDER`` that can,
    else the reference (with one warning per op and device type; none on meta tensors, which only the
    reference's shape logic serves)."""
    check_backend_name(backend)
    device_type = device.type
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ()):
            if _unavailable(op, name, device_type) is None:
                return name
        if device_type != "meta" and (op.name, device_type) not in _warned_fallback:
            _warned_fallback.add((op.name, device_type))
            warnings.warn(
                f"ofdkern.{op.name}: no fused kernel runs this call on {device_type} tensors here, using the "
                f"eager reference (see ofdkern.backend_status({op.name!r}))", RuntimeWarning, stacklevel=3)
        return "reference"
    reason = _unavailable(op, backend, device_type)
    if reason is not None:
        available = [name for name in (*FUSED_BACKENDS, "reference")
                     if _unavailable(op, name, device_type) is None]
        raise BackendUnavailableError(
            f"ofdkern.{op.name}: backend {backend!r} cannot run this call on {device_type} tensors: {reason}. "
            f"Backends that can, here: {available}")
    return backend


# ---- status ------------------------------------------------------------------------------------------------

def _op_status(op: Op) -> dict[str, dict]:
    status = {}
    for backend in (*FUSED_BACKENDS, "reference"):
        reasons = {device: _unavailable(op, backend, device) for device in STATUS_DEVICES}
        devices = [device for device, reason in reasons.items() if reason is None]
        if backend == "reference":
            devices = list(_MACHINE["reference"]["devices"])
        # Why it runs nowhere: the reason for the device it is made for.
        home = "cpu" if backend == "cpu" else "cuda"
        spec = op.backends.get(backend)
        status[backend] = {"devices": devices, "available": bool(devices),
                           "reason": None if devices else reasons[home],
                           "kernels": list(spec.kernels) if spec else []}
    return status


def backend_status(op: str | None = None) -> dict[str, dict]:
    """What runs here.

    ``backend_status()``: for each backend, ``built``, ``available`` (on some device of this machine),
    ``devices`` (the tensor device types it runs on), ``reason`` (why it is unavailable, or None), ``runs``
    (the public ops it runs somewhere here) and, for the C++ backends, ``ops`` (the extension ops that have a
    kernel there); for "cpu", ``parallel`` (whether its kernels run on ``torch.get_num_threads()``
    threads: the extension was built with OpenMP).

    ``backend_status("kd_loss")``: for each backend, where it runs that op here: ``devices``, ``available``,
    ``reason`` (why it runs it nowhere, or None) and ``kernels`` (the extension ops it calls).
    """
    if op is not None:
        if op not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
        return _op_status(_OPS[op])
    status = {}
    per_op = {name: _op_status(spec) for name, spec in sorted(_OPS.items())}
    for backend, entry in _MACHINE.items():
        status[backend] = {"built": entry["built"], "available": bool(entry["devices"]),
                           "devices": list(entry["devices"]), "reason": entry["reason"],
                           "runs": [name for name, ops in per_op.items() if ops[backend]["available"]]}
        if backend in _CPP_KERNELS:
            status[backend]["ops"] = list(_CPP_KERNELS[backend])
    status["cpu"]["parallel"] = _CPU_KERNELS_PARALLEL
    return status


def registered_ops() -> list[str]:
    return sorted(_OPS)
