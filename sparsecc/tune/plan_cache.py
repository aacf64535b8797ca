"""The plan cache of `sparsecc.tune`: each level's calibrated plans, kept on disk between tunes.

A level's plans (SPION layouts, sparse FFN controllers) depend on the dense weights, the calibration
batches and the level's config only, not on the budget or the backend. Tuning the same model again
with another budget, another backend or fine-tuning then calibrates nothing. One file per level,
`plans-<key>.pt`, keyed by a hash of the weights, the calibration batches' contents, the config and
the sparsecc version; read with torch.load(weights_only=True) (plain values and tensors only).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import torch

from sparsecc.io import atomic_write
from sparsecc.methods.base import Plan


def plans_key(weights_key: str, calibration: list, config: Any) -> str:
    from torch.utils import _pytree as pytree

    from sparsecc.version import __version__

    h = hashlib.sha256(f"{weights_key}|{config!r}|{__version__}".encode())
    for leaf in pytree.tree_leaves(calibration):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()[:24]


class PlanCache:
    """get(key) -> (rewritten {layer: [region names]}, plans {region: Plan}) or None; put(key, rewritten, plans)."""

    def __init__(self, cache_dir: Optional[str]):
        self.cache_dir = cache_dir
        self.hits = 0

    def _path(self, key: str) -> Optional[str]:
        return None if self.cache_dir is None else os.path.join(self.cache_dir, f"plans-{key}.pt")

    def get(self, key: str) -> Optional[tuple[dict, dict]]:
        path = self._path(key)
        if path is None or not os.path.isfile(path):
            return None
        try:
            data = torch.load(path, weights_only=True)
            # layer -> its region names (a single name in files of sparsecc before flow levels)
            rewritten = {int(layer): [names] if isinstance(names, str) else list(names)
                         for layer, names in data["rewritten"].items()}
            plans = {region: Plan(method=p["method"], region=region, values=json.loads(p["values"]),
                                  tensors=dict(p["tensors"]), version=p["version"])
                     for region, p in data["plans"].items()}
        except Exception:  # noqa: BLE001 - a cache file that cannot be read is calibrated again
            return None
        self.hits += 1
        return rewritten, plans

    def put(self, key: str, rewritten: dict, plans: dict) -> None:
        path = self._path(key)
        if path is None:
            return
        data = {"rewritten": {str(layer): list(names) for layer, names in rewritten.items()},
                "plans": {region: {"method": p.method, "version": p.version, "values": json.dumps(p.values),
                                   "tensors": {n: t.detach().cpu() for n, t in p.tensors.items()}}
                          for region, p in plans.items()}}
        atomic_write(path, lambda tmp: torch.save(data, tmp))
