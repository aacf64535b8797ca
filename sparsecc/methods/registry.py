"""The method registry: a config type (plain data) -> the handler that carries it out.

    @register(Spion)                     # the config dataclass, with a ClassVar `kind`
    class SpionMethod(Method): ...

The recipe looks configs up by `kind` (files) and compile() looks handlers up by the
config's type (objects): nobody else needs to know which methods exist.
"""

from __future__ import annotations

from typing import Any, Callable

from sparsecc.errors import RecipeError

SLOTS = ("attention", "ffn", "flow")

_CONFIGS: dict[str, dict[str, type]] = {slot: {} for slot in SLOTS}  # slot -> kind -> config class
_HANDLERS: dict[type, Any] = {}  # config class -> handler instance


def register(config_cls: type) -> Callable[[type], type]:
    """Class decorator for a handler (a `sparsecc.methods.base.Method` subclass): it carries out
    `config_cls` in the handler's `slots`. Registering a kind twice replaces the earlier one."""
    kind = getattr(config_cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{config_cls.__name__} needs a ClassVar `kind` naming the method in recipe files")

    def wrap(handler_cls: type) -> type:
        handler = handler_cls()
        for slot in handler.slots:
            if slot not in _CONFIGS:
                raise TypeError(f"{handler_cls.__name__}.slots: {slot!r} is not one of {SLOTS}")
            _CONFIGS[slot][kind] = config_cls
        _HANDLERS[config_cls] = handler
        return handler_cls
    return wrap


def handler_for(config: Any):
    """The handler registered for `type(config)` (or a base class of it)."""
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise RecipeError(f"{type(config).__name__} is not a registered method config; register a handler for it with "
                      "@sparsecc.methods.register(ConfigClass)")


def config_class(slot: str, kind: str) -> type | None:
    return _CONFIGS[slot].get(kind)


def kinds(slot: str) -> list[str]:
    return sorted(_CONFIGS[slot])


def config_classes(slot: str) -> list[type]:
    return list(_CONFIGS[slot].values())


def describe_methods() -> list[dict]:
    """Every registered method, from the registry: kind, config class, slots, the first line of the config's
    docstring, and its fields (name, type as annotated, default)."""
    import dataclasses

    by_config: dict = {}
    for slot in SLOTS:
        for kind, cls in sorted(_CONFIGS[slot].items()):
            by_config.setdefault(cls, {"kind": kind, "config": cls.__name__, "slots": []})["slots"].append(slot)
    out = []
    for cls, entry in by_config.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        fields = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            fields.append({"name": f.name, "type": kind.replace("typing.", ""), "default": default})
        out.append({**entry, "summary": doc[0] if doc else "", "fields": fields})
    return out
