"""Compile a Hugging Face causal LM into a prefill graph and a one-token decode graph over a static KV
cache, and generate through them.

    dec = sparsecc.compile_decoder(model, max_len=256,
                                   recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=8)),
                                   calibration=[ids, ...])
    out = dec.generate(input_ids, attention_mask=mask, max_new_tokens=32)        # greedy, like HF
    out = dec.generate(input_ids, do_sample=True, top_p=0.9, generator=g)          # sampling
    logits = dec(input_ids)                                                        # full-sequence forward
    sparsecc.save(dec, "out/dec"); dec2 = sparsecc.load("out/dec")

Both graphs are captured from one step module of the model (no code per architecture): `CacheStep`,
a max_len cache written in place (eager, inductor), or `PastStep`, past in and present out (ONNX
Runtime, Optimum's layout). The prefill graph takes any prompt length from 2 to max_len, the decode
graph one token; batch size is free in both. The recipe is planned once, on the prefill graph with
the calibration text, and the decode graph is rewritten with the same plans (block layouts become a
mask on the decode step's keys: `layout_decode`); the two graphs then share every parameter and plan
tensor.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
from torch import nn
from torch.export import Dim

from sparsecc.api import compile as compile_graph
from sparsecc.capture import Captured, capture, max_positions, sliding_window
from sparsecc.causal_lm.cache_step import (CacheSpec, CacheStep, PastStep, cache_spec, is_hf_causal_lm,
                                          write_cache_in_place)
from sparsecc.causal_lm.generate import (PastCacheSteps, Sampling, StaticCacheSteps, generate_tokens,
                                        prefill_inputs, prompt_positions)
from sparsecc.causal_lm.layout_decode import mask_decode_attention
from sparsecc.errors import InputError, UnsupportedError
from sparsecc.methods.block_sparse import plan_layout
from sparsecc.model import SparseModel
from sparsecc.recipe import Recipe
from sparsecc.saving import register_parts

__all__ = ["CompiledCausalLM", "compile_decoder"]

log = logging.getLogger("sparsecc.causal_lm")

BACKENDS = ("eager", "inductor", "onnxruntime")


def _step_shapes(n_cache: int, kind: str, prefill: bool, max_len: int) -> dict:
    """torch.export ranges: batch free; the prompt 2 .. max_len tokens; a decode step one token (after
    1 .. max_len past positions, for the past-in / present-out graphs)."""
    batch = Dim("batch", min=1, max=1 << 16)
    if prefill:
        tokens = {0: batch, 1: Dim("tokens", min=2, max=max_len)}
        shapes = {"input_ids": tokens, "attention_mask": tokens if kind == "past" else {0: batch},
                  "position_ids": tokens}
        return shapes if kind == "past" else {**shapes, "start": None, "cache": tuple({0: batch} for _ in range(n_cache))}
    if kind == "past":
        past = Dim("past", min=1, max=max_len)
        return {"input_ids": {0: batch}, "attention_mask": {0: batch, 1: past + 1}, "position_ids": {0: batch},
                "past": tuple({0: batch, 2: past} for _ in range(n_cache))}
    return {"input_ids": {0: batch}, "attention_mask": {0: batch}, "position_ids": {0: batch}, "start": None,
            "cache": tuple({0: batch} for _ in range(n_cache))}


def _capture_step(model: nn.Module, spec: CacheSpec, max_len: int, kind: str, prefill: bool) -> Captured:
    """The prefill or decode graph of `model`: a `CacheStep` (kind "static") or a `PastStep` ("past")."""
    # the prefill example is max_len long: regions record it as their length, and block layouts are planned
    # for it (every position a prompt can reach)
    batch, length = 2, max_len
    device = next(model.parameters()).device
    ids = torch.zeros(batch, length if prefill else 1, dtype=torch.long, device=device)
    if kind == "past":
        step = PastStep(model)
        if prefill:
            example = (ids, torch.ones_like(ids), torch.arange(length, device=device).expand(batch, length))
        else:  # one token after `length - 1` past positions
            past = spec.empty(batch, length - 1, device)
            example = (ids, torch.ones(batch, length, dtype=torch.long, device=device),
                       torch.full((batch, 1), length - 1, device=device), *past)
        n_cache = 0 if prefill else len(example) - 3
    else:
        step = CacheStep(model)
        example = prefill_inputs(ids, torch.ones_like(ids), spec.empty(batch, max_len, device), max_len)
        if not prefill:  # one token after a prompt of one: position 1, written at slot 1
            example[1][:, 1] = 1
            example = (example[0], example[1], example[2] + 1, torch.tensor(1, device=device), *example[4:])
        n_cache = len(example) - 4
    captured = capture(step, example, dynamic_shapes=_step_shapes(n_cache, kind, prefill, max_len))
    captured.model_name = f"{type(model).__name__} ({'prefill' if prefill else 'decode step'})"
    captured.max_positions, captured.sliding_window = max_positions(model), sliding_window(model)
    return captured


def _calibration_inputs(calibration: Any, spec: CacheSpec, max_len: int, kind: str) -> Optional[list]:
    """Prefill inputs for each calibration batch: token ids [B, T] or {"input_ids", "attention_mask"}."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, dict)) or not hasattr(calibration, "__iter__"):
        raise InputError(f"calibration must be a list of batches of token ids ([batch, length] tensors or dicts "
                         f"with input_ids and attention_mask), got {type(calibration).__name__}")
    out = []
    for i, batch in enumerate(calibration):
        ids, mask = (batch.get("input_ids"), batch.get("attention_mask")) if isinstance(batch, dict) else (batch, None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise InputError(f"calibration batch {i}: expected token ids [batch, length] (an integer tensor, or a "
                             f"dict with 'input_ids'), got {type(ids).__name__}"
                             f"{' ' + str(list(ids.shape)) if isinstance(ids, torch.Tensor) else ''}")
        if not 2 <= ids.shape[1] <= max_len:
            raise InputError(f"calibration batch {i} has {ids.shape[1]} tokens; the prefill graph takes 2 to "
                             f"max_len={max_len}: cut the text into pieces of at most {max_len} tokens")
        ids, mask = ids.long(), (torch.ones_like(ids) if mask is None else mask).long()
        out.append(prefill_inputs(ids, mask, spec.empty(ids.shape[0], max_len, ids.device), max_len)
                   if kind == "static" else (ids, mask, prompt_positions(mask)))
    if not out:
        raise InputError("calibration is empty: pass at least one batch of token ids, or leave it out (None)")
    return out


def _share_tensors(source: nn.Module, target: nn.Module) -> int:
    """Point `target`'s parameters and buffers at `source`'s of the same name, shape and value; returns
    how many were shared. Both graphs come from one model and one set of plans, so all of them are."""
    own = dict(source.named_parameters(remove_duplicate=False))
    own.update(source.named_buffers(remove_duplicate=False))
    shared = 0
    for module_name, module in target.named_modules():
        for store in (module._parameters, module._buffers):
            for key, value in list(store.items()):
                name = f"{module_name}.{key}" if module_name else key
                other = own.get(name)
                if value is None or other is None or other.shape != value.shape or other.dtype != value.dtype:
                    continue
                if other is not value and torch.equal(other.detach(), value.detach()):
                    store[key] = other
                    shared += 1
    return shared


def _join(prefill: Any, decode: Any, kind: str) -> None:
    """One set of tensors for both graphs, and a static cache written in place (the runners call the graph
    modules, or compile them at their first call)."""
    shared = _share_tensors(prefill.graph_module, decode.graph_module)
    writes = [write_cache_in_place(sm.graph_module) for sm in (prefill, decode)] if kind == "static" else [0, 0]
    log.info("compile_decoder: %d tensors shared between the prefill and the decode graph; cache writes in "
             "place: %d (prefill), %d (decode)", shared, *writes)


class CompiledCausalLM(nn.Module):
    """A causal LM compiled into a prefill and a decode graph (SparseModels sharing their tensors).

    `generate` follows Hugging Face's generate (greedy / multinomial sampling, left padding, EOS);
    calling the model gives the full-sequence logits of its (sparse) prefill graph. cache_kind:
    "static" (a max_len cache written in place: eager, inductor) or "past" (past in, present out:
    onnxruntime).
    """

    def __init__(self, prefill: Any, decode: Any, spec: CacheSpec, max_len: int, sampling: Sampling,
                 model_name: str = "", cache_kind: str = "static"):
        super().__init__()
        self.prefill, self.decode = prefill, decode
        self.spec, self.max_len, self.sampling = spec, max_len, sampling
        self.model_name, self.cache_kind = model_name, cache_kind

    def empty_cache(self, batch: int, device: Any = None) -> tuple:
        """A zero static cache for `batch` rows: (keys_0, values_0, ...), each [batch, kv_heads, max_len, dim]."""
        return self.spec.empty(batch, self.max_len, device or self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def steps(self) -> Any:
        """The prefill / next-token protocol `generate_tokens` drives, for this cache kind."""
        if self.cache_kind == "past":
            return PastCacheSteps(self.prefill, self.decode)
        device = self.device
        return StaticCacheSteps(self.prefill, self.decode, lambda b: self.empty_cache(b, device), self.max_len)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, vocab] of the sequence (T <= max_len) through the compiled graphs, from an empty cache."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or not 1 <= input_ids.shape[1] <= self.max_len:
            raise InputError(f"input_ids: expected token ids [batch, length] with 1 <= length <= max_len="
                             f"{self.max_len}, got {list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with torch.no_grad():
            return self.steps().prefill(input_ids.long(), mask.long())[0]

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 20, do_sample: Optional[bool] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Any = None,
                 pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 streamer: Any = None) -> torch.Tensor:
        """The prompts [B, P] (left-padded, with their attention_mask) followed by the generated tokens.

        Unset options take the model's generation_config (then transformers' defaults), as HF's generate
        does; generation stops at max_new_tokens or when every row has produced eos_token_id. streamer:
        HF's streamer interface (put / end), e.g. transformers.TextStreamer(tokenizer)."""
        sampling = self.sampling.updated(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                         eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        device = self.device
        return generate_tokens(self.steps(), self.max_len,
                               input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids,
                               attention_mask.to(device) if isinstance(attention_mask, torch.Tensor) else attention_mask,
                               sampling, max_new_tokens, generator, streamer)

    def report(self) -> Any:
        """The prefill graph's report (the decode graph has the same regions, rewritten with the same plans)."""
        return self.prefill.report()

    @property
    def plans(self) -> dict:
        return self.prefill.plans

    def saved_parts(self) -> tuple[str, dict, dict]:
        """What `sparsecc.save` writes: the two graphs (each a saved model) and the cache and sampling facts."""
        sampling = dataclasses.asdict(self.sampling)
        return "causal_lm", {"prefill": self.prefill, "decode": self.decode}, {
            "max_len": self.max_len, "model": self.model_name, "sampling": sampling, "cache_kind": self.cache_kind,
            "cache": {"layers": [list(layer) for layer in self.spec.layers], "dtype": str(self.spec.dtype)}}

    @classmethod
    def from_parts(cls, parts: dict, values: dict) -> "CompiledCausalLM":
        """Rebuild a saved decoder (`sparsecc.load`): the graphs share their tensors again."""
        cache = values["cache"]
        spec = CacheSpec(tuple(tuple(layer) for layer in cache["layers"]),
                         getattr(torch, cache["dtype"].replace("torch.", "")))
        sampling = dict(values["sampling"])
        if sampling.get("eos_token_id") is not None:
            sampling["eos_token_id"] = tuple(sampling["eos_token_id"])
        kind = values.get("cache_kind", "static")
        _join(parts["prefill"], parts["decode"], kind)
        return cls(parts["prefill"], parts["decode"], spec, int(values["max_len"]), Sampling(**sampling),
                   values.get("model", ""), kind)

    def __reduce_ex__(self, protocol):
        raise UnsupportedError("a CompiledCausalLM cannot be pickled; use sparsecc.save(dec, directory) and "
                               "sparsecc.load(directory)")


def compile_decoder(model: nn.Module, max_len: int, recipe: Any = None, calibration: Any = None,
                    backend: str = "eager", check: bool = True, progress: bool = True,
                    backend_options: Optional[dict] = None) -> CompiledCausalLM:
    """Compile a Hugging Face causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...) for generation with a
    static KV cache of max_len positions.

    recipe: what to rewrite (default: nothing - the identity graphs); planned on the prefill graph.
    calibration: token ids, a list of [batch, length] tensors (length 2 .. max_len) or of dicts with
    input_ids and attention_mask, for the methods that calibrate. The user's model is not modified.
    """
    if not is_hf_causal_lm(model):
        hint = (" (for sparsecc.nn.CausalLM use sparsecc.decode.compile_decoder)"
                if type(model).__name__ == "CausalLM" else "")
        raise UnsupportedError(f"compile_decoder takes a Hugging Face causal LM (a PreTrainedModel that can "
                               f"generate, e.g. LlamaForCausalLM), got {type(model).__name__}{hint}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise InputError(f"max_len={max_len!r}: expected an integer >= 2 (prompt plus generated tokens)")
    limit = max_positions(model)
    if limit is not None and max_len > limit:
        raise InputError(f"max_len={max_len} exceeds the {limit} positions {type(model).__name__}'s config allows "
                         "(max_position_embeddings); compile with max_len <= " + str(limit))
    if backend not in BACKENDS:
        raise UnsupportedError(f"compile_decoder runs on {', '.join(BACKENDS)}; got backend={backend!r}")
    recipe = Recipe.dense() if recipe is None else recipe
    spec = cache_spec(model)
    options = dict(recipe=recipe, backend=backend, check=check, progress=progress, backend_options=backend_options)
    if recipe.configs("flow"):
        raise UnsupportedError("recipe.flow: token flow is not supported by compile_decoder yet (its routing picks "
                               "tokens across the whole prompt, which a one-token decode step cannot reproduce); "
                               "compile the decoder with attention and ffn recipes only")
    for config in recipe.configs("attention"):
        if getattr(config, "pruned_logits", "-inf") != "-inf":
            raise UnsupportedError(f"recipe.attention = {type(config).kind} with pruned_logits="
                                   f"{config.pruned_logits!r}: a decoder's decode step computes exact block-sparse "
                                   "attention (pruned keys at -inf); use pruned_logits='-inf'")
    kind = "past" if backend == "onnxruntime" else "static"
    prefill = compile_graph(_capture_step(model, spec, max_len, kind, prefill=True), None,
                            calibration=_calibration_inputs(calibration, spec, max_len, kind), **options)
    # block layouts: the prefill runs block-sparse attention; the decode step keeps its SDPA and masks the
    # keys its query's layout row drops (sparsecc.causal_lm.layout_decode)
    layouts = {name: plan_layout(p) for name, p in prefill.plans.items() if "mask" in p.tensors}
    decode_recipe = dataclasses.replace(recipe, attention=None) if layouts else recipe
    captured = _capture_step(model, spec, max_len, kind, prefill=False)
    decode = compile_graph(captured, None, plans=prefill.plans,
                           **{**options, "recipe": decode_recipe, **({"backend": "eager", "backend_options": None}
                                                                     if layouts else {})})
    if set(decode.plans) != set(prefill.plans) - set(layouts):
        raise UnsupportedError(f"the decode graph's regions {sorted(decode.plans)} differ from the prefill graph's "
                               f"{sorted(prefill.plans)}; the recipe cannot be applied to both the same way")
    if layouts:  # masked on the eager graph, then lowered: a backend that exports (ONNX) must see the masks
        masked = mask_decode_attention(decode.graph_module, decode.report().regions, layouts, kind, max_len)
        if masked != len(layouts):
            raise UnsupportedError(f"{len(layouts)} attention layouts were planned on the prefill graph and {masked} "
                                   "decode-step attention regions took them; the decode graph's regions differ")
        decode = SparseModel(decode.graph_module, captured, decode_recipe, backend, decode.report(),
                             backend_options=backend_options, plans=decode.plans)
    _join(prefill, decode, kind)
    return CompiledCausalLM(prefill, decode, spec, max_len, Sampling.from_generation_config(
        getattr(model, "generation_config", None)), type(model).__name__, kind)


register_parts("causal_lm", CompiledCausalLM.from_parts)
