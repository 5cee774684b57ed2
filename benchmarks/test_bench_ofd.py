"""pytest-benchmark microbenchmarks of ofdkern.ofd_loss: every provider of this machine on small shapes.

    pytest benchmarks/ --benchmark-only

Each benchmark first checks that its provider computes what the eager reference computes, so a
benchmark can never time a wrong result. The full study (real shapes, bandwidth, memory, plots) is
benchmarks/run.py.
"""
from __future__ import annotations

import pytest
import torch

import bench_cases as cases
from ofdkern import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small versions of the real setups: CIFAR WRN stage 3 at batch 16, ResNet layer2 at batch 2.
SHAPES = {"wrn-stage3-b16": (16, 128, 8, 8), "resnet-layer2-b2": (2, 512, 28, 28)}
DTYPES = ("fp32", "bf16")
ROUNDS = 10


def _params():
    for provider in cases.providers(DEVICE):
        for mode in provider.modes:
            for shape_name in SHAPES:
                for dtype in DTYPES:
                    yield pytest.param(provider, mode, shape_name, dtype,
                                       id=f"{provider.name}-{mode}-{shape_name}-{dtype}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every benchmark compiles its own static graph: no recompile limit, no graphs of other shapes."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _expected(provider: cases.Provider, mode: str, inputs: cases.Inputs) -> torch.Tensor:
    if provider.modes != cases.MODES:  # a roofline op: student * teacher
        return inputs.student.detach() * inputs.teacher
    return cases.loss_steps(reference.ofd_loss, inputs)[mode]()


@pytest.mark.parametrize("provider, mode, shape_name, dtype", list(_params()))
def test_ofd_loss(benchmark, provider, mode, shape_name, dtype):
    with provider.context():
        _run_benchmark(benchmark, provider, mode, shape_name, dtype)


def _run_benchmark(benchmark, provider, mode, shape_name, dtype):
    case = cases.Case("micro", shape_name, SHAPES[shape_name], dtype)
    inputs = cases.make_inputs(case, DEVICE)
    step = provider.build(inputs)[mode]

    result = step()  # also the warm-up: torch.compile compiles here
    expected = _expected(provider, mode, inputs)
    # The loss is a sum over ~1e5-1e6 elements accumulated in another order: a relative tolerance.
    torch.testing.assert_close(result, expected, rtol=1e-4 if result.dim() == 0 else None,
                               atol=1e-4 if result.dim() == 0 else None)

    def timed():
        out = step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{shape_name} {dtype} {mode}"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)
    moved = cases.bytes_moved(case, mode)
    benchmark.extra_info["bytes_moved"] = moved
    benchmark.extra_info["gb_per_s_median"] = moved / benchmark.stats.stats.median / 1e9
