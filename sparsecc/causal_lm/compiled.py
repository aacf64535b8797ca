"""Compile a Hugging Face causal LM into a prefill graph and a one-token decode graph over a static KV
cache, and generate through them.

    dec = sparsecc.compile_decoder(model, max_len=256,
                                   recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=8)),
                                   calibration=[ids, ...])
    out = dec.generate(input_ids, attention_mask=mask, max_new_tokens=32)        # greedy, like HF
    out = dec.generate(input_ids, do_sample=True, top_p=0.9, generator=g)          # sampling
    logits = dec(input_ids)                                                        # full-sequence forward
    sparsecc.save(dec, "out/dec"); dec2 = sparsecc.load("out/dec")

Token flow (TokenFlow(gate="content", pin_first=False)) routes each token by its own hidden state, so
a token takes the same path in the prefill graph and in the decode step that sees it alone; its keys
and values are cached whether it is kept or not (kv="all"). `dec.fit_flow(batches, teacher=model,
steps=...)` trains the gates; `compile_decoder(model, ..., backend="onnxruntime", trained=dec)` runs
the trained decoder on ONNX Runtime.

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
from sparsecc.causal_lm.fit import fit_decoder_flow
from sparsecc.causal_lm.generate import (PROCESSOR_OPTIONS, PastCacheSteps, Sampling, StaticCacheSteps, generate_tokens,
                                        prefill_inputs, prompt_positions, token_batches)
from sparsecc.causal_lm.layout_decode import mask_decode_attention
from sparsecc.errors import InputError, UnsupportedError
from sparsecc.methods.block_sparse import plan_layout
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
    return [prefill_inputs(ids, mask, spec.empty(ids.shape[0], max_len, ids.device), max_len)
            if kind == "static" else (ids, mask, prompt_positions(mask))
            for ids, mask in token_batches(calibration, max_len, "calibration")]


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
                 streamer: Any = None, logits_processor: Any = None, **processor_options: Any) -> torch.Tensor:
        """The prompts [B, P] (left-padded, with their attention_mask) followed by the generated tokens.

        Unset options take the model's generation_config (then transformers' defaults), as HF's generate
        does; generation stops at max_new_tokens or when every row has produced eos_token_id. streamer:
        HF's streamer interface (put / end), e.g. transformers.TextStreamer(tokenizer).
        processor_options: HF's repetition_penalty, no_repeat_ngram_size, min_length, min_new_tokens,
        bad_words_ids, suppress_tokens, begin_suppress_tokens (applied by transformers' own processors);
        logits_processor: more processors (HF's LogitsProcessor interface), applied after those."""
        unknown = sorted(set(processor_options) - set(PROCESSOR_OPTIONS))
        if unknown:
            raise InputError(f"generate got {unknown}; it takes do_sample, temperature, top_k, top_p, eos_token_id, "
                             f"pad_token_id, {', '.join(PROCESSOR_OPTIONS)}, logits_processor, generator, streamer "
                             "(beam search and HF's other generation options are not supported)")
        sampling = self.sampling.updated(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **processor_options)
        device = self.device
        return generate_tokens(self.steps(), self.max_len,
                               input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids,
                               attention_mask.to(device) if isinstance(attention_mask, torch.Tensor) else attention_mask,
                               sampling, max_new_tokens, generator, streamer, logits_processor)

    def fit_flow(self, batches: Any, teacher: nn.Module, steps: int, **options: Any) -> Any:
        """Train the token-flow gates (and weights) by distillation from `teacher`, the dense model, on token
        ids [B, T] (`sparsecc.causal_lm.fit`); both graphs route with the result."""
        return fit_decoder_flow(self, batches, teacher, steps, **options)

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
        sampling = dict(values["sampling"])  # lists from JSON: Sampling makes them tuples again
        kind = values.get("cache_kind", "static")
        _join(parts["prefill"], parts["decode"], kind)
        return cls(parts["prefill"], parts["decode"], spec, int(values["max_len"]), Sampling(**sampling),
                   values.get("model", ""), kind)

    def __reduce_ex__(self, protocol):
        raise UnsupportedError("a CompiledCausalLM cannot be pickled; use sparsecc.save(dec, directory) and "
                               "sparsecc.load(directory)")


def _check_decoder_flow(config: Any) -> None:
    """Token flow on a decoder: each token's routing must be the same in the prefill graph and in the
    decode step that sees it alone, and a skipped token's keys must still be cached."""
    why = []
    if config.gate != "content":
        why.append(f"gate={config.gate!r} scores tokens by their position in the graph's input (a decode step's "
                   "one token is always at 0); use gate='content' (a score of each token's own hidden state)")
    if config.select != "threshold":
        why.append(f"select={config.select!r} ranks the tokens of the whole prompt; use select='threshold'")
    if config.pin_first:
        why.append("pin_first=True keeps the first token of every graph call, which in a decode step is the new "
                   "token; use pin_first=False")
    if config.kv != "all":
        why.append(f"kv={config.kv!r} would need each layer's routing of every cached token in the decode step; "
                   "use kv='all' (skipped tokens' keys and values stay in the cache)")
    if why:
        raise UnsupportedError("recipe.flow for compile_decoder: " + "; ".join(why))


def _lowered(sm: Any, captured: Captured, recipe: Recipe, backend: str, backend_options: Optional[dict]) -> Any:
    """The same rewritten graph (and its tensors) lowered to `backend`: a new SparseModel of sm's class."""
    extra = {"flow": sm.flow} if hasattr(sm, "flow") else {}
    return type(sm)(sm.graph_module, captured, recipe, backend, sm.report(), layouts=sm.layouts,
                    backend_options=backend_options, plans=sm.plans, **extra)


def _take_weights(target: nn.Module, source: nn.Module, graph: str) -> int:
    """Copy `source`'s parameters and buffers into `target`'s of the same name (a trained decoder's weights
    and gates into a new capture of the same model); every parameter of `target` must find one."""
    own = dict(source.named_parameters(remove_duplicate=False))
    own.update(source.named_buffers(remove_duplicate=False))
    missing, copied = [], 0
    with torch.no_grad():
        for name, tensor in [*target.named_parameters(remove_duplicate=False),
                             *target.named_buffers(remove_duplicate=False)]:
            other = own.get(name)
            if other is None or other.shape != tensor.shape:
                if isinstance(tensor, nn.Parameter):
                    missing.append(name)
                continue
            tensor.copy_(other)
            copied += 1
    if missing:
        more = "..." if len(missing) > 3 else ""
        raise UnsupportedError(f"trained: the {graph} graph's parameters {missing[:3]}{more}"
                               " are not in the trained decoder (or have another shape); pass a decoder compiled "
                               "from the same model with the same recipe")
    return copied


def _check_trained(trained: Any, recipe: Any, max_len: int) -> Recipe:
    if not isinstance(trained, CompiledCausalLM):
        raise InputError(f"trained: expected a CompiledCausalLM (compile_decoder's result), got "
                         f"{type(trained).__name__}")
    if recipe is not None and recipe != trained.prefill.recipe:
        raise InputError("trained: the trained decoder was compiled with another recipe; leave recipe out (the "
                         "trained decoder's is used) or pass the same one")
    if max_len > trained.max_len:
        log.warning("compile_decoder: max_len=%d is longer than the trained decoder's %d; its plans and gates "
                    "were made for positions below %d", max_len, trained.max_len, trained.max_len)
    return trained.prefill.recipe


def compile_decoder(model: nn.Module, max_len: int, recipe: Any = None, calibration: Any = None,
                    backend: str = "eager", check: bool = True, progress: bool = True,
                    backend_options: Optional[dict] = None, trained: Optional[CompiledCausalLM] = None
                    ) -> CompiledCausalLM:
    """Compile a Hugging Face causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...) for generation with a
    static KV cache of max_len positions.

    recipe: what to rewrite (default: nothing - the identity graphs); planned on the prefill graph.
    calibration: token ids, a list of [batch, length] tensors (length 2 .. max_len) or of dicts with
    input_ids and attention_mask, for the methods that calibrate. The user's model is not modified.
    trained: a decoder compiled from the same model and recipe, then trained (`fit_flow`): its plans,
    weights and gates are taken instead of calibrating (e.g. train on eager, then run on onnxruntime).
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
    if trained is not None:
        recipe = _check_trained(trained, recipe, max_len)
        if calibration is not None:
            raise InputError("trained= and calibration= together: the trained decoder's plans are used; leave "
                             "calibration out")
    recipe = Recipe.dense() if recipe is None else recipe
    spec = cache_spec(model)
    for config in recipe.configs("flow"):
        _check_decoder_flow(config)
    for config in recipe.configs("attention"):
        if getattr(config, "pruned_logits", "-inf") != "-inf":
            raise UnsupportedError(f"recipe.attention = {type(config).kind} with pruned_logits="
                                   f"{config.pruned_logits!r}: a decoder's decode step computes exact block-sparse "
                                   "attention (pruned keys at -inf); use pruned_logits='-inf'")
    kind = "past" if backend == "onnxruntime" else "static"
    options = dict(recipe=recipe, backend=backend, check=check, progress=progress, backend_options=backend_options)
    # a graph changed after its rewrite (weights taken, decode masks) is compiled on eager and lowered afterwards
    eager = {**options, "backend": "eager", "backend_options": None}
    prefill_captured = _capture_step(model, spec, max_len, kind, prefill=True)
    if trained is None:
        calibration = _calibration_inputs(calibration, spec, max_len, kind)
        prefill = compile_graph(prefill_captured, None, calibration=calibration, **options)
    else:
        prefill = compile_graph(prefill_captured, None, plans=trained.plans, **eager)
        _take_weights(prefill.graph_module, trained.prefill.graph_module, "prefill")
        prefill = _lowered(prefill, prefill_captured, recipe, backend, backend_options)
    # block layouts: the prefill runs block-sparse attention; the decode step keeps its SDPA and masks the
    # keys its query's layout row drops (sparsecc.causal_lm.layout_decode)
    layouts = {name: plan_layout(p) for name, p in prefill.plans.items() if "mask" in p.tensors}
    decode_recipe = dataclasses.replace(recipe, attention=None) if layouts else recipe
    captured = _capture_step(model, spec, max_len, kind, prefill=False)
    relower = bool(layouts) or trained is not None
    decode = compile_graph(captured, None, plans=prefill.plans, **{**(eager if relower else options),
                                                                    "recipe": decode_recipe})
    if set(decode.plans) != set(prefill.plans) - set(layouts):
        raise UnsupportedError(f"the decode graph's regions {sorted(decode.plans)} differ from the prefill graph's "
                               f"{sorted(prefill.plans)}; the recipe cannot be applied to both the same way")
    if layouts:  # masked on the eager graph, then lowered: a backend that exports (ONNX) must see the masks
        masked = mask_decode_attention(decode.graph_module, decode.report().regions, layouts, kind, max_len)
        if masked != len(layouts):
            raise UnsupportedError(f"{len(layouts)} attention layouts were planned on the prefill graph and {masked} "
                                   "decode-step attention regions took them; the decode graph's regions differ")
    if trained is not None:
        _take_weights(decode.graph_module, trained.decode.graph_module, "decode")
    if relower:
        decode = _lowered(decode, captured, decode_recipe, backend, backend_options)
    _join(prefill, decode, kind)
    return CompiledCausalLM(prefill, decode, spec, max_len, Sampling.from_generation_config(
        getattr(model, "generation_config", None)), type(model).__name__, kind)


register_parts("causal_lm", CompiledCausalLM.from_parts)
