"""What skipping tokens costs MiniLM before any training: frozen weights, per-layer keep, pooled cosine.

    python tools/probe_flow_skipping.py [--schedules "0.5*6" "0.3 0.4 0.4 0.5 0.6 0.8" ...]

Runs the pretrained all-MiniLM-L6-v2 layer by layer on the held-out paragraphs of
tools/bench_flow_minilm.py with the SparseFlow update h <- where(kept, Layer(h), h) (kept tokens
attend to every token, as released; CLS always kept) and no fine-tuning, for three choices of the
kept tokens at each layer's budget ceil(keep * tokens):

- random: uniformly random tokens;
- largest update: the tokens whose state the layer changes most, |Layer(h) - h| (a greedy oracle
  that needs the layer's output for every token, so not a gate one can run);
- largest angle: the same by 1 - cos(Layer(h), h).

Prints the cosine of the mean-pooled sentence embeddings to the dense model and the top-10 overlap
of the retrieval set, as the benchmark measures them. The gap between these figures and the trained
gates' shows how much of the quality comes from adapting the weights rather than from choosing tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_flow_minilm import _pooled, natural_batches, overlap_at_10, split_paragraphs  # noqa: E402
from common import machine_line  # noqa: E402

POLICIES = ("random", "largest update", "largest angle")


def run(model, batch, policy: str, keeps: list[float], generator: torch.Generator) -> torch.Tensor:
    """Pooled, normalised embeddings with tokens skipped per `keeps` (one per layer; 1.0 = dense)."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    h = model.embeddings(input_ids=ids)
    additive = (1.0 - am[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    valid = am.bool()
    for layer, keep in zip(model.encoder.layer, keeps):
        out = layer(h, attention_mask=additive)
        out = out[0] if isinstance(out, tuple) else out
        if keep >= 1.0:
            h = out
            continue
        if policy == "random":
            score = torch.rand(h.shape[:2], generator=generator)
        elif policy == "largest update":
            score = (out - h).norm(dim=-1)
        else:
            score = 1 - torch.nn.functional.cosine_similarity(out, h, dim=-1)
        score = score.masked_fill(~valid, float("-inf"))
        score[:, 0] = float("inf")  # CLS pinned
        budget = torch.ceil(keep * valid.sum(1)).long()
        rank = score.argsort(1, descending=True).argsort(1)
        kept = (rank < budget[:, None]) & valid
        h = torch.where(kept[..., None], out, h)
    return _pooled(h, am)


def parse_schedule(text: str, n_layers: int) -> list[float]:
    if "*" in text:
        value, count = text.split("*")
        keeps = [float(value)] * int(count)
    else:
        keeps = [float(v) for v in text.split()]
    if len(keeps) != n_layers or not all(0 < k <= 1 for k in keeps):
        raise SystemExit(f"--schedules: {text!r} gives {keeps}; expected {n_layers} kept fractions in (0, 1]")
    return keeps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", nargs="+",
                        default=["0.5*6", "0.8 0.6 0.5 0.4 0.4 0.3", "0.3 0.4 0.4 0.5 0.6 0.8", "0.75*6"])
    parser.add_argument("--eval-paragraphs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModel, AutoTokenizer

    from sparsecc.models import minilm_dir
    path = minilm_dir()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    n_layers = len(model.encoder.layer)
    schedules = [parse_schedule(s, n_layers) for s in args.schedules]
    held = split_paragraphs()[1][: args.eval_paragraphs]
    corpus = natural_batches(tokenizer, held, 16)
    queries = natural_batches(tokenizer, [" ".join(p.split()[: max(4, len(p.split()) // 2)])
                                          for p in held[: args.queries]], 16)
    dense = [1.0] * n_layers
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref_c = torch.cat([run(model, b, "random", dense, g) for b in corpus])
        ref_q = torch.cat([run(model, b, "random", dense, g) for b in queries])
        hf = torch.cat([_pooled(model(**b).last_hidden_state, b["attention_mask"]) for b in corpus])
        assert (hf - ref_c).abs().max() < 1e-4, "the layer-by-layer run does not reproduce the model"
        print("| choice | keep per layer | cosine mean / min | top-10 overlap |\n|---|---|---:|---:|")
        for policy in POLICIES:
            for keeps in schedules:
                c = torch.cat([run(model, b, policy, keeps, g) for b in corpus])
                q = torch.cat([run(model, b, policy, keeps, g) for b in queries])
                cos = (ref_c * c).sum(-1)
                print(f"| {policy} | {' '.join(f'{k:g}' for k in keeps)} | {cos.mean():.4f} / {cos.min():.4f} | "
                      f"{overlap_at_10(ref_q, ref_c, q, c):.3f} |", flush=True)
    print(f"\nmachine: {machine_line()}")


if __name__ == "__main__":
    main()
