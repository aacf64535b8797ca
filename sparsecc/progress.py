"""Progress bars for long work (calibration, training, benchmarks): tqdm when installed."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "batch", enabled: bool = True) -> Iterable[T]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False)
