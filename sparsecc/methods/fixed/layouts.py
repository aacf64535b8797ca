"""Fixed (data-independent) block layouts: local window, strided, BigBird, Longformer, random.

All take `seq_len` and `block_size` and build a square n x n layout, n = ceil(seq_len /
block_size). `window` is the number of key blocks in each row's band (BigBird's convention,
window=3 -> blocks i-1, i, i+1): non-causal rows keep offsets j - i in
[-(window // 2), (window - 1) // 2], causal rows keep the `window` blocks i-window+1 .. i.
Every layout keeps the block diagonal, so no query row is empty.

`layout_at_density` picks each family's free parameter to approach a target density, for
comparisons at equal cost.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from sparsecc.errors import LayoutError
from sparsecc.layouts.block_layout import BlockLayout, ceil_blocks

LayoutKind = Literal["local", "strided", "bigbird", "longformer", "random"]


def _check_pos(**values: int) -> None:
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LayoutError(f"{key} must be a positive int, found {v!r}")


def _offsets(n: int) -> torch.Tensor:
    """d[i, j] = j - i for an n x n block grid."""
    ar = torch.arange(n)
    return ar[None, :] - ar[:, None]


def _band(n: int, window: int, causal: bool) -> torch.Tensor:
    d = _offsets(n)
    if causal:
        return (d <= 0) & (d > -window)
    return (d >= -(window // 2)) & (d <= (window - 1) // 2)


def _allowed(n: int, causal: bool) -> torch.Tensor:
    ones = torch.ones(n, n, dtype=torch.bool)
    return torch.tril(ones) if causal else ones


def local_window(seq_len: int, block_size: int, window: int = 3, causal: bool = False) -> BlockLayout:
    """Sliding window of `window` key blocks per query block (see the module docstring)."""
    _check_pos(seq_len=seq_len, block_size=block_size, window=window)
    n = ceil_blocks(seq_len, block_size)
    meta = {"kind": "local", "window": window}
    return BlockLayout(_band(n, window, causal), block_size, causal, f"local(w={window})", meta)


def strided(seq_len: int, block_size: int, stride: int = 4, window: int = 1, causal: bool = False) -> BlockLayout:
    """Block version of the Sparse Transformer strided pattern.

    Keeps the band of `window` blocks plus every tile whose offset j - i is a multiple of
    `stride` (each query block sees every stride-th key block, aligned to itself).
    """
    _check_pos(seq_len=seq_len, block_size=block_size, stride=stride, window=window)
    n = ceil_blocks(seq_len, block_size)
    mask = (_band(n, window, causal) | (_offsets(n) % stride == 0)) & _allowed(n, causal)
    meta = {"kind": "strided", "stride": stride, "window": window}
    return BlockLayout(mask, block_size, causal, f"strided(s={stride})", meta)


def _bigbird_base(n: int, window: int, global_blocks: int, causal: bool) -> torch.Tensor:
    mask = _band(n, window, causal)
    g = min(global_blocks, n)
    mask[:g, :] = True
    mask[:, :g] = True
    return mask & _allowed(n, causal)


def bigbird(
    seq_len: int,
    block_size: int,
    window: int = 3,
    global_blocks: int = 2,
    random_blocks: int = 3,
    seed: int = 0,
    causal: bool = False,
) -> BlockLayout:
    """BigBird block layout: sliding window + global blocks + random blocks per row.

    Global blocks are the first `global_blocks` block indices: those query rows see every key
    block and every query row sees those key blocks (for causal layouts, only on or below the
    diagonal). Each row then gets up to `random_blocks` extra key blocks drawn uniformly among
    the allowed blocks it does not keep yet (torch.Generator seeded with `seed`).
    """
    _check_pos(seq_len=seq_len, block_size=block_size, window=window)
    if global_blocks < 0 or random_blocks < 0:
        raise LayoutError(
            f"global_blocks and random_blocks must be >= 0, found {global_blocks}, {random_blocks}"
        )
    n = ceil_blocks(seq_len, block_size)
    mask = _bigbird_base(n, window, global_blocks, causal)
    free = _allowed(n, causal) & ~mask
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        cand = free[i].nonzero().flatten()
        if random_blocks and cand.numel():
            pick = cand[torch.randperm(cand.numel(), generator=gen)[:random_blocks]]
            mask[i, pick] = True
    meta = {"kind": "bigbird", "window": window, "global_blocks": global_blocks,
            "random_blocks": random_blocks, "seed": seed}
    return BlockLayout(mask, block_size, causal, f"bigbird(w={window},g={global_blocks},r={random_blocks})", meta)


def longformer(seq_len: int, block_size: int, window: int = 3, global_blocks: int = 1,
               causal: bool = False) -> BlockLayout:
    """Longformer block layout: a sliding window of `window` key blocks plus `global_blocks` global blocks
    (the first block indices: their queries see every key block and every query sees them), no random blocks."""
    _check_pos(seq_len=seq_len, block_size=block_size, window=window)
    if global_blocks < 0:
        raise LayoutError(f"global_blocks must be >= 0, found {global_blocks}")
    n = ceil_blocks(seq_len, block_size)
    meta = {"kind": "longformer", "window": window, "global_blocks": global_blocks}
    return BlockLayout(_bigbird_base(n, window, global_blocks, causal), block_size, causal,
                       f"longformer(w={window},g={global_blocks})", meta)


def _per_offset(n: int, causal: bool) -> torch.Tensor:
    """Blocks of an n x n grid on each offset d = j - i, d = -(n-1) .. n-1 (causal: none above the diagonal)."""
    d = torch.arange(-(n - 1), n)
    count = n - d.abs()
    return count.masked_fill(d > 0, 0) if causal else count


def _band_count(n: int, window: int, causal: bool) -> int:
    """Blocks of `_band(n, window, causal)`, counted per offset (no n x n mask)."""
    lo, hi = (-(window - 1), 0) if causal else (-(window // 2), (window - 1) // 2)
    lo, hi = max(lo, -(n - 1)), min(hi, n - 1)
    return int(_per_offset(n, causal)[lo + n - 1:hi + n].sum())


def _longformer_count(n: int, window: int, global_blocks: int, causal: bool) -> int:
    """Blocks of `_bigbird_base(n, window, global_blocks, causal)` for global_blocks 0 or 1."""
    count = _band_count(n, window, causal)
    if global_blocks:
        lo, hi = (-(window - 1), 0) if causal else (-(window // 2), (window - 1) // 2)
        row0 = 0 if causal else (n - 1) - min(hi, n - 1)  # row 0 outside the band: offsets hi+1 .. n-1
        col0 = (n - 1) - min(-lo, n - 1)  # column 0 outside the band: offsets -(n-1) .. lo-1
        count += row0 + col0
    return count


def _bigbird_min_density(n: int, causal: bool) -> float:
    """Density of the smallest layout with BigBird's structure: window 3 and one global block."""
    return int(_bigbird_base(n, 3, 1, causal).sum()) / (n * n)


def _density_range(n: int, causal: bool) -> tuple[float, float]:
    return 1.0 / n, int(_allowed(n, causal).sum()) / (n * n)


def _check_density(density: float, n: int, causal: bool, block_size: int) -> None:
    lo, hi = _density_range(n, causal)
    if not lo - 1e-12 <= density <= hi + 1e-12:
        why = (f"at least the block diagonal ({n} of {n * n} blocks) is kept"
               + (f", and a causal layout keeps no block above the diagonal, so at most {n * (n + 1) // 2} of "
                  f"{n * n} blocks" if causal else ""))
        raise LayoutError(
            f"density {density} is outside [{lo:.4f}, {hi:.4f}], the range a {'causal ' if causal else ''}layout of "
            f"{n}x{n} blocks of {block_size} can reach: {why}. Use a density inside the range "
            "(or a smaller block for lower densities)"
        )


def random_layout(
    seq_len: int, block_size: int, density: float = 0.1, seed: int = 0, causal: bool = False
) -> BlockLayout:
    """The block diagonal plus uniformly random tiles: round(density * n^2) tiles in all.

    density is relative to the full n x n square (as BlockLayout.density); causal layouts draw
    only on or below the diagonal.
    """
    _check_pos(seq_len=seq_len, block_size=block_size)
    n = ceil_blocks(seq_len, block_size)
    _check_density(density, n, causal, block_size)
    diag = torch.eye(n, dtype=torch.bool)
    free = (_allowed(n, causal) & ~diag).flatten().nonzero().flatten()
    extra = min(max(round(density * n * n) - n, 0), free.numel())
    gen = torch.Generator().manual_seed(seed)
    mask = diag.flatten().clone()
    mask[free[torch.randperm(free.numel(), generator=gen)[:extra]]] = True
    meta = {"kind": "random", "density_target": density, "seed": seed}
    return BlockLayout(mask.reshape(n, n), block_size, causal, f"random({density:g})", meta)


def layout_at_density(
    kind: LayoutKind, seq_len: int, block_size: int, density: float, causal: bool = False, seed: int = 0
) -> BlockLayout:
    """A `kind` layout whose density is as close as the family allows to `density`.

    - "local": the window (1 .. 2n-1, or 1 .. n causal) with the nearest density.
    - "strided": window 1 and the stride with the nearest density.
    - "bigbird": random_blocks per row chosen for the nearest density, trying (window,
      global_blocks) = (3, 2), (3, 1), (1, 1), (1, 0) in this order and taking the first that
      comes within half a block per row (0.5 / n) of the target, else the nearest overall.
      Below the density of window 3 + one global block the result is no longer BigBird-shaped,
      and a UserWarning says so (use a smaller block_size there).
    - "longformer": one global block and the window with the nearest density.
    - "random": exact up to rounding to whole tiles.
    Ties go to the smaller parameter. meta["density_target"] records the request.
    """
    _check_pos(seq_len=seq_len, block_size=block_size)
    n = ceil_blocks(seq_len, block_size)
    _check_density(density, n, causal, block_size)
    total = n * n

    def nearest(candidates: list[tuple[int, float]]) -> tuple[int, float]:
        return min(candidates, key=lambda c: (abs(c[1] - density), c[0]))

    if kind == "random":
        layout = random_layout(seq_len, block_size, density, seed, causal)
    elif kind == "local":
        widths = range(1, (n if causal else 2 * n - 1) + 1)
        w, _ = nearest([(w, _band_count(n, w, causal) / total) for w in widths])
        layout = local_window(seq_len, block_size, w, causal)
    elif kind == "strided":
        per_offset = _per_offset(n, causal)
        offsets = torch.arange(-(n - 1), n)
        counts = []
        for s in range(1, n + 1):  # window 1 (the diagonal, offset 0) plus every offset divisible by s
            counts.append((s, int(per_offset[offsets % s == 0].sum()) / total))
        s, _ = nearest(counts)
        layout = strided(seq_len, block_size, s, 1, causal)
    elif kind == "longformer":
        widths = range(1, (n if causal else 2 * n - 1) + 1)
        g = 1 if n > 1 else 0
        w, _ = nearest([(w, _longformer_count(n, w, g, causal) / total) for w in widths])
        layout = longformer(seq_len, block_size, w, g, causal)
    elif kind == "bigbird":
        allowed = _allowed(n, causal)
        best: tuple[float, int, int, int] | None = None
        for window, g in ((3, 2), (3, 1), (1, 1), (1, 0)):
            base = _bigbird_base(n, window, g, causal)
            avail = (allowed & ~base).sum(dim=1)
            base_count = int(base.sum())
            options = [(r, (base_count + int(avail.clamp(max=r).sum())) / total) for r in range(n + 1)]
            r, d = nearest(options)
            err = abs(d - density)
            if err <= 0.5 / n:
                best = (err, window, g, r)
                break
            if best is None or err < best[0]:
                best = (err, window, g, r)
        assert best is not None
        _, window, g, r = best
        if window < 3 or g < 1:
            warnings.warn(
                f"bigbird at density {density:.4f} on {n}x{n} blocks of {block_size} cannot keep its window of 3 "
                f"blocks and a global block (it would need density >= {_bigbird_min_density(n, causal):.4f}); "
                f"falling back to window {window}, {g} global and {r} random blocks per row, which is no longer "
                "BigBird's structure. Use a smaller block_size for a BigBird layout at this density.",
                stacklevel=2,
            )
        layout = bigbird(seq_len, block_size, window, g, r, seed, causal)
    else:
        raise LayoutError(f"unknown layout kind {kind!r}; use 'local', 'strided', 'bigbird', 'longformer' or 'random'")
    meta = dict(layout.meta, density_target=density)
    return BlockLayout(layout.mask, block_size, causal, layout.name, meta)
