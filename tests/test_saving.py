"""sparsecc.save / sparsecc.load: same outputs for every method and every backend that runs here, in a
fresh process without the model's class; clear errors for missing, truncated, corrupted and newer files."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.errors import UnsupportedError
from sparsecc.passes.manager import max_abs_error
from sparsecc.saving import FORMAT_VERSION, SaveError

RECIPES = {
    "identity": lambda: sparsecc.Recipe(),
    "spion+sparse_ffn": lambda: sparsecc.Recipe(attention=sparsecc.Spion(block=8, quantile=0.9),
                                                ffn=sparsecc.SparseFFN(n=4, d_lowrank=4, steps=5)),
    "fixed": lambda: sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", block=8, density=0.75), ffn=None),
    "token_flow": lambda: sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="content", keep=0.5, init=0.0)),
}


def _out(model, inputs):
    return model(**inputs).last_hidden_state


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_save_load_gives_the_same_outputs(tmp_path, name):
    model, inputs = T.bert("sdpa", seq=32)
    sm = sparsecc.compile(model, inputs, recipe=RECIPES[name](), calibration=[inputs], progress=False)
    sparsecc.save(sm, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directory left behind
    other = {"input_ids": inputs["input_ids"][:1, :24], "attention_mask": inputs["attention_mask"][:1, :24]}
    backends = ["eager", "inductor", "onnxruntime"]
    for backend in backends:
        loaded = sparsecc.load(tmp_path / "m", backend=backend)
        for x in (inputs, other):  # the example, and another batch size and length
            assert max_abs_error(_out(sm, x), _out(loaded, x)) <= 1e-5, backend
    loaded = sparsecc.load(tmp_path / "m")
    assert loaded.recipe == sm.recipe and sorted(loaded.plans) == sorted(sm.plans)
    for region, plan in sm.plans.items():
        assert loaded.plans[region].digest() == plan.digest()
    assert loaded.report().table() == sm.report().table()
    if sm.layouts:
        assert all(torch.equal(loaded.layouts[k].mask, v.mask) for k, v in sm.layouts.items())
        # layouts are plan data, not weights: graph buffers outside state_dict() (so outside DDP / FSDP
        # checkpoints and weights.safetensors), saved once, with the plans
        layout_buffers = [k for k, _ in sm.named_buffers() if "sparsecc_layout" in k]
        assert len(layout_buffers) == 2 * len(sm.layouts)
        assert not any("sparsecc_layout" in k for k in sm.state_dict())
        from safetensors.torch import load_file
        assert not any("sparsecc_layout" in k for k in load_file(str(tmp_path / "m" / "weights.safetensors")))


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


def test_load_in_a_fresh_process_without_the_model_class(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16)
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=8, density=0.4375),
                             ffn=sparsecc.SparseFFN(n=8, d_lowrank=4, steps=5))
    sm = sparsecc.compile(Net().eval(), (x,), recipe=recipe, calibration=[(x,)], progress=False)
    sparsecc.save(sm, tmp_path / "m")
    torch.save({"x": x, "y": sm(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, sparsecc
        io = torch.load({str(tmp_path / 'io.pt')!r})
        sm = sparsecc.load({str(tmp_path / 'm')!r})
        print(float((sm(io["x"]) - io["y"]).abs().max()))
        ops = [str(n.target) for n in sm.graph_module.graph.nodes]
        print(sum("block_sparse_attention" in o for o in ops), sum("sparse_ffn" in o for o in ops))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-2000:]
    error, counts = out.stdout.strip().splitlines()[-2:]
    assert float(error) <= 1e-6 and counts == "1 1"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, inputs = T.bert("sdpa", seq=16)
    sm = sparsecc.compile(model, inputs, progress=False)
    path = tmp_path_factory.mktemp("saved") / "m"
    sparsecc.save(sm, path)
    return sm, path


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_truncated_corrupt_and_newer_files_are_named(saved, tmp_path):
    _, path = saved
    d = _copy(path, tmp_path / "missing")
    (d / "weights.safetensors").unlink()
    with pytest.raises(SaveError, match=r"weights.safetensors: missing"):
        sparsecc.load(d)
    d = _copy(path, tmp_path / "truncated")
    data = (d / "program.pt2").read_bytes()
    (d / "program.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(SaveError, match=rf"program.pt2: {len(data) // 2} bytes, the manifest says {len(data)}"):
        sparsecc.load(d)
    d = _copy(path, tmp_path / "corrupt")
    data = bytearray((d / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(SaveError, match=r"weights.safetensors: its content does not match"):
        sparsecc.load(d)
    d = _copy(path, tmp_path / "newer")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SaveError, match=rf"format version {FORMAT_VERSION + 1} .* reads versions <= {FORMAT_VERSION}"):
        sparsecc.load(d)
    with pytest.raises(SaveError, match=r"manifest.json: no such file"):
        sparsecc.load(tmp_path / "nowhere")


def test_save_replaces_an_earlier_save_and_refuses_other_directories(saved, tmp_path):
    sm, path = saved
    d = _copy(path, tmp_path / "again")
    sparsecc.save(sm, d)  # an earlier save is replaced as a whole
    assert sorted(os.listdir(tmp_path)) == ["again"] and sparsecc.load(d) is not None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SaveError, match="holds other files and no sparsecc manifest"):
        sparsecc.save(sm, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_pickle_and_deepcopy_point_to_save(saved):
    sm, _ = saved
    for attempt in (lambda: pickle.dumps(sm), lambda: copy.deepcopy(sm), lambda: torch.save(sm, "/dev/null")):
        with pytest.raises(UnsupportedError, match=r"sparsecc.save\(sm, directory\)"):
            attempt()
