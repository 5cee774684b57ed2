"""Compiles every Triton kernel of ofdkern for real GPUs, on a machine without one.

The tests run the Triton kernels under Triton's interpreter, which executes them as numpy code: it accepts what
the GPU compiler rejects (a global that is not a ``tl.constexpr``, a ``tl.dot`` of two dtypes) and knows no grid
limits. This script runs each Triton entry point on CPU tensors with the interpreter off, so the entry points pick
the block sizes and precisions of a GPU, and replaces their launches: each launch is specialized as Triton's
JIT would specialize it and compiled to a cubin for ``TARGETS``, and its grid is checked against CUDA's limits.
Nothing runs, so the outputs hold garbage; the entry points never read them on the host.

Run by test_triton_gpu_compile.py in a process of its own (the interpreter is on in the tests' process):
    python python_tests/triton_gpu_compile.py [sm_90,sm_80]   # a JSON report; exit status 1 on any failure

The report also lists the specializations whose registers spill (ptxas's allotment, read with cuobjdump): a
performance lead for a GPU session, not a failure.

It relies on two internals of Triton's JIT (``create_function_from_signature``, ``JITFunction._pack_args``),
as of Triton 3.8, to specialize a launch exactly as ``kernel[grid](...)`` would.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_gpu_compile.py needs the real Triton compiler: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ofdkern._dtypes import accumulation_dtype  # noqa: E402
from ofdkern._layout import as_positions  # noqa: E402
from ofdkern.kernels import (  # noqa: E402
    align_tiled_triton, align_triton, attention_transfer_triton, kd_triton, ofd_triton, scale_triton)

# Reads a cubin's registers and stack (spills) per thread; shipped with Triton's NVIDIA backend.
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# H100/H200 (sm_90) and A100 (sm_80), with their per-block shared-memory limits (opt-in maximum).
TARGETS = {"sm_90": (GPUTarget("cuda", 90, 32), 232448), "sm_80": (GPUTarget("cuda", 80, 32), 166912)}
GRID_LIMITS = (2**31 - 1, 65535, 65535)
KERNEL_MODULES = (align_tiled_triton, align_triton, attention_transfer_triton, kd_triton, ofd_triton,
                  scale_triton)


class Compiler:
    """Stands in for ``triton_helpers.launch``: compiles each distinct specialization once per target."""

    def __init__(self, targets: dict):
        self.targets = targets
        self.compiled: dict[tuple, dict] = {}
        self.failures: list[str] = []
        self.context = ""

    def launch(self, kernel, grid, *args, device: torch.device, **meta) -> None:
        name = kernel.fn.__name__
        if len(grid) > 3 or any(not 0 <= size <= limit for size, limit in zip(grid, GRID_LIMITS)):
            self.failures.append(f"{self.context}: {name} grid {grid} exceeds CUDA's limits {GRID_LIMITS}")
        if device.type == "meta":
            return  # a shape too large to hold here: its grid only (the specialization is a small shape's)
        for target_name, (target, shared_limit) in self.targets.items():
            backend = make_backend(target)
            bind = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound_args, specialization, options = bind(*args, **meta)
            options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound_args, specialization,
                                                                      options)
            key = (target_name, name, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            if key in self.compiled:
                continue
            try:
                binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
            except Exception as error:  # noqa: BLE001 - every compiler error is a finding
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                self.failures.append(f"{self.context}: {name} on {target_name}: {type(error).__name__}: "
                                     f"{first_line}")
                self.compiled[key] = {"kernel": name, "target": target_name, "error": True}
                continue
            shared = binary.metadata.shared
            if shared > shared_limit:
                self.failures.append(f"{self.context}: {name} on {target_name} needs {shared} bytes of shared "
                                     f"memory, over the {shared_limit} a block may have")
            self.compiled[key] = {"kernel": name, "target": target_name, "shared": shared,
                                  "num_warps": options.num_warps, "num_stages": options.num_stages,
                                  "context": self.context, **_resource_usage(binary.asm["cubin"])}


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes (spilled registers) per thread, as ptxas allotted them; empty without cuobjdump."""
    if not os.path.exists(CUOBJDUMP):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([CUOBJDUMP, "--dump-resource-usage", file.name], capture_output=True,
                                 text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", listing)
    return {"registers": int(found[1]), "stack": int(found[2])} if found else {}


def _randn(shape, dtype, channels_last=False, device="cpu"):
    x = torch.randn(shape, device=device).to(dtype) if device == "cpu" else torch.empty(shape, dtype=dtype,
                                                                                          device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _ofd_and_scale():
    for dtype in DTYPES:
        acc = accumulation_dtype(dtype)
        for channels_last in (False, True):
            s, t = _randn((2, 8, 5, 6), dtype, channels_last), _randn((2, 8, 5, 6), dtype, channels_last)
            margin = -torch.rand(8, dtype=acc)
            for elementwise in (False, True):
                for grads in ((True, True, True), (False, False, False)):
                    yield f"ofd {dtype} channels_last={channels_last} elementwise={elementwise} grads={grads}", (
                        lambda s=s, t=t, m=margin, e=elementwise, g=grads: ofd_triton.ofd_fused_triton(s, t, m, e, *g))
        yield f"scale {dtype}", lambda dtype=dtype, acc=acc: scale_triton.scale_triton_(
            _randn((1000,), dtype), torch.tensor(0.5, dtype=acc))


def _align():
    shapes = {"narrow": (5, 7, 6), "wide": (96, 160, 200)}
    for width, (cs, hidden, ct) in shapes.items():
        for dtype in DTYPES:
            # Features in the weights' dtype, and (AMP) half-precision features with float32 weights.
            feature_dtypes = (dtype, torch.bfloat16) if dtype == torch.float32 else (dtype,)
            acc = accumulation_dtype(dtype)
            for feature_dtype in feature_dtypes:
                for channels_last in (False, True):
                    for with_margin in (False, True):
                        for grads in ((True, True, True), (False, False, False)):
                            s = _randn((2, cs, 4, 5), feature_dtype, channels_last)
                            t = _randn((2, ct, 4, 5), feature_dtype, channels_last)
                            weights = [_randn(shape, dtype) for shape in ((hidden, cs), (hidden,), (ct, hidden), (ct,))]
                            margin = -torch.rand(ct, dtype=acc) if with_margin else None
                            yield (f"align {width} weights {dtype} features {feature_dtype} channels_last="
                                   f"{channels_last} margin={with_margin} grads={grads}"), (
                                lambda s=s, t=t, w=weights, m=margin, g=grads: align_triton.align_fused_triton(
                                    s, t, *w, m, *g))


def _attention():
    for dtype in DTYPES:
        for channels_last in (False, True):
            for p in (2.0, 3.0, 2.5):
                s = as_positions(_randn((2, 4, 6, 7), dtype, channels_last))
                t = as_positions(_randn((2, 6, 6, 7), dtype, channels_last))
                yield f"attention {dtype} channels_last={channels_last} p={p}", (
                    lambda s=s, t=t, p=p: attention_transfer_triton.attention_transfer_forward(s, t, p, 84))
                yield f"attention backward {dtype} channels_last={channels_last} p={p}", (
                    lambda s=s, p=p: attention_transfer_triton.attention_map_backward(
                        s, torch.randn(2, 42, dtype=torch.float64), p))
    # Grids of large maps (meta tensors: launches are only checked, not compiled).
    for shape, channels_last in (((2, 64, 1024, 1024), True), ((1, 8, 4096, 4096), False),
                                 ((2, 16, 64, 128, 128), True)):
        big = as_positions(_randn(shape, torch.bfloat16, channels_last, device="meta"))
        yield f"attention grid {shape} channels_last={channels_last}", (
            lambda big=big: attention_transfer_triton.attention_transfer_forward(big, big, 2.0, 1))
        yield f"attention backward grid {shape} channels_last={channels_last}", (
            lambda big=big: attention_transfer_triton.attention_map_backward(
                big, torch.empty(big.shape[0], big.shape[2], dtype=torch.float64, device="meta"), 2.0))


def _kd():
    for dtype in DTYPES:
        for classes in (100, 10000):
            for grads in ((True, True), (True, False), (False, False)):
                s, t = _randn((3, classes), dtype), _randn((3, classes), dtype)
                yield f"kd {dtype} classes={classes} grads={grads}", (
                    lambda s=s, t=t, g=grads: kd_triton.kd_fused(s, t, 4.0, *g))
    big = torch.empty(4096, 128256, dtype=torch.bfloat16, device="meta")
    yield "kd grid 4096x128256", lambda: kd_triton.kd_fused(big, big, 4.0, True, True)
    # cwd_loss's rows: the (N * C, positions) maps of an FPN level (4 chunks per row, 512 rows).
    maps = torch.empty(2 * 256, 100 * 152, dtype=torch.bfloat16, device="meta")
    yield "cwd rows 512x15200", lambda: kd_triton.kd_fused(maps, maps, 1.0, True, False)


def run(targets: dict) -> dict:
    compiler = Compiler(targets)
    for module in KERNEL_MODULES:
        module.launch = compiler.launch
    calls = 0
    for precision in ("ieee", "tf32"):  # float32 dots
        torch.backends.cuda.matmul.fp32_precision = precision
        for context, call in (*_ofd_and_scale(), *_align(), *_attention(), *_kd()):
            compiler.context = f"{context} (matmul precision {precision})"
            calls += 1
            try:
                call()
            except Exception as error:  # noqa: BLE001 - an entry point that fails before launching is a finding
                compiler.failures.append(f"{compiler.context}: {type(error).__name__}: {error}")
    kernels = sorted({entry["kernel"] for entry in compiler.compiled.values()})
    # Performance, not failures: specializations whose registers spill to the stack (worst first).
    spills = sorted((entry for entry in compiler.compiled.values() if entry.get("stack")),
                    key=lambda entry: -entry["stack"])
    return {"calls": calls, "specializations": len(compiler.compiled), "kernels": kernels,
            "failures": compiler.failures,
            "spills": [f"{e['kernel']} on {e['target']}: {e['registers']} registers, {e['stack']} stack bytes per "
                       f"thread, {e['num_warps']} warps ({e['context']})" for e in spills]}


if __name__ == "__main__":
    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else list(TARGETS)
    report = run({name: TARGETS[name] for name in chosen})
    print(json.dumps(report, indent=1))
    sys.exit(1 if report["failures"] else 0)
