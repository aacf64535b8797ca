"""SparseFlow's rewrite: only the kept tokens of each example go through a flowed residual block.

`prepare_token_flow` (before the passes run) finds the flow segments (a layer's residual
blocks, or its FFN block; see sparsecc.graph.flow_segments), checks the recipe against the
model (causal decoders need per-token routing), and builds the gate module.

`token_flow_rewrite` (the pass) registers the gates as the submodule `sparsecc_flow` and
builds two graphs that share every parameter:

- the INFERENCE graph (this graph module), per segment:

      keep          = sparsecc_flow(h, x0, valid, segment=i, mode="keep")   # [B, L] bool
      index, counts = sparsecc::flow_route(keep)
      ... the segment's own nodes, re-wired to run on flow_gather(h, index, counts) [B, K, D]:
          queries, attention output, residual adds, norms, FFN; with kv="all" the keys and
          values stay on all tokens; masks / rotary tables / biases gathered on their token
          dim; is_causal rebuilt by position; shape arguments use K ...
      h_out         = sparsecc::flow_scatter(h, rows, index, counts, accumulate)

  (accumulate=True when the segment ends with `h + sublayer(...)`: the pre-LN residual add
  is fused into the scatter.) With layout="packed" (the default) the segment's row-wise tail
  (output projection, residual adds, norms, FFN) then runs on the batch's kept tokens one after
  another, [1, N, D], not on the padded [B, K, D] (sparsecc.methods.token_flow.packed).
- the TRAINING graph (`FlowPlan.train_graph`): the dense graph with the soft update
  h_out = h + g * (Block(h) - h) per segment, g = sparsecc_flow(..., mode="gate")
  (Gumbel-sigmoid in training mode, hard with a straight-through gradient in eval mode);
  with kv="kept" each key's log(g) is added to the attention scores.

With every gate open the inference graph computes exactly the dense function (the pass
manager checks it to 1e-5 when the recipe starts with open gates).
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

import sparsecc.ops.token_flow  # noqa: F401  (registers the ops)
from sparsecc.errors import RecipeError, UnsupportedError
from sparsecc.graph.flow_segments import (FlowSegment, attention_args, attention_targets, find_segments,
                                          linear_parts, segment_nodes, split_segment)
from sparsecc.graph.fx_utils import SDPA, aten, fake, hint, is_call, new_call
from sparsecc.ops.token_flow.helpers import (capacity_route, flow_attention_mask, flow_mix, gather_tokens,
                                             single_token_packed_route, single_token_route, soft_key_mask,
                                             valid_tokens)
from sparsecc.methods.token_flow.config import TokenFlow
from sparsecc.methods.token_flow.gates import FlowGates
from sparsecc.methods.token_flow.packed import pack_tail
from sparsecc.passes.manager import PassContext

log = logging.getLogger("sparsecc.methods.token_flow")

GATES = "sparsecc_flow"
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
_SYM_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.truediv}


@dataclass
class FlowPlan:
    cfg: TokenFlow
    segments: list  # list[FlowSegment]
    gates: FlowGates
    x0: dict  # stack id -> the stack's input node (the released router reads its mean)
    notes: list = field(default_factory=list)
    train_graph: Optional[fx.GraphModule] = None
    kept: dict = field(default_factory=dict)  # segment index -> kept fraction of valid tokens (last measure)
    packed: set = field(default_factory=set)  # segments whose per-token tail runs packed (layout="packed")

    @property
    def flowed(self) -> list:
        """The segments the rewrite routes (those `TokenFlow.skip` leaves out run dense)."""
        return [s for s in self.segments if s.index not in self.cfg.skip]

    @property
    def starts_open(self) -> bool:
        """True when the gates start fully open, so the flowed model equals the dense one."""
        return self.cfg.gate != "random" and self.cfg.select == "threshold" and self.cfg.init > 0


# ------------------------------------------------------------------ prepare
def prepare_token_flow(cfg: TokenFlow, ctx: PassContext) -> FlowPlan:
    """Find the segments, check the recipe against the model, build the gates (ctx.data["flow"])."""
    segments, notes = find_segments(ctx.regions, cfg.scope)
    if not segments:
        raise UnsupportedError("token flow: no residual block of the model can be flowed "
                               f"({'; '.join(notes) or 'no attention or FFN regions found'}); expected layers "
                               "of the form x + sublayer(x) on a [batch, tokens, features] stream")
    causal = [s.name for s in segments if s.causal]
    if causal and cfg.gate == "released":
        raise UnsupportedError(
            f"token flow: gate='released' routes each token by a router over the mean of ALL the example's "
            f"embeddings, so in the causal layers {causal[:2]}{'...' if len(causal) > 2 else ''} a token's routing "
            "would depend on later tokens. Use TokenFlow(gate='content') (a per-token score) for decoders")
    if causal and cfg.select in ("topk", "capacity"):
        raise UnsupportedError(
            f"token flow: select={cfg.select!r} keeps the best tokens of the whole sequence, so in causal layers a "
            "token's routing would depend on later tokens. Use select='threshold' for decoders")
    outside = sorted(b for b in cfg.skip if b >= len(segments))
    if outside:
        raise RecipeError(f"recipe.flow.skip: blocks {outside} do not exist; this model has {len(segments)} flowed "
                          f"blocks, numbered 0-{len(segments) - 1} in model order")
    x0: dict = {}
    for seg in segments:
        x0.setdefault(seg.stack_id, seg.input)
        seg.flops_parts = {r.name: (linear_parts(r) if r.kind == "attention" else {"ffn": r.flops})
                           for r in seg.regions}
    x0_dims = [int(fake(x0[s]).shape[-1]) for s in sorted(x0)]
    gates = FlowGates(cfg, [(s.stack_id, s.d_model) for s in segments], x0_dims)
    plan = FlowPlan(cfg=cfg, segments=segments, gates=gates, x0=x0, notes=notes)
    check_rewrite(ctx.captured.gm, plan)  # fails here, with the reason, rather than inside the pass manager
    ctx.data["flow"] = plan
    ctx.data.setdefault("skipped", []).extend(notes)
    return plan


# ------------------------------------------------------------------ shared graph bits
def _stable_toposort(graph: fx.Graph) -> None:
    """Move nodes (in place, same node objects) so every node follows its inputs; otherwise keep the order.

    The rewrite inserts gate/route nodes before a segment's first node, which may precede the node
    that computes the mask they read; this puts such nodes where they can run.
    """
    pending, ready, waiting, cursor = list(reversed(graph.nodes)), set(), {}, None
    while pending:
        node = pending.pop()
        waiting_for = [x for x in node.all_input_nodes if x not in ready]
        if waiting_for:
            waiting.setdefault(waiting_for[-1], []).append(node)
            continue
        ready.add(node)
        if cursor is not None and cursor.next is not node:
            cursor.append(node)
        cursor = node
        pending.extend(reversed(waiting.pop(node, [])))
    if waiting:
        raise UnsupportedError("token flow: the rewritten graph has a cycle (internal error)")


def _gate_node(graph: fx.Graph, h: fx.Node, x0: fx.Node, valid: fx.Node, segment: int, mode: str) -> fx.Node:
    node = graph.call_module(GATES, (h, x0, valid), {"segment": segment, "mode": mode})
    node.meta["nn_module_stack"] = h.meta.get("nn_module_stack", {})
    val = fake(h)
    with val.fake_mode:
        node.meta["val"] = val.new_empty(val.shape[:2], dtype=torch.bool if mode == "keep" else val.dtype)
    return node


class _Valid:
    """One valid-token node per (mask, stack), read from the self-attention mask: the keys it lets through,
    or, when its keys are not the stream's tokens (KV-cache slots), the query rows that see anything."""

    def __init__(self, graph: fx.Graph):
        self.graph, self.cache = graph, {}

    def get(self, mask: Optional[fx.Node], h: fx.Node, stack: int) -> fx.Node:
        key = (mask, stack)
        if key not in self.cache:
            mval = fake(mask) if isinstance(mask, fx.Node) else None
            by_query = mval is not None and mval.dim() >= 2 and not _same(mval.shape[-1], fake(h).shape[1])
            self.cache[key] = new_call(self.graph, valid_tokens, (mask, h, by_query), meta_from=h)
        return self.cache[key]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        return a == b
    return False


def _token_dims(val: torch.Tensor, L: Any) -> list[int]:
    return [i for i, s in enumerate(val.shape) if _same(s, L)]


# ------------------------------------------------------------------ inference rewrite
class _SegmentRewrite:
    """Re-wire one segment's gathered nodes to run on the kept tokens."""

    def __init__(self, gm: fx.GraphModule, plan: FlowPlan, seg: FlowSegment, h_in: fx.Node, x0: fx.Node,
                 valid: _Valid, out: fx.Node, mask: Optional[fx.Node]):
        self.gm, self.graph, self.plan, self.seg, self.h_in = gm, gm.graph, plan, seg, h_in
        self.x0, self.valid, self.out, self.mask = x0, valid, out, mask
        self.batch = fake(h_in).shape[0]
        self.L = fake(h_in).shape[1]
        # a one-token step (a decoder's decode graph): K = L = 1 always, so the route has static shapes and
        # every tensor entering the segment is its own gather (valid slot 0 = the token); only the stream
        # [B, 1, X] is gathered, which the packed tail reads its rows from
        self.single = _same(self.L, 1)
        self.gathered_cache: dict = {}
        self.sym_cache: dict = {}

    def run(self) -> fx.Node:
        seg, graph, h_in = self.seg, self.graph, self.h_in
        out = self.out
        split = split_segment(h_in, out, self.plan.cfg.kv, seg.name)
        gathered = list(split.gathered)
        self.members = set(gathered)
        for n in gathered:
            if n is out:
                continue
            outside = [u for u in n.users if u not in self.members and not is_call(u, aten.sym_size.int)]
            if outside:
                raise UnsupportedError(f"token flow: segment {seg.name}: {n.name} is also used outside the segment "
                                       f"(by {outside[0].name}); only the segment's output may leave it")
        rows, accumulate = out, False
        if is_call(out, aten.add.Tensor) and len(out.args) == 2 and not out.kwargs and h_in in out.args:
            other = out.args[1] if out.args[0] is h_in else out.args[0]
            if other in self.members and other is not h_in:
                rows, accumulate = other, True
                gathered.remove(out)
                self.members.discard(out)
        with graph.inserting_before(gathered[0]):
            valid = self.valid.get(self.mask, h_in, seg.stack_id)
            keep = _gate_node(graph, h_in, self.x0, valid, seg.index, "keep")
            if self.single:
                route = new_call(graph, single_token_route, (keep,), meta_from=gathered[0])
            elif self.plan.cfg.select == "capacity":
                fraction = self.plan.gates.keep_targets[seg.index]
                route = new_call(graph, capacity_route, (keep, fraction), meta_from=gathered[0])
            else:
                route = new_call(graph, torch.ops.sparsecc.flow_route.default, (keep,), meta_from=gathered[0])
            self.index = new_call(graph, operator.getitem, (route, 0), meta_from=gathered[0])
            self.counts = new_call(graph, operator.getitem, (route, 1), meta_from=gathered[0])
            self.K = 1 if self.single else new_call(graph, aten.sym_size.int, (self.index, 1), meta_from=gathered[0])
        targets = attention_targets()
        for n in gathered:
            with graph.inserting_before(n):
                if is_call(n, *targets):
                    self._attention(n)
                else:
                    self._generic(n)
        with graph.inserting_after(rows):
            scatter = new_call(graph, torch.ops.sparsecc.flow_scatter.default,
                               (h_in, rows, self.index, self.counts, accumulate), meta_from=out)
        scatter.meta["val"] = fake(out)  # [B, L, D] like the dense output (the op's fake says the same)
        members = self.members
        out.replace_all_uses_with(scatter, delete_user_cb=lambda u: u is not scatter and u not in members)
        self._fix_outside_sym_sizes()
        if self.plan.cfg.layout == "packed" and self.plan.cfg.select != "capacity":  # capacity: static shapes
            packed = pack_tail(graph, self.members, self.gathered_cache, self.batch, self.L, h_in, scatter,
                               *((self.counts, single_token_packed_route) if self.single else (self.K,)))
            if packed is not None:
                self.plan.packed.add(seg.index)
                return packed
        return scatter

    # -- arguments
    def _arg(self, m: Any) -> Any:
        if not isinstance(m, fx.Node) or m in self.members:
            return m
        val = m.meta.get("val")
        if isinstance(val, torch.SymInt):
            return self._sym(m)
        if m.op == "get_attr" or not isinstance(val, torch.Tensor):
            return m
        if self.single:  # only the [B, 1, X] stream: the packed tail's rows come from it
            stream = val.dim() == 3 and _same(val.shape[0], self.batch) and _same(val.shape[1], 1)
            return self._gathered(m, 1) if stream else m
        dims = _token_dims(val, self.L)
        if not dims:
            return m
        if len(dims) > 1:
            where = f"token flow: segment {self.seg.name}: {m.name} {tuple(val.shape)}"
            if isinstance(self.L, torch.SymInt):  # a dynamic capture: every one of these dims is the sequence
                raise UnsupportedError(f"{where} has {len(dims)} token dims (a per-(query, key) tensor such as a "
                                       "relative-position bias computed outside the layer's blocks) and is used "
                                       "inside the segment; token flow routes tensors with one token dim only. "
                                       "Leave this model's layers dense for token flow (a block layout takes the "
                                       "bias) or assign TokenFlow to other layers in the recipe")
            raise UnsupportedError(f"{where} has several dims of the token count {self.L} and is used by a per-token "
                                   "node, so which one indexes tokens is ambiguous; capture with dynamic shapes, or "
                                   "with a sequence length that differs from the model's other sizes")
        return self._gathered(m, dims[0])

    def _gathered(self, m: fx.Node, dim: int) -> fx.Node:
        key = (m, dim)
        if key not in self.gathered_cache:
            batch = fake(m).shape[0]
            if dim == 0 or not (_same(batch, self.batch) or _same(batch, 1)):
                raise UnsupportedError(
                    f"token flow: segment {self.seg.name}: {m.name} {tuple(fake(m).shape)} is indexed by token at dim "
                    f"{dim} but its dim 0 is not the batch; expected batch-first tensors [batch, ..., tokens, ...] "
                    "(sequence-first attention such as nn.MultiheadAttention is not supported)")
            self.gathered_cache[key] = new_call(self.graph, gather_tokens, (m, self.index, self.counts, dim),
                                                meta_from=m)
        return self.gathered_cache[key]

    def _sym(self, m: fx.Node) -> Any:
        val = m.meta["val"]
        if _same(val, self.L):
            return self.K
        if not isinstance(self.L, torch.SymInt) or not (self.L.node.expr.free_symbols & val.node.expr.free_symbols):
            return m
        if m in self.sym_cache:
            return self.sym_cache[m]
        if m.op == "call_function" and m.target in _SYM_OPS:
            args = tuple(self._sym(a) if isinstance(a, fx.Node) else a for a in m.args)
            new = self.graph.call_function(m.target, args)
            new.meta["val"] = m.target(*(a.meta["val"] if isinstance(a, fx.Node) else a for a in args))
            self.sym_cache[m] = new
            return new
        raise UnsupportedError(f"token flow: segment {self.seg.name}: the size {m.name} = {val} depends on the token "
                               "count in a way the rewrite cannot follow")

    def _generic(self, n: fx.Node) -> None:
        n.args = fx.node.map_aggregate(n.args, self._arg)
        n.kwargs = fx.node.map_aggregate(n.kwargs, self._arg)
        if n.target in _SHAPE_OPS and isinstance(self.L, int) and not self.single and len(n.args) > 1 \
                and isinstance(n.args[1], (list, tuple)):
            sizes, out = list(n.args[1]), fake(n).shape
            hits = [i for i, (s, o) in enumerate(zip(sizes, out))
                    if isinstance(s, int) and not isinstance(s, bool) and s == self.L and _same(o, self.L)]
            if len(hits) > 1:
                raise UnsupportedError(f"token flow: segment {self.seg.name}: {n.name} has several sizes equal to "
                                       f"the token count {self.L}; capture with dynamic shapes")
            if hits:
                sizes[hits[0]] = self.K
                n.args = (n.args[0], sizes, *n.args[2:])

    def _attention(self, n: fx.Node) -> None:
        a = attention_args(n)
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        if q not in self.members:
            raise UnsupportedError(f"token flow: segment {self.seg.name}: the queries of {n.name} are not computed "
                                   "from the segment's tokens")
        kv_kept = k in self.members
        if kv_kept != (v in self.members):
            raise UnsupportedError(f"token flow: segment {self.seg.name}: keys and values of {n.name} differ in "
                                   "where they come from")
        causal = bool(a["is_causal"])
        new_mask = mask
        if self.single:  # one query: its mask row and keys are the same (a skipped token's output is dropped)
            n.args, n.kwargs = fx.node.map_aggregate((n.args, n.kwargs), self._arg)
            return
        if mask is not None or causal or kv_kept:
            mval = fake(mask) if isinstance(mask, fx.Node) else None
            gather_query = mval is not None and mval.dim() >= 2 and _same(mval.shape[-2], self.L)
            gather_key = kv_kept and mval is not None and _same(mval.shape[-1], self.L)
            new_mask = new_call(self.graph, flow_attention_mask,
                                (mask, q, k, self.index, self.counts, gather_query, gather_key, kv_kept, causal),
                                meta_from=n)
        if n.target is SDPA:
            n.args = (q, k, v)
            n.kwargs = {"attn_mask": new_mask, "dropout_p": a["dropout_p"], "is_causal": False, "scale": a["scale"],
                        "enable_gqa": a["enable_gqa"]}
        else:
            n.args = (q, k, v, new_mask, a["dropout_p"], False, a["scale"], a["enable_gqa"])
            n.kwargs = {}

    def _fix_outside_sym_sizes(self) -> None:
        """A token count read off a gathered node (by anyone): read it off the full input instead."""
        for n in list(self.members):
            for u in list(n.users):
                if is_call(u, aten.sym_size.int) and _same(u.meta.get("val"), self.L):
                    u.args = (self.h_in, 1)


def _copy(gm: fx.GraphModule, plan: FlowPlan) -> tuple[fx.GraphModule, dict]:
    """A graph module with a copy of gm's graph (old node -> new node map) that shares gm's tensors."""
    graph = fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = fx.GraphModule(gm, graph)
    new.add_submodule(GATES, plan.gates)
    return new, val_map


def check_rewrite(gm: fx.GraphModule, plan: FlowPlan) -> None:
    """Rewrite a copy of the graph, so an unsupported model fails before the real graph is touched."""
    copy_gm, val_map = _copy(gm, plan)
    rewrite_inference(copy_gm, plan, val_map)
    plan.packed.clear()


def rewrite_inference(gm: fx.GraphModule, plan: FlowPlan, node_map: Optional[dict] = None) -> list[str]:
    changes, replaced = [], {}
    nm = (lambda n: n) if node_map is None else (lambda n: None if n is None else node_map[n])
    valid = _Valid(gm.graph)
    for seg in plan.flowed:
        h_in = replaced.get(nm(seg.input), nm(seg.input))
        x0 = replaced.get(nm(plan.x0[seg.stack_id]), nm(plan.x0[seg.stack_id]))
        out = nm(seg.output)
        scatter = _SegmentRewrite(gm, plan, seg, h_in, x0, valid, out, nm(seg.mask)).run()
        replaced[out] = scatter
        layout = "packed tail" if seg.index in plan.packed else "padded"
        changes.append(f"token_flow:{seg.name} ({', '.join(r.kind for r in seg.regions)}, kv={plan.cfg.kv}, {layout})")
    return changes


# ------------------------------------------------------------------ training graph
def build_training_graph(gm: fx.GraphModule, plan: FlowPlan) -> fx.GraphModule:
    """A copy of the (not yet flowed) graph with the soft per-token update; shares gm's parameters."""
    tgm, val_map = _copy(gm, plan)
    graph = tgm.graph
    valid, replaced = _Valid(graph), {}
    targets = attention_targets()
    for seg in plan.flowed:
        h_in = replaced.get(val_map[seg.input], val_map[seg.input])
        x0 = replaced.get(val_map[plan.x0[seg.stack_id]], val_map[plan.x0[seg.stack_id]])
        end = val_map[seg.output]
        nodes = segment_nodes(h_in, end)
        members = set(nodes)
        with graph.inserting_before(nodes[0]):
            v = valid.get(val_map.get(seg.mask) if seg.mask is not None else None, h_in, seg.stack_id)
            gates = _gate_node(graph, h_in, x0, v, seg.index, "gate")
        if plan.cfg.kv == "kept":
            for n in nodes:
                if not is_call(n, *targets):
                    continue
                a = attention_args(n)
                if a["key"] not in members:
                    continue  # cross attention: keys from elsewhere
                with graph.inserting_before(n):
                    mask = new_call(graph, soft_key_mask, (a["attn_mask"], a["query"], a["key"], gates,
                                                           bool(a["is_causal"])), meta_from=n)
                if n.target is SDPA:
                    n.kwargs = {**n.kwargs, "attn_mask": mask, "is_causal": False}
                    n.args = n.args[:3]
                else:
                    n.args = (*n.args[:3], mask, a["dropout_p"], False, a["scale"], a["enable_gqa"])
        with graph.inserting_after(end):
            mix = new_call(graph, flow_mix, (h_in, end, gates), meta_from=end)
        end.replace_all_uses_with(mix, delete_user_cb=lambda u: u is not mix)
        replaced[end] = mix
    _stable_toposort(graph)
    graph.lint()
    graph.eliminate_dead_code()
    tgm.recompile()
    return tgm


# ------------------------------------------------------------------ facts: kept fractions, FLOPs
def flowed_flops(parts: dict, p: float, kv: str, cross: bool = False) -> float:
    """FLOPs of one region when a fraction p of its tokens flows through it (see the module docstring)."""
    if "ffn" in parts:
        return parts["ffn"] * p
    q, k, v, o, core = parts["q"], parts["k"], parts["v"], parts["o"], parts["core"]
    if kv == "kept" and not cross:
        return (q + k + v + o) * p + core * p * p
    if parts.get("fused") and not cross:  # the fused QKV projection runs on every token
        return q + k + v + (o + core) * p
    return (q + o + core) * p + k + v


def gate_flops(plan: FlowPlan, seg: FlowSegment, tokens: int) -> int:
    if plan.cfg.gate == "content":
        return 2 * tokens * seg.d_model
    if plan.cfg.gate == "released":
        return 2 * tokens * plan.cfg.n_mix + tokens * seg.d_model  # mixture of the tables + the mean
    return 0


def record_facts(plan: FlowPlan, regions: list, kept: dict) -> None:
    """Write each flowed region's kept fraction and FLOPs into its record (`region.sparse`).

    kept: segment index -> (kept tokens, valid tokens, all tokens, rows computed) summed over the measured
    batches; the FLOPs count the rows computed (a capacity route computes its C slots per example, filled or not).
    """
    by_name = {r.name: r for r in regions}
    for seg in plan.segments:
        if seg.index not in kept:
            continue
        n_kept, n_valid, n_all, n_rows = kept[seg.index]
        frac_valid = n_kept / max(n_valid, 1)
        frac_all = n_rows / max(n_all, 1)
        plan.kept[seg.index] = frac_valid
        for i, region in enumerate(seg.regions):
            facts = by_name.get(region.name, region)
            parts = seg.flops_parts[region.name]
            flops = flowed_flops(parts, frac_all, plan.cfg.kv, cross=bool(getattr(region, "cross", False)))
            if i == 0:
                flops += gate_flops(plan, seg, _tokens(seg))
            config = (facts.sparse or {}).get("config") if (facts.sparse or {}).get("method") == "token_flow" else None
            facts.sparse = {"method": "token_flow", "density": frac_valid, "flops": int(round(flops)),
                            "segment": seg.name, "kept_fraction": frac_valid,
                            "layout": "packed" if seg.index in plan.packed else "padded"}
            if config is not None:  # a new measurement keeps what compile wrote
                facts.sparse["config"] = config


def _tokens(seg: FlowSegment) -> int:
    val = fake(seg.input)
    return int(hint(val.shape[0]) * hint(val.shape[1]))


def measure(gm: fx.GraphModule, plan: FlowPlan, batches: list, run) -> dict:
    """Run the inference graph on `batches` (run(gm, batch)) and count kept / valid / all tokens per segment."""
    totals: dict = {}
    gates = plan.gates
    gates.recording, gates.kept_counts = True, {}
    try:
        with torch.no_grad():
            for batch in batches:
                gates.kept_counts = {}
                run(gm, batch)
                for seg in plan.segments:
                    if seg.index not in gates.kept_counts:
                        continue
                    t = totals.setdefault(seg.index, [0, 0, 0, 0])
                    for i, n in enumerate(gates.kept_counts[seg.index]):
                        t[i] += int(n)
    finally:
        gates.recording = False
    return {k: tuple(v) for k, v in totals.items()}


# ------------------------------------------------------------------ the pass
def _load_given_gates(plan: FlowPlan, targets: list) -> None:
    """Plans given to compile(plans=) that carry gate tensors (`FlowSparseModel.gate_plans`) set those segments'
    gates: a trained model's gates, thresholds included, in another compile."""
    by_region = {r.name: seg for seg in plan.segments for r in seg.regions}
    for t in targets:
        seg = by_region.get(t.name)
        if t.plan is not None and t.plan.tensors and seg is not None:
            plan.gates.load_segment_state(seg.index, t.plan.tensors)


def token_flow_rewrite(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    plan: FlowPlan = ctx.data["flow"]
    if hasattr(gm, GATES):
        raise UnsupportedError(f"token flow: the graph already has a submodule {GATES!r} (flowed twice?)")
    gm.add_submodule(GATES, plan.gates)
    _load_given_gates(plan, ctx.targets.get("flow", []))
    plan.train_graph = build_training_graph(gm, plan)
    changes = rewrite_inference(gm, plan)
    _stable_toposort(gm.graph)
    gm.graph.lint()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    captured = ctx.captured
    kept = measure(gm, plan, [(captured.args, captured.kwargs)],
                   lambda g, b: captured.run(g, b[0], b[1]))
    record_facts(plan, ctx.regions, kept)
    for seg in plan.flowed:
        log.info("token flow %s: kept %.3f of the tokens on the example inputs", seg.name, plan.kept.get(seg.index, 1))
    return changes


__all__ = ["FlowPlan", "GATES", "build_training_graph", "flowed_flops", "measure", "prepare_token_flow",
           "record_facts", "rewrite_inference", "token_flow_rewrite"]
