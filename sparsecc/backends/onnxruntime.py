"""The ONNX Runtime backend: an nn.Module that runs an exported sparsecc graph in an InferenceSession.

    sm = sparsecc.compile(model, inputs, recipe, backend="onnxruntime",
                          backend_options={"providers": ["CPUExecutionProvider"], "intra_op_num_threads": 2,
                                           "graph_optimization_level": "all", "path": "m.onnx"})
    out = sm(**inputs)

`OnnxRuntimeBackend` (the registry's "onnxruntime") holds the options: session (providers, threads,
optimization level, ...), export (path, opset, dynamic) and the translations' `OnnxOptions`
(layout_group_keys, known_layouts).

Inputs are bound to the compiled graph's signature like the PyTorch model's (positional or by
keyword); the tensor leaves, in signature order, are the ONNX graph inputs. Non-tensor inputs were
constants at export time: passing a different value raises. Outputs come back as torch tensors
in the SAME structure as the PyTorch model's outputs (the exported program's output spec is
unflattened, so an HF ModelOutput comes back as the same ModelOutput class holding the same
tensors in the same order). Runs in inference only (no autograd).
"""

from __future__ import annotations

import inspect as _inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from sparsecc.backends import LoweringInputs
from sparsecc.errors import LayoutError, UnsupportedError
from sparsecc.ops.onnx_lowering import OnnxOptions

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def session_options(intra_op_num_threads: Optional[int] = None, inter_op_num_threads: Optional[int] = None,
                    graph_optimization_level: str = "all", optimized_model_path: Optional[str] = None) -> Any:
    """An onnxruntime.SessionOptions from plain values (level: disable | basic | extended | all)."""
    import onnxruntime as ort
    if graph_optimization_level not in OPT_LEVELS:
        raise UnsupportedError(f"graph_optimization_level {graph_optimization_level!r}; expected one of "
                               f"{list(OPT_LEVELS)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[graph_optimization_level])
    if intra_op_num_threads is not None:
        opts.intra_op_num_threads = int(intra_op_num_threads)
    if inter_op_num_threads is not None:
        opts.inter_op_num_threads = int(inter_op_num_threads)
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    return opts


def check_providers(providers: Optional[Sequence[str]] = None) -> list[str]:
    """The provider list (default: CPU); raises when one is not available in this onnxruntime build."""
    import onnxruntime as ort
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise UnsupportedError(f"ONNX Runtime providers {unknown} are not available here; available: {available}. "
                               "Install the onnxruntime build for that provider or pick one of those")
    return providers


def make_session(path: str, providers: Optional[Sequence[str]] = None, options: Any = None, **option_kwargs) -> Any:
    """An onnxruntime.InferenceSession on `path` (CPU unless `providers` names others)."""
    import onnxruntime as ort
    providers = check_providers(providers)
    return ort.InferenceSession(path, sess_options=options or session_options(**option_kwargs), providers=providers)


class OnnxRuntimeModule(nn.Module):
    """Runs an ONNX file exported from a graph module, with the graph module's call convention.

    signature: the graph module's forward signature (to bind positional/keyword inputs);
    constants: {parameter name: value} of non-tensor inputs baked in at export;
    out_spec: pytree spec of the outputs (None: return a tuple of tensors).
    """

    def __init__(self, path: str, signature: Optional[_inspect.Signature] = None, constants: Optional[dict] = None,
                 out_spec: Any = None, providers: Optional[Sequence[str]] = None, session_options: Any = None,
                 keep_alive: Any = None, source: Optional[str] = None, **option_kwargs) -> None:
        super().__init__()
        self.path = path
        self.source = source or path  # the standard-ONNX file `path` was made from (a fused copy's original)
        self.session = make_session(path, providers, session_options, **option_kwargs)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.signature = signature
        self.constants = dict(constants or {})
        self.out_spec = out_spec
        meta = self.session.get_modelmeta().custom_metadata_map
        self.max_len = json.loads(meta.get("sparsecc.max_len", "null"))  # what the block layouts cover
        self._keep_alive = keep_alive  # e.g. the TemporaryDirectory holding the file

    def _flat_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if self.signature is None:
            leaves = pytree.tree_leaves((args, kwargs))
            return [t for t in leaves if isinstance(t, torch.Tensor)]
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise UnsupportedError(f"onnxruntime backend: inputs do not fit the compiled signature "
                                   f"{self.signature}: {err}") from err
        tensors = []
        for name in self.signature.parameters:
            if name not in bound.arguments:
                continue
            value = bound.arguments[name]
            for leaf in pytree.tree_leaves(value):
                if isinstance(leaf, torch.Tensor):
                    tensors.append(leaf)
                elif name in self.constants and self.constants[name] != value:
                    raise UnsupportedError(f"onnxruntime backend: input {name}={value!r} but the ONNX graph was "
                                           f"exported with {name}={self.constants[name]!r} (a constant in the "
                                           "file); recompile with the value you need")
        return tensors

    def forward(self, *args, **kwargs) -> Any:
        tensors = self._flat_inputs(args, kwargs)
        if len(tensors) != len(self.input_names):
            raise UnsupportedError(f"onnxruntime backend: got {len(tensors)} tensor inputs, the ONNX graph "
                                   f"takes {len(self.input_names)} ({self.input_names}); pass the same inputs "
                                   "as at compile time")
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, tensors)}
        try:
            outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(self.output_names, feed)]
        except Exception as err:  # noqa: BLE001 - ORT's own error classes; explained when the cause is known
            too_long = [(n, tuple(t.shape)) for n, t in zip(self.input_names, tensors)
                        if self.max_len is not None and any(d > self.max_len for d in t.shape[1:])]
            if not too_long:
                raise
            name, shape = too_long[0]
            raise LayoutError(f"onnxruntime backend: input {name} has shape {shape}, longer than the "
                              f"{self.max_len} tokens the block layouts in {os.path.basename(self.source)} were "
                              "made for; compile with the attention config's max_len at least the longest length you will run "
                              f"(ONNX Runtime said: {str(err).splitlines()[0][:200]})") from err
        if self.out_spec is None:
            return tuple(outs)
        return pytree.tree_unflatten(outs, self.out_spec)


def fuse_for_ort(src: str, dst: str) -> dict:
    """Write `src` rewritten with onnxscript's ORT fusions (attention -> com.microsoft.Attention /
    MultiHeadAttention, Gelu -> BiasGelu, LayerNorm + residual -> SkipLayerNormalization, ...) to `dst`,
    atomically; returns the fusion counts ({} and no file when nothing was fused or the pass failed, with a
    warning for a failure). Dense layers then run ORT's fused kernels, as the dense model's own export
    does; the block-sparse and sparse-FFN translations are left as they are. The result holds ORT's
    contrib ops: it is for ORT sessions, not a portable ONNX file."""
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from sparsecc.io import atomic_write
    try:
        model, counts = optimize_for_ort(ir.load(src))
    except Exception as err:  # noqa: BLE001 - any failure of the optional pass: run the unfused graph
        warnings.warn(f"onnxruntime backend: onnxscript's ORT fusions failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:200] if str(err) else ''}); running the unfused graph",
                      UserWarning, stacklevel=2)
        return {}
    counts = {k: v for k, v in counts.items() if v}
    if counts:
        atomic_write(dst, lambda tmp: ir.save(model, tmp))
    return counts


def build_module(gm: Any, args: tuple, kwargs: dict, recipe: Any = None, regions: Optional[list] = None,
                 dynamic: bool = True, path: Optional[str] = None, opset: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None, export_options: Optional[OnnxOptions] = None,
                 fuse: bool = True, dynamic_shapes: Optional[tuple] = None, **options) -> OnnxRuntimeModule:
    """Export `gm` (sparsecc ops translated) to ONNX and wrap the file in an OnnxRuntimeModule.

    path: where to keep the .onnx (default: a temporary directory owned by the module).
    fuse: the session runs a copy with onnxscript's ORT fusions (`fuse_for_ort`, "<path>.ort.onnx"), checked
    against the PyTorch graph on the example inputs; `path` stays standard ONNX.
    options: intra_op_num_threads, inter_op_num_threads, graph_optimization_level, session_options,
    optimized_model_path.
    """
    from sparsecc.backends.onnx import export_graph
    check_providers(providers)
    allowed = {"intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "session_options",
               "optimized_model_path"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise UnsupportedError(f"backend_options {bad} are not known; allowed: "
                               f"{sorted(allowed | {'path', 'opset', 'providers'})}")
    keep = None
    if path is None:
        keep = tempfile.TemporaryDirectory(prefix="sparsecc-ort-")
        path = os.path.join(keep.name, "model.onnx")
    result = export_graph(gm, args, kwargs, path, dynamic=dynamic, opset=opset, recipe=recipe, regions=regions,
                          options=export_options, dynamic_shapes=dynamic_shapes)
    sig = _inspect.signature(gm.forward)
    constants = {k: v for k, v in sig.bind_partial(*args, **kwargs).arguments.items()
                 if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v))}
    sess_opts = options.pop("session_options", None)

    def module(file: str) -> OnnxRuntimeModule:
        return OnnxRuntimeModule(file, signature=sig, constants=constants,
                                 out_spec=result.exported_program.call_spec.out_spec, providers=providers,
                                 session_options=sess_opts, keep_alive=keep, source=path, **options)

    if not fuse:
        return module(path)
    # `path` stays the portable standard-ONNX file; the session runs a fused copy beside it
    base, ext = os.path.splitext(path)
    fused_path = f"{base}.ort{ext or '.onnx'}"
    try:
        if fuse_for_ort(path, fused_path):
            fused = module(fused_path)
            _check_fused(fused, gm, args, kwargs)
            return fused
    except Exception as err:  # noqa: BLE001 - an invalid or wrong fused graph: run the plain translation
        warnings.warn(f"onnxruntime backend: the graph with onnxscript's ORT fusions did not load or did not "
                      f"match the PyTorch graph ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                      "running the unfused graph (backend_options={'fuse': False} skips the fusions)",
                      UserWarning, stacklevel=2)
    if os.path.exists(fused_path):
        os.remove(fused_path)
    return module(path)


def _check_fused(ort_module: OnnxRuntimeModule, gm: Any, args: tuple, kwargs: dict) -> None:
    """The fused graph gives the PyTorch graph's outputs on the example inputs (a fusion that changes the
    function is a bug of the fusion pass; the tolerance is loose, 1e-3 of the output's scale)."""
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(gm(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        got = [t for t in pytree.tree_leaves(ort_module(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        raise ValueError(f"it returns {len(got)} tensors, the PyTorch graph {len(want)}")
    for w, g in zip(want, got):
        if not w.is_floating_point():
            continue
        err = (w - g.to(w.dtype)).abs().max().item() if w.numel() else 0.0
        if not err <= 1e-3 * (1.0 + w.abs().max().item()):
            raise ValueError(f"an output differs from the PyTorch graph by {err:.3g}")


@dataclass(frozen=True)
class OnnxRuntimeBackend:
    """The graph exported to ONNX (standard ops) and run in an onnxruntime.InferenceSession.

    providers: execution providers (default CPU); intra_op_num_threads / inter_op_num_threads;
    graph_optimization_level: "disable" | "basic" | "extended" | "all"; session_options: an
    onnxruntime.SessionOptions (overrides the above); optimized_model_path: where ORT writes the
    optimized graph; path: keep the .onnx there (default: a temporary folder); opset;
    layout_group_keys / known_layouts: the block-sparse translation's OnnxOptions; fuse: apply
    onnxscript's ORT fusions to the exported file (`fuse_for_ort`: dense attention and FFN layers run
    ORT's fused kernels; False keeps the plain translation).
    """

    name: ClassVar[str] = "onnxruntime"
    providers: Optional[Sequence[str]] = None
    intra_op_num_threads: Optional[int] = None
    inter_op_num_threads: Optional[int] = None
    graph_optimization_level: str = "all"
    session_options: Any = None
    optimized_model_path: Optional[str] = None
    path: Optional[str] = None
    opset: Optional[int] = None
    layout_group_keys: int = OnnxOptions.layout_group_keys
    known_layouts: bool = OnnxOptions.known_layouts
    fuse: bool = True

    @property
    def export_options(self) -> OnnxOptions:
        return OnnxOptions(layout_group_keys=self.layout_group_keys, known_layouts=self.known_layouts)

    def prepare(self) -> None:
        """The options must be valid and the providers exist in this onnxruntime build (before any export work)."""
        self.export_options  # noqa: B018 - validates the export options
        if self.graph_optimization_level not in OPT_LEVELS:
            raise UnsupportedError(f"graph_optimization_level {self.graph_optimization_level!r}; expected one of "
                                   f"{list(OPT_LEVELS)}")
        check_providers(self.providers)

    def lower(self, gm: fx.GraphModule, inputs: LoweringInputs) -> Callable[..., Any]:
        session = {k: getattr(self, k) for k in ("intra_op_num_threads", "inter_op_num_threads",
                                                 "graph_optimization_level", "session_options",
                                                 "optimized_model_path") if getattr(self, k) is not None}
        return build_module(gm, tuple(inputs.args), dict(inputs.kwargs), recipe=inputs.recipe,
                            regions=list(inputs.regions), dynamic=inputs.dynamic, path=self.path, opset=self.opset,
                            providers=self.providers, export_options=self.export_options, fuse=self.fuse,
                            dynamic_shapes=inputs.dynamic_shapes,
                            **session)
