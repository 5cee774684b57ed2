"""What every Triton kernel of ofdkern shares: the accumulation dtype, a launch on the tensors' own device, the
argument checks of the kernel entry points, float64 scalars passed as float32 pairs, and the per-element math
as ``@triton.jit`` functions (the Triton twins of csrc/ofd_math.h).

Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before importing triton).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .._dtypes import accumulation_dtype

__all__ = ["INTERPRET", "accumulation_dtype", "align_point", "align_teacher_share", "check_dense", "check_dtype",
           "check_same_device", "check_shape", "dot_precision", "float32_matmul_uses_tf32", "gpu_launch_sizes",
           "joined", "launch", "launch_size", "margin_relu", "margin_share", "ofd_point", "relu", "relu_backward",
           "split_float", "stored_as", "teacher_share", "to_float32"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Set by gpu_launch_sizes(): the interpreter then runs the launches a GPU would get.
_interpret_gpu_sizes = False


def launch_size(gpu, interpreted):
    """A launch parameter (a block size, a tile shape): ``gpu`` on a GPU; under the interpreter
    ``interpreted``, small enough that tiny test shapes still take several programs and loop steps, unless
    ``gpu_launch_sizes`` is active."""
    return interpreted if INTERPRET and not _interpret_gpu_sizes else gpu


@contextlib.contextmanager
def gpu_launch_sizes():
    """Within it, the interpreter launches the kernels with a GPU's block sizes: the GPU's tiling, masks and
    partial blocks checked without a GPU (the dots' dtypes and precision stay the interpreter's)."""
    global _interpret_gpu_sizes
    previous, _interpret_gpu_sizes = _interpret_gpu_sizes, True
    try:
        yield
    finally:
        _interpret_gpu_sizes = previous


def float32_matmul_uses_tf32() -> bool:
    """Whether torch lets float32 CUDA matmuls run in TF32. From torch 2.9 on,
    ``torch.backends.cuda.matmul.fp32_precision`` reports it however it was set (``allow_tf32``,
    ``set_float32_matmul_precision``, the ``fp32_precision`` flags), while ``get_float32_matmul_precision``
    raises once the new flags were used."""
    try:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9
        return torch.get_float32_matmul_precision() != "highest"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: float32 dots in TF32 when torch's matmuls may use it; other dtypes ignore
    it. The interpreter computes in full precision."""
    if INTERPRET or dtype != torch.float32 or not float32_matmul_uses_tf32():
        return "ieee"
    return "tf32"


def launch(kernel, grid, *args, device: torch.device, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on ``device``: Triton launches on the current CUDA device, which need
    not be the tensors' one."""
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **meta)


# ---- argument checks of the kernel entry points (the Python layer already gave users a clear error; these
# guard direct calls of the ops, which would otherwise read or write out of bounds)

def check_dtype(op: str, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {tensor.dtype}")


def check_shape(op: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_dense(op: str, name: str, tensor: torch.Tensor) -> None:
    """Non-overlapping and dense: ``empty_like`` keeps exactly the strides of such a tensor."""
    if tensor.stride() != torch.empty_like(tensor, device="meta").stride():
        raise ValueError(f"{op}: {name} must be non-overlapping and dense, got strides {tensor.stride()} for "
                         f"shape {tuple(tensor.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {tensor.device for tensor in tensors.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {tensor.device}" for name, tensor in tensors.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listed}")


# ---- per-element math (csrc/ofd_math.h) -------------------------------------------------------------------

def split_float(value: float) -> tuple[float, float]:
    """value as float32 head and tail: Triton passes Python floats as float32, and head + tail keeps ~48 bits
    for the float64 kernels (float32 kernels see value rounded once)."""
    head = to_float32(value)
    return head, to_float32(value - head) if math.isfinite(head) else 0.0


def to_float32(value: float) -> float:
    """value rounded to float32 (inf beyond its range)."""
    return torch.tensor(value, dtype=torch.float32).item()


@triton.jit
def joined(head, tail, dtype: tl.constexpr):
    """The value of a split_float pair in ``dtype``."""
    return tl.cast(head, dtype) + tl.cast(tail, dtype)


@triton.jit
def margin_relu(t, m):
    """max(t, m) keeping a NaN teacher like torch.maximum (a NaN margin stays through the select)."""
    return tl.where((t > m) | (t != t), t, m)


@triton.jit
def ofd_point(s, t, m):
    """OFD's partial L2 of one element and its derivative wrt s: (s - t')^2 * mask and 2 (s - t') * mask
    with t' = max(t, m). The mask multiplies (not a select) so inf * 0 gives NaN as in the reference."""
    t_prime = margin_relu(t, m)
    mask = ((s > t_prime) | (t_prime > 0.0)).to(s.dtype)
    diff = s - t_prime
    return diff * diff * mask, 2.0 * diff * mask


@triton.jit
def teacher_share(d_student, t, m):
    """The teacher's part of d loss / d t' = -d_student: all of it above the margin, half at a tie, exactly 0
    below (a select, so 0 even when d_student is NaN or inf)."""
    share = tl.where(t == m, -d_student * 0.5, -d_student)
    return tl.where(t < m, 0.0, share)


@triton.jit
def margin_share(d_student, t, m):
    """The margin's part of d loss / d t': the complement of teacher_share."""
    share = tl.where(t == m, -d_student * 0.5, -d_student)
    return tl.where(t > m, 0.0, share)


@triton.jit
def align_point(y, t, m, OFD: tl.constexpr):
    """The channel-wise alignment loss of one projected value and its derivative wrt y: OFD's partial L2 with
    margin m, or plain L2 (csrc/align_math.h)."""
    if OFD:
        loss, d_y = ofd_point(y, t, m)
    else:
        diff = y - t
        loss = diff * diff
        d_y = 2.0 * diff
    return loss, d_y


@triton.jit
def align_teacher_share(d_y, t, m, OFD: tl.constexpr):
    """The teacher's gradient from d loss / d y: OFD's split at the margin, or -d_y for plain L2."""
    if OFD:
        share = teacher_share(d_y, t, m)
    else:
        share = -d_y
    return share


@triton.jit
def relu(x):
    """torch.relu: NaN stays NaN."""
    return tl.where((x > 0) | (x != x), x, 0.0)


@triton.jit
def relu_backward(grad, x):
    """What autograd gives through torch.relu: 0 where relu(x) <= 0, the gradient elsewhere (NaN included)."""
    return tl.where(x <= 0, 0.0, grad)


@triton.jit
def stored_as(x, out_ptr):
    """``x`` in the element type of ``out_ptr``, 16-bit types through float32 (as the C++ kernels convert; the
    interpreter's direct float64 -> bfloat16 cast is wrong)."""
    out_dtype = out_ptr.dtype.element_ty
    if out_dtype.primitive_bitwidth == 16:
        x = x.to(tl.float32)
    return x.to(out_dtype)
