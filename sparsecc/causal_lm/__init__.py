"""Hugging Face causal LMs compiled for generation: a prefill and a decode graph over a static KV cache."""

from sparsecc.causal_lm.cache_step import CacheSpec, CacheStep, cache_spec, is_hf_causal_lm
from sparsecc.causal_lm.compiled import CompiledCausalLM, compile_decoder
from sparsecc.causal_lm.generate import Sampling, generate_tokens, process_logits

__all__ = ["CacheSpec", "CacheStep", "CompiledCausalLM", "Sampling", "cache_spec", "compile_decoder",
           "generate_tokens", "is_hf_causal_lm", "process_logits"]
