"""What every fused op owes its users, checked the same way on every op and every backend that runs it here:
parity with the reference (as accurate as eager), NaN/Inf like the reference, layouts, mixed dtypes, empty
inputs, autocast, determinism across thread counts, double backward refused, opcheck, the eager path against the
custom op (FusedOp), torch.jit.trace, torch.compile of a training step, a device other than the current one, and
the Triton backward's gradient scaling."""
from __future__ import annotations

import contextlib

import pytest
import torch

import ofdkern

from conftest import DEVICES, STATUS, assert_same_bits_with_one_thread, backends_for
from op_cases import CASES, FLOAT_DTYPES, KD
from parity import assert_parity


def _cases(dtypes=(None,), layouts=False):
    params = []
    for case in CASES:
        for device in DEVICES:
            for backend in backends_for(device, case.op):
                for dtype in dtypes:
                    for layout in (case.layouts if layouts else (None,)):
                        marks = [pytest.mark.gpu] if device == "cuda" else []
                        parts = [case.id, backend, device] + ([str(dtype)[6:]] if dtype else []) + (
                            [layout] if layout else [])
                        params.append(pytest.param(case, device, backend, dtype, layout, marks=marks,
                                                   id="-".join(parts)))
    return params


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases(FLOAT_DTYPES, layouts=True))
def test_parity_with_the_reference(case, device, backend, dtype, layout):
    assert_parity(case.fused(backend), case.reference, case.make(device, dtype, layout=layout), names=case.names)


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases())
def test_every_reduction(case, device, backend, dtype, layout):
    for reduction in case.reductions:
        assert_parity(case.fused(backend, reduction=reduction),
                      lambda *xs: case.reference(*xs, reduction=reduction),
                      case.make(device, torch.float64, seed=1), names=case.names)


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases((torch.float32, torch.bfloat16)))
def test_nan_and_inf_follow_the_reference(case, device, backend, dtype, layout):
    inputs = case.plant_special(case.make(device, dtype))
    assert_parity(case.fused(backend), case.reference, inputs, names=case.names)


@pytest.mark.parametrize("case,device,backend,dtype,layout",
                         [p for p in _cases() if p.values[0] is not KD])
def test_feature_ranks_and_5d_channels_last(case, device, backend, dtype, layout):
    for spatial, layout in (((), "contiguous"), ((5,), "contiguous"), ((2, 3, 2), "contiguous"),
                            ((2, 3, 2), "channels_last")):
        assert_parity(case.fused(backend), case.reference, case.make(device, torch.float64, spatial=spatial,
                                                                     layout=layout), names=case.names)


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases())
def test_mixed_input_dtypes(case, device, backend, dtype, layout):
    # The first two inputs (student and teacher features or logits) in every pair of dtypes.
    for student_dtype in FLOAT_DTYPES:
        for teacher_dtype in FLOAT_DTYPES:
            if student_dtype == teacher_dtype:
                continue
            inputs = case.make(device, torch.float32)
            inputs[0] = inputs[0].detach().to(student_dtype).requires_grad_()
            inputs[1] = inputs[1].detach().to(teacher_dtype).requires_grad_(inputs[1].requires_grad)
            assert_parity(case.fused(backend), case.reference, inputs, names=case.names)


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases())
def test_empty_batch(case, device, backend, dtype, layout):
    for reduction in case.reductions:
        inputs = case.make(device, torch.float32, batch=0)
        loss = case.fused(backend, reduction=reduction)(*inputs)
        try:
            expected = case.reference(*inputs, reduction=reduction)
        except RuntimeError:  # attention transfer's reference cannot view an empty batch: a sum of nothing
            expected = {"sum": torch.tensor(0.0), "mean": torch.tensor(float("nan")),
                        "batchmean": torch.tensor(float("nan"))}[reduction]
        torch.testing.assert_close(loss.cpu(), expected.to(loss.dtype).cpu(), equal_nan=True)
        wanted = [x for x in inputs if x.requires_grad]
        grads = torch.autograd.grad(loss.sum(), wanted)
        for x, grad in zip(wanted, grads):
            # Features get empty gradients; weights summed over no pixel get exactly 0.
            assert grad.shape == x.shape and grad.dtype == x.dtype
            assert torch.equal(grad, torch.zeros_like(x)), (reduction, grad)


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases())
def test_double_backward_is_refused(case, device, backend, dtype, layout):
    inputs = case.make(device, torch.float32)
    loss = case.fused(backend)(*inputs)
    wanted = [x for x in inputs if x.requires_grad]
    with pytest.raises(RuntimeError, match=f"ofdkern.{case.op}: the fused backends do not support double backward"):
        torch.autograd.grad(loss.sum(), wanted, create_graph=True)


@pytest.mark.parametrize("case,device,backend,dtype,layout", [p for p in _cases() if p.values[2] == "cpu"])
def test_same_bits_on_one_and_two_threads(case, device, backend, dtype, layout):
    # Large enough that the CPU kernels split the work into several parallel pieces.
    spatial = (256,) if case is not KD else None
    inputs = case.make(device, torch.float32, spatial=spatial, batch=32) if spatial else case.make(
        device, torch.float32, batch=16, classes=5000)

    def run():
        loss = case.fused(backend)(*inputs)
        return (loss, *torch.autograd.grad(loss, [x for x in inputs if x.requires_grad]))

    assert_same_bits_with_one_thread(run)


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases())
def test_opcheck(case, device, backend, dtype, layout):
    op, args = case.opcheck(case.make(device, torch.float32), backend)
    torch.library.opcheck(op.custom_op, args)


class _Subclass(torch.Tensor):
    """A tensor subclass: the public call must take it through the custom op's dispatch."""


def _node_names(node) -> set[str]:
    """The names of the autograd nodes from ``node`` down."""
    if node is None:
        return set()
    return {type(node).__name__}.union(*(_node_names(child) for child, _ in node.next_functions))


def _loss_and_gradients(call, args):
    loss = call(*args)[0]
    wanted = [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad]
    return loss, torch.autograd.grad(loss, wanted), _node_names(loss.grad_fn)


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases())
def test_eager_call_matches_the_custom_op(case, device, backend, dtype, layout):
    # The eager path (an autograd.Function) and the custom op's dispatch run the same forward, setup_context and
    # backward: the same bits. Subclasses, like tracing, take the custom op.
    op, args = case.opcheck(case.make(device, torch.float32), backend)
    eager = _loss_and_gradients(op, args)
    dispatched = _loss_and_gradients(op.custom_op, args)
    subclassed = _loss_and_gradients(op, [x.detach().as_subclass(_Subclass).requires_grad_(x.requires_grad)
                                          if isinstance(x, torch.Tensor) else x for x in args])
    generated = f"GeneratedBackwardFor_ofdkern_{op.name}_defaultBackward"
    assert f"{op.name}Backward" in eager[2] and generated not in eager[2]
    for other in (dispatched, subclassed):
        assert generated in other[2]
        assert torch.equal(eager[0], other[0])
        assert all(torch.equal(a, b) for a, b in zip(eager[1], other[1], strict=True))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # deprecated; shapes
def test_jit_trace_records_the_custom_op():
    # torch.jit.trace cannot record the eager path's autograd.Function; it gets the custom op. (Its check, which
    # reruns the function without grad, would see other gradient flags baked in: hence check_trace=False.)
    student, teacher = KD.make("cpu", torch.float32)
    traced = torch.jit.trace(lambda s, t: ofdkern.kd_loss(s, t, backend="cpu"), (student, teacher),
                             check_trace=False)
    assert "ofdkern::kd_loss_fused" in str(traced.graph)
    loss = traced(student, teacher)
    assert torch.equal(loss, ofdkern.kd_loss(student, teacher, backend="cpu"))
    assert loss.grad_fn is not None


@pytest.mark.parametrize("case,device,backend,dtype,layout", _cases())
def test_compiled_training_step_matches_eager(case, device, backend, dtype, layout):
    torch._dynamo.reset()
    fused = case.fused(backend)

    def step(*inputs):
        return 3 * fused(*inputs) + 1  # the loss within other ops of the step's graph

    eager_inputs = case.make(device, torch.float32)
    compiled_inputs = case.make(device, torch.float32)
    eager_loss = step(*eager_inputs)
    eager_loss.backward()
    # fullgraph: no graph break anywhere in the op's Python layer; aot_eager traces its backward graph too,
    # which backward() then runs.
    compiled_loss = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_inputs)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_inputs, eager_inputs):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("case,device,backend,dtype,layout", [p for p in _cases() if p.values[1] == "cpu"])
def test_autocast(case, device, backend, dtype, layout):
    # Under bfloat16 autocast the features come out of autocast regions in bfloat16. The fused op takes them as
    # they are (its GEMMs are not cast down), returns the loss in float32 and gradients in the inputs' dtypes.
    inputs = case.make(device, torch.float32)
    features = [x.detach().to(torch.bfloat16).requires_grad_(x.requires_grad) for x in inputs[:2]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = case.fused(backend)(*features, *inputs[2:])
        expected = case.reference(*features, *inputs[2:])
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    wanted = [x for x in features + inputs[2:] if x.requires_grad]
    for x, grad in zip(wanted, torch.autograd.grad(fused, wanted)):
        assert grad.dtype == x.dtype


@pytest.mark.gpu
@pytest.mark.parametrize("case,device,backend,dtype,layout", [p for p in _cases() if p.values[1] == "cuda"])
def test_tensors_on_a_device_other_than_the_current_one(case, device, backend, dtype, layout):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: the kernels must launch on the tensors' device, not the current one")
    with torch.cuda.device(0):
        inputs = case.make("cuda:1", torch.float32)
        assert_parity(case.fused(backend), case.reference, inputs, names=case.names)


@pytest.mark.skipif("cpu" not in STATUS["triton"]["devices"],
                    reason="the interpreter's run of a GPU-only kernel; on a GPU every Triton backward runs it")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_triton_scale_kernel_rounds_once(dtype):
    # The Triton backends scale saved gradients by grad_output with this kernel on a GPU only (CPU tensors take
    # the extension's scale_, below, or torch's mul_ without it): here it runs directly, at the interpreter's
    # blocks and at a GPU's (10,001 elements: three blocks of 4,096, the last partial). The factor stays in the
    # accumulation dtype: one rounding per element.
    from ofdkern._dtypes import accumulation_dtype
    from ofdkern.kernels.scale_triton import scale_triton_
    from ofdkern.kernels.triton_helpers import gpu_launch_sizes

    gradient = torch.randn(10_001, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    factor = torch.tensor(1 / 3, dtype=accumulation_dtype(dtype))
    expected = (gradient.to(factor.dtype) * factor).to(dtype)
    for sizes in (contextlib.nullcontext, gpu_launch_sizes):
        scaled = gradient.clone()
        with sizes():
            scale_triton_(scaled, factor)
        if dtype == torch.bfloat16:
            # The interpreter truncates float32 to bfloat16 where a GPU rounds to nearest: one ulp apart.
            torch.testing.assert_close(scaled, expected, rtol=2**-7, atol=0)
        else:
            assert torch.equal(scaled, expected)
    with pytest.raises(TypeError, match="factor must have dtype"):
        scale_triton_(gradient.clone(), factor.to(torch.float16))


@pytest.mark.skipif("ofdkern::scale_" not in STATUS["cpu"].get("ops", ()), reason="needs the extension")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cpu_scale_kernel_rounds_once(dtype):
    # Every fused CPU backward scales its saved gradient by grad_output in place with this kernel: the factor in
    # the accumulation dtype, one rounding per element (torch's mul_ by a 0-dim tensor gives the same bits).
    # Sizes: shorter than a vector pair, with a tail, and over the parallel grain with a partial last task.
    from ofdkern._dtypes import accumulation_dtype

    generator = torch.Generator().manual_seed(0)
    factor = torch.tensor(1 / 3, dtype=accumulation_dtype(dtype))
    for numel in (1, 17, 1000, 2048 * 32 * 3 + 5):
        gradient = torch.randn(numel, generator=generator, dtype=torch.float64).to(dtype)
        scaled = gradient.clone()
        torch.ops.ofdkern.scale_(scaled, factor)
        assert torch.equal(scaled, (gradient.to(factor.dtype) * factor).to(dtype)), numel
        assert torch.equal(scaled, gradient.mul(factor)), numel
    # A dense tensor in any dim order (a channels_last gradient), scaled where it lies.
    maps = torch.randn(2, 5, 3, 4, generator=generator).to(dtype).to(memory_format=torch.channels_last)
    scaled = maps.clone(memory_format=torch.preserve_format)
    torch.ops.ofdkern.scale_(scaled, factor)
    assert scaled.stride() == maps.stride() and torch.equal(scaled, (maps.to(factor.dtype) * factor).to(dtype))
    torch.library.opcheck(torch.ops.ofdkern.scale_, (maps.clone(), factor))
    wrong = torch.float32 if factor.dtype == torch.float64 else torch.float64
    with pytest.raises(ValueError, match="factor must be a 0-dim"):
        torch.ops.ofdkern.scale_(maps.clone(), factor.to(wrong))
    with pytest.raises(ValueError, match="factor must be a 0-dim"):
        torch.ops.ofdkern.scale_(maps.clone(), factor.view(1))
    with pytest.raises(ValueError, match="non-overlapping and dense"):
        torch.ops.ofdkern.scale_(maps.clone()[:, :, ::2], factor)
