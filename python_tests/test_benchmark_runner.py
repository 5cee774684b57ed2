"""Where the benchmark runner (benchmarks/run.py) writes: full runs into benchmarks/results, which keeps and
indexes them; --quick runs into benchmarks/results/quick, which git ignores, so that the README's quick command
leaves a checkout clean."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
_spec = importlib.util.spec_from_file_location("benchmark_runner", os.path.join(BENCHMARKS, "run.py"))
runner = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = runner  # its dataclasses look their module up there
_spec.loader.exec_module(runner)


def test_quick_runs_go_where_git_ignores_them_and_full_runs_to_the_results():
    results = os.path.join(BENCHMARKS, "results")
    assert runner.parse_args(["--op", "kd"]).out_dir == results
    quick = runner.parse_args(["--op", "kd", "--quick"]).out_dir
    assert quick == os.path.join(results, "quick")
    assert runner.parse_args(["--quick", "--out-dir", "elsewhere"]).out_dir == "elsewhere"
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(quick, "INDEX.md")], cwd=BENCHMARKS)
    assert ignored.returncode == 0
    kept = subprocess.run(["git", "check-ignore", "-q", os.path.join(results, "INDEX.md")], cwd=BENCHMARKS)
    assert kept.returncode == 1
