"""Turning benchmark rows into derived metrics, the acceptance check, markdown tables and the README block."""
from __future__ import annotations

import os
import re
from typing import Optional

from bench_cases import FORWARD_BACKWARD

ROOFLINE = "copy-roofline"
# Stated for the fused CPU kernel on the acceptance case, forward + backward.
TARGETS = {"speedup_vs_eager": 10.0, "speedup_vs_compile": 2.0, "ratio_vs_roofline": 2.5}

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
_MIB = 2**20


def case_key(row: dict) -> tuple:
    return (row["group"], row["label"], tuple(row["shape"]), row["dtype"])


def _ok(row: Optional[dict]) -> bool:
    return row is not None and row.get("error") is None


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager: eager's median / the row's median, same case and mode (roofline ops are
    compared with eager forward + backward, which moves the same bytes)."""
    eager = {(case_key(r), r["mode"]): r for r in rows if r["provider"] == "eager" and _ok(r)}
    for row in rows:
        base = eager.get((case_key(row), row["mode"]))
        row["speedup_vs_eager"] = (base["median_ms"] / row["median_ms"]
                                   if _ok(row) and base is not None else None)


def _find(rows, key, provider, mode) -> Optional[dict]:
    for row in rows:
        if case_key(row) == key and row["provider"] == provider and row["mode"] == mode and _ok(row):
            return row
    return None


def acceptance(rows: list[dict], device: str) -> list[dict]:
    """For each fused provider on the acceptance case (forward + backward): speed-up vs eager and vs
    compile, and time relative to the allocating roofline op. PASS/MISS against the targets on CPU,
    where they are stated; on GPU the ratios are reported for information ("info")."""
    keys = {case_key(r) for r in rows if r.get("acceptance")}
    checks = []
    for key in sorted(keys):
        fused = sorted({r["provider"] for r in rows
                        if case_key(r) == key and r["provider"].startswith("ofdkern-")})
        eager, compiled, roofline = (_find(rows, key, p, FORWARD_BACKWARD) for p in ("eager", "compile", ROOFLINE))
        for provider in fused:
            row = _find(rows, key, provider, FORWARD_BACKWARD)
            if row is None:
                continue
            values = {
                "speedup_vs_eager": eager and eager["median_ms"] / row["median_ms"],
                "speedup_vs_compile": compiled and compiled["median_ms"] / row["median_ms"],
                "ratio_vs_roofline": roofline and row["median_ms"] / roofline["median_ms"],
            }
            for metric, value in values.items():
                target = TARGETS[metric]
                if value is None:
                    status = "n/a"
                elif device != "cpu":
                    status = "info"
                elif metric == "ratio_vs_roofline":
                    status = "PASS" if value <= target else "MISS"
                else:
                    status = "PASS" if value >= target else "MISS"
                checks.append({"case": key[1], "shape": list(key[2]), "dtype": key[3], "provider": provider,
                               "device": device, "metric": metric, "value": value, "target": target,
                               "status": status})
    return checks


def acceptance_lines(checks: list[dict]) -> list[str]:
    words = {"speedup_vs_eager": ("speed-up vs eager", ">="), "speedup_vs_compile": ("speed-up vs compile", ">="),
             "ratio_vs_roofline": ("time / copy-roofline time", "<=")}
    lines = []
    for check in checks:
        name, relation = words[check["metric"]]
        value = "missing" if check["value"] is None else f"{check['value']:.2f}x"
        shape = "x".join(map(str, check["shape"]))
        target = "target" if check["device"] == "cpu" else "CPU target"
        lines.append(f"{check['status']:<4}  {check['provider']} fwd+bwd {shape} {check['dtype']}: {name} = {value} "
                     f"({target} {relation} {check['target']:g}x)")
    return lines


# ---- markdown ----------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / _MIB:.1f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def metadata_lines(result: dict) -> list[str]:
    info, copy = result["machine"], result["copy_bandwidth"]
    cpu = info["cpu"]
    device = info["gpu"]["name"] if info["device"] == "cuda" else (
        f"{cpu['model']} ({cpu['usable_cores']} cores, {cpu['torch_threads']} torch threads)")
    return [
        f"- device: {device}",
        f"- date: {info['date']}; torch {info['torch']}, triton {info['triton'] or '-'}, "
        f"ofdkern {info['ofdkern']} (commit {info['git_commit'] or '?'}){' — quick run' if result['quick'] else ''}",
        f"- copy bandwidth (`dst.copy_(src)`, read + write): {copy['gb_per_s']:.1f} GB/s "
        f"(best rep {copy['best_gb_per_s']:.1f} GB/s)",
    ] + ([
        "- times are device times: each step captured once in a CUDA graph and replayed (L2 flushed before each "
        "replay); the host work of a plain call (Python, dispatch, autograd) is in the last column of the full table",
    ] if info["device"] == "cuda" else [])


def summary_table(rows: list[dict]) -> list[str]:
    """Forward + backward on the real setups (CIFAR and ImageNet shapes): one row per shape and dtype."""
    chosen = [r for r in rows if r["mode"] == FORWARD_BACKWARD and r["group"] != "sweep"]
    providers = list(dict.fromkeys(r["provider"] for r in chosen))
    timed = [p for p in providers if p != "eager"]
    fused = [p for p in providers if p.startswith("ofdkern-")]
    with_memory = [p for p in providers if p != "copy-roofline-out"]
    header = (["shape", "dtype", "eager ms"] + [f"{p} ms (speed-up)" for p in timed]
              + [f"{p} % copy BW" for p in fused] + ["peak extra MiB: " + " / ".join(with_memory)])
    body = []
    for key in dict.fromkeys(case_key(r) for r in chosen):
        by_provider = {r["provider"]: r for r in chosen if case_key(r) == key}

        def cell(provider, fmt):
            row = by_provider.get(provider)
            return fmt(row) if _ok(row) else ("error" if row else "-")

        cells = ["x".join(map(str, key[2])), key[3], cell("eager", lambda r: _ms(r["median_ms"]))]
        cells += [cell(p, lambda r: f"{_ms(r['median_ms'])} ({r['speedup_vs_eager']:.1f}x)"
                       if r["speedup_vs_eager"] else _ms(r["median_ms"])) for p in timed]
        cells += [cell(p, lambda r: f"{100 * r['copy_bw_fraction']:.0f}%") for p in fused]
        cells.append(" / ".join(cell(p, lambda r: _mib(r["peak_extra_bytes"])) for p in with_memory))
        body.append(cells)
    return _table(header, body)


def full_table(rows: list[dict]) -> list[str]:
    header = ["case", "shape", "dtype", "provider", "mode", "median ms", "IQR ms", "min-max ms", "reps",
              "GB/s", "% copy BW", "speed-up vs eager", "peak extra MiB (x tensor)", "first call s"]
    on_gpu = any("launch_median_ms" in row for row in rows)
    if on_gpu:
        header.append("plain-call median ms")
    body = []
    for row in rows:
        head = [row["label"], "x".join(map(str, row["shape"])), row["dtype"], row["provider"], row["mode"]]
        if not _ok(row):
            body.append(head + [f"error: {row['error']}"] + [""] * (len(header) - len(head) - 1))
            continue
        memory = "-" if row["peak_extra_bytes"] is None else (
            f"{_mib(row['peak_extra_bytes'])} ({row['peak_extra_tensors']:.2f})")
        speedup = "-" if row["speedup_vs_eager"] is None else f"{row['speedup_vs_eager']:.2f}x"
        body.append(head + [
            _ms(row["median_ms"]), f"{_ms(row['q1_ms'])}-{_ms(row['q3_ms'])}",
            f"{_ms(row['min_ms'])}-{_ms(row['max_ms'])}", str(row["reps"]), f"{row['gb_per_s']:.1f}",
            f"{100 * row['copy_bw_fraction']:.0f}%", speedup, memory, f"{row['first_call_s']:.2f}"]
            + ([_ms(row["launch_median_ms"])] if on_gpu else []))
    return _table(header, body)


def markdown(result: dict, image_name: str) -> str:
    rows = result["rows"]
    lines = [f"# OFD loss benchmark: {result['machine']['device_name']}", ""] + metadata_lines(result) + [""]
    if result["acceptance"]:
        lines += ["## Acceptance case", "", "```"] + acceptance_lines(result["acceptance"]) + ["```", ""]
    lines += ["## Forward + backward, real setups", "", *summary_table(rows), "",
              f"![speed-up and peak memory]({image_name})", "",
              "## All measurements", "", *full_table(rows), ""]
    return "\n".join(lines)


def readme_block(result: dict, markdown_path: str, image_path: str, readme_dir: str) -> str:
    """The text placed between the README markers: the summary table, the acceptance check and the plot."""
    def rel(path):
        return os.path.relpath(path, readme_dir).replace(os.sep, "/")

    lines = [f"Latest run ([all measurements]({rel(markdown_path)})):", ""] + metadata_lines(result) + [""]
    lines += summary_table(result["rows"]) + [""]
    if result["acceptance"]:
        lines += ["```"] + acceptance_lines(result["acceptance"]) + ["```", ""]
    lines += [f"![speed-up and peak memory]({rel(image_path)})"]
    return "\n".join(lines)


def update_readme(readme_path: str, block: str) -> Optional[str]:
    """Replaces the text between the bench markers; returns why it could not, or None."""
    if not os.path.exists(readme_path):
        return f"{readme_path} does not exist"
    with open(readme_path, encoding="utf-8") as readme:
        text = readme.read()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        return (f"{readme_path} needs exactly one '{README_START}' ... '{README_END}' pair of markers "
                f"(found {len(pattern.findall(text))}); add them where the benchmark table belongs")
    text = pattern.sub(lambda _: f"{README_START}\n{block}\n{README_END}", text)
    with open(readme_path, "w", encoding="utf-8") as readme:
        readme.write(text)
    return None
