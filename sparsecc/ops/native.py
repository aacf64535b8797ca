"""The C++ CPU kernels of the op families: a torch extension per family, built on first use.

A family with a fast CPU kernel keeps it in `sparsecc/ops/<family>/cpu.cpp`. The file registers
its kernels as ops of the `sparsecc_cpu` library (`TORCH_LIBRARY_FRAGMENT(sparsecc_cpu, m)` with a
CPU implementation), so they are called like any op: `torch.ops.sparsecc_cpu.<kernel>(...)`. The
public `sparsecc::*` ops (defined in Python with `torch.library.custom_op`: schema, fake, autograd)
call these kernels from their CPU implementation when they apply (dtype, shapes) and run their
PyTorch path otherwise; see each family's `cpu.py`.

`load(family)` compiles the file with `torch.utils.cpp_extension.load` (ninja and the system C++
compiler; only ATen / torch library headers, no pybind11, so a build takes seconds, not minutes)
for this machine's CPU (`-march=native`, OpenMP), caches it under `$SPARSECC_CACHE_DIR/extensions`
(else `$TORCH_EXTENSIONS_DIR/sparsecc`, else `~/.cache/sparsecc/extensions`) in a folder keyed by a
hash of the source, the flags, the compiler, torch, Python and the CPU, and loads it once per
process. Concurrent builders (test workers) wait on the build folder's lock; a stale lock older
than `STALE_LOCK_SECONDS` is removed.

If ninja or the compiler is missing, or the build or the load fails, `load` logs ONE warning per
family and returns False: the ops then run their PyTorch path (same results within float
rounding, slower). `SPARSECC_NATIVE=0` never builds or uses the kernels; `SPARSECC_NATIVE=require`
raises `NativeUnavailable` (a sparsecc error saying what was found and what to do) instead of
falling back, for benchmarks and CI that must run the kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

from sparsecc.errors import UnsupportedError

__all__ = ["NativeUnavailable", "build_directory", "cache_dir", "enabled", "load", "required", "source"]

log = logging.getLogger("sparsecc.ops.native")

_OPS_DIR = Path(__file__).resolve().parent
# Flag sets tried in order: a compiler without -march=native / OpenMP still builds the kernels,
# which then run their loops on one thread. -ffp-contract=off: no fused multiply-adds the source does
# not spell out (C++ mode would contract by default), so results match the kernels' C originals bit
# for bit and do not depend on the compiler's choices.
FLAG_SETS = (("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"), ("-O3", "-ffp-contract=off"))
STALE_LOCK_SECONDS = 600
_lock = threading.Lock()


class NativeUnavailable(UnsupportedError):
    """A family's C++ kernel could not be built or loaded (SPARSECC_NATIVE=require)."""


def _mode() -> str:
    return os.environ.get("SPARSECC_NATIVE", "1").strip().lower()


def enabled() -> bool:
    """False when SPARSECC_NATIVE=0 (or 'false' / 'no' / 'off'): the ops then use only their PyTorch path."""
    return _mode() not in ("0", "false", "no", "off")


def required() -> bool:
    """True when SPARSECC_NATIVE=require: a kernel that cannot be built raises instead of falling back."""
    return _mode() == "require"


def cache_dir() -> Path:
    """Root of the built extensions: $SPARSECC_CACHE_DIR/extensions, $TORCH_EXTENSIONS_DIR/sparsecc, or
    ~/.cache/sparsecc/extensions."""
    if os.environ.get("SPARSECC_CACHE_DIR"):
        return Path(os.environ["SPARSECC_CACHE_DIR"]) / "extensions"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "sparsecc"
    return Path.home() / ".cache" / "sparsecc" / "extensions"


def source(family: str) -> Path:
    """The C++ file of `family` (sparsecc/ops/<family>/cpu.cpp)."""
    path = _OPS_DIR / family / "cpu.cpp"
    if not path.is_file():
        raise ValueError(f"op family {family!r} has no C++ kernel: {path} does not exist")
    return path


def extension_name(family: str) -> str:
    return f"sparsecc_{family}_cpu"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / arm
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build_directory(family: str, flags: tuple[str, ...] = FLAG_SETS[0]) -> Path:
    """The cache folder of `family` built with `flags` (a new folder whenever anything that matters changes)."""
    import torch

    key = hashlib.sha256()
    for part in (source(family).read_bytes(), repr(flags).encode(), _compiler_version(_compiler()).encode(),
                 torch.__version__.encode(), sys.version.encode(), _cpu_signature().encode(),
                 platform.machine().encode()):
        key.update(part)
    return cache_dir() / f"{family}-{key.hexdigest()[:16]}"


def _registered(family: str) -> bool:
    """The family's kernels are registered in this process (built and loaded already, maybe from elsewhere)."""
    import torch

    return hasattr(torch.ops.sparsecc_cpu, f"{family}_info")


def _clear_stale_lock(folder: Path) -> None:
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("sparsecc: removing the stale build lock %s (%.0f s old; a build was interrupted)", lock, age)
        lock.unlink(missing_ok=True)


def _find_ninja() -> None:
    """cpp_extension runs `ninja` from PATH; a pip-installed ninja (sparsecc's dependency) lives in the
    environment's bin folder, which is not on PATH when the interpreter is called by its full path.
    Append that folder to PATH (at the end: nothing else changes)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and os.path.isfile(os.path.join(folder, "ninja")):
        os.environ["PATH"] = os.pathsep.join(filter(None, [os.environ.get("PATH"), folder]))


def _missing_tools() -> Optional[str]:
    from torch.utils import cpp_extension

    _find_ninja()
    missing = []
    if not cpp_extension.is_ninja_available():
        missing.append("ninja was not found (`pip install ninja`, a dependency of sparsecc)")
    if shutil.which(_compiler()) is None:
        missing.append(f"no C++ compiler {_compiler()!r} was found (install g++ or clang++, or set CXX)")
    return " and ".join(missing) or None


def _build_and_load(family: str) -> Optional[str]:
    """Build (or reuse) and load the extension of `family`; None on success, else what went wrong."""
    from torch.utils import cpp_extension

    if _registered(family):
        return None
    problem = _missing_tools()
    if problem is not None:
        return problem
    errors = []
    for flags in FLAG_SETS:
        try:
            folder = build_directory(family, flags)
            folder.mkdir(parents=True, exist_ok=True)
            _clear_stale_lock(folder)
            start = time.perf_counter()
            built_before = (folder / f"{extension_name(family)}.so").exists()
            cpp_extension.load(extension_name(family), [str(source(family))], build_directory=str(folder),
                               extra_cflags=list(flags), extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                               is_python_module=False, verbose=False)
            log.info("sparsecc: %s the %s kernel in %.1f s (%s)", "loaded" if built_before else "built and loaded",
                     family, time.perf_counter() - start, folder)
            return None
        except OSError as exc:  # unwritable cache, or the library does not load (e.g. a symbol torch lacks)
            errors.append(f"{' '.join(flags)}: {exc} (set SPARSECC_CACHE_DIR to a writable directory if the "
                          "cache is the problem)")
        except Exception as exc:  # noqa: BLE001 - cpp_extension raises RuntimeError/CalledProcessError on build errors
            errors.append(f"{' '.join(flags)}: {_summary(str(exc))}")
    return "the build failed:\n" + "\n".join(errors)


def _summary(output: str, lines: int = 12) -> str:
    """The compiler's error lines of a failed build (the whole tail when none is marked as an error)."""
    found = [line for line in output.splitlines() if "error" in line.lower() and not line.startswith(("c++ ", "["))]
    return "\n".join(found[:lines]) if found else output.strip()[-2000:]


@lru_cache(maxsize=None)
def _load_once(family: str) -> Optional[str]:
    with _lock:
        return _build_and_load(family)


def load(family: str) -> bool:
    """Build and load the C++ kernels of `family` (once per process); True when they are registered.

    False when SPARSECC_NATIVE=0, or (after ONE warning) when they cannot be built here; raises
    NativeUnavailable instead when SPARSECC_NATIVE=require.
    """
    if not enabled():
        return False
    problem = _load_once(family)
    if problem is None:
        return True
    message = (f"sparsecc: the C++ CPU kernel of {family} ({source(family)}) is not available: "
               f"{problem.rstrip('.')}. "
               "The op runs its PyTorch path instead (same results, slower); SPARSECC_NATIVE=0 skips the build.")
    if required():
        raise NativeUnavailable(message.replace("The op runs its PyTorch path instead",
                                                "SPARSECC_NATIVE=require forbids the fallback to the PyTorch path"))
    _warn_once(family, message)
    return False


@lru_cache(maxsize=None)
def _warn_once(family: str, message: str) -> None:
    log.warning(message)
