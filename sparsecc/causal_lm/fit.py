"""Train a compiled decoder's token-flow gates (and weights) by distillation from the dense model.

    dec = sparsecc.compile_decoder(model, max_len=256, recipe=sparsecc.Recipe(
        flow=sparsecc.TokenFlow(gate="content", pin_first=False, keep=0.5)))
    result = dec.fit_flow(batches, teacher=model, steps=300)   # token ids [B, T], T <= max_len
    dec.generate(ids)                                          # both graphs route with the trained gates

Training runs the prefill graph's soft-gate training graph (`FlowSparseModel`) on whole sequences:
the loss is KL(teacher || student) of the next-token distributions over the real (not padding)
tokens, plus SparseFlow's sparsity penalty, and at the end `calibrate_keep` sets each layer's
threshold so the hard decisions keep the recipe's fraction (`sparsecc.train.flow.fit_flow`). The
decode graph shares every parameter and gate with the prefill graph, so it routes with the trained
gates too. ONNX Runtime decoders are not trained in place (their sessions hold the weights they
were built with): train an eager decoder, then `compile_decoder(..., backend="onnxruntime",
trained=dec)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsecc.causal_lm.generate import prefill_inputs, token_batches
from sparsecc.errors import UnsupportedError
from sparsecc.train.flow import FlowFitResult, fit_flow
from sparsecc.train.losses import kl_distill

__all__ = ["DenseLogits", "fit_decoder_flow"]


class DenseLogits(nn.Module):
    """The dense teacher on the prefill graph's inputs: the model's full-sequence logits, no cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                start: torch.Tensor, *cache: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[:, :input_ids.shape[1]]  # the prefill writes slots 0 .. T - 1
        return self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits


def _real_token_kl(student: torch.Tensor, teacher: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at the real tokens (left padding dropped)."""
    real = inputs[1][:, :inputs[0].shape[1]].bool()
    return kl_distill(student[real], teacher[real])


def fit_decoder_flow(dec: Any, batches: Any, teacher: nn.Module, steps: int, **options: Any) -> FlowFitResult:
    """Distil `teacher` (the dense model) into `dec`'s flowed prefill graph (see the module docstring).

    batches: token ids [B, T] (2 <= T <= max_len) or dicts with input_ids and attention_mask (left
    padding). options: those of `sparsecc.train.flow.fit_flow` (lr, gate_lr, penalty, train_model, ...).
    """
    if not hasattr(dec.prefill, "flow_gates"):
        raise UnsupportedError("fit_flow trains token-flow gates; this decoder has none to train (compiled without "
                               "recipe.flow, or loaded by sparsecc.load, which keeps the inference graphs): "
                               "compile it with compile_decoder(..., recipe=Recipe(flow=TokenFlow(gate='content', "
                               "pin_first=False)))")
    if dec.cache_kind != "static":
        raise UnsupportedError("fit_flow trains an eager or inductor decoder (an ONNX Runtime session keeps the "
                               "weights it was built with): train one compiled with backend='eager', then "
                               "compile_decoder(model, ..., backend='onnxruntime', trained=dec)")
    if isinstance(teacher, type(dec)) or not isinstance(teacher, nn.Module):
        raise UnsupportedError(f"teacher: expected the dense Hugging Face model to distil from, got "
                               f"{type(teacher).__name__}")
    pairs = token_batches(batches, dec.max_len, "fit_flow batches")
    device = dec.device

    def inputs_of(batch: tuple) -> tuple:  # a fresh cache each call: the training graph writes into it
        ids, mask = (t.to(device) for t in batch)
        return prefill_inputs(ids, mask, dec.empty_cache(ids.shape[0], device), dec.max_len)

    try:
        return fit_flow(dec.prefill, pairs, steps=steps, teacher=DenseLogits(teacher), distill=_real_token_kl,
                        inputs_of=inputs_of, **options)
    finally:
        dec.prefill.eval()
