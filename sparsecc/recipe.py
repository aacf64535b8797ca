"""Recipes: plain data saying which method each region gets.

    Recipe(attention=Identity(), ffn=Identity(), flow=None)
    Recipe(attention={"0-3": Spion(quantile=0.98), "4-": Fixed(pattern="bigbird", density=0.1)})

A slot takes None (left dense), one method config, or a per-layer mapping from layer
ranges ("3", "0-3", "4-") to configs (None: that layer stays dense; a layer no range
covers stays dense too). Configs are frozen dataclasses registered with their handler
(`sparsecc.methods.register`). Recipes load from TOML, JSON or YAML, where a per-layer
slot is a table of ranges:

    [attention."0-3"]
    kind = "spion"
    quantile = 0.98

    [attention."4-"]
    kind = "fixed"
    pattern = "bigbird"
    density = 0.1

Validation names the bad field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from sparsecc import methods as _methods  # noqa: F401  (registers the built-in methods)
from sparsecc.errors import RecipeError
from sparsecc.methods.identity import Identity
from sparsecc.methods.registry import SLOTS, config_class, config_classes, kinds

_RANGE = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d+)?)?\s*$")


@dataclass(frozen=True)
class LayerRange:
    """Layers first..last (last None: to the end), as written "3", "0-3" or "4-"."""

    first: int
    last: Optional[int]

    @classmethod
    def parse(cls, text: Any, where: str) -> "LayerRange":
        m = _RANGE.match(str(text))
        if m is None:
            raise RecipeError(f"{where}: layer range {text!r} is not of the form '3', '0-3' or '4-'")
        first = int(m.group(1))
        last = first if m.group(2) is None else (int(m.group(3)) if m.group(3) is not None else None)
        if last is not None and last < first:
            raise RecipeError(f"{where}: layer range {text!r} ends before it starts")
        return cls(first, last)

    def __contains__(self, layer: int) -> bool:
        return self.first <= layer and (self.last is None or layer <= self.last)

    def overlaps(self, other: "LayerRange") -> bool:
        a_end = float("inf") if self.last is None else self.last
        b_end = float("inf") if other.last is None else other.last
        return self.first <= b_end and other.first <= a_end

    def __str__(self) -> str:
        if self.last == self.first:
            return str(self.first)
        return f"{self.first}-" + ("" if self.last is None else str(self.last))


@dataclass(frozen=True)
class PerLayer:
    """A slot's per-layer mapping: (LayerRange, config or None) pairs that do not overlap."""

    entries: tuple

    @classmethod
    def from_mapping(cls, mapping: dict, slot: str) -> "PerLayer":
        entries = []
        for key, cfg in mapping.items():
            rng = key if isinstance(key, LayerRange) else LayerRange.parse(key, f"recipe.{slot}")
            for other, _ in entries:
                if rng.overlaps(other):
                    raise RecipeError(f"recipe.{slot}: layer ranges {other} and {rng} overlap; give each layer one "
                                      "config")
            _check_config(slot, cfg, f"recipe.{slot}.{rng}")
            entries.append((rng, cfg))
        if not entries:
            raise RecipeError(f"recipe.{slot}: an empty per-layer mapping; use None to leave the slot dense")
        return cls(tuple(sorted(entries, key=lambda e: e[0].first)))

    def config_for(self, layer: Optional[int]) -> Any:
        if layer is None:
            return None
        for rng, cfg in self.entries:
            if layer in rng:
                return cfg
        return None

    def configs(self) -> list:
        return [cfg for _, cfg in self.entries if cfg is not None]

    def to_dict(self) -> dict:
        return {str(rng): _config_to_dict(cfg) for rng, cfg in self.entries}


def _check_config(slot: str, value: Any, where: str) -> None:
    if value is None:
        return
    kind = getattr(type(value), "kind", None)
    if config_class(slot, kind) is not type(value):
        raise RecipeError(f"{where}: got {type(value).__name__}; expected None or one of "
                          f"{[c.__name__ for c in config_classes(slot)]}")


def _config_to_dict(cfg: Any) -> Optional[dict]:
    return None if cfg is None else {"kind": type(cfg).kind, **dataclasses.asdict(cfg)}


@dataclass(frozen=True)
class Recipe:
    attention: Optional[Any] = field(default_factory=Identity)
    ffn: Optional[Any] = field(default_factory=Identity)
    flow: Optional[Any] = None

    def __post_init__(self):
        for slot in SLOTS:
            value = getattr(self, slot)
            if isinstance(value, dict):
                if slot == "flow":
                    raise RecipeError("recipe.flow: takes one TokenFlow config for the whole model (its gates are "
                                      "trained together); give each layer its own kept fraction with "
                                      "TokenFlow(keep=(k0, k1, ...))")
                object.__setattr__(self, slot, PerLayer.from_mapping(value, slot))
            elif not isinstance(value, PerLayer):
                _check_config(slot, value, f"recipe.{slot}")

    @classmethod
    def dense(cls) -> "Recipe":
        """Leave every region as it is (capture and canonicalize only)."""
        return cls(attention=None, ffn=None, flow=None)

    def config_for(self, slot: str, layer: Optional[int]) -> Any:
        """The config the region of `slot` at `layer` gets (None: left dense)."""
        value = getattr(self, slot)
        return value.config_for(layer) if isinstance(value, PerLayer) else value

    def configs(self, slot: str) -> list:
        """Every config named in `slot` (one, several per-layer ones, or none)."""
        value = getattr(self, slot)
        if isinstance(value, PerLayer):
            return value.configs()
        return [] if value is None else [value]

    def to_dict(self) -> dict:
        out = {}
        for slot in SLOTS:
            value = getattr(self, slot)
            out[slot] = value.to_dict() if isinstance(value, PerLayer) else _config_to_dict(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping of {list(SLOTS)}, got {type(data).__name__}")
        unknown = set(data) - set(SLOTS)
        if unknown:
            raise RecipeError(f"recipe: unknown field(s) {sorted(unknown)}; allowed: {list(SLOTS)}")
        # A slot a file does not name is left alone (None), unlike Recipe()'s Python defaults.
        return cls(**{slot: _slot_from_dict(slot, data.get(slot)) for slot in SLOTS})

    @classmethod
    def load(cls, path: str) -> "Recipe":
        ext = os.path.splitext(path)[1].lower()
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise RecipeError(f"cannot read recipe file {path!r}: {err}") from err
        try:
            if ext == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib  # type: ignore
                data = tomllib.loads(raw.decode())
            elif ext == ".json":
                data = json.loads(raw)
            elif ext in (".yaml", ".yml"):
                try:
                    import yaml
                except ModuleNotFoundError as err:
                    raise RecipeError("YAML recipes need PyYAML: pip install pyyaml, or use TOML/JSON") from err
                data = yaml.safe_load(raw)
            else:
                raise RecipeError(f"recipe file {path!r}: unknown extension {ext!r}; expected .toml, .json, .yaml")
        except RecipeError:
            raise
        except Exception as err:  # noqa: BLE001 - a parser's error, with its line and column
            raise RecipeError(f"recipe file {path!r} is not valid {ext[1:].upper()}: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        """Write the recipe as TOML (.toml) or JSON (.json), atomically."""
        from sparsecc.io import write_text
        ext = os.path.splitext(path)[1].lower()
        if ext == ".json":
            write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        elif ext == ".toml":
            write_text(path, to_toml(self.to_dict()))
        else:
            raise RecipeError(f"recipe file {path!r}: unknown extension {ext!r}; expected .toml or .json")


def _slot_from_dict(slot: str, data: Any):
    if data is None or data == {} or data in ("none", "dense"):
        return None
    if isinstance(data, dict) and "kind" not in data:  # a per-layer mapping: {range: config}
        if slot == "flow":
            raise RecipeError("recipe.flow: takes one table with a 'kind' (one TokenFlow for the whole model); "
                              "give per-layer kept fractions with keep = [k0, k1, ...]")
        return {LayerRange.parse(key, f"recipe.{slot}"): _method_from_dict(f"{slot}.{key}", slot, value)
                for key, value in data.items()}
    return _method_from_dict(slot, slot, data)


def _method_from_dict(where: str, slot: str, data: Any):
    if data is None or data in ("none", "dense") or (isinstance(data, dict) and data.get("kind") in ("none", "dense")):
        return None
    if isinstance(data, str):
        data = {"kind": data}
    if not isinstance(data, dict) or "kind" not in data:
        raise RecipeError(f"recipe.{where}: expected a table with a 'kind' field (one of {kinds(slot)}) or a table "
                          f"of layer ranges, got {data!r}")
    kind = data["kind"]
    cls = config_class(slot, kind)
    if cls is None:
        raise RecipeError(f"recipe.{where}.kind: {kind!r} is not a method for {slot}; allowed: {kinds(slot)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k != "kind"}
    for key, value in values.items():
        if key not in fields:
            raise RecipeError(f"recipe.{where}.{key}: unknown field for {kind!r}; allowed: {sorted(fields)}")
    try:
        return cls(**values)
    except RecipeError:
        raise
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe.{where}: {err}") from err


def to_toml(data: dict) -> str:
    """A recipe dict (`Recipe.to_dict()`) as TOML text."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    def table(header: str, cfg: dict) -> list[str]:
        return [f"[{header}]"] + [f"{k} = {value(v)}" for k, v in cfg.items() if v is not None] + [""]

    lines: list[str] = []
    for slot, cfg in data.items():
        if cfg is None:
            continue
        if "kind" in cfg:
            lines += table(slot, cfg)
        else:
            for rng, sub in cfg.items():
                lines += table(f'{slot}."{rng}"', sub if sub is not None else {"kind": "none"})
    return "\n".join(lines)
