"""Peak memory of a forward + backward: every fused op holds about one gradient per differentiated input beyond
its inputs (the forward writes it once, the backward scales it in place), where eager holds several temporaries.

Measured like the benchmark suite measures it on CPU (benchmarks/bench_measure.py): the growth of the process's
peak resident set over one call, after handing free heap pages back to the system, so that every byte the call
touches counts, whatever allocator served it.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import ofdkern
from ofdkern import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_measure  # noqa: E402

pytestmark = pytest.mark.skipif(bench_measure.cpu_memory_method() is not None,
                                reason=f"CPU peak memory unmeasurable here: {bench_measure.cpu_memory_method()}")

MIB = 2**20


def _inputs(op):
    g = torch.Generator().manual_seed(0)
    if op == "kd_loss":
        return [torch.randn(64, 32000, generator=g).requires_grad_(), torch.randn(64, 32000, generator=g)]
    if op == "attention_transfer_loss":
        return [torch.randn(32, 256, 28, 28, generator=g).requires_grad_(), torch.randn(32, 256, 28, 28, generator=g)]
    if op == "cwd_loss":
        return [torch.randn(4, 19, 128, 256, generator=g).requires_grad_(), torch.randn(4, 19, 128, 256, generator=g)]
    return [torch.randn(16, 256, 28, 28, generator=g).requires_grad_(), torch.randn(16, 256, 28, 28, generator=g),
            -torch.rand(256, generator=g)]


FUSED = {
    "kd_loss": lambda s, t: ofdkern.kd_loss(s, t, backend="cpu"),
    "attention_transfer_loss": lambda s, t: ofdkern.attention_transfer_loss(s, t, backend="cpu"),
    "ofd_loss": lambda s, t, m: ofdkern.ofd_loss(s, t, m, reduction="batchmean", backend="cpu"),
    "cwd_loss": lambda s, t: ofdkern.cwd_loss(s, t, backend="cpu"),
}
EAGER = {
    "kd_loss": lambda s, t: reference.kd_loss(s, t),
    "attention_transfer_loss": lambda s, t: reference.attention_transfer_loss(s, t),
    "ofd_loss": lambda s, t, m: reference.ofd_loss(s, t, m, "batchmean"),
    "cwd_loss": lambda s, t: reference.cwd_loss(s, t),
}


def _peak_extra(loss_fn, inputs) -> int:
    def step():
        loss = loss_fn(*inputs)
        loss.backward()
        gradient, inputs[0].grad = inputs[0].grad, None
        return gradient

    step()  # warm-up: first-call allocations (dispatcher tables, the CPU buffer cache) are not the op's
    return bench_measure.peak_extra_bytes(step, "cpu", 3)


@pytest.mark.skipif(not ofdkern.backend_status()["cpu"]["built"], reason="needs the CPU kernels")
@pytest.mark.parametrize("op", sorted(FUSED))
def test_forward_backward_holds_one_gradient(op):
    inputs = _inputs(op)
    gradient_bytes = inputs[0].numel() * inputs[0].element_size()
    fused = _peak_extra(FUSED[op], inputs)
    eager = _peak_extra(EAGER[op], inputs)
    # The method sees the eager reference's temporaries...
    assert eager >= 2 * gradient_bytes, (eager / MIB, gradient_bytes / MIB)
    # ... and the fused op holds the gradient and little more (the attention maps, partial sums).
    assert 0.9 * gradient_bytes <= fused <= 1.15 * gradient_bytes + 2 * MIB, (fused / MIB, gradient_bytes / MIB)
