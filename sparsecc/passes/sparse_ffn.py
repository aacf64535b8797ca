"""Sparse FFN (Scaling Transformers): each FFN region becomes `sparsecc::sparse_ffn` with a controller.

`prepare_sparse_ffn` (before the rewrite) builds one controller per region: distilled from the
dense FFN's own activations on calibration inputs ("convert a dense model"), or random ("train
from scratch"). `sparse_ffn_rewrite` (the pass) registers the controller and the pre-transposed
output weights as parameters of the compiled module and swaps the region for the op. The
original down-projection weight is removed, so the compiled model trains one copy of it.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn

import sparsecc.ops.sparse_ffn  # noqa: F401  (registers the op)
from sparsecc.calibrate import collect_rows
from sparsecc.errors import UnsupportedError
from sparsecc.graph.fx_utils import fake, new_call, replace_node, weight_name
from sparsecc.graph.regions import FFNRegion, evaluate, find_ffn
from sparsecc.passes.manager import PassContext
from sparsecc.recipe import SparseFFN
from sparsecc.training.controller import SparseFFNController, init_controller_from_activations

log = logging.getLogger("sparsecc.passes.sparse_ffn")


def _weights(gm: fx.GraphModule, ctx: PassContext, r: FFNRegion) -> dict:
    """The region's weight tensors in nn.Linear layout (GPT-2's transposed Conv1D weights included)."""
    nodes = {"w_up": r.up.args[1], "w_down": r.down.args[1]}
    if len(r.up.args) > 2 and r.up.args[2] is not None:
        nodes["b_up"] = r.up.args[2]
    if len(r.down.args) > 2 and r.down.args[2] is not None:
        nodes["b_down"] = r.down.args[2]
    if r.gate is not None:
        nodes["w_gate"] = r.gate.args[1]
        if len(r.gate.args) > 2 and r.gate.args[2] is not None:
            nodes["b_gate"] = r.gate.args[2]
    values = evaluate(gm, list(nodes.values()), ctx.captured.args,
                      {**ctx.captured.call_defaults, **ctx.captured.kwargs})
    return {k: values[v].detach() for k, v in nodes.items()}


def prepare_sparse_ffn(cfg: SparseFFN, ctx: PassContext, calibration) -> None:
    gm = ctx.captured.gm
    regions = find_ffn(gm)
    for r in regions:
        if r.d_ff % cfg.n:
            raise UnsupportedError(f"FFN region {r.name}: d_ff={r.d_ff} is not a multiple of recipe.ffn.n={cfg.n}; "
                                   f"choose n dividing {r.d_ff}")
    rows = {}
    if cfg.init == "distill":
        if calibration is None:
            log.warning("recipe.ffn init='distill' learns from data; no calibration batches were given, so the "
                        "example inputs are used. Pass calibration=[inputs, ...] with real data.")
            calibration = [(ctx.captured.args, ctx.captured.kwargs)]
        rows = collect_rows(ctx.captured, gm, [r.input for r in regions], calibration, max_rows=cfg.max_tokens)
    controllers = {}
    for r in regions:
        w = _weights(gm, ctx, r)
        if cfg.init == "distill":
            init = init_controller_from_activations(
                w["w_up"], w.get("b_up"), rows[r.input], n=cfg.n, d_lowrank=cfg.d_lowrank, activation=r.activation,
                w_gate=w.get("w_gate"), b_gate=w.get("b_gate"), steps=cfg.steps, seed=cfg.seed)
            controllers[r.name] = (init.controller, init.agreement)
        else:
            torch.manual_seed(cfg.seed)
            controllers[r.name] = (SparseFFNController(r.d_model, r.d_ff, n=cfg.n, d_lowrank=cfg.d_lowrank), None)
    ctx.data["ffn_controllers"] = controllers


def _param_node(gm: fx.GraphModule, name: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    gm.register_parameter(name, nn.Parameter(value.detach().clone()))
    node = gm.graph.get_attr(name)
    node.meta["val"] = fake(like).fake_mode.from_tensor(getattr(gm, name), static_shapes=True)
    return node


def _drop_unused_parameter(gm: fx.GraphModule, target: str) -> None:
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if leaf in module._parameters:
        del module._parameters[leaf]


def sparse_ffn_rewrite(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    cfg: SparseFFN = ctx.recipe.ffn
    controllers = ctx.data["ffn_controllers"]
    by_name = {r.name: r for r in ctx.regions}
    changes = []
    graph = gm.graph
    for index, r in enumerate(find_ffn(gm)):
        if r.name not in controllers:
            continue
        controller, agreement = controllers[r.name]
        w = _weights(gm, ctx, r)
        down_name = weight_name(r.down.args[1])
        prefix = f"sparsecc_ffn_{index}"
        with graph.inserting_before(r.down):
            w_out_t = _param_node(gm, f"{prefix}_w_out_t", w["w_down"].t().contiguous(), r.input)
            c1 = _param_node(gm, f"{prefix}_c1", controller.c1, r.input)
            c2 = _param_node(gm, f"{prefix}_c2", controller.c2, r.input)
            cb = _param_node(gm, f"{prefix}_c_bias", controller.bias, r.input)
            bias = lambda lin: lin.args[2] if len(lin.args) > 2 else None  # noqa: E731
            op = new_call(graph, torch.ops.sparsecc.sparse_ffn.default,
                          (r.input, r.up.args[1], bias(r.up), w_out_t, bias(r.down), c1, c2, cb, cfg.n, r.activation,
                           r.gate.args[1] if r.gate is not None else None,
                           bias(r.gate) if r.gate is not None else None), meta_from=r.down)
        tokens = r.tokens
        controller_flops = 2 * tokens * cfg.d_lowrank * (r.d_model + r.d_ff)
        facts = by_name.get(r.name, r)
        facts.sparse = {"method": "sparse_ffn", "density": 1.0 / cfg.n, "n": cfg.n, "agreement": agreement,
                        "flops": facts.flops // cfg.n + controller_flops}
        replace_node(r.down, op)
        graph.eliminate_dead_code()
        if down_name is not None:
            _drop_unused_parameter(gm, down_name)
        changes.append(f"sparse_ffn:{r.name} n={cfg.n}"
                       + (f" controller agreement {agreement:.2f}" if agreement is not None else ""))
    return changes
