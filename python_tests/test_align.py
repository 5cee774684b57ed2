"""Channel-wise alignment loss (Liu et al., ICCVW 2023) on the cpu, triton and reference backends against the
eager ``conv1x1 -> relu -> conv1x1 -> loss`` reference: values and every gradient, with and without the OFD margin,
reductions, layouts, dtypes, wide channels over several tiles, the Triton channel bound, torch.compile of the module,
memory and bad input. (Determinism, empty batches, opcheck and double backward: test_op_framework.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import ofdkern
from ofdkern import reference
from ofdkern.ops import align

from conftest import STATUS, assert_same_bits_with_one_thread, backend_cases
import op_cases
from parity import assert_parity

TRITON_HERE = "cpu" in STATUS["triton"]["devices"]
BACKENDS = ["cpu", "reference"] + (["triton"] if TRITON_HERE else [])
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="Triton does not run on CPU tensors here")

S_CHANNELS, HIDDEN, T_CHANNELS = 5, 7, 6


def make_inputs(spatial=(3, 7), dtype=torch.float64, channels_last=False, conv_weights=False, batch=3, seed=0,
                teacher_grad=True):
    """[student, teacher, w1, b1, w2, b2], every one requiring grad (the teacher when ``teacher_grad``). The
    default 63 pixels make 4 Triton tiles of 16 for its 3 interpreted programs: the first one loops twice."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    student, teacher = randn(batch, S_CHANNELS, *spatial), randn(batch, T_CHANNELS, *spatial)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    w1, w2 = randn(HIDDEN, S_CHANNELS) / 2, randn(T_CHANNELS, HIDDEN) / 2
    if conv_weights:
        w1, w2 = w1[:, :, None, None], w2[:, :, None, None]
    tensors = [student, teacher, w1, randn(HIDDEN), w2, randn(T_CHANNELS)]
    for index, x in enumerate(tensors):
        x.requires_grad_(index != 1 or teacher_grad)
    return tensors


def make_margin(dtype=torch.float64):
    return -torch.rand(T_CHANNELS, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype) - 0.1


def expected(inputs, margin, reduction, grad_output):
    """The reference in float64 on the same values, and its gradients wrt every input that requires grad."""
    leaves = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    value = reference.channel_align_loss(*leaves, None if margin is None else margin.double(), reduction)
    wanted = [x for x in leaves if x.requires_grad]
    return value.detach(), torch.autograd.grad(value, wanted, grad_output.double())


def check(inputs, margin=None, reduction="sum", backend="cpu", rtol=1e-10):
    loss = ofdkern.channel_align_loss(*inputs, margin=margin, reduction=reduction, backend=backend)
    grad_output = torch.tensor(1.7, dtype=torch.float64)
    want, want_grads = expected(inputs, margin, reduction, grad_output)
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=rtol * want.abs().item())
    wanted = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_output.to(loss.dtype))
    for x, grad, want_grad in zip(wanted, grads, want_grads):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert want_grad.abs().max() > 0
        torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=rtol * want_grad.abs().max().item())
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_margin", [False, True], ids=["l2", "ofd"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_reference(backend, with_margin, reduction, channels_last):
    margin = make_margin() if with_margin else None
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        inputs = make_inputs(dtype=dtype, channels_last=channels_last, conv_weights=channels_last)
        check(inputs, None if margin is None else margin.to(dtype), reduction, backend, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_margin", [False, True], ids=["l2", "ofd"])
def test_half_precision_accumulates_in_fp32(backend, dtype, with_margin):
    # Features and weights in half precision; compared with the float64 reference on the same (rounded) values,
    # so the only error is the rounding of the stored unit gradients and of the returned loss.
    inputs = make_inputs(dtype=dtype, channels_last=True)
    margin = make_margin(torch.float32) if with_margin else None
    loss = check(inputs, margin, "mean", backend, rtol=2e-2)
    # The reference's promotion: the inputs' dtype, float32 once an fp32 margin takes part.
    assert loss.dtype == (torch.float32 if with_margin else dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_ranks_and_strided_inputs(backend):
    for spatial in ((), (5,), (2, 2, 3)):
        check(make_inputs(spatial=spatial), make_margin(), "batchmean", backend)
    # Non-dense views: every other position, and a batch slice.
    inputs = make_inputs(spatial=(3, 8))
    strided = [inputs[0][..., ::2], inputs[1][..., ::2], *inputs[2:]]
    check(strided, None, "sum", backend)
    check([inputs[0][::2], inputs[1][::2], *inputs[2:]], make_margin(), "sum", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_margin_ties_split_the_gradient(backend):
    inputs = make_inputs()
    margin = make_margin()
    with torch.no_grad():
        inputs[1][0, :, 0, :3] = margin[:, None]  # exact ties t == m: torch.max sends half the gradient each way
        inputs[1][1, :, 1, :] = 0.0  # t' = 0 is not > 0: only s > t' counts
    check(inputs, margin, "sum", backend)


def _wide_inputs(batch, spatial, dtype, channels_last, seed=0):
    """Real layer widths: student 96, hidden 160, teacher 200 channels (the CPU tile buffers hold 13,617 pixels
    of them in fp32, 27,235 in bf16; column blocks are at least 2,048 pixels)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = torch.randn(batch, 96, *spatial, generator=gen, dtype=torch.float64).to(dtype, memory_format=fmt)
    teacher = torch.randn(batch, 200, *spatial, generator=gen, dtype=torch.float64).to(dtype, memory_format=fmt)
    weights = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) / shape[-1] ** 0.5
               for shape in ((160, 96), (160,), (200, 160), (200,))]
    return [x.requires_grad_() for x in (student, teacher, *weights)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch,spatial", [(40, (20, 20)), (5, (50, 50)), (1, (128, 128))],
                         ids=["whole-samples", "slices-of-samples", "sample-slices"])
def test_wide_channels_over_several_tiles(batch, spatial, channels_last):
    # Tiles of 8,192 pixels at these widths (CpuDevice::tile_pixels), column blocks of 2,048. 40 samples of 400
    # positions: two tiles of 20 samples, in blocks of whole samples; 5 of 2,500: tiles of 3 samples and 2, each
    # sample in two slices; 1 of 16,384: two tiles that are slices of it, cut into four blocks each.
    margin = -torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.1
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        inputs = _wide_inputs(batch, spatial, dtype, channels_last)
        check(inputs, None, "mean", "cpu", rtol)
        check(inputs, margin.to(dtype), "sum", "cpu", rtol)


@pytest.fixture(params=[False, True], ids=["fp32-gemms", "bf16-gemms"])
def bfloat16_gemms(request):
    """Each CPU GEMM path of bfloat16 channel alignment, whichever this CPU takes by default."""
    previous = ofdkern.set_cpu_bfloat16_gemms(request.param)
    yield request.param
    ofdkern.set_cpu_bfloat16_gemms(previous)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch,spatial", [(3, (40, 40)), (2, (4, 4))], ids=["block-sums", "tile-gemms"])
def test_wide_channels_on_cpu_gemm_paths(batch, spatial, channels_last, bfloat16_gemms):
    # At these widths the fp32 GEMMs are large enough for oneDNN (MKL on Intel CPUs), the fp64 ones stay with
    # BLAS, bf16 ones run in bf16 or in fp32 (bfloat16_gemms): each is one single-threaded call per block, so
    # the bits do not depend on the thread count. Both schedules of the weight gradients (align_cpu.cpp): at
    # 4,800 pixels each column block sums its own share, added up in block order; at 32 pixels the weights
    # outweigh the tile's buffers and GEMMs over the whole tile sum them, in blocks of rows.
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        inputs = _wide_inputs(batch, spatial, dtype, channels_last)

        def run():
            loss = ofdkern.channel_align_loss(*inputs, reduction="mean", backend="cpu")
            return (loss, *torch.autograd.grad(loss, inputs))

        assert_same_bits_with_one_thread(run)
        assert_parity(op_cases.ALIGN.fused("cpu"), op_cases.ALIGN.reference, inputs, names=op_cases.ALIGN.names)
    # NaN and inf go through.
    planted = op_cases.ALIGN.plant_special(_wide_inputs(2, (16, 16), torch.float32, channels_last))
    assert_parity(op_cases.ALIGN.fused("cpu"), op_cases.ALIGN.reference, planted, names=op_cases.ALIGN.names)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bfloat16_at_real_widths_over_several_tiles(channels_last, bfloat16_gemms):
    # 12 samples of 48x48: four tiles of 3 samples, so the weight gradients sum per-tile products (rounded to
    # bf16 where the GEMMs run in bf16) in fp32; every result at least as accurate as eager's bf16 path.
    inputs = _wide_inputs(12, (48, 48), torch.bfloat16, channels_last)
    assert_parity(op_cases.ALIGN.fused("cpu"), op_cases.ALIGN.reference, inputs, names=op_cases.ALIGN.names)


def test_cpu_bfloat16_gemms_setting_switches_the_path():
    inputs = _wide_inputs(2, (16, 16), torch.bfloat16, channels_last=False)

    def run(enabled):
        previous = ofdkern.set_cpu_bfloat16_gemms(enabled)
        try:
            loss = ofdkern.channel_align_loss(*inputs, backend="cpu")
            return (loss, *torch.autograd.grad(loss, inputs))
        finally:
            assert ofdkern.set_cpu_bfloat16_gemms(previous) is enabled
    in_bf16, in_fp32 = run(True), run(False)
    # bf16 GEMMs round the hidden and projected features to bf16, fp32 ones keep them: other bits.
    assert not all(torch.equal(a, b) for a, b in zip(in_bf16, in_fp32))
    # The default (None) is one of the two, by the CPU's features.
    default = run(None)
    assert any(all(torch.equal(a, b) for a, b in zip(default, path)) for path in (in_bf16, in_fp32))
    for bad in ("bf16", 1):
        with pytest.raises(ValueError, match="enabled must be True, False or None"):
            ofdkern.set_cpu_bfloat16_gemms(bad)


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_wide_channels(channels_last):
    # Past the fused kernel's bound: the tiled pipeline, K-loops over channel blocks (a few pixels, for the
    # interpreter), including several programs along pixels and channels and a partial last block.
    margin = -torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.1
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        inputs = _wide_inputs(2, (3, 5), dtype, channels_last)
        check(inputs, None, "mean", "triton", rtol)
        check(inputs, margin.to(dtype), "sum", "triton", rtol)
    inputs = _wide_inputs(2, (3, 5), torch.bfloat16, channels_last)
    check(inputs, margin.float(), "mean", "triton", 2e-2)
    # Autocast's mix: bfloat16 features, float32 weights (the dots run in float32 on features loaded in bfloat16).
    mixed = _wide_inputs(2, (3, 5), torch.float32, channels_last)
    mixed[:2] = [x.detach().bfloat16().requires_grad_() for x in mixed[:2]]
    check(mixed, margin.float(), "sum", "triton", 1e-2)
    # NaN and inf through both layers and relu's backward, as autograd through the reference carries them.
    planted = op_cases.ALIGN.plant_special(_wide_inputs(2, (3, 5), torch.float32, channels_last))
    assert_parity(op_cases.ALIGN.fused("triton"), op_cases.ALIGN.reference, planted, names=op_cases.ALIGN.names)


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_at_gpu_launch_sizes(channels_last):
    # A GPU's tiling under the interpreter (whose own blocks are 16 wide). The fused kernel's float32 tiles of
    # 64 pixels: 180 pixels make three, the last partial. The tiled pipeline's blocks of 64 pixels x 64
    # channels with K-steps of 32: 147 pixels make three pixel blocks, and 96, 160 and 200 channels end in
    # partial channel blocks and K-steps.
    from ofdkern.kernels.triton_helpers import gpu_launch_sizes

    wide_margin = -torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.1
    with gpu_launch_sizes():
        for dtype, rtol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
            narrow = make_inputs(spatial=(6, 10), dtype=dtype, channels_last=channels_last)
            check(narrow, make_margin(dtype), "sum", "triton", rtol)
            check(_wide_inputs(3, (7, 7), dtype, channels_last), wide_margin.to(dtype), "mean", "triton", rtol)
        check(_wide_inputs(3, (7, 7), torch.bfloat16, channels_last), wide_margin.float(), "sum", "triton", 2e-2)


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if TRITON_HERE else []))
def test_gradients_only_where_asked(backend):
    inputs = make_inputs(teacher_grad=False)
    check(inputs, make_margin(), "sum", backend)
    student, teacher, *params = make_inputs(teacher_grad=False)
    params = [p.detach() for p in params]
    loss = ofdkern.channel_align_loss(student, teacher, *params, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.abs().max() > 0
    with torch.no_grad():
        no_grad = ofdkern.channel_align_loss(student, teacher, *params, backend=backend)
    assert not no_grad.requires_grad and torch.equal(no_grad, loss.detach())


def test_gradcheck_cpu():
    inputs = make_inputs(spatial=(2, 3), seed=3)
    for margin in (None, make_margin()):
        assert torch.autograd.gradcheck(
            lambda *xs: ofdkern.channel_align_loss(*xs, margin=margin, reduction="mean", backend="cpu"),
            tuple(inputs), fast_mode=True)


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if TRITON_HERE else []))
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    student, teacher = (x.detach().float() for x in make_inputs()[:2])
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(ofdkern.ChannelAlign(S_CHANNELS, T_CHANNELS, HIDDEN, ofd_margin=make_margin(),
                                           reduction="batchmean", backend=backend))

    def step(module, x):
        loss = module(x, teacher)
        loss.backward()
        return loss

    eager_student, compiled_student = student.clone().requires_grad_(), student.clone().requires_grad_()
    eager_loss = step(models[0], eager_student)
    # The forward compiles to one graph; aot_eager traces its backward graph too, which backward() then runs.
    compiled_module = torch.compile(models[1], backend="aot_eager", fullgraph=True)
    compiled_loss = step(compiled_module, compiled_student)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_student.grad, eager_student.grad)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad)


def _largest_allocation(fn) -> int:
    """The largest memory any single profiled op allocated (net of what it freed) while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_never_allocates_the_full_hidden_activation():
    # Narrow features, a wide hidden layer: the full (pixels x hidden) activation (128 MiB) dwarfs the inputs,
    # their gradients (2 MiB each) and a tile's buffers (32 MiB in all), so any op allocating it stands out.
    batch, channels, hidden, size = 32, 4, 256, 64
    full_activation = batch * size * size * hidden * 4
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(batch, channels, size, size, generator=gen, requires_grad=True)
    teacher = torch.randn(batch, channels, size, size, generator=gen)
    params = [torch.randn(hidden, channels, generator=gen), torch.randn(hidden, generator=gen),
              torch.randn(channels, hidden, generator=gen), torch.randn(channels, generator=gen)]
    params = [p.requires_grad_() for p in params]

    def run(loss_fn):
        return lambda: loss_fn(student, teacher, *params).backward()

    eager = _largest_allocation(run(reference.channel_align_loss))
    fused = _largest_allocation(run(lambda *xs: ofdkern.channel_align_loss(*xs, backend="cpu")))
    assert eager >= full_activation  # the probe sees the eager reference's activation
    assert fused < full_activation / 4


def test_module_init_state_and_forward():
    torch.manual_seed(0)
    module = ofdkern.ChannelAlign(S_CHANNELS, T_CHANNELS)
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(S_CHANNELS, T_CHANNELS, 1), nn.Conv2d(T_CHANNELS, T_CHANNELS, 1)
    assert torch.equal(module.conv1.weight, conv1.weight) and torch.equal(module.conv2.bias, conv2.bias)
    assert module.margin is None and list(module.state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]

    margin = make_margin(torch.float32).reshape(1, T_CHANNELS, 1, 1)
    module = ofdkern.ChannelAlign(S_CHANNELS, T_CHANNELS, hidden=HIDDEN, ofd_margin=margin, reduction="mean")
    assert module.conv1.weight.shape == (HIDDEN, S_CHANNELS, 1, 1)
    assert "margin" in module.state_dict() and torch.equal(module.margin, margin.reshape(-1))
    student, teacher = (x.detach().float() for x in make_inputs()[:2])
    want = reference.ofd_loss(module.project(student), teacher, module.margin, "mean")
    torch.testing.assert_close(module(student, teacher), want)


@pytest.mark.parametrize("device,backend", [case for case in backend_cases("channel_align_loss")
                                             if case.values[1] in ("cpu", "cuda")])
@pytest.mark.parametrize("empty_layer", ["student", "hidden", "teacher"])
def test_kernel_op_refuses_a_layer_without_channels(device, backend, empty_layer):
    # The public function refuses it in Python; the C++ op, called directly, must too (on CUDA it would
    # otherwise launch elementwise kernels on grids of 0 blocks).
    cs, hidden, ct = (0 if empty_layer == name else size for name, size in
                      (("student", S_CHANNELS), ("hidden", HIDDEN), ("teacher", T_CHANNELS)))
    student, teacher = torch.randn(2, cs, 3, 3, device=device), torch.randn(2, ct, 3, 3, device=device)
    w1, b1, w2, b2 = (torch.randn(shape, device=device) for shape in ((hidden, cs), (hidden,), (ct, hidden), (ct,)))
    with pytest.raises(ValueError, match="at least one channel in every layer"):
        torch.ops.ofdkern.align_fused(student, teacher, w1, b1, w2, b2, None, True, True, True)


def test_bad_input_names_the_argument():
    student, teacher, w1, b1, w2, b2 = make_inputs()
    loss = ofdkern.channel_align_loss
    cases = [
        (ValueError, "batch and spatial", lambda: loss(student, teacher[..., :3], w1, b1, w2, b2)),
        (ValueError, r"w1 must have shape \(out, 5\)", lambda: loss(student, teacher, w1[:, :4], b1, w2, b2)),
        (ValueError, r"w2 must have shape \(6, 7\)", lambda: loss(student, teacher, w1, b1, w2[:5], b2)),
        (ValueError, r"w1 must have shape", lambda: loss(student, teacher, w1[:, :, None, None].expand(
            HIDDEN, S_CHANNELS, 3, 3), b1, w2, b2)),
        (ValueError, r"b1 must have shape \(7,\)", lambda: loss(student, teacher, w1, b1[:3], w2, b2)),
        (ValueError, r"b2 must have shape \(6,\)", lambda: loss(student, teacher, w1, b1, w2, b1)),
        (ValueError, "margin must have shape", lambda: loss(student, teacher, w1, b1, w2, b2,
                                                              margin=torch.zeros(5))),
        (ValueError, "reduction must be one of", lambda: loss(student, teacher, w1, b1, w2, b2, reduction="none")),
        (ValueError, "backend must be one of", lambda: loss(student, teacher, w1, b1, w2, b2, backend="gpu")),
        (ofdkern.BackendUnavailableError, "'cuda' cannot run this call on cpu",
         lambda: loss(student, teacher, w1, b1, w2, b2, backend="cuda")),
        (TypeError, "student must be float16", lambda: loss(student.long(), teacher, w1, b1, w2, b2)),
        (TypeError, "w2 must be a torch.Tensor", lambda: loss(student, teacher, w1, b1, None, b2)),
        (ValueError, "one device", lambda: loss(student, teacher, w1, b1, w2, b2.to("meta"))),
        (ValueError, "margin gradients", lambda: loss(student, teacher, w1, b1, w2, b2, backend="cpu",
                                                      margin=make_margin().requires_grad_())),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    with pytest.raises(ValueError, match="ofd_margin must have 6 values"):
        ofdkern.ChannelAlign(S_CHANNELS, T_CHANNELS, ofd_margin=torch.zeros(5))
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        ofdkern.ChannelAlign(S_CHANNELS, T_CHANNELS, hidden=0)
