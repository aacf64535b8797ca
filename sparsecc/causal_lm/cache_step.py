"""One forward of a Hugging Face causal LM over a static KV cache held in explicit tensors.

    step = CacheStep(model)                      # shares the model's modules (nothing copied)
    cache = step.empty_cache(batch=2, max_len=64)
    logits = step(input_ids, attention_mask, position_ids, start, *cache)   # writes the cache in place

The cache is a flat tuple (keys_0, values_0, keys_1, values_1, ...), each [batch, kv_heads, max_len,
head_dim]; the step writes its T new positions at start .. start + T - 1 (index_copy_, as transformers'
StaticLayer does) and attends to the whole buffer under the model's own causal mask built from
`attention_mask` [batch, max_len] (0 for left padding and for the slots not written yet). One module
serves the prompt (T = prompt length) and each generated token (T = 1): torch.export captures it as
two graphs, and no architecture needs code of its own - the model's attention, rotary or ALiBi, and
mask functions run as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sparsecc.errors import UnsupportedError

__all__ = ["CacheSpec", "CacheStep", "PastStep", "cache_spec", "is_hf_causal_lm", "write_cache_in_place"]


def is_hf_causal_lm(model: Any) -> bool:
    """A transformers PreTrainedModel with a language-model head that generates (GPT2LMHeadModel,
    LlamaForCausalLM, ...)."""
    mro = type(model).__mro__
    return (any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in mro)
            and any(c.__name__ == "GenerationMixin" for c in mro) and callable(getattr(model, "can_generate", None))
            and bool(model.can_generate()))


@dataclass(frozen=True)
class CacheSpec:
    """The KV cache one model needs: per layer (kv_heads, key_dim, value_dim), and the dtype."""

    layers: tuple
    dtype: torch.dtype

    def empty(self, batch: int, max_len: int, device: Any = "cpu") -> tuple:
        out = []
        for heads, key_dim, value_dim in self.layers:
            out.append(torch.zeros(batch, heads, max_len, key_dim, dtype=self.dtype, device=device))
            out.append(torch.zeros(batch, heads, max_len, value_dim, dtype=self.dtype, device=device))
        return tuple(out)


@torch.no_grad()
def cache_spec(model: nn.Module) -> CacheSpec:
    """Read the cache layout from one token through the model's own dynamic cache (so multi-query,
    grouped-query, odd head sizes all come from the model, not from config field names)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
    except Exception as err:  # noqa: BLE001 - reported with the model's name
        raise UnsupportedError(f"{type(model).__name__}: one token with use_cache=True failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); a decoder needs a model that "
                               "runs with a KV cache") from err
    finally:
        model.train(was_training)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise UnsupportedError(f"{type(model).__name__} returned no key/value cache ({type(cache).__name__}); "
                               "compile_decoder supports models whose cache holds keys and values per layer "
                               "(transformers' Cache layers)")
    shapes = tuple((layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]) for layer in layers)
    return CacheSpec(shapes, layers[0].keys.dtype)


def _static_cache(tensors: tuple, start: torch.Tensor) -> Any:
    """A transformers Cache whose layers are StaticLayers over the given tensors, next write at `start`.

    Every layer is a full-length StaticLayer, sliding-window layers too: the model's mask function
    applies the window, and a full buffer keeps every position (no rolling buffer to index)."""
    from transformers.cache_utils import Cache, StaticLayer

    layers = []
    for keys, values in zip(tensors[0::2], tensors[1::2]):
        layer = StaticLayer(keys.shape[2])
        layer.keys, layer.values = keys, values
        layer.device = keys.device
        layer.batch_size, layer.num_heads = keys.shape[0], keys.shape[1]
        layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
        layer.cumulative_length = start.reshape(()).clone()  # update() advances its own copy
        layer.is_initialized = True
        layers.append(layer)
    return Cache(layers=layers)


class CacheStep(nn.Module):
    """`model` run on T new tokens over a static cache: (input_ids [B, T], attention_mask [B, max_len],
    position_ids [B, T], start (0-d), *cache) -> logits [B, T, vocab]; the cache tensors are updated in
    place at positions start .. start + T - 1."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                start: torch.Tensor, *cache: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      cache=_static_cache(cache, start), use_cache=True)
        return out.logits


class PastStep(nn.Module):
    """`model` run on T new tokens after the past ones, functionally (for ONNX Runtime, as Optimum's
    ORTModelForCausalLM lays it out): (input_ids [B, T], attention_mask [B, P + T], position_ids [B, T],
    *past) -> (logits [B, T, vocab], *present), where past is (keys_0, values_0, ...) of P positions,
    [B, kv_heads, P, dim], and present the same with P + T positions. No past inputs: the prompt's
    prefill (P = 0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple:
        from transformers.cache_utils import Cache, DynamicLayer

        layers = [DynamicLayer() for _ in range(len(past) // 2 or self.lm.config.get_text_config().num_hidden_layers)]
        for layer, keys, values in zip(layers, past[0::2], past[1::2]):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        cache = Cache(layers=layers)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      use_cache=True)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def write_cache_in_place(gm: fx.GraphModule) -> int:
    """Turn each functional cache write of a captured step back into the in-place write it was; returns
    how many.

    torch.export records `keys.index_copy_(2, positions, new)` on an input as a functional index_copy
    (a new [B, H, max_len, D] tensor) and a copy_ of it back into the input at the end: two copies of
    the whole buffer per layer and token, where the model writes T rows. When the input is read by
    nothing after the write but that copy_, `index_copy_` on the input itself computes the same."""
    aten = torch.ops.aten
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target is not aten.index_copy.default or node.args[0].op != "placeholder":
            continue
        buffer = node.args[0]
        copies = [u for u in buffer.users if u.target is aten.copy_.default and u.args == (buffer, node)]
        others = [u for u in buffer.users if u is not node and u not in copies]
        if len(copies) != 1 or copies[0].users or any(order[u] > order[node] for u in others):
            continue
        node.target = aten.index_copy_.default
        gm.graph.erase_node(copies[0])
        changed += 1
    if changed:
        gm.recompile()
    return changed
