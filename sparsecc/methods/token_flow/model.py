"""The compiled model of a token-flow recipe: an inference graph and a training graph, one set of weights.

An exported graph module computes one function; SparseFlow needs two: soft gates over
all tokens to train (h <- h + g * (Block(h) - h)), and gather -> block on kept tokens
-> scatter to run. `FlowSparseModel` holds both graphs, sharing every parameter and
buffer, and switches between them with `.train()` / `.eval()`:

    sm.train()   # training graph: Gumbel-sigmoid gates (hard + straight-through if the
                 # gates alone are put in eval mode: sm.flow_gates.eval())
    sm.eval()    # inference graph: sparsecc::flow_route / flow_gather / flow_scatter,
                 # what export_onnx writes and the backends run

`measure_flow(batches)` runs the inference graph on data and updates the report's kept
fraction and FLOPs per layer (at compile time they are measured on the example inputs).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.fx as fx

from sparsecc.model import SparseModel
from sparsecc.capture import normalize_inputs


def _share_attributes(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Point every parameter and buffer of `dst` at the object of the same name in `src`."""
    params = dict(src.named_parameters(remove_duplicate=False))
    buffers = dict(src.named_buffers(remove_duplicate=False))
    for name, _ in list(dst.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if name in params:
            (dst.get_submodule(owner) if owner else dst)._parameters[leaf] = params[name]
    for name, _ in list(dst.named_buffers(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if name in buffers:
            (dst.get_submodule(owner) if owner else dst)._buffers[leaf] = buffers[name]


class FlowSparseModel(SparseModel):
    """A SparseModel whose training mode runs the soft-gate training graph (see the module docstring)."""

    def __init__(self, *args, flow: Any, **kwargs):
        super().__init__(*args, **kwargs)
        self.flow = flow  # sparsecc.methods.token_flow.rewrite.FlowPlan (not a module: no duplicate state_dict keys)
        # the training graph is not a child module: all its tensors are graph_module's
        self.__dict__["train_graph_module"] = flow.train_graph
        self.train(False)  # compiled models start in inference mode (the graph that was checked)

    @property
    def flow_gates(self):
        """The gate module (`sparsecc.methods.token_flow.gates.FlowGates`), shared by both graphs."""
        return self.graph_module.get_submodule("sparsecc_flow")

    def forward(self, *args, **kwargs):
        if self.training:
            return self.train_graph_module(*args, **{**self._call_defaults, **kwargs})
        return super().forward(*args, **kwargs)

    def train(self, mode: bool = True) -> "FlowSparseModel":
        self.training = mode
        self.flow_gates.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        _share_attributes(self.graph_module, self.train_graph_module)
        return out

    def measure_flow(self, batches: Iterable[Any]) -> dict:
        """Kept fraction (of non-padding tokens) per flowed segment on `batches` (inputs as for the model);
        also updates the report (kept fraction and FLOPs per layer)."""
        from sparsecc.methods.token_flow.rewrite import measure, record_facts

        def run(gm, batch):
            args, kwargs = normalize_inputs(batch)
            return gm(*args, **{**self._call_defaults, **kwargs})

        counts = measure(self.graph_module, self.flow, list(batches), run)
        record_facts(self.flow, self._report.regions, counts)
        return {seg.name: self.flow.kept.get(seg.index) for seg in self.flow.flowed}

    def gate_plans(self) -> dict:
        """Region name -> Plan carrying the current gate tensors of its segment (thresholds included):
        `compile(model, inputs, recipe, plans=sm.gate_plans())` builds the same gates in another compile (another
        backend, other kept fractions), without training them again."""
        from sparsecc.methods.base import Plan

        gates = self.flow_gates
        out = {}
        for seg in self.flow.segments:
            for region in seg.regions:  # a copy each: plans are saved, and a saved tensor has one owner
                out[region.name] = Plan(method="token_flow", region=region.name,
                                        values={"segment": seg.name, "block": seg.index,
                                                "keep": gates.keep_targets[seg.index]},
                                        tensors=gates.segment_state(seg.index))
        return out

    def kept_fractions(self) -> dict:
        """Kept fraction per flowed segment from the last measurement."""
        return {seg.name: self.flow.kept.get(seg.index) for seg in self.flow.flowed}

