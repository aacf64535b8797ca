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
from sparsecc.errors import ModelSpecError
from sparsecc.models import minilm_dir
from sparsecc.report import format_table


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def spion_section(model, tokenizer, out_dir: str, seq_len: int = 128, block: int = 16, batch: int = 8,
                  png: bool = True) -> dict:
    """SPION-CF layouts for every layer, calibrated on docstrings (64 paragraphs in batches of `batch`, padded
    to `seq_len`); agreement with dense on held-out text. png: draw the layouts (needs matplotlib)."""
    import os

    from sparsecc.layouts import save_layout_png

    def batch_of(texts):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    calib_text = sorted(stdlib_sentences(256, offset=0), key=len, reverse=True)[:64]
    held_out = stdlib_sentences(32, offset=1000)
    calibration = [batch_of(calib_text[i:i + batch]) for i in range(0, 64, batch)]
    held = batch_of(held_out)
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(method="spion_cf", block=block, quantile=0.9), ffn=None)
    print(f"\nSPION-CF: calibrating on {len(calib_text)} docstring paragraphs at L={seq_len} in batches of {batch}, "
          f"block {block} ...")
    sm = sparsecc.compile(model, calibration[0], recipe=recipe, calibration=calibration)
    report = sm.report()
    print(report.table())
    picture = None
    if png:
        os.makedirs(out_dir, exist_ok=True)
        picture = os.path.join(out_dir, "minilm_spion_layouts.png")
        save_layout_png(sm.layouts, picture)
    with torch.no_grad():
        ref = _mean_pool(model(**held).last_hidden_state, held["attention_mask"])
        got = _mean_pool(sm(**held).last_hidden_state, held["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(ref, got)
    print(f"\nheld-out text ({len(held_out)} paragraphs): cosine of sentence embeddings to dense "
          f"mean {cos.mean():.4f}, min {cos.min():.4f} (no fine-tuning after sparsifying)")
    print(f"layout pictures: {picture}" if picture else "layout pictures: not drawn")
    return {"spion_mean_cosine": cos.mean().item(), "spion_density": sm.layouts.mean_density(), "png": picture,
            "spion_seq_len": seq_len}


def run_demo(batch: int = 16, max_len: int = 128, out_dir: str = "out/demo", png: bool = True) -> dict:
    """The identity recipe on `batch` sentences of at most `max_len` tokens, then SPION-CF at `max_len` tokens
    in calibration batches of `batch` (png: draw its layouts, needs matplotlib)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    print(f"sparsecc demo: all-MiniLM-L6-v2 (pretrained, from {path})\n")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if max_len > model.config.max_position_embeddings:
        raise ModelSpecError(f"--seq-len {max_len} is longer than all-MiniLM-L6-v2's max_position_embeddings "
                             f"({model.config.max_position_embeddings}); choose at most that")
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
    print(f"\ncompiled in {compile_s:.2f}s (capture {report.stage_seconds['capture']:.2f}s)")
    result = {"max_abs_error": err, "min_cosine": cos, "regions": len(report.regions)}
    result.update(spion_section(model, tokenizer, out_dir, seq_len=max_len, batch=batch, png=png))
    return result
