"""SPION layout generators (Yoon, Han, Moon 2023): SPION-CF, SPION-C, SPION-F.

Each generator takes one layer's attention-probability matrix A [L_q, L_k] (softmax
output, averaged over batch and heads; leading dims, if any, are averaged here) and
returns a `BlockLayout`. Steps, as released (github mlsys-lab-sogang/SPION):

  1. `diagonal_conv`: 'same' convolution with a k x k identity kernel (k = 31),
     out[i, j] = sum_s A[i + s - p, j + s - p], s = 0..k-1, p = (k - 1) // 2, zero outside.
  2. `block_pool`: average over b x b tiles -> block score map S [n_q, n_k].
  3. `quantile_threshold`: t = quantile(S, q), linear interpolation (torch.quantile's rule).
  4. `flood_fill`: greedy walks from every cell of the first row and column; cells stepped to
     with score > t are marked.
  5. mask = marked OR block diagonal; causal layouts then drop tiles above the diagonal.

`SwitchCriterion` decides when to switch from dense to sparse training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparsecc.errors import LayoutError
from sparsecc.layouts.block_layout import BlockLayout, LayoutSet

#: Quantiles used in the paper's tasks (ListOps 0.98, Image/Pathfinder 0.96, Text/Retrieval 0.99).
PAPER_QUANTILES = (0.96, 0.98, 0.99)
#: Default quantile: the released ListOps setting, the middle of the paper's option set.
DEFAULT_QUANTILE = 0.98
#: Default SPION-C density: the released ListOps setting (paper range 0.02-0.05).
DEFAULT_DENSITY = 0.04


def _attention_map(A: torch.Tensor) -> torch.Tensor:
    if not isinstance(A, torch.Tensor) or A.dim() < 2:
        found = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise LayoutError(
            f"attention map must be a tensor [..., L_q, L_k], found {found}; pass softmax probabilities"
        )
    A = A.detach()
    if A.dim() > 2:
        A = A.reshape(-1, *A.shape[-2:]).mean(dim=0)
    if A.dtype != torch.float64:
        A = A.to(torch.float32)
    if not torch.isfinite(A).all():
        raise LayoutError("attention map has NaN or Inf entries; calibrate on finite softmax probabilities")
    return A


def diagonal_conv(A: torch.Tensor, kernel_size: int = 31) -> torch.Tensor:
    """'same' 2-D convolution of A [L_q, L_k] with a kernel_size x kernel_size identity kernel.

    Exactly F.conv2d(A[None, None], eye(k)[None, None], padding='same') up to summation order,
    computed as k shifted slice-adds (O(k L^2) without a k^2 factor, no padded copy).
    Even k follows PyTorch's 'same' convention (one more zero on the trailing side).
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise LayoutError(f"kernel_size must be a positive int, found {kernel_size!r}")
    lq, lk = A.shape
    out = torch.zeros_like(A)
    p = (kernel_size - 1) // 2
    for s in range(kernel_size):
        d = s - p  # out[i, j] += A[i + d, j + d]
        if d >= 0:
            if d < lq and d < lk:
                out[: lq - d, : lk - d] += A[d:, d:]
        elif -d < lq and -d < lk:
            out[-d:, -d:] += A[: lq + d, : lk + d]
    return out


def block_pool(A: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every block_size x block_size tile of A -> [ceil(L_q/b), ceil(L_k/b)].

    Equals F.avg_pool2d(A, b) when b divides both lengths. Otherwise the last tiles are
    averaged over their valid elements (the released code floors and drops the remainder).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise LayoutError(f"block_size must be a positive int, found {block_size!r}")
    lq, lk = A.shape
    nq, nk = math.ceil(lq / block_size), math.ceil(lk / block_size)
    padded = torch.zeros(nq * block_size, nk * block_size, dtype=A.dtype)
    padded[:lq, :lk] = A
    sums = padded.reshape(nq, block_size, nk, block_size).sum(dim=(1, 3))
    rows = torch.full((nq,), block_size, dtype=A.dtype)
    rows[-1] = lq - (nq - 1) * block_size
    cols = torch.full((nk,), block_size, dtype=A.dtype)
    cols[-1] = lk - (nk - 1) * block_size
    return sums / (rows[:, None] * cols[None, :])


def quantile_threshold(S: torch.Tensor, q: float) -> float:
    """quantile(S, q) with linear interpolation, bit-identical to torch.quantile.

    Works for any size (torch.quantile refuses inputs above 16M elements).
    """
    if not 0.0 <= q <= 1.0:
        raise LayoutError(f"quantile must be in [0, 1], found {q}; the paper uses {PAPER_QUANTILES}")
    v = torch.sort(S.flatten()).values
    rank = torch.tensor(q, dtype=v.dtype) * (v.numel() - 1)
    below = int(rank.to(torch.int64))
    above = int(rank.ceil().to(torch.int64))
    return float(torch.lerp(v[below], v[above], rank - below))


def flood_fill(S: torch.Tensor, threshold: float) -> torch.Tensor:
    """Released SPION flood fill on a block score map S [n_q, n_k] -> bool mask of marked cells.

    S is padded with one zero row and column. A walk starts at every cell (0, k) of the first
    row and (k, 0) of the first column. From (x, y), while x + 1 <= n_q and y + 1 <= n_k, with
    down = S[x+1, y], right = S[x, y+1], diag = S[x+1, y+1] (all comparisons strict):
        down > right:  down if down > diag else diagonal
        otherwise:     right if right > diag else diagonal
    The cell stepped to is marked when its score > threshold; a walk never marks its own start
    cell. The walk ends on the padding. The block diagonal is NOT added here.

    A walk that steps onto a cell an earlier walk visited would repeat that walk's path (the
    step rule depends only on the cell), so it stops there: same result, O(n_q * n_k) total.
    """
    nq, nk = S.shape
    t = float(threshold)
    P = [row + [0.0] for row in S.tolist()] + [[0.0] * (nk + 1)]
    marked = [[False] * nk for _ in range(nq)]
    visited = [[False] * (nk + 1) for _ in range(nq + 1)]
    starts = [(0, k) for k in range(nk)] + [(k, 0) for k in range(nq)]
    for x, y in starts:
        visited[x][y] = True
        while x < nq and y < nk:
            down, right, diag = P[x + 1][y], P[x][y + 1], P[x + 1][y + 1]
            if down > right:
                if down > diag:
                    x += 1
                else:
                    x, y = x + 1, y + 1
            elif right > diag:
                y += 1
            else:
                x, y = x + 1, y + 1
            if P[x][y] > t and x < nq and y < nk:
                marked[x][y] = True
            if visited[x][y]:
                break
            visited[x][y] = True
    return torch.tensor(marked, dtype=torch.bool).reshape(nq, nk)


def _finish(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    mask = mask | torch.eye(*mask.shape, dtype=torch.bool)
    return torch.tril(mask) if causal else mask


def _check_quantile(quantile: float) -> None:
    if not 0.0 < quantile < 1.0:
        raise LayoutError(
            f"quantile must be in (0, 1), found {quantile}; the paper uses {PAPER_QUANTILES} "
            "(higher keeps fewer blocks)"
        )


def spion_cf(
    A: torch.Tensor,
    block_size: int = 64,
    quantile: float = DEFAULT_QUANTILE,
    kernel_size: int = 31,
    causal: bool = False,
    name: str | None = None,
) -> BlockLayout:
    """SPION-CF: identity-kernel convolution, block pooling, quantile threshold, flood fill.

    quantile defaults to 0.98 (released ListOps setting; the paper uses 0.96, 0.98 or 0.99 by
    task). The block diagonal is always kept; causal layouts drop tiles above it.
    """
    _check_quantile(quantile)
    A = _attention_map(A)
    S = block_pool(diagonal_conv(A, kernel_size), block_size)
    t = quantile_threshold(S, quantile)
    mask = _finish(flood_fill(S, t), causal)
    meta = {"method": "spion_cf", "quantile": quantile, "threshold": t, "kernel_size": kernel_size,
            "calibrated_len": list(A.shape)}
    return BlockLayout(mask, block_size, causal, name, meta)


def spion_f(
    A: torch.Tensor,
    block_size: int = 64,
    quantile: float = DEFAULT_QUANTILE,
    causal: bool = False,
    name: str | None = None,
) -> BlockLayout:
    """SPION-F: block pooling, quantile threshold, flood fill (no convolution)."""
    _check_quantile(quantile)
    A = _attention_map(A)
    S = block_pool(A, block_size)
    t = quantile_threshold(S, quantile)
    mask = _finish(flood_fill(S, t), causal)
    meta = {"method": "spion_f", "quantile": quantile, "threshold": t, "calibrated_len": list(A.shape)}
    return BlockLayout(mask, block_size, causal, name, meta)


def spion_c(
    A: torch.Tensor,
    block_size: int = 64,
    density: float = DEFAULT_DENSITY,
    kernel_size: int = 31,
    causal: bool = False,
    exclude_diagonal: bool = False,
    name: str | None = None,
) -> BlockLayout:
    """SPION-C: identity-kernel convolution, block pooling, top-k tiles plus the block diagonal.

    As released, k = int(density * n_q * n_k - n_diag) tiles with the highest scores are picked
    among ALL tiles (diagonal included), then the diagonal is added, so the result can hold fewer
    than k + n_diag tiles. exclude_diagonal=True picks the k among off-diagonal tiles instead, so
    exactly k + n_diag tiles are kept. Causal layouts pick only among tiles on or below the
    diagonal. Ties are broken towards the lower row-major index (stable sort).
    """
    if not 0.0 < density <= 1.0:
        raise LayoutError(f"density must be in (0, 1], found {density}; the paper uses 0.02-0.05")
    A = _attention_map(A)
    S = block_pool(diagonal_conv(A, kernel_size), block_size)
    nq, nk = S.shape
    diag = torch.eye(nq, nk, dtype=torch.bool)
    n_diag = min(nq, nk)
    k = int(density * nq * nk - n_diag)
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    if exclude_diagonal:
        allowed &= ~diag
    k = max(0, min(k, int(allowed.sum())))
    scores = torch.where(allowed, S, torch.tensor(-math.inf, dtype=S.dtype)).flatten()
    top = torch.sort(scores, descending=True, stable=True).indices[:k]
    mask = torch.zeros(nq * nk, dtype=torch.bool)
    mask[top] = True
    mask = _finish(mask.reshape(nq, nk), causal)
    meta = {"method": "spion_c", "density_target": density, "k": k, "kernel_size": kernel_size,
            "exclude_diagonal": exclude_diagonal, "calibrated_len": list(A.shape)}
    return BlockLayout(mask, block_size, causal, name, meta)


_GENERATORS = {"spion_cf": spion_cf, "spion_c": spion_c, "spion_f": spion_f}


def spion_layouts(maps: Mapping[str, torch.Tensor], method: str = "spion_cf", **kwargs) -> LayoutSet:
    """One layout per layer from {layer name: attention map}; kwargs go to the generator."""
    if method not in _GENERATORS:
        raise LayoutError(f"unknown SPION method {method!r}; use one of {sorted(_GENERATORS)}")
    gen = _GENERATORS[method]
    return LayoutSet((name, gen(A, name=name, **kwargs)) for name, A in maps.items())


SWITCH_RULES = ("released", "consecutive")


class SwitchCriterion:
    """Dense -> sparse switch rule of SPION, checked every E steps on each layer's attention map.

    rule="released" (main_conv_ff.py): the first check stores A1 as the reference; the second stores
    d = ||A2 - A1||_F and keeps A1; from the third on d_t = ||A_t - reference||_F,
    delta = |d_t - d_prev| / d_prev * 100, d_prev <- d_t, and the switch comes when int(delta) <
    threshold for every layer, else reference <- A_t. So the first comparison is A3 against A1, later
    ones consecutive. rule="consecutive" (the paper's text, sparsecc 0.1): d_t = ||A_t - A_{t-1}||_F
    from the second check on and delta < threshold (no truncation). Either way update() returns True
    (and stays True) once the rule holds; `deltas` has the last check's delta per layer.
    """

    def __init__(self, threshold_pct: float = 15.0, rule: str = "released"):
        if threshold_pct <= 0:
            raise LayoutError(f"threshold_pct must be positive, found {threshold_pct}; the paper uses 15")
        if rule not in SWITCH_RULES:
            raise LayoutError(f"switch rule {rule!r} is not known; expected one of {SWITCH_RULES}")
        self.threshold_pct = float(threshold_pct)
        self.rule = rule
        self.switched = False
        self.steps = 0
        self.deltas: dict[str, float] = {}
        self._reference: dict[str, torch.Tensor] = {}
        self._prev_dist: dict[str, float] = {}

    def update(self, layer_maps: Mapping[str, torch.Tensor]) -> bool:
        """Feed one check's averaged attention maps; True once every layer is stable."""
        if self._reference and set(layer_maps) != set(self._reference):
            raise LayoutError(
                f"layer names changed between checks: had {sorted(self._reference)}, got {sorted(layer_maps)}; "
                "pass the same layers every time"
            )
        self.steps += 1
        maps = {name: _attention_map(A) for name, A in layer_maps.items()}
        if self.switched:
            return True
        dists: dict[str, float] = {}
        for name, A in maps.items():
            if name not in self._reference:
                continue
            prev = self._reference[name]
            if prev.shape != A.shape:
                raise LayoutError(
                    f"layer {name!r}: attention map shape changed from {tuple(prev.shape)} to "
                    f"{tuple(A.shape)}; calibrate with a fixed sequence length"
                )
            dists[name] = float(torch.linalg.norm((A - prev).double()))
        if self._prev_dist:
            self.deltas = {}
            for name, d in dists.items():
                before = self._prev_dist[name]
                if before == 0.0:
                    self.deltas[name] = 0.0 if d == 0.0 else math.inf
                else:
                    self.deltas[name] = abs(d - before) / before * 100.0
            stable = (lambda v: math.isfinite(v) and int(v) < self.threshold_pct) if self.rule == "released" \
                else (lambda v: v < self.threshold_pct)
            self.switched = all(stable(v) for v in self.deltas.values())
        keep_first = self.rule == "released" and self.steps == 2  # A1 stays the reference for A3
        if not keep_first:
            self._reference = maps
        self._prev_dist = dists
        return self.switched
