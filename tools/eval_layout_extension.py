"""SPION layouts served past their calibration length: quality of the extension rules, and what it costs.

    python tools/eval_layout_extension.py [--pairs 128:192 128:256 256:512] [--batch 8] [--block 16]
                                          [--quantile 0.9] [--repeats 5] [--out FILE]

The pretrained all-MiniLM-L6-v2, SPION-CF layouts (block 16, quantile 0.9) calibrated on standard-library
docstrings at the shorter length of each pair, then run on held-out docstrings at the longer one (paragraphs joined so that every example fills its length):
  - "structure" (the default of Spion.max_len: bands kept in >= half their tiles, global rows/columns,
    the diagonal), "repeat_band" and "diagonal" (BlockLayout.fit's other rules);
  - "calibrated at L": the layout calibrated at the longer length itself (the reference);
per row: density at the longer length, share of the reference's tiles the layout keeps (recall) in the
extended part, and the cosine of mean-pooled embeddings to dense (mean / min). A last table times ONNX
Runtime at the shorter length with layouts made for that length vs served up to the model's 512
positions (the default), to show what serving longer sequences costs the shorter ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_onnx import fuse_for_ort, ort_session  # noqa: E402
from common import emit, machine_line, median_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["128:192", "128:256", "256:512"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--quantile", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import sparsecc
    from sparsecc.backends.onnx import export_onnx
    from sparsecc.layouts import LayoutSet
    from sparsecc.models import load_model

    from transformers import AutoTokenizer

    from sparsecc.data import stdlib_paragraphs

    paragraphs = stdlib_paragraphs()

    def text_batches(loaded, batches: int, length: int, offset: int) -> list:
        """Consecutive docstring paragraphs joined until every example fills `length` tokens (attention
        past the calibration length is only exercised by text that reaches it)."""
        tokenizer = AutoTokenizer.from_pretrained(loaded.source_dir)
        per = length // 24 + 2  # paragraphs average ~30 tokens
        out = []
        for b in range(batches):
            start = offset + b * args.batch * per
            text = [" ".join(paragraphs[start + i * per: start + (i + 1) * per]) for i in range(args.batch)]
            enc = tokenizer(text, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            out.append({k: enc[k] for k in loaded.inputs if k in enc})
        return out

    def spion(**kw):
        return sparsecc.Recipe(attention=sparsecc.Spion(block=args.block, quantile=args.quantile, **kw), ffn=None)

    tmp = tempfile.mkdtemp(prefix="sparsecc_extend_")
    lines = [f"all-MiniLM-L6-v2 (pretrained), SPION-CF block {args.block}, quantile {args.quantile}, batch "
             f"{args.batch}; calibration: 4 batches of docstrings; quality on 1 held-out batch", "",
             "| calibrated at | run at | layout | density at run length | recall of calibrated tiles (extended part) "
             "| cosine to dense (mean / min) |", "|---:|---:|---|---:|---:|---:|"]
    for pair in args.pairs:
        short, long = (int(v) for v in pair.split(":"))
        loaded = load_model("minilm", batch=args.batch, seq_len=long)
        model = loaded.model
        held = text_batches(loaded, 1, long, offset=1000)[0]
        mask = held["attention_mask"].unsqueeze(-1).float()
        with torch.no_grad():
            ref = (model(**held).last_hidden_state * mask).sum(1) / mask.sum(1)
        calibration = text_batches(loaded, 4, short, offset=0)
        planned = sparsecc.compile(model, calibration[0], recipe=spion(max_len=short), check=False,
                                   calibration=calibration)
        reference = sparsecc.compile(model, held, recipe=spion(max_len=long), check=False,
                                     calibration=text_batches(loaded, 4, long, offset=0))
        nb = -(-short // args.block)
        for rule in ("calibrated at L", "structure", "repeat_band", "diagonal"):
            if rule == "calibrated at L":
                sm = reference
            else:
                folder = os.path.join(tmp, f"{short}_{long}_{rule}")
                LayoutSet((n, lay.fit(long, extend=rule)) for n, lay in planned.layouts.items()).save_dir(folder)
                sm = sparsecc.compile(model, held, recipe=spion(layouts=folder, max_len=long), check=False)
            kept = hit = 0
            for name, lay in sm.layouts.items():
                outside = torch.ones_like(lay.mask)
                outside[:nb, :nb] = False
                truth = reference.layouts[name].mask
                kept += int((truth & outside).sum())
                hit += int((truth & lay.mask & outside).sum())
            with torch.no_grad():
                out = (sm(**held).last_hidden_state * mask).sum(1) / mask.sum(1)
            cos = torch.nn.functional.cosine_similarity(ref, out)
            lines.append(f"| {short} | {long} | {rule} | {sm.layouts.mean_density():.3f} | {hit / max(kept, 1):.3f} | "
                         f"{cos.mean():.4f} / {cos.min():.4f} |")
            print(lines[-1], flush=True)

    threads = torch.get_num_threads()
    lines += ["", f"ONNX Runtime (fused, static shapes, {threads} threads), median of {args.repeats}: layouts "
              "for the run length vs served up to 512 tokens", "",
              "| L | layouts made for | latency | ratio |", "|---:|---|---:|---:|"]
    for L in sorted({int(p.split(":")[0]) for p in args.pairs}):
        loaded = load_model("minilm", batch=args.batch, seq_len=L)
        held = text_batches(loaded, 1, L, offset=1000)[0]
        calibration = text_batches(loaded, 4, L, offset=0)
        times = {}
        for label, max_len in ((f"{L} tokens (max_len={L})", L), ("512 tokens (default)", None)):
            sm = sparsecc.compile(loaded.model, held, recipe=spion(max_len=max_len), calibration=calibration,
                                  check=False)
            raw, fused = os.path.join(tmp, f"m_{L}_{max_len}.onnx"), os.path.join(tmp, f"m_{L}_{max_len}_f.onnx")
            export_onnx(sm, raw, dynamic=False)
            fuse_for_ort(raw, fused)
            session = ort_session(fused, threads)
            times[label] = median_seconds(lambda: session(**held), args.repeats)
        first = next(iter(times.values()))
        for label, t in times.items():
            lines.append(f"| {L} | {label} | {t * 1e3:.1f} ms | {t / first:.2f}x |")
    lines += ["", f"machine: {machine_line()}"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
