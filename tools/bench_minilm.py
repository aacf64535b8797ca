"""The real all-MiniLM-L6-v2 with each recipe, through ONNX Runtime: latency and agreement with dense.

    python tools/bench_minilm.py [--lengths 128 256] [--batch 8] [--repeats 5] [--out FILE]

Rows: PyTorch dense; ORT dense (exported, fused with onnxscript's optimize_for_ort);
ORT with each sparsecc recipe (SPION-CF layouts calibrated on standard-library
docstrings, block 16; sparse FFN n=32 distilled on the same text; both). All graphs
get the same fusion pass. Agreement: cosine of mean-pooled sentence embeddings
against PyTorch dense on held-out docstrings, and max |ORT - PyTorch| of the
same SparseModel (the export's own error).
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import sparsecc
    from sparsecc.backends.onnx import export_onnx
    from sparsecc.data import stdlib_sentences
    from sparsecc.models import load_model, text_batches
    from sparsecc.progress import progress

    threads = torch.get_num_threads()
    lines = [f"all-MiniLM-L6-v2 (pretrained), batch {args.batch}, ONNX Runtime CPU, {threads} threads; "
             f"median of {args.repeats}", "",
             "| L | model | latency | vs ORT dense | cosine to dense (mean / min) | max abs ORT vs PyTorch | attention density |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    recipes = {
        "identity": sparsecc.Recipe(),
        "SPION-CF (block 16, q 0.9)": sparsecc.Recipe(attention=sparsecc.Spion(block=16, quantile=0.9), ffn=None),
        "sparse FFN (n 32)": sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=32)),
        "SPION-CF + sparse FFN": sparsecc.Recipe(attention=sparsecc.Spion(block=16, quantile=0.9),
                                                 ffn=sparsecc.SparseFFN(n=32)),
    }
    tmp = tempfile.mkdtemp(prefix="sparsecc_minilm_")
    for L in args.lengths:
        loaded = load_model("minilm", batch=args.batch, seq_len=L)
        model = loaded.model
        calibration = text_batches(loaded, 4, L, offset=0)
        held = text_batches(loaded, 1, L, offset=1000)[0]
        mask = held["attention_mask"].unsqueeze(-1).float()

        def pooled(out):  # a ModelOutput, or the plain tuple a bare ORT session returns
            hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
            return (hidden * mask).sum(1) / mask.sum(1)

        with torch.no_grad():
            ref = pooled(model(**held))
            t_torch = median_seconds(lambda: model(**held), args.repeats)
        dense = sparsecc.compile(model, held, recipe=sparsecc.Recipe.dense(), check=False)
        raw, fused = os.path.join(tmp, f"dense_{L}.onnx"), os.path.join(tmp, f"dense_{L}_fused.onnx")
        export_onnx(dense, raw, dynamic=False)
        fuse_for_ort(raw, fused)
        ort_dense = ort_session(fused, threads)
        t_dense = median_seconds(lambda: ort_dense(**held), args.repeats)
        lines.append(f"| {L} | PyTorch dense | {t_torch * 1e3:.1f} ms | {t_dense / t_torch:.2f}x | 1 / 1 | - | 1 |")
        cos = torch.nn.functional.cosine_similarity(ref, pooled(ort_dense(**held)))
        lines.append(f"| {L} | ORT dense (fused) | {t_dense * 1e3:.1f} ms | 1.00x | {cos.mean():.4f} / "
                     f"{cos.min():.4f} | - | 1 |")
        for name, recipe in progress(recipes.items(), f"recipes at L={L}", unit="recipe"):
            sm = sparsecc.compile(model, held, recipe=recipe, calibration=calibration, check=False)
            raw, fused = os.path.join(tmp, f"sm_{L}.onnx"), os.path.join(tmp, f"sm_{L}_fused.onnx")
            export_onnx(sm, raw, dynamic=False)
            fuse_for_ort(raw, fused)
            session = ort_session(fused, threads)
            t = median_seconds(lambda: session(**held), args.repeats)
            with torch.no_grad():
                torch_out = sm(**held).last_hidden_state
            ort_out = session(**held)
            err = ((ort_out[0] if isinstance(ort_out, (tuple, list)) else ort_out.last_hidden_state)
                   - torch_out).abs().max().item()
            cos = torch.nn.functional.cosine_similarity(ref, pooled(ort_out))
            # at this length (the layouts themselves serve up to max_len, 512 here)
            here = [r.sparse["density"] for r in sm.report().attention if r.sparse and "density" in r.sparse]
            density = sum(here) / len(here) if here else 1.0
            lines.append(f"| {L} | ORT {name} | {t * 1e3:.1f} ms | {t_dense / t:.2f}x | {cos.mean():.4f} / "
                         f"{cos.min():.4f} | {err:.1e} | {density:.3f} |")
            print(lines[-1], flush=True)
    lines += ["", "vs ORT dense > 1 means faster. Sparse rows are without any fine-tuning after sparsifying.",
              f"machine: {machine_line()}"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
