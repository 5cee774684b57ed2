"""The ofdkern benchmark suite: every op of bench_ops.OPS (or those of --op) against eager PyTorch, torch.compile
of it, every ofdkern backend and the op's floor, in time and peak memory; and a whole distillation step.

    python benchmarks/run.py [--op ofd,kd] [--quick] [--device cpu|cuda] [--update-readme]

Writes benchmarks/results/<device>-<date>-<commit>[-quick][-<ops>].{json,md} and <stem>-<op>.png per op,
refreshes the index benchmarks/results/INDEX.md, and prints the targets' check; --quick runs go to
benchmarks/results/quick/, which git ignores (the results folder keeps full runs). Methodology:
benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import itertools
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import bench_cases as cases
import bench_measure as measure
import bench_ops
import bench_report as report
import plot

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="all",
                        help=f"comma-separated ops, of {','.join(bench_ops.OPS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes per op and fewer reps: every op in under 3 minutes on 2 CPU cores")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--groups", default=None,
                        help="comma-separated shape groups to keep (e.g. cifar,imagenet; default: all of each op's)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to keep, e.g. ofdkern-cpu,copy-roofline (eager always runs: "
                             "every provider is checked against it; default: all available)")
    parser.add_argument("--compile-dynamic", action="store_true",
                        help="torch.compile with dynamic shapes (default: one static compile per shape, the fastest)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, recorded in the results)")
    parser.add_argument("--out-dir", default=None,
                        help="where the files and their INDEX.md go (default: benchmarks/results, or "
                             "benchmarks/results/quick for --quick, which git ignores)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already in today's result file of this device, mode and ops; run the rest")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no case after this many seconds; the results say which cases did not run")
    parser.add_argument("--update-readme", action="store_true",
                        help=f"put the summary between {report.README_START} and {report.README_END} in --readme "
                             f"(a run of every op only)")
    parser.add_argument("--readme", default=os.path.join(HERE, "README.md"))
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = os.path.join(HERE, "results", *(["quick"] if args.quick else []))
    try:
        args.ops = bench_ops.select(args.op)
    except ValueError as error:
        parser.error(str(error))
    if args.update_readme and len(args.ops) != len(bench_ops.OPS):
        parser.error("--update-readme needs a run of every op (the README block shows them all)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def select_providers(ops: list[cases.OpBench], device: str, names: str | None,
                     compile_dynamic: bool) -> dict[str, list[cases.Provider]]:
    """Per op: its providers on this device, or those named (and eager, which checks them)."""
    available = {op.name: op.providers(device, compile_dynamic) for op in ops}
    if names is None:
        return available
    wanted = set(names.split(","))
    known = {p.name for providers in available.values() for p in providers}
    if wanted - known:
        sys.exit(f"providers {sorted(wanted - known)} are not available on {device} for these ops; "
                 f"available: {sorted(known)}")
    return {op: [p for p in providers if p.name in wanted or p.name == cases.EAGER]
            for op, providers in available.items()}


def select_plan(ops: list[cases.OpBench], device: str, quick: bool, groups: str | None) -> list[cases.Case]:
    """The cases of the run, the ops' plans interleaved (a --time-limit then trims every op, not the last)."""
    plans = [op.plan(device, quick) for op in ops]
    if groups is not None:
        wanted = set(groups.split(","))
        known = {case.group for plan in plans for case in plan}
        if wanted - known:
            sys.exit(f"unknown groups {sorted(wanted - known)} for these ops; choose from {sorted(known)}")
        plans = [[case for case in plan if case.group in wanted] for plan in plans]
    return [case for round_ in itertools.zip_longest(*plans) for case in round_ if case is not None]


def _release_case_state(device: str) -> None:
    """Drop compiled graphs and cached blocks of the finished case before the next one allocates."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _timing_method(op: cases.OpBench, device: str) -> str:
    if device != "cuda":
        return "perf_counter"
    return "cuda-graph" if op.cuda_graph else "cuda-events"


def _row(case: cases.Case, op: cases.OpBench, provider: str, mode: str) -> dict:
    return {"op": case.op, "group": case.group, "label": case.label, "shape": list(case.shape),
            "params": dict(case.params), "shape_text": op.shape_text(case), "size": op.size(case),
            "numel": case.numel, "dtype": case.dtype, "provider": provider, "mode": mode,
            "acceptance": case.acceptance, "error": None, "check_error": None, "timing": None,
            "bytes_moved": op.bytes_moved(case, mode), "flops": op.flops(case, mode),
            "peak_extra_bytes": None, "peak_extra_tensors": None}


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


@dataclasses.dataclass
class Session:
    """What every measurement of a run shares."""
    device: str
    quick: bool
    copy_gb_per_s: float
    measure_memory: bool
    progress: tqdm


def measure_case(case: cases.Case, op: cases.OpBench, providers: list[cases.Provider], session: Session) -> list[dict]:
    try:
        inputs = op.make_inputs(case, session.device)
    except Exception as error:  # e.g. out of memory: every provider of the case gets the error row
        session.progress.write(f"error: inputs of {case.op} {case.label} {case.dtype}: {_error_text(error)}")
        rows = [dict(_row(case, op, p.name, mode), error=f"inputs: {_error_text(error)}")
                for p in providers for mode in p.modes]
        session.progress.update(len(rows))
        _release_case_state(session.device)
        return rows
    expected: dict[str, object] = {}  # per mode, what every other provider is checked against (oracle_output)
    rows = []
    for provider in providers:
        with provider.context():
            rows += _measure_provider(case, op, inputs, provider, expected, session)
    del inputs, expected
    _release_case_state(session.device)
    return rows


def _measure_provider(case: cases.Case, op: cases.OpBench, inputs, provider: cases.Provider, expected: dict,
                      session: Session) -> list[dict]:
    device, budget = session.device, op.budget(session.device, session.quick)
    rows = []
    try:
        steps, build_error = provider.build(inputs), None
    except Exception as error:  # a backend that fails to build must not stop the run
        steps, build_error = {}, error
    for mode in provider.modes:
        session.progress.set_postfix_str(f"{case.op} {case.label} {case.dtype} {provider.name} {mode}", refresh=True)
        row = _row(case, op, provider.name, mode)
        try:
            if build_error is not None:
                raise build_error
            output, first_call_s = measure.first_call(steps[mode], device)
            if provider.check is None:  # eager: the oracle's source; its own error is kept for half precision
                expected[mode], row["check_error"] = cases.oracle_output(op, provider, mode, inputs, output, case)
            else:
                row["check_error"] = provider.check(output, expected.get(mode), op.tolerance[case.dtype])
            del output
            timing = measure.time_step(steps[mode], device, budget, first_call_s)
            row["timing"] = _timing_method(op, device)
            if row["timing"] == "cuda-graph":
                # Headline: device time (CUDA graph replay). Kept beside it: the time of a plain call,
                # which on a GPU faster than its host is mostly Python, dispatch and autograd.
                launch = timing.summary()
                timing.times_s = measure.time_step_cuda_graph(steps[mode], launch["reps"])
                row["launch_median_ms"] = launch["median_ms"]
            row.update(timing.summary())
            seconds = row["median_ms"] * 1e-3
            if row["bytes_moved"] is not None:
                row["gb_per_s"] = row["bytes_moved"] / seconds / 1e9
                row["copy_bw_fraction"] = row["gb_per_s"] / session.copy_gb_per_s
            if row["flops"] is not None:
                row["tflop_per_s"] = row["flops"] / seconds / 1e12
            if mode == op.main_mode and session.measure_memory:
                row["peak_extra_bytes"] = measure.peak_extra_bytes(steps[mode], device, budget.memory_reps)
                unit = op.unit_bytes(case)
                row["peak_extra_tensors"] = row["peak_extra_bytes"] / unit if unit else None
        except Exception as error:  # recorded in the results, the run goes on
            row["error"] = _error_text(error)
            session.progress.write(f"error: {case.op} {provider.name} {mode} {case.label} {case.dtype}: {row['error']}")
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        session.progress.update()
    return rows


def output_stem(info: dict, quick: bool, ops: list[cases.OpBench]) -> str:
    """The one naming rule of result files: <device>-<date>-<commit>[-quick][-<ops>] (commit as git describes
    the checkout, "+uncommitted" when it has changes; ops joined by "+" when not every op ran)."""
    subset = "" if len(ops) == len(bench_ops.OPS) else "-" + "+".join(op.name for op in ops)
    return (f"{measure.device_slug(info)}-{datetime.date.today().isoformat()}-{info['git_commit']}"
            f"{'-quick' if quick else ''}{subset}")


def _write_json(path: str, result: dict) -> None:
    """Written after every case (complete: false until the end), so an interrupted run can --resume."""
    partial_path = path + ".partial"
    with open(partial_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    os.replace(partial_path, path)


def _resumed(json_path: str, device: str, quick: bool) -> tuple[list[dict], dict | None, dict]:
    """Rows, copy bandwidth and per-op seconds of an earlier run of the same machine, date, mode and ops."""
    if not os.path.exists(json_path):
        return [], None, {}
    with open(json_path, encoding="utf-8") as handle:
        earlier = json.load(handle)
    if earlier.get("schema") != report.SCHEMA or earlier["machine"]["device"] != device or earlier["quick"] != quick:
        sys.exit(f"--resume: {json_path} is from another schema, device or mode")
    return earlier["rows"], earlier["copy_bandwidth"], earlier.get("op_wall_s", {})


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = measure.machine_info(device)
    skipped = {op.name: why for op in args.ops if (why := op.unavailable(device))}
    for name, why in skipped.items():
        print(f"{name} skipped: {why}", file=sys.stderr)
    ops = [op for op in args.ops if op.name not in skipped]
    by_name = {op.name: op for op in ops}
    providers = select_providers(ops, device, args.providers, args.compile_dynamic)
    memory_problem = None if device == "cuda" else measure.cpu_memory_method()
    if memory_problem:
        print(f"peak memory is not measured: {memory_problem}", file=sys.stderr)

    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, output_stem(info, args.quick, args.ops))
    json_path, md_path = stem + ".json", stem + ".md"
    rows, copy, op_wall_s = _resumed(json_path, device, args.quick) if args.resume else ([], None, {})
    done = {report.case_key(row) for row in rows}
    plan = [case for case in select_plan(ops, device, args.quick, args.groups) if case.key not in done]
    print(f"ofdkern benchmark on {info['device_name']} ({device}): {len(plan)} cases to run"
          f"{f' ({len(done)} resumed)' if done else ''}", file=sys.stderr)
    for op in ops:
        count = sum(case.op == op.name for case in plan)
        print(f"  {op.name}: {count} cases, providers {[p.name for p in providers[op.name]]}", file=sys.stderr)
    if copy is None:
        copy = measure.copy_bandwidth(device, args.quick)
    print(f"copy bandwidth: {copy['gb_per_s']:.1f} GB/s", file=sys.stderr)

    result = {
        "schema": report.SCHEMA,
        "complete": False,
        "machine": info,
        "quick": args.quick,
        "compile_dynamic": args.compile_dynamic,
        "ops": {op.name: dict(op.metadata(), budget=dataclasses.asdict(op.budget(device, args.quick)))
                for op in ops},
        "skipped_ops": skipped,
        "memory_method": None if memory_problem else measure.MEMORY_METHODS[device],
        "copy_bandwidth": copy,
        "wall_s": None,
        "op_wall_s": collections.Counter(op_wall_s),
        "not_run": [],
        "rows": rows,
        "targets": [],
    }
    session = Session(device, args.quick, copy["gb_per_s"], memory_problem is None,
                      tqdm(total=sum(len(p.modes) for case in plan for p in providers[case.op]),
                           unit="measurement", dynamic_ncols=True))
    with session.progress:
        for case in plan:
            if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                result["not_run"].append({"op": case.op, "label": case.label, "dtype": case.dtype})
                continue
            case_started = time.perf_counter()
            rows += measure_case(case, by_name[case.op], providers[case.op], session)
            result["op_wall_s"][case.op] += time.perf_counter() - case_started
            _write_json(json_path, result)
    if result["not_run"]:
        print(f"--time-limit {args.time_limit:g} s: {len(result['not_run'])} cases did not run", file=sys.stderr)

    report.add_derived(rows, result["ops"])
    result.update(complete=not result["not_run"], wall_s=time.perf_counter() - started,
                  targets=report.check_targets(rows, ops, device))
    _write_json(json_path, result)
    images = plot.plot_all(result, stem)
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(report.markdown(result, {op: os.path.basename(path) for op, path in images.items()}))
    report.write_index(args.out_dir)
    print(f"\nwrote {json_path}\n      {md_path}")
    for path in images.values():
        print(f"      {path}")
    print(f"  ({result['wall_s']:.0f} s; per op: "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result["op_wall_s"].items()) + ")")

    lines = report.target_lines(result["targets"])
    if lines:
        print("\ntargets (fused providers):")
        for line in lines:
            print("  " + line)

    if args.update_readme:
        readme_dir = os.path.dirname(os.path.abspath(args.readme))
        problem = report.update_readme(args.readme, report.readme_block(result, md_path, images, readme_dir))
        print(f"README not updated: {problem}" if problem else f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
