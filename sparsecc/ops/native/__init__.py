"""Small C kernels for the CPU hot paths that PyTorch ops cannot express without copies.

Each kernel is one plain C99 file next to this module. It is compiled on first
use with the system C compiler (`$CC`, default `cc`; well under a second, no
PyTorch headers) for this machine's CPU (`-march=native`), cached under
`$SPARSECC_CACHE_DIR` (default `~/.cache/sparsecc`) by a hash of the source, the
flags, the compiler and the CPU, and loaded with ctypes. The ops call it only
for the shapes and dtypes it handles and keep their PyTorch path otherwise.

Kernels that multiply small matrices call the BLAS inside PyTorch (`blas_sgemm`: the Fortran
`sgemm_` that libtorch_cpu exports, MKL on x86 wheels), passed to them as a function pointer.

If no compiler is found or the build fails, `load` logs one warning and returns
None, and the ops run their PyTorch path (same results, slower). Set
`SPARSECC_NATIVE=0` to never build or use the kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

__all__ = ["blas_sgemm", "cache_dir", "enabled", "load"]

log = logging.getLogger("sparsecc.ops.native")

_SOURCE_DIR = Path(__file__).resolve().parent
_FLAG_SETS = (  # tried in order; a kernel built without OpenMP runs its loops on one thread
    ["-O3", "-march=native", "-fopenmp", "-std=c99", "-shared", "-fPIC"],
    ["-O3", "-march=native", "-fopenmp-simd", "-std=c99", "-shared", "-fPIC"],
    ["-O3", "-std=c99", "-shared", "-fPIC"],  # compilers without -march=native / OpenMP pragmas
)


def enabled() -> bool:
    """False when SPARSECC_NATIVE=0 (or 'false' / 'no'): the ops then use only their PyTorch path."""
    return os.environ.get("SPARSECC_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where compiled kernels are kept: $SPARSECC_CACHE_DIR, else ~/.cache/sparsecc."""
    env = os.environ.get("SPARSECC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sparsecc"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / arm
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(source: Path, target: Path, cc: str) -> Optional[str]:
    """Compile source into target (atomically); return None on success or the last compiler error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    error = None
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, target)  # concurrent builders (test workers) each rename a complete file
                return None
            error = (proc.stderr or proc.stdout).strip()[-2000:]
        except (OSError, subprocess.SubprocessError) as exc:
            error = str(exc)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return error


@lru_cache(maxsize=None)
def load(name: str) -> Optional[ctypes.CDLL]:
    """The compiled kernel library `name` (`<name>.c` in this folder), building it if needed; None if unavailable."""
    if not enabled():
        return None
    source = _SOURCE_DIR / f"{name}.c"
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        log.warning("sparsecc: no C compiler %r found; the %s kernel runs its slower PyTorch path "
                    "(install a C compiler or set CC to use the native kernel)", cc, name)
        return None
    key = hashlib.sha256()
    for part in (source.read_bytes(), repr(_FLAG_SETS).encode(), _compiler_version(cc).encode(),
                 _cpu_signature().encode(), platform.machine().encode()):
        key.update(part)
    target = cache_dir() / "native" / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            error = _build(source, target, cc)
        except OSError as exc:  # e.g. a read-only cache directory
            error = f"{exc} (set SPARSECC_CACHE_DIR to a writable directory)"
        if error is not None:
            log.warning("sparsecc: building the native %s kernel with %r failed; using the slower PyTorch path. "
                        "Compiler said:\n%s", name, cc, error)
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        log.warning("sparsecc: loading %s failed (%s); using the slower PyTorch path", target, exc)
        return None


@lru_cache(maxsize=None)
def blas_sgemm() -> Optional[int]:
    """Address of the Fortran-interface `sgemm_` in PyTorch's CPU library (its MKL / OpenBLAS), or None
    when this build does not export one (the kernels that need it then leave the op on its PyTorch path)."""
    import torch  # noqa: PLC0415 (this module is imported by the ops, after torch)

    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            try:
                return ctypes.cast(ctypes.CDLL(str(lib_dir / name)).sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):
                return None
    return None
