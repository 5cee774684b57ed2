"""The CPU kernels are compiled once per instruction set (csrc/cpu_isa.h) and follow torch's choice, which
ATEN_CPU_CAPABILITY overrides: each variant this CPU can run, in a fresh process, against float64."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def cpu_capabilities():
    """The instruction sets the CPU kernels have a variant for that this CPU runs, best last."""
    order = ["default", "avx2", "avx512"]
    best = torch.backends.cpu.get_cpu_capability().lower()
    return order[:order.index(best) + 1] if best in order else ["default"]


CAPABILITY_SCRIPT = r"""
import torch, ofdkern
from ofdkern import reference
gen = torch.Generator().manual_seed(0)
worst = 0.0
for shape in ((4, 300), (2, 9000)):
    s, t = (3 * torch.randn(shape, generator=gen) for _ in range(2))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        leaf = s.to(dtype).requires_grad_()
        got = ofdkern.kd_loss(leaf, t.to(dtype), temperature=3.0, reduction="none", backend="cpu")
        (grad,) = torch.autograd.grad(got.sum(), leaf)
        ref = leaf.detach().double().requires_grad_()
        want = reference.kd_loss(ref, t.to(dtype).double(), 3.0, "none")
        (want_grad,) = torch.autograd.grad(want.sum(), ref)
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-13}[dtype]
        worst = max(worst, ((got.double() - want).abs() / want.abs()).max().item() / tol,
                    ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item() / tol)
for layout in (torch.contiguous_format, torch.channels_last):
    f = [torch.randn(3, c, 9, 11, generator=gen).to(memory_format=layout).requires_grad_() for c in (20, 36)]
    got = ofdkern.attention_transfer_loss(*f, p=3, backend="cpu")
    grads = torch.autograd.grad(got, f)
    ref = [x.detach().double().requires_grad_() for x in f]
    want = reference.attention_transfer_loss(*ref, 3)
    want_grads = torch.autograd.grad(want, ref)
    worst = max(worst, abs(got.item() - want.item()) / want.item() / 1e-5,
                *(((g.double() - w).abs().max() / w.abs().max()).item() / 1e-5 for g, w in zip(grads, want_grads)))
for layout in (torch.contiguous_format, torch.channels_last):
    s, t = (torch.randn(3, 20, 9, 11, generator=gen).to(memory_format=layout) for _ in range(2))
    margin = -0.5 * torch.rand(20, generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        leaf = s.to(dtype).requires_grad_()
        got = ofdkern.ofd_loss(leaf, t.to(dtype), margin, backend="cpu")
        (grad,) = torch.autograd.grad(got, leaf)
        ref = leaf.detach().double().requires_grad_()
        want = reference.ofd_loss(ref, t.to(dtype).double(), margin.double())
        (want_grad,) = torch.autograd.grad(want, ref)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-13}[dtype]
        worst = max(worst, abs(got.item() - want.item()) / want.item() / tol,
                    ((grad.double() - want_grad).abs().max() / want_grad.abs().max()).item() / tol)
# Attention-map gradients of 16 MiB and more are written with streaming stores (stream_pair, csrc/cpu_vec.h):
# every sample's equals the one computed for a few samples (below that size, plain stores), at unaligned
# sample starts (49 positions) and one dtype of each store width.
for dtype, batch in ((torch.float32, 44), (torch.bfloat16, 86), (torch.float64, 22)):
    feature = torch.randn(batch, 2048, 49, generator=gen).to(dtype)
    grad_map = torch.randn(batch, 49, generator=gen, dtype=torch.float64)
    streamed = torch.ops.ofdkern.attention_map_backward(feature, grad_map, 3.0)
    stored = torch.ops.ofdkern.attention_map_backward(feature[1:4], grad_map[1:4], 3.0)
    assert streamed.nbytes >= 16 << 20 > stored.nbytes, (streamed.nbytes, stored.nbytes)
    assert torch.equal(streamed[1:4], stored), dtype
    assert torch.equal(streamed[-1:], torch.ops.ofdkern.attention_map_backward(feature[-1:], grad_map[-1:], 3.0))
# CWD's channels_last kernel (its transposing copies, its scaling of the gradient) gives the NCHW path's bits.
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    s, t = (torch.randn(2, 37, 9, 11, generator=gen).to(dtype) for _ in range(2))
    runs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        leaf = s.to(memory_format=layout).requires_grad_()
        loss = ofdkern.cwd_loss(leaf, t.to(memory_format=layout), temperature=2.0, backend="cpu")
        runs.append((loss, *torch.autograd.grad(loss, leaf)))
    assert runs[1][1].is_contiguous(memory_format=torch.channels_last), dtype
    assert all(torch.equal(a, b) for a, b in zip(*runs)), dtype
print(torch.backends.cpu.get_cpu_capability(), worst)
"""


@pytest.mark.parametrize("capability", cpu_capabilities())
def test_cpu_kernels_of_every_instruction_set(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    reported, worst = result.stdout.split()
    assert reported.lower() == capability
    assert float(worst) <= 1, worst
