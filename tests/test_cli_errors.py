"""The `sparsecc` command line through its real entry point, in a subprocess: bad arguments and paths are
caught before any work (exit code 2), failures during the work exit 1; either way one line on stderr,
no traceback (unless --debug), and the user's path in the message, never a temporary file's.
Also what the command line writes and reads: compile --out saves the whole model, inspect reads it,
export calibrates on real text, `sparsecc methods`, pictures optional, demo's SPION half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import sparsecc
from sparsecc import testing as T

ROOT = Path(__file__).resolve().parent.parent
SPARSE = ('[attention]\nkind = "fixed"\npattern = "local"\nblock = 4\ndensity = 0.4375\nmax_len = 16\n'
          '[ffn]\nkind = "sparse_ffn"\nn = 4\nd_lowrank = 2\nsteps = 5\n')


def run(*argv, cwd, no_matplotlib: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """`sparsecc ARGV` in a fresh interpreter running this tree (no_matplotlib: as if it were not installed)."""
    path = [str(ROOT)]
    if no_matplotlib:
        fake = Path(cwd) / "no_matplotlib" / "matplotlib"
        fake.mkdir(parents=True, exist_ok=True)
        (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n")
        path.insert(0, str(fake.parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sparsecc.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one error line: last on stderr, no traceback above it."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines, out
    return lines[-1]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.toml").write_text('[attention\nkind = "spion"\n')
    (tmp_path / "bad.json").write_text('{"attention": {"kind": "spion", "block": }')
    (tmp_path / "unknown.toml").write_text('[attention]\nkind = "spion"\nblok = 4\n')
    (tmp_path / "sparse.toml").write_text(SPARSE)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "corrupt.pt2").write_bytes(b"PK\x03\x04 not really a zip archive" * 50)
    model, (x,) = T.hand_written()
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    out = tmp_path / "used"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    return tmp_path


# ------------------------------------------------------------------ usage errors: before the work, exit 2
USAGE = [
    (["inspect", "sparsecc.testing:bert", "--seq-len", "-5"],
     "sparsecc inspect: error: argument --seq-len: expected an integer >= 1, got -5 (see `sparsecc inspect --help`)"),
    (["compile", "sparsecc.testing:bert", "--out", "o", "--batch", "0"],
     "argument --batch: expected an integer >= 1, got 0"),
    (["export", "sparsecc.testing:bert", "-o", "m.onnx", "--calibration-batches", "x"],
     "argument --calibration-batches: expected an integer >= 1, got 'x'"),
    (["compile", "sparsecc.testing:bert", "--recipe", "bad.toml", "--out", "o"],
     "recipe file 'bad.toml' is not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 11)"),
    (["export", "sparsecc.testing:bert", "--recipe", "bad.json", "-o", "m.onnx"],
     "recipe file 'bad.json' is not valid JSON: Expecting value: line 1 column 42"),
    (["bench", "sparsecc.testing:bert", "--recipe", "unknown.toml"],
     "recipe.attention.blok: unknown field for 'spion'"),
    (["compile", "sparsecc.testing:bert", "--recipe", "missing.toml", "--out", "o"],
     "cannot read recipe file 'missing.toml'"),
    (["compile", "sparsecc.testing:bert", "--out", "/proc/x"],
     "--out /proc/x: cannot create a file in /proc (No such file or directory)"),
    (["compile", "sparsecc.testing:bert", "--out", "afile"], "--out afile: it is a file; expected a directory"),
    (["compile", "sparsecc.testing:bert", "--out", "used"],
     "used/model holds other files and no sparsecc manifest"),
    (["export", "sparsecc.testing:bert", "-o", "adir"],
     "-o adir: it is a directory; give a file name such as adir/model.onnx"),
    (["export", "sparsecc.testing:bert", "-o", "afile/m.onnx"], "-o afile/m.onnx: "),
    (["inspect", "sparsecc.testing:bert", "--dot", "adir"], "--dot adir: it is a directory"),
    (["compile", "m.pt2", "--out", "o"], "sparsecc compile needs a model it can re-capture"),
    (["inspect", "m.onnx"], "sparsecc inspect: error: m.onnx: no such file"),
    (["inspect", "m.onnx", "--explain"], "--explain asks the graph matchers why candidates were left alone"),
    (["inspect", "nope.nowhere:f"], "cannot import 'f' from 'nope.nowhere'"),
]


@pytest.mark.parametrize("argv,message", USAGE, ids=[" ".join(a[:1] + a[2:]) for a, _ in USAGE])
def test_usage_errors_exit_2_with_one_line_before_any_work(files, argv, message):
    out = run(*argv, cwd=files)
    assert out.returncode == 2, out.stderr[-3000:]
    line = error_line(out)
    assert message in line
    assert len([x for x in out.stderr.splitlines() if x.strip()]) == 1, out.stderr  # nothing captured, nothing else
    assert ".tmp" not in line
    assert not (files / "o").exists() and not list(files.glob("*.onnx"))


def test_a_read_only_output_is_refused_before_the_work(files):
    """/sys refuses new files even to root (a chmod'ed directory does not stop root)."""
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:  # pragma: no cover - an unusual machine
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys is writable here")
    out = run("export", "sparsecc.testing:bert", "-o", "/sys/m.onnx", cwd=files)
    assert out.returncode == 2
    assert error_line(out) == ("sparsecc export: error: -o /sys/m.onnx: cannot create a file in /sys "
                               "(Permission denied)")


# ------------------------------------------------------------------ failures during the work: exit 1
def test_corrupt_pt2_is_one_line_and_debug_shows_the_traceback(files):
    out = run("inspect", "corrupt.pt2", cwd=files)
    assert out.returncode == 1
    assert error_line(out).startswith("sparsecc inspect: error: corrupt.pt2: torch.export.load could not read it "
                                      "(BadZipFile: ")
    out = run("--debug", "inspect", "corrupt.pt2", cwd=files)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert out.stderr.splitlines()[-1].startswith("sparsecc inspect: error: corrupt.pt2:")


def test_an_unexpected_exception_is_one_line_pointing_to_debug(files):
    (files / "boom.py").write_text("def model():\n    raise RuntimeError('the factory broke')\n")
    out = run("inspect", "boom:model", cwd=files)
    assert out.returncode == 1
    assert error_line(out) == ("sparsecc inspect: error: RuntimeError: the factory broke (unexpected; run again "
                               "with --debug for the traceback and report it)")


# ------------------------------------------------------------------ what the command line writes and reads
def test_compile_saves_the_whole_model_and_inspect_reads_it(files):
    out = run("compile", "sparsecc.testing:bert", "--recipe", "sparse.toml", "--out", "o", cwd=files,
              no_matplotlib=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sparsecc: capturing bert with torch.export ..." in out.stderr
    assert "matplotlib is not installed, so no picture is drawn" in out.stderr
    o = files / "o"
    assert sorted(p.name for p in o.iterdir()) == ["layouts", "model", "recipe.json", "report.json", "report.txt"]
    assert not (o / "layouts" / "layouts.png").exists() and (o / "layouts" / "index.json").is_file()
    model, inputs = T.bert()
    loaded = sparsecc.load(o / "model")
    ops = [str(n.target) for n in loaded.graph_module.graph.nodes]
    assert ops.count("sparsecc.sparse_ffn.default") == 2 and ops.count("sparsecc.block_sparse_attention.default") == 2
    controllers = {name for plan in loaded.plans.values() for name in plan.tensors}
    assert {"c1", "c2", "c_bias", "mask"} <= controllers  # sparse FFN controllers and layouts saved
    assert loaded(**inputs).last_hidden_state.shape == (2, 16, 32)

    out = run("inspect", "o/model", cwd=files)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("o/model: compiled by sparsecc")
    assert (o / "report.txt").read_text().strip() in out.stdout  # the saved report, as compile printed it
    data = json.loads(run("inspect", "o/model", "--json", cwd=files).stdout)
    assert [r["sparse"]["method"] for r in data["regions"]] == ["local", "sparse_ffn"] * 2

    out = run("compile", "sparsecc.testing:bert", "--recipe", "sparse.toml", "--out", "o", "--no-png", cwd=files,
              no_matplotlib=True)  # a second compile replaces the saved model; --no-png: no note
    assert out.returncode == 0 and "matplotlib" not in out.stderr

    # `sparsecc layout` reads the layouts compile wrote: local, window 2 on 4x4 blocks = the diagonal and the
    # block below it, 7 of 16 tiles in each layer
    from sparsecc.layouts import LayoutSet
    band = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    saved = LayoutSet.load_dir(o / "layouts")
    assert sorted(saved) == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    assert all(torch.equal(saved[name].mask, band) for name in saved)
    out = run("layout", "o/layouts", cwd=files)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("encoder.")]
    assert rows == [[f"encoder.layer.{i}.attention.self", "4x4", "4", "no", "7", "0.4375"] for i in range(2)]
    out = run("layout", "o/layouts", "--png", cwd=files, no_matplotlib=True)
    assert out.returncode == 2 and "--png draws with matplotlib, which is not installed" in error_line(out)
    pytest.importorskip("matplotlib")
    out = run("layout", "o/layouts", "--png", cwd=files)
    assert out.returncode == 0, out.stderr[-3000:]
    png = o / "layouts" / "layouts.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "picture written to o/layouts/layouts.png" in out.stdout


def test_export_takes_a_saved_model(files):
    out = run("compile", "sparsecc.testing:hand_written", "--out", "o", "--no-png", cwd=files)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run("export", "o/model", "-o", "m.onnx", cwd=files)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (files / "m.onnx").stat().st_size > 0 and "written m.onnx" in out.stdout
    out = run("export", "o/model", "--recipe", "sparse.toml", "-o", "m2.onnx", cwd=files)
    assert out.returncode == 2 and "leave out --recipe" in error_line(out)


def test_methods_lists_the_registry(files):
    from sparsecc.methods.registry import describe_methods
    out = run("methods", cwd=files)
    assert out.returncode == 0, out.stderr
    listed = json.loads(run("methods", "--json", cwd=files).stdout)
    here = {m["kind"]: m for m in json.loads(json.dumps(describe_methods(), default=str))}  # may hold test methods
    assert all(m == here[m["kind"]] for m in listed)
    import dataclasses
    from sparsecc.methods import registry
    configs = {cls for slot in registry.SLOTS for cls in registry.config_classes(slot)
               if cls.__module__.startswith("sparsecc.")}  # the built-in methods, as a fresh process registers them
    assert {m["config"] for m in listed} == {cls.__name__ for cls in configs}
    for cls in configs:
        assert f"{cls.kind} ({cls.__name__}, slot " in out.stdout
        assert cls.__doc__.strip().splitlines()[0] in out.stdout
        for f in dataclasses.fields(cls):
            assert any(line.split()[:1] == [f.name] for line in out.stdout.splitlines()), f.name
    spion = next(m for m in listed if m["kind"] == "spion")
    assert {"name": "block", "type": "int", "default": 64} in spion["fields"]


def test_export_calibrates_on_the_tokenizer_text(tmp_path, monkeypatch):
    """A Hugging Face folder with a tokenizer: export calibrates on its tokenized docstrings, as compile does."""
    from transformers import BertTokenizer

    from sparsecc.cli import main
    model, _ = T.bert()
    model.save_pretrained(tmp_path / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)] + [".", ",", "(", ")", "_", "'", ":"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    seen = {}
    real = sparsecc.compile

    def recording(model, inputs, **kwargs):
        seen["calibration"] = kwargs.get("calibration")
        return real(model, inputs, **kwargs)
    monkeypatch.setattr(sparsecc, "compile", recording)
    (tmp_path / "r.toml").write_text('[attention]\nkind = "spion"\nblock = 8\nquantile = 0.9\n')
    argv = ["export", str(tmp_path / "bert"), "--recipe", str(tmp_path / "r.toml"), "-o", str(tmp_path / "m.onnx"),
            "--seq-len", "32", "--calibration-batches", "3"]
    assert main(argv) == 0
    batches = seen["calibration"]
    assert len(batches) == 3 and all(b["input_ids"].shape == (1, 32) for b in batches)
    assert all(int(b["input_ids"][0, 0]) == vocab.index("[CLS]") for b in batches)  # tokenized text, not random ids
    assert (tmp_path / "m.onnx").is_file()


def test_demo_applies_seq_len_and_batch_to_its_spion_half_and_draws_nothing_without_matplotlib(tmp_path):
    out = run("demo", "--seq-len", "32", "--batch", "4", "--out", tmp_path / "demo", cwd=tmp_path, no_matplotlib=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SPION-CF: calibrating on 64 docstring paragraphs at L=32 in batches of 4" in out.stdout
    assert "layout pictures: not drawn" in out.stdout
    assert "matplotlib is not installed, so no picture is drawn" in out.stderr
    assert not list((tmp_path / "demo").glob("*.png"))


def test_error_lines_name_the_users_path_not_a_temporary_file():
    import argparse

    from sparsecc.cli import _one_line
    args = argparse.Namespace(output="out/m.onnx", out=None, dot=None)
    err = PermissionError("[Errno 13] Permission denied: '/home/u/out/.tmp-mnex22ra.onnx'")
    assert _one_line(err, args) == "[Errno 13] Permission denied: 'out/m.onnx'"
    err = OSError("cannot replace /home/u/out/.m.onnx.k2j4l.tmp ->\n out/m.onnx")
    assert _one_line(err, args) == "cannot replace out/m.onnx -> out/m.onnx"
