"""Calibration: run sample batches through the captured graph and collect statistics per region.

Attention maps (for SPION) are the softmax probabilities of each attention
region averaged over batch items and heads: one [L, S] matrix per region,
accumulated as a running mean over batches and computed in chunks of query
rows, so no [B, H, L, S] tensor is ever held (at L = 4096 the running mean is
64 MB per region; a chunk of 256 rows for 8 heads is 32 MB).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree

from sparsecc.capture import Captured, normalize_inputs
from sparsecc.errors import SparseccError
from sparsecc.graph.regions import AttentionRegion
from sparsecc.progress import progress as show_progress

log = logging.getLogger("sparsecc.calibrate")


def attention_probs_mean(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                         scale: Optional[float], chunk: int = 256) -> torch.Tensor:
    """softmax(q k^T * scale + mask) averaged over every leading dim (batch, heads): [L, S], fp32."""
    q, k = q.float(), k.float()
    if q.shape[-3] != k.shape[-3] and q.dim() == 4:  # GQA: repeat kv heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    out = torch.empty(L, S, dtype=torch.float32)
    kt = k.transpose(-2, -1)
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        scores = torch.matmul(q[..., start:stop, :], kt) * s
        if attn_mask is not None:
            m = attn_mask[..., start:stop, :] if attn_mask.dim() >= 2 and attn_mask.shape[-2] == L else attn_mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        if is_causal:
            rows = torch.arange(start, stop).unsqueeze(1)
            scores = scores.masked_fill(torch.arange(S).unsqueeze(0) > rows, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[start:stop] = probs.reshape(-1, stop - start, S).mean(0)
    return out


class _MapCollector(fx.Interpreter):
    """Runs the graph and, at each watched SDPA node, adds its attention map to a running mean."""

    def __init__(self, gm: fx.GraphModule, watch: dict, chunk: int):
        super().__init__(gm)
        self.watch = watch  # node -> region name
        self.chunk = chunk
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        name = self.watch.get(n)
        if name is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            a = _bind_sdpa(args, kwargs)
            m = attention_probs_mean(a["query"], a["key"], a["attn_mask"], bool(a["is_causal"]), a["scale"],
                                     chunk=self.chunk)
            if name in self.sums and self.sums[name].shape != m.shape:
                raise SparseccError(
                    f"calibration batches must share one sequence length: region {name} saw "
                    f"{tuple(self.sums[name].shape)} and then {tuple(m.shape)}; pad or crop the batches to "
                    "the length the layouts are for")
            self.sums[name] = self.sums.get(name, 0) + m
            self.counts[name] = self.counts.get(name, 0) + 1
        return result


def _bind_sdpa(args: tuple, kwargs: dict) -> dict:
    """SDPA-style arguments by name (aten SDPA or sparsecc::attention, positional or keyword)."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(dict(zip(names, args)))
    out.update(kwargs)
    return out


def collect_attention_maps(captured: Captured, gm: fx.GraphModule, regions: list[AttentionRegion],
                           batches: Iterable[Any], chunk: int = 256, progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean attention probability map [L, S] of every region over all calibration batches."""
    watch = {r.sdpa: r.name for r in regions}
    collector = _MapCollector(gm, watch, chunk)
    in_spec = gm.graph._codegen.pytree_info.in_spec
    with torch.no_grad():
        for batch in show_progress(batches, "calibrating attention", enabled=progress):
            args, kwargs = normalize_inputs(batch)
            flat = fx_pytree.tree_flatten_spec((args, {**captured.call_defaults, **kwargs}), in_spec)
            collector.run(*flat)
    if not collector.sums:
        raise SparseccError("no attention region was found (see `sparsecc inspect --explain`)" if not watch else
                            "calibration saw no batches: pass calibration=[inputs, ...] with at least one batch "
                            "in the same format as example_inputs")
    return {name: collector.sums[name] / collector.counts[name] for name in collector.sums}


def collect_rows(captured: Captured, gm: fx.GraphModule, nodes: list[fx.Node], batches: Iterable[Any],
                 max_rows: int = 4096, progress: bool = True) -> dict[fx.Node, torch.Tensor]:
    """The values of `nodes` on the calibration batches, flattened to rows [tokens, features] (at most
    `max_rows` per node): what FFN controllers are distilled from."""
    from sparsecc.graph.regions import evaluate

    rows: dict[fx.Node, list] = {n: [] for n in nodes}
    for batch in show_progress(batches, "calibrating FFN inputs", enabled=progress):
        args, kwargs = normalize_inputs(batch)
        values = evaluate(gm, nodes, args, {**captured.call_defaults, **kwargs})
        for n, v in values.items():
            if sum(t.shape[0] for t in rows[n]) < max_rows:
                rows[n].append(v.detach().reshape(-1, v.shape[-1]).float())
    return {n: torch.cat(v)[:max_rows] for n, v in rows.items() if v}
