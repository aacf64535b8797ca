"""`sparsecc demo`: the main job on the embedded default model, all-MiniLM-L6-v2.

Shows what inspect finds in a real pretrained BERT, compiles it (the identity
recipe until sparse methods are selected), and checks the compiled model
against the original on real English sentences.
"""

from __future__ import annotations

import time

import torch

import sparsecc
from sparsecc.data import stdlib_sentences
from sparsecc.models import minilm_dir
from sparsecc.report import format_table


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def run_demo(batch: int = 16, max_len: int = 128) -> dict:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    print(f"sparsecc demo: all-MiniLM-L6-v2 (pretrained, from {path})\n")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = stdlib_sentences(batch)
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    print(f"{len(sentences)} sentences from standard-library docstrings, padded to {enc['input_ids'].shape[1]} "
          f"tokens, e.g.\n  \"{sentences[0][:100]}...\"\n")

    start = time.perf_counter()
    sm = sparsecc.compile(model, inputs)
    compile_s = time.perf_counter() - start
    report = sm.report()
    print(report.table())
    print("\npasses: " + ", ".join(f"{p.name} {len(p.changes)}x {p.seconds * 1000:.0f}ms" for p in report.passes))

    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model(**inputs).last_hidden_state
        t1 = time.perf_counter()
        got = sm(**inputs).last_hidden_state
        t2 = time.perf_counter()
    err = (ref - got).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(_mean_pool(ref, enc["attention_mask"]),
                                                _mean_pool(got, enc["attention_mask"])).min().item()
    print("\n" + format_table(
        ["model", "forward (ms)", "max |diff| vs original", "min cosine of sentence embeddings"],
        [["original (PyTorch eager)", f"{(t1 - t0) * 1000:.1f}", "-", "-"],
         [f"sparsecc {type(sm.recipe.attention).__name__.lower()} recipe", f"{(t2 - t1) * 1000:.1f}",
          f"{err:.2e}", f"{cos:.6f}"]], align="lrrr"))
    print(f"\ncompiled in {compile_s:.2f}s (capture {report.stage_seconds['capture']:.2f}s). "
          "Sparse recipes (SPION attention, sparse FFN, token flow) plug into the same pipeline.")
    return {"max_abs_error": err, "min_cosine": cos, "regions": len(report.regions)}
