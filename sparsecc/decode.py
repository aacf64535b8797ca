"""Unbatched greedy decoding with an explicit KV cache, eager or through sparsecc.compile.

    from sparsecc.nn import CausalLM, DecoderConfig
    from sparsecc.decode import compile_decoder, decode_tokens, generate

    model = CausalLM(DecoderConfig(style="llama")).eval()
    ids = generate(model, prompt_ids, n_new=20)                     # eager: model.step
    dec = compile_decoder(model, max_len=64, recipe=sparsecc.Recipe(attention=None,
                          ffn=sparsecc.SparseFFN(n=32)), calibration_ids=text_ids)
    out = decode_tokens(dec, prompt_ids, n_new=20)                   # the compiled step graph

The prompt is fed one token at a time through the same step as the generated
tokens (one code path; the step is what gets compiled and timed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from sparsecc.errors import LayoutError
from sparsecc.nn.decoder import CausalLM, DecodeStep, DecoderConfig, empty_cache

__all__ = ["CompiledDecoder", "DecodeResult", "compile_decoder", "decode_tokens", "generate", "step_inputs"]


@dataclass
class CompiledDecoder:
    """A compiled decode step (`sparsecc.SparseModel` of `DecodeStep`) with the cache shape it was built for."""

    module: nn.Module
    cfg: DecoderConfig  # the config of the model it was compiled from (cache shapes)
    max_len: int


@dataclass
class DecodeResult:
    """tokens (P + n_new,); logits (P + n_new - 1, vocab): row i is the step output after feeding tokens[i]
    (so it equals the full-sequence forward of tokens[:-1]); seconds: wall time of each step."""

    tokens: torch.Tensor
    logits: torch.Tensor
    seconds: list = field(default_factory=list)


Decodable = Union[CausalLM, DecodeStep, CompiledDecoder]


def step_inputs(model: CausalLM, max_len: int, batch: int = 1, pos: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs of `DecodeStep(model)`: (input_ids (B, 1), pos (1,), k_cache, v_cache[, conv_cache])."""
    ids = torch.zeros(batch, 1, dtype=torch.long, device=model.embed.weight.device)
    return (ids, torch.tensor([pos], device=ids.device), *model.empty_cache(batch, max_len))


def _unwrap(model: Decodable) -> tuple[Any, DecoderConfig, Optional[int], torch.device]:
    """(step callable, config, fixed max_len or None, device of the weights)."""
    if isinstance(model, CompiledDecoder):
        return model.module, model.cfg, model.max_len, next(model.module.parameters()).device
    if isinstance(model, DecodeStep):
        model = model.model
    if isinstance(model, CausalLM):
        return model.step, model.cfg, None, model.embed.weight.device
    raise TypeError(f"expected a CausalLM, DecodeStep or CompiledDecoder, got {type(model).__name__}")


@torch.no_grad()
def decode_tokens(model: Decodable, prompt_ids: torch.Tensor, n_new: int, max_len: Optional[int] = None
                  ) -> DecodeResult:
    """Greedy decoding of one sequence (batch 1): feed prompt_ids ((P,) or (1, P)) token by token, then
    n_new arg-max tokens. The cache holds max_len positions (the compiled one's own; otherwise
    P + n_new - 1)."""
    step, cfg, fixed, device = _unwrap(model)
    prompt = prompt_ids.reshape(-1)
    if prompt.numel() < 1 or n_new < 0:
        raise ValueError("decode_tokens: need a non-empty prompt and n_new >= 0")
    n_steps = prompt.numel() + n_new - 1
    max_len = fixed or max_len or max(n_steps, 1)
    if n_steps > max_len:
        raise LayoutError(f"decode_tokens: {n_steps} steps do not fit a cache of max_len={max_len}")
    state = empty_cache(cfg, 1, max_len, device=device)
    tokens, logits, seconds = prompt.tolist(), [], []
    for i in range(n_steps):
        start = time.perf_counter()
        out = step(torch.tensor([[tokens[i]]], device=device), torch.tensor([i], device=device), *state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        logits.append(out[0][0, -1])
        state = tuple(out[1:])
        if i + 1 >= len(tokens):
            tokens.append(int(out[0][0, -1].argmax()))
    empty = torch.zeros(0, cfg.vocab_size)
    return DecodeResult(torch.tensor(tokens), torch.stack(logits).cpu() if logits else empty, seconds)


def generate(model: Decodable, prompt_ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuation: the prompt followed by n_new generated token ids (1-D)."""
    return decode_tokens(model, prompt_ids, n_new).tokens


@torch.no_grad()
def calibration_steps(model: CausalLM, ids: torch.Tensor, max_len: int) -> list[tuple[torch.Tensor, ...]]:
    """Step inputs seen while teacher-forcing ids ((T,) or (1, T)) through `model.step`, in windows of
    max_len positions (the cache restarts at each window): calibration data for compiling the step."""
    ids = ids.reshape(-1)
    inputs = []
    for start in range(0, ids.numel(), max_len):
        state = model.empty_cache(1, max_len)
        for i, tok in enumerate(ids[start:start + max_len].tolist()):
            args = (torch.tensor([[tok]]), torch.tensor([i]), *state)
            inputs.append(args)
            state = tuple(model.step(*args)[1:])
    return inputs


def compile_decoder(model: CausalLM, max_len: int, recipe: Any = None, calibration_ids: Optional[torch.Tensor] = None,
                    **compile_kwargs: Any) -> CompiledDecoder:
    """`sparsecc.compile` the decode step of `model` (static shapes: batch 1, cache of max_len).

    recipe defaults to `Recipe.dense()` (capture only; FFNs that are `SparseFFN` modules already appear
    as `sparsecc::sparse_ffn`). With a `sparsecc.SparseFFN` recipe, calibration_ids (real text) are
    teacher-forced through the step to give the controllers' calibration inputs.
    """
    import sparsecc

    model = model.eval()
    recipe = sparsecc.Recipe.dense() if recipe is None else recipe
    calibration = calibration_steps(model, calibration_ids, max_len) if calibration_ids is not None else None
    compile_kwargs.setdefault("dynamic", False)
    sm = sparsecc.compile(DecodeStep(model), step_inputs(model, max_len), recipe=recipe,
                          calibration=calibration, **compile_kwargs)
    return CompiledDecoder(sm, model.cfg, max_len)
