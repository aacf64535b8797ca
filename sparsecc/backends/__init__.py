"""Backends: how a compiled (rewritten) graph runs. One small protocol, a registry by name, loaded lazily.

    from sparsecc.backends import get_backend, LoweringInputs
    backend = get_backend("onnxruntime", {"intra_op_num_threads": 2})   # options checked here
    backend.prepare()                        # before any work: raises if it cannot run here
    runner = backend.lower(gm, LoweringInputs(args, kwargs, recipe=..., regions=..., dynamic=True))

A backend is a frozen dataclass whose fields are its options (`sparsecc.compile(...,
backend_options={...})` fills them; an unknown option is an error naming the ones it takes), with
`prepare()` and `lower()`. The built-in ones:

    eager        the graph module itself (the ops' CPU kernels: C++ where built, else PyTorch)
    inductor     torch.compile (inductor); options: dynamic, mode
    triton       the sparse ops' Triton kernels registered as their CUDA kernels, the rest torch.compile;
                 options: autotune, configs (sparsecc.ops.triton_runtime.TritonOptions), dynamic, mode
    onnxruntime  the graph exported to ONNX (sparsecc.backends.onnx) run in an InferenceSession;
                 options: providers, threads, graph_optimization_level, path, opset, layout limits, ...

Each lives in its own module, imported only when asked for (`register_backend` adds more).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch.fx as fx

from sparsecc.errors import UnsupportedError

__all__ = ["Backend", "LoweringInputs", "available", "get_backend", "register_backend"]


@dataclass(frozen=True)
class LoweringInputs:
    """What a backend may need besides the graph: example inputs (call defaults included), the recipe and
    regions (written into exported files), whether batch / sequence dims are dynamic."""

    args: tuple
    kwargs: dict
    recipe: Any = None
    regions: Sequence = field(default_factory=tuple)
    dynamic: bool = True
    dynamic_shapes: Optional[tuple] = None  # the explicit spec it was captured with (Captured.dynamic_shapes)


@runtime_checkable
class Backend(Protocol):
    """How a compiled graph runs. Options are the dataclass fields of the implementing class."""

    name: str

    def prepare(self) -> None:
        """Before any work: raise UnsupportedError (what is missing, what to do) when this backend cannot
        run here; set up what it needs (e.g. register kernels)."""

    def lower(self, gm: fx.GraphModule, inputs: LoweringInputs) -> Callable[..., Any]:
        """The callable that runs the rewritten graph `gm`, with gm's call convention."""


# name -> "module:Class", imported on first use
_REGISTRY: dict[str, str] = {
    "eager": "sparsecc.backends.eager:EagerBackend",
    "inductor": "sparsecc.backends.inductor:InductorBackend",
    "onnxruntime": "sparsecc.backends.onnxruntime:OnnxRuntimeBackend",
    "triton": "sparsecc.backends.triton:TritonBackend",
}


def register_backend(name: str, target: str | type) -> None:
    """Make `name` available: `target` is a Backend class or "module:Class" (imported when first asked for)."""
    if not isinstance(target, str):
        target = f"{target.__module__}:{target.__qualname__}"
    if ":" not in target:
        raise ValueError(f"backend target {target!r}: expected 'module:Class' or a class")
    _REGISTRY[name] = target


def available() -> tuple[str, ...]:
    """The registered backend names."""
    return tuple(_REGISTRY)


def _backend_class(name: str) -> type:
    if name not in _REGISTRY:
        raise UnsupportedError(f"backend {name!r} is not known; the available backends are "
                               f"{', '.join(repr(n) for n in available())}. Pass one of them as backend=..., or "
                               "register yours with sparsecc.backends.register_backend(name, cls)")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, options: Optional[Mapping[str, Any]] = None) -> Backend:
    """The backend called `name`, configured with `options` (its dataclass fields)."""
    cls = _backend_class(name)
    options = dict(options or {})
    known = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UnsupportedError(f"backend {name!r} got unknown option(s) {unknown}; it takes "
                               f"{sorted(known) or 'no options'}. Fix backend_options")
    return cls(**options)
