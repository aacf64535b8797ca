"""Match results that explain themselves, and the records of candidates that did not match.

Every canonicalization and region rule answers with a `Match`: `Match.ok(value)` when it
applies, `Match.fail(rule, reason, *nodes)` when it does not, saying which check failed,
why, and on which nodes. A failed match is falsy, so rules read as `if not m: return m`.

`progress` counts the checks a rule passed before it failed. When several rules (or the
alternatives of one rule) try the same anchor node, `nearest` keeps the one that got
furthest: its reason is the useful one. A failure at progress 0 means the anchor does not
look like the pattern at all (a linear that is no FFN's down projection): it is no
candidate, and `sparsecc inspect --explain` does not list it.

A `Miss` is what `inspect` reports for a candidate that did not match: the anchor node,
its module path and layer, the rule that got furthest and its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx

from sparsecc.graph.fx_utils import layer_index, module_path


@dataclass(frozen=True)
class Match:
    matched: bool
    value: Any = None  # what a successful rule found (for its rewrite)
    rule: str = ""  # the rule (and check) that failed, e.g. "eager_attention.scores"
    reason: str = ""
    nodes: tuple = ()  # the nodes the failure is about
    progress: int = 0  # checks passed before the failure; 0: not a candidate of this rule at all

    @classmethod
    def ok(cls, value: Any = None) -> "Match":
        return cls(True, value)

    @classmethod
    def fail(cls, rule: str, reason: str, *nodes: Any, progress: int = 1) -> "Match":
        return cls(False, None, rule, reason, tuple(n for n in nodes if isinstance(n, fx.Node)), progress)

    def __bool__(self) -> bool:
        return self.matched

    def after(self, steps: int) -> "Match":
        """The same failure, counted as reached after `steps` more checks (a sub-rule's miss)."""
        return self if self.matched else Match(False, None, self.rule, self.reason, self.nodes,
                                               self.progress + steps)

    def __str__(self) -> str:
        return "ok" if self.matched else f"{self.rule}: {self.reason}"


def nearest(*matches: Match) -> Match:
    """The first successful match, else the failure that got furthest (the first of equals)."""
    for m in matches:
        if m:
            return m
    return max(matches, key=lambda m: m.progress)


def describe(node: Any) -> str:
    """`name (op)` of a node, or the repr of a constant."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_function":
        op = getattr(getattr(node.target, "_overloadpacket", None), "__name__", None) or \
            getattr(node.target, "__name__", str(node.target))
        return node.name if re.sub(r"_\d+$", "", node.name) == op else f"{node.name} ({op})"
    return f"{node.name} ({'parameter' if node.op == 'get_attr' else node.op})"


@dataclass
class Miss:
    """A candidate that was not rewritten (or a region a method cannot take), and why."""

    kind: str  # "attention" | "ffn" | "linear" | "note" (a pass's free-text note)
    rule: str
    reason: str
    node: Optional[str] = None  # the anchor: softmax / SDPA / down-projection linear / matmul
    path: Optional[str] = None
    layer: Optional[int] = None

    @classmethod
    def of(cls, kind: str, anchor: fx.Node, match: Match) -> "Miss":
        path = module_path(anchor)
        return cls(kind, match.rule, match.reason, anchor.name, path or None, layer_index(path))

    @classmethod
    def note(cls, text: str) -> "Miss":
        return cls("note", "", str(text))

    def __str__(self) -> str:
        if self.kind == "note":
            return self.reason
        where = f" at {self.path}" if self.path else ""
        layer = f" (layer {self.layer})" if self.layer is not None else ""
        return f"{self.kind} {self.node}{where}{layer}: {self.reason} [{self.rule}]"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def as_miss(item: Any) -> Miss:
    """A Miss from a Miss or a pass's free-text note."""
    return item if isinstance(item, Miss) else Miss.note(item)


__all__ = ["Match", "Miss", "as_miss", "describe", "nearest"]
