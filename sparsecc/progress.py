"""Progress bars for long work (calibration, training, benchmarks): tqdm when installed."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "batch", enabled: bool = True) -> Iterable[T]:
    """`items` with a progress bar; iterates `items` exactly once (tqdm.auto's wrapper calls iter() twice,
    which reads a re-iterable data source twice)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return _with_bar(items, tqdm(desc=desc, unit=unit, leave=False, total=_length(items)))


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _with_bar(items: Iterable[T], bar) -> Iterator[T]:
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
