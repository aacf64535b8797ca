"""Triton backend: every kernel under the Triton interpreter vs the CPU reference ops, and the wiring.

The kernel cases live in tests/triton_interp.py and run in one fresh process with
TRITON_INTERPRET=1 (triton fixes its mode when first imported, and other tests in this worker may
have imported it already, e.g. through torch.compile); the tests here assert on the numbers it
reports. With TRITON_INTERPRET=1 already set for this process, the cases run in-process instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import triton_compile  # noqa: E402
import triton_interp  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'sparsecc[triton]')")


def _in_process() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return "triton" not in sys.modules or bool(sys.modules["triton"].knobs.runtime.interpret)


@pytest.fixture(scope="module")
def results() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install 'sparsecc[triton]')")
    names = list(triton_interp.CASES)
    if _in_process():
        return triton_interp.run(names)
    # PYTHONPATH: this checkout's sparsecc, whatever the environment has installed
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(HERE / "triton_interp.py"), *names], env=env, cwd=HERE.parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _get(results: dict, name: str) -> dict:
    res = results[name]
    assert "error" not in res, f"{name} raised:\n{res['error']}"
    return res


@pytest.mark.parametrize("name", [n for n in triton_interp.CASES if n.startswith("attention/")
                                  and n.count("/") == 2])
def test_block_sparse_attention_matches_cpu_op(results, name):
    r = _get(results, name)
    assert r["dtypes_ok"] and r["shapes_ok"]
    for key in ("out", "lse", "dq", "dk", "dv"):
        assert r[key] <= r["tol"], f"{name}: max abs error of {key} {r[key]:.3g} > {r['tol']}"
    assert r["empty_rows_match"], "logsumexp is -inf exactly where the CPU op's is"
    assert r["empty_rows_zero"], "rows with no allowed key give 0 output and 0 gradient"
    if "empty_rows" in name or "small_block" in name:
        assert r["empty_rows"] > 0, "the case must contain rows with no allowed key"


@pytest.mark.parametrize("name", [n for n in triton_interp.CASES if n.startswith("ffn/") and n.count("/") == 3])
def test_sparse_ffn_matches_cpu_op(results, name):
    """Forward and every gradient (x, weights, biases) vs the CPU op; decode and batched kernels."""
    r = _get(results, name)
    assert r["dtype_ok"]
    assert r["out"] <= r["tol"], f"{name}: max abs error of the output {r['out']:.3g} > {r['tol']}"
    grads = {k: v for k, v in r.items() if k.startswith("d") and k != "dtype_ok"}
    assert {"dx", "dw_in", "dw_out_t"} <= set(grads)
    for key, err in grads.items():
        assert err != "missing", f"{name}: no gradient for {key}"
        assert err <= r["tol"], f"{name}: max abs error of {key} {err:.3g} > {r['tol']} (relative to its max)"


@pytest.mark.parametrize("name", [n for n in triton_interp.CASES if n.startswith("flow/")])
def test_token_flow_matches_cpu_ops(results, name):
    """route / gather / scatter (replace and fused residual add) and the kernels of their backward."""
    r = _get(results, name)
    assert r["route_equal"] and r["index_dtype_ok"], "route gives the reference's index and counts"
    assert 0 in r["kept"], "the case has an example that keeps no token"
    assert r["scatter_finite"], "NaN in padding slots of rows must not leak"
    for key in ("gather", "scatter", "grad_rows", "grad_x"):
        assert r[key] <= r["tol"], f"{name}: max abs error of {key} {r[key]:.3g} > {r['tol']}"


def test_sparse_ffn_backward_reads_the_ops_autograd_context(results):
    r = _get(results, "ffn/autograd_context")
    assert r.pop("controller_grads"), "the controller gets no gradient through the op"
    assert set(r) == {"0", "1", "2", "3", "4", "10"}
    assert all(err <= 2e-5 for err in r.values()), r


def test_compiled_model_runs_the_kernels_end_to_end(results):
    """A tiny BERT compiled with SPION-style attention + sparse FFN, and with token flow, the Triton launchers
    standing in as the ops' kernels: same outputs (and parameter gradients) as with the CPU kernels."""
    r = _get(results, "e2e/bert_spion_sparse_ffn")
    assert {"sparsecc.block_sparse_attention.default", "sparsecc.sparse_ffn.default", "sparsecc.flow_route.default",
            "sparsecc.flow_scatter.default"} <= set(r["ops"])
    assert r["same_params"] and r["grads"] > 10
    assert r["out"] <= 2e-5 and r["grad"] <= 2e-5 and r["flow_out"] <= 2e-5, r


def test_torch_compile_traces_a_training_step_through_the_kernels(results):
    assert _get(results, "e2e/torch_compile_traces_the_backward")["grad"] <= 2e-5


def test_sparse_ffn_backward_op_passes_opcheck(results):
    r = _get(results, "ffn/backward_op_opcheck")
    assert r and all(v == "SUCCESS" for v in r.values()), r


def test_attention_reports_layout_and_dtype_errors(results):
    r = _get(results, "attention/cpu_tensors_report")
    assert "kv_indices must lie in [0, 1)" in r["layout_error"]
    assert "torch.float64" in r["dtype_error"] and "CPU op" in r["dtype_error"]


def test_register_adds_cuda_kernels(results):
    r = _get(results, "registration")
    assert {"sparsecc::block_sparse_attention", "sparsecc::block_sparse_attention_backward",
            "sparsecc::sparse_ffn", "sparsecc::flow_route", "sparsecc::flow_gather",
            "sparsecc::flow_scatter"} == set(r["ops"])
    assert r["cuda_kernels"] and all(r["cuda_kernels"].values()), r["cuda_kernels"]
    assert r["cpu_backward_after_register"] <= 1e-5, "CPU gradients keep the op's own backward"


def test_import_sparsecc_does_not_import_triton():
    code = ("import sys, sparsecc, sparsecc.backends.triton, sparsecc.ops.block_sparse_attention, "
            "sparsecc.ops.sparse_ffn, sparsecc.ops.token_flow, sparsecc.ops.triton_runtime; "
            "from sparsecc.backends import get_backend; get_backend('triton', {'autotune': False}); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_triton_backend_without_cuda_says_what_to_do():
    import sparsecc
    from sparsecc.errors import UnsupportedError

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(UnsupportedError) as err:
        sparsecc.compile(model, torch.randn(2, 8), backend="triton")
    msg = str(err.value)
    assert "no CUDA device" in msg and "backend='eager'" in msg


@needs_triton
@pytest.mark.skipif(_in_process(), reason="this process interprets triton kernels")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_launcher_on_cpu_without_interpreter_says_what_to_do():
    from sparsecc.errors import UnsupportedError
    from sparsecc.ops.block_sparse_attention.triton import block_sparse_attention_forward

    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(UnsupportedError, match="TRITON_INTERPRET=1"):
        block_sparse_attention_forward(q, q, q, torch.tensor([[0]]), torch.tensor([1]), 16, 0.25, False, None)


@needs_triton
@pytest.mark.skipif(_in_process(), reason="this process interprets triton kernels (nothing to compile)")
def test_kernels_compile_for_hopper():
    """Every kernel compiles to a Hopper (sm_90) cubin in bf16, the dtype the interpreter cannot check.

    No GPU is needed: Triton lowers to PTX and runs the ptxas bundled with its wheel.
    `python tests/triton_compile.py --all` compiles every dtype, variant and autotune config.
    """
    try:
        failures = triton_compile.compile_all(full=False, arch=90, dtypes=("bfloat16",))
    except (FileNotFoundError, RuntimeError) as e:  # no ptxas / backend in this triton build
        if "ptxas" in str(e):
            pytest.skip(f"triton cannot compile for CUDA here: {e}")
        raise
    assert not failures, "\n".join(failures)


def test_bench_triton_refuses_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    proc = subprocess.run([sys.executable, str(HERE.parent / "tools" / "bench_triton.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "python tools/bench_triton.py" in proc.stderr


@needs_triton
@pytest.mark.skipif(_in_process(), reason="this process interprets triton kernels (one config only)")
def test_triton_options_select_the_autotune_configs():
    """Launch tunables are options (TritonBackend / TritonOptions), not module state."""
    from sparsecc.backends import get_backend
    from sparsecc.ops.block_sparse_attention import triton as A
    from sparsecc.ops.triton_runtime import TritonOptions

    def shape(cfg):
        return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages

    full = A.tuned("_fwd_kernel")
    assert [shape(c) for c in full.configs] == list(A.FWD_CONFIGS)
    assert A.tuned("_fwd_kernel") is full  # tuned once per process and selection
    first = A.tuned("_fwd_kernel", TritonOptions(autotune=False))
    assert [shape(c) for c in first.configs] == [A.FWD_CONFIGS[0]]
    mine = A.tuned("_fwd_kernel", TritonOptions(configs={"_fwd_kernel": [(32, 32, 4, 2), (64, 32, 4, 3)]}))
    assert [shape(c) for c in mine.configs] == [(32, 32, 4, 2), (64, 32, 4, 3)]
    other = A.tuned("_bwd_dq_kernel", TritonOptions(configs={"_fwd_kernel": [(32, 32, 4, 2)]}))
    assert [shape(c) for c in other.configs] == list(A.BWD_CONFIGS)  # other kernels keep their candidates
    with pytest.raises(ValueError, match="empty"):
        A.tuned("_fwd_kernel", TritonOptions(configs={"_fwd_kernel": []}))
    backend = get_backend("triton", {"autotune": False, "configs": {"_fwd_kernel": [(16, 16, 2, 2)]}})
    assert backend.options == TritonOptions(autotune=False, configs={"_fwd_kernel": [(16, 16, 2, 2)]})


@needs_triton
def test_triton_ffn_kernels_cover_the_activation_table():
    from sparsecc.ops import activations
    from sparsecc.ops.sparse_ffn import triton as F

    assert set(activations.ACTIVATIONS) <= set(F._ACT) and F._ACT["none"] == 0
    assert len(set(F._ACT.values())) == len(F._ACT)  # one code per activation
