"""Calibration: ONE pass over the calibration batches with every method's observers installed.

Methods say what they need to see (`Method.observers`): an `Observer` watches one graph node
and keeps its statistics as sums and counts (or a capped sample of rows), so statistics of
several batches, or of several processes, combine by addition. `calibrate` runs the graph
once per batch with every observer of every method, then each method plans from them.

On several processes (torch.distributed), `Observer.reduce` combines every rank's statistics on the rank
that plans the region, which then holds those of the union of the shards (sparsecc.distributed).

Attention maps (SPION) are the softmax probabilities of an attention region summed over batch
items and heads: one [L, S] sum per region plus the number of items that covered each cell,
computed in chunks of query rows so no [B, H, L, S] tensor is ever held. Batches of different
lengths add into the top-left corner of the longest map (a shorter sequence's map is the
top-left corner of a longer one's), and the mean divides each cell by its own count.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree

from sparsecc.capture import Captured, check_batch, normalize_inputs
from sparsecc.errors import InputError
from sparsecc.graph.fx_utils import attention_args
from sparsecc.progress import progress as show_progress

log = logging.getLogger("sparsecc.calibrate")


def attention_probs_sum(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                        scale: Optional[float], chunk: int = 256) -> tuple[torch.Tensor, int]:
    """softmax(q k^T * scale + mask) summed over every leading dim (batch, heads): ([L, S] fp32, items)."""
    q, k = q.float(), k.float()
    if q.shape[-3] != k.shape[-3] and q.dim() == 4:  # GQA: repeat kv heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    out = torch.empty(L, S, dtype=torch.float32)
    kt = k.transpose(-2, -1)
    items = math.prod(q.shape[:-2])
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
        out[start:stop] = probs.reshape(-1, stop - start, S).sum(0)
    return out, items


def attention_probs_mean(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                         scale: Optional[float], chunk: int = 256) -> torch.Tensor:
    """softmax(q k^T * scale + mask) averaged over every leading dim (batch, heads): [L, S], fp32."""
    total, items = attention_probs_sum(q, k, attn_mask, is_causal, scale, chunk)
    return total / max(items, 1)


class Observer:
    """Watches one graph node during calibration and keeps statistics that combine by addition."""

    def __init__(self, node: fx.Node, region: str):
        self.node, self.region = node, region

    def observe(self, args: tuple, kwargs: dict, output: Any) -> None:
        raise NotImplementedError

    @property
    def empty(self) -> bool:
        raise NotImplementedError

    def reduce(self, comm: Any, owner: int) -> None:
        """Combine with the same observer on every other rank, on rank `owner` (`comm`: a
        sparsecc.distributed.Comm); the other ranks' statistics are then undefined."""
        raise NotImplementedError(f"{type(self).__name__} cannot combine statistics across processes")


class AttentionMapObserver(Observer):
    """Sum of the attention probabilities at an SDPA node and, per (L, S), how many items were seen."""

    def __init__(self, node: fx.Node, region: str, chunk: int = 256):
        super().__init__(node, region)
        self.chunk = chunk
        # [L_max, S_max] in float64: sums of a few fp32 maps are then exact, so the order of the additions
        # (one process, or several ranks reduced) does not change the map
        self.sum: Optional[torch.Tensor] = None
        self.counts: dict[tuple[int, int], int] = {}  # (L, S) of a batch -> items (batch x heads) seen

    def observe(self, args: tuple, kwargs: dict, output: Any) -> None:
        a = attention_args(self.node.target, args, kwargs)
        total, items = attention_probs_sum(a["query"], a["key"], a["attn_mask"], bool(a["is_causal"]), a["scale"],
                                           chunk=self.chunk)
        self.add(total, {tuple(total.shape): items})

    def add(self, total: torch.Tensor, counts: dict) -> None:
        if self.sum is None:
            self.sum = total.double()
        else:
            L, S = max(self.sum.shape[0], total.shape[0]), max(self.sum.shape[1], total.shape[1])
            if (L, S) != tuple(self.sum.shape):
                grown = self.sum.new_zeros(L, S)
                grown[:self.sum.shape[0], :self.sum.shape[1]] = self.sum
                self.sum = grown
            self.sum[:total.shape[0], :total.shape[1]] += total
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n

    @property
    def empty(self) -> bool:
        return self.sum is None

    def reduce(self, comm: Any, owner: int) -> None:
        """Every rank's sums added into the largest (L, S) any rank saw, counts added: O(L x S) per rank."""
        seen = comm.all_gather((tuple(self.sum.shape) if self.sum is not None else (0, 0), self.counts))
        L, S = max(shape[0] for shape, _ in seen), max(shape[1] for shape, _ in seen)
        if L == 0 or S == 0:
            return
        grid = torch.zeros(L, S, dtype=torch.float64)
        if self.sum is not None:
            grid[:self.sum.shape[0], :self.sum.shape[1]] = self.sum
        self.sum = comm.reduce_sum(grid, owner)
        self.counts = {}
        for _, counts in seen:
            for key, n in counts.items():
                self.counts[key] = self.counts.get(key, 0) + n

    def cell_counts(self) -> torch.Tensor:
        """[L_max, S_max]: how many items covered each cell."""
        assert self.sum is not None
        grid = torch.zeros(self.sum.shape, dtype=torch.float64)
        for (L, S), n in self.counts.items():
            grid[:L, :S] += n
        return grid

    def mean(self) -> torch.Tensor:
        """The mean attention map [L_max, S_max] (fp32): each cell over the items that covered it."""
        assert self.sum is not None
        return (self.sum.double() / self.cell_counts().clamp_min(1)).float()


class RowObserver(Observer):
    """The node's values flattened to rows [tokens, features], the first `max_rows` of them (a sample, not
    a sum: processes combine theirs by concatenation)."""

    def __init__(self, node: fx.Node, region: str, max_rows: int):
        super().__init__(node, region)
        self.max_rows = max_rows
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def observe(self, args: tuple, kwargs: dict, output: Any) -> None:
        if self.count >= self.max_rows:
            return
        rows = output.detach().reshape(-1, output.shape[-1]).float()[: self.max_rows - self.count]
        self.rows.append(rows)
        self.count += rows.shape[0]

    @property
    def empty(self) -> bool:
        return self.count == 0

    def reduce(self, comm: Any, owner: int) -> None:
        """The ranks' samples in rank order, capped at `max_rows` (with contiguous shards: the rows one process
        would have kept). A rank sends only the rows the cap leaves room for after the ranks before it."""
        counts = comm.all_gather(self.count)
        room = max(0, self.max_rows - sum(counts[:comm.rank]))
        mine = self.value()[:room] if self.count and room else None
        everyone = comm.gather(mine, owner)
        gathered = [rows for rows in everyone or [] if rows is not None]
        self.rows = [torch.cat(gathered)[: self.max_rows]] if gathered else []
        self.count = self.rows[0].shape[0] if self.rows else 0

    def value(self) -> torch.Tensor:
        return torch.cat(self.rows)


class _Observing(fx.Interpreter):
    """Runs the graph; after each watched node, hands its inputs and output to the node's observers."""

    def __init__(self, gm: fx.GraphModule, observers: list[Observer]):
        super().__init__(gm)
        self.by_node: dict[fx.Node, list[Observer]] = {}
        for obs in observers:
            self.by_node.setdefault(obs.node, []).append(obs)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        for obs in self.by_node.get(n, ()):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            obs.observe(args, kwargs, result)
        return result


def calibrate(captured: Captured, gm: fx.GraphModule, observers: list[Observer], batches: Iterable[Any],
              progress: bool = True) -> int:
    """Run every batch through `gm` once with all `observers` installed; returns the number of batches."""
    runner = _Observing(gm, observers)
    in_spec = gm.graph._codegen.pytree_info.in_spec
    n = 0
    with torch.no_grad():
        for batch in show_progress(batches, "calibrating", enabled=progress):
            check_batch(n, batch, captured.args, captured.kwargs, captured.call_defaults)
            args, kwargs = normalize_inputs(batch)
            flat = fx_pytree.tree_flatten_spec((args, {**captured.call_defaults, **kwargs}), in_spec)
            runner.run(*flat)
            n += 1
    if n == 0:
        raise InputError("calibration got an empty iterable of batches: pass calibration=[inputs, ...] with at "
                            "least one batch in the same format as example_inputs")
    return n


def collect_attention_maps(captured: Captured, gm: fx.GraphModule, regions: list, batches: Iterable[Any],
                           chunk: int = 256, progress: bool = True, comm: Any = None) -> dict[str, torch.Tensor]:
    """Mean attention probability map [L, S] of every region over all calibration batches.

    With a `sparsecc.distributed.Comm`, over every rank's batches: the maps are returned on rank 0 only
    (an empty dict on the other ranks)."""
    observers = [AttentionMapObserver(r.sdpa, r.name, chunk) for r in regions]
    calibrate(captured, gm, observers, batches, progress)
    if comm is not None:
        for o in observers:
            o.reduce(comm, owner=0)
        if comm.rank != 0:
            return {}
    return {o.region: o.mean() for o in observers if not o.empty}
