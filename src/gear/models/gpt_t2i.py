"""Text-conditioned autoregressive image generator (GEAR's text-to-image AR), built from gpt.py's pieces.

The sequence is T caption tokens followed by image tokens in raster order. The caption tokens are a frozen text
encoder's per-token features (B, T, text_dim) mapped to the model width by ``CaptionEmbedder``; they take the place
of the class token. What differs from the class-conditional GPT:

- attention mask (``prefix_mask``): image rows are causal and see every real caption token; caption rows are
  causal among caption tokens and never see image tokens; padded caption columns are masked for every row; every
  row keeps its diagonal, so a fully padded (empty) caption cannot give a NaN;
- positions: caption tokens get no rotary angle (their queries and keys pass unrotated), image tokens keep 2D RoPE;
- captions are padded on the LEFT (``TextCondition``), so the last prefix position, which predicts the first
  image token, is a real token, and a longer padding changes nothing the image tokens see;
- dual stream: the first ``dual_stream_layers`` blocks (-1: round(n_layer / 3)) have separate attention weights and
  pre-attention norm for caption tokens (``wqkv_text``, ``wo_text``, ``attention_norm_text``); feed-forwards and
  the other blocks are shared. Image-stream parameter names are the class-conditional GPT's;
- the empty caption's features (``null_features``, ``null_mask``: fixed buffers, saved with the weights) replace a
  caption under caption dropout and are the null branch of classifier-free guidance.

Logits and the tapped hidden state cover the image positions only (position t predicts image token t), as in GPT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gear.models.generators import register_generator
from gear.models.gpt import GPT, FeedForward, GPTConfig, GPTOutput, RMSNorm, apply_rope, rope_table
from gear.models.pretrained import Pretrained
from gear.models.sampling import KnownTokens, KVCache, LayerKVCache, check_sampling_args, decode
from gear.models.soft import SparseSoft


class TextCondition(NamedTuple):
    """Per-token caption features (B, T, D) and their mask (B, T) bool, True on real tokens.

    Padding is on the left: real tokens end at position T - 1. Padded features are zero by convention; the
    model never reads them."""

    features: Tensor
    mask: Tensor

    def to(self, device, non_blocking: bool = False) -> TextCondition:
        return TextCondition(self.features.to(device, non_blocking=non_blocking), self.mask.to(device, non_blocking=non_blocking))

    def chunk(self, n: int) -> list[TextCondition]:
        return [TextCondition(f, m) for f, m in zip(self.features.chunk(n), self.mask.chunk(n))]

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, index: Tensor | slice) -> TextCondition:
        return TextCondition(self.features[index], self.mask[index])

    @staticmethod
    def cat(items: list[TextCondition]) -> TextCondition:
        return TextCondition(torch.cat([c.features for c in items]), torch.cat([c.mask for c in items]))


def fit_left(cond: TextCondition, length: int) -> TextCondition:
    """The same captions with ``length`` positions: left padding added or removed (never a real token)."""
    T = cond.features.shape[1]
    if length >= T:
        pad = length - T
        return TextCondition(F.pad(cond.features, (0, 0, pad, 0)), F.pad(cond.mask, (pad, 0), value=False))
    if cond.mask[:, : T - length].any():
        raise ValueError(f"cannot fit captions of {int(cond.mask.sum(1).max())} tokens into {length} positions")
    return TextCondition(cond.features[:, T - length :], cond.mask[:, T - length :])


def prefix_mask(text_mask: Tensor, num_image: int) -> Tensor:
    """(B, 1, S, S) bool attention mask, True = attend, for S = T caption positions + num_image image positions.

    Causal over the whole sequence (so caption rows never see image columns), padded caption columns masked for
    every row, and the diagonal kept (a row of an empty caption attends to itself only)."""
    B, T = text_mask.shape
    S = T + num_image
    device = text_mask.device
    allowed = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    columns = torch.cat([text_mask.bool(), torch.ones(B, num_image, dtype=torch.bool, device=device)], dim=1)
    mask = allowed[None] & columns[:, None, :]
    return (mask | torch.eye(S, dtype=torch.bool, device=device))[:, None]


class CaptionEmbedder(nn.Module):
    """Text features -> model width: Linear (no bias), tanh-GELU, Linear (no bias), per token."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(features), approximate="tanh"))


class TextAttention(nn.Module):
    """Joint attention over [caption; image]; in a dual-stream block the caption rows use their own projections."""

    def __init__(self, cfg: GPTConfig, dual_stream: bool):
        super().__init__()
        self.n_head, self.head_dim, self.dim = cfg.n_head, cfg.head_dim, cfg.dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dual_stream = dual_stream
        if dual_stream:
            self.wqkv_text = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
            self.wo_text = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def _split(self, x: Tensor, n_text: int, text_layer: nn.Linear, image_layer: nn.Linear) -> Tensor:
        """Rows [0, n_text) through the caption stream's layer, the rest through the image stream's."""
        if not self.dual_stream or n_text == 0:
            return image_layer(x)
        if n_text == x.shape[1]:
            return text_layer(x)
        return torch.cat([text_layer(x[:, :n_text]), image_layer(x[:, n_text:])], dim=1)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, n_text: int,
                cache: LayerKVCache | None = None, start: int = 0) -> Tensor:
        B, S, _ = x.shape
        q, k, v = self._split(x, n_text, getattr(self, "wqkv_text", None), self.wqkv).split(self.dim, dim=-1)
        q = apply_rope(q.view(B, S, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(B, S, self.n_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v, _ = cache.update(start, k, v)  # the caption mask (given) replaces the cache's causal one
        # sdpa takes attention dropout as an argument, not as a module, hence the one use of self.training
        dropout_p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, S, self.dim)
        return self.resid_dropout(self._split(y, n_text, getattr(self, "wo_text", None), self.wo))


class TextBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, dual_stream: bool):
        super().__init__()
        self.attention = TextAttention(cfg, dual_stream)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if dual_stream:
            self.attention_norm_text = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, n_text: int,
                cache: LayerKVCache | None = None, start: int = 0) -> Tensor:
        normed = self.attention._split(x, n_text, getattr(self, "attention_norm_text", None), self.attention_norm)
        x = x + self.attention(normed, rope, mask, n_text, cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


def num_dual_stream(cfg: GPTConfig) -> int:
    return max(1, round(cfg.n_layer / 3)) if cfg.dual_stream_layers < 0 else cfg.dual_stream_layers


@register_generator("text")
class TextGPT(nn.Module, Pretrained):
    config_class = GPTConfig
    kind = "generator"

    # the image tokens' embedding and checks are the class-conditional GPT's
    embed_tokens = GPT.embed_tokens
    _check_tokens = GPT._check_tokens
    reset_parameters = GPT.reset_parameters
    num_params = GPT.num_params
    preset = GPT.preset  # gpt-t2i is one of GPT_PRESETS

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        if config.condition != "text":
            raise ValueError(f"TextGPT needs GPTConfig.condition='text', got {config.condition!r}")
        self.config = config
        self.cls_embedding = CaptionEmbedder(config.text_dim, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        dual = num_dual_stream(config)
        self.layers = nn.ModuleList(TextBlock(config, dual_stream=i < dual) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Image positions only; caption positions get the identity rotation (built per call for their count).
        self.register_buffer("freqs_cis", rope_table(config.grid_size, config.head_dim, config.rope_base, 0), persistent=False)
        # The empty caption: set from the text encoder before training (set_null_caption), saved with the weights.
        self.register_buffer("null_features", torch.zeros(config.text_len, config.text_dim))
        self.register_buffer("null_mask", torch.zeros(config.text_len, dtype=torch.bool))
        self.reset_parameters()

    # ------------------------------------------------------------------ condition

    def set_null_caption(self, null: TextCondition) -> None:
        """Store the empty caption's features (1, T, D) as the caption-dropout and CFG null condition."""
        null = fit_left(null.to(self.null_features.device), self.config.text_len)
        self.null_features.copy_(null.features[0])
        self.null_mask.copy_(null.mask[0])

    def null_condition(self, batch: int, length: int | None = None) -> TextCondition:
        null = TextCondition(self.null_features[None].expand(batch, -1, -1), self.null_mask[None].expand(batch, -1))
        return fit_left(null, length) if length is not None else null

    def drop_condition(self, cond: TextCondition, prob: float) -> TextCondition:
        """Caption dropout for CFG training: each caption becomes the empty caption with probability ``prob``
        (drawn from the global RNG, which the trainer seeds per step)."""
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {prob}")
        if prob == 0.0:
            return cond
        B, T = cond.mask.shape
        drop = torch.rand(B, device=cond.mask.device) < prob
        null = self.null_condition(B, T)
        return TextCondition(torch.where(drop[:, None, None], null.features.to(cond.features.dtype), cond.features),
                             torch.where(drop[:, None], null.mask, cond.mask))

    def _check_condition(self, cond: TextCondition, batch: int | None) -> None:
        cfg = self.config
        if not isinstance(cond, TextCondition):
            raise ValueError(f"a text-conditioned GPT takes a TextCondition(features, mask), got {type(cond).__name__}")
        f, m = cond
        if f.dim() != 3 or f.shape[0] == 0:
            raise ValueError(f"caption features must be float (B >= 1, T, {cfg.text_dim}), got {tuple(f.shape)}")
        if f.shape[2] != cfg.text_dim or not f.is_floating_point():
            raise ValueError(f"caption features must be float (B, T, {cfg.text_dim}), got {tuple(f.shape)} {f.dtype}")
        if not 1 <= f.shape[1] <= cfg.text_len:
            raise ValueError(f"captions hold {f.shape[1]} positions but the prefix takes 1..{cfg.text_len}")
        if m.shape != f.shape[:2] or m.dtype != torch.bool:
            raise ValueError(f"caption mask must be bool of shape {tuple(f.shape[:2])}, got {tuple(m.shape)} {m.dtype}")
        if batch is not None and f.shape[0] != batch:
            raise ValueError(f"{f.shape[0]} captions for a batch of {batch} token sequences")

    # ------------------------------------------------------------------ forward

    def embed_caption(self, text: TextCondition, dtype: torch.dtype) -> Tensor:
        """(B, T, dim) prefix tokens; padded positions embed zero features, whatever they held (even NaN)."""
        features = torch.where(text.mask[..., None], text.features, 0.0)
        return self.cls_embedding(features.to(dtype))

    def rope(self, n_text: int, n_image: int) -> Tensor:
        """(cos, sin) for n_text unrotated caption positions, then the first n_image image positions."""
        half = self.config.head_dim // 2
        identity = torch.zeros(n_text, half, 2, device=self.freqs_cis.device)
        identity[..., 0] = 1.0
        return torch.cat([identity, self.freqs_cis[:n_image]])

    def forward(
        self, tokens: Tensor | SparseSoft, text: TextCondition, *, tap_layer: int | None = None, stop_at_tap: bool = False
    ) -> GPTOutput:
        """Teacher-forced pass over [caption tokens] + tokens; tokens as in GPT.forward (0 <= T_img <= L - 1).

        Returns logits (B, T_img + 1, vocab) and the tapped hidden state (B, T_img + 1, dim) at the positions that
        predict image tokens 0..T_img (the last caption position, then each image token)."""
        batch = self._check_tokens(tokens, tap_layer, stop_at_tap)
        self._check_condition(text, batch)
        n_text = text.features.shape[1]
        image = self.embed_tokens(tokens)
        h = self.tok_dropout(torch.cat([self.embed_caption(text, image.dtype), image], dim=1))
        rope = self.rope(n_text, image.shape[1])
        mask = prefix_mask(text.mask, image.shape[1])
        hidden = None
        for i, layer in enumerate(self.layers, start=1):
            h = layer(h, rope, mask, n_text)
            if i == tap_layer:
                hidden = h[:, n_text - 1 :]
                if stop_at_tap:
                    return GPTOutput(logits=None, hidden=hidden)
        logits = self.output(self.norm(h[:, n_text - 1 :])).float()
        return GPTOutput(logits=logits, hidden=hidden)

    def forward_cached(self, x: Tensor, start: int, cache: KVCache, key_mask: Tensor, n_text: int) -> Tensor:
        """Incremental pass: embeddings x (B, S, dim) at positions [start, start + S) of [caption; image].

        ``key_mask`` (B, n_text + L) is True on real caption positions and on every image position. Returns float32
        logits (B, S, vocab)."""
        S = x.shape[1]
        end = start + S
        if end > n_text + self.config.seq_len:
            raise ValueError(f"positions up to {end} exceed the sequence length {n_text + self.config.seq_len}")
        rope = self.rope(n_text, self.config.seq_len)[start:end]
        rows = torch.arange(start, end, device=x.device)[:, None]
        cols = torch.arange(end, device=x.device)[None]
        mask = ((cols <= rows)[None] & key_mask[:, None, :end]) | (cols == rows)[None]
        h = self.tok_dropout(x)
        chunk_text = min(max(n_text - start, 0), S)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            h = layer(h, rope, mask[:, None], chunk_text, layer_cache, start)
        return self.output(self.norm(h)).float()

    @torch.inference_mode()
    def generate(
        self,
        text: TextCondition,
        *,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_token: Callable[[int, int], None] | None = None,
        known: KnownTokens | None = None,
    ) -> Tensor:
        """Sample (B, grid_size, grid_size) int64 token grids for captions; the empty caption is the CFG null.
        ``on_token(done, total)`` is called after each position (progress bars). ``known`` keeps the tokens under its
        mask and samples the rest (editing, gear.edit).

        The KV cache lives only inside this call; the model runs in eval mode and each module's flag is restored."""
        cfg = self.config
        device = self.tok_embeddings.weight.device
        self._check_condition(text, None)
        check_sampling_args(torch.zeros(len(text), dtype=torch.long), 1, temperature, top_k, top_p)
        text = text.to(device)
        if known is not None:
            known = known.flat(len(text), cfg.grid_size, cfg.vocab_size, device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        guided = cfg_scale != 1.0
        batch, n_text, length = len(text), text.features.shape[1], cfg.seq_len
        cond = TextCondition.cat([text, self.null_condition(batch, n_text)]) if guided else text
        key_mask = torch.cat([cond.mask, torch.ones(len(cond), length, dtype=torch.bool, device=device)], dim=1)
        tokens = torch.empty(batch, length, dtype=torch.long, device=device)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        cache = KVCache(cfg.n_layer, n_text + length - 1)  # the last token is never fed back

        def step(x: Tensor, t: int) -> Tensor:  # position t follows the caption (fed at t = 0) and t - 1 tokens
            return self.forward_cached(x, 0 if t == 0 else n_text + t - 1, cache, key_mask, n_text)[:, -1]

        try:
            decode(step, self.embed_caption(cond, self.tok_embeddings.weight.dtype), self.tok_embeddings, tokens,
                   cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                   on_token=on_token, known=known)
        finally:
            del cache
            for module, mode in modes:
                module.training = mode
        return tokens.view(batch, cfg.grid_size, cfg.grid_size)
