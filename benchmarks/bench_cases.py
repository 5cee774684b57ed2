"""What the OFD benchmarks measure: the feature-map shapes, the inputs, and the providers compared.

Shared by the runner (run.py) and the pytest-benchmark file (test_bench_ofd.py).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

import ofdkern
from ofdkern import reference

FORWARD = "fwd"
FORWARD_BACKWARD = "fwd+bwd"
MODES = (FORWARD, FORWARD_BACKWARD)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The shape OFD's CPU targets are stated for: ResNet layer2 output at batch 64.
ACCEPTANCE_SHAPE = (64, 512, 28, 28)
ACCEPTANCE_DTYPE = "fp32"


@dataclass(frozen=True)
class Case:
    group: str  # "cifar", "imagenet" or "sweep"
    label: str
    shape: tuple[int, ...]
    dtype: str  # a key of DTYPES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def is_acceptance(self) -> bool:
        return self.shape == ACCEPTANCE_SHAPE and self.dtype == ACCEPTANCE_DTYPE


def cifar_shapes(batch: int = 128) -> list[tuple[str, tuple[int, ...]]]:
    """Pre-ReLU stage outputs of WRN-40-2 (teacher) and WRN-16-2 (student): widths 16k with k = 2."""
    stages = [(32, 32), (64, 16), (128, 8)]
    return [(f"WRN-40-2→WRN-16-2 stage{i + 1} b{batch}", (batch, c, hw, hw)) for i, (c, hw) in enumerate(stages)]


def imagenet_shapes(batch: int) -> list[tuple[str, tuple[int, ...]]]:
    """Pre-ReLU outputs of layer1..layer4 of ResNet-152 (teacher) and ResNet-50 (student): the two share
    their stage widths and resolutions, so one shape serves both networks."""
    stages = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
    return [(f"ResNet-152→ResNet-50 layer{i + 1} b{batch}", (batch, c, hw, hw)) for i, (c, hw) in enumerate(stages)]


def sweep_shape(log2_numel: int) -> tuple[int, ...]:
    """2**log2_numel elements as (N, 64, 32, 32): a realistic channel count, the batch grows."""
    per_sample = 64 * 32 * 32
    if log2_numel < 16:
        raise ValueError("the sweep starts at 2**16 elements (one 64x32x32 sample)")
    return (2 ** log2_numel // per_sample, 64, 32, 32)


def plan(device: str, quick: bool, groups: tuple[str, ...] = ("cifar", "imagenet", "sweep")) -> list[Case]:
    """The cases of one run. CPU runs are trimmed to fit ~10-15 minutes on 2 cores (batch 256 and the sweep
    in fp32 only); --quick keeps the acceptance case and a few sizes."""
    on_gpu = device == "cuda"
    if quick:
        dtypes = ("fp32", "bf16") if on_gpu else ("fp32",)
        chosen = {
            "cifar": [(label, shape, dtypes) for label, shape in cifar_shapes()[:1]],
            "imagenet": [(label, shape, dtypes) for label, shape in imagenet_shapes(64) if shape == ACCEPTANCE_SHAPE],
            "sweep": [(f"2^{k}", sweep_shape(k), ("fp32",)) for k in ((16, 20, 24) if on_gpu else (16, 18, 20))],
        }
    else:
        all_dtypes = ("fp32", "bf16", "fp16") if on_gpu else ("fp32", "bf16")
        large_dtypes = all_dtypes if on_gpu else ("fp32",)
        chosen = {
            "cifar": [(label, shape, all_dtypes) for label, shape in cifar_shapes()],
            "imagenet": [(label, shape, all_dtypes) for label, shape in imagenet_shapes(64)]
            + [(label, shape, large_dtypes) for label, shape in imagenet_shapes(256)],
            "sweep": [(f"2^{k}", sweep_shape(k), large_dtypes) for k in range(16, 27, 2)],
        }
    return [Case(group, label, shape, dtype)
            for group in groups for label, shape, dtypes in chosen[group] for dtype in dtypes]


@dataclass
class Inputs:
    student: torch.Tensor  # requires grad
    teacher: torch.Tensor  # detached, like the teacher's features in training
    margin: torch.Tensor  # (C,) float32, negative, like margin_from_bn gives


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    student = torch.randn(case.shape, generator=generator, device=device, dtype=dtype).requires_grad_()
    teacher = torch.randn(case.shape, generator=generator, device=device, dtype=dtype)
    channels = case.shape[1]
    margin = -0.05 - torch.rand(channels, generator=generator, device=device)
    return Inputs(student, teacher, margin)


Step = Callable[[], torch.Tensor]


def loss_steps(loss_fn: Callable, inputs: Inputs) -> dict[str, Step]:
    """Forward only (no graph, no gradient work) and forward + backward wrt the student."""
    student_value = inputs.student.detach()

    def forward():
        with torch.no_grad():
            return loss_fn(student_value, inputs.teacher, inputs.margin)

    def forward_backward():
        loss = loss_fn(inputs.student, inputs.teacher, inputs.margin)
        return torch.autograd.grad(loss, inputs.student)[0]

    return {FORWARD: forward, FORWARD_BACKWARD: forward_backward}


def roofline_steps(inputs: Inputs) -> dict[str, Step]:
    """One elementwise op that reads two feature-sized tensors and writes one, allocating its output like
    an op does: the same bytes as the fused forward + backward, the floor that kernel can aim for."""
    student_value = inputs.student.detach()
    return {FORWARD_BACKWARD: lambda: torch.mul(student_value, inputs.teacher)}


def roofline_out_steps(inputs: Inputs) -> dict[str, Step]:
    """The same op writing into a preallocated output: no allocation or first-touch page faults."""
    student_value = inputs.student.detach()
    out = torch.empty_like(student_value)
    return {FORWARD_BACKWARD: lambda: torch.mul(student_value, inputs.teacher, out=out)}


@dataclass(frozen=True)
class Provider:
    name: str
    # Builds the timed callables of one case, per mode; called once per case (compile wrappers are fresh).
    build: Callable[[Inputs], dict[str, Step]]
    modes: tuple[str, ...] = MODES
    # Entered around everything measured of one case (its build, timing and memory).
    context: Callable[[], ContextManager] = contextlib.nullcontext


@contextlib.contextmanager
def cpu_buffer_cache_off():
    """ofdkern's CPU kernels without their buffer cache: every feature-sized buffer is faulted in fresh, as
    PyTorch's CPU allocator does for eager and compile."""
    previous = ofdkern.set_cpu_buffer_cache_limit(0)
    try:
        yield
    finally:
        ofdkern.set_cpu_buffer_cache_limit(previous)


def compiled_reference(dynamic: bool) -> Callable:
    return torch.compile(reference.ofd_loss, dynamic=dynamic)


def ofdkern_backends(device: str) -> list[str]:
    """The fused backends that run on ``device`` here. Triton on CPU tensors only runs in its interpreter,
    which is not a performance path, so it is never benchmarked on CPU."""
    status = ofdkern.backend_status()
    candidates = ("cuda", "triton") if device == "cuda" else ("cpu",)
    return [name for name in candidates if device in status[name]["devices"]]


def providers(device: str, compile_dynamic: bool = False) -> list[Provider]:
    def fused(backend):
        return lambda inputs: loss_steps(lambda s, t, m: ofdkern.ofd_loss(s, t, m, backend=backend), inputs)

    backends = ofdkern_backends(device)
    fused_providers = [Provider(f"ofdkern-{backend}", fused(backend)) for backend in backends]
    if "cpu" in backends and ofdkern.cpu_buffers.HAS_CACHE:
        # The cache is what a training loop gets; the uncached run shows how much of the speed-up it brings.
        fused_providers.append(Provider("ofdkern-cpu-nocache", fused("cpu"), context=cpu_buffer_cache_off))
    return [
        Provider("eager", lambda inputs: loss_steps(reference.ofd_loss, inputs)),
        Provider("compile", lambda inputs: loss_steps(compiled_reference(compile_dynamic), inputs)),
        *fused_providers,
        Provider("copy-roofline", roofline_steps, modes=(FORWARD_BACKWARD,)),
        Provider("copy-roofline-out", roofline_out_steps, modes=(FORWARD_BACKWARD,)),
    ]


def bytes_moved(case: Case, mode: str) -> int:
    """Bytes any implementation must move: read student and teacher; forward + backward also writes the
    student gradient (the roofline op moves the same three tensors)."""
    tensors = 2 if mode == FORWARD else 3
    return tensors * case.numel * case.element_size
