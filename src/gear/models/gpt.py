"""Class-conditional autoregressive image generator: a LlamaGen-style decoder-only transformer.

The sequence is one class token followed by image tokens in raster order. Blocks are pre-norm
(RMSNorm) with 2D rotary attention and a SwiGLU feed-forward. Parameter names and shapes follow the
released LlamaGen class-to-image checkpoints, so their state dicts load with ``load_state_dict``.

Two additions for GEAR:
- soft input: ``tokens`` may be a (B, T, vocab) assignment; its embedding is ``soft @ tok_embeddings.weight``,
  so gradients reach whatever produced the assignment. A ``SparseSoft`` (gear.models.soft: the k largest weights
  of each assignment and their indices) embeds to the same vectors without a (B, T, vocab) tensor or a vocab-sized
  matmul;
- a tap: the output of block ``tap_layer`` is returned for alignment, and ``stop_at_tap`` skips the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gear.models.generators import generator_class, register_generator
from gear.models.pretrained import Pretrained, preset_name, read_config
from gear.models.sampling import KnownTokens, KVCache, LayerKVCache, StaticKVCache, generate
from gear.models.soft import SparseSoft

CONDITIONS = ("class", "text")  # each has a generator class in gear.models.generators.GENERATORS


@dataclass
class GPTConfig:
    vocab_size: int = 16384
    grid_size: int = 16                  # tokens per side; sequence length L = grid_size ** 2 (raster order)
    num_classes: int = 1000              # class index num_classes is the null class (CFG)
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256               # SwiGLU hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    initializer_range: float = 0.02
    token_dropout: float = 0.1
    attn_dropout: float = 0.0
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1           # class (or caption) dropout for CFG, applied by the trainer through drop_condition()
    cls_token_num: int = 1
    # condition "text": per-token text features (B, T <= text_len, text_dim) replace the class token (gpt_t2i.py)
    condition: str = "class"             # class | text
    text_dim: int = 0                    # the text encoder's feature size
    text_len: int = 0                    # the longest caption prefix, in encoder tokens
    dual_stream_layers: int = -1         # first blocks with separate text attention and norm; -1 = round(n_layer / 3)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "grid_size", "num_classes", "dim", "n_layer", "n_head", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_head != 0:
            raise ValueError(f"GPTConfig.dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"head_dim = dim / n_head = {self.head_dim} must be divisible by 4 (2D RoPE rotates pairs, half per axis)"
            )
        if self.cls_token_num != 1:
            raise ValueError(f"cls_token_num must be 1 for a class-conditional GPT (one class token), got {self.cls_token_num}")
        for name in ("token_dropout", "attn_dropout", "resid_dropout", "ffn_dropout", "class_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"GPTConfig.condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.condition == "text":
            if self.text_dim < 1 or self.text_len < 1:
                raise ValueError(f"a text-conditioned GPT needs text_dim >= 1 and text_len >= 1, got {self.text_dim}, {self.text_len}")
            if not -1 <= self.dual_stream_layers <= self.n_layer:
                raise ValueError(f"GPTConfig.dual_stream_layers must be in [-1, n_layer={self.n_layer}], got {self.dual_stream_layers}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def seq_len(self) -> int:
        """Number of image tokens L."""
        return self.grid_size**2

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)


@dataclass
class GPTOutput:
    logits: Tensor | None   # (B, T+1, vocab) float32: position t predicts token t; None when stopped at the tap
    hidden: Tensor | None   # (B, T+1, dim): output of block `tap_layer` (before the final norm); None without a tap


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


# ----------------------------------------------------------------------------------------------
# 2D rotary position embedding


def rope_table(grid_size: int, head_dim: int, base: float, prefix: int) -> Tensor:
    """(cos, sin) per position and rotated pair: shape (prefix + grid_size**2, head_dim // 2, 2), float32.

    Pairs [0, head_dim/4) rotate with the token's row, pairs [head_dim/4, head_dim/2) with its column.
    The ``prefix`` (class token) rows are all zero, not the identity: that zeroes the class token's
    query and key, which is what the released checkpoints were trained with.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32) / half))  # (head_dim // 4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = torch.cat(
        [rows.reshape(-1, 1).float() * inv_freq, cols.reshape(-1, 1).float() * inv_freq], dim=-1
    )  # (L, half), raster order
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(prefix, half, 2), table])


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate consecutive pairs of x (B, S, H, D) by the angles in table (S, D // 2, 2); computed in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------
# modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dim = cfg.n_head, cfg.head_dim, cfg.dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: Tensor, rope: Tensor, cache: LayerKVCache | None = None, start: int | Tensor = 0) -> Tensor:
        B, S, _ = x.shape
        qkv = self.wqkv(x).view(B, S, 3 * self.n_head, self.head_dim)
        # queries and keys rotate in one call (half the elementwise launches of two)
        q, k = apply_rope(qkv[:, :, : 2 * self.n_head], rope).transpose(1, 2).split(self.n_head, dim=1)
        v = qkv[:, :, 2 * self.n_head :].transpose(1, 2)
        # sdpa takes attention dropout as an argument, not as a module, hence the one use of self.training
        dropout_p = self.attn_dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            k, v, mask = cache.update(start, k, v)  # keys/values up to start + S, and which of them each query sees
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, self.dim)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, cache: LayerKVCache | None = None, start: int | Tensor = 0) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


class LabelEmbedding(nn.Module):
    """Class label -> one class token. Row num_classes is the learned null class used for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


@register_generator("class")
class GPT(nn.Module, Pretrained):
    config_class = GPTConfig
    kind = "generator"

    def preset(self) -> str | None:
        return preset_name(self.config, GPT_PRESETS)

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        if config.condition != "class":
            raise ValueError(f"GPT is class-conditional; build a {config.condition!r}-conditioned model with generator_class(config)")
        self.config = config
        self.cls_embedding = LabelEmbedding(config.num_classes, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Not persistent: derived from the config, and LlamaGen checkpoints do not hold it either.
        table = rope_table(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num)
        self.register_buffer("freqs_cis", table, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        # As in LlamaGen: a zero output layer, so training starts from uniform next-token predictions.
        nn.init.zeros_(self.output.weight)

    @classmethod
    def from_pretrained(cls, directory, map_location: str | torch.device = "cpu") -> nn.Module:
        """A saved generator, as the class registered for its config's condition: a GPT, or a TextGPT."""
        config = read_config(directory, cls.kind, GPTConfig)
        return Pretrained.from_pretrained.__func__(generator_class(config), directory, map_location)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def drop_condition(self, labels: Tensor, prob: float) -> Tensor:
        """Class dropout for CFG training: each label becomes the null class with probability ``prob``."""
        return drop_labels(labels, prob, self.null_class)

    def forward(
        self, tokens: Tensor | SparseSoft, labels: Tensor, *, tap_layer: int | None = None, stop_at_tap: bool = False
    ) -> GPTOutput:
        """Teacher-forced pass over [class token] + tokens.

        tokens: (B, T) int64 indices, (B, T, vocab) float soft assignments, or a SparseSoft of (B, T, k)
        indices and weights; 0 <= T <= L - 1.
        labels: (B,) int64 in [0, num_classes] (num_classes = null class; the range is not checked here,
        to keep the forward free of device syncs).
        """
        self._check_inputs(tokens, labels, tap_layer, stop_at_tap)
        x = torch.cat([self.cls_embedding(labels), self.embed_tokens(tokens)], dim=1)
        h = self.tok_dropout(x)
        rope = self.freqs_cis[: h.shape[1]]
        hidden = None
        for i, layer in enumerate(self.layers, start=1):
            h = layer(h, rope)
            if i == tap_layer:
                hidden = h
                if stop_at_tap:
                    return GPTOutput(logits=None, hidden=hidden)
        logits = self.output(self.norm(h)).float()
        return GPTOutput(logits=logits, hidden=hidden)

    def embed_tokens(self, tokens: Tensor | SparseSoft) -> Tensor:
        """(B, T) indices -> table lookup; (B, T, vocab) soft assignment -> soft @ table; SparseSoft ->
        sum_k weights[..., k] * table[indices[..., k]]. Soft inputs are differentiable in their weights."""
        table = self.tok_embeddings.weight
        if isinstance(tokens, SparseSoft):
            B, T, k = tokens.indices.shape
            # embedding_bag sums the weighted rows without materializing the (B, T, k, dim) gather
            flat = F.embedding_bag(
                tokens.indices.reshape(B * T, k), table,
                per_sample_weights=tokens.weights.reshape(B * T, k).to(table.dtype), mode="sum",
            )
            return flat.view(B, T, -1)
        if tokens.dim() == 3:
            return tokens @ table
        return self.tok_embeddings(tokens)

    def forward_cached(self, x: Tensor, start: int | Tensor, cache: KVCache | StaticKVCache) -> Tensor:
        """Incremental pass for sampling: input embeddings x (B, S, dim) sit at positions [start, start + S).

        Reads the keys/values of earlier positions from ``cache`` and appends this chunk's.
        Returns float32 logits (B, S, vocab). ``start`` may be a one-element device tensor (one position, S = 1,
        a StaticKVCache): then nothing depends on its value on the host, so the step can be a CUDA graph.
        """
        if isinstance(start, Tensor):
            rope = self.freqs_cis.index_select(0, start)
        elif start + x.shape[1] > self.freqs_cis.shape[0]:
            raise ValueError(
                f"positions up to {start + x.shape[1]} exceed the sequence length {self.freqs_cis.shape[0]}"
            )
        else:
            rope = self.freqs_cis[start : start + x.shape[1]]
        h = self.tok_dropout(x)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            h = layer(h, rope, layer_cache, start)
        return self.output(self.norm(h)).float()

    def generate(
        self,
        labels: Tensor,
        *,
        cfg_scale: float = 1.0,
        cfg_interval: int = -1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_token: Callable[[int, int], None] | None = None,
        known: KnownTokens | None = None,
    ) -> Tensor:
        """Sample token grids (B, grid_size, grid_size) int64 for class labels (B,); see gear.models.sampling.
        ``known`` keeps the tokens under its mask and samples the rest (editing, gear.edit)."""
        return generate(self, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, on_token=on_token, known=known)

    def _check_inputs(
        self, tokens: Tensor | SparseSoft, labels: Tensor, tap_layer: int | None, stop_at_tap: bool
    ) -> None:
        batch = self._check_tokens(tokens, tap_layer, stop_at_tap)
        if labels.shape != (batch,) or labels.dtype != torch.long:
            raise ValueError(
                f"labels must be int64 of shape (B,) = ({batch},), got {tuple(labels.shape)} {labels.dtype}"
            )

    def _check_tokens(self, tokens: Tensor | SparseSoft, tap_layer: int | None, stop_at_tap: bool) -> int:
        """Checks the image tokens and the tap; returns the batch size."""
        cfg = self.config
        max_t = cfg.seq_len - 1
        if isinstance(tokens, SparseSoft):
            idx, w = tokens.indices, tokens.weights
            if idx.dim() != 3 or idx.dtype != torch.long or w.shape != idx.shape or not w.is_floating_point():
                raise ValueError(
                    f"SparseSoft needs int64 indices and float weights of the same shape (B, T<={max_t}, k), "
                    f"got {tuple(idx.shape)} {idx.dtype} and {tuple(w.shape)} {w.dtype}"
                )
            if idx.shape[-1] < 1:
                raise ValueError(f"SparseSoft needs k >= 1 codes per position, got shape {tuple(idx.shape)}")
        elif tokens.dim() == 2:
            if tokens.dtype != torch.long:
                raise ValueError(f"hard tokens must be int64 of shape (B, T<={max_t}), got dtype {tokens.dtype}")
        elif tokens.dim() == 3:
            if not tokens.is_floating_point() or tokens.shape[2] != cfg.vocab_size:
                raise ValueError(
                    f"soft tokens must be float of shape (B, T<={max_t}, vocab={cfg.vocab_size}), "
                    f"got {tuple(tokens.shape)} {tokens.dtype}"
                )
        else:
            raise ValueError(
                f"tokens must be (B, T) int64 or (B, T, {cfg.vocab_size}) float with T <= {max_t}, got shape {tuple(tokens.shape)}"
            )
        positions = tokens.indices.shape[1] if isinstance(tokens, SparseSoft) else tokens.shape[1]
        batch = tokens.indices.shape[0] if isinstance(tokens, SparseSoft) else tokens.shape[0]
        if positions > max_t:
            raise ValueError(
                f"tokens hold {positions} positions but at most L - 1 = {max_t} fit (B, T<={max_t}); "
                "pass tokens[:, :-1] when teacher forcing"
            )
        if tap_layer is not None and not 1 <= tap_layer <= cfg.n_layer:
            raise ValueError(f"tap_layer must be in [1, {cfg.n_layer}] (1-based block index), got {tap_layer}")
        if stop_at_tap and tap_layer is None:
            raise ValueError("stop_at_tap=True needs a tap_layer")
        return batch


def drop_labels(labels: Tensor, prob: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_class`` with probability ``prob`` (class dropout for CFG training)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {prob}")
    if prob == 0.0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


# ----------------------------------------------------------------------------------------------
# presets

_IMAGENET = dict(vocab_size=16384, grid_size=16, num_classes=1000)
_TINY = dict(vocab_size=512, grid_size=8, num_classes=10)

GPT_PRESETS: dict[str, GPTConfig] = {
    "gpt-b": GPTConfig(**_IMAGENET, n_layer=12, n_head=12, dim=768),      # 111M
    "gpt-l": GPTConfig(**_IMAGENET, n_layer=24, n_head=16, dim=1024),     # 343M
    "gpt-xl": GPTConfig(**_IMAGENET, n_layer=36, n_head=20, dim=1280),    # 775M
    "gpt-xxl": GPTConfig(**_IMAGENET, n_layer=48, n_head=24, dim=1536),   # 1.4B
    # CPU-sized, for an 8x8 token grid over a 512-code tokenizer and 10 classes
    "gpt-tiny": GPTConfig(**_TINY, n_layer=4, n_head=4, dim=128, multiple_of=32),
    "gpt-mini": GPTConfig(**_TINY, n_layer=6, n_head=8, dim=256, multiple_of=64),
    # GEAR's text-to-image AR: 300 prefix tokens of Qwen3-1.7B features (2048-d), 12 dual-stream blocks
    "gpt-t2i": GPTConfig(vocab_size=16384, grid_size=16, num_classes=1, n_layer=36, n_head=20, dim=1440,
                         condition="text", text_dim=2048, text_len=300),
}


def build_generator(preset: str, **overrides) -> nn.Module:
    """A fresh generator from a preset name, with config fields overridden by keyword: a GPT, or the class
    registered for the preset's condition (TextGPT for "gpt-t2i")."""
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown generator preset {preset!r}; valid presets: {sorted(GPT_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; valid keys: {sorted(fields)}")
    config = dataclasses.replace(GPT_PRESETS[preset], **overrides)
    return generator_class(config)(config)
