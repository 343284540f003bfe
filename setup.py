"""Build fastdp's compiled core (fastdp._C).

CUDAExtension when the installed torch has CUDA and a CUDA toolkit is found (no GPU is
needed to compile), CppExtension otherwise. FASTDP_USE_CUDA=0 forces the CPU-only build.
Build with `pip install --no-build-isolation .` so the extension compiles against the torch
already installed in the environment.

One C++ runtime per process (issue 20). On Linux, _C is linked against the very
libstdc++.so.6, libgcc_s.so.1 (and libgomp.so.1) that the running torch has loaded (read from
/proc/self/maps after `import torch`), named explicitly on the link line, followed by
`-Wl,--exclude-libs,ALL`. Why: a compiler whose links take the C++ runtime statically (a GCC
built without shared runtime libraries, `-static-libstdc++` in its specs or in LDFLAGS) would
otherwise put a private copy of libstdc++ into _C. At load time a few of that copy's GNU-unique
symbols (the locale facet ids, e.g. std::num_put<char>::id) merge with torch's libstdc++.so.6
while the rest stay private, so the first TORCH_CHECK that formats a number -- every error path
-- runs the private ostream on torch's locale: on GCC 14/15 a SIGSEGV, on GCC 12 a message cut
short ("per_sample_sq_norms: grads["). Valid calls work; only errors crash. Naming the shared
libraries first makes every runtime symbol resolve to them (the driver's static archives come
later on the line and supply nothing they define); `--exclude-libs,ALL` hides whatever an
archive still supplies (libgcc helpers, symbols newer than torch's runtime) so nothing private
is exported or merged. libgcc_s matters too: with -static-libgcc, _C's cleanup code would call a
private _Unwind_Resume on an exception thrown by the shared unwinder (an abort).

After linking, the build reads _C's ELF dynamic section and symbol tables and refuses (an error,
the library removed) a result that would make a second runtime: libstdc++.so.6 not NEEDED, a
symbol of torch's runtime libraries defined and exported by _C, or a private copy of the locale,
iostream, exception or unwinder code. tests/test_build.py checks the built library the same way
and raises every op's first error in a child process.
"""

import glob
import os
import platform
import shlex
import struct
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# The shared runtime libraries torch loads and _C must share with it (soname -> required).
_RUNTIME_SONAMES = {"libstdc++.so.6": True, "libgcc_s.so.1": True, "libgomp.so.1": False}

# Runtime code with process-wide state (locale, iostreams, exceptions, unwinder, operator new):
# a private copy of any of these in _C is the issue-20 crash.
_STATEFUL_RUNTIME_PREFIXES = (
    "_ZNSt6locale",
    "_ZNKSt6locale",
    "_ZNSo",
    "_ZNSi",
    "_ZNSt8ios_base",
    "_ZNKSt8ios_base",
    "_ZNSt9basic_ios",
    "_ZNKSt9basic_ios",
    "_ZNSt7num_put",
    "_ZNKSt7num_put",
    "_ZGVNSt7num_put",
    "_ZNSt8numpunct",
    "_ZNSt7__cxx118numpunct",
    "_ZTISt9exception",
    "_ZTVSt9exception",
    "_ZSt9terminate",
    "__cxa_",
    "__gxx_personality",
    "_Unwind_",
    "_Znwm",
    "_Znam",
    "_ZdlPv",
    "_ZdaPv",
)


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


# ------------------------------------------------------------------ one C++ runtime (issue 20)


def _soname_of(path: str) -> str | None:
    base = os.path.basename(path)
    return next((s for s in _RUNTIME_SONAMES if base == s or base.startswith(s + ".")), None)


def _torch_runtime_libs() -> dict[str, str]:
    """soname -> file of the C++ runtime libraries loaded in this process, i.e. the ones torch
    uses (it is imported above). Falls back to asking the compiler (`-print-file-name`) for a
    library torch did not load; refuses to build when libstdc++.so.6 or libgcc_s.so.1 is found
    nowhere, since the link would then take the compiler's static runtime."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                soname = _soname_of(path) if path.startswith("/") else None
                if soname and os.path.isfile(path):
                    found.setdefault(soname, path)
    except OSError:
        pass
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    for soname, required in _RUNTIME_SONAMES.items():
        if soname in found or not required:
            continue
        try:
            path = subprocess.run(
                cxx + [f"-print-file-name={soname}"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            path = ""
        if os.path.isabs(path) and os.path.isfile(path):
            found[soname] = path
        else:
            raise RuntimeError(
                f"fastdp build: cannot find the shared {soname} that torch uses (it is not loaded in "
                f"this process and `{' '.join(cxx)} -print-file-name={soname}` does not name a file). "
                "Linking now would give fastdp._C its own static copy of the C++ runtime, and every "
                "error the extension raises would crash the process (issue 20). Use a compiler that "
                "ships the shared runtime libraries, or a torch that loads them."
            )
    return found


def _runtime_link_args() -> list[str]:
    """The shared runtime libraries by path (recorded as NEEDED by soname), then the flag that
    keeps anything a static archive still supplies private to _C."""
    if sys.platform != "linux":
        return []
    libs = _torch_runtime_libs()
    return [libs[s] for s in _RUNTIME_SONAMES if s in libs] + ["-Wl,--exclude-libs,ALL"]


def _read_elf(path: str) -> tuple[list[str], list[tuple[str, int, bool]]]:
    """(DT_NEEDED names, [(symbol, binding, exported)] of the defined symbols) of an ELF64 file:
    binding 0 local, 1 global, 2 weak, 10 GNU unique; exported: from .dynsym, else .symtab."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not an ELF64 file")
    e = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(e + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(e + "HH", data, 0x3A)
    sections = [struct.unpack_from(e + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def string(strtab: int, offset: int) -> str:
        start = sections[strtab][4] + offset
        return data[start : data.index(b"\0", start)].decode(errors="replace")

    needed: list[str] = []
    symbols: list[tuple[str, int, bool]] = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind == 6:  # SHT_DYNAMIC
            for pos in range(offset, offset + size, 16):
                tag, value = struct.unpack_from(e + "qQ", data, pos)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    needed.append(string(link, value))
        elif kind in (2, 11) and entsize:  # SHT_SYMTAB, SHT_DYNSYM
            for pos in range(offset + entsize, offset + size, entsize):
                name, info, _, shndx, _, _ = struct.unpack_from(e + "IBBHQQ", data, pos)
                if shndx != 0 and name:
                    symbols.append((string(link, name), info >> 4, kind == 11))
    return needed, symbols


def _check_runtime_linking(so_path: str, runtime_libs: dict[str, str]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a built _C: problems mean a second C++ runtime in the process."""
    needed, symbols = _read_elf(so_path)
    runtime: set[str] = set()
    for lib in runtime_libs.values():
        runtime.update(name for name, _, exported in _read_elf(lib)[1] if exported)
    problems, warnings = [], []
    if "libstdc++.so.6" not in needed:
        problems.append(f"libstdc++.so.6 is not NEEDED (NEEDED: {', '.join(needed)}): the C++ runtime was linked in")
    exported = sorted(
        {
            n
            for n, binding, exp in symbols
            if exp and n in runtime and (binding == 1 or n.startswith(_STATEFUL_RUNTIME_PREFIXES))
        }
    )
    if exported:
        problems.append(f"{len(exported)} C++ runtime symbols are defined and exported, e.g. {', '.join(exported[:4])}")
    private = sorted({n for n, binding, exp in symbols if not exp and binding == 0 and n in runtime})
    stateful = [n for n in private if n.startswith(_STATEFUL_RUNTIME_PREFIXES)]
    if stateful:
        problems.append(f"private copies of {len(stateful)} C++ runtime symbols, e.g. {', '.join(stateful[:4])}")
    elif private:
        warnings.append(
            f"{len(private)} symbols that torch's C++ runtime also defines are linked privately (hidden, "
            f"e.g. {', '.join(private[:4])}); usually code from a compiler newer than torch's libstdc++"
        )
    return problems, warnings


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """BuildExtension that checks each built library for a second C++ runtime."""

    def build_extension(self, ext):
        super().build_extension(ext)
        if sys.platform != "linux":
            return
        so_path = self.get_ext_fullpath(ext.name)
        problems, warnings = _check_runtime_linking(so_path, _torch_runtime_libs())
        for w in warnings:
            print(f"fastdp build: warning: {w}", file=sys.stderr)
        if problems:
            os.remove(so_path)
            raise RuntimeError(
                f"fastdp build: {so_path} would bring its own C++ runtime into the process, so the "
                "first error it raises would crash or garble its message (issue 20): "
                + "; ".join(problems)
                + f". The link used {' '.join(_runtime_link_args())}; check the compiler (`c++ -v`) and LDFLAGS."
            )


def _extension():
    sources = ["csrc/fastdp.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"] + _cpu_arch_flags()
    link = ["-fopenmp"] + _runtime_link_args()
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
    cmdclass={"build_ext": _BuildExt},
)
