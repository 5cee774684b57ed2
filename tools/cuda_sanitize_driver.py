"""Exercises every instance of the CUDA kernels of ``ofdkern::ofd_fused``, ``ofdkern::scale_``,
``ofdkern::align_fused``, the attention-transfer ops (``attention_map``, ``attention_map_backward``,
``attention_transfer_maps``) and ``kd_fused`` (also behind ``cwd_loss``) on small, awkward inputs, for
tools/sanitize_cuda.sh (compute-sanitizer memcheck / racecheck) and as a plain GPU smoke test.

Covers: all 16 output combinations (loss reduced or per element x each gradient), fp32/fp64/fp16/bf16,
NCHW, channels_last, channels_last_3d, 2-D features, a size-1 channel dim, sizes that leave a scalar tail,
planes of whole vectors (one margin per vector) and odd ones (the per-element channel walk), views starting
one element into their storage (misaligned: the scalar kernels), inputs large enough that each thread loops
more than once over the grid, exact ties t == margin, and an empty tensor.
Outputs are checked against the C++ CPU kernel, reruns against themselves (bitwise), scale_ against the
float32 (float64) product rounded once, and the public ``ofd_loss(backend="cuda")`` with autograd against
the eager reference.

align_fused: NCHW, channels_last and mixed layouts, with and without a margin, several gradient combinations,
2-D features, one pixel, several tiles, an empty batch, against its C++ CPU kernel and rerun bitwise.

Attention transfer and KD: KD rows of one chunk (the fused kernel) and of several (stats, terms, finish and
teacher kernels), a single class, sizes one past a chunk, every combination of gradients; attention maps and
their gradients for NCHW, channels_last, channels_last_3d, a layout the kernels do not walk (copied), 2-D features and size-1 dims,
exponents 2, 1 and general; the map math with an all-zero map (below F.normalize's eps); empty inputs. Each is
checked against the C++ CPU kernel and rerun bitwise, and the public losses with autograd against the reference.

cwd_loss: NCHW and channels_last maps whose rows take one chunk and several, each reduction, with autograd
against the reference and rerun bitwise.
Exit status 1 on any mismatch.
"""
from __future__ import annotations

import itertools
import math
import sys

import torch

import ofdkern
from ofdkern import reference
from ofdkern._dtypes import accumulation_dtype

MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
# (shape, layout, first element's offset into its storage)
SMALL_CASES = [
    ((3, 5, 7, 9), "contiguous", 0),
    ((3, 5, 7, 9), "contiguous", 1),
    ((3, 5, 7, 9), "channels_last", 0),
    ((3, 5, 7, 9), "channels_last", 1),
    ((3, 5, 4, 6), "contiguous", 0),
    ((3, 5, 4, 6), "contiguous", 1),
    ((2, 3, 4, 5, 7), "channels_last_3d", 0),
    ((2, 3), "contiguous", 0),
    ((2, 3), "contiguous", 1),
    ((5, 1, 3, 3), "contiguous", 0),
    ((0, 3, 2, 2), "contiguous", 0),
]
# More elements than one pass of the grid covers (a few blocks per SM x 256 threads x 8 half elements).
LARGE_CASES = [((3, 37, 101, 103), "contiguous", 0), ((3, 37, 101, 103), "channels_last", 1),
               ((3, 37, 96, 104), "contiguous", 0)]
# scale_: (numel, first element's offset into its storage): empty, tails of every vector width, misaligned,
# and more than one grid pass.
SCALE_CASES = [(0, 0), (13, 0), (13, 1), (1000, 3), (3 * 37 * 101 * 103, 0), (3 * 37 * 101 * 103, 1)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 2e-2}

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)
        print("FAIL", what, flush=True)


def features(shape, layout, offset, dtype, generator):
    """A dense tensor of ``layout`` whose data starts ``offset`` elements into its storage."""
    strides = torch.empty(shape, device="meta", memory_format=MEMORY_FORMATS[layout]).stride()
    numel = torch.Size(shape).numel()
    storage = torch.randn(numel + offset, generator=generator, device="cuda").to(dtype)
    return storage.as_strided(shape, strides, offset)


def inputs(shape, layout, offset, dtype, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    acc = accumulation_dtype(dtype)
    student = features(shape, layout, offset, dtype, generator)
    teacher = features(shape, layout, offset, dtype, generator)
    # Margins representable in the feature dtype, so that some teacher values tie with them exactly.
    margin = (-torch.rand(shape[1], generator=generator, device="cuda")).to(dtype).to(acc)
    channel_margin = reference.margin_as_channels(margin, len(shape)).expand(shape).to(dtype)
    ties = torch.rand(shape, generator=generator, device="cuda") < 0.1
    teacher.copy_(torch.where(ties, channel_margin, teacher))
    return student, teacher, margin


def close(actual, expected, dtype) -> bool:
    tol = TOLERANCE[dtype]
    return actual.dtype == expected.dtype and actual.shape == expected.shape and torch.allclose(
        actual.cpu().double(), expected.double(), rtol=tol, atol=tol)


def check_fused(shape, layout, offset, dtype, masks) -> None:
    student, teacher, margin = inputs(shape, layout, offset, dtype, seed=7)
    name = f"{tuple(shape)} {layout} offset={offset} {dtype}"
    for elementwise, *grads in masks:
        flags = (elementwise, *grads)
        gpu = torch.ops.ofdkern.ofd_fused(student, teacher, margin, *flags)
        cpu = torch.ops.ofdkern.ofd_fused(student.cpu(), teacher.cpu(), margin.cpu(), *flags)
        rerun = torch.ops.ofdkern.ofd_fused(student, teacher, margin, *flags)
        what = f"{name} elementwise={elementwise} grads={grads}"
        if elementwise:
            check(close(gpu[0], cpu[0], dtype), f"{what}: per-element loss")
            check(gpu[0].stride() == student.stride(), f"{what}: loss layout")
        else:
            check(gpu[0].dim() == 1 and close(gpu[0].sum(), cpu[0].sum(), dtype), f"{what}: loss")
        for label, wanted, g, c in zip(("student", "teacher", "margin"), grads, gpu[1:], cpu[1:]):
            check(close(g, c, dtype), f"{what}: grad_{label}")
            if wanted:
                check(g.stride() == student.stride(), f"{what}: grad_{label} layout")
        check(all(torch.equal(a, b) for a, b in zip(gpu, rerun)), f"{what}: rerun not bitwise equal")


def check_public(shape, layout, offset, dtype) -> None:
    student, teacher, margin = inputs(shape, layout, offset, dtype, seed=11)
    for reduction in ("sum", "none"):
        leaves = [x.detach().requires_grad_() for x in (student, teacher, margin)]
        loss = ofdkern.ofd_loss(*leaves, reduction=reduction, backend="cuda")
        expected = reference.ofd_loss(*leaves, reduction=reduction)
        upstream = torch.randn_like(expected)
        grads = torch.autograd.grad(loss, leaves, upstream)
        expected_grads = torch.autograd.grad(expected, leaves, upstream)
        what = f"ofd_loss {tuple(shape)} {layout} offset={offset} {dtype} {reduction}"
        check(close(loss, expected.cpu(), dtype), f"{what}: loss")
        for label, g, e in zip(("student", "teacher", "margin"), grads, expected_grads):
            # Half-precision gradients: the reference rounds its intermediates, the kernel does not.
            tol = max(TOLERANCE[dtype], 1e-4)
            check(g.dtype == e.dtype and torch.allclose(g.double(), e.double(), rtol=tol, atol=tol),
                  f"{what}: grad_{label}")


def check_scale(numel, offset, dtype) -> None:
    acc = accumulation_dtype(dtype)
    generator = torch.Generator(device="cuda").manual_seed(5)
    storage = torch.randn(numel + offset, generator=generator, device="cuda").to(dtype)
    gradient, head = storage[offset:], storage[:offset].clone()
    # 1 + 2^-11 rounds to 1 in half precision: the factor must stay in the accumulation dtype.
    factor = torch.tensor(1 + 2**-11, dtype=acc, device="cuda")
    expected = (gradient.to(acc) * factor).to(dtype)
    torch.ops.ofdkern.scale_(gradient, factor)
    what = f"scale_ numel={numel} offset={offset} {dtype}"
    check(torch.equal(gradient, expected), what)
    check(torch.equal(storage[:offset], head), f"{what}: wrote before the view")


# --- FRSKD ------------------------------------------------------------------------------------------------

# (rows, classes): one chunk of 4096 classes (the fused kernel), one past it, several chunks, a single class,
# no classes and no rows.
KD_CASES = [(3, 1), (3, 7), (2, 4096), (2, 4097), (3, 9000), (1, 20000), (4, 0), (0, 5)]
# (feature shape, layout, exponent)
ATTENTION_CASES = [((3, 5, 7, 9), "contiguous", 2.0), ((3, 5, 7, 9), "channels_last", 2.0),
                   ((3, 5, 7, 9), "contiguous", 3.0), ((3, 40, 7, 9), "channels_last", 1.5),
                   ((2, 3, 4, 5, 7), "channels_last_3d", 2.0), ((2, 70), "contiguous", 2.0),
                   ((5, 1, 3, 3), "contiguous", 1.0), ((4, 33, 1, 1), "channels_last", 2.0),
                   ((0, 3, 2, 2), "contiguous", 2.0)]


def check_outputs(what, gpu, cpu, rerun, dtype) -> None:
    for index, (g, c) in enumerate(zip(gpu, cpu)):
        check(close(g, c, dtype), f"{what}: output {index}")
    check(all(torch.equal(a, b) for a, b in zip(gpu, rerun)), f"{what}: rerun not bitwise equal")


def check_kd(rows, classes, dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(3)
    student = (3 * torch.randn(rows, classes, generator=generator, device="cuda")).to(dtype)
    teacher = (3 * torch.randn(rows, classes, generator=generator, device="cuda")).to(dtype)
    for flags in itertools.product((False, True), repeat=2):
        call = lambda s, t: torch.ops.ofdkern.kd_fused(s, t, 3.0, *flags)
        check_outputs(f"kd_fused {rows}x{classes} {dtype} grads={flags}", call(student, teacher),
                      call(student.cpu(), teacher.cpu()), call(student, teacher), dtype)
    if rows and classes:
        leaves = [x.detach().requires_grad_() for x in (student, teacher)]
        loss = ofdkern.kd_loss(*leaves, backend="cuda")
        expected = reference.kd_loss(*(x.double() for x in leaves))
        grads = torch.autograd.grad(loss, leaves)
        expected_grads = torch.autograd.grad(expected, leaves)
        check(close(loss, expected.to(loss.dtype).cpu(), dtype), f"kd_loss {rows}x{classes} {dtype}: loss")
        for g, e in zip(grads, expected_grads):
            check(close(g, e.to(g.dtype).cpu(), dtype), f"kd_loss {rows}x{classes} {dtype}: gradient")


def attention_feature(shape, layout, dtype, generator, nonnegative):
    x = torch.randn(shape, generator=generator, device="cuda")
    x = (x.abs() if nonnegative else x).to(dtype)
    if layout != "contiguous":
        x = x.to(memory_format=MEMORY_FORMATS[layout])
    return x


def check_attention(shape, layout, p, dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(4)
    feature = attention_feature(shape, layout, dtype, generator, nonnegative=p == 1.5)
    merged = feature.reshape(shape[0], shape[1], math.prod(shape[2:]))
    name = f"{tuple(shape)} {layout} p={p} {dtype}"
    for view_name, view in (("merged", merged), ("every other position", merged[..., ::2])):
        maps = lambda f: (torch.ops.ofdkern.attention_map(f, p),)
        check_outputs(f"attention_map {name} {view_name}", maps(view), maps(view.cpu()), maps(view), dtype)
    grad_map = torch.randn(shape[0], merged.shape[2], generator=generator, device="cuda", dtype=torch.float64)
    backward = lambda f, g: (torch.ops.ofdkern.attention_map_backward(f, g, p),)
    gpu = backward(merged, grad_map)
    check_outputs(f"attention_map_backward {name}", gpu, backward(merged.cpu(), grad_map.cpu()),
                  backward(merged, grad_map), dtype)
    check(gpu[0].stride() == merged.stride() or gpu[0].numel() == 0, f"attention_map_backward {name}: layout")
    if shape[0] and shape[1]:
        teacher = attention_feature(shape, layout, dtype, generator, nonnegative=p == 1.5)
        leaves = [x.detach().requires_grad_() for x in (feature, teacher)]
        loss = ofdkern.attention_transfer_loss(*leaves, p=p, backend="cuda")
        expected = reference.attention_transfer_loss(*(x.double() for x in leaves), p)
        grads = torch.autograd.grad(loss, leaves)
        expected_grads = torch.autograd.grad(expected, leaves)
        check(close(loss, expected.to(loss.dtype).cpu(), dtype), f"attention_transfer_loss {name}: loss")
        for g, e in zip(grads, expected_grads):
            scale = e.abs().max().item() or 1.0  # 0 for a single position: both maps normalize to 1
            check(close(g / scale, (e / scale).to(g.dtype).cpu(), dtype), f"attention_transfer_loss {name}: gradient")


def check_attention_maps(batch, positions, dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(6)
    map_student = torch.rand(batch, positions, generator=generator, device="cuda", dtype=dtype)
    map_teacher = torch.rand(batch, positions, generator=generator, device="cuda", dtype=dtype)
    if batch > 1:
        map_student[1] = 0  # below F.normalize's eps
    for flags in itertools.product((False, True), repeat=2):
        call = lambda a, b: torch.ops.ofdkern.attention_transfer_maps(a, b, *flags)
        gpu = call(map_student, map_teacher)
        cpu = call(map_student.cpu(), map_teacher.cpu())
        # The all-zero map's gradient is divided by eps: compare relative to the largest value.
        scaled = lambda outputs: [o / (o.abs().max().item() or 1.0) if o.numel() else o for o in outputs]
        check_outputs(f"attention_transfer_maps {batch}x{positions} {dtype} grads={flags}", scaled(gpu),
                      scaled(cpu), scaled(call(map_student, map_teacher)), dtype)


# cwd_loss: (shape, layout): rows of one KD chunk and of two, NCHW and channels_last (copied to rows).
CWD_CASES = [((2, 3, 5, 7), "contiguous"), ((2, 3, 5, 7), "channels_last"), ((1, 2, 70, 80), "contiguous")]


def check_cwd(shape, layout, dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(7)
    maps = [(2 * torch.randn(shape, generator=generator, device="cuda")).to(dtype) for _ in range(2)]
    if layout != "contiguous":
        maps = [x.to(memory_format=MEMORY_FORMATS[layout]) for x in maps]
    for reduction in ("mean", "none"):
        name = f"cwd_loss {shape} {layout} {dtype} {reduction}"
        leaves = [x.detach().requires_grad_() for x in maps]
        loss = ofdkern.cwd_loss(*leaves, temperature=2.0, reduction=reduction, backend="cuda")
        grads = torch.autograd.grad(loss.sum(), leaves)
        again = ofdkern.cwd_loss(*leaves, temperature=2.0, reduction=reduction, backend="cuda")
        check(torch.equal(loss, again), f"{name}: rerun not bitwise equal")
        expected = reference.cwd_loss(*(x.double() for x in leaves), 2.0, reduction)
        expected_grads = torch.autograd.grad(expected.sum(), leaves)
        check(close(loss, expected.to(loss.dtype).cpu(), dtype), f"{name}: loss")
        for g, e in zip(grads, expected_grads):
            check(close(g, e.to(g.dtype).cpu(), dtype), f"{name}: gradient")


# --- channel-wise alignment -----------------------------------------------------------------------------

# align_fused: (batch, student channels, hidden, teacher channels, spatial, student layout, teacher layout).
# 2 x 96 x 48 x 48 fp32 needs two tiles of the CUDA kernel's smallest budget.
ALIGN_CASES = [
    (2, 5, 7, 6, (3, 7), "contiguous", "contiguous"),
    (2, 5, 7, 6, (3, 7), "channels_last", "channels_last"),
    (2, 5, 7, 6, (3, 7), "contiguous", "channels_last"),
    (3, 5, 7, 6, (), "contiguous", "contiguous"),
    (1, 4, 3, 2, (1, 1), "contiguous", "contiguous"),
    (0, 5, 7, 6, (3, 7), "contiguous", "contiguous"),
    (2, 96, 160, 200, (48, 48), "channels_last", "contiguous"),
]


def check_align(case, dtype, margin_wanted, grads) -> None:
    batch, cs, hidden, ct, spatial, s_layout, t_layout = case
    generator = torch.Generator().manual_seed(13)

    def feature(channels, layout):
        x = torch.randn(batch, channels, *spatial, generator=generator).to(dtype)
        return x.to(memory_format=MEMORY_FORMATS[layout]) if len(spatial) == 2 else x

    student, teacher = feature(cs, s_layout), feature(ct, t_layout)
    weights = [torch.randn(shape, generator=generator).to(dtype) / shape[-1] ** 0.5
               for shape in ((hidden, cs), (hidden,), (ct, hidden), (ct,))]
    margin = -torch.rand(ct, generator=generator).to(accumulation_dtype(dtype)) if margin_wanted else None
    args = [student, teacher, *weights, margin, *grads]
    on_gpu = [x.cuda() if isinstance(x, torch.Tensor) else x for x in args]
    expected = torch.ops.ofdkern.align_fused(*args)
    got = torch.ops.ofdkern.align_fused(*on_gpu)
    again = torch.ops.ofdkern.align_fused(*on_gpu)
    what = f"align_fused {case} {dtype} margin={margin_wanted} grads={grads}"
    names = ("loss", "grad_student", "grad_teacher", "grad_w1", "grad_b1", "grad_w2", "grad_b2")
    for name, a, b, c in zip(names, got, expected, again):
        check(a.shape == b.shape and a.dtype == b.dtype, f"{what}: {name} shape/dtype {a.shape} {a.dtype}")
        check(torch.equal(a, c), f"{what}: {name} differs between two runs")
        if a.numel() and a.shape == b.shape:
            scale = b.abs().max().item() or 1.0
            check(torch.allclose(a.cpu().double(), b.double(), rtol=0, atol=TOLERANCE[dtype] * 4 * scale),
                  f"{what}: {name} differs from the CPU kernel")


def main() -> int:
    status = ofdkern.backend_status()["cuda"]
    if not status["available"]:
        print(f"cuda backend not available: {status['reason']}", file=sys.stderr)
        return 2
    every_mask = list(itertools.product((False, True), repeat=4))
    forward_and_all_grads = [(False, False, False, False), (True, True, True, True)]
    for dtype in DTYPES:
        for shape, layout, offset in SMALL_CASES:
            check_fused(shape, layout, offset, dtype, every_mask)
        for shape, layout, offset in LARGE_CASES:
            check_fused(shape, layout, offset, dtype, forward_and_all_grads)
        check_public((3, 5, 7, 9), "channels_last", 1, dtype)
        for numel, offset in SCALE_CASES:
            check_scale(numel, offset, dtype)
        for rows, classes in KD_CASES:
            check_kd(rows, classes, dtype)
        for shape, layout, p in ATTENTION_CASES:
            check_attention(shape, layout, p, dtype)
        for shape, layout in CWD_CASES:
            check_cwd(shape, layout, dtype)
        for case in ALIGN_CASES:
            for margin_wanted in (False, True):
                for grads in ((False, False, False), (True, True, True), (True, False, False), (False, True, False)):
                    check_align(case, dtype, margin_wanted, grads)
    for dtype in (torch.float32, torch.float64):
        for batch, positions in ((3, 784), (2, 1), (4, 3000), (0, 5), (2, 0)):
            check_attention_maps(batch, positions, dtype)
    torch.cuda.synchronize()
    print(f"{len(failures)} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
