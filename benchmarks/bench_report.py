"""Turning benchmark rows into derived metrics, the targets' check, markdown tables per op and the README block.
Reads only the results JSON (its "ops" metadata says each op's title, floor and modes)."""
from __future__ import annotations

import json
import os
import re
from typing import Optional

from bench_cases import COMPILE, EAGER, FUSED_PREFIX

SCHEMA = 2
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
_MIB = 2**20
MODE_WORDS = {"fwd": "forward only", "fwd+bwd": "forward + backward", "step": "training step",
               "loss": "loss part alone"}


def case_key(row: dict) -> tuple:
    return (row["op"], row["group"], row["label"], tuple(row["shape"]), row["dtype"])


def _ok(row: Optional[dict]) -> bool:
    return row is not None and row.get("error") is None


def _time_ratio(numerator: Optional[dict], denominator: Optional[dict]) -> Optional[float]:
    if not (_ok(numerator) and _ok(denominator)):
        return None
    return numerator["median_ms"] / denominator["median_ms"]


def add_derived(rows: list[dict], ops: dict) -> None:
    """Per row, against the same case and mode: speedup_vs_eager, speedup_vs_compile, speedup_vs_best_baseline
    (the faster of the two), ratio_vs_floor (time / the op's floor's), memory_vs_eager (peak extra / eager's);
    with a share mode (distill_step's loss part), on main-mode rows: share_ms and share_of_main (its time in
    that mode / its time in this one)."""
    index = {(case_key(r), r["provider"], r["mode"]): r for r in rows if _ok(r)}
    for row in rows:
        meta = ops[row["op"]]

        def same_case(provider, mode=row["mode"]):
            return index.get((case_key(row), provider, mode))

        eager, compiled = same_case(EAGER), same_case(COMPILE)
        baselines = [r for r in (eager, compiled) if r is not None]
        fastest = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
        row["speedup_vs_eager"] = _time_ratio(eager, row)
        row["speedup_vs_compile"] = _time_ratio(compiled, row)
        row["speedup_vs_best_baseline"] = _time_ratio(fastest, row)
        row["ratio_vs_floor"] = _time_ratio(row, same_case(meta["floor"]))
        peaks = (row.get("peak_extra_bytes"), eager and eager.get("peak_extra_bytes"))
        row["memory_vs_eager"] = peaks[0] / peaks[1] if _ok(row) and peaks[0] is not None and peaks[1] else None
        share = same_case(row["provider"], meta["share_mode"]) if row["mode"] == meta["main_mode"] else None
        row["share_ms"] = share["median_ms"] if _ok(row) and share is not None else None
        row["share_of_main"] = _time_ratio(share, row) if share is not None else None


# ---- targets -----------------------------------------------------------------------------------------------

_METRIC_WORDS = {"speedup_vs_eager": "speed-up vs eager", "speedup_vs_compile": "speed-up vs compile",
                 "speedup_vs_best_baseline": "speed-up vs the faster of eager and compile",
                 "ratio_vs_floor": "time / floor time", "memory_vs_eager": "peak extra memory / eager's"}


def check_targets(rows: list[dict], ops, device: str) -> list[dict]:
    """Each op's targets on its fused providers' main-mode rows: PASS/MISS on the devices a target is stated
    for, "info" elsewhere, "n/a" when the metric could not be computed (a baseline failed). Never an assertion."""
    checks = []
    for op in ops:
        for target in op.targets:
            chosen = [r for r in rows if r["op"] == op.name and r["mode"] == op.main_mode and _ok(r)
                      and r["provider"].startswith(FUSED_PREFIX)
                      and (r["acceptance"] if target.labels is None else r["label"] in target.labels)]
            for row in chosen:
                value = row.get(target.metric)
                if value is None:
                    status = "n/a"
                elif device not in target.devices:
                    status = "info"
                else:
                    status = "PASS" if (value >= target.bound if target.relation == ">=" else value <= target.bound) \
                        else "MISS"
                checks.append({"op": op.name, "case": row["label"], "shape_text": row["shape_text"],
                               "dtype": row["dtype"], "provider": row["provider"], "mode": row["mode"],
                               "metric": target.metric, "relation": target.relation, "bound": target.bound,
                               "stated_for": list(target.devices), "value": value, "status": status})
    return checks


def target_lines(checks: list[dict]) -> list[str]:
    lines = []
    for check in checks:
        value = "missing" if check["value"] is None else f"{check['value']:.2f}x"
        stated = "target" if check["status"] != "info" else f"target on {'/'.join(check['stated_for'])}"
        lines.append(f"{check['status']:<4}  {check['op']} {check['provider']} {check['mode']} {check['shape_text']} "
                     f"{check['dtype']}: {_METRIC_WORDS[check['metric']]} = {value} "
                     f"({stated} {check['relation']} {check['bound']:g}x)")
    return lines


# ---- markdown ----------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / _MIB:.1f}"


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def metadata_lines(result: dict) -> list[str]:
    info, copy = result["machine"], result["copy_bandwidth"]
    cpu = info["cpu"]
    device = info["gpu"]["name"] if info["device"] == "cuda" else (
        f"{cpu['model']} ({cpu['usable_cores']} cores, {cpu['torch_threads']} torch threads)")
    lines = [
        f"- device: {device}",
        f"- date: {info['date']}; torch {info['torch']}, triton {info['triton'] or '-'}, "
        f"ofdkern {info['ofdkern']} (commit {info['git_commit'] or '?'}){' — quick run' if result['quick'] else ''}",
        f"- copy bandwidth (`dst.copy_(src)`, read + write): {copy['gb_per_s']:.1f} GB/s "
        f"(best rep {copy['best_gb_per_s']:.1f} GB/s)",
    ]
    lines += [f"- {name} not run: {why}" for name, why in result["skipped_ops"].items()]
    if result["not_run"]:
        lines.append(f"- stopped by the time limit before {len(result['not_run'])} cases: "
                     + ", ".join(f"{c['op']} {c['label']} {c['dtype']}" for c in result["not_run"]))
    return lines


def _timing_line(meta: dict, device: str) -> str:
    if device != "cuda":
        return "Times: `time.perf_counter_ns()` around one call."
    if meta["cuda_graph"]:
        return ("Times are device times: each step captured once in a CUDA graph and replayed (L2 flushed before "
                "each replay); the host work of a plain call (Python, dispatch, autograd) is in the last column "
                "of the full table.")
    return "Times: CUDA events around plain calls (L2 flushed before each)."


def summary_table(rows: list[dict], meta: dict) -> list[str]:
    """The op's main mode on its real setups (the size sweep left out): one row per shape and dtype."""
    chosen = [r for r in rows if r["mode"] == meta["main_mode"] and r["group"] != "sweep"]
    providers = list(dict.fromkeys(r["provider"] for r in chosen))
    fused = [p for p in providers if p.startswith(FUSED_PREFIX)]
    with_flops = any(r["flops"] for r in chosen)
    with_bytes = any(r["bytes_moved"] for r in chosen) and not with_flops  # a GEMM-bound op: TFLOP/s instead
    shared = [p for p in providers if any(r["provider"] == p and r.get("share_ms") is not None for r in chosen)]
    share_words = MODE_WORDS.get(meta["share_mode"], meta["share_mode"])
    header = (["shape", "dtype", f"{EAGER} ms"] + [f"{p} ms (speed-up)" for p in providers if p != EAGER]
              + [f"{p} / {meta['floor']}" for p in fused]
              + ([f"{p} % copy BW" for p in fused] if with_bytes else [])
              + ([f"{p} TFLOP/s" for p in fused] if with_flops else [])
              + [f"{p} {share_words} ms (share)" for p in shared]
              + ["peak extra MiB: " + " / ".join(providers)])
    body = []
    for key in dict.fromkeys(case_key(r) for r in chosen):
        by_provider = {r["provider"]: r for r in chosen if case_key(r) == key}
        first = next(iter(by_provider.values()))

        def cell(provider, fmt):
            row = by_provider.get(provider)
            return fmt(row) if _ok(row) else ("error" if row else "-")

        cells = [first["shape_text"], first["dtype"], cell(EAGER, lambda r: _ms(r["median_ms"]))]
        cells += [cell(p, lambda r: f"{_ms(r['median_ms'])} ({r['speedup_vs_eager']:.1f}x)"
                       if r["speedup_vs_eager"] else _ms(r["median_ms"])) for p in providers if p != EAGER]
        cells += [cell(p, lambda r: _x(r["ratio_vs_floor"])) for p in fused]
        if with_bytes:
            cells += [cell(p, lambda r: f"{100 * r['copy_bw_fraction']:.0f}%") for p in fused]
        if with_flops:
            cells += [cell(p, lambda r: f"{r['tflop_per_s']:.3g}") for p in fused]
        cells += [cell(p, lambda r: f"{_ms(r['share_ms'])} ({100 * r['share_of_main']:.0f}%)"
                       if r["share_ms"] is not None else "-") for p in shared]
        cells.append(" / ".join(cell(p, lambda r: _mib(r["peak_extra_bytes"])) for p in providers))
        body.append(cells)
    return _table(header, body)


def full_table(rows: list[dict]) -> list[str]:
    with_bytes = any(r["bytes_moved"] for r in rows)
    with_flops = any(r["flops"] for r in rows)
    with_launch = any("launch_median_ms" in r for r in rows)
    header = (["case", "shape", "dtype", "provider", "mode", "median ms", "IQR ms", "min-max ms", "reps"]
              + (["GB/s", "% copy BW"] if with_bytes else []) + (["TFLOP/s"] if with_flops else [])
              + ["speed-up vs eager", "/ floor", "peak extra MiB (x tensor)", "vs eager (norm-wise error)",
                 "first call s"] + (["plain-call median ms"] if with_launch else []))
    body = []
    for row in rows:
        head = [row["label"], row["shape_text"], row["dtype"], row["provider"], row["mode"]]
        if not _ok(row):
            body.append(head + [f"error: {row['error']}"] + [""] * (len(header) - len(head) - 1))
            continue
        memory = _mib(row["peak_extra_bytes"])
        if row["peak_extra_tensors"] is not None:
            memory += f" ({row['peak_extra_tensors']:.2f})"
        check = "oracle" if row["provider"] == EAGER else (
            "writes alike" if row["check_error"] is None else f"{row['check_error']:.1e}")
        cells = head + [_ms(row["median_ms"]), f"{_ms(row['q1_ms'])}-{_ms(row['q3_ms'])}",
                        f"{_ms(row['min_ms'])}-{_ms(row['max_ms'])}", str(row["reps"])]
        if with_bytes:
            cells += ([f"{row['gb_per_s']:.1f}", f"{100 * row['copy_bw_fraction']:.0f}%"]
                      if row["bytes_moved"] else ["-", "-"])
        if with_flops:
            cells.append(f"{row['tflop_per_s']:.3g}" if row["flops"] else "-")
        cells += [_x(row["speedup_vs_eager"]), _x(row["ratio_vs_floor"]), memory, check,
                  f"{row['first_call_s']:.2f}"]
        if with_launch:
            cells.append(_ms(row["launch_median_ms"]) if "launch_median_ms" in row else "-")
        body.append(cells)
    return _table(header, body)


def _op_rows(result: dict, op: str) -> list[dict]:
    return [r for r in result["rows"] if r["op"] == op]


def _op_summary(result: dict, op: str, meta: dict, image: Optional[str], heading: str) -> list[str]:
    device = result["machine"]["device"]
    lines = [f"{heading} {meta['title']}", ""]
    for paragraph in [*meta["notes"], _timing_line(meta, device)]:
        lines += [paragraph, ""]
    lines += [f"{MODE_WORDS.get(meta['main_mode'], meta['main_mode']).capitalize()}, against "
              f"{meta['floor']} (the floor):", ""]
    lines += summary_table(_op_rows(result, op), meta) + [""]
    if image:
        lines += [f"![{op}: speed-up and peak memory]({image})", ""]
    return lines


def markdown(result: dict, images: dict[str, str]) -> str:
    """The whole run: metadata, targets, then per op its summary, plot and every measurement."""
    lines = [f"# ofdkern benchmarks: {result['machine']['device_name']}", ""] + metadata_lines(result) + [""]
    if result["targets"]:
        lines += ["## Targets", "", "```"] + target_lines(result["targets"]) + ["```", ""]
    for op, meta in result["ops"].items():
        lines += _op_summary(result, op, meta, images.get(op), "##")
        lines += ["### All measurements", "", *full_table(_op_rows(result, op)), ""]
    return "\n".join(lines)


def readme_block(result: dict, markdown_path: str, images: dict[str, str], readme_dir: str) -> str:
    """The text placed between the README markers: metadata, targets, and per op its summary and plot."""
    def rel(path):
        return os.path.relpath(path, readme_dir).replace(os.sep, "/")

    lines = [f"Latest run ([all measurements]({rel(markdown_path)})):", ""] + metadata_lines(result) + [""]
    if result["targets"]:
        lines += ["```"] + target_lines(result["targets"]) + ["```", ""]
    for op, meta in result["ops"].items():
        lines += _op_summary(result, op, meta, rel(images[op]) if op in images else None, "###")
    return "\n".join(lines).rstrip()


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


INDEX_NAME = "INDEX.md"


def write_index(results_dir: str) -> str:
    """Rewrites results_dir/INDEX.md: one row per run kept there (its JSON), newest first, with the commit,
    machine, versions and date that the run recorded. Returns its path."""
    runs = []
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results_dir, name), encoding="utf-8") as handle:
            result = json.load(handle)
        machine = result["machine"]
        measured = result.get("ops") or {"ofd": None}  # schema 1: the OFD loss alone
        ops = "every op" if len(measured) >= 4 and not result.get("skipped_ops") else "+".join(measured)
        versions = f"torch {machine['torch']}, triton {machine.get('triton') or '-'}, python {machine['python']}"
        runs.append((machine["date"], f"| [{name[:-5]}]({name[:-5]}.md) | {machine['device_name']} "
                     f"({machine['device']}) | {'quick' if result['quick'] else 'full'}, {ops}"
                     f"{'' if result['complete'] else ' (incomplete)'} | {machine['git_commit']} | {versions} | "
                     f"{machine['date'][:10]} |"))
    lines = ["# Benchmark results", "",
             "The latest full run per machine, and the runs the READMEs cite; git history holds the older ones. "
             "Written by `benchmarks/run.py` after each run, which names every run `<device>-<date>-<commit>[-quick][-<ops>]` "
             "(runs before 2026-12-07 lack the commit); `.json`: every measurement, `.md`: the tables, `-<op>.png`: "
             "the plots.", "",
             "| run | machine | mode | commit | versions | date |", "|---|---|---|---|---|---|"]
    lines += [row for _, row in sorted(runs, reverse=True)]
    path = os.path.join(results_dir, INDEX_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path
