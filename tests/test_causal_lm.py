"""sparsecc.compile_decoder: Hugging Face causal LMs generate through a compiled prefill graph and a
one-token decode graph over a static KV cache, for every architecture in sparsecc.testing.CAUSAL_LMS."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.causal_lm import Sampling, process_logits
from sparsecc.causal_lm.generate import prefill_inputs
from sparsecc.testing import check_block_sparse_calls
from sparsecc.errors import InputError, UnsupportedError

ARCHS = list(T.CAUSAL_LMS)
MAX_LEN = 32
SPARSE_FFN = sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=4, d_lowrank=8, steps=10))
SPION = sparsecc.Recipe(attention=sparsecc.Spion(block=4), ffn=None)
FLOW = sparsecc.Recipe(attention=None, ffn=None, flow=sparsecc.TokenFlow(gate="content", pin_first=False, keep=0.5))
RECIPES = {"dense": None, "sparse_ffn": SPARSE_FFN, "spion": SPION, "flow": FLOW}


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    return T.causal_lm(arch)[0]


@functools.lru_cache(maxsize=None)
def _compiled(arch: str, sparse: bool, backend: str = "eager", recipe: str = ""):
    recipe = recipe or ("sparse_ffn" if sparse else "dense")
    calibration = [torch.randint(1, T.VOCAB, (4, MAX_LEN), generator=torch.Generator().manual_seed(i))
                   for i in range(2)] if recipe not in ("dense", "flow") else None
    return sparsecc.compile_decoder(_model(arch), max_len=MAX_LEN, recipe=RECIPES[recipe], calibration=calibration,
                                    check=False, progress=False, backend=backend)


def _prompts(batch: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [batch, length] with rows 1 and 2 left-padded by 3 and 1 (pad id 0), and their mask."""
    ids = torch.randint(1, T.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2 % batch, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _step_logits(dec, tokens: torch.Tensor, mask: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [B, n, vocab] of the decode graph fed tokens[:, prompt:] one by one after a prefill of the prompt
    (teacher forcing through `dec.steps()`): row i predicts token prompt + i + 1."""
    steps = dec.steps()
    with torch.no_grad():
        logits, state = steps.prefill(tokens[:, :prompt], mask[:, :prompt])
        out, position = [logits[:, -1]], _positions(mask[:, :prompt])[:, -1:]
        for i in range(prompt, tokens.shape[1] - 1):
            position = position + 1
            logits, state = steps.next(tokens[:, i:i + 1], mask[:, :i + 1], position, state)
            out.append(logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_greedy_tokens_equal_hf_generate(arch):
    """Left-padded batch, greedy: the same tokens as the model's own generate; full-sequence logits of the
    compiled graphs within 1e-4 of the model's (given HF generate's positions)."""
    model, dec = _model(arch), _compiled(arch, False)
    ids, mask = _prompts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = dec.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(got, expected)
    full_mask = torch.cat([mask, torch.ones(3, got.shape[1] - 7, dtype=torch.long)], 1)
    with torch.no_grad():
        reference = model(got, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    real = full_mask.bool()
    assert (dec(got, full_mask) - reference)[real].abs().max() < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_ffn_decode_steps_equal_the_full_sequence_forward(arch):
    """With SparseFFN on every layer, both graphs run sparsecc::sparse_ffn (the same plans), and each decode
    step's logits equal the prefill graph's full-sequence logits of the same tokens (1e-4)."""
    dec = _compiled(arch, True)
    layers = len(dec.spec.layers)
    for graph in (dec.prefill, dec.decode):
        calls = [n for n in graph.graph_module.graph.nodes if "sparse_ffn" in str(n.target)]
        assert len(calls) == layers
    ids, mask = _prompts()
    tokens = dec.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert tokens.shape == (3, 15)
    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        full = dec(tokens, full_mask)[:, 6:-1]
        steps = _step_logits(dec, tokens, full_mask, 7)
        dense = _model(arch)(tokens, attention_mask=full_mask, position_ids=_positions(full_mask)).logits[:, 6:-1]
    assert (steps - full).abs().max() < 1e-4
    assert (full - dense).abs().max() > 1e-3  # the FFNs were rewritten, not left dense


def _flow_calls(graph) -> dict:
    """How many gate, route and packed-scatter nodes a flowed graph has."""
    nodes = list(graph.graph_module.graph.nodes)
    counts = {name: sum(name in str(n.target) for n in nodes if n.op == "call_function")
              for name in ("flow_route", "single_token_route", "flow_scatter", "scatter_packed")}
    return {**counts, "gates": sum(n.op == "call_module" and n.target == "sparsecc_flow" for n in nodes)}


@pytest.mark.parametrize("arch", ARCHS)
def test_token_flow_decode_steps_route_each_token_as_the_prefill_does(arch):
    """TokenFlow(gate='content') on a decoder: a token's gate reads only its own hidden state, so the decode
    step that sees it alone keeps or skips it as the prefill graph did. With random gate scorers (about half
    the tokens skip each layer) each decode step's logits equal the prefill graph's full-sequence logits of
    the same tokens (1e-4), and differ from the dense model's. The decode step routes with static shapes
    (no flow_route); where the prefill runs a layer's per-token tail on the kept rows only (scatter_packed),
    so does the decode step."""
    dec = sparsecc.compile_decoder(_model(arch), max_len=MAX_LEN, recipe=FLOW, progress=False)
    layers = len(dec.spec.layers)
    prefill, decode = _flow_calls(dec.prefill), _flow_calls(dec.decode)
    assert prefill["flow_route"] == decode["single_token_route"] == layers
    assert prefill["single_token_route"] == decode["flow_route"] == 0
    assert prefill["gates"] == decode["gates"] == layers
    assert prefill["flow_scatter"] + prefill["scatter_packed"] == layers
    assert (decode["flow_scatter"], decode["scatter_packed"]) == (prefill["flow_scatter"], prefill["scatter_packed"])
    assert dec.decode.flow_gates.scorers[0].weight is dec.prefill.flow_gates.scorers[0].weight  # one set of gates
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for scorer in dec.prefill.flow_gates.scorers:
            scorer.weight.copy_(torch.randn(scorer.weight.shape, generator=g))
            scorer.bias.zero_()
    ids, mask = _prompts()
    tokens = dec.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
    kept = dec.prefill.measure_flow([prefill_inputs(tokens, full_mask, dec.empty_cache(3), MAX_LEN)])
    assert len(kept) == layers and all(0.15 < f < 0.85 for f in kept.values()), kept
    with torch.no_grad():
        full = dec(tokens, full_mask)[:, 6:-1]
        dense = _model(arch)(tokens, attention_mask=full_mask, position_ids=_positions(full_mask)).logits[:, 6:-1]
    assert (_step_logits(dec, tokens, full_mask, 7) - full).abs().max() < 1e-4
    assert (full - dense).abs().max() > 1e-3  # tokens skipped layers


def test_a_decode_step_whose_token_skips_every_layer_does_no_tail_work():
    """Batch 1, the new token skipped by every layer: the decode step runs no output projection and no FFN
    (the packed tail gets no rows, not one padding row). FLOPs against the same step with every token kept
    differ by exactly layers x (the FFN's 3 and o_proj's 1 matmuls of one token)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = _model("llama")
    dec = sparsecc.compile_decoder(model, max_len=MAX_LEN, recipe=FLOW, progress=False)
    steps, ids = dec.steps(), torch.randint(1, T.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    flops, logits = {}, {}
    for bias in (5.0, -5.0):  # every gate open / closed
        with torch.no_grad():
            for scorer in dec.prefill.flow_gates.scorers:
                scorer.weight.zero_()
                scorer.bias.fill_(bias)
            _, state = steps.prefill(ids, torch.ones_like(ids))
            with FlopCounterMode(display=False) as counter:
                logits[bias], _ = steps.next(ids[:, :1], torch.ones(1, 7, dtype=torch.long), torch.full((1, 1), 6),
                                             state)
        flops[bias] = counter.get_total_flops()
    c = model.config
    per_layer = 3 * 2 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size * c.hidden_size
    assert flops[5.0] - flops[-5.0] == c.num_hidden_layers * per_layer
    assert (logits[5.0] - logits[-5.0]).abs().max() > 1e-3


def test_fit_flow_trains_the_decoder_gates_and_onnxruntime_runs_them(tmp_path):
    """dec.fit_flow distils the dense model into the flowed prefill graph: the loss falls, the thresholds keep
    the recipe's half of the tokens on the training text, the user's model is untouched, and the decode graph
    routes with the trained gates. compile_decoder(..., backend='onnxruntime', trained=dec) takes the trained
    plans, weights and gates: the same tokens, logits within 1e-4."""
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dec = sparsecc.compile_decoder(model, max_len=MAX_LEN, recipe=FLOW, progress=False)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, T.VOCAB, (4, 24), generator=g) for _ in range(4)]
    result = dec.fit_flow(batches, teacher=model, steps=30, lr=1e-3, progress=False)
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    kept = dec.prefill.measure_flow([prefill_inputs(b, torch.ones_like(b), dec.empty_cache(4), MAX_LEN)
                                     for b in batches])
    assert all(abs(f - 0.5) <= 1 / 16 for f in kept.values()), kept
    ids, mask = _prompts()
    tokens = dec.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        full = dec(tokens, full_mask)
    assert (_step_logits(dec, tokens, full_mask, 7) - full[:, 6:-1]).abs().max() < 1e-4
    ort = sparsecc.compile_decoder(model, max_len=MAX_LEN, backend="onnxruntime", trained=dec, progress=False)
    assert ort.cache_kind == "past" and ort.prefill.recipe == FLOW
    assert torch.equal(ort.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), tokens)
    with torch.no_grad():
        assert (ort(tokens, full_mask) - full)[full_mask.bool()].abs().max() < 1e-4
    with pytest.raises(UnsupportedError, match="trained=dec"):
        ort.fit_flow(batches, teacher=model, steps=1)
    sparsecc.save(dec, tmp_path / "flow")  # the trained gates are in the saved inference graphs
    assert torch.equal(sparsecc.load(tmp_path / "flow").generate(ids, attention_mask=mask, max_new_tokens=8,
                                                                eos_token_id=[]), tokens)


def test_left_padded_rows_generate_what_each_prompt_alone_does():
    dec = _compiled("llama", False)
    ids, mask = _prompts()
    batch = dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    for row in range(3):
        alone = ids[row:row + 1, mask[row].bool()]
        single = dec.generate(alone, max_new_tokens=10, eos_token_id=[])
        assert torch.equal(single[0, alone.shape[1]:], batch[row, 7:])


def test_sampling_draws_what_hf_generate_draws_with_the_same_seed():
    model, dec = _model("llama"), _compiled("llama", False)
    ids, mask = _prompts()
    options = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    expected = model.generate(ids, attention_mask=mask, **options)
    torch.manual_seed(123)
    assert torch.equal(dec.generate(ids, attention_mask=mask, **options), expected)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = dec.generate(ids, attention_mask=mask, generator=g1, **options)
    assert torch.equal(a, dec.generate(ids, attention_mask=mask, generator=g2, **options))


class _BanToken:
    """A user's logits processor (HF's interface): `token` is never chosen."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(1, torch.tensor([self.token]), -float("inf"))


@pytest.mark.parametrize("case", ["repetition", "ngram", "min_new_tokens", "banned", "user"])
def test_hf_logits_processors_give_the_tokens_of_hf_generate(case):
    """repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids / suppress_tokens /
    begin_suppress_tokens and a user's logits_processor: greedy tokens equal HF's generate with the same
    options (a left-padded batch), and differ from plain greedy (the option changed something)."""
    from transformers import LogitsProcessorList
    model, dec = _model("llama"), _compiled("llama", False)
    ids, mask = _prompts()
    plain = dec.generate(ids, attention_mask=mask, max_new_tokens=12)
    new = plain[:, 7:]
    options = {"repetition": dict(repetition_penalty=2.0), "ngram": dict(no_repeat_ngram_size=2),
               "min_new_tokens": dict(min_new_tokens=6, eos_token_id=int(new[0, 1])),
               "banned": dict(bad_words_ids=[[int(new[0, 0])], [int(new[1, 0]), int(new[1, 1])]],
                              suppress_tokens=[int(new[2, 2])], begin_suppress_tokens=[int(new[1, 0])]),
               "user": {}}[case]
    ban = [_BanToken(int(new[0, 0]))] if case == "user" else None
    ours = dec.generate(ids, attention_mask=mask, max_new_tokens=12, logits_processor=ban, **options)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **options,
                            **({"logits_processor": LogitsProcessorList(ban)} if ban else {}))
    assert torch.equal(ours, theirs)
    n = min(ours.shape[1], plain.shape[1])
    assert not torch.equal(ours[:, :n], plain[:, :n])
    with pytest.raises(InputError, match="num_beams"):
        dec.generate(ids, num_beams=2)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.5, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)])
def test_warpers_match_hf_logits_processors(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    scores = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    expected = scores.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = process_logits(scores, Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    kept = (~torch.isinf(got)).sum(-1)
    assert (kept >= 1).all() and (not top_k or (kept <= top_k).all())


def test_eos_stops_generation_and_pads_finished_rows_like_hf():
    """eos chosen as the token the first row produces third: that row is padded after it, and generation
    ends early once every row is done (same tokens as HF's generate)."""
    model, dec = _model("gpt_neox"), _compiled("gpt_neox", False)
    ids, mask = _prompts()
    free = dec.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 9])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=5)
    got = dec.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(got, expected)
    after = got[0, 10:]
    assert after.numel() == 0 or bool((after == 5).all())


def test_save_and_load_generate_the_same_tokens(tmp_path):
    dec = _compiled("gpt2", True)
    ids, mask = _prompts()
    expected = dec.generate(ids, attention_mask=mask, max_new_tokens=8)
    sparsecc.save(dec, tmp_path / "dec")
    loaded = sparsecc.load(tmp_path / "dec")
    assert isinstance(loaded, sparsecc.CompiledCausalLM) and loaded.max_len == MAX_LEN
    assert loaded.sampling == dec.sampling and loaded.spec == dec.spec
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=8), expected)
    shared = {id(p) for p in loaded.prefill.parameters()}
    assert all(id(p) in shared for p in loaded.decode.parameters())  # one set of weights again
    # ... and on disk once: the decode part names the prefill's tensors instead of storing them
    from safetensors.torch import load_file
    stored = {part: load_file(str(tmp_path / "dec" / part / "weights.safetensors")) for part in ("prefill", "decode")}
    external = json.loads((tmp_path / "dec" / "decode" / "manifest.json").read_text())["external"]
    params = dict(dec.decode.graph_module.named_parameters())
    assert set(params) <= set(external) and not set(params) & set(stored["decode"])
    assert all(part == "prefill" and name in stored["prefill"] for part, name in external.values())


def test_bad_prompts_are_errors_that_say_what_to_do():
    dec = _compiled("llama", False)
    with pytest.raises(InputError, match="max_len=32"):
        dec.generate(torch.ones(1, 40, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(InputError, match="ask for at most 2 new tokens"):
        dec.generate(torch.ones(1, 30, dtype=torch.long), max_new_tokens=5)
    right_padded = torch.ones(2, 6, dtype=torch.long)
    right_padded[1, -2:] = 0
    with pytest.raises(InputError, match="left padding"):
        dec.generate(torch.ones(2, 6, dtype=torch.long), attention_mask=right_padded)
    with pytest.raises(InputError, match="integer tensor"):
        dec.generate(torch.ones(1, 6))
    with pytest.raises(InputError, match="top_p"):
        dec.generate(torch.ones(1, 6, dtype=torch.long), do_sample=True, top_p=1.5)


def test_compile_decoder_rejects_what_it_cannot_compile():
    with pytest.raises(UnsupportedError, match="Hugging Face causal LM"):
        sparsecc.compile_decoder(T.bert()[0], max_len=16)
    with pytest.raises(InputError, match="max_position_embeddings"):
        sparsecc.compile_decoder(_model("qwen2"), max_len=1000)
    with pytest.raises(UnsupportedError, match="eager, inductor, onnxruntime"):
        sparsecc.compile_decoder(_model("llama"), max_len=16, backend="tvm")
    with pytest.raises(UnsupportedError, match="gate='content'.*select='threshold'.*pin_first=False.*kv='all'"):
        sparsecc.compile_decoder(_model("llama"), max_len=16, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(
            gate="released", select="topk", kv="kept")))
    with pytest.raises(UnsupportedError, match="without recipe.flow"):
        _compiled("llama", False).fit_flow([torch.ones(1, 4, dtype=torch.long)], teacher=_model("llama"), steps=1)
    with pytest.raises(InputError, match="another recipe"):
        sparsecc.compile_decoder(_model("llama"), max_len=MAX_LEN, recipe=SPION, trained=_compiled("llama", False))
    with pytest.raises(UnsupportedError, match="pruned_logits='-inf'"):
        sparsecc.compile_decoder(_model("llama"), max_len=16,
                                 recipe=sparsecc.Recipe(attention=sparsecc.Spion(pruned_logits="zero")))
    with pytest.raises(InputError, match="calibration batch 0 has 40 tokens"):
        sparsecc.compile_decoder(_model("llama"), max_len=32, recipe=SPARSE_FFN,
                                 calibration=[torch.ones(1, 40, dtype=torch.long)])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_onnxruntime_decoder_generates_hf_tokens_with_past_in_present_out(arch):
    """On ONNX Runtime the two graphs take the cache as past inputs and return it one position longer as
    present outputs (Optimum's layout); greedy tokens equal HF's, also from a one-token prompt."""
    model, dec = _model(arch), _compiled(arch, False, "onnxruntime")
    assert dec.cache_kind == "past"
    ids, mask = _prompts()
    assert torch.equal(dec.generate(ids, attention_mask=mask, max_new_tokens=10),
                       model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))
    assert torch.equal(dec.generate(ids[:1, -1:], max_new_tokens=6),
                       model.generate(ids[:1, -1:], max_new_tokens=6, do_sample=False))
    heads, key_dim, _ = dec.spec.layers[0]
    out = dec.decode(ids[:, :1], torch.ones(3, 5, dtype=torch.long), torch.full((3, 1), 4),
                     *[torch.zeros(3, h, 4, d) for h, k, v in dec.spec.layers for d in (k, v)])
    assert len(out) == 1 + 2 * len(dec.spec.layers) and out[1].shape == (3, heads, 5, key_dim)


def test_onnxruntime_sparse_ffn_decoder_matches_the_eager_one():
    """The same recipe and calibration on ONNX Runtime: the same plans, so the same tokens as on eager,
    and its decode steps agree with its full-sequence forward (1e-4)."""
    eager, ort = _compiled("llama", True), _compiled("llama", True, "onnxruntime")
    assert all(eager.plans[k].digest() == ort.plans[k].digest() for k in eager.plans)
    ids, mask = _prompts()
    tokens = ort.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(tokens, eager.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]))
    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
    assert (ort(tokens, full_mask) - eager(tokens, full_mask))[full_mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("arch,backend", [("llama", "eager"), ("gpt2", "eager"), ("falcon", "onnxruntime")])
def test_spion_decoder_decode_steps_attend_to_what_the_block_sparse_prefill_does(arch, backend):
    """SPION on a decoder: the prefill graph runs block_sparse_attention (each call equal to masked dense
    attention under its layout), the decode step masks the keys its query's layout row drops, and each
    decode step's logits equal the prefill graph's full-sequence logits of the same tokens (1e-4)."""
    dec = _compiled(arch, True, backend, "spion")
    layers = len(dec.spec.layers)
    op = torch.ops.sparsecc.block_sparse_attention.default
    assert sum(n.target is op for n in dec.prefill.graph_module.graph.nodes) == layers
    assert sum(n.target is op for n in dec.decode.graph_module.graph.nodes) == 0
    layouts = [p.tensors["mask"] for p in dec.plans.values() if "mask" in p.tensors]
    assert len(layouts) == layers and all(bool((~m.bool()).any()) for m in layouts)  # something is pruned
    ids, mask = _prompts()
    tokens = dec.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1)
    if backend == "eager":
        inputs = prefill_inputs(tokens, full_mask, dec.empty_cache(3), MAX_LEN)
        assert len(check_block_sparse_calls(dec.prefill, inputs, atol=1e-4)) == layers
    with torch.no_grad():
        full = dec(tokens, full_mask)[:, 6:-1]
        dense = _model(arch)(tokens, attention_mask=full_mask, position_ids=_positions(full_mask)).logits[:, 6:-1]
    assert (_step_logits(dec, tokens, full_mask, 7) - full).abs().max() < 1e-4
    assert (full - dense).abs().max() > 1e-3  # the layouts changed the attention


def test_onnxruntime_decoder_saves_and_loads(tmp_path):
    """A saved ONNX Runtime decoder keeps its explicit shapes (the past length, the mask one longer) and
    loads as one that generates the same tokens."""
    dec = _compiled("gpt2", False, "onnxruntime")
    ids, mask = _prompts()
    expected = dec.generate(ids, attention_mask=mask, max_new_tokens=6)
    sparsecc.save(dec, tmp_path / "dec")
    loaded = sparsecc.load(tmp_path / "dec")
    assert loaded.cache_kind == "past" and loaded.decode.backend == "onnxruntime"
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=6), expected)


def test_generation_config_defaults_are_taken_and_unapplied_settings_named():
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=True, top_p=0.8, eos_token_id=[3, 4], pad_token_id=1)
    sampling = Sampling.from_generation_config(config)
    assert sampling == Sampling(do_sample=True, temperature=1.0, top_k=50, top_p=0.8, eos_token_id=(3, 4),
                                pad_token_id=1)
    with pytest.warns(UserWarning, match=r"num_beams=3, typical_p=0\.5"):
        Sampling.from_generation_config(GenerationConfig(num_beams=3, typical_p=0.5))
    assert sampling.updated(top_k=5, eos_token_id=7) == Sampling(True, 1.0, 5, 0.8, (7,), 1)
    taken = Sampling.from_generation_config(GenerationConfig(repetition_penalty=1.2, no_repeat_ngram_size=3,
                                                             bad_words_ids=[[5], [6, 7]]))
    assert (taken.repetition_penalty, taken.no_repeat_ngram_size, taken.bad_words_ids) == (1.2, 3, ((5,), (6, 7)))
