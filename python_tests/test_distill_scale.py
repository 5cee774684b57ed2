"""The distillers at scale: a whole training step under torch.compile (no graph breaks from the taps, same result
as eager), and DistributedDataParallel (and FSDP2 for OFD and channel alignment) on two processes against one
process on the global batch. OFD runs on one model per hook path a tap is read by; channel alignment and FRSKD on
the first."""
import os

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import ofdkern
from distill_models import (MdistillerResNet, PytorchCifarBlock, ResNet, TorchvisionBasicBlock, images, logits_of,
                            stop_recording)
from ofdkern.distill import ChannelAlignDistiller, FRSKDDistiller, OFDDistiller

# One model per hook path a tap is read by: a ReLU module's input, a BN output after the in-place add, a module
# output (here an item of a tuple output; a plain output is the same hook without the indexing).
TAP_KINDS = {
    "relu-input": lambda seed, widths: ResNet(TorchvisionBasicBlock, widths=widths, seed=seed),
    "bn-output-at-end": lambda seed, widths: ResNet(PytorchCifarBlock, widths=widths, seed=seed),
    "tuple-item": lambda seed, widths: MdistillerResNet(widths=widths, seed=seed),
}
# Each method's distiller of a teacher and a student (FRSKD distils the student alone).
METHODS = {
    "ofd": lambda teacher, student, **kwargs: OFDDistiller(teacher, student, alpha=1e-2, **kwargs),
    "channel-align": lambda teacher, student, **kwargs: ChannelAlignDistiller(teacher, student, alpha=1e-2, **kwargs),
    "frskd": lambda _teacher, student, **kwargs: FRSKDDistiller(student, width=1, depth=1, **kwargs),
}
CASES = [("ofd", kind) for kind in TAP_KINDS] + [("channel-align", "relu-input"), ("frskd", "relu-input")]
LABELS = torch.arange(4) % 5
PACKAGE_DIR = os.path.join(os.path.dirname(ofdkern.__file__), "")


def checked_distiller(method, kind):
    """A distiller whose taps were checked at construction (the eager first forward torch.compile needs)."""
    make = TAP_KINDS[kind]
    teacher, student = make(0, (8, 12, 16)), make(1, (4, 6, 8))
    distiller = METHODS[method](teacher, student, example_input=images())
    stop_recording(teacher), stop_recording(student)  # oracle copies would be extra graph outputs
    return distiller, torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)


def training_loss(outputs, y):
    """Cross-entropy on the logits (FRSKD's two: the model's and the self-teacher's) plus the distillation loss."""
    *logits, distill_loss = outputs
    return sum(F.cross_entropy(logits_of(output), y) for output in logits) + distill_loss


def training_step(distiller, optimizer):
    def step(x, y):
        training_loss(distiller(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


# trace_autograd_ops: dynamo traces loss.backward() into the graph instead of breaking there.
@torch._dynamo.config.patch(trace_autograd_ops=True)
@pytest.mark.parametrize("method, kind", CASES, ids=[f"{method}-{kind}" for method, kind in CASES])
def test_a_compiled_training_step_has_no_graph_break_from_the_taps_and_matches_eager(method, kind):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(training_step(*checked_distiller(method, kind)))(images(), LABELS)
    # The only breaks left are the optimizer's own (torch.optim breaks around step() on purpose).
    for reason in explanation.break_reasons:
        frames = [frame.filename for frame in reason.user_stack]
        assert any(name.endswith(os.path.join("torch", "optim", "optimizer.py")) for name in frames), reason
        assert not any(name.startswith(PACKAGE_DIR) for name in frames), reason

    compiled_model, compiled_optimizer = checked_distiller(method, kind)
    eager_model, eager_optimizer = checked_distiller(method, kind)
    compiled_step = torch.compile(training_step(compiled_model, compiled_optimizer), backend="aot_eager")
    eager_step = training_step(eager_model, eager_optimizer)
    for seed in range(3):
        compiled_step(images(seed=seed), LABELS)
        eager_step(images(seed=seed), LABELS)
    moved = 0
    initial = checked_distiller(method, kind)[0].state_dict()
    for name, value in eager_model.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[name], value, rtol=1e-9, atol=1e-12, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved > len(initial) // 2


def test_checked_taps_compile_into_one_graph_and_unchecked_ones_refuse_clearly():
    distiller, _optimizer = checked_distiller("ofd", "relu-input")
    forward = torch.compile(lambda x: distiller(x)[1], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(forward(images()), distiller(images())[1], rtol=1e-12, atol=0)

    teacher, student = ResNet(TorchvisionBasicBlock, widths=(8, 12, 16)), ResNet(TorchvisionBasicBlock, seed=1)
    distiller = OFDDistiller(teacher, student)
    forward = torch.compile(lambda x: distiller(x)[1], fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="checked on the first forward, which must run eagerly"):
        forward(images())


# -- DistributedDataParallel and FSDP2 ------------------------------------------------------------------------
#
# Train-mode BatchNorm normalizes with each process's own batch statistics, and SyncBatchNorm does not run on
# CPU, so a 2-process run can only equal a single process on the global batch when no BN uses batch
# statistics. The comparison therefore runs every BN (teacher, student, connectors) in eval mode: what remains
# is exactly what data parallelism must get right for the distiller — the taps under the wrapper, the frozen
# teacher left out of gradient synchronization, and the per-process loss scaling (alpha / local batch)
# averaging to the global batch's loss. float64 makes the only difference, the order of the batch sums,
# negligible.

WORLD_SIZE, STEPS, GLOBAL_BATCH = 2, 3, 8


def _distributed_setup(method):
    teacher = ResNet(TorchvisionBasicBlock, widths=(8, 12, 16), blocks=2, seed=0)
    student = ResNet(TorchvisionBasicBlock, widths=(4, 6, 8), seed=1)
    distiller = METHODS[method](teacher, student, **({"teacher_bn_train": False} if method == "ofd" else {}))
    distiller.train()
    for module in distiller.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    data = images(batch=GLOBAL_BATCH, seed=5)
    labels = torch.arange(GLOBAL_BATCH) % 5
    return distiller, data, labels


def _train(model, trainable, data, labels):
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(STEPS):
        loss = training_loss(model(data), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _full_state(module):
    """The state dict with FSDP2's sharded DTensors gathered (a collective: every rank calls it)."""
    return {name: value.full_tensor() if hasattr(value, "full_tensor") else value
            for name, value in module.state_dict().items()}


def _worker(rank, wrapper, method, rendezvous, result_path):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        distiller, data, labels = _distributed_setup(method)
        if wrapper == "ddp":
            model = nn.parallel.DistributedDataParallel(distiller)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD_SIZE,))
            for layer in distiller.student.layers():
                fully_shard(layer, mesh=mesh)
            fully_shard(distiller.student, mesh=mesh)
            for transform in distiller.connectors if method == "ofd" else distiller.aligners:
                fully_shard(transform, mesh=mesh)
            model = distiller
        shard = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        _train(model, [p for p in distiller.parameters() if p.requires_grad], data[shard], labels[shard])
        state = _full_state(distiller)
        if rank == 0:
            torch.save(state, result_path)
        # A rank that tears gloo down while the other still has traffic in flight can abort the other
        # ("terminate called without an active exception"): leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


# (wrapper, method, the prefixes of the trained parameters: the student's and the method's own)
WRAPPERS = [("ddp", "ofd", "student.", "connectors."), ("fsdp2", "ofd", "student.", "connectors."),
            ("ddp", "channel-align", "student.", "aligners."), ("fsdp2", "channel-align", "student.", "aligners."),
            ("ddp", "frskd", "model.", "self_teacher.")]


@pytest.mark.parametrize("wrapper, method, student, own", WRAPPERS, ids=[f"{w}-{m}" for w, m, *_ in WRAPPERS])
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, wrapper, method, student, own):
    result_path = tmp_path / "distributed.pt"
    mp.spawn(_worker, args=(wrapper, method, str(tmp_path / "rendezvous"), str(result_path)), nprocs=WORLD_SIZE)
    distributed = torch.load(result_path)

    distiller, data, labels = _distributed_setup(method)
    initial = {k: v.clone() for k, v in distiller.state_dict().items()}
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    assert {n.partition(".")[0] + "." for n, p in distiller.named_parameters() if p.requires_grad} == {student, own}
    _train(distiller, trainable, data, labels)

    for name, value in distiller.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12, msg=name)
    moved = [n for n, v in distiller.state_dict().items() if not torch.equal(v, initial[n])]
    assert any(n.startswith(student) for n in moved) and any(n.startswith(own) for n in moved)
    assert not any(n.startswith("teacher.") for n in moved)
