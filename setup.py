"""Build of ofdkern and its extension ofdkern._C.

Environment flags (see docs/install.md, "Build flags"):
  OFDKERN_NO_EXTENSION=1  build no extension: pure Python + Triton (reference and triton backends only)
  OFDKERN_FORCE_CUDA=1    build the CUDA kernels even though no GPU is visible (needs a CUDA build of torch,
                          nvcc, CUDA_HOME and TORCH_CUDA_ARCH_LIST); fails loudly if that is impossible
  OFDKERN_NO_CUDA=1       build the CPU kernels only
Without flags the CPU kernels are always built and the CUDA kernels when a CUDA build of torch, nvcc and a
GPU are present.
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("OFDKERN_NO_EXTENSION"):
        print("ofdkern: OFDKERN_NO_EXTENSION set, building no extension (reference + triton backends only)")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    force_cuda = _flag("OFDKERN_FORCE_CUDA")
    why_not = None
    if _flag("OFDKERN_NO_CUDA"):
        why_not = "OFDKERN_NO_CUDA is set"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None:
        why_not = "nvcc / CUDA_HOME not found"
    elif not (force_cuda or torch.cuda.is_available()):
        why_not = "no GPU is visible (set OFDKERN_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST to build anyway)"
    if force_cuda and why_not is not None:
        sys.exit(f"ofdkern: OFDKERN_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")

    cxx_flags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Hardware float16 <-> float32 conversion (every x86-64 CPU since 2012 has F16C): without it c10::Half
        # converts in software and the fp16 CPU kernel runs ~15x slower than the bfloat16 one.
        cxx_flags.append("-mf16c")
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline: without OpenMP in this build its `#pragma omp parallel` compiles to a
        # serial loop. The extension links the libgomp that torch already loaded (same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
        # Share the C++ runtime torch loaded. Some toolchains link libstdc++ statically by default (seen with
        # a GCC under /opt/gcc): the extension then carries a second copy whose locale facets are not the
        # process's, and formatting any error message (TORCH_CHECK) segfaults.
        link_flags.append("-l:libstdc++.so.6")
    if why_not is None:
        print(f"ofdkern: building the CPU and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME})")
        ext = cpp_extension.CUDAExtension(
            "ofdkern._C",
            sources + cuda_sources,
            define_macros=[("OFDKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        print(f"ofdkern: building the CPU kernels only ({why_not})")
        ext = cpp_extension.CppExtension("ofdkern._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_flags)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["ofdkern", "ofdkern.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
