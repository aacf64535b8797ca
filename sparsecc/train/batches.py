"""The batch stream every training loop reads: the batches again and again, in their order."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from sparsecc.errors import InputError

__all__ = ["cycle"]


def cycle(batches: Iterable[Any], caller: str) -> Iterator[Any]:
    """Yield `batches` over and over (re-iterated each pass, so a list or a loader with a seeded order repeats
    the same sequence); raise InputError naming `caller` when a pass yields nothing."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise InputError(f"{caller} got an empty iterable of batches")
