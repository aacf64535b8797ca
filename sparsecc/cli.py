"""The `sparsecc` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sparsecc.errors import SparseccError


def _inspect(args) -> int:
    import sparsecc
    from sparsecc.capture import load_exported
    from sparsecc.models import load_model

    if args.model.endswith(".onnx"):  # an exported file: list its sparse regions and the dense rest
        if args.explain:
            raise SparseccError("--explain asks the graph matchers why candidates were left alone; it needs a model "
                                "(HF directory, .pt2, module:function or 'minilm'), not an .onnx file")
        from sparsecc.backends.onnx_inspect import inspect_onnx
        found = inspect_onnx(args.model)
        print(json.dumps(found.to_dict(), indent=2, default=str) if args.json else found.table())
        return 0
    loaded = load_model(args.model, batch=args.batch, seq_len=args.seq_len)
    target = load_exported(loaded.exported_path) if loaded.exported_path else loaded.model
    report = sparsecc.inspect(target, loaded.inputs, dynamic=not args.static)
    report.model = loaded.name
    if args.dot:
        from sparsecc.capture import capture
        from sparsecc.graph.dot import graph_to_dot, write_dot
        # the report's regions point into the graph inspect canonicalized; render that graph
        anchor = report.attention[0].sdpa if report.attention else report.ffn[0].down if report.ffn else None
        gm = anchor.graph.owning_module if anchor is not None else None
        if gm is None:
            gm = (target if loaded.exported_path else capture(target, loaded.inputs)).gm
        write_dot(args.dot, graph_to_dot(gm, report.regions, title=loaded.name))
    if args.explain and args.json:
        print(json.dumps({"model": report.model, "attention": len(report.attention), "ffn": len(report.ffn),
                          "unmatched": report.to_dict()["unmatched"]}, indent=2, default=str))
    elif args.explain:
        print(report.explain())
    elif args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.table())
        if args.dot:
            print(f"graph written to {args.dot} (render: dot -Tsvg {args.dot} -o graph.svg)")
    return 0


def _export(args) -> int:
    import sparsecc
    from sparsecc.backends.onnx_inspect import inspect_onnx
    from sparsecc.capture import load_exported
    from sparsecc.models import load_model

    loaded = load_model(args.model, batch=args.batch, seq_len=args.seq_len)
    target = load_exported(loaded.exported_path) if loaded.exported_path else loaded.model
    recipe = sparsecc.Recipe.load(args.recipe) if args.recipe else sparsecc.Recipe()
    sm = sparsecc.compile(target, loaded.inputs, recipe=recipe, dynamic=not args.static)
    sm.export_onnx(args.output, dynamic=not args.static, opset=args.opset)
    print(inspect_onnx(args.output).table())
    print(f"written {args.output}")
    return 0


def _calibration_batches(loaded, batches: int, seq_len: int):
    """Real text (standard-library docstrings) through the model's tokenizer when it has one, else None."""
    from sparsecc.models import text_batches
    return text_batches(loaded, batches, seq_len)


def _recapturable(args, command: str):
    """The MODEL argument loaded as an nn.Module (compile and bench capture it again)."""
    from sparsecc.models import load_model
    loaded = load_model(args.model, batch=args.batch, seq_len=args.seq_len)
    if loaded.model is None:
        raise SparseccError(f"sparsecc {command} needs a model it can re-capture: a Hugging Face directory, "
                            "module:function or 'minilm' (a .pt2 file holds no nn.Module)")
    return loaded


def _compile(args) -> int:
    import sparsecc

    loaded = _recapturable(args, "compile")
    recipe = sparsecc.Recipe.load(args.recipe) if args.recipe else sparsecc.Recipe()
    calibration = _calibration_batches(loaded, args.calibration_batches, args.seq_len)
    sm = sparsecc.compile(loaded.model, loaded.inputs, recipe=recipe, calibration=calibration)
    report = sm.report()
    report.model = loaded.name
    from sparsecc.io import write_text
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, "report.txt"), report.table() + "\n")
    write_text(os.path.join(args.out, "report.json"), json.dumps(report.to_dict(), indent=2, default=str))
    write_text(os.path.join(args.out, "recipe.json"), json.dumps(recipe.to_dict(), indent=2))
    print(report.table())
    if sm.layouts:
        sm.save_layouts(os.path.join(args.out, "layouts"), png=True)
        print(f"layouts and their picture written to {os.path.join(args.out, 'layouts')}")
    print(f"report written to {args.out}")
    return 0


def _bench(args) -> int:
    import sparsecc
    from sparsecc.bench import compare

    loaded = _recapturable(args, "bench")
    recipe = sparsecc.Recipe.load(args.recipe) if args.recipe else sparsecc.Recipe()
    calibration = _calibration_batches(loaded, args.calibration_batches, args.seq_len)
    result = compare(loaded.model, loaded.inputs, recipe, calibration=calibration, backend=args.backend,
                     repeats=args.repeats, warmup=args.warmup, name=loaded.name)
    print(json.dumps(result.to_dict(), indent=2, default=str) if args.json else result.table())
    return 0


def _layout(args) -> int:
    from sparsecc.layouts import LayoutSet, save_layout_png

    layouts = LayoutSet.load_dir(args.dir)
    print(layouts.summary())
    if args.png:
        path = os.path.join(args.dir, "layouts.png")
        save_layout_png(layouts, path)
        print(f"picture written to {path}")
    return 0


def _demo(args) -> int:
    from sparsecc.demo import run_demo
    run_demo(batch=args.batch, max_len=args.seq_len, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsecc", description="Sparse Transformer graph compiler.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list attention and FFN regions, FLOPs and a graph summary")
    p.add_argument("model", help="Hugging Face model directory, saved ExportedProgram (.pt2), exported .onnx, "
                                 "module:function returning (model, example_inputs), or 'minilm'")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of the example inputs (HF dirs)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example inputs (HF dirs)")
    p.add_argument("--json", action="store_true", help="print a JSON object with a 'regions' list")
    p.add_argument("--explain", action="store_true",
                   help="for each attention / FFN candidate left alone: layer, module path, node, the rule that got "
                        "furthest and why it failed (with --json: an 'unmatched' list)")
    p.add_argument("--dot", metavar="FILE", help="write the graph with its regions as Graphviz dot")
    p.add_argument("--static", action="store_true", help="capture with static shapes")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("export", help="compile MODEL with a recipe and write a sparse ONNX file")
    p.add_argument("model", help="as for inspect: HF directory, .pt2, module:function, or 'minilm'")
    p.add_argument("--recipe", metavar="FILE", help="recipe file (.toml/.json/.yaml); default: identity")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of the example inputs (HF dirs)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example inputs (HF dirs)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    p.add_argument("--static", action="store_true", help="export with static shapes")
    p.set_defaults(func=_export)

    p = sub.add_parser("compile", help="compile MODEL with a recipe; write the report and block layouts to --out")
    p.add_argument("model", help="Hugging Face model directory, module:function, or 'minilm'")
    p.add_argument("--recipe", help="recipe file (.toml, .json, .yaml); default: the identity recipe")
    p.add_argument("--out", required=True, help="output directory (report.txt, report.json, layouts/)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calibration-batches", type=int, default=8,
                   help="batches of standard-library docstring text for calibration (models with a tokenizer)")
    p.set_defaults(func=_compile)

    p = sub.add_parser("bench", help="time MODEL dense and with a recipe, side by side (latency, FLOPs, error)")
    p.add_argument("model", help="Hugging Face model directory, module:function, or 'minilm'")
    p.add_argument("--recipe", help="recipe file (.toml, .json, .yaml); default: the identity recipe")
    p.add_argument("--backend", default="eager", choices=["eager", "inductor", "onnxruntime"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per model first")
    p.add_argument("--calibration-batches", type=int, default=8,
                   help="batches of standard-library docstring text for calibration (models with a tokenizer)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_bench)

    p = sub.add_parser("layout", help="summarise block layouts saved by `sparsecc compile` (and draw them)")
    p.add_argument("dir", help="a layouts directory (index.json + one file per layer)")
    p.add_argument("--png", action="store_true", help="write layouts.png next to them")
    p.set_defaults(func=_layout)

    p = sub.add_parser("demo", help="the main job on the embedded all-MiniLM-L6-v2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="out/demo", help="where the demo writes its pictures")
    p.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        import warnings
        warnings.filterwarnings("ignore")
    try:
        return args.func(args)
    except SparseccError as err:
        print(f"sparsecc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
