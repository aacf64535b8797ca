"""ListOps benchmark: generator rules (LRA), tokenizer, dataset, the paper's model and its block-sparse path."""

from __future__ import annotations

import pathlib
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))

from listops_data import (  # noqa: E402
    END,
    MED,
    PAD_ID,
    VOCAB_SIZE,
    ListOpsTransformer,
    detokenize,
    evaluate,
    generate_tree,
    listops_dataset,
    parse,
    to_string,
    tokenize,
)
from sparsecc.layouts import BlockLayout, LayoutSet
from sparsecc.methods.fixed.layouts import layout_at_density
from sparsecc.methods.spion.layouts import spion_cf


@pytest.mark.parametrize("expr, value", [
    ("[MAX 4 3 [MIN 2 3 ] 1 0 ]", 4),
    ("[MIN 5 [MAX 7 9 ] 6 ]", 5),
    ("[SM 9 8 7 ]", 4),                      # 24 % 10
    ("[SM 5 5 ]", 0),
    ("[MED 3 1 2 ]", 2),                     # odd count: the middle value
    ("[MED 1 4 ]", 2),                       # even: int(np.median) = floor(2.5), not the lower median 1
    ("[MED 1 5 ]", 3),
    ("[MED 0 9 ]", 4),
    ("[MED 7 7 0 9 ]", 7),
    ("[MAX [SM 6 6 ] [MED 2 [MIN 8 9 ] ] 1 ]", 5),  # max(2, floor((2+8)/2)=5, 1)
    ("7", 7),
])
def test_values_on_hand_written_expressions(expr, value):
    assert evaluate(expr) == value
    assert evaluate(parse(expr)) == value


def test_median_matches_lra_numpy_rule():
    rng = random.Random(1)
    for _ in range(300):
        args = [rng.randrange(10) for _ in range(rng.randint(2, 10))]
        expr = " ".join([MED] + [str(a) for a in args] + [END])
        assert evaluate(expr) == int(np.median(args))


def test_tokenizer_round_trip_and_vocab():
    assert VOCAB_SIZE == 16
    rng = random.Random(0)
    for _ in range(20):
        tree, length = generate_tree(rng, max_depth=6, max_args=5)
        text = to_string(tree)
        ids = tokenize(text)
        assert len(ids) == length and min(ids) >= 1 and max(ids) < VOCAB_SIZE
        assert detokenize(ids) == text
        assert parse(text) == tree and tokenize(tree) == ids
    with pytest.raises(ValueError):
        tokenize("[ADD 1 2 ]")
    with pytest.raises(ValueError):
        parse("[MAX 1 2")


def test_dataset_lengths_labels_and_determinism():
    ids, labels, lengths = listops_dataset(40, 60, 200, seed=3, seq_len=256)
    assert ids.shape == (40, 256) and ids.dtype == torch.long
    assert bool(((lengths >= 60) & (lengths <= 200)).all())
    assert torch.equal((ids != PAD_ID).sum(1), lengths)
    for i in range(40):
        assert evaluate(detokenize(ids[i])) == int(labels[i])
    assert len({tuple(r.tolist()) for r in ids}) == 40  # distinct, as LRA
    again = listops_dataset(40, 60, 200, seed=3, seq_len=256)
    assert all(torch.equal(a, b) for a, b in zip((ids, labels, lengths), again))
    other, _, _ = listops_dataset(40, 60, 200, seed=4, seq_len=256)
    assert not torch.equal(ids, other)


def test_lra_length_range_is_fast():
    ids, labels, lengths = listops_dataset(30, 501, 1999, seed=0, seq_len=2048)
    assert bool(((lengths >= 501) & (lengths <= 1999)).all()) and ids.shape == (30, 2048)
    assert 0 <= int(labels.min()) and int(labels.max()) <= 9


def _batch(n=3, seq_len=128, seed=0):
    return listops_dataset(n, seq_len // 4, seq_len - 20, seed=seed, seq_len=seq_len)


def test_model_forward_backward():
    ids, labels, _ = _batch()
    model = ListOpsTransformer(max_len=128)
    logits = model(ids)
    assert logits.shape == (3, 10)
    F.cross_entropy(logits, labels).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(p.numel() for p in model.parameters()) < 300_000


def _run(model, ids, labels):
    model.zero_grad()
    logits = model(ids)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding", ["bias", "mask"])
def test_block_sparse_path_with_full_layout_equals_dense(padding):
    torch.manual_seed(0)
    ids, labels, _ = _batch(seq_len=128)
    model = ListOpsTransformer(max_len=128, dropout=0.0)
    dense_logits, dense_grads = _run(model, ids, labels)
    full = BlockLayout.full(128, 32)
    model.set_layouts(LayoutSet((n, full.with_name(n)) for n in model.attention_names()), sparse_padding=padding)
    sparse_logits, sparse_grads = _run(model, ids, labels)
    torch.testing.assert_close(sparse_logits, dense_logits, atol=1e-5, rtol=1e-5)
    for n in dense_grads:
        torch.testing.assert_close(sparse_grads[n], dense_grads[n], atol=1e-5, rtol=1e-4)
    model.set_layouts(None)
    torch.testing.assert_close(model(ids), dense_logits, atol=0, rtol=0)


def test_sparse_padding_modes_agree_and_layouts_crop_to_shorter_batches():
    torch.manual_seed(0)
    ids, labels, lengths = _batch(n=4, seq_len=256, seed=5)
    model = ListOpsTransformer(max_len=256, dropout=0.0)
    layout = layout_at_density("bigbird", 256, 32, 0.55)  # window 3 + a global block on 8 x 8 blocks
    layouts = LayoutSet((n, layout.with_name(n)) for n in model.attention_names())
    model.set_layouts(layouts, sparse_padding="mask")
    mask_logits, mask_grads = _run(model, ids, labels)
    model.set_layouts(layouts, sparse_padding="bias")
    bias_logits, bias_grads = _run(model, ids, labels)
    torch.testing.assert_close(bias_logits, mask_logits, atol=1e-5, rtol=1e-5)
    for n in mask_grads:
        torch.testing.assert_close(bias_grads[n], mask_grads[n], atol=1e-5, rtol=1e-4)
    crop = -(-int(lengths.max()) // 32) * 32  # the batch cropped to its longest example
    assert crop < 256
    torch.testing.assert_close(model(ids[:, :crop]), bias_logits, atol=1e-5, rtol=1e-5)


def test_attention_maps_and_spion_cf_layouts():
    torch.manual_seed(0)
    ids, labels, lengths = _batch(n=3, seq_len=128)
    model = ListOpsTransformer(max_len=128)
    model.train()
    maps = model.attention_maps([ids[:2], ids[2:]], chunk_elements=8192)  # forces several query chunks (16 rows)
    assert model.training and list(maps) == model.attention_names()
    for A in maps.values():
        assert A.shape == (128, 128)
        torch.testing.assert_close(A.sum(-1), torch.ones(128))
        assert float(A[:, int(lengths.max()):].abs().max()) == 0.0  # keys that are padding everywhere
    # reference: softmax of the first layer computed directly on the whole batch
    layer = model.layers[0]
    with torch.no_grad():
        model.eval()
        x = layer.norm1(model.tok(ids) + model.pos(torch.arange(128)))
        a = layer.attn
        q = a._heads(a.q(x))
        k = a._heads(a.k(x))
        s = (q @ k.transpose(-1, -2)) / a.head_dim ** 0.5
        s = s.masked_fill(~(ids != PAD_ID)[:, None, None, :], float("-inf"))
        ref = s.softmax(-1).mean(dim=(0, 1))
    torch.testing.assert_close(maps["layers.0.attn"], ref, atol=1e-6, rtol=1e-5)
    layouts = LayoutSet((n, spion_cf(A, block_size=32, quantile=0.9, name=n)) for n, A in maps.items())
    model.set_layouts(layouts)
    assert set(model.layouts) == set(maps)
    assert model(ids).shape == (3, 10)


def test_eval_listops_bigbird_keeps_its_structure_at_spion_densities(load_tool):
    # tools/eval_listops.py picks a finer BigBird block where window 3 + a global block do not fit.
    tool = load_tool("eval_listops")
    assert tool.bigbird_block_for(512, 32, 0.083) == 8    # 16 x 16 blocks: only the diagonal fits
    assert tool.bigbird_block_for(2048, 64, 0.05) == 16   # the paper's ListOps setting, ~5 %
    assert tool.bigbird_block_for(512, 32, 0.4) == 32     # fits at the requested block already
    lay = layout_at_density("bigbird", 512, tool.bigbird_block_for(512, 32, 0.083), 0.083)
    assert lay.meta["window"] == 3 and lay.meta["global_blocks"] == 1
