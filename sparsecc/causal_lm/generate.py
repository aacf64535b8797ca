"""Greedy and sampled generation over a prefill step and a one-token decode step, as Hugging Face's
`generate` does it (greedy search and multinomial sampling, num_beams=1).

    tokens = generate_tokens(prefill, decode, spec, max_len, input_ids, attention_mask,
                             Sampling(do_sample=True, temperature=0.8, top_k=50, top_p=0.95), max_new_tokens=20)

`prefill` and `decode` are callables with the `CacheStep` signature (the compiled graphs, or the
model itself wrapped in `CacheStep`). Left padding is the convention, as for HF decoders: padded
slots stay in the cache and are masked out by the attention mask, and positions count real tokens
only (cumsum of the mask - 1, as `prepare_inputs_for_generation` computes them), so a left-padded
row generates what the same prompt alone would.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch

from sparsecc.errors import InputError

log = logging.getLogger("sparsecc.causal_lm")

__all__ = ["PROCESSOR_OPTIONS", "PastCacheSteps", "Sampling", "StaticCacheSteps", "generate_tokens",
           "logits_processors", "prefill_inputs", "process_logits", "prompt_positions", "token_batches"]

# transformers' defaults for the fields a model's generation_config leaves unset
# (GenerationConfig._get_default_generation_params)
_HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# generation_config fields of HF's processors sparsecc applies (through HF's own processor classes), with the
# values that switch them off
PROCESSOR_OPTIONS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
                     "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None}
# generation_config fields of HF's other processors and of beam search, with their values that change nothing
_NOT_APPLIED = {"num_beams": (1,), "forced_bos_token_id": (), "forced_eos_token_id": (), "min_p": (),
                "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
                "encoder_repetition_penalty": (1.0,), "sequence_bias": (), "exponential_decay_length_penalty": (),
                "guidance_scale": (1.0,)}


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: HF's logits processors for the settings below (repetition penalty,
    n-gram blocking, minimum lengths, banned and suppressed tokens: transformers' own classes, in HF's
    order), then greedy (arg-max) unless do_sample; with do_sample the scores go through temperature,
    then top-k, then top-p (HF's warpers, in HF's order) and one token is drawn."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = 50
    top_p: float = 1.0
    eos_token_id: Optional[tuple] = None
    pad_token_id: Optional[int] = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    min_new_tokens: int = 0
    bad_words_ids: Optional[tuple] = None  # of token-id tuples
    suppress_tokens: Optional[tuple] = None
    begin_suppress_tokens: Optional[tuple] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature={self.temperature}: expected a number > 0 (use do_sample=False for "
                             "greedy decoding)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise InputError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 or None: no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p}: expected a number in (0, 1] (1: no top-p filter)")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty={self.repetition_penalty}: expected a number > 0 (1: none)")
        for name in ("no_repeat_ngram_size", "min_length", "min_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name}={value!r}: expected an integer >= 0 (0: none)")
        for name in ("eos_token_id", "suppress_tokens", "begin_suppress_tokens"):  # JSON and users give lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.bad_words_ids is not None:
            object.__setattr__(self, "bad_words_ids", tuple(tuple(words) for words in self.bad_words_ids))

    @classmethod
    def from_generation_config(cls, config: Any) -> "Sampling":
        """The model's own defaults (its generation_config, then transformers' global defaults). Settings of
        HF's other logits processors and of beam search are not applied: a warning names them."""
        ignored = [f"{name}={getattr(config, name)!r}" for name, neutral in _NOT_APPLIED.items()
                   if getattr(config, name, None) not in (None, [], *neutral)]
        if ignored:
            message = (f"the model's generation_config sets {', '.join(ignored)}, which sparsecc's generate does not "
                       "apply (beam search and those processors): its tokens can differ from the model's own "
                       "generate")
            log.warning("%s", message)
            warnings.warn(message, UserWarning, stacklevel=3)
        def field(name: str) -> Any:
            value = getattr(config, name, None)
            return _HF_DEFAULTS[name] if value is None else value
        eos = getattr(config, "eos_token_id", None)
        eos = None if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        processors = {name: getattr(config, name) for name, off in PROCESSOR_OPTIONS.items()
                      if getattr(config, name, None) not in (None, off)}
        return cls(do_sample=bool(getattr(config, "do_sample", False) or False), temperature=float(field("temperature")),
                   top_k=field("top_k"), top_p=float(field("top_p")), eos_token_id=eos,
                   pad_token_id=getattr(config, "pad_token_id", None), **processors)

    def updated(self, **changes: Any) -> "Sampling":
        """A copy with the given fields changed (None leaves a field as it is)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "eos_token_id" in changes:
            eos = changes["eos_token_id"]
            changes["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        return replace(self, **changes)


def process_logits(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The warped scores [B, vocab] sampling draws from (HF's Temperature, TopK, TopP warpers)."""
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.size(-1))
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - sampling.top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def logits_processors(sampling: Sampling, attention_mask: torch.Tensor, extra: Any = None) -> list:
    """HF's logits processors for `sampling`'s settings, built as HF's generate builds them (same classes,
    same order), then `extra` (callables (input_ids, scores) -> scores, e.g. a LogitsProcessorList).
    attention_mask: the (left-padded) prompt's."""
    out: list = []
    if any(getattr(sampling, name) not in (None, off) for name, off in PROCESSOR_OPTIONS.items()):
        from transformers.generation import logits_process as hf

        device = attention_mask.device
        eos = torch.tensor(sampling.eos_token_id, device=device) if sampling.eos_token_id else None
        prompt = attention_mask.shape[1]
        if sampling.repetition_penalty != 1.0:
            padding = (attention_mask != 0).int().argmax(dim=1)
            out.append(hf.RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty, prompt_ignore_length=padding))
        if sampling.no_repeat_ngram_size > 0:
            out.append(hf.NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size))
        if sampling.bad_words_ids is not None:
            out.append(hf.NoBadWordsLogitsProcessor([list(words) for words in sampling.bad_words_ids], eos))
        if sampling.min_length > 0 and eos is not None:
            out.append(hf.MinLengthLogitsProcessor(sampling.min_length, eos, device=device))
        if sampling.min_new_tokens > 0 and eos is not None:
            out.append(hf.MinNewTokensLengthLogitsProcessor(prompt, sampling.min_new_tokens, eos, device=device))
        if sampling.suppress_tokens is not None:
            out.append(hf.SuppressTokensLogitsProcessor(list(sampling.suppress_tokens), device=device))
        if sampling.begin_suppress_tokens is not None:
            out.append(hf.SuppressTokensAtBeginLogitsProcessor(list(sampling.begin_suppress_tokens), prompt,
                                                              device=device))
    if extra is not None:
        extra = [extra] if callable(extra) and not isinstance(extra, (list, tuple)) else list(extra)
        bad = [type(p).__name__ for p in extra if not callable(p)]
        if bad:
            raise InputError(f"logits_processor: expected callables (input_ids, scores) -> scores (HF's "
                             f"LogitsProcessor interface), got {bad[0]}")
        out += extra
    return out


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> torch.Tensor:
    scores = logits.float()
    if not sampling.do_sample:
        return scores.argmax(dim=-1)
    probs = process_logits(scores, sampling).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def prefill_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: tuple, max_len: int) -> tuple:
    """The `CacheStep` inputs that run a left-padded prompt [B, P] into an empty cache of max_len."""
    batch, length = input_ids.shape
    mask = torch.zeros(batch, max_len, dtype=torch.long, device=input_ids.device)
    mask[:, :length] = attention_mask
    return (input_ids, mask, prompt_positions(attention_mask), torch.tensor(0, device=input_ids.device), *cache)


def token_batches(batches: Any, max_len: int, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of each batch of `batches` (calibration or training text): token ids
    [B, T] with 2 <= T <= max_len, or dicts with input_ids (and attention_mask)."""
    if isinstance(batches, (torch.Tensor, dict)) or not hasattr(batches, "__iter__"):
        raise InputError(f"{what} must be a list of batches of token ids ([batch, length] tensors or dicts "
                         f"with input_ids and attention_mask), got {type(batches).__name__}")
    out = []
    for i, batch in enumerate(batches):
        ids, mask = (batch.get("input_ids"), batch.get("attention_mask")) if isinstance(batch, dict) else (batch, None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise InputError(f"{what} batch {i}: expected token ids [batch, length] (an integer tensor, or a "
                             f"dict with 'input_ids'), got {type(ids).__name__}"
                             f"{' ' + str(list(ids.shape)) if isinstance(ids, torch.Tensor) else ''}")
        if not 2 <= ids.shape[1] <= max_len:
            raise InputError(f"{what} batch {i} has {ids.shape[1]} tokens; the prefill graph takes 2 to "
                             f"max_len={max_len}: cut the text into pieces of at most {max_len} tokens")
        out.append((ids.long(), (torch.ones_like(ids) if mask is None else mask).long()))
    if not out:
        raise InputError(f"{what} is empty: pass at least one batch of token ids")
    return out


def _check_prompt(input_ids: Any, attention_mask: Any, max_len: int, max_new_tokens: int) -> tuple:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise InputError(f"input_ids: expected an integer tensor of token ids [batch, length], got "
                         f"{type(input_ids).__name__}{'' if not isinstance(input_ids, torch.Tensor) else ' ' + str(input_ids.dtype)}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids has shape {list(input_ids.shape)}; expected [batch, length] with length >= 1")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}; "
                         "expected the same shape (1 for tokens, 0 for left padding)")
    if bool((attention_mask[:, -1] == 0).any()):
        raise InputError("attention_mask ends in 0 on some row: decoders need left padding (pad before the prompt; "
                         "tokenizer.padding_side = 'left')")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise InputError("attention_mask is all 0 on some row: every prompt needs at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    length = input_ids.shape[1]
    if length > max_len:
        raise InputError(f"the prompt has {length} tokens (padding included) and the decoder was compiled for "
                         f"max_len={max_len}: compile with a larger max_len or shorten the prompt")
    if length + max_new_tokens > max_len:
        raise InputError(f"{length} prompt tokens + max_new_tokens={max_new_tokens} = {length + max_new_tokens} "
                         f"positions, the cache holds max_len={max_len}: ask for at most {max_len - length} new "
                         "tokens, or compile with a larger max_len")
    return input_ids.long(), attention_mask.long()


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded prompt as HF's generate gives them: real tokens count from 0, pads get 1."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


class StaticCacheSteps:
    """Generation over `CacheStep` graphs: a cache of max_len positions written in place, a [B, max_len] mask."""

    def __init__(self, prefill: Callable, decode: Callable, empty_cache: Callable[[int], tuple], max_len: int):
        self.prefill_graph, self.decode_graph, self.empty_cache, self.max_len = prefill, decode, empty_cache, max_len

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        inputs = prefill_inputs(input_ids, attention_mask, self.empty_cache(input_ids.shape[0]), self.max_len)
        graph = self.prefill_graph if input_ids.shape[1] > 1 else self.decode_graph  # prefill takes 2 or more
        return graph(*inputs), (inputs[1], inputs[4:])

    def next(self, token: torch.Tensor, attention_mask: torch.Tensor, position: torch.Tensor, state: tuple) -> tuple:
        mask, cache = state
        index = attention_mask.shape[1] - 1
        mask[:, index] = 1
        return self.decode_graph(token, mask, position, torch.tensor(index, device=token.device), *cache), state


class PastCacheSteps:
    """Generation over `PastStep` graphs (ONNX Runtime): the cache goes in as past and comes back as present,
    one position longer; the mask covers the tokens so far."""

    def __init__(self, prefill: Callable, decode: Callable):
        self.prefill_graph, self.decode_graph = prefill, decode

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        extra = int(input_ids.shape[1] == 1)  # the prefill graph takes 2 or more: a masked pad in front changes nothing
        if extra:
            input_ids = torch.cat([torch.zeros_like(input_ids), input_ids], 1)
            attention_mask = torch.cat([torch.zeros_like(attention_mask), attention_mask], 1)
        out = self.prefill_graph(input_ids, attention_mask, prompt_positions(attention_mask))
        return out[0][:, extra:], (extra, tuple(out[1:]))

    def next(self, token: torch.Tensor, attention_mask: torch.Tensor, position: torch.Tensor, state: tuple) -> tuple:
        extra, past = state
        if extra:
            attention_mask = torch.cat([torch.zeros_like(attention_mask[:, :extra]), attention_mask], 1)
        out = self.decode_graph(token, attention_mask, position, *past)
        return out[0], (extra, tuple(out[1:]))


@torch.no_grad()
def generate_tokens(steps: Any, max_len: int, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    sampling: Sampling = Sampling(), max_new_tokens: int = 20,
                    generator: Optional[torch.Generator] = None, streamer: Any = None,
                    logits_processor: Any = None) -> torch.Tensor:
    """The prompt followed by up to max_new_tokens generated tokens [B, P + n], n <= max_new_tokens:
    generation stops when every row has produced an end-of-sequence token, and rows that finished
    earlier are filled with the pad token, as HF's generate does. steps: StaticCacheSteps or
    PastCacheSteps. streamer: an object with HF's streamer interface (e.g. transformers.TextStreamer):
    put(prompt ids), put(each new token [B]), end(). logits_processor: more processors after the ones
    `sampling` asks for (`logits_processors`)."""
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask, max_len, max_new_tokens)
    processors = logits_processors(sampling, attention_mask, logits_processor)
    batch, length = input_ids.shape
    eos: Optional[Sequence[int]] = sampling.eos_token_id
    pad = sampling.pad_token_id if sampling.pad_token_id is not None else (eos[0] if eos else None)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = [input_ids]
    if max_new_tokens:
        logits, state = steps.prefill(input_ids, attention_mask)
        logits, mask, position = logits[:, -1], attention_mask, prompt_positions(attention_mask)[:, -1:]
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        eos_ids = torch.tensor(list(eos), device=input_ids.device) if eos else None
        for i in range(max_new_tokens):
            if processors:
                so_far = torch.cat(out, dim=1)
                logits = logits.to(torch.float32, copy=True)  # HF processes a float32 copy
                for processor in processors:
                    logits = processor(so_far, logits)
            token = next_tokens(logits, sampling, generator)
            if eos_ids is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
                unfinished &= ~torch.isin(token, eos_ids)
            out.append(token[:, None])
            if streamer is not None:
                streamer.put(token.cpu())
            if i + 1 == max_new_tokens or not bool(unfinished.any()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            position = position + 1
            logits, state = steps.next(token[:, None], mask, position, state)
            logits = logits[:, -1]
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)
