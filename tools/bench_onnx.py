"""Benchmark: a BERT-shaped encoder in PyTorch vs ONNX Runtime, dense vs the sparsecc graph.

Rows per sequence length L (batch 1, random weights, fp32, CPU):
  encoder: PyTorch dense (SDPA) | ORT dense (exported dense, fused by onnxscript's optimize_for_ort)
           | ORT sparsecc identity graph | ORT sparsecc SPION-like graph (block-sparse attention,
           BigBird layouts at ~1/8 density, block 64, dense FFN; `--method` picks another fixed family).
           The sparsecc graphs get the same optimize_for_ort pass (LayerNorm/Gelu fusions).
  attention alone (B1 H12 D64): PyTorch SDPA | PyTorch sparsecc::block_sparse_attention |
           ORT fused MultiHeadAttention (com.microsoft, ORT's own dense kernel) | ORT translation of
           sparsecc::attention (MatMul/Softmax/MatMul) | ORT block-sparse translation
Each latency is the median of --repeats runs after one warm-up; ratios are vs the row's
first entry. Prints a markdown table with the machine line; --out FILE also writes it.

    python tools/bench_onnx.py                 # L = 1024, 2048, 4096, 12 layers (slow on 2 cores)
    python tools/bench_onnx.py --quick         # L = 512, 1024, 2 layers
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sparsecc  # noqa: E402
from common import machine_line, median_seconds, write_atomic  # noqa: E402
from sparsecc.backends.onnx import export_graph, export_onnx  # noqa: E402
from sparsecc.backends.onnxruntime import OnnxRuntimeModule, session_options  # noqa: E402
from sparsecc.methods.fixed.layouts import layout_at_density  # noqa: E402
from sparsecc.ops.block_sparse_attention import block_sparse_attention  # noqa: E402
from sparsecc import Fixed  # noqa: E402


def bert_encoder(layers: int, hidden: int, heads: int, max_len: int):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=max(512, max_len),
                     attn_implementation="sdpa")
    return BertModel(cfg).eval()


def ort_session(path: str, threads: int) -> OnnxRuntimeModule:
    return OnnxRuntimeModule(path, session_options=session_options(intra_op_num_threads=threads))


def fuse_for_ort(src: str, dst: str) -> dict:
    """onnxscript's ORT fusions (Attention, SkipLayerNorm, BiasGelu, ...), as the onnxruntime backend applies
    them; `dst` is a copy of `src` when nothing fuses. Returns the fusion counts."""
    import shutil

    from sparsecc.backends.onnxruntime import fuse_for_ort as fuse
    counts = fuse(src, dst)
    if not counts:
        shutil.copyfile(src, dst)
    return counts


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.sparsecc.attention(q, k, v, None, 0.0, False, None, False)


class _BlockSparse(torch.nn.Module):
    def __init__(self, layout):
        super().__init__()
        idx, cnt = layout.ell()
        self.register_buffer("idx", idx)
        self.register_buffer("cnt", cnt)
        self.block = layout.block_size

    def forward(self, q, k, v):
        return torch.ops.sparsecc.block_sparse_attention(q, k, v, self.idx, self.cnt, self.block,
                                                         q.shape[-1] ** -0.5, False, None)[0]


def flops_limit(L: int, hidden: int, density: float) -> float:
    """Dense / sparse FLOPs of a BERT layer when attention keeps `density` of its blocks:
    projections + FFN 24 L h^2 (FFN 4h), attention scores and values 4 L^2 h."""
    dense_rest, attention = 24 * L * hidden ** 2, 4 * L * L * hidden
    return (dense_rest + attention) / (dense_rest + attention * density)


def fused_mha_model(path: str, heads: int, length: int, head_dim: int) -> None:
    """ORT's own fused dense attention: one com.microsoft MultiHeadAttention node on (B, L, H*D) inputs,
    the kernel optimize_for_ort's attention fusions produce in the dense encoder."""
    import onnx
    from onnx import TensorProto, helper
    width = heads * head_dim
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, length, width]) for n in "qkv"]
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads)
    graph = helper.make_graph([node], "mha", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)


def _fmt(seconds: float, base: float) -> str:
    return f"{seconds * 1e3:,.0f} ms ({base / seconds:.2f}x)"


def bench_length(L: int, args, tmp: str, threads: int, log) -> list[str]:
    rows = []
    density = args.density
    layout = layout_at_density(args.method, L, args.block, density)
    # --- attention alone
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, L, args.hidden // args.heads, generator=g) for _ in range(3))
    with torch.no_grad():
        t_sdpa = median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.repeats)
        t_bsa = median_seconds(lambda: block_sparse_attention(q, k, v, *layout.ell(), layout.block_size),
                               args.repeats)
    p_dense, p_sparse = os.path.join(tmp, f"attn_dense_{L}.onnx"), os.path.join(tmp, f"attn_bsa_{L}.onnx")
    for module, path in ((_Attention(), p_dense), (_BlockSparse(layout), p_sparse)):
        export_graph(torch.export.export(module, (q, k, v)).module(), (q, k, v), {}, path, dynamic=False)
    p_mha = os.path.join(tmp, f"attn_mha_{L}.onnx")
    fused_mha_model(p_mha, args.heads, L, args.hidden // args.heads)
    ort_dense, ort_sparse, ort_mha = (ort_session(p, threads) for p in (p_dense, p_sparse, p_mha))
    qs, ks, vs = (t.transpose(1, 2).reshape(1, L, -1).contiguous() for t in (q, k, v))
    t_ort_mha = median_seconds(lambda: ort_mha(qs, ks, vs), args.repeats)
    t_ort_dense = median_seconds(lambda: ort_dense(q, k, v), args.repeats)
    t_ort_sparse = median_seconds(lambda: ort_sparse(q, k, v), args.repeats)
    rows.append(f"| attention B1 H{args.heads} L{L} D{args.hidden // args.heads} | {t_sdpa * 1e3:,.0f} ms | "
                f"{_fmt(t_bsa, t_sdpa)} | {_fmt(t_ort_mha, t_sdpa)} | {_fmt(t_ort_dense, t_sdpa)} | "
                f"{_fmt(t_ort_sparse, t_sdpa)} | {layout.density:.3f} | {t_ort_mha / t_ort_sparse:.2f}x |")
    log(rows[-1])
    if args.attention_only:
        return rows

    # --- encoder
    model = bert_encoder(args.layers, args.hidden, args.heads, L)
    ids = torch.randint(1000, 30000, (1, L), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        t_torch = median_seconds(lambda: model(**inputs), args.repeats)
    start = time.perf_counter()
    dense = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe.dense(), check=False)
    p_raw, p_fused = os.path.join(tmp, f"dense_{L}.onnx"), os.path.join(tmp, f"dense_fused_{L}.onnx")
    export_onnx(dense, p_raw, dynamic=False)
    fusions = fuse_for_ort(p_raw, p_fused)
    log(f"L={L}: dense export + fusion {time.perf_counter() - start:.0f} s, fusions {fusions}")
    ort_dense = ort_session(p_fused, threads)
    t_ort_dense = median_seconds(lambda: ort_dense(**inputs), args.repeats)
    del ort_dense

    results = []
    recipes = [("identity", sparsecc.Recipe())]
    recipes.append(("spion", sparsecc.Recipe(attention=Fixed(pattern=args.method, block=args.block, density=density),
                                             ffn=None)))
    if args.skip_identity:
        recipes = recipes[1:]
    for name, recipe in recipes:
        start = time.perf_counter()
        sm = sparsecc.compile(model, inputs, recipe=recipe, check=False)
        path = os.path.join(tmp, f"{name}_{L}.onnx")
        result = export_onnx(sm, path, dynamic=False)
        fused = fuse_for_ort(path, path.replace(".onnx", "_fused.onnx"))
        path = path.replace(".onnx", "_fused.onnx")
        dens = [r["density"] for r in result.regions if r["kind"] == "attention"]
        log(f"L={L}: {name} compile + export {time.perf_counter() - start:.0f} s; attention density "
            f"{sum(dens) / max(1, len(dens)):.3f}; fusions {fused}")
        session = ort_session(path, threads)
        results.append((name, median_seconds(lambda: session(**inputs), args.repeats), dens))
        del session, sm
    cells = [f"{_fmt(t, t_torch)}" for _, t, _ in results]
    if args.skip_identity:
        cells.insert(0, "-")
    spion_density = sum(results[-1][2]) / max(1, len(results[-1][2]))
    limit = flops_limit(L, args.hidden, spion_density)
    speedup = t_ort_dense / results[-1][1]
    rows.append(f"| BERT {args.layers}L-{args.hidden} B1 L{L} | {t_torch * 1e3:,.0f} ms | {_fmt(t_ort_dense, t_torch)}"
                f" | {' | '.join(cells)} | {spion_density:.3f} | {speedup:.2f}x | {limit:.2f}x | "
                f"{speedup / limit:.2f} |")
    log(rows[-1])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L = 512, 1024; 2 layers; 2 repeats")
    parser.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.125)
    parser.add_argument("--method", default="bigbird", choices=["bigbird", "local", "strided", "random"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention-only", action="store_true", help="skip the encoder rows")
    parser.add_argument("--skip-identity", action="store_true", help="skip the ORT identity-graph encoder column")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown table to FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.repeats = 2, 2
        args.lengths = args.lengths or [512, 1024]
    lengths = args.lengths or [1024, 2048, 4096]
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # constant-folding notes of optimize_for_ort
    threads = torch.get_num_threads()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for L in lengths:
            rows += bench_length(L, args, tmp, threads, log)
    attn = [r for r in rows if r.startswith("| attention")]
    enc = [r for r in rows if r.startswith("| BERT")]
    lines = [f"## ONNX Runtime: dense vs sparsecc graphs ({args.method} layouts, block {args.block}, "
             f"target density {args.density})", "", f"Machine: {machine_line()}, ORT intra-op threads {threads}",
             f"Command: `python tools/bench_onnx.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"Median of {args.repeats} runs after 1 warm-up; (x) = speed-up vs the first column.", ""]
    lines += ["| attention | PyTorch SDPA | PyTorch block-sparse op | ORT fused MultiHeadAttention | "
              "ORT dense translation | ORT block-sparse translation | density | ORT sparse vs ORT fused |",
              "|---|---|---|---|---|---|---|---|"] + attn
    if enc:
        lines += ["", "| encoder | PyTorch dense (SDPA) | ORT dense (optimize_for_ort) | ORT sparsecc identity | "
                      "ORT sparsecc block-sparse | attention density | ORT sparse vs ORT dense | FLOPs limit | "
                      "fraction of the limit |", "|---|---|---|---|---|---|---|---|---|"] + enc
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
