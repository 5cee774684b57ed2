import os

import pytest
import torch

# Triton kernels run on CPU tensors only under its interpreter, which must be on before triton is imported
# (ofdkern reads it once at import). On a GPU machine the real Triton runs instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ofdkern  # noqa: E402

STATUS = ofdkern.backend_status()


def backends_for(device: str, *ops: str) -> list[str]:
    """Fused backends that run every one of the public ``ops`` on ``device`` here (the reference is the oracle,
    not a subject)."""
    per_op = [ofdkern.backend_status(op) for op in ops]
    return [name for name in ("cpu", "triton", "cuda") if all(device in status[name]["devices"] for status in per_op)]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(*ops: str) -> list:
    """(device, backend) parameters of the fused backends that run the public ``ops``; GPU ones are marked."""
    return [pytest.param(device, backend, id=f"{backend}-{device}",
                         marks=[pytest.mark.gpu] if device == "cuda" else [])
            for device in DEVICES for backend in backends_for(device, *ops)]


BACKEND_CASES = backend_cases("ofd_loss")


def assert_same_bits_with_one_thread(run):
    """``run()`` (a tuple of tensors) gives bit-identical results on two threads and on one (set explicitly,
    whatever the machine has): the CPU kernels' summation order must not depend on how the work is split."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def pytest_report_header(config):
    return [f"ofdkern backends: " + ", ".join(f"{n}={e['devices']}" for n, e in STATUS.items())]


# The tests that take minutes when their caches are cold (every Triton kernel compiled for sm_90/sm_80, the
# CUDA emulation under AddressSanitizer): started first, so that on a fresh machine one pytest-xdist worker
# runs them while the other takes the rest, instead of both waiting on them at the end.
LONG_WHEN_COLD = ("test_every_triton_kernel_compiles_for_gpus", "test_cuda_kernels_under_address_sanitizer")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.originalname not in LONG_WHEN_COLD)
