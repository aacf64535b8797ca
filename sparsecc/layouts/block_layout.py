"""Block-sparse attention layouts: one boolean block mask per attention layer.

A `BlockLayout` says which (query block, key block) tiles of an attention matrix
are computed; everything else is treated as masked (logit -inf). Element-level
semantics, shared by every op and backend:

    element (q, k) is kept  iff  mask[q // block_size, k // block_size]
                                 and (not causal or k <= q)

The causal rule is top-left aligned, like `scaled_dot_product_attention(...,
is_causal=True)`. A causal layout never keeps a block above the block diagonal.

`LayoutSet` holds the layouts of all layers of one model, by layer name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sparsecc.errors import LayoutError
from sparsecc.io import atomic_write  # noqa: F401  (re-exported)
from sparsecc.layouts.indexing import block_mask_to_csr, block_mask_to_ell

ExtendRule = Literal["error", "diagonal", "repeat_band", "structure"]
_FORMAT = "sparsecc.BlockLayout"
_SET_FORMAT = "sparsecc.LayoutSet"
_VERSION = 1


def ceil_blocks(length: int, block_size: int) -> int:
    """ceil(length / block_size): number of blocks covering `length` tokens."""
    if length < 1 or block_size < 1:
        raise LayoutError(
            f"length and block_size must be positive ints, found length={length}, block_size={block_size}"
        )
    return -(-int(length) // int(block_size))


BAND_SHARE = 0.5  # a diagonal kept in at least this share of its calibrated tiles continues
GLOBAL_SHARE = 0.9  # a row / column kept in at least this share of the tiles it may see is global


def _structure_extension(mask: torch.Tensor, causal: bool, nq: int, nk: int) -> torch.Tensor:
    """The tiles of an (nq x nk) layout beyond `mask` under the "structure" rule (see BlockLayout.fit)."""
    cq, ck = mask.shape
    i = torch.arange(cq).unsqueeze(1)
    j = torch.arange(ck).unsqueeze(0)
    visible = (j <= i) if causal else torch.ones(cq, ck, dtype=torch.bool)
    kept = (mask & visible).float()
    # diagonal d = j - i sits at index d + cq - 1; share of its visible tiles that are kept
    d = (j - i + cq - 1).flatten()
    tiles = torch.zeros(cq + ck - 1).index_add_(0, d, visible.float().flatten())
    share = torch.zeros(cq + ck - 1).index_add_(0, d, kept.flatten()) / tiles.clamp(min=1)
    band = share >= BAND_SHARE
    global_col = kept.sum(0) >= GLOBAL_SHARE * visible.sum(0).clamp(min=1)
    global_row = kept.sum(1) >= GLOBAL_SHARE * visible.sum(1).clamp(min=1)
    qi = torch.arange(nq).unsqueeze(1)
    kj = torch.arange(nk).unsqueeze(0)
    offset = kj - qi + cq - 1
    inside = (offset >= 0) & (offset < band.numel())
    out = qi == kj
    out[inside] |= band[offset[inside]]
    out[:, :min(nk, ck)] |= global_col[:min(nk, ck)].unsqueeze(0)
    out[:min(nq, cq)] |= global_row[:min(nq, cq)].unsqueeze(1)
    return out


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A boolean block mask [query_blocks, key_blocks] plus the block size and causal flag.

    Args:
        mask: bool tensor [query_blocks, key_blocks]; True keeps the tile. A 0/1 tensor
            of another dtype is accepted and converted. Stored on the CPU.
        block_size: tile edge in tokens (same for queries and keys).
        causal: apply the causal rule (k <= q) inside kept tiles; no tile above the
            block diagonal may be kept.
        name: optional label (e.g. the layer name), used in plots and summaries.
        meta: optional JSON-serialisable facts about how the layout was made.
    """

    mask: torch.Tensor
    block_size: int
    causal: bool = False
    name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mask = self.mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise LayoutError(
                f"block mask must be a 2-D tensor [query_blocks, key_blocks], found {found}; "
                "pass one boolean mask per layer (shared by batch and heads)"
            )
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise LayoutError(
                    f"block mask of dtype {mask.dtype} has values other than 0 and 1; "
                    "pass a bool tensor (True = keep the tile)"
                )
            mask = mask != 0
        mask = mask.detach().to("cpu").contiguous()
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise LayoutError(f"block_size must be a positive int, found {self.block_size!r}")
        if self.causal and mask.numel() and torch.triu(mask, diagonal=1).any():
            i, j = (int(v) for v in torch.triu(mask, diagonal=1).nonzero()[0])
            raise LayoutError(
                f"causal layout keeps block ({i}, {j}) above the block diagonal; "
                "drop those blocks (mask = torch.tril(mask)) or build the layout with causal=False"
            )
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "block_size", int(self.block_size))
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "meta", dict(self.meta or {}))

    # ------------------------------------------------------------------ basics
    @classmethod
    def full(cls, seq_len: int, block_size: int, causal: bool = False, name: str | None = None) -> BlockLayout:
        """Dense layout (every tile; lower triangle of tiles when causal) for `seq_len` tokens."""
        n = ceil_blocks(seq_len, block_size)
        mask = torch.ones(n, n, dtype=torch.bool)
        return cls(torch.tril(mask) if causal else mask, block_size, causal, name, {"kind": "full"})

    @property
    def shape(self) -> tuple[int, int]:
        """(query_blocks, key_blocks)."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def num_blocks(self) -> int:
        """Number of kept tiles."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        """Kept tiles / all tiles of the FULL rectangle (query_blocks * key_blocks).

        For causal layouts this is still relative to the full square, not to the lower
        triangle: it is the fraction of dense (non-causal) attention FLOPs computed. A
        dense causal layout of n x n tiles has density (n + 1) / (2 n).
        """
        total = self.mask.numel()
        return self.num_blocks / total if total else 0.0

    @property
    def seq_lens(self) -> tuple[int, int]:
        """Largest (q_len, kv_len) the layout covers: block counts times block_size."""
        return (self.shape[0] * self.block_size, self.shape[1] * self.block_size)

    def empty_rows(self) -> list[int]:
        """Query blocks that keep no key block (their attention rows would be all -inf)."""
        return (~self.mask.any(dim=1)).nonzero().flatten().tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return (
            self.block_size == other.block_size
            and self.causal == other.causal
            and self.mask.shape == other.mask.shape
            and bool(torch.equal(self.mask, other.mask))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        nq, nk = self.shape
        return (
            f"BlockLayout(name={self.name!r}, blocks={nq}x{nk}, block_size={self.block_size}, "
            f"causal={self.causal}, density={self.density:.4f})"
        )

    def with_name(self, name: str | None) -> BlockLayout:
        """The same layout under another name."""
        return BlockLayout(self.mask, self.block_size, self.causal, name, self.meta)

    def within_window(self, window: int) -> BlockLayout:
        """The tiles that meet a causal sliding window of `window` keys (query i sees keys i-window < j <= i,
        positions aligned at the start): the window as a block layout of its own, intersected with this one.
        Partial tiles at the window's edge stay; the attention's mask still hides the keys outside it."""
        if window < 1:
            raise LayoutError(f"window must be a positive number of keys, found {window}")
        b = self.block_size
        rows = torch.arange(self.shape[0]).unsqueeze(1)
        cols = torch.arange(self.shape[1]).unsqueeze(0)
        # tile (I, J) holds some j <= i with j > i - window: J <= I and J's last key > I's first query - window
        meets = (cols <= rows) & ((cols + 1) * b - 1 > rows * b - window)
        return BlockLayout(self.mask & meets, b, self.causal, self.name, {**self.meta, "window": int(window)})

    # ----------------------------------------------------------------- indices
    def ell(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded-row view: (indices int64 [nq, max_kept], counts int64 [nq]); see indexing.py."""
        return block_mask_to_ell(self.mask)

    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block CSR view: (crow_indices int64 [nq + 1], col_indices int64 [nnz])."""
        return block_mask_to_csr(self.mask)

    # ---------------------------------------------------------------- lengths
    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise LayoutError unless the layout has exactly ceil(len / block_size) blocks per axis."""
        need = (ceil_blocks(q_len, self.block_size), ceil_blocks(kv_len, self.block_size))
        if need != self.shape:
            raise LayoutError(
                f"layout {self.name or ''} has {self.shape[0]}x{self.shape[1]} blocks of {self.block_size} "
                f"(covers q_len <= {self.seq_lens[0]}, kv_len <= {self.seq_lens[1]}), but attention with "
                f"q_len={q_len}, kv_len={kv_len} needs {need[0]}x{need[1]} blocks; "
                "call layout.fit(q_len, kv_len, extend=...) first"
            )

    def check_covers(self, q_len: int, kv_len: int) -> None:
        """Raise LayoutError unless the layout has at least ceil(len / block_size) blocks per axis (a layout
        made for longer sequences serves shorter ones with its top-left corner)."""
        need = (ceil_blocks(q_len, self.block_size), ceil_blocks(kv_len, self.block_size))
        if need[0] > self.shape[0] or need[1] > self.shape[1]:
            raise LayoutError(
                f"layout {self.name or ''} has {self.shape[0]}x{self.shape[1]} blocks of {self.block_size} "
                f"(covers q_len <= {self.seq_lens[0]}, kv_len <= {self.seq_lens[1]}), but attention with "
                f"q_len={q_len}, kv_len={kv_len} needs {need[0]}x{need[1]} blocks; compile with max_len (Spion/Fixed) at least the longest "
                "length you will run, or call layout.fit(q_len, kv_len, extend='structure')"
            )

    def _resolve(self, q_len: int | None, kv_len: int | None) -> tuple[int, int]:
        q_len = self.seq_lens[0] if q_len is None else int(q_len)
        kv_len = self.seq_lens[1] if kv_len is None else int(kv_len)
        self.check_lengths(q_len, kv_len)
        return q_len, kv_len

    def dense_mask(self, q_len: int | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Element-level bool mask [q_len, kv_len] (True = attend). O(q_len * kv_len); for tests.

        Lengths default to the full block extent; they must need exactly the layout's block counts.
        """
        q_len, kv_len = self._resolve(q_len, kv_len)
        b = self.block_size
        dense = self.mask.repeat_interleave(b, 0)[:q_len].repeat_interleave(b, 1)[:, :kv_len]
        if self.causal:
            dense = dense & torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        return dense

    def fit(self, q_len: int, kv_len: int | None = None, extend: ExtendRule = "error") -> BlockLayout:
        """A layout for other sequence lengths (kv_len defaults to q_len).

        Shorter lengths crop the mask to ceil(len / block_size) blocks. Longer lengths follow
        `extend`; tiles inside the calibrated rectangle always keep their calibrated value:
          - "error" (default): raise LayoutError naming the calibrated and requested lengths.
          - "diagonal": new tiles keep only the block diagonal (i == j).
          - "repeat_band": a new tile (i, j) is kept iff the calibrated layout keeps any tile at
            offset j - i (extends every diagonal the calibration found; suits shift-invariant
            patterns such as local windows).
          - "structure": a new tile (i, j) is kept iff i == j, or the calibrated layout keeps at least
            half the tiles of diagonal j - i (a band), or key block j is a global column (kept by at
            least 90 % of the calibrated query rows that may see it), or query block i is a global
            row (keeps at least 90 % of the key blocks it may see). This continues what attention
            maps show on real models (a local band, [CLS]/sink tokens) without copying one-off
            blocks; the rule SPION and the fixed patterns use for `max_len`.
        The causal rule then drops tiles above the block diagonal (never any for these rules).
        """
        kv_len = q_len if kv_len is None else kv_len
        nq, nk = ceil_blocks(q_len, self.block_size), ceil_blocks(kv_len, self.block_size)
        cq, ck = self.shape
        if (nq, nk) == (cq, ck):
            return self
        if nq <= cq and nk <= ck:
            mask = self.mask[:nq, :nk].clone()
        else:
            if extend == "error":
                raise LayoutError(
                    f"layout {self.name or ''} was calibrated for q_len <= {self.seq_lens[0]}, "
                    f"kv_len <= {self.seq_lens[1]} ({cq}x{ck} blocks of {self.block_size}); requested "
                    f"q_len={q_len}, kv_len={kv_len} ({nq}x{nk} blocks). Recalibrate at the longer "
                    "length, or pass extend='structure', 'diagonal' or 'repeat_band' to fit()"
                )
            i = torch.arange(nq).unsqueeze(1)
            j = torch.arange(nk).unsqueeze(0)
            if extend == "diagonal":
                mask = i == j
            elif extend == "repeat_band":
                offsets = self.mask.nonzero()
                present = torch.zeros(cq + ck - 1, dtype=torch.bool)  # offset d = j - i at index d + cq - 1
                present[offsets[:, 1] - offsets[:, 0] + cq - 1] = True
                d = (j - i) + cq - 1
                inside = (d >= 0) & (d < present.numel())
                mask = torch.zeros(nq, nk, dtype=torch.bool)
                mask[inside] = present[d[inside]]
            elif extend == "structure":
                mask = _structure_extension(self.mask, self.causal, nq, nk)
            else:
                raise LayoutError(
                    f"extend={extend!r} is not a known rule; use 'error', 'diagonal', 'repeat_band' or 'structure'"
                )
            keep_q, keep_k = min(nq, cq), min(nk, ck)
            mask[:keep_q, :keep_k] = self.mask[:keep_q, :keep_k]
        if self.causal:
            mask = torch.tril(mask)
        meta = dict(self.meta, fitted_from=[cq, ck], extend=extend)
        return BlockLayout(mask, self.block_size, self.causal, self.name, meta)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and values (what `save` writes)."""
        try:
            meta_json = json.dumps(self.meta)
        except TypeError as e:
            raise LayoutError(
                f"layout meta must be JSON-serialisable to be saved ({e}); keep plain numbers, "
                "strings, lists and dicts in meta"
            ) from None
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "mask": self.mask,
            "block_size": self.block_size,
            "causal": self.causal,
            "name": self.name,
            "meta_json": meta_json,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "dict") -> BlockLayout:
        """Inverse of `to_dict`."""
        if d.get("format") != _FORMAT or "mask" not in d:
            raise LayoutError(
                f"{source} is not a saved BlockLayout (format={d.get('format')!r}, expected {_FORMAT!r}); "
                "write layouts with BlockLayout.save"
            )
        if int(d.get("version", 0)) > _VERSION:
            raise LayoutError(
                f"{source} has layout format version {d['version']}, this sparsecc reads <= {_VERSION}; "
                "upgrade sparsecc"
            )
        return cls(d["mask"], int(d["block_size"]), bool(d["causal"]), d.get("name"), json.loads(d["meta_json"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write the layout with torch.save (plain tensors and values), atomically."""
        data = self.to_dict()
        atomic_write(path, lambda tmp: torch.save(data, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockLayout:
        """Read a layout written by `save` (weights_only loading: no code is executed)."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise LayoutError(f"no layout file at {path}; check the path or run the calibration first") from None
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
            raise LayoutError(f"could not read a layout from {path} ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise LayoutError(f"{path} holds a {type(data).__name__}, expected a saved BlockLayout")
        return cls.from_dict(data, source=str(path))

    # ------------------------------------------------------------------- flex
    def to_flex_block_mask(
        self,
        batch: int | None = None,
        heads: int | None = None,
        device: str | torch.device = "cpu",
        q_len: int | None = None,
        kv_len: int | None = None,
    ):
        """A `torch.nn.attention.flex_attention.BlockMask` with the same element-level semantics.

        Tiles that are fully visible are passed as "full" blocks (the compiled kernel skips the
        mask_mod there); causal tiles on the block diagonal are "partial" blocks. The mask_mod
        also encodes the block mask, because uncompiled (eager) flex_attention ignores the block
        structure and applies only the mask_mod. batch/heads None broadcast (size 1).
        """
        from torch.nn.attention.flex_attention import BlockMask

        q_len, kv_len = self._resolve(q_len, kv_len)
        nq, nk = self.shape
        b = self.block_size
        blocks = self.mask.to(device)
        if self.causal:
            diag = torch.eye(nq, nk, dtype=torch.bool)
            partial, full = self.mask & diag, self.mask & ~diag
        else:
            partial, full = torch.zeros_like(self.mask), self.mask

        def kv_view(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Kept key blocks first in ascending order, padded to nk columns (flex reads kv_len from it).
            order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices
            shape = (batch or 1, heads or 1)
            num = m.sum(dim=1).to(torch.int32).to(device).expand(*shape, nq).contiguous()
            idx = order.to(torch.int32).to(device).expand(*shape, nq, nk).contiguous()
            return num, idx

        kv_num, kv_idx = kv_view(partial)
        full_num, full_idx = kv_view(full)

        if self.causal:

            def mask_mod(b_, h_, q_idx, kv_idx_):
                return blocks[q_idx // b, kv_idx_ // b] & (kv_idx_ <= q_idx)

        else:

            def mask_mod(b_, h_, q_idx, kv_idx_):
                return blocks[q_idx // b, kv_idx_ // b]

        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=b, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
        )


class LayoutSet(MutableMapping[str, BlockLayout]):
    """Ordered mapping layer name -> BlockLayout for all attention layers of one model."""

    def __init__(self, layouts: Mapping[str, BlockLayout] | Iterable[tuple[str, BlockLayout]] | None = None):
        self._layouts: dict[str, BlockLayout] = {}
        items = layouts.items() if isinstance(layouts, Mapping) else (layouts or ())
        for name, layout in items:
            self[name] = layout

    def __getitem__(self, name: str) -> BlockLayout:
        try:
            return self._layouts[name]
        except KeyError:
            raise KeyError(f"no layout for layer {name!r}; layers: {list(self._layouts)}") from None

    def __setitem__(self, name: str, layout: BlockLayout) -> None:
        if not isinstance(name, str):
            raise LayoutError(f"layer names must be str, found {type(name).__name__} {name!r}")
        if not isinstance(layout, BlockLayout):
            raise LayoutError(f"layer {name!r}: expected a BlockLayout, found {type(layout).__name__}")
        self._layouts[name] = layout if layout.name == name else layout.with_name(name)

    def __delitem__(self, name: str) -> None:
        del self._layouts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layouts)

    def __len__(self) -> int:
        return len(self._layouts)

    def __repr__(self) -> str:
        return f"LayoutSet({len(self)} layers, mean density {self.mean_density():.4f})"

    def densities(self) -> dict[str, float]:
        """Per-layer density (fraction of the full tile rectangle kept), in layer order."""
        return {name: layout.density for name, layout in self._layouts.items()}

    def mean_density(self) -> float:
        """Unweighted mean of the per-layer densities (0.0 for an empty set)."""
        d = list(self.densities().values())
        return sum(d) / len(d) if d else 0.0

    def summary(self) -> str:
        """A plain-text table: layer, blocks, block size, causal, kept tiles, density."""
        rows = [("layer", "blocks", "block", "causal", "kept", "density")]
        for name, lay in self._layouts.items():
            nq, nk = lay.shape
            rows.append((name, f"{nq}x{nk}", str(lay.block_size), "yes" if lay.causal else "no",
                         str(lay.num_blocks), f"{lay.density:.4f}"))
        rows.append(("mean", "", "", "", "", f"{self.mean_density():.4f}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def save_dir(self, directory: str | os.PathLike) -> None:
        """Write one file per layer (layer_000.pt, ...) and index.json (written last, atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, (name, layout) in enumerate(self._layouts.items()):
            fname = f"layer_{i:03d}.pt"
            layout.save(directory / fname)
            entries.append({"name": name, "file": fname, "shape": list(layout.shape),
                            "block_size": layout.block_size, "causal": layout.causal,
                            "density": layout.density})
        index = {"format": _SET_FORMAT, "version": _VERSION, "layers": entries}
        text = json.dumps(index, indent=2)
        atomic_write(directory / "index.json", lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load_dir(cls, directory: str | os.PathLike) -> LayoutSet:
        """Read a directory written by `save_dir`."""
        index_path = Path(directory) / "index.json"
        if not index_path.is_file():
            raise LayoutError(
                f"no index.json in {directory}; expected a directory written by LayoutSet.save_dir"
            )
        index = json.loads(index_path.read_text())
        if index.get("format") != _SET_FORMAT:
            raise LayoutError(
                f"{index_path} has format {index.get('format')!r}, expected {_SET_FORMAT!r}"
            )
        out = cls()
        for entry in index["layers"]:
            out[entry["name"]] = BlockLayout.load(Path(directory) / entry["file"])
        return out

