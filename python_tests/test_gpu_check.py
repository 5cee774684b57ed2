"""tools/gpu_check.sh proven without a GPU: its --dry-run takes every stage through the same plumbing on the CPU
(the built-extension check, the stage order, the one budget, the files under $OUT and the summary), so that the
one call a lent GPU gets cannot be spent on a broken script."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One worker builds the module fixture once (pytest-xdist, --dist loadgroup).
pytestmark = pytest.mark.xdist_group("gpu_check")
SCRIPT = REPO / "tools" / "gpu_check.sh"
STAGES = ("extension check", "tests (-m gpu)", "bench", "sanitize")


def _dry_run(out: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=environment,
                          timeout=300)


def _stage_rows(summary: str) -> dict[str, list[str]]:
    rows = {}
    for line in summary.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in STAGES:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return _dry_run(out), out


def test_dry_run_goes_through_every_stage_in_order_within_its_budget(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert files == ["bench.log", "results.tar.gz", "sanitize.log", "summary.md", "tests.log"]
    assert len(files) <= 8  # what the device tool brings back
    summary = (out / "summary.md").read_text()
    rows = _stage_rows(summary)
    assert list(rows) == list(STAGES), summary
    assert all(cells[0].startswith("ok") for cells in rows.values()), summary
    used = int(summary.split("used: ")[1].split(" s")[0])
    assert used <= 110 and "budget: 110 s" in summary
    assert "dry run" in summary and "commit:" in summary and "torch" in summary
    # The GPU tests are selected (on a CPU they skip), and the benchmark ran a case and checked its targets.
    assert "skipped" in rows["tests (-m gpu)"][2]
    assert "targets checked" in rows["bench"][2]
    with tarfile.open(out / "results.tar.gz") as results:
        names = results.getnames()
    assert "./tests.xml" in names and "./backends.txt" in names
    assert any(name.endswith(".json") for name in names), names


def test_missing_extension_stops_before_any_stage(tmp_path):
    result = _dry_run(tmp_path, OFDKERN_DISABLE_EXTENSION="1")
    assert result.returncode == 1
    summary = (tmp_path / "summary.md").read_text()
    assert _stage_rows(summary) == {"extension check": ["FAILED", "0",
                                                        "the CUDA backend is not built: nothing else ran"]}
    assert "disabled by OFDKERN_DISABLE_EXTENSION=1" in summary  # python -m ofdkern's reason, in the summary
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.md"]


def test_a_spent_budget_skips_the_stages_and_still_reports_them(tmp_path):
    result = _dry_run(tmp_path, BUDGET="1")
    assert result.returncode == 1
    rows = _stage_rows((tmp_path / "summary.md").read_text())
    assert list(rows) == list(STAGES)
    for stage in STAGES[1:]:
        assert rows[stage][0] == "skipped: the budget is spent", rows
