"""Build fastdp's compiled core (fastdp._C).

CUDAExtension when the installed torch has CUDA and a CUDA toolkit is found (no GPU is
needed to compile), CppExtension otherwise. FASTDP_USE_CUDA=0 forces the CPU-only build.
Build with `pip install --no-build-isolation .` so the extension compiles against the torch
already installed in the environment.
"""

import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("FASTDP_USE_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on") and not has_cuda:
        raise RuntimeError(
            "FASTDP_USE_CUDA=1 but torch has no CUDA (torch.version.cuda is None) or no CUDA toolkit "
            "was found (set CUDA_HOME)."
        )
    return has_cuda


def _cpu_arch_flags() -> list[str]:
    """AVX2 + FMA when the building CPU has them (the noise generator and the clipped sum run
    about 2x faster than with the x86-64 baseline). The extension is built where it runs; set
    FASTDP_CPU_ARCH=portable for a build that must run on older x86-64 CPUs."""
    if os.environ.get("FASTDP_CPU_ARCH", "auto") == "portable":
        return []
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def _extension():
    sources = ["csrc/fastdp.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"] + _cpu_arch_flags()
    link = ["-fopenmp"]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            # Hopper and Ampere by default; override with TORCH_CUDA_ARCH_LIST.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return CUDAExtension(
            "fastdp._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFASTDP_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("fastdp._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
