"""What the benchmarks measure, shared by every op: cases, providers, the check against eager, the backends
that run an op, and the op declaration (``OpBench``) each ``bench_op_<op>.py`` fills in.

Used by the runner (run.py) and the pytest-benchmark file (test_bench_ops.py); bench_ops.py lists the ops.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch

import bench_measure as measure
import ofdkern

FORWARD = "fwd"
FORWARD_BACKWARD = "fwd+bwd"
LOSS_MODES = (FORWARD, FORWARD_BACKWARD)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

EAGER = "eager"
COMPILE = "compile"
FUSED_PREFIX = "ofdkern-"


@dataclass(frozen=True)
class Case:
    op: str  # a name of bench_ops.OPS
    group: str  # the op's family of shapes, e.g. "cifar", "imagenet", "sweep"
    label: str
    shape: tuple[int, ...]  # the op's main tensor (features, logits, input images)
    dtype: str  # a key of DTYPES, or an op's own (distill_step's "amp-bf16")
    params: tuple[tuple[str, Any], ...] = ()  # sizes beyond the main shape, e.g. channel_align's hidden width
    acceptance: bool = False  # a case the op's targets are stated for

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def key(self) -> tuple:
        return (self.op, self.group, self.label, self.shape, self.dtype)


Step = Callable[[], Any]
# (provider output, the oracle of the same mode (oracle_output) or None, tolerance) -> the relative error (None:
# not a numeric check); raises MismatchError.
Check = Callable[[Any, Any, float], Optional[float]]


class MismatchError(AssertionError):
    """A provider's output disagrees with eager's: it is not timed."""


def _tensors(output) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise ||actual - expected|| / ||expected||: the difference in float32, the norms accumulated in
    float64, on the tensors' device."""
    difference = actual.float() - expected.float()
    scale = torch.linalg.vector_norm(expected, dtype=torch.float64).clamp_min(1e-30)
    return (torch.linalg.vector_norm(difference, dtype=torch.float64) / scale).item()


def _errors(output, expected) -> list[float]:
    """Per output tensor, its relative error against ``expected``'s; raises if shapes or dtypes differ."""
    actual, wanted = _tensors(output), _tensors(expected)
    if len(actual) != len(wanted):
        raise MismatchError(f"{len(actual)} output tensors, eager gives {len(wanted)}")
    for index, (a, e) in enumerate(zip(actual, wanted)):
        if a.shape != e.shape or a.dtype != e.dtype:
            raise MismatchError(f"output {index} is {a.dtype} {tuple(a.shape)}, eager's {e.dtype} {tuple(e.shape)}")
    return [relative_error(a, e) for a, e in zip(actual, wanted)]


def matches_eager(output, expected, tolerance: float) -> float:
    """Every output tensor has eager's shape and dtype and lies within ``tolerance`` of the oracle
    (``oracle_output``; norm-wise: reductions and GEMMs accumulate in another order than eager). Returns the
    worst relative error."""
    if expected is None:
        raise MismatchError("not checked: eager has no result for this case")
    errors = _errors(output, expected)
    for index, error in enumerate(errors):
        if not error <= tolerance:  # NaN fails too
            raise MismatchError(f"output {index} differs from eager by {error:.3g} (norm-wise; tolerance {tolerance:g})")
    return max(errors)


HALF_DTYPES = ("bf16", "fp16")


def oracle_output(op: "OpBench", eager: "Provider", mode: str, inputs, eager_output, case: Case):
    """What the other providers are checked against: eager's first output; for a half-precision case of an op
    that can upcast its inputs, eager's math on the same values in float32, rounded to the dtypes eager returns
    (eager rounds its intermediates to half precision: its bf16 softmaxes are off by up to 7 %, its fp16 KD sum
    overflows at 256k classes). Returns (oracle, eager's own error against it or None)."""
    if op.upcast is None or case.dtype not in HALF_DTYPES:
        return eager_output, None
    exact = _tensors(eager.build(op.upcast(inputs))[mode]())
    oracle = tuple(e.to(o.dtype) for e, o in zip(exact, _tensors(eager_output)))
    return oracle, max(_errors(eager_output, oracle))


def writes_like_eager_gradient(output, expected, _tolerance: float) -> None:
    """A floor computes something else than the op; what it must share is the traffic: it writes a tensor of
    the size and dtype of the student gradient eager returns (the first of eager's outputs)."""
    if expected is None:
        raise MismatchError("not checked: eager has no result for this case")
    gradient = _tensors(expected)[0]
    if not any(t.numel() == gradient.numel() and t.dtype == gradient.dtype for t in _tensors(output)):
        raise MismatchError(f"writes no {gradient.dtype} tensor of {gradient.numel()} elements (the gradient)")
    return None


@dataclass(frozen=True)
class Provider:
    name: str
    # Builds the timed callables of one case, per mode; called once per case (compile wrappers are fresh).
    build: Callable[[Any], dict[str, Step]]
    modes: tuple[str, ...]
    # How its first output is checked against eager's before it is timed (None: it is eager).
    check: Optional[Check] = matches_eager
    # Entered around everything measured of one case (its build, check, timing and memory).
    context: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class Target:
    """A stated goal for the fused providers of an op: ``metric`` (a row field, e.g. "speedup_vs_eager",
    "ratio_vs_floor") at least (relation ">=") or at most ("<=") ``bound``, on the cases of the given labels
    (None: the op's acceptance cases). PASS/MISS on the devices it is stated for, "info" elsewhere."""
    metric: str
    relation: str
    bound: float
    labels: Optional[tuple[str, ...]] = None
    devices: tuple[str, ...] = ("cpu",)


@dataclass(frozen=True)
class OpBench:
    """One op of the suite, as data: the shared runner (run.py) does the rest."""
    name: str
    title: str
    # (device, quick) -> the cases of a run.
    plan: Callable[[str, bool], list[Case]]
    # (case, device) -> what the providers' build functions take.
    make_inputs: Callable[[Case, str], Any]
    # (device, compile_dynamic) -> providers, eager first.
    providers: Callable[[str, bool], list[Provider]]
    floor: str  # the provider whose time is the op's floor (ratio_vs_floor)
    tolerance: dict[str, float]  # per case dtype: how far a provider may be from eager (norm-wise)
    size: Callable[[Case], float]  # the plots' x axis
    size_label: str
    modes: tuple[str, ...] = LOSS_MODES
    main_mode: str = FORWARD_BACKWARD  # the mode of the summary tables, the floor and the memory measurement
    # Bytes any implementation must move / floating-point work, per mode (None: not meaningful).
    bytes_moved: Callable[[Case, str], Optional[int]] = lambda case, mode: None
    flops: Callable[[Case, str], Optional[int]] = lambda case, mode: None
    # Bytes of "one tensor", the unit of peak_extra_tensors (None: not reported).
    unit_bytes: Callable[[Case], Optional[int]] = lambda case: None
    shape_text: Callable[[Case], str] = lambda case: "x".join(map(str, case.shape))
    # GPU headline time: device time of a CUDA-graph replay (small ops, host-bound otherwise), or CUDA events
    # around plain calls (a training step: its kernels outlast its host work).
    cuda_graph: bool = True
    budget: Callable[[str, bool], measure.Budget] = measure.default_budget
    # Why the op cannot run here (a missing optional package), or None.
    unavailable: Callable[[str], Optional[str]] = lambda device: None
    targets: tuple[Target, ...] = ()
    # A second mode whose time is reported as a share of the main mode's (distill_step's loss part).
    share_mode: Optional[str] = None
    # inputs -> the same values in float32, for the oracle of half-precision cases (None: eager is the oracle).
    upcast: Optional[Callable[[Any], Any]] = None
    # (device) -> small cases for the pytest-benchmark microbenchmarks ([]: none).
    micro_cases: Callable[[str], list[Case]] = lambda device: []
    notes: tuple[str, ...] = ()  # lines printed under the op's heading in the reports

    def metadata(self) -> dict:
        """What the reports and plots read from a results JSON without importing the op modules."""
        return {"title": self.title, "floor": self.floor, "size_label": self.size_label, "modes": list(self.modes),
                "main_mode": self.main_mode, "share_mode": self.share_mode, "cuda_graph": self.cuda_graph,
                "notes": list(self.notes)}


# ---- which ofdkern backends run an op ----------------------------------------------------------------------

# The extension op the C++ backends ("cpu", "cuda") need to run each benchmarked op; None: that op's C++
# backends are plain ATen code, which runs on the backend's own device type whatever the build.
# The public op each benchmark measures (distill_step: OFDDistiller's loss is ofd_loss).
PUBLIC_OP = {
    "ofd": "ofd_loss",
    "channel_align": "channel_align_loss",
    "attention_transfer": "attention_transfer_loss",
    "kd": "kd_loss",
    "cwd": "cwd_loss",
    "distill_step": "ofd_loss",
}


def op_backends(op: str, device: str) -> list[str]:
    """The fused ofdkern backends that run ``op`` on ``device`` tensors here (``ofdkern.backend_status(op)``).
    Triton on CPU tensors only runs in its interpreter, which is not a performance path: never listed for CPU."""
    status = ofdkern.backend_status(PUBLIC_OP[op])
    candidates = ("cuda", "triton") if device == "cuda" else ("cpu",)
    return [backend for backend in candidates if device in status[backend]["devices"]]


# ---- providers of the loss ops ----------------------------------------------------------------------------

@dataclass
class LossInputs:
    args: tuple  # positional arguments of the op's loss functions
    grad_inputs: tuple  # what forward + backward differentiates with respect to (the student side)


def upcast_loss_inputs(inputs: LossInputs) -> LossInputs:
    """The same values with every half-precision tensor in float32 (leaves, requiring grad as before)."""
    upcast = {}
    for tensor in inputs.args:
        if isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.bfloat16, torch.float16):
            upcast[id(tensor)] = tensor.detach().float().requires_grad_(tensor.requires_grad)
    args = tuple(upcast.get(id(a), a) for a in inputs.args)
    return LossInputs(args, tuple(upcast.get(id(t), t) for t in inputs.grad_inputs))


def loss_steps(loss_fn: Callable, inputs: LossInputs) -> dict[str, Step]:
    """Forward only (no graph, no gradient work) and forward + backward (the gradients of ``grad_inputs``)."""
    values = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in inputs.args)

    def forward():
        with torch.no_grad():
            return loss_fn(*values)

    def forward_backward():
        return torch.autograd.grad(loss_fn(*inputs.args), inputs.grad_inputs)

    return {FORWARD: forward, FORWARD_BACKWARD: forward_backward}


def loss_providers(op: str, device: str, compile_dynamic: bool, reference_fn: Callable,
                   fused_fn: Callable[[str], Callable]) -> list[Provider]:
    """eager (``reference_fn``), torch.compile of it, and ``fused_fn(backend)`` for every backend that runs ``op``."""
    return [
        Provider(EAGER, lambda inputs: loss_steps(reference_fn, inputs), LOSS_MODES, check=None),
        Provider(COMPILE, lambda inputs: loss_steps(torch.compile(reference_fn, dynamic=compile_dynamic), inputs),
                 LOSS_MODES),
        *[Provider(FUSED_PREFIX + backend, lambda inputs, backend=backend: loss_steps(fused_fn(backend), inputs),
                   LOSS_MODES) for backend in op_backends(op, device)],
    ]


COPY_ROOFLINE = "copy-roofline"


def copy_roofline_providers() -> list[Provider]:
    """The floor of the elementwise / reduction ops, whose fused forward + backward reads the two inputs once
    and writes the student gradient once: one elementwise op over the first two loss arguments (student and
    teacher, same shape) that reads both and writes one tensor like them. ``copy-roofline`` allocates its
    output as an op does; ``copy-roofline-out`` writes a preallocated one (no allocation, no first-touch page
    faults)."""
    def allocating(inputs: LossInputs):
        a, b = (x.detach() for x in inputs.args[:2])
        return {FORWARD_BACKWARD: lambda: torch.mul(a, b)}

    def preallocated(inputs: LossInputs):
        a, b = (x.detach() for x in inputs.args[:2])
        out = torch.empty_like(a)
        return {FORWARD_BACKWARD: lambda: torch.mul(a, b, out=out)}

    return [Provider(COPY_ROOFLINE, allocating, (FORWARD_BACKWARD,), check=writes_like_eager_gradient),
            Provider(COPY_ROOFLINE + "-out", preallocated, (FORWARD_BACKWARD,), check=writes_like_eager_gradient)]


def elementwise_bytes(case: Case, mode: str) -> int:
    """Bytes an elementwise / reduction op must move over two equal-size inputs: read both; forward +
    backward also writes the student gradient (the copy-roofline's three tensors). Only feature-sized
    traffic counts (a margin, a loss scalar are negligible)."""
    tensors = 2 if mode == FORWARD else 3
    return tensors * case.numel * case.element_size


def feature_bytes(case: Case) -> int:
    return case.numel * case.element_size


@contextlib.contextmanager
def cpu_buffer_cache_off():
    """ofdkern's CPU kernels without their buffer cache: every feature-sized buffer is faulted in fresh, as
    PyTorch's CPU allocator does for eager and compile."""
    previous = ofdkern.set_cpu_buffer_cache_limit(0)
    try:
        yield
    finally:
        ofdkern.set_cpu_buffer_cache_limit(previous)


def seeded_generator(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: tuple[int, ...], case: Case, generator: torch.Generator, device: str,
          scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values (times ``scale``) in the case's dtype."""
    values = torch.randn(shape, generator=generator, device=device, dtype=case.torch_dtype)
    return values.mul_(scale) if scale != 1.0 else values


# ---- plans and inputs of two-tensor losses ----------------------------------------------------------------

def pair_inputs(case: Case, device: str, seed: int = 0) -> LossInputs:
    """randn student (requires grad) and teacher (detached) of the case's shape."""
    generator = seeded_generator(device, seed)
    student = randn(case.shape, case, generator, device).requires_grad_()
    teacher = randn(case.shape, case, generator, device)
    return LossInputs(args=(student, teacher), grad_inputs=(student,))


def dtype_plan(name: str, groups: dict[str, list[tuple[str, tuple[int, ...]]]], quick_picks, device: str,
               quick: bool) -> list[Case]:
    """Every shape of ``groups`` in fp32 and bf16 (fp16 too on GPU); quick: ``quick_picks[device]``, a list of
    (group, index, dtype)."""
    if quick:
        return [Case(name, group, *groups[group][index], dtype) for group, index, dtype in quick_picks[device]]
    dtypes = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    return [Case(name, group, label, shape, dtype)
            for group, entries in groups.items() for label, shape in entries for dtype in dtypes]
