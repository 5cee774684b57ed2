"""How the benchmarks measure, whatever the op: wall time, peak extra memory, the machine's copy bandwidth and
what the machine is. Methodology in benchmarks/README.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import ofdkern

# Bytes zeroed between timed GPU reps so no rep finds its inputs in L2 (H100: 50 MB, H200: 60 MB).
_L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Budget:
    """Reps per measurement: enough to fill target_s, within [min_reps, max_reps]; the CPU peak memory is the
    minimum over memory_reps calls."""
    warmup: int
    min_reps: int
    max_reps: int
    target_s: float
    memory_reps: int = 3


QUICK_BUDGET = Budget(warmup=1, min_reps=3, max_reps=10, target_s=0.15, memory_reps=1)
FULL_BUDGET = Budget(warmup=1, min_reps=3, max_reps=50, target_s=1.0)
GPU_QUICK_BUDGET = Budget(warmup=3, min_reps=10, max_reps=100, target_s=0.1)
GPU_FULL_BUDGET = Budget(warmup=3, min_reps=20, max_reps=200, target_s=0.2)


def default_budget(device: str, quick: bool) -> Budget:
    if device == "cuda":
        return GPU_QUICK_BUDGET if quick else GPU_FULL_BUDGET
    return QUICK_BUDGET if quick else FULL_BUDGET


@dataclass
class Timing:
    first_call_s: float  # the first call: torch.compile compiles here
    times_s: list[float]

    def summary(self) -> dict:
        times = sorted(self.times_s)
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        ms = 1e3
        return {"median_ms": statistics.median(times) * ms, "q1_ms": q1 * ms, "q3_ms": q3 * ms,
                "min_ms": times[0] * ms, "max_ms": times[-1] * ms, "reps": len(times),
                "first_call_s": self.first_call_s}


def _reps(estimate_s: float, budget: Budget) -> int:
    wanted = math.ceil(budget.target_s / max(estimate_s, 1e-9))
    return max(budget.min_reps, min(budget.max_reps, wanted))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def first_call(step: Callable[[], object], device: str) -> tuple[object, float]:
    """The step's first call (torch.compile compiles here): its output, to check, and its duration."""
    start = time.perf_counter()
    output = step()
    _synchronize(device)
    return output, time.perf_counter() - start


def time_step(step: Callable[[], object], device: str, budget: Budget, first_call_s: float) -> Timing:
    """After the step's first call (``first_call``): warm up, then time each rep: perf_counter on CPU, CUDA
    events around the call on GPU with L2 flushed before each rep. Outputs are released outside the timed
    region and the garbage collector is paused while timing."""
    estimate_s = first_call_s
    for _ in range(budget.warmup):
        start = time.perf_counter()
        step()
        _synchronize(device)
        estimate_s = time.perf_counter() - start
    reps = _reps(estimate_s, budget)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = _time_cuda(step, reps) if device == "cuda" else _time_cpu(step, reps)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(first_call_s, times)


def _time_cpu(step, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        out = step()
        times.append((time.perf_counter_ns() - start) * 1e-9)
        del out
    return times


def _time_cuda(step, reps: int) -> list[float]:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e-3 for start, end in zip(starts, ends)]


def time_step_cuda_graph(step: Callable[[], object], reps: int) -> list[float]:
    """Device time of ``step`` without its host work: the step (already warmed up by ``time_step``) is
    captured once in a CUDA graph and the graph is replayed ``reps`` times, L2 flushed before each replay,
    CUDA events around each. Python, dispatch and the autograd engine run once, at capture; what is left is
    the step's kernels back to back, which is what a training step whose host work runs ahead of the GPU
    pays. Raises if the step cannot be captured (a host sync, a CPU tensor)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # one call on the capture stream first: autograd keeps per-stream state
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    graph.replay()
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del captured, graph
    return [start.elapsed_time(end) * 1e-3 for start, end in zip(starts, ends)]


# ---- peak extra memory -------------------------------------------------------------------------------

def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def _proc_status_bytes(*keys: str) -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values


def cpu_memory_method() -> Optional[str]:
    """Why the CPU peak-memory measurement is unavailable here, or None when it works."""
    if not os.path.exists("/proc/self/clear_refs"):
        return "needs Linux /proc/self/clear_refs"
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return "needs glibc malloc_trim"
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        return f"cannot reset the peak RSS ({error})"
    return None


def _peak_extra_cpu(step, reps: int) -> int:
    """Peak resident-set growth over one call: malloc_trim(0) hands every free heap page back to the
    kernel and ofdkern's CPU buffer cache is emptied (so reusing freed memory must fault pages in again
    and shows up), writing 5 to
    /proc/self/clear_refs resets the high-water mark VmHWM to the current RSS, and the call's extra
    memory is VmHWM after it minus VmRSS before it. Fragmentation can only add to it, so the minimum
    over reps is reported."""
    extras = []
    for _ in range(reps):
        gc.collect()
        _LIBC.malloc_trim(0)
        ofdkern.empty_cpu_buffer_cache()  # its blocks are free memory too: the call must fault them in again
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _proc_status_bytes("VmRSS")["VmRSS"]
        out = step()
        extras.append(_proc_status_bytes("VmHWM")["VmHWM"] - before)
        del out
    return min(extras)


def _peak_extra_cuda(step) -> int:
    """Caching-allocator peak over one call minus what was allocated before it (the inputs)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra


MEMORY_METHODS = {
    "cpu": "VmHWM after the call minus VmRSS before it, after malloc_trim(0), ofdkern.empty_cpu_buffer_cache() and "
           "echo 5 > /proc/self/clear_refs; minimum over the budget's memory_reps calls",
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before",
}


def peak_extra_bytes(step, device: str, reps: int) -> int:
    """Peak memory one call needs beyond its inputs, its returned output included (CPU: the minimum over
    ``reps`` calls)."""
    return _peak_extra_cuda(step) if device == "cuda" else _peak_extra_cpu(step, reps)


# ---- copy bandwidth ----------------------------------------------------------------------------------

def copy_bandwidth(device: str, quick: bool) -> dict:
    """The machine's achievable memory bandwidth: dst.copy_(src) on float32 buffers far beyond the last
    level cache, counting bytes read + written."""
    nbytes = (128 if quick else 256) * 2**20 if device == "cpu" else 2 * 2**30
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    budget = Budget(warmup=2, min_reps=5 if quick else 10, max_reps=20 if quick else 50, target_s=0.3)

    def copy():
        return dst.copy_(src)

    _, first_call_s = first_call(copy, device)
    summary = time_step(copy, device, budget, first_call_s).summary()
    moved = 2 * nbytes
    return {"bytes_per_copy": moved, "median_ms": summary["median_ms"], "reps": summary["reps"],
            "gb_per_s": moved / (summary["median_ms"] * 1e-3) / 1e9,
            "best_gb_per_s": moved / (summary["min_ms"] * 1e-3) / 1e9}


# ---- the machine --------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
        commit = result.stdout.strip()
        # A run from a tree with uncommitted changes measured code that no commit holds: say so.
        return (commit + ("+uncommitted" if changed.stdout.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def machine_info(device: str) -> dict:
    import ofdkern

    cpu = {"model": _cpu_model(), "logical_cores": os.cpu_count(),
           "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu["model"],
        "cpu": cpu,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "ofdkern": ofdkern.__version__,
        "ofdkern_file": os.path.dirname(ofdkern.__file__),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "total_memory_bytes": props.total_memory,
                       "multiprocessors": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}"}
    return info


def device_slug(info: dict) -> str:
    """e.g. cpu-amd-epyc-2t, cuda-nvidia-h100-80gb-hbm3."""
    name = re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-")
    if info["device"] == "cpu":
        return f"cpu-{name}-{info['cpu']['torch_threads']}t"
    return f"cuda-{name}"
