"""ofdkern's CUDA kernels (csrc/*.cu) built for the CPU and run on CPU tensors, under cuda_on_cpu.h's emulation
of CUDA: the kernels' logic runs as written, no GPU needed (see that header for what it does not model).

``load()`` rewrites each .cu (and .cuh) file into C++ under the build directory:
- ``kernel<<<grid, block, shared, stream>>>(args)`` -> ``::emu::launch(::emu::config(grid, block, shared,
  stream), [&] { kernel(args); })``;
- the ``#include <c10/cuda/...>`` lines are dropped (cuda_on_cpu.h stands in for them);
- ``TORCH_LIBRARY_IMPL(ofdkern, CUDA, m)`` -> ``TORCH_LIBRARY_IMPL(ofdkern_cuda_on_cpu, CPU, m)``.
It defines the ops of the namespace ``ofdkern_cuda_on_cpu`` with the schemas of their ``ofdkern`` twins, then
builds and loads the library (under ~/.cache/ofdkern/cuda_on_cpu, rebuilt when the sources change). The
C++ namespace ``ofdkern`` is renamed, so nothing clashes with ofdkern._C in the same process.

ATen's CUDA-only ``mm.dtype`` (half-precision operands, float32 product), which the channel-alignment pipeline
calls, gets a CPU kernel in this process: the product of the operands in the output dtype.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch
from torch.utils import cpp_extension

NAMESPACE = "ofdkern_cuda_on_cpu"
HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"
EMULATION = HERE / "cuda_on_cpu.h"
_C10_CUDA_INCLUDE = re.compile(r"^#include <c10/cuda/[^>]+>\n", re.MULTILINE)
_IMPL = "TORCH_LIBRARY_IMPL(ofdkern, CUDA, m)"


def _closing_parenthesis(text: str, start: int) -> int:
    """The index of the parenthesis that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses from offset {start}")


def _kernel_start(text: str, launch: int) -> int:
    """Where the kernel expression before ``<<<`` at ``launch`` begins: a (qualified) name with an optional
    template argument list, which may hold nested template lists and parentheses (within which < and > are
    comparisons)."""
    i = launch - 1
    while text[i].isspace():
        i -= 1
    if text[i] == ">":
        angles = parentheses = 0
        while True:
            char = text[i]
            if char == ")":
                parentheses += 1
            elif char == "(":
                parentheses -= 1
            elif parentheses == 0 and char == ">":
                angles += 1
            elif parentheses == 0 and char == "<":
                angles -= 1
                if angles == 0:
                    break
            i -= 1
        i -= 1
    while i >= 0 and (text[i].isalnum() or text[i] in "_:"):
        i -= 1
    return i + 1


def rewrite_launches(text: str) -> str:
    """Every ``kernel<<<config>>>(args)`` of ``text`` as an ``::emu::launch`` call."""
    while (launch := text.find("<<<")) >= 0:
        start = _kernel_start(text, launch)
        config_end = text.index(">>>", launch)
        args_open = config_end + 3
        while text[args_open].isspace():
            args_open += 1
        if text[args_open] != "(":
            raise ValueError(f"no argument list after the launch at offset {launch}")
        args_close = _closing_parenthesis(text, args_open)
        kernel = text[start:launch].strip()
        config = " ".join(text[launch + 3:config_end].split())
        args = text[args_open:args_close + 1]
        text = (text[:start] + f"::emu::launch(::emu::config({config}), [&] {{ {kernel}{args}; }})"
                + text[args_close + 1:])
    return text


def rewrite(text: str) -> str:
    """A .cu or .cuh file as C++ for the emulation (the module docstring's three rewrites)."""
    text = text.replace(_IMPL, f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")
    return rewrite_launches(_C10_CUDA_INCLUDE.sub("", text))


def _define_ops() -> None:
    """The namespace's ops, with the schemas of the ofdkern ops that the CUDA files implement."""
    if hasattr(_define_ops, "library"):
        return
    import ofdkern  # noqa: F401  (loads ofdkern._C, whose schemas are copied)

    library = torch.library.Library(NAMESPACE, "DEF")
    for source in sorted(CSRC.glob("*.cu")):
        block = source.read_text().split(_IMPL, 1)[1]
        for name in re.findall(r'm\.impl\("([a-z_]+)"', block.split("}", 1)[0]):
            schema = str(getattr(torch.ops.ofdkern, name).default._schema)
            library.define(schema.split("::", 1)[1])
    # The half-precision GEMMs of the alignment pipeline: cuBLAS sums exact products in float32.
    aten = torch.library.Library("aten", "IMPL")
    aten.impl("mm.dtype", lambda a, b, out_dtype: torch.mm(a.to(out_dtype), b.to(out_dtype)), "CPU")
    _define_ops.library = library, aten  # the registrations live as long as the Library objects


def load(address_sanitizer: bool = False):
    """Builds (once per source change) and loads the emulated CUDA kernels; returns ``torch.ops.<NAMESPACE>``.
    ``address_sanitizer``: built with -fsanitize=address (the process must have libasan preloaded), so that a
    kernel's read or write outside a tensor's allocation stops it with a report."""
    _define_ops()
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*sources, EMULATION, Path(__file__)]))
    builds = Path(os.environ.get("OFDKERN_CACHE", Path.home() / ".cache" / "ofdkern")) / "cuda_on_cpu"
    build = builds / (digest.hexdigest()[:16] + ("-asan" if address_sanitizer else ""))
    for old in builds.glob("*"):  # builds of earlier sources
        if not old.name.startswith(digest.hexdigest()[:16]):
            shutil.rmtree(old, ignore_errors=True)
    build.mkdir(parents=True, exist_ok=True)
    cpp_files = []
    for source in sources:
        target = build / (source.name + ".cpp" if source.suffix == ".cu" else source.name)
        text = rewrite(source.read_text())
        if not target.exists() or target.read_text() != text:
            # Whole files only: a pytest-xdist worker may be compiling them already.
            partial = target.with_name(f"{target.name}.{os.getpid()}")
            partial.write_text(text)
            os.replace(partial, target)
        if source.suffix == ".cu":
            cpp_files.append(str(target))
    cpp_extension.load(
        name=NAMESPACE, sources=cpp_files, build_directory=str(build), is_python_module=False,
        extra_include_paths=[str(build), str(CSRC)],
        extra_cflags=["-O1", "-include", str(EMULATION), f"-Dofdkern={NAMESPACE}_impl", "-fvisibility=hidden"]
        + (["-fsanitize=address", "-fno-omit-frame-pointer"] if address_sanitizer else []),
        extra_ldflags=["-l:libstdc++.so.6"] + (["-fsanitize=address"] if address_sanitizer else []))
    return getattr(torch.ops, NAMESPACE)
