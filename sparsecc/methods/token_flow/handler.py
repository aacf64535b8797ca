"""SparseFlow's handler: one gate module over the model's residual blocks, then the gather rewrite.

Token flow works on the model's residual blocks (a layer's attention and FFN blocks, or its
FFN block), not on single regions: every region gets the recipe's one TokenFlow config, and
`check` finds the flow segments, checks the recipe against the model and builds the gates
(before anything is rewritten, so an unsupported model fails with the reason). Plans record
each region's segment and kept-fraction target; the gate weights are the model's parameters.
"""

from __future__ import annotations

from sparsecc.errors import UnsupportedError
from sparsecc.methods.base import FitHooks, Method, Plan, Target
from sparsecc.methods.registry import handler_for, register
from sparsecc.methods.token_flow.config import TokenFlow
from sparsecc.methods.token_flow.rewrite import prepare_token_flow, token_flow_rewrite


@register(TokenFlow)
class TokenFlowMethod(Method):
    slots = ("flow",)

    def check(self, targets: list[Target], ctx) -> None:
        layouts = sorted({type(t.config).__name__ for t in ctx.targets.get("attention", [])
                          if handler_for(t.config).needs_every_query})
        if layouts:
            raise UnsupportedError(f"recipe.flow with recipe.attention={layouts[0]}: block layouts need every query "
                                   "of a block, token flow removes queries; use one of them (attention=None or "
                                   "Identity() with flow)")
        prepare_token_flow(targets[0].config, ctx)

    def plan(self, target: Target, stats: list, ctx) -> Plan:
        flow = ctx.data["flow"]
        seg = next((s for s in flow.segments if any(r.name == target.name for r in s.regions)), None)
        keep = None if seg is None else flow.gates.keep_targets[seg.index]
        return Plan(method=target.config.kind, region=target.name,
                    values={"segment": None if seg is None else seg.name, "keep": keep})

    def rewrite(self, gm, ctx, targets: list[Target]) -> list[str]:
        return token_flow_rewrite(gm, ctx)

    def model_class(self, ctx):
        from sparsecc.methods.token_flow.model import FlowSparseModel
        return FlowSparseModel, {"flow": ctx.data["flow"]}

    def fit_hooks(self, config: TokenFlow) -> FitHooks:
        from sparsecc.methods.token_flow.fit import flow_hooks
        return flow_hooks(config)
