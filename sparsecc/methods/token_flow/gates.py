"""SparseFlow gates: which tokens of each example enter each flowed block.

One `FlowGates` module holds the gate parameters of every flowed segment (a whole
layer, or an FFN block) of a compiled model. Kinds (`TokenFlow.gate`):

- "released" (as the authors released it): logits[b, s, p] = sum_m w[b, m] * table[m, s, p]
  with w = softmax(router(mean of the non-padding input embeddings of example b)) and
  table [n_mix, segments, max_positions] initialised to `init` (3.0: every gate open).
  Position-based: a token's gate depends on its position and on the whole example.
- "content": logits[b, s, p] = h[b, p] . w_s + c_s, a linear score of the token's
  hidden state at the segment input (w_s = 0, c_s = init at the start: open). A
  token's decision depends on that token only, so causal decoders stay causal.
- "random": a fixed random score table [segments, max_positions] (a baseline).

Selection (`TokenFlow.select`): "threshold" keeps logit > 0 (sigmoid(logit / T) > 0.5);
"topk" keeps the ceil(keep * n_valid) best-scored tokens of each example (Mixture-of-Depths
style); "capacity" the C = ceil(keep * L) best of each example, L the padded length: a count
fixed by the input's shape, so the route has static shapes ([B, C]) and every batch of one
shape, on every rank, runs the same program. Padding tokens are never kept (an example with
fewer than C valid tokens leaves slots empty); with `pin_first` position 0 (CLS) always is.

Modes of `forward(h, x0, valid, segment, mode)`:
- mode="keep": bool [B, L], the inference decision (what `sparsecc::flow_route` packs);
- mode="gate": float gates [B, L] for the soft training graph: in training mode the
  Gumbel-sigmoid sigmoid((logit + g1 - g2) / T) (threshold) or the top-k mask with a
  straight-through sigmoid gradient (topk); in eval mode (or with `hard_training`) the
  hard decision of "keep" with a straight-through gradient. The last gates (and mixture weights) are kept in
  `last_gates` / `last_mix` for the losses of `sparsecc.train.flow`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sparsecc.errors import RecipeError
from sparsecc.ops.token_flow.helpers import capacity

__all__ = ["FlowGates", "gumbel_sigmoid", "hard_straight_through", "keep_threshold"]


def gumbel_sigmoid(logits: Tensor, temperature: float = 0.33, generator: Optional[torch.Generator] = None) -> Tensor:
    """sigmoid((logits + g1 - g2) / temperature) with g1, g2 standard Gumbel noise (soft, differentiable)."""
    u = torch.rand((2, *logits.shape), device=logits.device, dtype=logits.dtype, generator=generator)
    u = u.clamp(1e-10, 1 - 1e-10)
    g = -torch.log(-torch.log(u))
    return torch.sigmoid((logits + g[0] - g[1]) / temperature)


def hard_straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward `hard` (0/1), backward the gradient of `soft`."""
    return hard.to(soft.dtype) + soft - soft.detach()


def keep_threshold(logits: Tensor, valid: Tensor, pinned: Tensor, keep: float) -> float:
    """The logit threshold above which `keep` of the valid tokens are kept, counting the pinned ones
    (kept anyway) towards it. All arguments of one shape; valid / pinned bool. 0.0 when nothing is free."""
    free = logits[valid & ~pinned]
    if free.numel() == 0:
        return 0.0
    want = (keep * int(valid.sum()) - int((pinned & valid).sum())) / free.numel()
    if want >= 1.0:
        return float(free.min()) - 1.0
    if want <= 0.0:
        return float(free.max()) + 1.0
    return float(torch.quantile(free.double(), 1.0 - want))


def _rank_desc(scores: Tensor) -> Tensor:
    """[B, L] rank of each score in its row, best first, ties to the earlier position.

    Pairwise counts (B x L x L comparisons) rather than a stable argsort: exact, deterministic and
    exportable to ONNX (which has no stable sort).
    """
    s_i, s_j = scores.unsqueeze(2), scores.unsqueeze(1)
    L = scores.shape[1]
    pos = torch.arange(L, device=scores.device)
    earlier = (pos.unsqueeze(0) < pos.unsqueeze(1)).unsqueeze(0)  # [1, i, j]: j before i
    beats = (s_j > s_i) | ((s_j == s_i) & earlier)
    return beats.sum(2)


class FlowGates(nn.Module):
    """Gate parameters of all flowed segments of one model (see the module docstring).

    segments: one entry per flowed segment: (stack number, d_model of its input).
    x0_dims: d_model of each stack's input embedding (the released router's input).
    """

    def __init__(self, cfg, segments: list[tuple[int, int]], x0_dims: list[int]):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.gate
        self.n_segments = len(segments)
        self.stacks = [s for s, _ in segments]
        self.temperature = float(cfg.temperature)
        per_segment = isinstance(cfg.keep, (tuple, list))
        keeps = [float(k) for k in cfg.keep] if per_segment else [float(cfg.keep)] * len(segments)
        if len(keeps) != len(segments):
            raise RecipeError(f"recipe.flow.keep: got {len(keeps)} kept fractions {list(cfg.keep)}; this model has "
                              f"{len(segments)} flowed blocks: give one number, or {len(segments)} in model order")
        self.keep_targets = keeps  # per segment
        self.keep_target = sum(keeps) / len(keeps) if keeps else float(cfg.keep)  # mean over segments
        self.select = cfg.select
        self.pin_first = bool(cfg.pin_first)
        self.max_positions = int(cfg.max_positions)
        if self.kind == "released":
            self.table = nn.Parameter(torch.full((cfg.n_mix, self.n_segments, self.max_positions), float(cfg.init)))
            self.routers = nn.ModuleList(nn.Linear(d, cfg.n_mix) for d in x0_dims)
        elif self.kind == "content":
            self.scorers = nn.ModuleList(nn.Linear(d, 1) for _, d in segments)
            for lin in self.scorers:
                nn.init.zeros_(lin.weight)
                nn.init.constant_(lin.bias, float(cfg.init))
        elif self.kind == "random":
            g = torch.Generator().manual_seed(int(cfg.seed))
            self.register_buffer("table", torch.rand(self.n_segments, self.max_positions, generator=g) * 2 - 1)
        else:  # pragma: no cover - the recipe validates
            raise ValueError(f"unknown gate kind {self.kind!r}")
        # added to every logit of a segment: `sparsecc.train.flow.calibrate_keep` sets it so that the hard
        # decisions keep the target fraction on data (0 = as trained)
        self.register_buffer("shift", torch.zeros(self.n_segments))
        self.capture: Optional[dict] = None  # when a dict, forwards store (logits, valid) per segment
        self.last_gates: dict = {}  # segment -> (gates [B, L], valid [B, L]) of the last "gate" forward
        self.last_mix: dict = {}  # stack -> mixture weights [B, n_mix] of the last "gate" forward
        self.recording = False  # when True, "keep" forwards store (kept, valid, all, computed rows) in `kept_counts`
        self.hard_training = False  # when True, training "gate" forwards use the hard decision (straight-through)
        # with hard_training (threshold gates): each training forward moves the segment's shift this fraction of
        # the way to the threshold that keeps the segment's target of the batch, so the kept fraction stays on target
        # while the weights (and so content scores) change; 0 leaves the shifts alone
        self.track_keep = 0.0
        self.kept_counts: dict = {}

    # ------------------------------------------------------------------ logits
    def mixture(self, x0: Tensor, valid: Optional[Tensor], stack: int) -> Tensor:
        """Released router: softmax(Linear(mean of the valid rows of x0)) -> [B, n_mix]."""
        if valid is None:
            mean = x0.mean(1)
        else:
            w = valid.to(x0.dtype).unsqueeze(-1)
            mean = (x0 * w).sum(1) / w.sum(1).clamp_min(1.0)
        return torch.softmax(self.routers[stack](mean), dim=-1)

    def logits(self, h: Tensor, x0: Tensor, valid: Optional[Tensor], segment: int) -> tuple[Tensor, Optional[Tensor]]:
        """Gate logits [B, L] of `segment` (and the mixture weights for released gates)."""
        L = h.shape[1]
        torch._check(L <= self.max_positions, lambda: (
            f"token flow: sequence length {L} is longer than the gate table (max_positions="
            f"{self.max_positions}); compile with TokenFlow(max_positions=...) >= your longest input"))
        shift = self.shift[segment]
        if self.kind == "released":
            mix = self.mixture(x0, valid, self.stacks[segment])
            return mix @ self.table[:, segment, :L] + shift, mix
        if self.kind == "content":
            return self.scorers[segment](h).squeeze(-1) + shift, None
        return self.table[segment, :L].unsqueeze(0).expand(h.shape[0], L).to(h.dtype) + shift, None

    def _decide(self, logits: Tensor, valid: Optional[Tensor], segment: int) -> Tensor:
        """The hard decision [B, L] bool: threshold or top-k, padding never, position 0 if pinned."""
        B, L = logits.shape
        valid_ = torch.ones(B, L, dtype=torch.bool, device=logits.device) if valid is None else valid
        if self.select == "threshold":
            keep = logits > 0
        else:
            scores = logits.masked_fill(~valid_, float("-inf"))
            if self.pin_first:
                scores = torch.cat([torch.full_like(scores[:, :1], float("inf")), scores[:, 1:]], dim=1)
            if self.select == "capacity":
                budget = capacity(L, self.keep_targets[segment])
            else:
                n_valid = valid_.sum(1)
                budget = torch.ceil(n_valid.to(torch.float64) * self.keep_targets[segment]).to(torch.int64)
                budget = budget.unsqueeze(1)
            keep = _rank_desc(scores) < budget
        if self.pin_first:
            keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)
        return keep & valid_

    # ------------------------------------------------------------------ forward
    def forward(self, h: Tensor, x0: Tensor, valid: Optional[Tensor], segment: int, mode: str) -> Tensor:
        logits, mix = self.logits(h, x0, valid, segment)
        if self.capture is not None:  # calibrate_keep, on the inference graph or a sharded training graph
            self.capture.setdefault(segment, []).append((logits.detach(), valid))
        if mode == "keep":
            keep = self._decide(logits, valid, segment)
            if self.recording:
                n_valid = keep.new_full((), keep.numel(), dtype=torch.int64) if valid is None else valid.sum()
                # the rows the block computes: the kept tokens, or with a capacity route its B x C slots
                rows = keep.new_full((), keep.shape[0] * capacity(keep.shape[1], self.keep_targets[segment]),
                                     dtype=torch.int64) if self.select == "capacity" else keep.sum()
                self.kept_counts[segment] = (keep.sum().detach(), n_valid.detach(), keep.numel(), rows.detach())
            return keep
        if mode != "gate":
            raise ValueError(f"FlowGates mode must be 'keep' or 'gate', got {mode!r}")
        soft = torch.sigmoid(logits / self.temperature)
        if self.select != "threshold" or not self.training or self.hard_training:
            gates = hard_straight_through(self._decide(logits, valid, segment), soft)
            if self.training and self.hard_training and self.track_keep > 0 and self.select == "threshold":
                self._track(logits.detach(), valid, segment)
        else:
            gates = gumbel_sigmoid(logits, self.temperature)
            if self.pin_first:
                gates = torch.cat([torch.ones_like(gates[:, :1]), gates[:, 1:]], dim=1)
            if valid is not None:
                gates = gates * valid.to(gates.dtype)
        self.last_gates[segment] = (gates, valid)
        if mix is not None:
            self.last_mix[self.stacks[segment]] = mix
        return gates

    # ------------------------------------------------------------------ per-segment state
    def _segment_tensors(self, segment: int) -> dict:
        """The live tensors that decide `segment`'s tokens: its threshold shift and its gate parameters (the
        released gates' mixture router is its stack's, shared with the stack's other segments; a random
        gate's table is its seed's, so only the shift)."""
        out = {"shift": self.shift[segment:segment + 1]}
        if self.kind == "content":
            out.update(weight=self.scorers[segment].weight, bias=self.scorers[segment].bias)
        elif self.kind == "released":
            router = self.routers[self.stacks[segment]]
            out.update({"table": self.table[:, segment], "router.weight": router.weight, "router.bias": router.bias})
        return out

    def segment_state(self, segment: int) -> dict:
        """Copies of `_segment_tensors` (a plan's tensors: `FlowSparseModel.gate_plans`)."""
        return {name: t.detach().clone() for name, t in self._segment_tensors(segment).items()}

    def load_segment_state(self, segment: int, state: dict) -> None:
        """Set `segment`'s gate from `segment_state`'s tensors."""
        targets = self._segment_tensors(segment)
        for name, value in state.items():
            dst = targets.get(name)
            if dst is None or tuple(dst.shape) != tuple(value.shape):
                raise RecipeError(f"token flow: a plan for segment {segment} gives the gate tensor {name!r} of shape "
                                  f"{tuple(value.shape)}; the {self.kind} gates of this model take "
                                  f"{ {k: tuple(t.shape) for k, t in targets.items()} }. The plan comes from "
                                  "another gate kind or model: compile without plans= for the flow")
            with torch.no_grad():
                dst.copy_(value)

    def _track(self, logits: Tensor, valid: Optional[Tensor], segment: int) -> None:
        valid_ = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid
        pinned = torch.zeros_like(valid_)
        pinned[:, 0] = self.pin_first
        with torch.no_grad():
            target = self.keep_targets[segment]
            self.shift[segment] -= self.track_keep * keep_threshold(logits, valid_, pinned, target)

    def extra_repr(self) -> str:
        return (f"gate={self.kind}, segments={self.n_segments}, select={self.select}, "
                f"keep={self.keep_targets if len(set(self.keep_targets)) > 1 else self.keep_target}, "
                f"temperature={self.temperature}, pin_first={self.pin_first}")

