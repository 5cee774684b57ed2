"""Benchmark declaration of a whole OFD training step (``distill_step``): teacher forward + student forward +
backward + SGD step of torchvision ResNets at 224x224, with the loss of an official-style eager distiller
against ``ofdkern.OFDDistiller`` on the fused kernels; and, timed alone, the loss part of each (connectors
and stage losses, forward + backward, on stage features captured once)."""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

import ofdkern
from ofdkern import reference

import bench_cases as cases
import bench_measure as measure
from bench_cases import COMPILE, EAGER, FUSED_PREFIX, Case, Provider

NAME = "distill_step"
STEP = "step"
LOSS = "loss"
NO_DISTILL = "no-distill"
ALPHA = 1e-4  # the reference's ImageNet value
IMAGE_SIZE = 224
CLASSES = 1000
# The reference training script's SGD (momentum 0.9, Nesterov, weight decay 1e-4); a lower learning rate than
# its 0.1, so that random data cannot drive the reps into NaN or denormals.
SGD_SETTINGS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
PAIRS = (("ResNet-152→ResNet-50", "resnet152", "resnet50"), ("ResNet-34→ResNet-18", "resnet34", "resnet18"))


def unavailable(device: str) -> Optional[str]:
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed: the distillation step needs its ResNets (pip install torchvision)"
    return None


def plan(device: str, quick: bool) -> list[Case]:
    """Both pairs at batch 64 with bf16 autocast on GPU, batch 8 in fp32 on CPU; --quick on CPU keeps
    ResNet-34 -> ResNet-18 only (ResNet-152 -> ResNet-50 takes about 5 s a step on 2 cores)."""
    on_gpu = device == "cuda"
    batch = 64 if on_gpu else 8
    pairs = PAIRS if on_gpu or not quick else PAIRS[1:]
    return [Case(NAME, "imagenet", f"{label} b{batch}", (batch, 3, IMAGE_SIZE, IMAGE_SIZE),
                 "amp-bf16" if on_gpu else "fp32", params=(("teacher", teacher), ("student", student)))
            for label, teacher, student in pairs]


# ---- the official-style distiller ------------------------------------------------------------------------

def _stages(resnet: nn.Module) -> list[nn.Sequential]:
    return [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]


def stage_bns(resnet: nn.Module) -> list[nn.Module]:
    """The BN before the add of each stage's last block (the margin source): bn3 of a Bottleneck, bn2 of a
    BasicBlock."""
    return [stage[-1].bn3 if hasattr(stage[-1], "bn3") else stage[-1].bn2 for stage in _stages(resnet)]


def _block_before_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock / Bottleneck up to its residual sum, without the final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "bn3"):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    out += identity
    return out


def pre_relu_features(resnet: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stage features and logits, as the official models' ``extract_feature(x, preReLU=True)``: each stage's
    output before its last ReLU (the taps OFDDistiller finds automatically), the ReLU applied out of place
    for the next stage, so nothing is copied."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
    features = []
    for stage in _stages(resnet):
        for block in stage[:-1]:
            x = block(x)
        features.append(_block_before_relu(stage[-1], x))
        x = F.relu(features[-1])
    return features, resnet.fc(torch.flatten(resnet.avgpool(x), 1))


def weighted_stage_sum(stage_losses, connectors, student_features, teacher_features) -> torch.Tensor:
    """sum_i loss_i(connector_i(s_i), t_i) / 2**(K-1-i): the reference's stage weighting."""
    count = len(student_features)
    return sum(loss(connector(s), t) / 2 ** (count - 1 - i)
               for i, (loss, connector, s, t) in enumerate(zip(stage_losses, connectors, student_features,
                                                               teacher_features)))


class ReferenceDistiller(nn.Module):
    """The official OFD ``Distiller`` (clovaai/overhaul-distillation) on torchvision ResNets: pre-ReLU stage
    features by its own extraction (no hooks), margins from the teacher's BNs kept as (1, C, 1, 1) buffers,
    the connectors, stage weights 1 / 2**(K-1-i), and alpha / batch as its training script applies them.
    One deviation: the teacher runs under no_grad (the official code builds the teacher's graph and detaches
    its features), as OFDDistiller does, so both distillers do the same teacher work."""

    def __init__(self, teacher: nn.Module, student: nn.Module, connectors: nn.ModuleList, loss_fn: Callable):
        super().__init__()
        self.teacher, self.student, self.connectors, self.loss_fn = teacher, student, connectors, loss_fn
        for index, bn in enumerate(stage_bns(teacher)):
            self.register_buffer(f"margin{index}", ofdkern.margin_from_bn(bn).view(1, -1, 1, 1))

    def distill_loss(self, student_features, teacher_features) -> torch.Tensor:
        losses = [functools.partial(self.loss_fn, margin=getattr(self, f"margin{i}"))
                  for i in range(len(self.connectors))]
        total = weighted_stage_sum(losses, self.connectors, student_features, teacher_features)
        return total * (ALPHA / student_features[0].shape[0])

    def forward(self, images: torch.Tensor):
        with torch.no_grad():
            teacher_features, _ = pre_relu_features(self.teacher, images)
        student_features, logits = pre_relu_features(self.student, images)
        return logits, self.distill_loss(student_features, teacher_features)


# ---- inputs and steps --------------------------------------------------------------------------------------

@dataclass
class StepInputs:
    teacher: nn.Module  # frozen and shared by every provider (only its BN running statistics change)
    student: nn.Module  # at its initial weights: each provider trains its own copy
    connectors: nn.ModuleList  # the same
    images: torch.Tensor
    labels: torch.Tensor
    autocast: Callable[[], ContextManager]
    # One forward's stage features, for the loss part alone: the teacher's detached, the student's leaves.
    teacher_features: list[torch.Tensor]
    student_features: list[torch.Tensor]


def make_inputs(case: Case, device: str, seed: int = 0) -> StepInputs:
    import torchvision

    torch.manual_seed(seed)
    teacher = getattr(torchvision.models, case.param("teacher"))().to(device).requires_grad_(False)
    student = getattr(torchvision.models, case.param("student"))().to(device)
    connectors = nn.ModuleList(ofdkern.Connector(s.num_features, t.num_features)
                               for s, t in zip(stage_bns(student), stage_bns(teacher))).to(device)
    generator = cases.seeded_generator(device, seed)
    images = torch.randn(case.shape, generator=generator, device=device)
    labels = torch.randint(0, CLASSES, (case.shape[0],), generator=generator, device=device)
    if case.dtype == "amp-bf16":
        autocast = functools.partial(torch.autocast, device_type=device, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    with torch.no_grad(), autocast():
        teacher_features, _ = pre_relu_features(teacher, images)
        student_features, _ = pre_relu_features(student, images)
    return StepInputs(teacher, student, connectors, images, labels, autocast, teacher_features,
                      [f.detach().requires_grad_() for f in student_features])


def _training_step(forward: Callable, params: list[nn.Parameter], inputs: StepInputs):
    """zero_grad, forward (task loss + distillation loss) under the case's autocast, backward, SGD step.
    Returns the loss values."""
    optimizer = torch.optim.SGD(params, **SGD_SETTINGS)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with inputs.autocast():
            logits, distill = forward(inputs.images)
            task = F.cross_entropy(logits, inputs.labels)
            loss = task if distill is None else task + distill
        loss.backward()
        optimizer.step()
        return (task.detach(),) if distill is None else (task.detach(), distill.detach())

    return step


def _loss_part(distill_loss: Callable, connectors: nn.ModuleList, inputs: StepInputs):
    """The distillation loss alone on the captured features: its value and the gradients wrt the student
    features and the connectors."""
    params = list(connectors.parameters())

    def step():
        with inputs.autocast():
            loss = distill_loss(inputs.student_features, inputs.teacher_features)
        return (loss.detach(), *torch.autograd.grad(loss, [*inputs.student_features, *params]))

    return step


def _reference_steps(make_loss_fn: Callable[[], Callable]):
    def build(inputs: StepInputs):
        student, connectors = copy.deepcopy(inputs.student), copy.deepcopy(inputs.connectors)
        distiller = ReferenceDistiller(inputs.teacher, student, connectors, make_loss_fn())
        params = [*student.parameters(), *connectors.parameters()]
        return {LOSS: _loss_part(distiller.distill_loss, connectors, inputs),
                STEP: _training_step(distiller, params, inputs)}
    return build


def _ofdkern_steps(backend: str):
    def build(inputs: StepInputs):
        distiller = ofdkern.OFDDistiller(inputs.teacher, copy.deepcopy(inputs.student), alpha=ALPHA, backend=backend)
        distiller.connectors.load_state_dict(inputs.connectors.state_dict())

        def distill_loss(student_features, teacher_features):
            total = weighted_stage_sum(distiller.losses, distiller.connectors, student_features, teacher_features)
            return total * (ALPHA / student_features[0].shape[0])

        params = [*distiller.student.parameters(), *distiller.connectors.parameters()]
        return {LOSS: _loss_part(distill_loss, distiller.connectors, inputs),
                STEP: _training_step(distiller, params, inputs)}
    return build


def _no_distill_steps(inputs: StepInputs):
    student = copy.deepcopy(inputs.student)

    def forward(images):
        with torch.no_grad():
            inputs.teacher(images)
        return student(images), None

    return {STEP: _training_step(forward, list(student.parameters()), inputs)}


def task_loss_matches_eager(output, expected, tolerance: float) -> float:
    """The floor trains the same student on the same batch: its task loss must be eager's."""
    return cases.matches_eager(output, None if expected is None else expected[:1], tolerance)


@contextlib.contextmanager
def _cudnn_autotuned():
    """cuDNN picks the fastest convolution algorithms, as the reference training script asks."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def providers(device: str, compile_dynamic: bool) -> list[Provider]:
    # The loss part first: it leaves the weights as they are, so every provider's first step starts from the
    # same weights as eager's and can be checked against it.
    modes = (LOSS, STEP)
    step_provider = functools.partial(Provider, modes=modes, context=_cudnn_autotuned)
    return [
        step_provider(EAGER, _reference_steps(lambda: reference.ofd_loss), check=None),
        step_provider(COMPILE, _reference_steps(lambda: torch.compile(reference.ofd_loss, dynamic=compile_dynamic))),
        # OFDDistiller's wiring (forward hooks that copy the input of each tapped block's in-place ReLU) with
        # the same eager loss: what the fused kernels are compared with inside OFDDistiller.
        step_provider(FUSED_PREFIX + "reference", _ofdkern_steps("reference")),
        *[step_provider(FUSED_PREFIX + backend, _ofdkern_steps(backend)) for backend in cases.op_backends(NAME, device)],
        Provider(NO_DISTILL, _no_distill_steps, (STEP,), check=task_loss_matches_eager, context=_cudnn_autotuned),
    ]


def budget(device: str, quick: bool) -> measure.Budget:
    """A step takes 0.6 s (ResNet-34 -> ResNet-18) to 5 s (ResNet-152 -> ResNet-50) on 2 CPU cores: a few
    reps, and the CPU peak memory of one step."""
    if device == "cuda":
        return measure.Budget(warmup=2, min_reps=5 if quick else 10, max_reps=20 if quick else 50,
                              target_s=0.5 if quick else 2.0, memory_reps=1)
    return measure.Budget(warmup=0 if quick else 1, min_reps=3, max_reps=3 if quick else 5,
                          target_s=1.0 if quick else 5.0, memory_reps=1)


OP = cases.OpBench(
    name=NAME,
    title="A whole OFD distillation step (`OFDDistiller`)",
    plan=plan,
    make_inputs=make_inputs,
    providers=providers,
    floor=NO_DISTILL,
    tolerance={"fp32": 1e-4, "amp-bf16": 2e-2},
    size=lambda case: sum(int(case.param(role).removeprefix("resnet")) for role in ("teacher", "student")),
    size_label="teacher + student depth (layers)",
    shape_text=lambda case: f"{case.param('teacher')}→{case.param('student')} {'x'.join(map(str, case.shape))}",
    modes=(LOSS, STEP),
    main_mode=STEP,
    cuda_graph=False,
    budget=budget,
    unavailable=unavailable,
    share_mode=LOSS,
    notes=(
        "step: teacher forward (no grad) + student forward + cross-entropy + OFD loss, backward, SGD step (momentum "
        "0.9, Nesterov, weight decay 1e-4); random 224x224 images and labels; alpha 1e-4 (ImageNet); bf16 autocast "
        "on GPU, cuDNN autotuned. loss: the connectors and stage losses alone, forward + backward, on stage features "
        "captured once.",
        "eager: the official Distiller's forward with `ofdkern.reference.ofd_loss` (its own pre-ReLU extraction); "
        "compile: the same with `torch.compile` of the loss; ofdkern-*: `OFDDistiller(backend=...)`, whose forward "
        "hooks copy the input of each tapped block's in-place ReLU (ofdkern-reference isolates that wiring); "
        "no-distill: the same step without the OFD loss (the teacher still runs), the floor.",
        "`--quick` on CPU measures ResNet-34→ResNet-18 only; on GPU the times are CUDA events around plain calls "
        "(a step's kernels outlast its host work).",
    ),
)
