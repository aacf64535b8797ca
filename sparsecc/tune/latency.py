"""The latency table of `sparsecc.tune`: what each level of each slot costs on one backend, measured once.

For every level (a method config of a slot), the model with that level on every region of the slot
is timed against the dense model, the runs of the two interleaved (load drift on a shared machine
hits both alike); the table keeps both medians. A region's saving at a level is the measured saving
divided by the number of regions of the slot: the layers of a Transformer have one shape, so the
cost of a per-layer recipe is predicted as the dense latency less the savings of its regions, and
the tuned model is then timed end to end. Entries are cached in a JSON file under a key of the
model's weights, the input shapes, the backend and its options and the software and thread count,
so a second tune of the same model on the same machine measures nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from typing import Any, Callable, Optional

import torch

from sparsecc.io import write_text

CACHE_ENV = "SPARSECC_CACHE"


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sparsecc")


def fingerprint(model: torch.nn.Module, example: Any, backend: str, backend_options: Optional[dict]) -> str:
    """A key for everything a latency depends on: weights, input shapes, backend, software (sparsecc's lowering
    included), threads."""
    import platform

    from torch.utils import _pytree as pytree

    h = hashlib.sha256(type(model).__qualname__.encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if p.is_floating_point() and p.numel():
                h.update(f"{float(p.double().sum()):.10e}".encode())
    for leaf in pytree.tree_leaves(example):
        if isinstance(leaf, torch.Tensor):
            h.update(f"{tuple(leaf.shape)}:{leaf.dtype}".encode())
    from sparsecc.version import __version__

    software = [platform.machine(), os.cpu_count(), platform.python_version(), torch.__version__,
                torch.get_num_threads(), __version__]
    for name in ("onnxruntime", "triton"):
        try:
            software.append(__import__(name).__version__)
        except ImportError:
            software.append(None)
    h.update(json.dumps([backend, backend_options or {}, software], sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def interleaved_medians(fns: list[Callable[[], Any]], repeats: int, warmup: int) -> list[float]:
    """The median wall time of each fn, the calls of one round interleaved."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


class LatencyTable:
    """{level key: {"seconds", "dense_seconds", "regions"}} for one model, shape and backend; cached on disk."""

    def __init__(self, key: str, cache_dir: Optional[str] = None):
        self.key = key
        self.path = None if cache_dir is None else os.path.join(cache_dir, f"latency-{key}.json")
        self.entries: dict = {}
        self.measured = 0  # entries measured by this process (the rest came from the cache)
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    self.entries = json.load(f).get("entries", {})
            except (OSError, ValueError):  # a cache that cannot be read is measured again
                self.entries = {}
        self.cached = len(self.entries)

    def __contains__(self, level: str) -> bool:
        return level in self.entries

    def put(self, level: str, seconds: float, dense_seconds: float, regions: int) -> None:
        self.entries[level] = {"seconds": seconds, "dense_seconds": dense_seconds, "regions": regions}
        self.measured += 1
        if self.path:
            kept = {k: e for k, e in self.entries.items() if not e.get("given")}
            write_text(self.path, json.dumps({"key": self.key, "entries": kept}, indent=2))

    def give(self, seconds: dict, regions: dict) -> None:
        """Entries measured elsewhere: {"dense": s, "<slot>:<level>": s}; not written to the cache."""
        from sparsecc.errors import InputError
        if "dense" not in seconds:
            raise InputError(f"tune: latency= needs the dense model's seconds under 'dense' beside the levels' "
                             f"(got keys {sorted(seconds)})")
        for key, value in seconds.items():
            if key == "dense":
                continue
            slot = key.split(":", 1)[0]
            if slot not in regions:
                raise InputError(f"tune: latency key {key!r} names no varied slot; expected '<slot>:<level>' with a "
                                 f"slot of {sorted(regions)} (result.table['entries'] shows the keys)")
            self.entries[key] = {"seconds": float(value), "dense_seconds": float(seconds["dense"]),
                                 "regions": regions[slot], "given": True}

    @property
    def dense_seconds(self) -> float:
        """The dense model's median over every measurement (each level was timed beside it)."""
        values = [e["dense_seconds"] for e in self.entries.values()]
        return statistics.median(values) if values else float("nan")

    def region_saving(self, level: str) -> float:
        """Seconds one region saves at `level` (negative: the level is slower than dense there)."""
        e = self.entries[level]
        return (e["dense_seconds"] - e["seconds"]) / max(e["regions"], 1)

    def to_dict(self) -> dict:
        return {"key": self.key, "path": self.path, "measured": self.measured, "cached": self.cached,
                "dense_seconds": self.dense_seconds, "entries": self.entries}
