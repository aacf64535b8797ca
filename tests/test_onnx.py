"""Sparse ONNX export and the ONNX Runtime backend.

Each sparsecc op's translation is checked against the PyTorch op (fp32, 1e-4); small BERT, GPT-2
and Llama models compiled with the identity recipe run in ONNX Runtime like the compiled graph,
at the export shape and at another one; the files pass onnx.checker's full check; the
inspector and the CLI read them back.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from torch.utils import _pytree as pytree

import sparsecc
from sparsecc import testing as T
from sparsecc.backends import onnx as sonnx
from sparsecc.backends.onnx_inspect import inspect_onnx
from sparsecc.backends.onnxruntime import OnnxRuntimeModule
from sparsecc.capture import normalize_inputs
from sparsecc.cli import main
from sparsecc.errors import UnsupportedError
from sparsecc.layouts import block_mask_to_ell
from sparsecc.ops.activations import ACTIVATIONS
from sparsecc.ops.block_sparse_attention import block_sparse_attention_op
from sparsecc.ops.sparse_ffn import pack_sparse_ffn_weights

TOL = 1e-4


def _to_ort(module, args, path, dynamic=False, options=None):
    """Export `module` (an nn.Module calling sparsecc ops) and return (OnnxRuntimeModule, export result)."""
    gm = torch.export.export(module, args).module()
    result = sonnx.export_graph(gm, args, {}, str(path), dynamic=dynamic, options=options)
    onnx.checker.check_model(str(path), full_check=True)
    return OnnxRuntimeModule(str(path), out_spec=result.exported_program.call_spec.out_spec), result


def _max_err(a, b):
    fa, fb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(fa) == len(fb)
    errs = []
    for x, y in zip(fa, fb):
        assert x.shape == y.shape
        both_inf = torch.isinf(x) & torch.isinf(y) & (torch.sign(x) == torch.sign(y))
        errs.append(float((x - y).abs().masked_fill(both_inf, 0.0).max()))
    return max(errs)


# --- op translations ------------------------------------------------------------------------------

class AttentionVariants(torch.nn.Module):
    def forward(self, q, k, v, k2, v2, bool_mask, add_mask):
        att = torch.ops.sparsecc.attention
        return (att(q, k, v, None, 0.0, False, None, False),
                att(q, k, v, None, 0.0, True, 0.3, False),  # causal, explicit scale
                att(q, k2, v2, None, 0.0, False, None, True),  # GQA: 4 query heads, 2 kv heads
                att(q, k2, v2, None, 0.0, True, None, True),  # GQA + causal
                att(q, k, v, bool_mask, 0.0, False, None, False),
                att(q, k, v, add_mask, 0.0, False, None, False))


def test_attention_translation(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=g) for _ in range(3))
    k2, v2 = k[:, :2].contiguous(), v[:, :2].contiguous()
    bool_mask = torch.rand(2, 1, 12, 12, generator=g) > 0.3
    bool_mask[..., 0] = True  # no fully masked row
    add_mask = torch.randn(2, 1, 12, 12, generator=g)
    args = (q, k, v, k2, v2, bool_mask, add_mask)
    module = AttentionVariants()
    ort_module, _ = _to_ort(module, args, tmp_path / "attn.onnx")
    ref, got = module(*args), ort_module(*args)
    for i, (r, o) in enumerate(zip(ref, got)):
        assert (r - o).abs().max() < TOL, f"attention variant {i}"


class FFNVariants(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.gate = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 32)

    def forward(self, x):
        ffn = torch.ops.sparsecc.ffn
        up, down, gate = self.up, self.down, self.gate
        outs = [ffn(x, up.weight, up.bias, down.weight, down.bias, act, None, None)
                for act in sorted(ACTIVATIONS)]  # every entry of the activation table
        outs.append(ffn(x, up.weight, up.bias, down.weight, down.bias, "silu", gate.weight, gate.bias))  # SwiGLU
        outs.append(ffn(x, up.weight, None, down.weight, None, "gelu", gate.weight, None))  # GeGLU, no biases
        return tuple(outs)


def test_ffn_translation(tmp_path):
    torch.manual_seed(0)
    module, x = FFNVariants().eval(), torch.randn(2, 5, 16)
    ort_module, _ = _to_ort(module, (x,), tmp_path / "ffn.onnx")
    for i, (r, o) in enumerate(zip(module(x), ort_module(x))):
        assert (r - o).abs().max() < TOL, f"ffn variant {i}"


class SparseFFNModule(torch.nn.Module):
    def __init__(self, gated: bool):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        self.plain = pack_sparse_ffn_weights(r(32, 16), r(32), r(16, 32), r(16), r(16, 4), r(4, 32), r(32), 4, "relu")
        self.gated = pack_sparse_ffn_weights(r(32, 16), None, r(16, 32), None, r(16, 4), r(4, 32), None, 8, "silu",
                                             r(32, 16), r(32))
        self.squared = pack_sparse_ffn_weights(r(32, 16), r(32), r(16, 32), r(16), r(16, 4), r(4, 32), r(32), 4,
                                               "relu2")
        self.quick = pack_sparse_ffn_weights(r(32, 16), r(32), r(16, 32), None, r(16, 4), r(4, 32), None, 8,
                                             "quick_gelu", r(32, 16), None)

    def forward(self, x):
        return self.plain(x), self.gated(x), self.squared(x), self.quick(x)


@pytest.mark.parametrize("shape, rows_gathered", [((3, 7, 16), False), ((1, 1, 16), True)])
def test_sparse_ffn_translation(tmp_path, shape, rows_gathered):
    """Many tokens: dense GEMMs with the hidden units masked by the controller's one-hot; one token (decode):
    only the chosen weight rows are gathered (the PyTorch kernel's crossover, tokens * d_ff / n * 2 <= d_ff)."""
    module, x = SparseFFNModule(True), torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    ort_module, _ = _to_ort(module, (x,), tmp_path / "sffn.onnx")
    for r, o in zip(module(x), ort_module(x)):
        assert (r - o).abs().max() < TOL
    nodes = [n.op_type for n in onnx.load(str(tmp_path / "sffn.onnx")).graph.node]
    assert nodes.count("ArgMax") == 4
    if rows_gathered:
        assert "ScatterElements" not in nodes and nodes.count("Gather") >= 4 * 2
    else:  # dense projections, the hidden units masked by the one-hot of the controller's choice
        assert nodes.count("OneHot") == 4 and "Gather" not in nodes


class BlockSparse(torch.nn.Module):
    def __init__(self, mask: torch.Tensor, block: int):
        super().__init__()
        idx, cnt = block_mask_to_ell(mask)
        self.register_buffer("idx", idx)
        self.register_buffer("cnt", cnt)
        self.block = block

    def forward(self, q, k, v, k2, v2, pad):
        op = block_sparse_attention_op
        return (op(q, k, v, self.idx, self.cnt, self.block, 0.35, False, None),
                op(q, k2, v2, self.idx, self.cnt, self.block, 0.35, True, pad))  # GQA + causal + padding


@pytest.mark.parametrize("bucketed", [True, False], ids=["layout-known", "generic-ell"])
def test_block_sparse_attention_translation(tmp_path, bucketed):
    # known_layouts=False: the layout is read at run time: one ELL group padded to the widest row
    options = sonnx.OnnxOptions(known_layouts=bucketed)
    g = torch.Generator().manual_seed(3)
    L, b = 37, 8  # partial last block
    mask = torch.rand(5, 5, generator=g) > 0.5
    mask[:, 0] = True
    mask[2] = False  # a query block with no kept key block: zeros out, -inf logsumexp
    q, k, v = (torch.randn(2, 4, L, 8, generator=g) for _ in range(3))
    k2, v2 = k[:, :2].contiguous(), v[:, :2].contiguous()
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, -6:] = False
    module, args = BlockSparse(mask, b), (q, k, v, k2, v2, pad)
    ort_module, _ = _to_ort(module, args, tmp_path / "bsa.onnx", options=options)
    assert _max_err(module(*args), ort_module(*args)) < TOL
    proto = onnx.load(str(tmp_path / "bsa.onnx"))
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    if bucketed:  # one group per kept count (counts 1..5 here), for each of the two calls
        assert len(softmaxes) == 2 * len(set(mask.sum(1).clamp(min=1).tolist()))
    else:
        assert len(softmaxes) == 2
    for value in list(proto.graph.value_info) + list(proto.graph.output):  # never an L x L tensor
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[-2:] != [L, L], value.name


class BlockSparseUnmasked(BlockSparse):
    def forward(self, q, k, v):
        return block_sparse_attention_op(q, k, v, self.idx, self.cnt, self.block, 0.25, False, None)[0]


def test_block_sparse_attention_translation_without_masks(tmp_path):
    """Whole blocks, no causal, no padding, layout known: exact-count groups need no mask at all;
    small groups (several per count) are reassembled in query order."""
    options = sonnx.OnnxOptions(layout_group_keys=16)  # at most 2 query blocks of width 1 per group
    g = torch.Generator().manual_seed(5)
    mask = torch.eye(6, dtype=torch.bool) | (torch.rand(6, 6, generator=g) > 0.6)
    q, k, v = (torch.randn(1, 2, 48, 8, generator=g) for _ in range(3))
    module = BlockSparseUnmasked(mask, 8)
    path = tmp_path / "bsa_plain.onnx"
    sonnx.export_graph(torch.export.export(module, (q, k, v)).module(), (q, k, v), {}, str(path), dynamic=False,
                       options=options)
    ort_module = OnnxRuntimeModule(str(path))
    assert _max_err(module(q, k, v), ort_module(q, k, v)) < TOL
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Where" not in ops and ops.count("Softmax") >= len(set(mask.sum(1).tolist()))
    assert ops.count("Softmax") > len(set(mask.sum(1).tolist()))  # the group limit split some count


@torch.library.custom_op("sparsecc::test_untranslated", mutates_args=())
def _untranslated(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_untranslated.register_fake
def _(x):
    return torch.empty_like(x)


class Untranslated(torch.nn.Module):
    def forward(self, x):
        return torch.ops.sparsecc.test_untranslated(x) + 1


def test_missing_translation_names_the_op(tmp_path):
    x = torch.randn(2, 5)
    gm = torch.export.export(Untranslated(), (x,)).module()
    with pytest.raises(UnsupportedError, match="no ONNX translation for sparsecc::test_untranslated"):
        sonnx.export_graph(gm, (x,), {}, str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()

    @sonnx.register_translation("sparsecc::test_untranslated")
    def _double(x):
        from onnxscript import opset18 as op
        return op.Mul(x, op.CastLike(2.0, x))
    try:  # a registered translation is used by every export
        ort_module, _ = _to_ort(Untranslated(), (x,), tmp_path / "m.onnx")
        assert _max_err(ort_module(x), x * 2 + 1) < TOL
    finally:
        del sonnx.TRANSLATIONS["sparsecc::test_untranslated"]


def test_register_translation_decorator():
    @sonnx.register_translation("sparsecc::not_an_op_yet")
    def _t(x):
        return x
    try:
        assert sonnx.TRANSLATIONS["sparsecc::not_an_op_yet"] is _t
        assert _t not in sonnx.translation_table().values()  # the op does not exist: skipped
    finally:
        del sonnx.TRANSLATIONS["sparsecc::not_an_op_yet"]


# --- models -----------------------------------------------------------------------------------------

def _ids(batch, seq, seed=5):
    return torch.randint(0, T.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


MODELS = {
    "bert": (T.bert, lambda b, s: {"input_ids": _ids(b, s), "attention_mask": torch.ones(b, s, dtype=torch.long)}),
    "gpt2": (T.gpt2, lambda b, s: (_ids(b, s),)),
    "llama": (T.llama, lambda b, s: (_ids(b, s),)),
}


@pytest.fixture(scope="module")
def _compile_cache(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = MODELS[name][0]()
            path = str(tmp_path_factory.mktemp("onnx") / f"{name}.onnx")
            sm = sparsecc.compile(model, inputs, backend="onnxruntime", check=False,
                                  backend_options={"path": path, "intra_op_num_threads": 1,
                                                   "graph_optimization_level": "all"})
            cache[name] = (name, sm, inputs, path)
        return cache[name]
    return get


@pytest.fixture(params=sorted(MODELS))
def compiled(request, _compile_cache):
    """(name, SparseModel on backend onnxruntime, example inputs, path of its .onnx); compiled once."""
    return _compile_cache(request.param)


@pytest.fixture
def bert(_compile_cache):
    return _compile_cache("bert")


def _both(sm, inputs):
    """(PyTorch output of the compiled graph, ONNX Runtime output) on the same inputs."""
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        ref = sm.graph_module(*args, **{**sm._call_defaults, **kwargs})
    return ref, sm(*args, **kwargs)


def test_model_matches_sparse_model(compiled):
    name, sm, inputs, path = compiled
    ref, got = _both(sm, inputs)
    assert type(got) is type(ref)  # same ModelOutput class
    assert _max_err(ref, got) < TOL
    onnx.checker.check_model(path, full_check=True)
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert json.loads(meta["sparsecc.recipe"])["attention"] == {"kind": "identity"}
    assert [r["op"] for r in json.loads(meta["sparsecc.regions"])] == ["sparsecc::attention", "sparsecc::ffn"] * 2


def test_model_other_shape(compiled):
    name, sm, _, _ = compiled
    ref, got = _both(sm, MODELS[name][1](3, 24))  # exported at batch 2, length 16
    assert _max_err(ref, got) < TOL


def test_inspect_onnx(bert, capsys):
    name, sm, _, path = bert
    found = inspect_onnx(path)
    assert [(r.op, r.layer, r.density) for r in found.regions] == [
        ("sparsecc::attention", 0, 1.0), ("sparsecc::ffn", 0, 1.0),
        ("sparsecc::attention", 1, 1.0), ("sparsecc::ffn", 1, 1.0)]
    assert found.regions[0].path == "encoder.layer.0.attention.self"
    assert "attention (unfused Softmax)" not in found.dense  # every softmax is inside a region
    assert main(["inspect", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["regions"]) == 4 and data["recipe"]["ffn"] == {"kind": "identity"}
    assert main(["inspect", path]) == 0
    assert "sparsecc::attention" in capsys.readouterr().out


def test_ort_backend_options(bert):
    name, sm, _, _ = bert
    runner = sm._runner
    assert isinstance(runner, OnnxRuntimeModule)
    assert runner.session.get_providers() == ["CPUExecutionProvider"]
    assert runner.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(UnsupportedError, match="use_cache"):
        sm(**MODELS["bert"][1](2, 16), use_cache=True)
    with pytest.raises(UnsupportedError, match="not available"):  # checked before exporting
        sparsecc.compile(*T.hand_written(), backend="onnxruntime", check=False,
                         backend_options={"providers": ["NoSuchExecutionProvider"]})


def test_cli_export_spion_runs_from_the_file(tmp_path, capsys):
    """`sparsecc export` with a SPION recipe: the file alone (layouts inside) runs like the model."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"attention": {"kind": "fixed", "pattern": "bigbird", "block": 4, "density": 0.5},
                                  "ffn": "identity"}))
    out = tmp_path / "hw.onnx"
    assert main(["export", "sparsecc.testing:hand_written", "--recipe", str(recipe), "-o", str(out)]) == 0
    assert "sparsecc::block_sparse_attention" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    found = inspect_onnx(str(out))
    assert [r.op for r in found.regions] == ["sparsecc::block_sparse_attention", "sparsecc::ffn"]
    assert 0 < found.regions[0].density < 1
    model, (x,) = T.hand_written()
    sm = sparsecc.compile(model, (x,), recipe=sparsecc.Recipe.load(str(recipe)), check=False)
    import onnxruntime as ort
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - sm(x).detach().numpy()).max() < TOL


# --- each recipe on each model family ------------------------------------------------------------

SPARSE_RECIPES = {
    # block-sparse attention (a fixed layout: no calibration) + the one-of-N sparse FFN
    "spion+sparse_ffn": lambda name: sparsecc.Recipe(
        attention=sparsecc.Fixed(pattern="bigbird", block=4, density=0.5),
        ffn=sparsecc.SparseFFN(n=4, d_lowrank=8, init="random")),
    # token flow; causal decoders need content gates (a token's routing must not see later tokens)
    # (and threshold selection: top-k over the sequence would too); init 0 leaves some gates shut
    "token_flow": lambda name: sparsecc.Recipe(flow=sparsecc.TokenFlow(
        gate="released", keep=0.5, select="topk") if name == "bert" else sparsecc.TokenFlow(
        gate="content", init=0.0, kv="kept" if name == "gpt2" else "all")),
}


@pytest.mark.parametrize("recipe_name", sorted(SPARSE_RECIPES))
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_sparse_recipes_run_in_onnx_runtime(tmp_path, name, recipe_name):
    """Models using each sparse recipe: ONNX Runtime equals the PyTorch SparseModel (1e-4), at the
    export shape and at a shorter one with another batch; the file passes the full checker and its
    regions are the sparse ops."""
    model, inputs = MODELS[name][0]()
    path = str(tmp_path / f"{name}.onnx")
    sm = sparsecc.compile(model, inputs, recipe=SPARSE_RECIPES[recipe_name](name), backend="onnxruntime",
                          check=False, backend_options={"path": path, "intra_op_num_threads": 1})
    for shape_inputs in (inputs, MODELS[name][1](3, 12)):  # exported at batch 2, length 16
        ref, got = _both(sm, shape_inputs)
        assert _max_err(ref, got) < TOL
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        dense, sparse = model(*args, **kwargs), sm(*args, **kwargs)
    assert _max_err(dense[0], sparse[0]) > 1e-3  # the sparse path ran: blocks / units / tokens were skipped
    onnx.checker.check_model(path, full_check=True)
    ops = {r.op for r in inspect_onnx(path).regions}
    if recipe_name == "token_flow":
        # the blocks themselves stay dense; only the kept tokens enter them
        assert ops == {"sparsecc::attention", "sparsecc::ffn", "sparsecc::flow_route", "sparsecc::flow_gather",
                       "sparsecc::flow_scatter"}
        graph_ops = {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}
        assert {"GatherND", "ScatterND"} <= graph_ops  # flow_gather / flow_scatter
    else:
        assert ops == {"sparsecc::block_sparse_attention", "sparsecc::sparse_ffn"}


def test_capacity_token_flow_runs_in_onnx_runtime_with_sizes_of_the_input_shape(tmp_path):
    """select="capacity": the route is TopK over position keys, not flow_route; ORT equals the PyTorch graph
    at the export shape and at another batch and length, with padding."""
    model, inputs = T.bert()
    path = str(tmp_path / "capacity.onnx")
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(
        gate="released", keep=0.4, select="capacity")), backend="onnxruntime", check=False,
        backend_options={"path": path, "intra_op_num_threads": 1})
    short = MODELS["bert"][1](3, 12)
    short["attention_mask"][1, 7:] = 0
    for shape_inputs in (inputs, short):
        ref, got = _both(sm, shape_inputs)
        assert _max_err(ref, got) < TOL
    ops = {r.op for r in inspect_onnx(path).regions}
    assert "sparsecc::flow_route" not in ops and "sparsecc::flow_gather" in ops
    assert "TopK" in {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


def test_exported_file_has_the_model_output_names_and_a_plain_file_mode(tmp_path):
    """Outputs named after the model's (not `layer_norm_4`), a file mode as open() would give, and the
    longest length the block layouts cover in the metadata."""
    import os
    model, inputs = T.bert()
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(
        attention=sparsecc.Fixed(pattern="local", block=4, density=0.4375, max_len=20)), progress=False)
    path = tmp_path / "m.onnx"
    sm.export_onnx(str(path))
    m = onnx.load(str(path))
    assert [o.name for o in m.graph.output] == ["last_hidden_state", "pooler_output"]
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads({p.key: p.value for p in m.metadata_props}["sparsecc.max_len"]) == 20  # 5 blocks of 4
    hand, (x,) = T.hand_written()
    sparsecc.compile(hand, (x,), progress=False).export_onnx(str(tmp_path / "h.onnx"))
    assert [o.name for o in onnx.load(str(tmp_path / "h.onnx")).graph.output] == ["output"]
    spec = pytree.tree_flatten({"logits": x, "past": [(x, x)]})[1]
    assert sonnx.output_names(spec) == ["logits", "past.0.0", "past.0.1"]
    assert sonnx.output_names(pytree.tree_flatten((x, x))[1]) == ["output_0", "output_1"]
    from transformers import GPT2Config, GPT2LMHeadModel  # use_cache is on by default: a constant, not an input
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 128, (2, 16))
    sparsecc.compile(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, progress=False).export_onnx(
        str(tmp_path / "lm.onnx"))
    g = onnx.load(str(tmp_path / "lm.onnx")).graph
    assert [v.name for v in g.input] == ["input_ids", "attention_mask"] and [v.name for v in g.output] == ["logits"]


def test_onnxruntime_past_the_layout_length_says_so(tmp_path):
    from sparsecc.errors import LayoutError
    model, inputs = T.bert()
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=4, density=0.4375, max_len=16))
    sm = sparsecc.compile(model, inputs, recipe=recipe, backend="onnxruntime", progress=False)
    ok = sm(**inputs).last_hidden_state
    assert torch.allclose(ok, sparsecc.compile(model, inputs, recipe=recipe, progress=False)(**inputs)
                          .last_hidden_state, atol=1e-4)
    longer = {"input_ids": torch.ones(2, 32, dtype=torch.long), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    with pytest.raises(LayoutError, match=r"input input_ids has shape \(2, 32\), longer than the 16 tokens the "
                                          r"block layouts in model.onnx were made for; compile with the attention config's max_len"):
        sm(**longer)


def test_ort_backend_runs_fused_dense_layers_and_keeps_the_file_portable(tmp_path):
    """The session runs onnxscript's ORT fusions (dense attention -> Attention, GELU -> BiasGelu), like the
    dense model's own export; the file at `path` stays standard ONNX; fuse=False runs the plain graph."""
    model, inputs = T.bert("sdpa")
    path = str(tmp_path / "m.onnx")
    sm = sparsecc.compile(model, inputs, backend="onnxruntime", backend_options={"path": path}, progress=False)
    fused = onnx.load(sm._runner.path)
    ops = [n.op_type for n in fused.graph.node]
    assert sm._runner.path == str(tmp_path / "m.ort.onnx") and ops.count("Attention") == 2
    assert ops.count("BiasGelu") == 2 and "Softmax" not in ops
    onnx.checker.check_model(path, full_check=True)  # the portable file: standard ops only
    assert "Softmax" in [n.op_type for n in onnx.load(path).graph.node]
    ref = sparsecc.compile(model, inputs, progress=False)
    assert _max_err(ref(**inputs), sm(**inputs)) < TOL
    plain = sparsecc.compile(model, inputs, backend="onnxruntime", backend_options={"fuse": False}, progress=False)
    assert "Softmax" in [n.op_type for n in onnx.load(plain._runner.path).graph.node]


def test_a_fused_graph_that_differs_falls_back_to_the_plain_one(monkeypatch):
    """A fused graph that does not load or does not match the PyTorch graph on the example inputs (a bug of the
    fusion pass; onnxscript turns GPT-2's Conv1D into a Gemm on a rank-3 input here) is not run: the backend
    warns and runs the unfused graph, with the same outputs."""
    import sparsecc.backends.onnxruntime as ort_backend
    model, inputs = T.bert("sdpa")

    def differs(*args, **kwargs):
        raise ValueError("an output differs from the PyTorch graph by 3.2")
    monkeypatch.setattr(ort_backend, "_check_fused", differs)
    with pytest.warns(UserWarning, match=r"did not match the PyTorch graph \(ValueError: an output differs.*running "
                                         r"the unfused graph"):
        sm = sparsecc.compile(model, inputs, backend="onnxruntime", progress=False)
    assert not sm._runner.path.endswith(".ort.onnx")
    assert "Softmax" in [n.op_type for n in onnx.load(sm._runner.path).graph.node]
    assert _max_err(sparsecc.compile(model, inputs, progress=False)(**inputs), sm(**inputs)) < TOL
