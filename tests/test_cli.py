"""`sparsecc inspect` on each kind of MODEL argument, and its errors."""

import json

import pytest
import torch

from sparsecc import testing as T
from sparsecc.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_factory_json(capsys):
    data = _json(capsys, ["inspect", "sparsecc.testing:gpt2", "--json"])
    regions = data["regions"]
    assert [r["kind"] for r in regions] == ["attention", "ffn", "attention", "ffn"]
    assert [r["layer"] for r in regions] == [0, 0, 1, 1]
    assert regions[0]["path"] == "h.0.attn" and regions[0]["causal"] is True and regions[0]["heads"] == 4
    assert all(r["flops"] > 0 for r in regions)
    assert data["graph"]["nodes"] > 0


def test_report_lists_tensor_inputs_and_the_constants_apart(capsys):
    """use_cache=False is fixed at capture: a constant of the graph, not an input (nor in the ONNX export)."""
    data = _json(capsys, ["inspect", "sparsecc.testing:bert", "--json"])
    assert data["graph"]["inputs"] == ["input_ids", "attention_mask"]
    assert data["graph"]["constants"] == {"use_cache": False}
    main(["inspect", "sparsecc.testing:bert"])
    assert "inputs ['input_ids', 'attention_mask'], constants use_cache=False" in capsys.readouterr().out


def test_inspect_hf_directory_table_and_dot(tmp_path, capsys):
    model, _ = T.bert("sdpa", layers=3)
    model.save_pretrained(tmp_path / "bert")
    dot = tmp_path / "g.dot"
    assert main(["inspect", str(tmp_path / "bert"), "--seq-len", "24", "--batch", "2", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "3 attention and 3 FFN regions" in out
    assert "encoder.layer.2.attention.self" in out and "heads=4 d=8" in out
    text = dot.read_text()
    assert text.startswith("digraph sparsecc") and text.count("subgraph cluster_") == 6
    data = _json(capsys, ["inspect", str(tmp_path / "bert"), "--seq-len", "24", "--json"])
    attn = data["regions"][0]
    # at L=24, batch 1: q,k,v,o projections 4 * 2*24*32*32, core 2 * 2*4*24*24*8
    assert attn["flops"] == 4 * 2 * 24 * 32 * 32 + 2 * 2 * 4 * 24 * 24 * 8


def test_inspect_exported_program(tmp_path, capsys):
    model, (x,) = T.hand_written()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    data = _json(capsys, ["inspect", str(path), "--json"])
    assert [r["kind"] for r in data["regions"]] == ["attention", "ffn"]
    assert data["regions"][0]["causal"] is True


@pytest.mark.parametrize("spec,message", [
    ("nope.nowhere:f", "cannot import 'f' from 'nope.nowhere'"),
    ("missing.pt2", "missing.pt2: no such file"),
    ("m.onnx", "m.onnx: no such file"),
    ("sparsecc.testing:VOCAB", "sparsecc.testing:VOCAB is a int, not a function"),
])
def test_inspect_errors(spec, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", spec]) == 2
    assert message in capsys.readouterr().err


def test_bench_identity_and_sparse_side_by_side(tmp_path, capsys):
    """`sparsecc bench`: both rows timed in one run; the identity recipe agrees with dense to fp32
    rounding and has the same region FLOPs; a half-density layout halves the attention core's FLOPs."""
    identity = tmp_path / "identity.toml"
    identity.write_text('[attention]\nkind = "identity"\n[ffn]\nkind = "identity"\n')
    data = _json(capsys, ["bench", "sparsecc.testing:bert", "--recipe", str(identity), "--repeats", "2",
                          "--warmup", "0", "--json"])
    dense, rewritten = data["rows"]
    assert (dense["name"], rewritten["name"]) == ("dense", "attention=identity, ffn=identity")
    assert dense["seconds"] > 0 and rewritten["seconds"] > 0 and data["speedup"] > 0
    assert rewritten["max_abs_error"] < 1e-5 and rewritten["cosine"] > 0.99999
    assert rewritten["region_flops"] == dense["region_flops"] > 0

    half = tmp_path / "half.toml"
    half.write_text('[attention]\nkind = "fixed"\npattern = "local"\nblock = 4\ndensity = 0.4375\n')
    data = _json(capsys, ["bench", "sparsecc.testing:bert", "--recipe", str(half), "--repeats", "1", "--json"])
    dense, sparse = data["rows"]
    assert dense["region_flops"] > sparse["region_flops"] > 0
    assert sparse["max_abs_error"] > 1e-4  # a real change of the attention pattern
    assert "attention=fixed" in sparse["name"]


def test_bench_table_and_errors(tmp_path, capsys):
    from sparsecc.bench import BenchResult, BenchRow
    result = BenchResult("m", "eager", {}, 3, [BenchRow("dense", 0.020, 4_000_000),
                                               BenchRow("attention=spion", 0.008, 1_000_000, 2.5e-3, 0.99)], "box")
    assert result.speedup == pytest.approx(2.5)
    lines = result.table().splitlines()
    assert lines[0] == "m: dense vs recipe, backend eager, median of 3 interleaved runs"
    assert lines[3].split() == ["dense", "20.00", "1.00x", "4M", "1.00x", "-", "-"]
    assert lines[4].split() == ["attention=spion", "8.00", "2.50x", "1M", "4.00x", "2.50e-03", "0.9900"]
    assert lines[-1] == "box"
    path = tmp_path / "m.pt2"
    model, (x,) = T.hand_written()
    torch.export.save(torch.export.export(model, (x,)), str(path))
    assert main(["bench", str(path)]) == 2
    assert "sparsecc bench needs a model it can re-capture" in capsys.readouterr().err
