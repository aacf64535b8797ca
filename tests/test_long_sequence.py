"""Long sequences: nothing on the sparse path builds an L x L tensor.

Probing a region's mask (causal? causal + key padding?) and reading the key padding at run time
use only some query rows of the mask, computed from the mask's inputs
(sparsecc.graph.mask_rows). A dispatch mode that fails every allocation of L * L / 4 bytes or more
proves it: the dense mask alone is L * L bytes.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparsecc
from sparsecc import testing as T
from sparsecc.api import analyze
from sparsecc.graph.fx_utils import evaluate
from sparsecc.graph.mask_rows import row_slice, sample_rows


class NoLargeTensors(TorchDispatchMode):
    """Fails any op whose output owns a storage of `limit` bytes or more (views of small ones pass)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta":
                size = t.untyped_storage().nbytes()
                self.largest = max(self.largest, size)
                if size >= self.limit:
                    raise MemoryError(f"{func} allocated {size} bytes for {tuple(t.shape)} {t.dtype}")
        return out


def _long_bert(L: int, impl: str):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=L, attn_implementation=impl)
    ids = torch.randint(0, 128, (2, L))
    mask = torch.ones_like(ids)
    mask[1, -100:] = 0  # padding at the end of one example
    return BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_compile_and_run_at_8192_tokens_without_an_L_by_L_tensor(impl):
    L = 8192
    model, inputs = _long_bert(L, impl)
    captured = sparsecc.capture(model, inputs)
    guard = NoLargeTensors(limit=L * L // 4)
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=64, density=0.02), ffn=None)
    with guard:
        sm = sparsecc.compile(captured, None, recipe=recipe, check=False, progress=False)
        out = sm(**inputs).last_hidden_state
    assert out.shape == (2, L, 32) and bool(out.isfinite().all())
    assert guard.largest < L * L // 4
    ops = [str(n.target) for n in sm.graph_module.graph.nodes]
    assert ops.count("sparsecc.block_sparse_attention.default") == 1
    # the guard does catch the dense mask: evaluating it whole allocates [2, 1, L, L]
    a = analyze(model, inputs)
    mask = a.ctx.regions[0].mask
    with pytest.raises(MemoryError, match="allocated"), NoLargeTensors(limit=L * L // 4):
        evaluate(a.captured.gm, [mask], a.captured.args, {**a.captured.call_defaults, **a.captured.kwargs})


@pytest.mark.parametrize("factory", ["bert", "bert_sdpa", "gpt2", "llama", "clip_text"])
def test_row_slice_equals_slicing_the_evaluated_mask(factory):
    model, inputs = getattr(T, factory)()
    a = analyze(model, inputs)
    captured, gm = a.captured, a.captured.gm
    kwargs = {**captured.call_defaults, **captured.kwargs}
    masks = {r.mask for r in a.ctx.regions if r.kind == "attention" and r.mask is not None}
    assert masks, factory
    for mask in masks:
        whole = evaluate(gm, [mask], captured.args, kwargs)[mask]
        for sl in [(-1, None, 1), (0, 5, 1), (1, None, 3), (-4, None, 1)]:
            with gm.graph.inserting_before(next(iter(mask.users))):
                node = row_slice(gm.graph, mask, sl)
            assert node is not None, (factory, mask.name)
            got = evaluate(gm, [node], captured.args, kwargs)[node]
            want = whole[..., slice(*sl), :]
            assert torch.equal(got.expand(want.shape), want), (factory, sl)
        sample = sample_rows(gm, mask, captured.args, kwargs, full_limit=0, per_part=2)  # sampled, not whole
        assert not sample.complete and sample.rows[-1] == whole.shape[-2] - 1
        assert torch.equal(sample.values.expand(*whole.shape[:-2], len(sample.rows), whole.shape[-1]),
                           whole.index_select(-2, sample.rows))
        gm.graph.eliminate_dead_code()


def test_sampled_probe_finds_causal_and_padding_like_the_whole_mask():
    """gpt2 (causal + padding mask): the sampled probe reads causal and the key padding as the full one."""
    from sparsecc.graph.regions import _mask_is_causal
    from sparsecc.methods.block_sparse import split_mask

    model, (ids,) = T.gpt2()
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    a = analyze(model, {"input_ids": ids, "attention_mask": mask})
    captured, gm = a.captured, a.captured.gm
    kwargs = {**captured.call_defaults, **captured.kwargs}
    node = a.ctx.regions[0].mask
    whole = sample_rows(gm, node, captured.args, kwargs)
    sampled = sample_rows(gm, node, captured.args, kwargs, full_limit=0, per_part=2)
    assert whole.complete and not sampled.complete
    assert _mask_is_causal(whole) and _mask_is_causal(sampled)
    keys = split_mask(whole.values, True)
    assert keys is not None and keys[0, -5:].eq(False).all() and keys[1].all()
    assert torch.equal(split_mask(sampled.values, True, sampled.rows, sampled.length), keys)
