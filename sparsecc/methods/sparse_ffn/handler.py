"""The sparse FFN handler (Scaling Transformers): each FFN region becomes `sparsecc::sparse_ffn`.

Calibration records each FFN's input rows; the plan is one controller per region, distilled
from the dense FFN's own activations on those rows ("convert a dense model"), or random
("train from scratch"). The rewrite registers the controller and the pre-transposed output
weights as parameters of the compiled module and swaps the region for the op. The original
down-projection weight is removed, so the compiled model trains one copy of it.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn

import sparsecc.ops.sparse_ffn  # noqa: F401  (registers the op)
from sparsecc.calibrate import RowObserver
from sparsecc.graph.fx_utils import evaluate, fake, new_call, replace_node, weight_name
from sparsecc.graph.regions import FFNRegion, find_ffn
from sparsecc.methods.base import Match, Method, Plan, Target
from sparsecc.methods.registry import register
from sparsecc.methods.sparse_ffn.config import SparseFFN

from sparsecc.nn.sparse_ffn import SparseFFNController, init_controller_from_activations
from sparsecc.passes.manager import PassContext

log = logging.getLogger("sparsecc.methods.sparse_ffn")


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


@register(SparseFFN)
class SparseFFNMethod(Method):
    slots = ("ffn",)

    def match(self, region: FFNRegion, config: SparseFFN, ctx) -> Match:
        if region.d_ff % config.n:
            return Match.fail("sparse_ffn", f"d_ff={region.d_ff} is not a multiple of recipe.ffn.n={config.n}; choose n dividing "
                            f"{region.d_ff}")
        if not region.activation_match():
            return region.activation_match()
        dtype = fake(region.input).dtype
        if dtype != torch.float32:
            return Match.fail("sparse_ffn", f"the FFN runs in {dtype}; the sparse FFN controller is fitted and run in float32 "
                            "(compile the model in float32)")
        cost = region.flops // config.n + controller_flops(region, config)
        if cost >= region.flops:
            return Match.fail("sparse_ffn", f"sparse FFN at n={config.n}, d_lowrank={config.d_lowrank} would cost {cost} FLOPs, "
                            f"not fewer than the dense {region.flops} (the controller is too large for this FFN)")
        return Match.ok()

    def observers(self, target: Target) -> list:
        if target.config.init != "distill":
            return []
        return [RowObserver(target.region.input, target.name, target.config.max_tokens)]

    def plan(self, target: Target, stats: list, ctx: PassContext) -> Plan:
        cfg, r = target.config, target.region
        w = _weights(ctx.captured.gm, ctx, r)
        if cfg.init == "distill":
            init = init_controller_from_activations(
                w["w_up"], w.get("b_up"), stats[0].value(), n=cfg.n, d_lowrank=cfg.d_lowrank,
                activation=r.activation, w_gate=w.get("w_gate"), b_gate=w.get("b_gate"), steps=cfg.steps,
                seed=cfg.seed)
            controller, agreement = init.controller, init.agreement
        else:
            torch.manual_seed(cfg.seed)
            controller, agreement = SparseFFNController(r.d_model, r.d_ff, n=cfg.n, d_lowrank=cfg.d_lowrank), None
        return Plan(method=cfg.kind, region=r.name, values={"n": cfg.n, "agreement": agreement},
                    tensors={"c1": controller.c1.detach(), "c2": controller.c2.detach(),
                             "c_bias": controller.bias.detach()})

    def rewrite(self, gm: fx.GraphModule, ctx: PassContext, targets: list[Target]) -> list[str]:
        by_name = {t.name: t for t in targets}
        changes = []
        graph = gm.graph
        for index, r in enumerate(find_ffn(gm)):
            target = by_name.get(r.name)
            if target is None:
                continue
            cfg, plan = target.config, target.plan
            w = _weights(gm, ctx, r)
            down_name = weight_name(r.down.args[1])
            prefix = f"sparsecc_ffn_{index}"
            with graph.inserting_before(r.down):
                w_out_t = _param_node(gm, f"{prefix}_w_out_t", w["w_down"].t().contiguous(), r.input)
                c1 = _param_node(gm, f"{prefix}_c1", plan.tensors["c1"], r.input)
                c2 = _param_node(gm, f"{prefix}_c2", plan.tensors["c2"], r.input)
                cb = _param_node(gm, f"{prefix}_c_bias", plan.tensors["c_bias"], r.input)
                op = new_call(graph, torch.ops.sparsecc.sparse_ffn.default,
                              (r.input, r.up.args[1], _bias(r.up), w_out_t, _bias(r.down), c1, c2, cb, cfg.n,
                               r.activation, r.gate.args[1] if r.gate is not None else None,
                               _bias(r.gate) if r.gate is not None else None), meta_from=r.down)
            agreement = plan.values.get("agreement")
            target.region.sparse = {"method": "sparse_ffn", "density": 1.0 / cfg.n, "n": cfg.n,
                                    "agreement": agreement,
                                    "flops": target.region.flops // cfg.n + controller_flops(r, cfg)}
            replace_node(r.down, op)
            graph.eliminate_dead_code()
            if down_name is not None:
                _drop_unused_parameter(gm, down_name)
            changes.append(f"sparse_ffn:{r.name} n={cfg.n}"
                           + (f" controller agreement {agreement:.2f}" if agreement is not None else ""))
        return changes


def controller_flops(r: FFNRegion, cfg: SparseFFN) -> int:
    return 2 * r.tokens * cfg.d_lowrank * (r.d_model + r.d_ff)


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else None
