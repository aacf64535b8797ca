"""The compiled model: an nn.Module that runs the rewritten graph on a backend, trains, reports, saves."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from sparsecc.backends import LoweringInputs, get_backend
from sparsecc.errors import UnsupportedError
from sparsecc.report import Report


class SparseModel(nn.Module):
    """The compiled model: an nn.Module that runs, trains, and reports what was rewritten.

    plans: region name -> `sparsecc.methods.Plan`, what each method decided (saved by `sparsecc.save`).
    layouts: the block layouts of the block-sparse regions (`sparsecc.layouts.LayoutSet`), or None.
    """

    def __init__(self, graph: fx.GraphModule, captured: Any, recipe: Any, backend: str, report: Report,
                 layouts: Any = None, backend_options: Optional[dict] = None, plans: Optional[dict] = None):
        super().__init__()
        self.graph_module = graph
        self.layouts = layouts
        self.plans = dict(plans or {})
        self.recipe = recipe
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self._call_defaults = dict(captured.call_defaults)
        self._report = report
        self.example_inputs = (captured.args, captured.kwargs)  # for export_onnx and save
        self._keywords = set(captured.kwargs) | set(self._call_defaults)
        self.omittable = dict(getattr(captured, "omittable", {}))  # mask inputs a call may leave out
        self.dynamic = captured.dynamic
        self.dynamic_shapes = getattr(captured, "dynamic_shapes", None)  # an explicit spec, for re-export and save
        # the runner comes from the backend (sparsecc.backends): the graph itself, torch.compile, an ORT session
        # (kept out of the module tree: the graph's tensors are graph_module's, once in state_dict())
        self.__dict__["_runner"] = get_backend(backend, backend_options).lower(graph, LoweringInputs(
            tuple(captured.args), {**self._call_defaults, **captured.kwargs}, recipe=recipe, regions=report.regions,
            dynamic=captured.dynamic, dynamic_shapes=self.dynamic_shapes))

    def forward(self, *args, **kwargs):
        kwargs = {**self._call_defaults, **kwargs}
        for name, like in self.omittable.items():  # left out: all ones, as the model's own default was checked to be
            if name not in kwargs and like in kwargs:
                kwargs[name] = torch.ones(kwargs[like].shape, dtype=self.example_inputs[1][name].dtype,
                                          device=kwargs[like].device)
        if len(args) != len(self.example_inputs[0]) or kwargs.keys() != self._keywords:
            raise UnsupportedError(
                f"the compiled graph takes {len(self.example_inputs[0])} positional input(s) and the keyword inputs "
                f"{sorted(self._keywords - set(self._call_defaults))} (what it was compiled with); got {len(args)} "
                f"positional and {sorted(set(kwargs) - set(self._call_defaults))}. Pass the same inputs (e.g. an "
                "all-ones attention_mask), or compile with example inputs that leave the optional one out"
                + (f"; {sorted(self.omittable)} may be left out" if self.omittable else ""))
        return self._runner(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise UnsupportedError("a compiled SparseModel cannot be pickled, torch.save'd or deep-copied (its graph "
                               "holds fake tensors and compiled runners); use sparsecc.save(sm, directory) and "
                               "sparsecc.load(directory), or torch.save(sm.state_dict(), path) for the weights")

    def __deepcopy__(self, memo):
        return self.__reduce_ex__(2)

    def train(self, mode: bool = True) -> "SparseModel":
        """Set the training flag. The graph computes the same in both modes: it was captured in eval
        mode (no dropout), and torch.export's graph modules do not switch modes."""
        self.training = mode
        return self

    def report(self) -> Report:
        return self._report

    @property
    def regions(self) -> list:
        return self._report.regions

    @property
    def call_defaults(self) -> dict:
        """Keyword inputs added to every call (e.g. use_cache=False for Hugging Face decoders)."""
        return dict(self._call_defaults)

    def export_onnx(self, path: str, dynamic: bool = True, opset: Optional[int] = None) -> str:
        """Write the compiled graph as ONNX (sparsecc ops in standard ONNX ops, recipe and regions in the
        file's metadata); see sparsecc.backends.onnx. Returns `path`."""
        from sparsecc.backends.onnx import export_onnx
        return export_onnx(self, path, dynamic=dynamic, opset=opset).path

    def save_layouts(self, directory: str, png: Optional[bool] = None) -> None:
        """Write the block layouts (one file per layer + index.json) and their picture layouts.png.

        png: None draws the picture when matplotlib is installed (else warns and skips it); True requires
        it (checked before anything is written); False never draws."""
        import os
        import warnings

        from sparsecc.layouts.plot import PLOT_HINT, plotting_available, save_layout_png
        if not self.layouts:
            raise UnsupportedError("this model has no block layouts (its recipe has no block-sparse attention)")
        if png and not plotting_available():
            raise UnsupportedError(f"save_layouts(png=True) draws with matplotlib, which is not installed "
                                   f"({PLOT_HINT}); pass png=False to write the layouts only")
        if png is None and not plotting_available():
            warnings.warn(f"matplotlib is not installed: layouts written without layouts.png ({PLOT_HINT})",
                          UserWarning, stacklevel=2)
            png = False
        self.layouts.save_dir(directory)
        if png is not False:
            save_layout_png(self.layouts, os.path.join(directory, "layouts.png"))
