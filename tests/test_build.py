"""Build checks of the compiled core (issue 20): one C++ runtime per process, every error raises.

A fastdp/_C*.so that carries its own copy of libstdc++ (a compiler that links the C++ runtime
statically) merges a few of that copy's symbols with torch's libstdc++.so.6 at load time, and the
first TORCH_CHECK error it formats crashes the process (GCC 14/15: SIGSEGV) or comes out cut short
(GCC 12: "per_sample_sq_norms: grads["). These tests

- read the built library's ELF dynamic section and symbol tables (a small reader below, no
  binutils needed): libstdc++.so.6 must be NEEDED, and no symbol of torch's C++ runtime may be
  defined and exported by _C, nor a private copy of its locale / iostream / exception code;
- raise each op's first errors in a child process, so a crash fails one test with its signal and
  stderr instead of killing the test run, and check every message is whole;
- (slow, 2-6 min on 2 busy cores) build the extension from a temporary copy of the sources with
  LDFLAGS="-static-libstdc++ -static-libgcc", the toolchain that produced the crash, and check the
  same things on that build: setup.py must still link the shared runtime.

The built library is looked up in the source tree (the build is in place: `pip install -e .` or
`setup.py build_ext --inplace`); a missing build fails, it never skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch  # noqa: F401  (loads the C++ runtime that _C must share; read from /proc/self/maps)

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "fastdp" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
CHILD_TIMEOUT_S = 180
BUILD_TIMEOUT_S = 1200
BROKEN_LDFLAGS = "-static-libstdc++ -static-libgcc"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ELF / libstdc++ checks: Linux only")

RUNTIME_SONAMES = ("libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1")
# Runtime code with process-wide state: _C must never define any of these itself.
STATEFUL_PREFIXES = (
    "_ZNSt6locale",
    "_ZNKSt6locale",
    "_ZNSo",  # std::ostream, e.g. _ZNSo9_M_insertImEERSoT_
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
    "__cxa_",  # __cxa_throw, __cxa_allocate_exception, ...
    "__gxx_personality",
    "_Unwind_",
    "_Znwm",
    "_Znam",
    "_ZdlPv",
    "_ZdaPv",
)


# ---------------------------------------------------------------- ELF


def read_elf(path: Path | str) -> tuple[list[str], list[tuple[str, int, bool]]]:
    """(DT_NEEDED, [(name, binding, exported)] of defined symbols) of an ELF64 file.
    binding: 0 local, 1 global, 2 weak, 10 GNU unique; exported: in .dynsym (else .symtab)."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path}: not an ELF64 file"
    e = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(e + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(e + "HH", data, 0x3A)
    sections = [struct.unpack_from(e + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def string(strtab: int, offset: int) -> str:
        start = sections[strtab][4] + offset
        return data[start : data.index(b"\0", start)].decode(errors="replace")

    needed, symbols = [], []
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


def torch_runtime_libs() -> dict[str, str]:
    """soname -> file of the C++ runtime libraries this process (with torch imported) has loaded."""
    found: dict[str, str] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(None, 5)
        path = fields[5].strip() if len(fields) == 6 else ""
        base = os.path.basename(path)
        for soname in RUNTIME_SONAMES:
            if path.startswith("/") and (base == soname or base.startswith(soname + ".")):
                found.setdefault(soname, path)
    assert "libstdc++.so.6" in found, "torch did not load libstdc++.so.6: cannot tell which runtime _C must share"
    return found


def runtime_linking_problems(so: Path) -> list[str]:
    """What makes `so` bring a second C++ runtime into the process (empty: none)."""
    needed, symbols = read_elf(so)
    runtime: set[str] = set()
    for lib in torch_runtime_libs().values():
        runtime.update(name for name, _, exported in read_elf(lib)[1] if exported)
    problems = []
    if "libstdc++.so.6" not in needed:
        problems.append(f"libstdc++.so.6 is not NEEDED (NEEDED: {needed}): the C++ runtime is linked in statically")
    exported = sorted({n for n, b, exp in symbols if exp and n in runtime and (b == 1 or _stateful(n))})
    if exported:
        problems.append(f"defines and exports {len(exported)} symbols of torch's C++ runtime, e.g. {exported[:5]}")
    private = sorted({n for n, b, exp in symbols if not exp and b == 0 and _stateful(n) and n in runtime})
    if private:
        problems.append(
            f"holds private copies of {len(private)} runtime locale/iostream/exception symbols, e.g. {private[:5]}"
        )
    return problems


def _stateful(name: str) -> bool:
    return name.startswith(STATEFUL_PREFIXES)


# ---------------------------------------------------------------- errors in a child process

# argv: library, op. Loads the library (not the fastdp package), raises the op's errors in order
# (the first one first, in a fresh process) and checks each is a RuntimeError with the whole message.
CHILD = r"""
import re, sys, torch
torch.ops.load_library(sys.argv[1])
O = torch.ops.fastdp
g = [torch.randn(2, 3), torch.randn(2, 4)]
sq = g[0].square().sum(1) + g[1].square().sum(1)
out = [torch.empty(3), torch.empty(4)]
LONG = torch.ones(2, 3, dtype=torch.long)
CASES = {
    "per_sample_sq_norms": [
        (lambda: O.per_sample_sq_norms([torch.randn(2, 3), torch.randn(3, 3)]),
         r"per_sample_sq_norms: grads\[1\] has batch size 3 but expected 2 "
         r"\(all per-sample gradients must share the leading batch dimension\)"),
        (lambda: O.per_sample_sq_norms([LONG]),
         r"per_sample_sq_norms: grads\[0\] has dtype Long; expected float32, float64, float16 or bfloat16"),
    ],
    "clip_accumulate_noise": [
        (lambda: O.clip_accumulate_noise(g, sq, [torch.empty(3), torch.empty(5)], 1.0, 0.0, 1.0, 0, 0),
         r"clip_accumulate_noise: out\[1\] has shape \[5\] but grads\[1\] has per-sample shape \[4\]"),
        (lambda: O.clip_accumulate_noise(g, torch.ones(3), out, 1.0, 0.0, 1.0, 0, 0),
         r"clip_accumulate_noise: sq_norms has 3 entries but the gradients have batch size 2"),
        (lambda: O.clip_accumulate_noise(g, sq, out, 1.0, -1.5, 1.0, 0, 0),
         r"clip_accumulate_noise: noise_std must be finite and >= 0, got -1.5"),
    ],
    "add_noise_scale_": [
        (lambda: O.add_noise_scale_([torch.randn(3)], 1.0, 1.0, 0, -1),
         r"add_noise_scale_: offset must be >= 0, got -1"),
        (lambda: O.add_noise_scale_([torch.randn(3), LONG], 1.0, 1.0, 0, 0),
         r"add_noise_scale_: grads\[1\] has dtype Long; expected float32, float64, float16 or bfloat16"),
    ],
}
bad = 0
for i, (call, want) in enumerate(CASES[sys.argv[2]]):
    print(f"case {i}: calling, expecting {want!r}", flush=True)
    try:
        call()
    except RuntimeError as exc:
        got = str(exc).splitlines()[0] if str(exc) else ""
        ok = re.fullmatch(want, got) is not None
        print(f"case {i}: {'whole' if ok else 'WRONG OR CUT SHORT'}: {got!r}", flush=True)
        bad += not ok
    except BaseException as exc:
        print(f"case {i}: expected RuntimeError, got {type(exc).__name__}: {exc!r}", flush=True)
        bad += 1
    else:
        print(f"case {i}: no error raised", flush=True)
        bad += 1
print("ALL ERRORS WHOLE" if bad == 0 else f"{bad} BAD", flush=True)
sys.exit(1 if bad else 0)
"""

OPS = ["per_sample_sq_norms", "clip_accumulate_noise", "add_noise_scale_"]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def assert_errors_whole_in_child(so: Path, op: str) -> None:
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="0", PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(so), op],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            cwd=so.parent.parent,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{op}: child process raising the op's errors hung for {CHILD_TIMEOUT_S}s; stdout: {exc.stdout!r}")
    report = f"--- child stdout:\n{_tail(proc.stdout)}\n--- child stderr (tail):\n{_tail(proc.stderr)}"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(
            f"{op}: the child process raising the op's first errors from {so.name} was killed by {name} "
            f"(a C++ error crashed the process instead of raising RuntimeError: a second C++ runtime "
            f"in _C? see issue 20)\n{report}"
        )
    assert proc.returncode == 0 and "ALL ERRORS WHOLE" in proc.stdout, (
        f"{op}: errors from {so.name} not raised whole (exit {proc.returncode})\n{report}"
    )


def _require_build() -> Path:
    if not EXT.is_file():
        pytest.fail(
            f"{EXT} is not built: run `pip install --no-build-isolation -e .` (or setup.py build_ext --inplace)"
        )
    return EXT


def test_built_extension_shares_torchs_cxx_runtime():
    so = _require_build()
    problems = runtime_linking_problems(so)
    assert not problems, f"{so.name} brings its own C++ runtime (issue 20): " + "; ".join(problems)


@pytest.mark.parametrize("op", OPS)
def test_first_errors_raise_whole_in_a_child_process(op):
    assert_errors_whole_in_child(_require_build(), op)


# ---------------------------------------------------------------- the toolchain that crashed


def _static_runtime_probe(tmp: Path, cxx: str, ldflags: list[str]) -> str | None:
    """None when `cxx` with `ldflags` really links the C++ runtime statically, else why not."""
    src = tmp / "probe.cpp"
    src.write_text(
        "#include <sstream>\nint probe(unsigned long n) { std::ostringstream s; s << n; return s.str().size(); }\n"
    )
    out = tmp / "probe.so"
    proc = subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(out), *ldflags], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`{cxx} {' '.join(ldflags)}` cannot link a static C++ runtime here: {_tail(proc.stderr, 3)}"
    if "libstdc++.so.6" in read_elf(out)[0]:
        return f"`{cxx} {' '.join(ldflags)}` still links libstdc++.so.6 shared: the broken set-up cannot be made here"
    return None


@pytest.mark.slow
def test_static_runtime_toolchain_still_builds_a_safe_extension(tmp_path):
    """The toolchain of the crash (the C++ runtime linked statically), reproduced with the system
    compiler and LDFLAGS: without setup.py's explicit shared runtime this build's first error
    comes out cut short ("per_sample_sq_norms: grads[") or crashes; with it, errors are whole."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (`c++`) on PATH: cannot build the extension the broken way")
    why_not = _static_runtime_probe(tmp_path, cxx, BROKEN_LDFLAGS.split())
    if why_not:
        pytest.skip(why_not)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    (src / "fastdp").mkdir()
    (src / "fastdp" / "__init__.py").write_text("")
    # CFLAGS=-g0: no debug info, a faster build (the C++ runtime's linking does not depend on it).
    env = dict(os.environ, LDFLAGS=BROKEN_LDFLAGS, CFLAGS="-g0", FASTDP_USE_CUDA="0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # ninja
    try:
        proc = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"building with LDFLAGS={BROKEN_LDFLAGS!r} took more than {BUILD_TIMEOUT_S}s")
    built = sorted((src / "fastdp").glob("_C*.so"))
    assert proc.returncode == 0 and built, (
        f"setup.py build_ext with LDFLAGS={BROKEN_LDFLAGS!r} failed (exit {proc.returncode}):\n"
        f"{_tail(proc.stdout, 10)}\n{_tail(proc.stderr, 30)}"
    )
    problems = runtime_linking_problems(built[0])
    assert not problems, f"LDFLAGS={BROKEN_LDFLAGS!r} build brings its own C++ runtime: " + "; ".join(problems)
    for op in OPS:
        assert_errors_whole_in_child(built[0], op)
