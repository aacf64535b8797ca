"""ListOps (Long Range Arena) in-project: generator, tokenizer, evaluator, and the SPION paper's model.

Generator rules (the public LRA generator, lra_benchmarks/data/listops.py):
  - operators MIN, MAX, MED (median), SM (sum mod 10) over digits 0-9 and sub-expressions,
    written as tokens `[MAX 4 3 [MIN 2 3 ] 1 0 ]` (the opening bracket is part of the operator
    token, each expression ends with `]`);
  - a node at depth < max_depth (the root has depth 1) is an operator with probability 0.25
    (LRA's VALUE_P), else a uniform digit; at max_depth it is always a digit;
  - an operator takes uniform randint(2, max_args) arguments; the operator is uniform;
  - the length is the number of tokens (operator tokens, digits and `]` count 1 each);
    LRA keeps trees with min_length < length < max_length (defaults 500, 2000, depth 10,
    10 args) and drops duplicates.
  - values: MIN, MAX; SM = sum % 10; MED = int(np.median(args)), i.e. the middle value for an
    odd count and floor((a + b) / 2) of the two middle values for an even count -- NOT the
    lower median: MED [1 4] = 2, MED [1 5] = 3.

Lengths here are INCLUSIVE: `listops_dataset(n, 501, 1999, seed)` is LRA's (500, 2000).
Sampling is LRA's rejection sampling (the exact length distribution, mean ~1050 tokens for
501-1999), made cheap by abandoning a tree as soon as it grows past max_len: a few thousand
examples take seconds. Deterministic for a given seed (Python's `random.Random`).

Vocabulary: 0 = pad, 1..10 = digits 0..9, 11..14 = `[MIN [MAX [MED [SM`, 15 = `]` (16 ids).

Model (`ListOpsTransformer`): the SPION/Skyformer LRA encoder as released for ListOps
(mlsys-lab-sogang/SPION models/model_transformer.py): learned token and position embeddings
(std 0.02), PRE-LN layers (x + Attn(LN(x)), x + FFN(LN(x))), GELU FFN, a final LayerNorm, mean
pooling, then Linear(d, ffn) -> ReLU -> Linear(ffn, 10). 4 layers, d_model 64, 2 heads x 32,
FFN 128, dropout 0.1. Differences from the release: mean pooling over the real tokens only
(the release averages over all positions, padding included, which makes the result depend on
the padded length), and no attention-probability dropout (the block-sparse op has none, so
dense and sparse variants are trained alike).

Attention is plain PyTorch (q/k/v/out nn.Linear, `F.scaled_dot_product_attention` with a
(B, 1, 1, S) boolean key-padding mask) so sparsecc can capture it. `model.set_layouts(LayoutSet)`
switches layers to `torch.ops.sparsecc.block_sparse_attention` directly (per-layer layouts,
names `layers.{i}.attn`); `model.attention_maps(ids)` returns each layer's softmax probabilities
averaged over batch and heads, computed in query chunks so L = 2048 fits in memory.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- vocabulary
MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25  # LRA: probability that a node above max_depth is an operator
PAD_ID = 0
TOKENS = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_TO_ID = {t: i for i, t in enumerate(TOKENS)}
VOCAB_SIZE = len(TOKENS)  # 16
NUM_CLASSES = 10
#: LRA ListOps: 500 < length < 2000 (inclusive 501..1999), padded to 2048 by SPION.
LRA_MIN_LEN, LRA_MAX_LEN, LRA_SEQ_LEN = 501, 1999, 2048

Tree = Union[int, tuple]  # a digit, or (operator, [children])


# ----------------------------------------------------------------------------- generator
class _TooLong(Exception):
    pass


def _grow(rng: random.Random, depth: int, max_depth: int, max_args: int, count: list, max_len: int) -> Tree:
    if depth < max_depth and rng.random() <= VALUE_P:
        n = rng.randint(2, max_args)
        count[0] += 2  # operator token and `]`
        if count[0] > max_len:
            raise _TooLong
        children = [_grow(rng, depth + 1, max_depth, max_args, count, max_len) for _ in range(n)]
        return (OPERATORS[rng.randrange(4)], children)
    count[0] += 1
    if count[0] > max_len:
        raise _TooLong
    return rng.randrange(10)


def generate_tree(rng: random.Random, max_depth: int = 10, max_args: int = 10,
                  max_len: Optional[int] = None) -> tuple[Optional[Tree], int]:
    """One LRA tree: (tree, length in tokens), or (None, partial length) once it passes max_len."""
    count = [0]
    try:
        tree = _grow(rng, 1, max_depth, max_args, count, max_len if max_len is not None else math.inf)
    except _TooLong:
        return None, count[0]
    return tree, count[0]


def tree_tokens(tree: Tree) -> list[str]:
    """Token strings of a tree, e.g. ['[MAX', '4', '3', ']']."""
    out: list[str] = []
    stack: list = [tree]
    while stack:
        t = stack.pop()
        if isinstance(t, str):
            out.append(t)
        elif isinstance(t, int):
            out.append(str(t))
        else:
            op, children = t
            out.append(op)
            stack.append(END)
            stack.extend(reversed(children))
    return out


def to_string(tree: Tree) -> str:
    return " ".join(tree_tokens(tree))


def parse(text: Union[str, Sequence[str]]) -> Tree:
    """Inverse of `to_string` (accepts a string or a token list)."""
    tokens = text.split() if isinstance(text, str) else list(text)
    stack: list[tuple[str, list]] = []
    root: Optional[Tree] = None
    for i, tok in enumerate(tokens):
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == END:
            if not stack:
                raise ValueError(f"unbalanced ']' at token {i} of {' '.join(tokens[:i + 1])!r}")
            node: Tree = stack.pop()
        elif tok.isdigit() and len(tok) == 1:
            node = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r} at position {i}; expected a digit, "
                             f"one of {OPERATORS} or ']'")
        if stack:
            stack[-1][1].append(node)
        elif root is None and i == len(tokens) - 1:
            root = node
        else:
            raise ValueError(f"tokens continue after a complete expression at position {i}")
    if stack or root is None:
        raise ValueError("incomplete ListOps expression (missing ']')")
    return root


def _apply(op: str, args: list[int]) -> int:
    if not args:
        raise ValueError(f"operator {op} has no arguments")
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == SUM_MOD:
        return sum(args) % 10
    if op == MED:  # int(np.median(args)): mean of the two middle values, truncated
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    raise ValueError(f"unknown operator {op!r}")


def evaluate(expr: Union[Tree, str, Sequence[str]]) -> int:
    """Value (0..9) of a tree, an expression string or a token list (iterative, any depth)."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, tuple):
        tokens = tree_tokens(expr)
    else:
        tokens = expr.split() if isinstance(expr, str) else list(expr)
        parse(tokens)  # validates
    stack: list[tuple[str, list[int]]] = []
    value = None
    for tok in tokens:
        if tok in OPERATORS:
            stack.append((tok, []))
        elif tok == END:
            op, args = stack.pop()
            v = _apply(op, args)
            if stack:
                stack[-1][1].append(v)
            else:
                value = v
        else:
            if stack:
                stack[-1][1].append(int(tok))
            else:
                value = int(tok)
    assert value is not None
    return value


def tokenize(expr: Union[str, Sequence[str], Tree]) -> list[int]:
    """Token ids of an expression string, token list or tree."""
    tokens = tree_tokens(expr) if isinstance(expr, (int, tuple)) else (
        expr.split() if isinstance(expr, str) else list(expr))
    try:
        return [TOKEN_TO_ID[t] for t in tokens]
    except KeyError as e:
        raise ValueError(f"unknown ListOps token {e.args[0]!r}; vocabulary is {TOKENS[1:]}") from None


def detokenize(ids: Union[Sequence[int], torch.Tensor]) -> str:
    """Expression string of token ids (padding dropped)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return " ".join(TOKENS[i] for i in ids if i != PAD_ID)


def listops_examples(n: int, min_len: int = LRA_MIN_LEN, max_len: int = LRA_MAX_LEN, seed: int = 0,
                     max_depth: int = 10, max_args: int = 10, max_tries: int = 10_000_000) -> list[tuple[Tree, int]]:
    """n distinct LRA trees with min_len <= length <= max_len (inclusive): [(tree, length)]."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = random.Random(seed)
    seen: set = set()
    out: list[tuple[Tree, int]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(
                f"found only {len(out)} of {n} ListOps trees with {min_len} <= length <= {max_len} in "
                f"{max_tries} tries (max_depth={max_depth}, max_args={max_args}); widen the length range "
                "or raise max_depth / max_args")
        tree, length = generate_tree(rng, max_depth, max_args, max_len)
        if tree is None or length < min_len:
            continue
        key = tuple(tokenize(tree))
        if key in seen:
            continue
        seen.add(key)
        out.append((tree, length))
    return out


def listops_dataset(n: int, min_len: int = LRA_MIN_LEN, max_len: int = LRA_MAX_LEN, seed: int = 0,
                    seq_len: Optional[int] = None, max_depth: int = 10,
                    max_args: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int64 [n, L], labels int64 [n], lengths int64 [n]); L = seq_len (default max_len).

    ids are right-padded with PAD_ID = 0. Lengths are inclusive: min_len <= length <= max_len.
    """
    L = max_len if seq_len is None else int(seq_len)
    if L < max_len:
        raise ValueError(f"seq_len={L} is shorter than max_len={max_len}; pad to at least max_len")
    examples = listops_examples(n, min_len, max_len, seed, max_depth, max_args)
    ids = torch.zeros(n, L, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    lengths = torch.empty(n, dtype=torch.long)
    for i, (tree, length) in enumerate(examples):
        ids[i, :length] = torch.tensor(tokenize(tree), dtype=torch.long)
        labels[i] = evaluate(tree)
        lengths[i] = length
    return ids, labels, lengths


# ----------------------------------------------------------------------------- model
class ListOpsAttention(nn.Module):
    """Multi-head self-attention: dense SDPA, or block-sparse when a layout is set.

    Key padding on the block-sparse path (`sparse_padding`):
      - "bias" (default): q and k get one extra dimension, 1 for queries and 0 / -1e9 for real /
        padded keys, so a padded key's logit is -1e9 * scale and its probability exactly 0 in
        fp32 (the op then needs no key_padding_mask). Same outputs and gradients for real tokens
        as "mask"; several times faster with the current CPU op, which runs one kernel call
        per batch item when given a key_padding_mask.
      - "mask": pass key_padding_mask to the op.
    """

    def __init__(self, d_model: int = 64, n_heads: int = 2):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.layout = None  # Optional[BlockLayout]; set through ListOpsTransformer.set_layouts
        self.sparse_padding = "bias"
        self._ell: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.collect_maps = False
        self.map_chunk_elements = 1 << 24
        self._map_sum: Optional[torch.Tensor] = None
        self._map_count = 0

    def set_layout(self, layout) -> None:
        self.layout = layout
        self._ell = {}

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, L, d); keep bool (B, L), True = real token."""
        B, L, _ = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if self.collect_maps:
            self._accumulate_map(q, k, keep)
        if self.layout is not None:
            nb = -(-L // self.layout.block_size)
            if nb not in self._ell:
                self._ell[nb] = self.layout.fit(L).ell()
            idx, cnt = self._ell[nb]
            scale = 1.0 / math.sqrt(self.head_dim)
            if self.sparse_padding == "mask":
                o = torch.ops.sparsecc.block_sparse_attention(
                    q, k, v, idx, cnt, self.layout.block_size, scale, False, keep)[0]
            else:  # "bias": padded keys get logit -1e9 through an extra q.k dimension (see class doc)
                neg = -3e4 if q.dtype == torch.float16 else -1e9
                one = q.new_ones(B, self.n_heads, L, 1)
                bias = (~keep).to(q.dtype).mul(neg)[:, None, :, None].expand(B, self.n_heads, L, 1)
                q2, k2 = torch.cat([q, one], -1), torch.cat([k, bias], -1)
                v2 = F.pad(v, (0, 1))
                o = torch.ops.sparsecc.block_sparse_attention(
                    q2, k2, v2, idx, cnt, self.layout.block_size, scale, False, None)[0][..., :self.head_dim]
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out(o.transpose(1, 2).reshape(B, L, -1))

    @torch.no_grad()
    def _accumulate_map(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor) -> None:
        """Add sum over batch and heads of softmax(q k^T / sqrt(d)) [L, L], in query chunks."""
        B, H, L, D = q.shape
        total = torch.zeros(L, L, dtype=torch.float32)
        chunk = max(1, self.map_chunk_elements // (B * H * L))
        bias = torch.zeros(B, 1, 1, L, dtype=torch.float32).masked_fill_(~keep[:, None, None, :], float("-inf"))
        kt = k.float().transpose(-1, -2)
        for s in range(0, L, chunk):
            scores = (q[:, :, s:s + chunk].float() @ kt) / math.sqrt(D) + bias
            total[s:s + chunk] = scores.softmax(-1).sum(dim=(0, 1))
        if self._map_sum is None or self._map_sum.shape != total.shape:
            self._map_sum, self._map_count = total, 0
        else:
            self._map_sum += total
        self._map_count += B * H


class ListOpsLayer(nn.Module):
    """Pre-LN encoder layer: x + Drop(Attn(LN(x))), then x + FFN(LN(x)) with GELU."""

    def __init__(self, d_model: int = 64, n_heads: int = 2, d_ff: int = 128, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = ListOpsAttention(d_model, n_heads)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.norm1(x), keep))
        return x + self.ffn(self.norm2(x))


class ListOpsTransformer(nn.Module):
    """SPION's ListOps encoder classifier; forward(ids (B, L) int64, PAD_ID = padding) -> logits (B, 10).

    Defaults are the paper's ListOps model: 4 layers, d_model 64, 2 heads x 32, FFN 128, learned
    positions for max_len = 2048 tokens, dropout 0.1.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, num_classes: int = NUM_CLASSES, max_len: int = LRA_SEQ_LEN,
                 d_model: int = 64, n_heads: int = 2, d_ff: int = 128, n_layers: int = 4, dropout: float = 0.1):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(ListOpsLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, num_classes))

    # -- layer names, as keys of a LayoutSet / of attention_maps()
    def attention_names(self) -> list[str]:
        return [f"layers.{i}.attn" for i in range(len(self.layers))]

    def attention_modules(self) -> dict[str, ListOpsAttention]:
        return {f"layers.{i}.attn": layer.attn for i, layer in enumerate(self.layers)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        keep = ids != PAD_ID
        x = self.tok(ids) + self.pos(torch.arange(L, device=ids.device))
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, keep)
        x = self.norm(x)
        w = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.head(pooled)

    # -- block-sparse path
    def set_layouts(self, layouts: Optional[Mapping], sparse_padding: str = "bias") -> None:
        """Per-layer block layouts (a LayoutSet keyed by `attention_names()`), or None for dense.

        Each layout covers the calibrated length (e.g. 2048 tokens) and is cropped to shorter
        batches with `BlockLayout.fit` (the cropped tiles only hold padding). Layers missing from
        the mapping stay dense. sparse_padding: "bias" or "mask" (see ListOpsAttention).
        """
        import sparsecc.ops.block_sparse_attention  # noqa: F401  (registers the op)

        if sparse_padding not in ("bias", "mask"):
            raise ValueError(f"sparse_padding must be 'bias' or 'mask', got {sparse_padding!r}")

        mods = self.attention_modules()
        if layouts is not None:
            unknown = set(layouts) - set(mods)
            if unknown:
                raise KeyError(f"layouts for unknown layers {sorted(unknown)}; this model has {sorted(mods)}")
        for name, mod in mods.items():
            mod.set_layout(None if layouts is None else layouts.get(name))
            mod.sparse_padding = sparse_padding

    @property
    def layouts(self) -> dict:
        return {n: m.layout for n, m in self.attention_modules().items() if m.layout is not None}

    # -- calibration
    @torch.no_grad()
    def attention_maps(self, batches: Union[torch.Tensor, Iterable[torch.Tensor]],
                       chunk_elements: int = 1 << 24) -> dict[str, torch.Tensor]:
        """{layer name: [L, L] softmax probabilities averaged over all batch items and heads}.

        `batches` is one ids tensor (B, L) or an iterable of them (all of the same L). Runs in
        eval mode through the DENSE path (layouts are ignored), computing the maps in query
        chunks of at most `chunk_elements` scores.
        """
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        mods = self.attention_modules()
        saved_layouts = {n: m.layout for n, m in mods.items()}
        was_training = self.training
        self.eval()
        try:
            for m in mods.values():
                m.layout, m.collect_maps, m.map_chunk_elements = None, True, chunk_elements
                m._map_sum, m._map_count = None, 0
            n_batches = 0
            for ids in batches:
                self(ids)
                n_batches += 1
            if not n_batches:
                raise ValueError("attention_maps needs at least one batch")
            return {n: m._map_sum / m._map_count for n, m in mods.items()}
        finally:
            for n, m in mods.items():
                m.layout, m.collect_maps, m._map_sum, m._map_count = saved_layouts[n], False, None, 0
            self.train(was_training)


def example_model(seq_len: int = 256, batch: int = 2, seed: int = 0) -> tuple[ListOpsTransformer, tuple]:
    """(model, (ids,)) factory for `sparsecc` tools: a fresh ListOps model and a real batch."""
    torch.manual_seed(seed)
    model = ListOpsTransformer(max_len=seq_len).eval()
    ids, _, _ = listops_dataset(batch, max(2, seq_len // 4), seq_len - 1, seed, seq_len=seq_len)
    return model, (ids,)
