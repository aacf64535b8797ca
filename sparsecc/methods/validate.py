"""Validation of method configs: every field against its annotation, then the method's own rules.

Configs call `check_fields(self, "recipe.attention", ...)` in `__post_init__`, so a bad value
fails where it is made (in Python or from a recipe file) with the field, the value and what
is allowed: `Spion(block=True)`, `SparseFFN(steps=-5)`, `TokenFlow(init=nan)` all raise.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Iterable

from sparsecc.errors import RecipeError


def check_type(where: str, value: Any, expected: Any) -> None:
    """Raise a RecipeError unless `value` fits the annotation `expected` (bools are not ints; floats finite)."""
    origin = typing.get_origin(expected)
    options = typing.get_args(expected) if origin is typing.Union else (expected,)
    for option in options:
        if option is type(None) and value is None:
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RecipeError(f"{where}: got {value!r}; expected a finite number")
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option in (str, bool) and isinstance(value, option):
            return
        if typing.get_origin(option) is typing.Literal and value in typing.get_args(option):
            return
        if typing.get_origin(option) in (tuple, list) and isinstance(value, (tuple, list)):
            inner = typing.get_args(option)
            for i, item in enumerate(value):
                if inner and inner[0] is not Ellipsis:
                    check_type(f"{where}[{i}]", item, inner[0])
            return
    allowed = [getattr(o, "__name__", str(o)) for o in options]
    raise RecipeError(f"{where}: got {value!r} ({type(value).__name__}); expected {' or '.join(allowed)}")


def check_fields(cfg: Any, where: str, *, choices: dict | None = None, positive_ints: Iterable[str] = (),
                 nonnegative: Iterable[str] = (), positive: Iterable[str] = (), unit: Iterable[str] = (),
                 open_unit: Iterable[str] = ()) -> None:
    """Check every dataclass field of `cfg` against its annotation, then the named rules:
    choices {field: allowed values}, positive_ints (int >= 1), nonnegative (>= 0), positive (> 0),
    unit (0 < x <= 1), open_unit (0 < x < 1)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        check_type(f"{where}.{f.name}", getattr(cfg, f.name), hints[f.name])
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise RecipeError(f"{where}.{name}: got {getattr(cfg, name)!r}; allowed: {list(allowed)}")
    for name in positive_ints:
        if getattr(cfg, name) < 1:
            raise RecipeError(f"{where}.{name}: got {getattr(cfg, name)!r}; expected an int >= 1")
    for name in nonnegative:
        if getattr(cfg, name) < 0:
            raise RecipeError(f"{where}.{name}: got {getattr(cfg, name)!r}; expected >= 0")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise RecipeError(f"{where}.{name}: got {getattr(cfg, name)!r}; expected > 0")
    for name in unit:
        if not 0.0 < getattr(cfg, name) <= 1.0:
            raise RecipeError(f"{where}.{name}: got {getattr(cfg, name)!r}; expected 0 < {name} <= 1")
    for name in open_unit:
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise RecipeError(f"{where}.{name}: got {getattr(cfg, name)!r}; expected 0 < {name} < 1")


def check_max_len(cfg: Any, where: str) -> None:
    """`max_len` is None (the model's maximum positions) or a length of at least one block."""
    if cfg.max_len is not None and cfg.max_len < cfg.block:
        raise RecipeError(f"{where}.max_len: got {cfg.max_len!r}; expected None (the model's maximum positions) "
                          f"or a sequence length >= block ({cfg.block})")
