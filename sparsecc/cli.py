"""The `sparsecc` command line.

Arguments and paths are checked before any work: a bad value, a path that cannot be written, or a
recipe that does not load is a usage error (exit code 2) with one line on stderr; a failure during
the work is exit code 1, also one line (`--debug` adds the traceback). Errors name the user's
paths, never a temporary file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from sparsecc.errors import ModelSpecError, RecipeError, SparseccError


class UsageError(SparseccError):
    """A command-line argument that cannot work (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse prints the whole usage)
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


POSITIVE, NONNEGATIVE = _count(1), _count(0)


# ------------------------------------------------------------------ checks before the work
def _probe_write(directory: Path, what: str) -> None:
    """Create and remove a file in the existing `directory`: UsageError naming `what` when that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparsecc-probe-", dir=directory)
    except OSError as err:
        raise UsageError(f"{what}: cannot create a file in {directory} ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _existing_ancestor(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_output_dir(path: str) -> None:
    """`path` is, or can become, a directory this process can write."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {path}: it is a file; expected a directory (it is created if missing)")
    base = p if p.is_dir() else _existing_ancestor(p)
    if not base.is_dir():
        raise UsageError(f"--out {path}: {base} is not a directory")
    _probe_write(base, f"--out {path}")


def check_output_file(path: str, option: str, example: str = "") -> None:
    """`path` names a file (not a directory) this process can create or replace."""
    p = Path(path)
    if p.is_dir() or path.endswith(os.sep):
        raise UsageError(f"{option} {path}: it is a directory; give a file name"
                         + (f" such as {os.path.join(path, example)}" if example else ""))
    base = _existing_ancestor(p)
    if not base.is_dir():
        raise UsageError(f"{option} {path}: {base} is not a directory")
    _probe_write(base, f"{option} {path}")


def _check_saved_target(path: str) -> None:
    """DIR/model for sparsecc.save: new, empty, or an earlier save (which is replaced)."""
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not (p / "manifest.json").is_file():
        raise UsageError(f"{path} holds other files and no sparsecc manifest; sparsecc compile writes the compiled "
                         "model there: choose another --out or empty that directory")


def _recipe(args):
    import sparsecc
    return sparsecc.Recipe.load(args.recipe) if getattr(args, "recipe", None) else sparsecc.Recipe()


def _png_wanted(args) -> bool:
    """Pictures are optional: without matplotlib they are skipped with a note, never a failure."""
    from sparsecc.layouts.plot import PLOT_HINT, plotting_available
    if getattr(args, "no_png", False):
        return False
    if not plotting_available():
        _say(f"note: matplotlib is not installed, so no picture is drawn ({PLOT_HINT}; --no-png hides this note)")
        return False
    return True


def _say(message: str) -> None:
    print(f"sparsecc: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ MODEL
def _load(args, command: str, recapture: bool = False):
    """The MODEL argument loaded; `recapture`: the command needs the nn.Module (compile, bench)."""
    from sparsecc.models import load_model
    loaded = load_model(args.model, batch=args.batch, seq_len=args.seq_len)
    if recapture and loaded.model is None:
        kind = "a directory written by sparsecc.save" if loaded.saved_dir else "a .pt2 file"
        raise UsageError(f"sparsecc {command} needs a model it can re-capture: a Hugging Face directory, "
                         f"module:function or 'minilm'; {args.model} is {kind}, which holds no nn.Module"
                         + (" (`sparsecc export` and `sparsecc inspect` take it)" if loaded.saved_dir else ""))
    return loaded


def _target(loaded):
    """What sparsecc.inspect / compile take: the nn.Module, or the captured graph of a .pt2."""
    from sparsecc.capture import load_exported
    if loaded.exported_path:
        _say(f"loading {loaded.exported_path} ...")
        return load_exported(loaded.exported_path)
    _say(f"capturing {loaded.name} with torch.export ...")
    return loaded.model


def _calibration(loaded, args):
    """Real text (standard-library docstrings) through the model's tokenizer when it has one, else None
    (the methods that calibrate then use the example inputs, with a warning). Under torchrun each rank
    calibrates on its contiguous share of the batches."""
    from sparsecc import distributed
    from sparsecc.models import text_batches
    batches = text_batches(loaded, args.calibration_batches, args.seq_len)
    return batches if batches is None else distributed.shard(batches)


# commands whose calibration torchrun splits across processes (the others have no calibration to split)
DISTRIBUTED_COMMANDS = ("compile", "export")


def _join_process_group(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group (gloo: the CLI calibrates on
    CPU tensors). True when this process is one of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if args.command not in DISTRIBUTED_COMMANDS:
        raise UsageError(f"sparsecc {args.command} runs in one process; under torchrun only "
                         f"{' and '.join(DISTRIBUTED_COMMANDS)} split their calibration across processes. "
                         "Run it without torchrun")
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def _writes_output() -> bool:
    """One process writes the results: the only one, or rank 0 of a torchrun group."""
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


# ------------------------------------------------------------------ commands
def _inspect(args) -> int:
    import sparsecc

    if args.model.endswith(".onnx"):  # an exported file: list its sparse regions and the dense rest
        if args.explain:
            raise UsageError("--explain asks the graph matchers why candidates were left alone; it needs a model "
                             "(HF directory, .pt2, module:function or 'minilm'), not an .onnx file")
        from sparsecc.backends.onnx_inspect import inspect_onnx
        if not os.path.isfile(args.model):
            raise ModelSpecError(f"{args.model}: no such file")
        found = inspect_onnx(args.model)
        print(json.dumps(found.to_dict(), indent=2, default=str) if args.json else found.table())
        return 0
    if args.dot:
        check_output_file(args.dot, "--dot", "graph.dot")
    loaded = _load(args, "inspect")
    if loaded.saved_dir:  # a compiled model saved by sparsecc.save: its saved report
        from sparsecc.report import saved_report
        from sparsecc.saving import read_manifest
        if args.dot:
            raise UsageError("--dot draws a captured graph; a directory written by sparsecc.save holds the compiled "
                             "graph only: inspect the original model for a picture")
        manifest = read_manifest(loaded.saved_dir)
        report = saved_report(manifest["report"])
        print(f"{loaded.saved_dir}: compiled by sparsecc {manifest.get('sparsecc')} on torch {manifest.get('torch')} "
              f"({manifest.get('created')}), backend {manifest.get('backend')}, recipe "
              f"{json.dumps(manifest.get('recipe'))}", file=sys.stderr if args.json else sys.stdout)
        _print_report(args, report)
        return 0
    target = _target(loaded)
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
    _print_report(args, report)
    if args.dot and not args.json and not args.explain:
        print(f"graph written to {args.dot} (render: dot -Tsvg {args.dot} -o graph.svg)")
    return 0


def _print_report(args, report) -> None:
    if args.explain and args.json:
        print(json.dumps({"model": report.model, "attention": len(report.attention), "ffn": len(report.ffn),
                          "unmatched": report.to_dict()["unmatched"]}, indent=2, default=str))
    elif args.explain:
        print(report.explain())
    elif args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.table())


def _export(args) -> int:
    import sparsecc
    from sparsecc.backends.onnx_inspect import inspect_onnx

    check_output_file(args.output, "-o", "model.onnx")
    recipe = _recipe(args)
    loaded = _load(args, "export")
    if loaded.saved_dir:
        if args.recipe:
            raise UsageError(f"{args.model} is a compiled model (sparsecc.save): it is exported with the recipe it was "
                             "compiled with; leave out --recipe")
        sm = sparsecc.load(loaded.saved_dir)
    else:
        target = _target(loaded)
        sm = sparsecc.compile(target, loaded.inputs, recipe=recipe, dynamic=not args.static,
                              calibration=_calibration(loaded, args))
    if not _writes_output():
        return 0
    sm.export_onnx(args.output, dynamic=not args.static, opset=args.opset)
    print(inspect_onnx(args.output).table())
    print(f"written {args.output}")
    return 0


def _compile(args) -> int:
    import sparsecc
    from sparsecc.io import write_text

    check_output_dir(args.out)
    model_dir = os.path.join(args.out, "model")
    _check_saved_target(model_dir)
    recipe = _recipe(args)
    loaded = _load(args, "compile", recapture=True)
    calibration = _calibration(loaded, args)
    sm = sparsecc.compile(_target(loaded), loaded.inputs, recipe=recipe, calibration=calibration)
    if not _writes_output():
        return 0
    report = sm.report()
    report.model = loaded.name
    os.makedirs(args.out, exist_ok=True)
    sparsecc.save(sm, model_dir)  # the whole compiled model: graph, weights, plans (layouts, controllers)
    write_text(os.path.join(args.out, "report.txt"), report.table() + "\n")
    write_text(os.path.join(args.out, "report.json"), json.dumps(report.to_dict(), indent=2, default=str))
    write_text(os.path.join(args.out, "recipe.json"), json.dumps(recipe.to_dict(), indent=2))
    print(report.table())
    if sm.layouts:
        png = _png_wanted(args)
        sm.save_layouts(os.path.join(args.out, "layouts"), png=png)
        print(f"layouts{' and their picture' if png else ''} written to {os.path.join(args.out, 'layouts')}")
    print(f"compiled model written to {model_dir} (sparsecc.load({model_dir!r})), report to {args.out}")
    return 0


def _bench(args) -> int:
    from sparsecc.bench import compare

    recipe = _recipe(args)
    loaded = _load(args, "bench", recapture=True)
    calibration = _calibration(loaded, args)
    _say(f"capturing {loaded.name} with torch.export (twice: dense and with the recipe) ...")
    result = compare(loaded.model, loaded.inputs, recipe, calibration=calibration, backend=args.backend,
                     repeats=args.repeats, warmup=args.warmup, name=loaded.name)
    print(json.dumps(result.to_dict(), indent=2, default=str) if args.json else result.table())
    return 0


def _tune(args) -> int:
    import sparsecc
    from sparsecc.errors import InputError
    from sparsecc.models import text_batches
    from sparsecc.tune import Budget

    check_output_dir(args.out)
    _check_saved_target(os.path.join(args.out, "model"))
    try:
        budget = Budget.parse(args.budget)
    except InputError as err:
        raise UsageError(f"--budget {args.budget!r}: {err}") from None
    latency = _latency_file(args.latency) if args.latency else None
    from sparsecc.data import stdlib_paragraphs
    needed, available = 4 * (args.calibration_batches + args.eval_batches) * args.batch, len(stdlib_paragraphs())
    if needed > available:  # text_batches draws 4 paragraphs per row it keeps, calibration and held-out apart
        raise UsageError(f"--calibration-batches {args.calibration_batches} and --eval-batches {args.eval_batches} "
                         f"of {args.batch} rows draw on {needed} docstring paragraphs; {available} are available: "
                         "give fewer batches or a smaller --batch")
    loaded = _load(args, "tune", recapture=True)
    calibration = text_batches(loaded, args.calibration_batches, args.seq_len, batch_size=args.batch)
    if calibration is None:
        raise UsageError(f"sparsecc tune measures quality on held-out text, tokenized by the model's own tokenizer; "
                         f"{args.model} has none (no tokenizer.json or vocab.txt). Use the Python API, "
                         "sparsecc.tune(model, example_inputs, calibration=..., eval_batches=...), with your batches")
    # held-out text: the paragraphs after those calibration drew from (text_batches reads 4 per row it keeps)
    held = text_batches(loaded, args.eval_batches, args.seq_len, batch_size=args.batch,
                        offset=4 * args.calibration_batches * args.batch)
    finetune = None
    if args.finetune_steps:
        finetune = {"steps": args.finetune_steps, "lr": args.finetune_lr}
    result = sparsecc.tune(loaded.model, calibration[0], calibration, budget=budget, backend=args.backend,
                           methods=args.methods, eval_batches=held, finetune=finetune, seed=args.seed,
                           flow_fit={"steps": args.flow_steps},
                           generations=args.generations, repeats=args.repeats, warmup=args.warmup,
                           latency=latency, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    written = result.save(args.out, png=_png_wanted(args))
    model_dir = os.path.join(args.out, "model")
    sparsecc.save(result.model, model_dir)
    print(result.summary())
    print(f"written {', '.join(os.path.basename(p) for p in written)} and the tuned model "
          f"(sparsecc.load({model_dir!r}{', backend=' + repr(args.backend) if args.backend != 'eager' else ''})) "
          f"to {args.out}")
    return 0


def _latency_file(path: str) -> dict:
    """{"dense": seconds, "<slot>:<level>": seconds, ...} from a JSON file (e.g. timed on the target device)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"--latency {path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise UsageError(f"--latency {path}: expected a JSON object of seconds, {{\"dense\": 0.012, "
                         "\"ffn:sparse_ffn(n=8)\": 0.009, ...}} (the level keys of front.json's latency_table)")
    return data


def _layout(args) -> int:
    from sparsecc.layouts import LayoutSet, save_layout_png
    from sparsecc.layouts.plot import PLOT_HINT, plotting_available

    if args.png:
        if not plotting_available():
            raise UsageError(f"--png draws with matplotlib, which is not installed ({PLOT_HINT})")
        check_output_file(os.path.join(args.dir, "layouts.png"), "--png")
    layouts = LayoutSet.load_dir(args.dir)
    print(layouts.summary())
    if args.png:
        path = os.path.join(args.dir, "layouts.png")
        save_layout_png(layouts, path)
        print(f"picture written to {path}")
    return 0


def _methods(args) -> int:
    from sparsecc.methods.registry import describe_methods
    from sparsecc.report import format_table

    methods = describe_methods()
    if args.json:
        print(json.dumps(methods, indent=2, default=str))
        return 0
    for m in methods:
        print(f"{m['kind']} ({m['config']}, slot {', '.join(m['slots'])}): {m['summary']}")
        rows = [[f["name"], f["type"], f["default"]] for f in m["fields"]]
        print(format_table(["field", "type", "default"], rows) if rows else "(no fields)")
        print()
    print(f"{len(methods)} methods. In a recipe file, a slot's table names one: [<slot>] kind = \"<kind>\" and any of "
          "its fields (unknown fields are errors)")
    return 0


def _demo(args) -> int:
    from sparsecc.demo import run_demo
    check_output_dir(args.out)
    run_demo(batch=args.batch, max_len=args.seq_len, out_dir=args.out, png=_png_wanted(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsecc", description="Sparse Transformer graph compiler.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    parser.add_argument("--debug", action="store_true", help="on an error, also print its traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    def shapes(p):
        p.add_argument("--seq-len", type=POSITIVE, default=128, help="sequence length of the example inputs (HF dirs)")
        p.add_argument("--batch", type=POSITIVE, default=1, help="batch size of the example inputs (HF dirs)")

    def calibration(p):
        p.add_argument("--calibration-batches", type=POSITIVE, default=8,
                       help="batches of standard-library docstring text for calibration (models with a tokenizer)")

    model_help = ("Hugging Face model directory, saved ExportedProgram (.pt2), directory written by sparsecc.save, "
                  "module:function returning (model, example_inputs), or 'minilm'")
    p = sub.add_parser("inspect", help="list attention and FFN regions, FLOPs and a graph summary")
    p.add_argument("model", help=model_help + "; also an exported .onnx file")
    shapes(p)
    p.add_argument("--json", action="store_true", help="print a JSON object with a 'regions' list")
    p.add_argument("--explain", action="store_true",
                   help="for each attention / FFN candidate left alone: layer, module path, node, the rule that got "
                        "furthest and why it failed (with --json: an 'unmatched' list)")
    p.add_argument("--dot", metavar="FILE", help="write the graph with its regions as Graphviz dot")
    p.add_argument("--static", action="store_true", help="capture with static shapes")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("export", help="compile MODEL with a recipe and write a sparse ONNX file")
    p.add_argument("model", help=model_help)
    p.add_argument("--recipe", metavar="FILE", help="recipe file (.toml/.json/.yaml); default: identity")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
    shapes(p)
    calibration(p)
    p.add_argument("--opset", type=POSITIVE, default=None, help="ONNX opset (default 20)")
    p.add_argument("--static", action="store_true", help="export with static shapes")
    p.set_defaults(func=_export)

    p = sub.add_parser("compile", help="compile MODEL with a recipe; write the compiled model, report and layouts")
    p.add_argument("model", help="Hugging Face model directory, module:function, or 'minilm'")
    p.add_argument("--recipe", help="recipe file (.toml, .json, .yaml); default: the identity recipe")
    p.add_argument("--out", required=True,
                   help="output directory: model/ (sparsecc.load), report.txt, report.json, recipe.json, layouts/")
    shapes(p)
    calibration(p)
    p.add_argument("--no-png", action="store_true", help="do not draw layouts.png")
    p.set_defaults(func=_compile)

    p = sub.add_parser("bench", help="time MODEL dense and with a recipe, side by side (latency, FLOPs, error)")
    p.add_argument("model", help="Hugging Face model directory, module:function, or 'minilm'")
    p.add_argument("--recipe", help="recipe file (.toml, .json, .yaml); default: the identity recipe")
    p.add_argument("--backend", default="eager", choices=["eager", "inductor", "onnxruntime", "triton"])
    shapes(p)
    p.add_argument("--repeats", type=POSITIVE, default=10, help="timed runs per model (median reported)")
    p.add_argument("--warmup", type=NONNEGATIVE, default=2, help="untimed runs per model first")
    calibration(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_bench)

    p = sub.add_parser("tune", help="the fastest per-layer recipe within a quality budget, measured on held-out "
                                    "text; writes the recipe, the Pareto front and the tuned model")
    p.add_argument("model", help="Hugging Face model directory (with its tokenizer) or 'minilm'")
    p.add_argument("--budget", default="cosine>=0.98",
                   help="quality against the dense model on held-out text: cosine>=X (pooled outputs), topK>=X "
                        "(nearest-neighbour overlap, e.g. top10>=0.9), kl<=X or mse<=X (default cosine>=0.98)")
    p.add_argument("--backend", default="eager", choices=["eager", "inductor", "onnxruntime", "triton"],
                   help="the backend the latency is measured on (and the tuned model compiled for)")
    p.add_argument("--out", required=True,
                   help="output directory: recipe.toml, front.json, summary.txt, front.png, model/ (sparsecc.load)")
    p.add_argument("--methods", nargs="+", choices=["attention", "ffn", "flow"], default=None,
                   help="the slots to vary, with their default levels (default: attention and ffn; flow, token "
                        "flow's kept fraction per layer, is searched alone)")
    p.add_argument("--flow-steps", type=POSITIVE, default=100,
                   help="with --methods flow: steps of the one training of the gates the flow levels share")
    p.add_argument("--seq-len", type=POSITIVE, default=128, help="token length the model is tuned at")
    p.add_argument("--batch", type=POSITIVE, default=8, help="rows per batch (also of the timed inputs)")
    p.add_argument("--calibration-batches", type=POSITIVE, default=4,
                   help="batches of standard-library docstring text the levels are calibrated on")
    p.add_argument("--eval-batches", type=_count(2), default=8,
                   help="held-out batches (other docstrings) the quality is measured on")
    p.add_argument("--finetune-steps", type=NONNEGATIVE, default=0,
                   help="fine-tune the final candidates this many steps before measuring them (0: no fine-tuning)")
    p.add_argument("--finetune-lr", type=float, default=5e-5, help="learning rate of that fine-tuning")
    p.add_argument("--generations", type=NONNEGATIVE, default=30, help="generations of the level-switch evolution")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the search (same seed, same result)")
    p.add_argument("--repeats", type=POSITIVE, default=10, help="timed runs per level (median)")
    p.add_argument("--warmup", type=NONNEGATIVE, default=2, help="untimed runs per level first")
    p.add_argument("--latency", metavar="FILE.json",
                   help="seconds measured elsewhere (e.g. on the target device), used instead of timing those "
                        "levels here: {\"dense\": s, \"<slot>:<level>\": s} with front.json's latency_table keys")
    p.add_argument("--cache-dir", help="latency tables and calibrated plans (default $SPARSECC_CACHE or "
                                       "~/.cache/sparsecc)")
    p.add_argument("--no-png", action="store_true", help="do not draw front.png")
    p.set_defaults(func=_tune)

    p = sub.add_parser("layout", help="summarise block layouts saved by `sparsecc compile` (and draw them)")
    p.add_argument("dir", help="a layouts directory (index.json + one file per layer)")
    p.add_argument("--png", action="store_true", help="write layouts.png next to them (needs matplotlib)")
    p.set_defaults(func=_layout)

    p = sub.add_parser("methods", help="list the registered methods: kind, slot, fields with types and defaults")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=_methods)

    p = sub.add_parser("demo", help="the main job on the embedded all-MiniLM-L6-v2")
    p.add_argument("--batch", type=POSITIVE, default=16, help="sentences per batch")
    p.add_argument("--seq-len", type=POSITIVE, default=128, help="token length (also of the SPION layouts)")
    p.add_argument("--out", default="out/demo", help="where the demo writes its pictures")
    p.add_argument("--no-png", action="store_true", help="do not draw the layout picture")
    p.set_defaults(func=_demo)
    return parser


def _one_line(err: BaseException, args) -> str:
    """The error as one line, with temporary file names replaced by the user's path."""
    text = " ".join(str(err).split()) or type(err).__name__
    for option in ("output", "out", "dot"):
        path = getattr(args, option, None)
        if path:
            name = re.escape(os.path.basename(os.path.normpath(path)))
            text = re.sub(rf"[^\s'\"]*/\.(?:tmp-[\w]+|{name}\.\w+\.tmp)[\w.]*", path, text)
    return text


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        import warnings
        for name in ("transformers", "torch"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", category=UserWarning, module=r"sparsecc\.")  # ours: one line each
        warnings.formatwarning = lambda message, *_, **__: f"sparsecc: warning: {message}\n"
    start = time.perf_counter()
    several = False
    try:
        several = _join_process_group(args)
        return args.func(args)
    except BaseException as err:  # noqa: BLE001 - every error ends as one line (with --debug: its traceback too)
        if isinstance(err, SystemExit):
            raise
        if args.debug:
            import traceback
            traceback.print_exception(err)
        code, line = _error_line(err, args, time.perf_counter() - start)
        if several:
            import torch.distributed as dist
            line = f"[rank {dist.get_rank()}] {line}"
        print(line, file=sys.stderr)
        return code
    finally:
        if several:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _error_line(err: BaseException, args, seconds: float) -> tuple[int, str]:
    """(exit code, the line): 2 for usage errors, 1 for failures, 130 for Ctrl-C."""
    where = f"sparsecc {args.command}"
    if isinstance(err, (UsageError, RecipeError, ModelSpecError)):
        return 2, f"{where}: error: {_one_line(err, args)}"
    if isinstance(err, SparseccError):
        return 1, f"{where}: error: {_one_line(err, args)}"
    if isinstance(err, KeyboardInterrupt):
        return 130, f"{where}: interrupted after {seconds:.0f}s"
    return 1, (f"{where}: error: {type(err).__name__}: {_one_line(err, args)} (unexpected; run again with --debug "
               "for the traceback and report it)")


if __name__ == "__main__":
    sys.exit(main())
