"""Benchmark of ofdkern.ofd_loss against eager PyTorch, torch.compile of it and a copy roofline.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--update-readme]

Writes benchmarks/results/<device>-<date>[-quick].{json,md,png} and prints the acceptance check.
Methodology: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import bench_cases as cases
import bench_measure as measure
import bench_report as report
import plot

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
GROUPS = ("cifar", "imagenet", "sweep")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes (the acceptance case included) and fewer reps: under 2 minutes on 2 cores")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"comma-separated subset of {','.join(GROUPS)} (default: all)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of providers, e.g. eager,ofdkern-cpu (default: all available)")
    parser.add_argument("--compile-dynamic", action="store_true",
                        help="torch.compile with dynamic shapes (default: one static compile per shape, the fastest)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, recorded in the results)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already in today's result file of this device and mode, run the rest")
    parser.add_argument("--update-readme", action="store_true",
                        help=f"put the summary between {report.README_START} and {report.README_END} in --readme")
    parser.add_argument("--readme", default=os.path.join(REPO_ROOT, "README.md"))
    args = parser.parse_args(argv)
    args.groups = tuple(g for g in args.groups.split(",") if g)
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def select_providers(device: str, names: str | None, compile_dynamic: bool) -> list[cases.Provider]:
    available = cases.providers(device, compile_dynamic)
    if names is None:
        return available
    wanted = names.split(",")
    known = {p.name for p in available}
    missing = [n for n in wanted if n not in known]
    if missing:
        sys.exit(f"providers {missing} are not available on {device}; available: {sorted(known)}")
    return [p for p in available if p.name in wanted]


def _release_case_state(device: str) -> None:
    """Drop compiled graphs and cached blocks of the finished case before the next one allocates."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure_case(case: cases.Case, device: str, providers: list[cases.Provider], budget: measure.Budget,
                 copy_gb_per_s: float, measure_memory: bool, progress: tqdm) -> list[dict]:
    inputs = cases.make_inputs(case, device)
    rows = []
    for provider in providers:
        with provider.context():
            rows += _measure_provider(case, inputs, provider, device, budget, copy_gb_per_s, measure_memory,
                                      progress)
    del inputs
    _release_case_state(device)
    return rows


def _measure_provider(case: cases.Case, inputs: cases.Inputs, provider: cases.Provider, device: str,
                      budget: measure.Budget, copy_gb_per_s: float, measure_memory: bool,
                      progress: tqdm) -> list[dict]:
    feature_bytes = case.numel * case.element_size
    rows = []
    try:
        steps, build_error = provider.build(inputs), None
    except Exception as error:  # a backend that fails to build must not stop the run
        steps, build_error = {}, error
    for mode in provider.modes:
        progress.set_postfix_str(f"{case.label} {case.dtype} {provider.name} {mode}", refresh=True)
        row = {"group": case.group, "label": case.label, "shape": list(case.shape), "numel": case.numel,
               "dtype": case.dtype, "provider": provider.name, "mode": mode,
               "acceptance": case.is_acceptance, "error": None,
               "bytes_moved": cases.bytes_moved(case, mode), "peak_extra_bytes": None,
               "peak_extra_tensors": None}
        try:
            if build_error is not None:
                raise build_error
            timing = measure.time_step(steps[mode], device, budget)
            if device == "cuda":
                # Headline: device time (CUDA graph replay). Kept beside it: the time of a plain call,
                # which on a GPU faster than its host is mostly Python, dispatch and autograd.
                launch = timing.summary()
                timing.times_s = measure.time_step_cuda_graph(steps[mode], launch["reps"])
                row["launch_median_ms"] = launch["median_ms"]
            row.update(timing.summary())
            row["gb_per_s"] = row["bytes_moved"] / (row["median_ms"] * 1e-3) / 1e9
            row["copy_bw_fraction"] = row["gb_per_s"] / copy_gb_per_s
            if mode == cases.FORWARD_BACKWARD and measure_memory:
                row["peak_extra_bytes"] = measure.peak_extra_bytes(steps[mode], device)
                row["peak_extra_tensors"] = row["peak_extra_bytes"] / feature_bytes
        except Exception as error:  # recorded in the results, the run goes on
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            progress.write(f"error: {provider.name} {mode} {case.label} {case.dtype}: {row['error']}")
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        progress.update()
    return rows


def output_stem(info: dict, quick: bool) -> str:
    return f"{measure.device_slug(info)}-{datetime.date.today().isoformat()}{'-quick' if quick else ''}"


def _write_json(path: str, result: dict) -> None:
    """Written after every case (complete: false until the end), so an interrupted run can --resume."""
    partial_path = path + ".partial"
    with open(partial_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    os.replace(partial_path, path)


def _resumed(json_path: str, device: str, quick: bool) -> tuple[list[dict], dict | None]:
    """Rows and copy bandwidth of an earlier run of the same machine, date and mode, if any."""
    if not os.path.exists(json_path):
        return [], None
    with open(json_path, encoding="utf-8") as handle:
        earlier = json.load(handle)
    if earlier["machine"]["device"] != device or earlier["quick"] != quick:
        sys.exit(f"--resume: {json_path} is from another device or mode")
    return earlier["rows"], earlier["copy_bandwidth"]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = measure.machine_info(device)
    providers = select_providers(device, args.providers, args.compile_dynamic)
    if device == "cuda":
        budget = measure.GPU_QUICK_BUDGET if args.quick else measure.GPU_FULL_BUDGET
        memory_problem = None
    else:
        budget = measure.QUICK_BUDGET if args.quick else measure.FULL_BUDGET
        memory_problem = measure.cpu_memory_method()
    if memory_problem:
        print(f"peak memory is not measured: {memory_problem}", file=sys.stderr)

    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, output_stem(info, args.quick))
    json_path, md_path, png_path = stem + ".json", stem + ".md", stem + ".png"
    rows, copy = _resumed(json_path, device, args.quick) if args.resume else ([], None)
    done = {report.case_key(row) for row in rows}
    plan = [case for case in cases.plan(device, args.quick, args.groups)
            if (case.group, case.label, case.shape, case.dtype) not in done]
    print(f"ofdkern benchmark on {info['device_name']} ({device}): {len(plan)} cases to run"
          f"{f' ({len(done)} resumed)' if done else ''}, providers {[p.name for p in providers]}", file=sys.stderr)
    if copy is None:
        copy = measure.copy_bandwidth(device, args.quick)
    print(f"copy bandwidth: {copy['gb_per_s']:.1f} GB/s", file=sys.stderr)

    result = {
        "schema": 1,
        "complete": False,
        "machine": info,
        "quick": args.quick,
        "compile_dynamic": args.compile_dynamic,
        "budget": dataclasses.asdict(budget),
        "memory_method": None if memory_problem else measure.MEMORY_METHODS[device],
        "copy_bandwidth": copy,
        "wall_s": None,
        "rows": rows,
        "acceptance": [],
    }
    total = sum(len(p.modes) for p in providers) * len(plan)
    with tqdm(total=total, unit="measurement", dynamic_ncols=True) as progress:
        for case in plan:
            rows += measure_case(case, device, providers, budget, copy["gb_per_s"], memory_problem is None, progress)
            _write_json(json_path, result)

    report.add_speedups(rows)
    result.update(complete=True, wall_s=time.perf_counter() - started, acceptance=report.acceptance(rows, device))
    _write_json(json_path, result)
    plot.plot(result, png_path)
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(report.markdown(result, os.path.basename(png_path)))
    print(f"\nwrote {json_path}\n      {md_path}\n      {png_path}  ({result['wall_s']:.0f} s)")

    print("\nacceptance case (64x512x28x28 fp32, forward + backward):")
    for line in report.acceptance_lines(result["acceptance"]) or ["not measured in this run"]:
        print("  " + line)

    if args.update_readme:
        readme_dir = os.path.dirname(os.path.abspath(args.readme))
        problem = report.update_readme(args.readme, report.readme_block(result, md_path, png_path, readme_dir))
        print(f"README not updated: {problem}" if problem else f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
