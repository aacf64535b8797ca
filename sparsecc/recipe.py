"""Recipes: plain data saying what to do to each kind of region.

    Recipe(attention=Identity(), ffn=Identity(), flow=None)

Each slot takes a method config (a dataclass with a `kind` name). Recipes load
from TOML, JSON or YAML files and from dicts, and validation names the bad
field and the allowed values:

    [attention]
    kind = "identity"

New methods register their config class with `register_method(slot)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from sparsecc.errors import RecipeError

SLOTS = ("attention", "ffn", "flow")
_METHODS: dict[str, dict[str, type]] = {slot: {} for slot in SLOTS}


def register_method(*slots: str):
    """Class decorator: make a config dataclass selectable by its `kind` in the given slots."""
    def wrap(cls):
        for slot in slots:
            _METHODS[slot][cls.kind] = cls
        return cls
    return wrap


def methods(slot: str) -> list[str]:
    return sorted(_METHODS[slot])


@register_method("attention", "ffn")
@dataclass(frozen=True)
class Identity:
    """Rewrite the region into the sparsecc op with the same dense math (proves the rewrite)."""

    kind: typing.ClassVar[str] = "identity"


@dataclass(frozen=True)
class Recipe:
    attention: Optional[Any] = field(default_factory=Identity)
    ffn: Optional[Any] = field(default_factory=Identity)
    flow: Optional[Any] = None

    def __post_init__(self):
        for slot in SLOTS:
            value = getattr(self, slot)
            if value is None:
                continue
            kind = getattr(type(value), "kind", None)
            if _METHODS[slot].get(kind) is not type(value):
                raise RecipeError(f"recipe.{slot}: got {type(value).__name__}; expected None or one of "
                                  f"{[c.__name__ for c in _METHODS[slot].values()]}")

    @classmethod
    def dense(cls) -> "Recipe":
        """Leave every region as it is (capture and canonicalize only)."""
        return cls(attention=None, ffn=None, flow=None)

    def to_dict(self) -> dict:
        out = {}
        for slot in SLOTS:
            value = getattr(self, slot)
            out[slot] = None if value is None else {"kind": type(value).kind, **dataclasses.asdict(value)}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping of {list(SLOTS)}, got {type(data).__name__}")
        unknown = set(data) - set(SLOTS)
        if unknown:
            raise RecipeError(f"recipe: unknown field(s) {sorted(unknown)}; allowed: {list(SLOTS)}")
        # A slot a file does not name is left alone (None), unlike Recipe()'s Python defaults.
        kwargs = {slot: _method_from_dict(slot, data.get(slot)) for slot in SLOTS}
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str) -> "Recipe":
        ext = os.path.splitext(path)[1].lower()
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise RecipeError(f"cannot read recipe file {path!r}: {err}") from err
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
        return cls.from_dict(data)


def _method_from_dict(slot: str, data: Any):
    if data is None or data == {} or data == "none":
        return None
    if isinstance(data, str):
        data = {"kind": data}
    if not isinstance(data, dict) or "kind" not in data:
        raise RecipeError(f"recipe.{slot}: expected a table with a 'kind' field (one of {methods(slot)}), "
                          f"got {data!r}")
    kind = data["kind"]
    cls = _METHODS[slot].get(kind)
    if cls is None:
        raise RecipeError(f"recipe.{slot}.kind: {kind!r} is not a method for {slot}; allowed: {methods(slot)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k != "kind"}
    for key, value in values.items():
        if key not in fields:
            raise RecipeError(f"recipe.{slot}.{key}: unknown field for {kind!r}; allowed: {sorted(fields)}")
        _check_type(f"recipe.{slot}.{key}", value, fields[key].type, cls)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe.{slot}: {err}") from err


def _check_type(where: str, value: Any, annotation: Any, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    name = where.rsplit(".", 1)[-1]
    expected = hints.get(name, annotation)
    origin = typing.get_origin(expected)
    options = typing.get_args(expected) if origin is typing.Union else (expected,)
    for option in options:
        if option is type(None) and value is None:
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if isinstance(option, type) and isinstance(value, option) and not (option is int and isinstance(value, bool)):
            return
        if typing.get_origin(option) is typing.Literal and value in typing.get_args(option):
            return
        if typing.get_origin(option) in (tuple, list) and isinstance(value, (tuple, list)):
            return
    allowed = [getattr(o, "__name__", str(o)) for o in options]
    if any(typing.get_origin(o) is typing.Literal for o in options):
        allowed = [a for o in options for a in typing.get_args(o)]
    raise RecipeError(f"{where}: got {value!r} ({type(value).__name__}); expected {allowed}")


SPION_METHODS = ("spion_cf", "spion_c", "spion_f", "bigbird", "local", "strided", "random")


@register_method("attention")
@dataclass(frozen=True)
class Spion:
    """Block-sparse attention with one layout per layer (SPION, Yoon et al.).

    method: "spion_cf" (conv + flood fill, the paper's main variant), "spion_c" (conv + top-k
    blocks at `density`), "spion_f" (flood fill without conv), or a fixed baseline at `density`:
    "bigbird", "local", "strided", "random". SPION methods need calibration batches.
    """

    kind: typing.ClassVar[str] = "spion"
    method: str = "spion_cf"
    block: int = 64
    quantile: float = 0.98
    kernel_size: int = 31
    density: float = 0.04
    layouts: Optional[str] = None  # a directory saved by LayoutSet.save_dir: reuse instead of calibrating
    seed: int = 0

    def __post_init__(self):
        if self.method not in SPION_METHODS:
            raise RecipeError(f"recipe.attention.method: {self.method!r} is not a SPION method; "
                              f"allowed: {list(SPION_METHODS)}")
        if not (isinstance(self.block, int) and self.block > 0):
            raise RecipeError(f"recipe.attention.block: got {self.block!r}; expected a positive int (e.g. 64)")
        if not 0.0 < self.quantile < 1.0:
            raise RecipeError(f"recipe.attention.quantile: got {self.quantile!r}; expected 0 < quantile < 1 "
                              "(the paper uses 0.96, 0.98 or 0.99)")
        if not (isinstance(self.kernel_size, int) and self.kernel_size > 0):
            raise RecipeError(f"recipe.attention.kernel_size: got {self.kernel_size!r}; expected a positive int")
        if not 0.0 < self.density <= 1.0:
            raise RecipeError(f"recipe.attention.density: got {self.density!r}; expected 0 < density <= 1")

    @property
    def needs_calibration(self) -> bool:
        return self.layouts is None and self.method.startswith("spion")


@register_method("ffn")
@dataclass(frozen=True)
class SparseFFN:
    """Sparse FFN of Scaling Transformers: a low-rank controller keeps one unit in every block of n.

    init: "distill" fits each controller to the arg-max unit of the dense FFN's activations on the
    calibration inputs (convert a dense model); "random" starts untrained (train from scratch).
    """

    kind: typing.ClassVar[str] = "sparse_ffn"
    n: int = 32
    d_lowrank: int = 64
    init: str = "distill"
    steps: int = 300  # controller distillation steps (after a least-squares start)
    max_tokens: int = 4096  # calibration rows per region
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise RecipeError(f"recipe.ffn.n: got {self.n!r}; expected an int >= 1 (the paper uses 32)")
        if not (isinstance(self.d_lowrank, int) and self.d_lowrank >= 1):
            raise RecipeError(f"recipe.ffn.d_lowrank: got {self.d_lowrank!r}; expected an int >= 1 (e.g. 64)")
        if self.init not in ("distill", "random"):
            raise RecipeError(f"recipe.ffn.init: got {self.init!r}; expected 'distill' or 'random'")


FLOW_CHOICES = {
    "gate": ("released", "content", "random"),
    "scope": ("layer", "ffn"),
    "kv": ("all", "kept"),
    "select": ("threshold", "topk"),
    "layout": ("packed", "padded"),
}


@register_method("flow")
@dataclass(frozen=True)
class TokenFlow:
    """SparseFlow (Kim & Lee, ACL 2024): learned token-to-block flows; only kept tokens enter a block.

    gate: "released" (the authors' per-position logit tables mixed by a router over the mean input
    embedding), "content" (a linear score of each token's hidden state; the choice for causal
    decoders), or "random" (a fixed random table: a baseline).
    keep: target kept fraction (sparsity-penalty target in training; the capacity of select="topk"):
    one number for every flowed block, or one per block in model order (e.g. (0.3, 0.4, 0.4, 0.5, 0.6,
    0.8): same mean, same FLOPs with kv="all", more tokens through the later layers).
    scope: "layer" (attention and FFN of a layer share one gate, as released) or "ffn" (FFN only).
    kv: "all" (kept tokens attend to every token's keys and values, as released) or "kept".
    select: "threshold" (gate > 0.5) or "topk" (the ceil(keep * tokens) best of each example).
    pin_first: always keep position 0 (CLS). init: initial gate logit (3.0 opens every gate).
    layout: "packed" (a block's per-token tail - output projection, norms, FFN - runs on the kept
    tokens of the whole batch one after another, so no work on the padding of examples that keep
    fewer than the most) or "padded" (every op on [batch, most kept, features]).
    """

    kind: typing.ClassVar[str] = "token_flow"
    gate: str = "released"
    keep: typing.Union[float, tuple[float, ...]] = 0.5
    scope: str = "layer"
    kv: str = "all"
    select: str = "threshold"
    pin_first: bool = True
    layout: str = "packed"
    n_mix: int = 3
    temperature: float = 0.33
    init: float = 3.0
    max_positions: int = 512
    seed: int = 0

    def __post_init__(self):
        for name, allowed in FLOW_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise RecipeError(f"recipe.flow.{name}: got {getattr(self, name)!r}; allowed: {list(allowed)}")
        keeps = self.keep if isinstance(self.keep, (tuple, list)) else (self.keep,)
        if not keeps or not all(isinstance(k, (int, float)) and not isinstance(k, bool) and 0.0 < k <= 1.0
                                for k in keeps):
            raise RecipeError(f"recipe.flow.keep: got {self.keep!r}; expected 0 < keep <= 1 (e.g. 0.5), or a list of "
                              "such numbers, one per flowed block")
        if isinstance(self.keep, list):
            object.__setattr__(self, "keep", tuple(self.keep))  # hashable, like the rest of the frozen config
        if not (isinstance(self.n_mix, int) and self.n_mix >= 1):
            raise RecipeError(f"recipe.flow.n_mix: got {self.n_mix!r}; expected an int >= 1 (released: 3)")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise RecipeError(f"recipe.flow.temperature: got {self.temperature!r}; expected > 0 (released: 0.33)")
        if not (isinstance(self.max_positions, int) and self.max_positions >= 1):
            raise RecipeError(f"recipe.flow.max_positions: got {self.max_positions!r}; expected an int >= 1 "
                              "(at least the longest sequence you will run)")
