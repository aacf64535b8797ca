"""The Backend protocol and registry (sparsecc.backends): names, options, lazy loading, what each lowers to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import sparsecc
from sparsecc import backends, testing as T
from sparsecc.backends import Backend, LoweringInputs, get_backend
from sparsecc.errors import UnsupportedError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(UnsupportedError) as err:
        get_backend("tensorrt")
    message = str(err.value)
    assert "backend 'tensorrt' is not known" in message
    assert "'eager', 'inductor', 'onnxruntime', 'triton'" in message and "register_backend" in message


def test_unknown_option_names_the_options_the_backend_takes():
    with pytest.raises(UnsupportedError, match=r"backend 'inductor' got unknown option\(s\) \['threads'\]; it takes "
                                               r"\['dynamic', 'mode'\]"):
        get_backend("inductor", {"threads": 2})
    with pytest.raises(UnsupportedError, match="it takes no options"):
        get_backend("eager", {"path": "m.onnx"})
    ort = get_backend("onnxruntime", {"intra_op_num_threads": 1, "layout_group_keys": 512})
    assert (ort.intra_op_num_threads, ort.layout_group_keys, ort.known_layouts) == (1, 512, True)


@pytest.mark.parametrize("name", ["eager", "inductor", "onnxruntime", "triton"])
def test_every_registered_backend_implements_the_protocol(name):
    backend = get_backend(name)
    assert isinstance(backend, Backend) and backend.name == name
    with pytest.raises(Exception):  # options are fixed once the backend is made (frozen dataclass)
        backend.name_of_a_new_field = 1


def test_backends_are_imported_only_when_asked_for():
    code = ("import json, sys, sparsecc, sparsecc.backends as b\n"
            "before = {m: m in sys.modules for m in ('sparsecc.backends.onnxruntime', 'sparsecc.backends.triton', "
            "'sparsecc.backends.inductor', 'onnxruntime', 'onnxscript', 'triton')}\n"
            "b.get_backend('eager')\n"
            "after_eager = 'sparsecc.backends.onnxruntime' in sys.modules\n"
            "b.get_backend('onnxruntime')\n"
            "print(json.dumps([before, after_eager, 'sparsecc.backends.onnxruntime' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after_eager, after_ort = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(before.values()), before
    assert not after_eager and after_ort


def test_eager_and_inductor_lowering():
    model, inputs = T.hand_written()
    sm = sparsecc.compile(model, inputs)
    gm, spec = sm.graph_module, LoweringInputs(tuple(inputs), {})
    assert get_backend("eager").lower(gm, spec) is gm
    compiled = get_backend("inductor", {"dynamic": False}).lower(gm, spec)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is gm


def test_onnxruntime_prepare_checks_options_before_any_work():
    with pytest.raises(UnsupportedError, match="not available"):
        get_backend("onnxruntime", {"providers": ["NoSuchExecutionProvider"]}).prepare()
    with pytest.raises(UnsupportedError, match="graph_optimization_level 'fast'"):
        get_backend("onnxruntime", {"graph_optimization_level": "fast"}).prepare()
    with pytest.raises(ValueError, match="layout_group_keys"):
        get_backend("onnxruntime", {"layout_group_keys": 0}).prepare()


@dataclass(frozen=True)
class _Doubling:
    """A backend that runs the graph and doubles its output (to see that lower() is what runs)."""

    name: ClassVar[str] = "doubling"
    factor: float = 2.0

    def prepare(self) -> None:
        return None

    def lower(self, gm, inputs):
        return lambda *a, **k: gm(*a, **k) * self.factor


def test_register_backend_adds_a_backend():
    backends.register_backend("doubling", _Doubling)
    try:
        assert "doubling" in backends.available()
        backend = get_backend("doubling", {"factor": 3.0})
        assert isinstance(backend, Backend)
        model, inputs = T.hand_written()
        gm = sparsecc.compile(model, inputs).graph_module
        torch.testing.assert_close(backend.lower(gm, LoweringInputs(inputs, {}))(*inputs), gm(*inputs) * 3.0)
    finally:
        del backends._REGISTRY["doubling"]
    with pytest.raises(ValueError, match="module:Class"):
        backends.register_backend("bad", "no_colon_here")


def test_inductor_runs_the_sparse_ops_as_eager_does():
    """torch.compile (inductor) of a graph holding block-sparse attention and sparse FFN ops: the ops stay
    opaque calls, and the compiled model matches the eager one, which matches masked dense per call."""
    model, inputs = T.bert()
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=4, density=0.4375),
                             ffn=sparsecc.SparseFFN(n=4, d_lowrank=2, steps=5))
    eager = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], progress=False)
    assert len(T.check_block_sparse_calls(eager, inputs)) == 2 and T.check_sparse_ffn_calls(eager, inputs) == 2
    compiled = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], progress=False,
                                backend="inductor", plans=eager.plans)
    want, got = eager(**inputs).last_hidden_state, compiled(**inputs).last_hidden_state
    dense = model(**inputs).last_hidden_state
    assert (want - dense).abs().max() > 1e-2  # the sparse model really differs from the dense one
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
