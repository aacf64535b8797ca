"""A .pt2 saved with torch.export.save from a compiled model loads in a fresh interpreter after
`import sparsecc` only (importing sparsecc registers every op), and `sparsecc inspect` reads it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import sparsecc
from sparsecc import testing as T

ROOT = Path(__file__).resolve().parent.parent


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, 16))
        return x + self.down(torch.relu(self.up(x)))


RECIPE = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=8, density=0.4375),
                         ffn=sparsecc.SparseFFN(n=8, d_lowrank=4, steps=5))


def _save_pt2(sm, path: Path) -> None:
    args, kwargs = sm.example_inputs
    torch.export.save(torch.export.export(sm.graph_module, tuple(args), {**sm.call_defaults, **kwargs}), str(path))


def _python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _cli(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sparsecc.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_pt2_of_a_compiled_model_loads_after_import_sparsecc_only(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16)
    sm = sparsecc.compile(Net().eval(), (x,), recipe=RECIPE, calibration=[(x,)], progress=False)
    _save_pt2(sm, tmp_path / "m.pt2")
    torch.save({"x": x, "y": sm(x)}, tmp_path / "io.pt")
    script = """
        import torch{imports}
        ep = torch.export.load("m.pt2")
        io = torch.load("io.pt")
        print(float((ep.module()(io["x"]) - io["y"]).abs().max()))
        ops = [str(n.target) for n in ep.graph.nodes]
        print(ops.count("sparsecc.block_sparse_attention.default"), ops.count("sparsecc.sparse_ffn.default"))
    """
    out = _python(script.format(imports=", sparsecc"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    error, counts = out.stdout.split()[-3], " ".join(out.stdout.split()[-2:])
    assert float(error) <= 1e-6 and counts == "1 1"
    without = _python(script.format(imports=""), tmp_path)  # the same without sparsecc: the ops are unknown
    assert without.returncode != 0 and "sparsecc" in without.stderr

    out = _cli("inspect", "m.pt2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("this graph was compiled by sparsecc already: it holds block_sparse_attention x1, sparse_ffn x1"
            in out.stdout)


def test_pt2_of_a_compiled_hugging_face_model_inspects_in_a_fresh_process(tmp_path):
    """Its outputs are a transformers ModelOutput: sparsecc imports the module that defines it before loading."""
    model, inputs = T.bert("sdpa", seq=32)
    sm = sparsecc.compile(model, inputs, recipe=RECIPE, calibration=[inputs], progress=False)
    _save_pt2(sm, tmp_path / "bert.pt2")
    out = _cli("inspect", "bert.pt2", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"sparsecc.block_sparse_attention.default": 2' in out.stdout
    sparsecc.save(sm, tmp_path / "saved")
    out = _python("""
        import sparsecc
        from sparsecc.capture import load_exported
        captured = load_exported("bert.pt2")
        print(type(captured.run()).__name__)
        sm = sparsecc.load("saved")
        print(type(sm(*sm.example_inputs[0], **sm.example_inputs[1])).__name__)
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["BaseModelOutputWithPoolingAndCrossAttentions"] * 2
