"""Shared helpers of the op families' Triton kernels: import, interpreter detection, checks, autotuning.

Triton reads TRITON_INTERPRET when it is imported (its own `tl.*` helpers are decorated then)
and again when each `@triton.jit` runs, so the mode of a process is fixed by the environment at
the time triton is first imported: set TRITON_INTERPRET=1 before anything imports triton (note
that `torch.compile` imports it) to run the kernels on CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

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


@dataclass(frozen=True)
class TritonOptions:
    """Launch tunables of the Triton kernels (the Triton backend's options).

    autotune: try every candidate config of a kernel (True), or only the first (False: quick
        experiments, no tuning time).
    configs: kernel name -> candidate configs (tuples in the layout of that kernel's *_CONFIGS
        in its family's triton.py), replacing the defaults.
    Under the interpreter every kernel runs its single interpreter config: tuning would only
    multiply test time, and one small config also exercises the sub-tiling paths.
    """

    autotune: bool = True
    configs: Mapping[str, Sequence[tuple]] = field(default_factory=dict)


DEFAULT_OPTIONS = TritonOptions()
_tuned: dict[tuple, Any] = {}


def autotuned(fn: Any, name: str, candidates: Sequence[tuple], interpreter: tuple, make: Callable,
              options: TritonOptions, **autotune_kwargs) -> Any:
    """`triton.autotune(configs=...)(fn)` over the configs `options` select for kernel `name`; cached, so each
    selection is tuned once per process."""
    triton = import_triton()
    if interpreting():
        chosen = (tuple(interpreter),)
    else:
        chosen = tuple(tuple(c) for c in options.configs.get(name, candidates))
        if not chosen:
            raise ValueError(f"TritonOptions.configs[{name!r}] is empty; give at least one config")
        if not options.autotune:
            chosen = chosen[:1]
    key = (fn, chosen)
    if key not in _tuned:
        _tuned[key] = triton.autotune(configs=[make(*c) for c in chosen], **autotune_kwargs)(fn)
    return _tuned[key]


def next_pow2(n: int, at_least: int = 16) -> int:
    p = at_least
    while p < n:
        p *= 2
    return p
