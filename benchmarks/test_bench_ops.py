"""pytest-benchmark microbenchmarks of every loss op: each provider of this machine on small shapes.

    pytest benchmarks/ --benchmark-only

Each benchmark first checks its provider against the eager reference with the runner's own check (bench_cases),
so a benchmark can never time a wrong result. A training step is no microbenchmark: distill_step is measured by
benchmarks/run.py only, as is everything at real sizes (bandwidth, memory, plots).
"""
from __future__ import annotations

import pytest
import torch

import bench_cases as cases
import bench_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 10


def _params():
    for op in bench_ops.OPS.values():
        for case in op.micro_cases(DEVICE):
            for provider in op.providers(DEVICE, False):
                for mode in provider.modes:
                    yield pytest.param(op, case, provider, mode,
                                       id=f"{op.name}-{provider.name}-{mode}-{case.label}-{case.dtype}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every benchmark compiles its own static graph: no recompile limit, no graphs of other shapes."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("op, case, provider, mode", list(_params()))
def test_op(benchmark, op, case, provider, mode):
    inputs = op.make_inputs(case, DEVICE)
    with provider.context():
        step = provider.build(inputs)[mode]
        output = step()  # also the warm-up: torch.compile compiles here
        if provider.check is not None:
            eager = next(p for p in op.providers(DEVICE, False) if p.check is None)
            oracle, _ = cases.oracle_output(op, eager, mode, inputs, eager.build(inputs)[mode](), case)
            provider.check(output, oracle, op.tolerance[case.dtype])

        def timed():
            out = step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.group = f"{op.name} {case.label} {case.dtype} {mode}"
        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the check ran, nothing was timed
        return
    median_s = benchmark.stats.stats.median
    moved, flops = op.bytes_moved(case, mode), op.flops(case, mode)
    if moved is not None:
        benchmark.extra_info["bytes_moved"] = moved
        benchmark.extra_info["gb_per_s_median"] = moved / median_s / 1e9
    if flops is not None:
        benchmark.extra_info["tflop_per_s_median"] = flops / median_s / 1e12
