"""Triton import, interpreter detection and launch-config selection for the sparsecc kernels.

Triton reads TRITON_INTERPRET when it is imported (its own `tl.*` helpers are decorated then)
and again when each `@triton.jit` runs, so the mode of a process is fixed by the environment at
the time triton is first imported: set TRITON_INTERPRET=1 before anything imports triton (note
that `torch.compile` imports it) to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from sparsecc.errors import UnsupportedError

# dtypes the kernels take (fp32 accumulation for all of them)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def import_triton():
    """Import triton, or raise UnsupportedError saying how to install it."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UnsupportedError(
            "the Triton backend needs the `triton` package, which is not installed "
            f"({e}); install it with `pip install 'sparsecc[triton]'` (or `pip install triton`)") from e
    return triton


def interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter (TRITON_INTERPRET=1 at import)."""
    triton = import_triton()
    return bool(triton.knobs.runtime.interpret)


def check_device(*tensors: torch.Tensor, op: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; say what to do otherwise."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = devices.pop()
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and interpreting():
        return
    raise UnsupportedError(
        f"{op}: the Triton kernels run on CUDA tensors (found {dev.type} tensors"
        + (", and TRITON_INTERPRET is not set" if dev.type == "cpu" else "") + "). Move the tensors to a "
        "CUDA device, use the CPU op (torch.ops.sparsecc.*), or run the kernels in the Triton interpreter by "
        "setting TRITON_INTERPRET=1 before triton is first imported.")


def check_dtype(t: torch.Tensor, op: str) -> None:
    if t.dtype not in DTYPES:
        raise UnsupportedError(f"{op}: the Triton kernels take {[str(d) for d in DTYPES]} inputs, got {t.dtype}; "
                               "cast the inputs, or run the CPU op")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in true fp32 (the CPU op's precision), not TF32; other dtypes ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def configs(full: Iterable[tuple], interpreter: tuple, make: Callable) -> list:
    """The autotune config list: `full` on a GPU, the single `interpreter` config under TRITON_INTERPRET.

    Under the interpreter every launch runs the programs one after another in Python, so tuning
    would only multiply test time; one small config also exercises the sub-tiling paths.
    SPARSECC_TRITON_AUTOTUNE=0 also limits a GPU run to the first config (quick experiments).
    """
    if interpreting():
        return [make(*interpreter)]
    full = list(full)
    if os.environ.get("SPARSECC_TRITON_AUTOTUNE", "1") == "0":
        full = full[:1]
    return [make(*c) for c in full]


def next_pow2(n: int, at_least: int = 16) -> int:
    p = at_least
    while p < n:
        p *= 2
    return p
