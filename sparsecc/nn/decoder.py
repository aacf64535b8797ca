"""A small decoder-only causal LM with a full-sequence forward and an exportable decode step.

Two styles, chosen by `DecoderConfig.style`:
  "gpt2"   LayerNorm, learned positions, biases, FFN Linear -> GELU(tanh) -> Linear;
  "llama"  RMSNorm, rotary positions, no biases, SwiGLU FFN silu(gate(x)) * up(x) -> down.
Options: `sparse_qkv` (Scaling Transformers' multiplicative layer + convolutions
instead of dense Q/K/V, see `sparse_qkv.py`; `qkv_output` picks what follows its
attention: nothing as released, a multiplicative layer, or a dense projection),
`sparse_loss` (the paper's sparse loss layer: a multiplicative vocabulary projection) and `sparse_ffn` (each FFN is a
`sparsecc.nn.sparse_ffn.SparseFFN`: the controller's masked dense product
in training, `sparsecc::sparse_ffn` at eval). Dense FFNs are written as plain
nn.Linear -> activation -> nn.Linear so sparsecc's region finder sees them.

Decoding uses a static, preallocated cache passed as tensors:
  k_cache, v_cache  (n_layers, B, n_heads, max_len, head_dim)
  conv_cache        (n_layers, B, 2, S, M)  (sparse QKV only: the last 2 positions' multiplicative outputs)
and `pos`, an int64 tensor of shape (1,) holding the index of the token being
fed. `step` is functional (returns new caches, mutates nothing) and has
static shapes, so `torch.export` / `sparsecc.compile` capture it as it is
(wrap the model in `DecodeStep`). Attention in a step reads all max_len cache
slots with a mask (slot < pos) plus the new token's own key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsecc.errors import LayoutError
from sparsecc.nn.sparse_qkv import CONTEXT, QKV_OUTPUTS, MultiplicativeDense, SparseQKV
from sparsecc.nn.sparse_ffn import SparseFFN, init_controller_from_activations

__all__ = ["CausalLM", "DecodeStep", "DecoderConfig", "FFN", "count_parameters", "empty_cache", "with_sparse_ffn"]

STYLES = ("gpt2", "llama")


@dataclass
class DecoderConfig:
    """Shape and options of `CausalLM`. qkv_modules = S for sparse QKV (0: d_model // 64, at least n_heads);
    qkv_output: the sparse QKV attention's output layer, one of QKV_OUTPUTS ("none" as trax releases it).
    sparse_loss = S > 0: the vocabulary projection is a `MultiplicativeDense` with S modules (the paper's
    sparse loss layer; S must divide vocab_size; the embedding is then not tied to it)."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 512
    style: str = "gpt2"
    sparse_qkv: bool = False
    qkv_modules: int = 0
    qkv_output: str = "none"
    sparse_ffn: bool = False
    ffn_n: int = 32
    ffn_d_lowrank: int = 64
    ffn_mask_at: str = "pre_activation"  # SparseFFN.mask_at: trax's gradient, or "post_activation" (sparsecc 0.1)
    sparse_loss: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise LayoutError(f"DecoderConfig.style: got {self.style!r}; expected one of {STYLES}")
        if self.d_model % self.n_heads:
            raise LayoutError(f"DecoderConfig: n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.qkv_output not in QKV_OUTPUTS:
            raise LayoutError(f"DecoderConfig.qkv_output: got {self.qkv_output!r}; expected one of {QKV_OUTPUTS}")
        if self.sparse_loss < 0 or (self.sparse_loss and self.vocab_size % self.sparse_loss):
            raise LayoutError(f"DecoderConfig.sparse_loss: got {self.sparse_loss} modules for vocab_size="
                              f"{self.vocab_size}; expected 0 (dense) or a divisor of vocab_size")
        if self.sparse_qkv and self.qkv_modules == 0:
            self.qkv_modules = max(self.d_model // 64, self.n_heads)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def bias(self) -> bool:
        return self.style == "gpt2"


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.style == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def empty_cache(cfg: DecoderConfig, batch: int = 1, max_len: Optional[int] = None,
                dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> tuple[torch.Tensor, ...]:
    """Zero decode caches for a model of config cfg: k, v (n_layers, B, H, max_len, head_dim) and, with
    sparse QKV, conv (n_layers, B, 2, S, M). max_len defaults to cfg.max_len."""
    max_len = cfg.max_len if max_len is None else max_len
    if max_len > cfg.max_len:
        raise LayoutError(f"cache max_len={max_len} exceeds the model's max_len={cfg.max_len}")
    kv = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.head_dim)
    caches = (torch.zeros(kv, dtype=dtype, device=device), torch.zeros(kv, dtype=dtype, device=device))
    if cfg.sparse_qkv:
        m = cfg.d_model // cfg.qkv_modules
        caches += (torch.zeros(cfg.n_layers, batch, CONTEXT, cfg.qkv_modules, m, dtype=dtype, device=device),)
    return caches


class FFN(nn.Module):
    """Dense FFN: up -> GELU(tanh) -> down ("gpt2") or down(silu(gate(x)) * up(x)) ("llama")."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gated = cfg.style == "llama"
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if self.gated else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    @property
    def activation(self) -> str:
        return "silu" if self.gated else "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))

    def to_sparse(self, n: int, d_lowrank: int, calibration: Optional[torch.Tensor] = None,
                  steps: int = 300, mask_at: str = "pre_activation") -> SparseFFN:
        """A `SparseFFN` with copies of these weights; its controller is distilled on `calibration`
        (this FFN's inputs, (..., d_model)) when given, random otherwise."""
        controller = None
        if calibration is not None:
            controller = init_controller_from_activations(
                self.up.weight, self.up.bias, calibration, n, d_lowrank, activation=self.activation,
                w_gate=None if self.gate is None else self.gate.weight,
                b_gate=None if self.gate is None else self.gate.bias, steps=steps).controller
        return SparseFFN.from_linears(self.up, self.down, gate=self.gate, n=n, d_lowrank=d_lowrank,
                                      activation=self.activation, controller=controller, mask_at=mask_at)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split form) of x (B, H, T, D) with cos/sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal self-attention with dense or sparse (multiplicative + conv) Q/K/V. The output projection is
    dense, except with sparse QKV, where cfg.qkv_output chooses it (none, multiplicative or dense)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rotary = cfg.n_heads, cfg.head_dim, cfg.style == "llama"
        d = cfg.d_model
        if cfg.sparse_qkv:
            self.qkv = SparseQKV(d, cfg.n_heads, cfg.qkv_modules, bias=cfg.bias)
        else:
            self.q_proj = nn.Linear(d, d, bias=cfg.bias)
            self.k_proj = nn.Linear(d, d, bias=cfg.bias)
            self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.o_proj: nn.Module = nn.Linear(d, d, bias=cfg.bias)
        if cfg.sparse_qkv and cfg.qkv_output == "mult":
            self.o_proj = MultiplicativeDense(d, d, cfg.qkv_modules, bias=cfg.bias)
        elif cfg.sparse_qkv and cfg.qkv_output == "none":
            self.o_proj = nn.Identity()
        self.sparse_qkv = cfg.sparse_qkv

    def _project(self, x: torch.Tensor, conv_cache: Optional[torch.Tensor]):
        if self.sparse_qkv:
            return self.qkv(x, conv_cache)
        b, t, _ = x.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), None

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
        """Full causal sequence: x (B, T, d_model) -> (B, T, d_model)."""
        q, k, v, _ = self._project(x, None)
        if self.rotary:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
             k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
             conv_cache: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          Optional[torch.Tensor]]:
        """One token x (B, 1, d_model) against this layer's cache (B, H, max_len, D); mask (1, max_len + 1)
        bool. Returns the output and the new key, value (B, H, 1, D) and conv cache."""
        q, k, v, conv_cache = self._project(x, conv_cache)
        if self.rotary:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys = torch.cat([k_cache, k], dim=2)
        values = torch.cat([v_cache, v], dim=2)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self._out(o), k, v, conv_cache


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + ffn(norm(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg)
        ffn = FFN(cfg)
        self.ffn: nn.Module = (ffn.to_sparse(cfg.ffn_n, cfg.ffn_d_lowrank, mask_at=cfg.ffn_mask_at)
                               if cfg.sparse_ffn else ffn)

    def forward(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.ffn(self.norm2(x))

    def step(self, x, cos, sin, k_cache, v_cache, mask, conv_cache):
        a, k, v, conv_cache = self.attn.step(self.norm1(x), cos, sin, k_cache, v_cache, mask, conv_cache)
        x = x + a
        return x + self.ffn(self.norm2(x)), k, v, conv_cache


class CausalLM(nn.Module):
    """Decoder-only LM: `forward(ids)` -> logits (B, T, vocab); `step(...)` decodes one token (see module doc)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.style == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.lm_head: nn.Module = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.sparse_loss:
            self.lm_head = MultiplicativeDense(cfg.d_model, cfg.vocab_size, cfg.sparse_loss, bias=False)
        if cfg.style == "llama":
            half = cfg.head_dim // 2
            inv = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
            angles = torch.arange(cfg.max_len, dtype=torch.float64)[:, None] * inv
            self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
            self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self._init_weights()
        if cfg.tie_embeddings and not cfg.sparse_loss:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers)."""
        std = 0.02
        own_init = (".c1", ".c2", "qkv.d", "qkv.e", "qkv.bias", "o_proj.d", "o_proj.e",  # controller, multiplicative
                    "lm_head.d", "lm_head.e")
        for name, p in self.named_parameters():
            if name.endswith(own_init) or (p.dim() == 2 and name.endswith("o_proj.bias")):
                continue
            if p.dim() == 2:
                scale = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down.weight",
                                                                                  "w_out_t")) else std
                nn.init.normal_(p, 0.0, scale)
            elif p.dim() == 1 and name.endswith(("bias", "b_in", "b_out")) and "norm" not in name \
                    and "controller" not in name:
                nn.init.zeros_(p)

    def _rope(self, pos: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.cfg.style != "llama":
            return None, None
        return self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return x if self.pos_embed is None else x + self.pos_embed(pos)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, vocab), causal."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self._rope(pos)
        x = self._embed(input_ids, pos)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def empty_cache(self, batch: int = 1, max_len: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """Zero caches (k, v[, conv]) for `step`; max_len defaults to cfg.max_len."""
        return empty_cache(self.cfg, batch, max_len, dtype, self.embed.weight.device)

    def step(self, input_ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             conv_cache: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        """Decode one token per sequence: input_ids (B, 1), pos (1,) int64 (its position; the cache holds
        positions < pos). Returns (logits (B, 1, vocab), k_cache, v_cache[, conv_cache]), the caches new
        tensors with this token written at slot pos (the inputs are not modified)."""
        max_len = k_cache.shape[3]
        cos, sin = self._rope(pos)
        mask = torch.cat([torch.arange(max_len, device=pos.device) < pos,
                          torch.ones(1, dtype=torch.bool, device=pos.device)]).unsqueeze(0)
        x = self._embed(input_ids, pos)
        new_k, new_v, new_conv = [], [], []
        for i, layer in enumerate(self.layers):
            x, k, v, conv = layer.step(x, cos, sin, k_cache[i], v_cache[i], mask,
                                       None if conv_cache is None else conv_cache[i])
            new_k.append(k)
            new_v.append(v)
            new_conv.append(conv)
        logits = self.lm_head(self.norm(x))
        k_cache = k_cache.index_copy(3, pos, torch.stack(new_k))
        v_cache = v_cache.index_copy(3, pos, torch.stack(new_v))
        if conv_cache is None:
            return logits, k_cache, v_cache
        return logits, k_cache, v_cache, torch.stack(new_conv)


class DecodeStep(nn.Module):
    """`model.step` as a module's forward, for torch.export / sparsecc.compile."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    @property
    def cfg(self) -> DecoderConfig:
        return self.model.cfg

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                conv_cache: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        return self.model.step(input_ids, pos, k_cache, v_cache, conv_cache)


@torch.no_grad()
def _ffn_inputs(model: CausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's FFN input (B*T, d_model) on the full-sequence forward of ids."""
    rows: list[torch.Tensor] = []
    hooks = [layer.ffn.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
             for layer in model.layers]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return rows


def with_sparse_ffn(model: CausalLM, calibration_ids: Optional[torch.Tensor] = None, n: int = 32,
                    d_lowrank: int = 64, steps: int = 300) -> CausalLM:
    """A copy of a dense-FFN model whose FFNs are `SparseFFN`s (eval mode: `sparsecc::sparse_ffn`).

    With calibration_ids (B, T) each controller is distilled from its dense FFN's activations on
    that text (`init_controller_from_activations`); without, controllers are random (timing only).
    """
    if model.cfg.sparse_ffn:
        raise LayoutError("with_sparse_ffn: the model's FFNs are sparse already")
    was_training = model.training
    rows = _ffn_inputs(model.eval(), calibration_ids) if calibration_ids is not None else None
    model.train(was_training)
    out = copy.deepcopy(model)
    out.cfg = dataclasses.replace(model.cfg, sparse_ffn=True, ffn_n=n, ffn_d_lowrank=d_lowrank)
    for i, layer in enumerate(out.layers):
        layer.ffn = layer.ffn.to_sparse(n, d_lowrank, None if rows is None else rows[i], steps,
                                        mask_at=model.cfg.ffn_mask_at)
    return out.eval()
