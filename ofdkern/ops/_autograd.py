"""How every fused op is called and differentiated.

The forward kernels write the gradients of the unit-weighted loss into buffers the custom op returns (and its
autograd context saves); the backward only scales them by ``grad_output``, a device tensor, so no host sync.
When autograd frees the graph after this backward (a plain ``loss.backward()``) and nobody else holds those
buffers, the scaling is in place: the gradient an input gets is the forward's buffer, not a second
feature-sized tensor. The custom ops take that permission as an argument, ``in_place_backward``: the public
functions pass True (they return the loss and drop the buffers); a direct call of a custom op with False gets
a purely functional op whose outputs never change after it returns.

``FusedOp`` registers each op's custom op and is what the public functions call: eager calls skip the
dispatcher's Python (``FusedOp``'s docstring), traced ones record the custom op.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .._backends import has_kernel
from .._dtypes import accumulation_dtype
from ._common import gradient_scale

# Whether the extension can allocate CPU outputs on transparent huge pages (csrc/cpu_buffers.h).
HUGEPAGE_BUFFERS = has_kernel("cpu", "ofdkern::empty_like_hugepage")
if HUGEPAGE_BUFFERS:
    torch.library.register_fake("ofdkern::empty_like_hugepage")(lambda like: torch.empty_like(like))
_CUDA_SCALE = has_kernel("cuda", "ofdkern::scale_")
_CPU_SCALE = has_kernel("cpu", "ofdkern::scale_")
if _CUDA_SCALE or _CPU_SCALE:
    torch.library.register_fake("ofdkern::scale_")(lambda gradient, factor: None)


# What the eager path takes: tensors whose ops reach the kernels as they are. Subclasses (fake tensors, DTensor,
# ...) may need their own dispatch and get the custom op.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class FusedOp:
    """A fused op: its ``torch.library`` custom op (with fake kernel and autograd), and the call the public
    function makes.

    An eager call runs the op's forward in an ``autograd.Function`` whose ``setup_context`` and backward are
    the ones registered on the custom op, so both paths compute the same bits. It skips the custom op's
    dispatch in Python, which costs more than a CIFAR-sized kernel: about 60-90 us per training step of a
    128x100 KD on a 2-core CPU (``fill_defaults`` alone grows with the square of the argument count).
    Tracing (torch.compile, make_fx, fake tensors, torch.jit.trace), functorch transforms and tensor subclasses
    get the custom op itself."""

    def __init__(self, name: str, forward: Callable):
        self.name = name.split("::")[-1]
        self._forward = forward
        self._parameters = tuple(inspect.signature(forward).parameters)
        self.custom_op = torch.library.custom_op(name, mutates_args=())(forward)
        self._eager: Callable = self.custom_op  # until register_autograd

    def register_fake(self, fake: Callable) -> Callable:
        return self.custom_op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        run_forward = self._forward

        def forward(ctx, *inputs):
            output = run_forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        # Named after the op, so the loss's grad_fn reads e.g. "kd_loss_fusedBackward".
        function = type(self.name, (torch.autograd.Function,),
                        {"forward": staticmethod(forward), "backward": staticmethod(backward)})
        self._eager = function.apply

    def __call__(self, *inputs, **named):
        """The op on ``inputs``; arguments after the positional ones may be named (all of them, in order)."""
        if named:
            inputs = (*inputs, *(named[name] for name in self._parameters[len(inputs):]))
        if (tracing() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
                or any(isinstance(x, torch.Tensor) and type(x) not in _PLAIN_TENSORS for x in inputs)):
            return self.custom_op(*inputs)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs):
            return self._eager(*inputs)
        return self._forward(*inputs)


def fused_op(name: str) -> Callable[[Callable], FusedOp]:
    """Decorator: the decorated forward as the FusedOp ``name`` (``torch.library.custom_op`` of it, mutating
    nothing)."""
    return lambda forward: FusedOp(name, forward)


def setup_scaled_backward(ctx, gradients, *, backend: str, in_place_backward: bool, count: int | None,
                          dtypes, keep=()) -> None:
    """The ``setup_context`` of every fused op. Saves the forward's unit ``gradients`` and the inputs the
    backward reads again (``keep``), and what ``backward_scale`` and ``input_gradient`` need: the backend, the
    in-place permission, the reduction's ``count`` (None: an unreduced loss, scaled by the per-element upstream
    gradient) and the dtype each gradient is returned in.

    The gradients are marked non-differentiable outputs: saved differentiable outputs come back from
    ``ctx.saved_tensors`` attached to the op's graph node, and the gradients built from them would hand the
    user tensors that require grad and keep the graph alive."""
    ctx.mark_non_differentiable(*gradients)
    ctx.save_for_backward(*gradients, *keep)
    ctx.backend = backend
    ctx.in_place_backward = in_place_backward
    ctx.count = count
    ctx.dtypes = tuple(dtypes)
    ctx.set_materialize_grads(False)


def backward_scale(ctx, grad_loss: torch.Tensor | None, op_name: str) -> torch.Tensor | None:
    """Starts every fused op's backward: refuses double backward, and returns what the saved unit gradients
    are multiplied by (a 0-dim device tensor for reduced losses: no host sync), or None when no gradient
    flows."""
    refuse_double_backward(op_name)
    if grad_loss is None:
        return None
    return grad_loss if ctx.count is None else gradient_scale(grad_loss, ctx.count)


def input_gradient(ctx, index: int, buffer: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The gradient ``buffer * scale`` in the dtype saved for it (``setup_scaled_backward``)."""
    return scale_saved_gradient(buffer, scale, ctx.dtypes[index], ctx.backend, ctx.in_place_backward)


def refuse_double_backward(op_name: str) -> None:
    """The saved gradients are constants to autograd: second-order terms would silently be missing."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"ofdkern.{op_name}: the fused backends do not support double backward "
                           f"(create_graph=True); use backend='reference'")


def tracing() -> bool:
    """torch.compile, or a dispatch mode such as make_fx or fake tensors: the traced graph must stay
    functional and see only ops (no raw kernel launches)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def graph_dies_with_this_backward() -> bool:
    """True when autograd frees the graph after this backward (no ``retain_graph``): the saved gradient
    buffers are then used for the last time and may be scaled in place. A retained graph (gradcheck, a second
    backward) needs them intact; so does tracing, and a torch without the query."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not tracing() and not keep_graph()


def _scale_kernel(gradient: torch.Tensor, backend: str) -> Callable | None:
    """The backend's in-place ``kernel(gradient, factor)`` for a 0-dim ``factor`` in the accumulation dtype on
    the gradient's device, or None (the CPU without the extension): one rounding per element at copy bandwidth,
    where torch's mul_ rounds the factor to a half-precision gradient's dtype first on a GPU and runs at a third
    of that, and on the CPU keeps the factor but runs half precision at about a tenth of it."""
    if gradient.device.type == "cpu":
        return torch.ops.ofdkern.scale_ if _CPU_SCALE else None
    if backend == "cuda" and _CUDA_SCALE:
        return torch.ops.ofdkern.scale_
    from ..kernels.scale_triton import scale_triton_

    return scale_triton_


def scale_saved_gradient(buffer: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, backend: str,
                         in_place_backward: bool) -> torch.Tensor:
    """The gradient of an input from its saved unit gradient: ``buffer * scale`` in the input's ``dtype``.

    ``scale`` is ``grad_output`` divided by the reduction's count: 0-dim for reduced losses, or broadcasting
    over ``buffer`` (a per-element or per-row ``grad_output``). In place on ``buffer`` when the op was allowed
    (``in_place_backward``) and the graph dies with this backward; else into a new tensor (on CPU a huge-page
    buffer when the extension has them: faulting in a fresh feature-sized tensor costs more than the
    multiply)."""
    product_dtype = torch.result_type(buffer, scale)
    in_place = in_place_backward and graph_dies_with_this_backward()
    if buffer.dtype != dtype or product_dtype != dtype:
        # The buffer is in another dtype (the accumulation dtype of half-precision weights, a wider feature
        # dtype), or a per-element scale promotes: the product, then one rounding to ``dtype``. In place, a
        # weight-sized temporary fewer.
        product = buffer.mul_(scale) if in_place and product_dtype == buffer.dtype else buffer * scale
        return product.to(dtype)
    if tracing():
        # One rounding, like the device kernels; inductor fuses it into one pass.
        acc = accumulation_dtype(dtype)
        return (buffer.to(acc) * scale.to(acc)).to(dtype)
    kernel = _scale_kernel(buffer, backend) if scale.dim() == 0 else None
    if kernel is not None and (in_place or buffer.device.type != "cpu"):
        gradient = buffer if in_place else buffer.clone()
        kernel(gradient, scale.to(dtype=accumulation_dtype(dtype)))
        return gradient
    if in_place:
        return buffer.mul_(scale)
    if buffer.device.type == "cpu" and HUGEPAGE_BUFFERS:
        return torch.mul(buffer, scale, out=torch.ops.ofdkern.empty_like_hugepage(buffer))
    return buffer * scale
