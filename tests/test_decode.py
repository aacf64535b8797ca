"""Sparse QKV, the decoder LM's decode step, and compiled token-by-token decoding (tiny shapes)."""

import itertools

import pytest
import torch

import sparsecc
from sparsecc.decode import compile_decoder, decode_tokens, generate
from sparsecc.errors import LayoutError
from sparsecc.nn import CausalLM, DecoderConfig, MultiplicativeDense, SparseQKV, count_parameters, with_sparse_ffn


def tiny(style: str = "gpt2", sparse_qkv: bool = False, sparse_ffn: bool = False, layers: int = 2,
         qkv_output: str = "none") -> CausalLM:
    cfg = DecoderConfig(vocab_size=64, d_model=32, n_layers=layers, n_heads=4, d_ff=64, max_len=32, style=style,
                        sparse_qkv=sparse_qkv, qkv_modules=8 if sparse_qkv else 0, qkv_output=qkv_output,
                        sparse_ffn=sparse_ffn, ffn_n=8, ffn_d_lowrank=8)
    return CausalLM(cfg).eval()


def test_multiplicative_dense_formula():
    """y[s*M + m] = sum_i x_i D[s, i] E[i, m] + bias[s, m], written out with loops."""
    layer = MultiplicativeDense(d_in=6, d_out=8, n_modules=4)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 6)
    expected = torch.empty(3, 8)
    for s in range(4):
        for m in range(2):
            expected[:, s * 2 + m] = (x * layer.d[s] * layer.e[:, m]).sum(-1) + layer.bias[s, m]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 6 + 6 * 2 + 8
    with pytest.raises(LayoutError, match="n_modules=3 must divide d_out=8"):
        MultiplicativeDense(6, 8, 3)


def test_qkv_output_choices():
    """"none" drops the attention output layer, "mult" replaces it by a multiplicative one, "dense" keeps it."""
    counts = {o: count_parameters(tiny(sparse_qkv=True, qkv_output=o)) for o in ("none", "mult", "dense")}
    per_layer_dense = 32 * 32 + 32
    per_layer_mult = 8 * 32 + 32 * 4 + 32
    assert counts["dense"] - counts["none"] == 2 * per_layer_dense
    assert counts["mult"] - counts["none"] == 2 * per_layer_mult
    assert isinstance(tiny(sparse_qkv=False, qkv_output="none").layers[0].attn.o_proj, torch.nn.Linear)
    with pytest.raises(LayoutError, match="qkv_output: got 'conv'"):
        DecoderConfig(sparse_qkv=True, qkv_output="conv")


def test_sparse_qkv_shapes_and_causality():
    layer = SparseQKV(d_model=32, n_heads=4, n_modules=8).eval()
    x = torch.randn(2, 7, 32)
    q, k, v, cache = layer(x)
    assert q.shape == k.shape == v.shape == (2, 4, 7, 8)
    assert cache.shape == (2, 2, 8, 4)
    assert sum(p.numel() for p in layer.parameters()) < 3 * 32 * 32  # fewer weights than dense Q, K, V
    x2 = x.clone()
    x2[:, 4] += 1.0
    q2, k2, v2, _ = layer(x2)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a[:, :, :4], b[:, :, :4], rtol=0, atol=0)  # positions before 4 unchanged
        assert not torch.allclose(a[:, :, 4], b[:, :, 4])


def test_sparse_qkv_convolutions_match_conv2d():
    """The im2col form equals causal conv2d over (positions, modules): 3 x 3 for Q, K; 3 x 1 for V."""
    layer = SparseQKV(d_model=32, n_heads=4, n_modules=8)
    torch.nn.init.normal_(layer.b_qk)
    torch.nn.init.normal_(layer.b_v)
    y = torch.randn(2, 5, 8, 4)
    q, k, v = layer.convolve(torch.cat([torch.zeros(2, 2, 8, 4), y], 1))
    image = torch.nn.functional.pad(y.permute(0, 3, 1, 2), (0, 0, 2, 0))  # (B, M, 2 + T, S), causal pad
    w_qk = layer.w_qk.permute(3, 2, 0, 1)  # (2M, M, 3, 3)
    ref_qk = torch.nn.functional.conv2d(image, w_qk, layer.b_qk, padding=(0, 1)).permute(0, 2, 3, 1)
    ref_v = torch.nn.functional.conv2d(image, layer.w_v.permute(2, 1, 0)[..., None], layer.b_v).permute(0, 2, 3, 1)
    torch.testing.assert_close(torch.cat([q, k], -1), ref_qk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_sparse_qkv_model_is_causal(style):
    model = tiny(style, sparse_qkv=True)
    ids = torch.randint(0, 64, (1, 10))
    ids2 = ids.clone()
    ids2[0, 6] = (ids[0, 6] + 1) % 64
    a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6], b[:, 6])


@pytest.mark.parametrize("style,sparse_qkv,sparse_ffn",
                         list(itertools.product(["gpt2", "llama"], [False, True], [False, True])))
def test_decode_equals_full_forward(style, sparse_qkv, sparse_ffn):
    model = tiny(style, sparse_qkv, sparse_ffn, qkv_output="mult" if style == "llama" else "none")
    out = decode_tokens(model, torch.randint(0, 64, (5,)), n_new=6)
    assert out.tokens.shape == (11,) and out.logits.shape == (10, 64)
    full = model(out.tokens[:-1][None])[0]
    torch.testing.assert_close(out.logits, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("qkv_output", ["none", "mult", "dense"])
def test_decode_equals_full_forward_each_qkv_output(qkv_output):
    model = tiny("gpt2", sparse_qkv=True, sparse_ffn=True, qkv_output=qkv_output)
    out = decode_tokens(model, torch.randint(0, 64, (4,)), n_new=5)
    torch.testing.assert_close(out.logits, model(out.tokens[:-1][None])[0], rtol=0, atol=1e-4)


def test_sparse_loss_layer():
    """sparse_loss=S: a multiplicative vocabulary projection (S * d + d * V / S weights, untied); decoding
    still equals the full forward; S must divide the vocabulary."""
    dense = tiny(sparse_qkv=True)
    cfg = DecoderConfig(**{**dense.cfg.__dict__, "sparse_loss": 4})
    model = CausalLM(cfg).eval()
    assert isinstance(model.lm_head, MultiplicativeDense)
    assert count_parameters(model) - count_parameters(dense) == 4 * 32 + 32 * 16  # the tied head had none
    out = decode_tokens(model, torch.randint(0, 64, (3,)), n_new=5)
    torch.testing.assert_close(out.logits, model(out.tokens[:-1][None])[0], rtol=0, atol=1e-4)
    with pytest.raises(LayoutError, match="sparse_loss: got 5 modules for vocab_size=64"):
        DecoderConfig(vocab_size=64, sparse_loss=5)


def test_conv_cache_holds_last_two_positions():
    model = tiny("llama", sparse_qkv=True)
    ids = torch.randint(0, 64, (1, 6))
    seen = []
    hook = model.layers[1].attn.qkv.register_forward_hook(lambda m, a, o: seen.append(m.modules_output(a[0])))
    model(ids)
    hook.remove()
    y = seen[0][0]  # (T, S, M): layer 1's multiplicative output on the full sequence
    state = model.empty_cache(1, 8)
    for i in range(ids.shape[1]):
        _, *state = model.step(ids[:, i:i + 1], torch.tensor([i]), *state)
        conv = state[2][1, 0]  # (2, S, M)
        expected = torch.cat([torch.zeros(max(0, 1 - i), *y.shape[1:]), y[max(0, i - 1): i + 1]])
        torch.testing.assert_close(conv, expected, rtol=0, atol=1e-5)


def test_compiled_step_decodes_like_eager():
    model = tiny("llama", sparse_qkv=True, sparse_ffn=True)
    prompt = torch.randint(0, 64, (4,))
    dec = compile_decoder(model, max_len=12)
    ops = [n.target for n in dec.module.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.sparsecc.sparse_ffn.default) == 2
    eager, compiled = decode_tokens(model, prompt, 8, max_len=12), decode_tokens(dec, prompt, 8)
    assert torch.equal(eager.tokens, compiled.tokens)
    torch.testing.assert_close(eager.logits, compiled.logits, rtol=0, atol=1e-4)


@pytest.mark.skipif(not hasattr(sparsecc, "SparseFFN"), reason="recipe slot sparsecc.SparseFFN not available")
def test_compile_recipe_rewrites_step_ffns():
    """A dense model's step compiled with the SparseFFN recipe decodes like the eager model given the same
    (distilled) controllers."""
    model = tiny("gpt2")
    text = torch.randint(0, 64, (24,))
    recipe = sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=8, d_lowrank=8, steps=20))
    dec = compile_decoder(model, max_len=12, recipe=recipe, calibration_ids=text)
    gm = dec.module.graph_module
    assert sum(n.target == torch.ops.sparsecc.sparse_ffn.default for n in gm.graph.nodes) == 2
    eager = with_sparse_ffn(model, n=8, d_lowrank=8)
    with torch.no_grad():
        for i, layer in enumerate(eager.layers):
            c = layer.ffn.controller
            c.c1.copy_(getattr(gm, f"sparsecc_ffn_{i}_c1"))
            c.c2.copy_(getattr(gm, f"sparsecc_ffn_{i}_c2"))
            c.bias.copy_(getattr(gm, f"sparsecc_ffn_{i}_c_bias"))
    prompt = torch.randint(0, 64, (3,))
    assert torch.equal(generate(eager, prompt, 8), generate(dec, prompt, 8))
