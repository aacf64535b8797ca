"""Sparsification methods: each a frozen config (plain data) plus a handler registered by the config's type.

    sparsecc/methods/registry.py    config type -> handler; kind -> config type (recipe files)
    sparsecc/methods/base.py        Method (match, observers, plan, rewrite, fit_hooks), Match, Plan, Target
    sparsecc/methods/identity.py    Identity: the same dense math as sparsecc ops (proves the rewrite)
    sparsecc/methods/spion/         SPION: block layouts from calibrated attention maps
    sparsecc/methods/fixed/         fixed block layouts: BigBird, Longformer, local, strided, random
    sparsecc/methods/sparse_ffn/    Scaling Transformers' sparse FFN with a one-of-N controller
    sparsecc/methods/token_flow/    SparseFlow: learned gates route salient tokens into each block

A new method is one folder: a config dataclass with a ClassVar `kind`, and a handler
class decorated with `@register(Config)`; import it before building a Recipe that names it.
"""

from sparsecc.methods.base import FitHooks, Match, Method, Plan, Target
from sparsecc.methods.registry import handler_for, register

from sparsecc.methods import identity, fixed, spion, sparse_ffn, token_flow  # noqa: E402,F401  (registers them)

__all__ = ["FitHooks", "Match", "Method", "Plan", "Target", "handler_for", "register"]
