"""ofd_loss on every backend that runs here against the float64 reference: values, dtypes, gradients,
NaN/Inf semantics, ties, empty inputs, determinism, layouts, errors and torch integration."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ofdkern
from ofdkern import reference
from ofdkern.ops.ofd import ofd_loss_fused

from conftest import BACKEND_CASES, STATUS, assert_same_bits_with_one_thread
from ofd_cases import STORE_RTOL, assert_close, loss_rtol, make_features, make_margin, oracle

REDUCTIONS = ("sum", "mean", "batchmean", "none")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def run_case(device, backend, shape, dtype, layout, reduction, margin_form="flat", margin_dtype=torch.float32,
             grads=(True, False, False), seed=0):
    student, teacher = make_features(shape, dtype, device, layout, seed)
    margin = make_margin(shape[1], margin_dtype, device, margin_form, seed, ndim=len(shape))
    for x, wanted in zip((student, teacher, margin), grads):
        x.requires_grad_(wanted)
    loss = ofdkern.ofd_loss(student, teacher, margin, reduction=reduction, backend=backend)
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed + 2)).to(device, loss.dtype)
    expected_loss, expected_grads = oracle(student, teacher, margin, reduction, grad_output)
    eager = reference.ofd_loss(student, teacher, margin, reduction)
    assert loss.dtype == eager.dtype, f"loss dtype {loss.dtype}, reference gives {eager.dtype}"
    assert_close(loss, expected_loss, "loss", loss_rtol(loss.dtype))
    wanted = [x for x in (student, teacher, margin) if x.requires_grad]
    if wanted:
        got = iter(torch.autograd.grad(loss, wanted, grad_output))
        for name, x, expected in zip(("student", "teacher", "margin"), (student, teacher, margin), expected_grads):
            if x.requires_grad:
                actual = next(got)
                # Per-channel margin gradients sum many terms.
                rtol = max(STORE_RTOL[x.dtype], 2e-5) if name == "margin" else STORE_RTOL[x.dtype]
                assert_close(actual, expected, f"grad {name}", rtol)


# A few examples per backend in every run; the Triton interpreter is ~100x slower than the C++ kernel.
def examples_for(backend):
    return 12 if backend == "triton" and not torch.cuda.is_available() else 60


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 4)), draw(st.integers(1, 7))] + [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    layouts = ["contiguous", "strided"] + (["channels_last"] if ndim in (4, 5) else [])
    return dict(
        shape=tuple(shape),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(layouts)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        margin_form=draw(st.sampled_from(["flat", "broadcast"])),
        margin_dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        grads=draw(st.sampled_from([(True, False, False), (True, True, True), (False, True, False),
                                    (False, False, True), (False, False, False)])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_random_cases_match_reference(device, backend):
    @settings(max_examples=examples_for(backend), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case):
        run_case(device, backend, **case)

    check()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_feature_map_matches_reference(device, backend, dtype, layout, reduction):
    # A map large enough for several kernel blocks / CPU chunks and a tail.
    shape = (3, 37, 9, 11) if backend != "triton" or device == "cuda" else (2, 5, 7, 9)
    run_case(device, backend, shape, dtype, layout, reduction, grads=(True, True, True))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_planes_of_whole_vectors_match_reference(device, backend, dtype, reduction):
    # H * W a multiple of every vector width (16 bytes: 8 half, 4 float or 2 double elements): the CUDA
    # kernel's one-margin-per-vector path. The odd planes of the other tests take its per-element channel walk.
    shape = (3, 37, 8, 12) if backend != "triton" or device == "cuda" else (2, 5, 8, 12)
    run_case(device, backend, shape, dtype, "contiguous", reduction, grads=(True, True, True))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_large_sum_in_float32(device, backend):
    # 2^20 + tail elements: many partial sums, fixed-order final reduce.
    if backend == "triton" and device == "cpu":
        shape = (2, 3, 65, 67)
    else:
        shape = (4, 64, 64, 65)
    run_case(device, backend, shape, torch.bfloat16, "contiguous", "sum")


def nan_inf_inputs(device):
    inf, nan = math.inf, math.nan
    # Each column one situation: NaN in s, NaN in t, s = -inf with t' < 0 (inf * 0 = NaN), s = +inf,
    # t = +inf, t = -inf (t' = m), s = -inf with t' > 0, regular value.
    s = torch.tensor([nan, 0.5, -inf, inf, 1.0, 0.3, -inf, 0.2], device=device)
    t = torch.tensor([0.1, nan, -0.1, -0.2, inf, -inf, 0.4, -0.3], device=device)
    return s.reshape(1, 8, 1, 1), t.reshape(1, 8, 1, 1)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_nan_and_inf_follow_reference(device, backend, reduction):
    s, t = nan_inf_inputs(device)
    margin = torch.full((8,), -0.5, device=device)
    s.requires_grad_()
    t.requires_grad_()
    margin.requires_grad_()
    loss = ofdkern.ofd_loss(s, t, margin, reduction=reduction, backend=backend)
    expected = reference.ofd_loss(s, t, margin, reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    g = torch.ones_like(loss)
    for actual, wanted in zip(torch.autograd.grad(loss, (s, t, margin), g),
                              torch.autograd.grad(expected, (s, t, margin), g)):
        torch.testing.assert_close(actual, wanted, equal_nan=True)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_tie_splits_gradient_between_teacher_and_margin(device, backend):
    margin = torch.tensor([-0.5, -0.25], device=device, requires_grad=True)
    t = torch.tensor([[-0.5, -0.25], [-0.5, 0.75]], device=device, requires_grad=True)  # ties except one
    s = torch.tensor([[0.5, 1.0], [-1.0, 2.0]], device=device, requires_grad=True)
    loss = ofdkern.ofd_loss(s, t, margin, backend=backend)
    expected = reference.ofd_loss(s, t, margin)
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss, (s, t, margin))
    want = torch.autograd.grad(expected, (s, t, margin))
    for actual, wanted in zip(got, want):
        torch.testing.assert_close(actual, wanted)
    # At a tie the teacher and the margin each get half of d loss / d t'.
    assert got[1][0, 0].item() == pytest.approx(-(0.5 - (-0.5)))
    assert got[2][0].item() == pytest.approx(-(0.5 + 0.5) + 0.0)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_zero_teacher_is_not_positive(device, backend):
    # t' > 0 is strict: t = 0 with s < 0 contributes nothing; s > t' still counts.
    s = torch.tensor([[-1.0, 2.0]], device=device)
    t = torch.zeros(1, 2, device=device)
    loss = ofdkern.ofd_loss(s, t, torch.tensor([-1.0, -1.0], device=device), reduction="none", backend=backend)
    assert loss.tolist() == [[0.0, 4.0]]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_features(device, backend, reduction):
    s = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
    t = torch.randn(0, 4, 3, 3, device=device)
    margin = -torch.rand(4, device=device)
    loss = ofdkern.ofd_loss(s, t, margin, reduction=reduction, backend=backend)
    expected = reference.ofd_loss(s, t, margin, reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert grad.shape == s.shape


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_results_are_bitwise_deterministic(device, backend, reduction):
    shape = (2, 6, 5, 7) if backend == "triton" and device == "cpu" else (8, 48, 33, 35)
    student, teacher = make_features(shape, torch.float32, device)
    margin = make_margin(shape[1], torch.float32, device)
    student.requires_grad_()
    teacher.requires_grad_()
    margin.requires_grad_()

    def once():
        loss = ofdkern.ofd_loss(student, teacher, margin, reduction=reduction, backend=backend)
        grads = torch.autograd.grad(loss, (student, teacher, margin), torch.ones_like(loss))
        return (loss, *grads)

    assert_same_bits_with_one_thread(once)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_gradcheck_float64(device, backend):
    shape = (2, 3, 2, 3)
    student, teacher = make_features(shape, torch.float64, device, seed=3)
    margin = make_margin(3, torch.float64, device, seed=3)
    inputs = [x.requires_grad_() for x in (student, teacher, margin)]
    for reduction in ("sum", "batchmean", "none"):
        assert torch.autograd.gradcheck(
            lambda s, t, m: ofdkern.ofd_loss(s, t, m, reduction=reduction, backend=backend), inputs)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_grad_output_scales_the_gradient(device, backend):
    student, teacher = make_features((2, 4, 3, 3), torch.float32, device)
    margin = make_margin(4, torch.float32, device)
    student.requires_grad_()

    def grad_of(weight):
        loss = ofdkern.ofd_loss(student, teacher, margin, reduction="mean", backend=backend)
        return torch.autograd.grad(loss * weight, student)[0]

    torch.testing.assert_close(grad_of(-7.5), grad_of(1.0) * -7.5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_half_precision_gradient_is_scaled_by_the_exact_factor(device, backend, reduction):
    # 1 + 2^-11 rounds to 1 in float16. The saved float16 gradient must be multiplied by the float32 factor
    # and rounded once, not by the factor rounded to float16 (what torch's mul_ by a 0-dim CUDA tensor does).
    student, teacher = make_features((2, 8, 4, 4), torch.float16, device)
    margin = make_margin(8, torch.float32, device)
    student.requires_grad_()

    def grad_of(reduction, weight):
        loss = ofdkern.ofd_loss(student, teacher, margin, reduction=reduction, backend=backend)
        return torch.autograd.grad(loss, student, torch.tensor(weight, device=device))[0]

    unit = grad_of("sum", 1.0)
    factor = torch.tensor(1 + 2**-11) / (student.numel() if reduction == "mean" else 1)
    scaled = grad_of(reduction, 1 + 2**-11)
    assert torch.equal(scaled, (unit.float() * factor.to(device)).half())
    assert not torch.equal(scaled, (unit.float() * factor.half().float().to(device)).half())


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_second_backward_through_a_retained_graph(device, backend):
    student, teacher = make_features((2, 4, 3, 3), torch.float32, device)
    student.requires_grad_()
    loss = ofdkern.ofd_loss(student, teacher, make_margin(4, torch.float32, device), backend=backend)
    (first,) = torch.autograd.grad(loss, student, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2, student)
    torch.testing.assert_close(second, first * 2)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("retain_graph", [False, True])
def test_backward_scales_the_saved_gradient_in_place_only_when_the_graph_dies(device, backend, retain_graph):
    student, teacher = make_features((2, 4, 3, 3), torch.float32, device)
    margin = make_margin(4, torch.float32, device)
    student.requires_grad_(), teacher.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = ofdkern.ofd_loss(student, teacher, margin, reduction="mean", backend=backend)
    grads = torch.autograd.grad(loss * 3.0, (student, teacher), retain_graph=retain_graph)
    # Without retain_graph the returned gradients are the forward's buffers; with it they are new tensors.
    assert [g.data_ptr() in saved for g in grads] == [not retain_graph] * 2
    student_ref, teacher_ref = student.detach().requires_grad_(), teacher.detach().requires_grad_()
    expected = torch.autograd.grad(reference.ofd_loss(student_ref, teacher_ref, margin, "mean") * 3.0,
                                   (student_ref, teacher_ref))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    if retain_graph:
        again = torch.autograd.grad(loss * 3.0, (student, teacher))
        for got, want in zip(again, expected):
            torch.testing.assert_close(got, want)


def test_the_in_place_backward_queries_exist():
    # The in-place backward relies on them; without them it would fail or take the slower out-of-place path.
    assert callable(torch._C._autograd._get_current_graph_task_keep_graph)
    assert torch._C._len_torch_dispatch_stack() == 0


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_double_backward_is_refused(device, backend):
    student, teacher = make_features((2, 4, 3, 3), torch.float32, device)
    student.requires_grad_()
    loss = ofdkern.ofd_loss(student, teacher, make_margin(4, torch.float32, device), backend=backend)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_gradients_are_skipped_when_not_needed(device, backend):
    student, teacher = make_features((2, 4, 3, 3), torch.float32, device)
    margin = make_margin(4, torch.float32, device)
    outputs = ofd_loss_fused(student, teacher, margin, "sum", backend, False, False, False, False)
    assert [o.numel() for o in outputs[1:]] == [0, 0, 0]
    student.requires_grad_()
    with torch.no_grad():
        outputs = ofd_loss_fused(student, teacher, margin, "sum", backend, False, False, False, False)
        loss = ofdkern.ofd_loss(student, teacher, margin, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, outputs[0])


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_channels_last_is_not_copied(device, backend):
    student, teacher = make_features((2, 8, 4, 4), torch.float32, device, layout="channels_last")
    margin = make_margin(8, torch.float32, device)
    student.requires_grad_()
    _, d_student, _, _ = ofd_loss_fused(student, teacher, margin, "sum", backend, True, False, False, False)
    # The gradient buffer comes out in the input's layout: the kernel walked it in place.
    assert d_student.stride() == student.stride()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_mixed_feature_dtypes(device, backend):
    student = torch.randn(2, 3, 4, 4, device=device, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float32)
    margin = -torch.rand(3, device=device, dtype=torch.float16)
    loss = ofdkern.ofd_loss(student, teacher, margin, backend=backend)
    expected, (grad_s, _, _) = oracle(student, teacher, margin, "sum")
    assert_close(loss, expected, "loss", loss_rtol(torch.float32))
    (grad,) = torch.autograd.grad(loss, student)
    assert_close(grad, grad_s, "grad student", STORE_RTOL[torch.bfloat16])


@pytest.mark.skipif("cpu" not in STATUS["triton"]["devices"],
                    reason="runs the GPU's launch sizes under the Triton interpreter; a GPU runs them for real")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_triton_at_gpu_launch_sizes(layout):
    # The GPU's blocks of 4,096 elements (the interpreter's are 256): 10,989 elements make three programs, the
    # last one partial, with channel runs crossing block boundaries.
    from ofdkern.kernels.triton_helpers import gpu_launch_sizes, launch_size

    with gpu_launch_sizes():
        assert launch_size(gpu=4096, interpreted=256) == 4096
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for reduction in ("sum", "none"):
                run_case("cpu", "triton", (3, 37, 9, 11), dtype, layout, reduction, grads=(True, True, True))
    assert launch_size(gpu=4096, interpreted=256) == 256


# ---- bad input: a clear error naming the argument -------------------------------------------------------

def _bad_calls():
    s = torch.randn(2, 3, 4, 4)
    m = -torch.rand(3)
    return [
        ((s, torch.randn(2, 3, 4, 5), m), {}, ValueError, "same shape"),
        ((s, torch.randn(2, 3, 1, 1), m), {}, ValueError, "same shape"),
        ((s, s.clone(), -torch.rand(4)), {}, ValueError, "margin must have shape"),
        ((s, s.clone(), -torch.rand(1, 3, 1)), {}, ValueError, "margin must have shape"),
        ((s, s.clone(), -torch.rand(3, 1)), {}, ValueError, "margin must have shape"),
        ((s.long(), s.long(), m), {}, TypeError, "student must be float16"),
        ((s, s.int(), m), {}, TypeError, "teacher must be float16"),
        ((s, s.clone(), m.long()), {}, TypeError, "margin must be float16"),
        ((s, s.clone(), m), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((s, s.clone(), m), {"backend": "cudnn"}, ValueError, "backend must be one of"),
        ((torch.randn(3), torch.randn(3), m), {}, ValueError, "student must have 2 to 5 dims"),
        ((torch.randn(1, 3, 1, 1, 1, 1), torch.randn(1, 3, 1, 1, 1, 1), m), {}, ValueError, "2 to 5 dims"),
        (([1.0], s, m), {}, TypeError, "student must be a torch.Tensor"),
        ((s, s.clone(), m.to("meta")), {}, ValueError, "one device"),
    ]


@pytest.mark.parametrize("args,kwargs,error,message", _bad_calls())
def test_bad_input_raises_clear_error(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        ofdkern.ofd_loss(*args, **kwargs)


def test_unavailable_backend_raises():
    s = torch.randn(2, 3, 4, 4)
    unavailable = [name for name in ("cuda", "triton") if "cpu" not in STATUS[name]["devices"]]
    for name in unavailable:
        with pytest.raises(ofdkern.BackendUnavailableError, match=f"backend '{name}' cannot run this call on cpu"):
            ofdkern.ofd_loss(s, s.clone(), -torch.rand(3), backend=name)
    if torch.cuda.is_available():
        with pytest.raises(ofdkern.BackendUnavailableError, match="backend 'cpu' cannot run this call on cuda"):
            ofdkern.ofd_loss(s.cuda(), s.cuda(), -torch.rand(3, device="cuda"), backend="cpu")


def test_mixed_devices_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device for a second real device")  # meta covers the check on CPU above
    s = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="student on cpu, teacher on cuda"):
        ofdkern.ofd_loss(s, s.cuda(), -torch.rand(3))


# ---- backends -------------------------------------------------------------------------------------------

def test_auto_picks_the_cpu_kernel_on_cpu():
    assert STATUS["cpu"]["built"], STATUS["cpu"]["reason"]
    from ofdkern._backends import resolve
    from ofdkern.ops.ofd import OFD

    assert resolve(OFD, "auto", torch.device("cpu")) == "cpu"


@pytest.mark.skipif(os.environ.get("OFDKERN_EXPECT_CUDA") != "1", reason="set where the CUDA kernels are built")
def test_cuda_kernels_are_built():
    assert STATUS["cuda"]["built"], STATUS["cuda"]["reason"]


def test_without_extension_auto_falls_back_with_one_warning():
    code = """
import warnings, torch, ofdkern
warnings.simplefilter("always")
s = torch.randn(2, 3, 4, 4)
with warnings.catch_warnings(record=True) as caught:
    a = ofdkern.ofd_loss(s, s + 1, -torch.rand(3))
    b = ofdkern.ofd_loss(s, s + 1, -torch.rand(3))
assert [str(w.message).startswith("ofdkern.ofd_loss: no fused kernel runs this call on cpu") for w in caught] == [True], caught
assert not ofdkern.backend_status()["cpu"]["available"]
try:
    ofdkern.ofd_loss(s, s, -torch.rand(3), backend="cpu")
except ofdkern.BackendUnavailableError as error:
    assert "disabled by OFDKERN_DISABLE_EXTENSION" in str(error), error
else:
    raise AssertionError("backend='cpu' should raise without the extension")
print("ok")
"""
    env = dict(os.environ, OFDKERN_DISABLE_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_python_m_ofdkern_prints_the_backend_matrix():
    result = subprocess.run([sys.executable, "-m", "ofdkern"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("triton", "cuda", "cpu", "reference"):
        assert name in result.stdout
    if STATUS["cpu"]["built"]:
        assert "cpu kernels: " in result.stdout


@pytest.mark.skipif(not STATUS["cpu"]["built"] or not sys.platform.startswith("linux"),
                    reason="the OpenMP build flag is set on Linux")
def test_cpu_kernels_are_built_parallel():
    # Without OpenMP in the extension's own build, at::parallel_for silently runs the kernels on one thread.
    assert STATUS["cpu"]["parallel"] is True


# ---- torch integration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend):
    student, teacher = make_features((2, 3, 4, 5), torch.float32, device)
    margin = make_margin(3, torch.float32, device)
    for x in (student, teacher, margin):
        x.requires_grad_()
    for reduction in ("sum", "none"):
        torch.library.opcheck(ofd_loss_fused.custom_op,
                              (student, teacher, margin, reduction, backend, True, True, True, False))


def test_torch_compile_training_step_matches_eager():
    torch.manual_seed(0)
    connector = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 1, bias=False), torch.nn.BatchNorm2d(6))
    student_in = torch.randn(2, 4, 5, 5)
    teacher = torch.randn(2, 6, 5, 5)
    margin = -torch.rand(6)

    def distill_loss(x):
        return ofdkern.ofd_loss(connector(x), teacher, margin, reduction="batchmean", backend="cpu") * 1e-3

    def step(loss_fn):
        connector.zero_grad()
        loss = loss_fn(student_in)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in connector.parameters()]

    eager_loss, eager_grads = step(distill_loss)
    loss, grads = step(torch.compile(distill_loss, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss, eager_loss)
    for grad, want in zip(grads, eager_grads):
        torch.testing.assert_close(grad, want)


def test_torch_compile_inductor():
    student, teacher = make_features((2, 3, 4, 4), torch.float32, "cpu")
    margin = make_margin(3, torch.float32, "cpu")
    student.requires_grad_()
    fn = torch.compile(lambda s, t, m: ofdkern.ofd_loss(s, t, m, backend="cpu") * 2, fullgraph=True)
    loss = fn(student, teacher, margin)
    loss.backward()
    expected = reference.ofd_loss(student, teacher, margin) * 2
    torch.testing.assert_close(loss, expected)
    (want,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(student.grad, want)


def test_autocast_bfloat16_on_cpu():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, 5, 5)
    teacher = torch.randn(2, 4, 5, 5)
    margin = -torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = conv(x)
        assert student.dtype == torch.bfloat16
        loss = ofdkern.ofd_loss(student, teacher, margin, backend="cpu")
        expected = reference.ofd_loss(student, teacher, margin)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(loss, conv.weight, retain_graph=True)
    (want,) = torch.autograd.grad(expected, conv.weight)
    torch.testing.assert_close(grad, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if "cuda" in STATUS[b]["devices"]] or ["cuda"])
def test_cuda_graph_capture(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    student, teacher = make_features((4, 16, 8, 8), torch.float32, "cuda")
    margin = make_margin(16, torch.float32, "cuda")
    student.requires_grad_()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (Triton compiles, allocator settles) outside the capture
            loss = ofdkern.ofd_loss(student, teacher, margin, backend=backend)
            (grad,) = torch.autograd.grad(loss, student)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = ofdkern.ofd_loss(student, teacher, margin, backend=backend)
        (grad,) = torch.autograd.grad(loss, student)
    with torch.no_grad():
        student.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.ofd_loss(student, teacher, margin)
    torch.testing.assert_close(loss, expected)


@pytest.mark.gpu
def test_cuda_scale_op():
    if "cuda" not in STATUS["cuda"]["devices"]:
        pytest.skip("needs the CUDA kernels and a CUDA device")
    gradient = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    factor = torch.tensor(0.3, device="cuda")
    torch.library.opcheck(torch.ops.ofdkern.scale_, (gradient.clone(), factor))
    expected = (gradient.float() * 0.3).bfloat16()
    torch.ops.ofdkern.scale_(gradient, factor)
    assert torch.equal(gradient, expected)
    with pytest.raises(ValueError, match="factor must be a 0-dim Float tensor"):
        torch.ops.ofdkern.scale_(gradient, factor.double())
    with pytest.raises(ValueError, match="factor must be a 0-dim Float tensor"):
        torch.ops.ofdkern.scale_(gradient, factor.cpu())


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if "cuda" in STATUS[b]["devices"]] or ["cuda"])
def test_more_than_2_31_elements(backend):
    if not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a CUDA device with 40 GiB")
    # 2^31 + 2^20 bf16 elements: offsets past int32 must index the right element.
    shape = (2049, 1024, 32, 32)
    student = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    teacher = torch.zeros_like(student)
    student.view(-1)[-5:] = 2.0  # only the last elements contribute: 5 * (2 - 0)^2
    margin = torch.full((1024,), -1.0, device="cuda")
    student.requires_grad_()
    loss = ofdkern.ofd_loss(student, teacher, margin, backend=backend)
    assert loss.item() == 20.0
    # The backward's in-place scaling must reach the last elements too.
    (grad,) = torch.autograd.grad(loss * 0.5, student)
    assert grad.view(-1)[-5:].float().tolist() == [2.0] * 5
    assert grad.view(-1)[: -5].abs().max().item() == 0.0


@pytest.mark.skipif("ofdkern::empty_like_hugepage" not in STATUS["cpu"].get("ops", ()), reason="needs the extension")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_huge_page_outputs_keep_layout_and_values(layout):
    # Over the 256 KiB threshold: the gradient buffers come from the huge-page allocator.
    run_case("cpu", "cpu", (4, 64, 96, 96), torch.float32, layout, "sum", grads=(True, True, False))
    like = make_features((4, 64, 96, 96), torch.float32, "cpu", layout)[0]
    buffer = torch.ops.ofdkern.empty_like_hugepage(like)
    assert buffer.stride() == like.stride() and buffer.dtype == like.dtype
    buffer.copy_(like)
    assert torch.equal(buffer, like)


@pytest.mark.skipif("ofdkern::empty_like_hugepage" not in STATUS["cpu"].get("ops", ()), reason="needs the extension")
def test_cpu_buffer_cache_reuses_freed_buffers_within_its_limit():
    like = torch.empty((4, 64, 96, 96))  # 9 MiB: over the huge-page threshold, 10 MiB once rounded
    block = 10 << 20
    previous = ofdkern.set_cpu_buffer_cache_limit(block)
    try:
        ofdkern.empty_cpu_buffer_cache()
        assert ofdkern.cpu_buffer_cache_bytes() == 0
        first = torch.ops.ofdkern.empty_like_hugepage(like)
        address = first.data_ptr()
        del first
        assert ofdkern.cpu_buffer_cache_bytes() == block
        again = torch.ops.ofdkern.empty_like_hugepage(like)
        assert again.data_ptr() == address and ofdkern.cpu_buffer_cache_bytes() == 0
        other = torch.ops.ofdkern.empty_like_hugepage(like)
        del again, other  # two blocks freed, room for one: the older one goes back to the system
        assert ofdkern.cpu_buffer_cache_bytes() == block
        assert torch.ops.ofdkern.empty_like_hugepage(torch.empty((4, 64, 128, 128))).data_ptr() != address
        assert ofdkern.cpu_buffer_cache_bytes() == block  # another size does not take the cached block
        ofdkern.empty_cpu_buffer_cache()
        assert ofdkern.cpu_buffer_cache_bytes() == 0
        assert ofdkern.set_cpu_buffer_cache_limit(0) == block  # emptying kept the limit
        del like
        kept = torch.ops.ofdkern.empty_like_hugepage(torch.empty((4, 64, 96, 96)))
        del kept
        assert ofdkern.cpu_buffer_cache_bytes() == 0  # limit 0: nothing is cached
        # From 256 KiB on (glibc may map such blocks anew on every call), in blocks of whole huge pages.
        ofdkern.set_cpu_buffer_cache_limit(block)
        small = torch.ops.ofdkern.empty_like_hugepage(torch.empty(256 << 10, dtype=torch.uint8))
        del small
        assert ofdkern.cpu_buffer_cache_bytes() == 2 << 20
        smaller = torch.ops.ofdkern.empty_like_hugepage(torch.empty((256 << 10) - 1, dtype=torch.uint8))
        del smaller
        assert ofdkern.cpu_buffer_cache_bytes() == 2 << 20  # under the threshold: an ordinary tensor
        ofdkern.empty_cpu_buffer_cache()
    finally:
        ofdkern.set_cpu_buffer_cache_limit(previous)


@pytest.mark.parametrize("limit", [-1, 1.5, True, "1"])
def test_cpu_buffer_cache_limit_must_be_a_non_negative_int(limit):
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0"):
        ofdkern.set_cpu_buffer_cache_limit(limit)
