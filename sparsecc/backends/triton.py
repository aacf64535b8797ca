"""The Triton backend: the sparse ops' Triton kernels as their CUDA kernels, the rest of the graph inductor.

Importing this module does not import triton; `register()` does: it imports the `triton.py` of
every op family that has one (sparsecc/ops/<family>/triton.py) and calls its `register(options)`,
which registers the launchers as the "cuda" kernels of the family's custom ops.
`sparsecc.compile(..., backend="triton")` does this through `TritonBackend.prepare()`. The
launchers are also plain functions, e.g.

    sparsecc.ops.block_sparse_attention.triton.block_sparse_attention_forward / _backward
    sparsecc.ops.sparse_ffn.triton.sparse_ffn_forward / sparse_ffn_backward
    sparsecc.ops.token_flow.triton.flow_route / flow_gather / flow_scatter

They run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is first imported), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from sparsecc.backends import LoweringInputs
from sparsecc.errors import UnsupportedError
from sparsecc.ops import FAMILIES
from sparsecc.ops.triton_runtime import DEFAULT_OPTIONS, TritonOptions

__all__ = ["TritonBackend", "available", "families", "register", "require"]

_lock = threading.Lock()


def available() -> bool:
    """True when triton is installed and a CUDA device is visible."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def require() -> None:
    """Raise UnsupportedError unless the Triton backend can run here (says what is missing and what to do)."""
    has_triton = importlib.util.find_spec("triton") is not None
    has_cuda = torch.cuda.is_available()
    if has_triton and has_cuda:
        return
    found = []
    if not has_triton:
        found.append("the `triton` package is not installed")
    if not has_cuda:
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
        found.append(f"no CUDA device is visible to {build}")
    raise UnsupportedError(
        "backend='triton' runs the sparse ops as Triton kernels on an NVIDIA GPU, but "
        + " and ".join(found) + ". Use backend='eager' or 'inductor' (CPU kernels of the same ops) or "
        "'onnxruntime' here; for the GPU backend install a CUDA build of PyTorch and `pip install "
        "'sparsecc[triton]'` on a machine with a GPU. (The kernels can be checked on CPU tensors in the "
        "Triton interpreter: see tests/triton_interp.py.)")


def families() -> list[str]:
    """The op families that have Triton kernels (a `triton.py` module)."""
    return [f for f in FAMILIES if importlib.util.find_spec(f"sparsecc.ops.{f}.triton") is not None]


def register(options: TritonOptions = DEFAULT_OPTIONS) -> list[str]:
    """Register the Triton launchers as the CUDA kernels of the sparsecc ops; returns the op names.

    Needs triton installed (not a GPU: registering only imports the kernels). Registering again
    replaces the kernels (the last options win: kernels are per process, like the dispatcher).
    """
    with _lock:
        names = []
        for family in families():
            names += importlib.import_module(f"sparsecc.ops.{family}.triton").register(options)
        return names


@dataclass(frozen=True)
class TritonBackend:
    """autotune / configs: the kernels' launch tunables (TritonOptions); dynamic / mode: torch.compile's."""

    name: ClassVar[str] = "triton"
    autotune: bool = True
    configs: Mapping[str, Sequence[tuple]] = field(default_factory=dict)
    dynamic: Optional[bool] = None
    mode: Optional[str] = None

    @property
    def options(self) -> TritonOptions:
        return TritonOptions(autotune=self.autotune, configs=dict(self.configs))

    def prepare(self) -> None:
        """Needs triton and a CUDA device; registers the kernels with this backend's options."""
        require()
        register(self.options)

    def lower(self, gm: fx.GraphModule, inputs: LoweringInputs) -> Callable[..., Any]:
        return torch.compile(gm, dynamic=self.dynamic, mode=self.mode)
