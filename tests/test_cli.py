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
