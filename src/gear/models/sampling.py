"""Sampling token grids from a GPT with a key/value cache, classifier-free guidance, temperature, top-k, top-p.

The cache lives only inside one ``generate`` call; nothing is attached to the model. One step feeds one
position: the class token first, then each sampled token, so a grid of L tokens costs L steps.
With guidance (cfg_scale != 1) the batch is run twice as [cond; null] and the logits mixed as
``uncond + cfg_scale * (cond - uncond)``; cfg_scale == 1 is plain conditional sampling on the batch as is.

Editing (``KnownTokens``): positions whose token is known are still stepped and sampled, then the known token
replaces the sample before it is stored and fed back, so the cache holds exactly what a full pass over the edited
sequence would. A sampled token sees only the known tokens before it in raster order, never those after it.

``cfg_interval`` (LlamaGen's and GEAR's option) limits guidance to the first tokens: -1 guides every token; N >= 0
guides the prefill's token and the first N + 1 decoded after it, then samples the conditional logits alone (the null
half still runs, so its cache stays whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class LayerKVCache:
    """Keys and values of one attention layer, (B, H, max_len, head_dim), allocated on the first write.

    The first write fixes dtype and device, so the cache follows autocast (bf16 keys under bf16 autocast).
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store k, v (B, H, S, D) at positions [start, start + S); return all keys/values in [0, start + S) and
        the causal mask of the S queries over them (None for one query, which sees every key)."""
        S = k.shape[2]
        end = start + S
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions, cannot write up to {end}")
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        # is_causal aligns the mask top-left, which is wrong once keys outnumber queries
        mask = None if S == 1 else torch.ones(S, end, dtype=torch.bool, device=k.device).tril(start)
        return self.k[:, :, :end], self.v[:, :, :end], mask


class KVCache:
    """One LayerKVCache per transformer block."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layer)]


class StaticLayerKVCache(LayerKVCache):
    """A LayerKVCache for one position per step whose shapes never change: the position is a (1,) device tensor,
    the step writes there with ``index_copy_`` and attends over all ``max_len`` slots with a mask of those written
    so far. Slower per step than the growing view on a CPU; what a CUDA graph needs (one capture, every step)."""

    def update(self, start: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if k.shape[2] != 1:
            raise ValueError(f"a static cache takes one position per step, got {k.shape[2]}")
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k.index_copy_(2, start, k)
        self.v.index_copy_(2, start, v)
        seen = torch.arange(self.max_len, device=k.device) <= start  # (max_len,): positions written so far
        return self.k, self.v, seen.view(1, 1, 1, -1)


class StaticKVCache:
    """One StaticLayerKVCache per transformer block."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [StaticLayerKVCache(max_len) for _ in range(n_layer)]


class GraphedDecodeStep:
    """``step(x, t)``: logits (B, vocab) of one position, replayed from a CUDA graph captured once per ``generate``.

    Input embedding, position and logits live in static buffers; the sampling between steps stays outside the
    graph (its random draws must come from the caller's generator). The capture runs with autocast's weight cache
    off, as CUDA graphs require, so the bf16 casts of the weights are part of the replay.
    """

    def __init__(self, model: nn.Module, x: Tensor, max_len: int):
        self.cache = StaticKVCache(model.config.n_layer, max_len)
        self.x = x.clone()
        self.position = torch.zeros(1, dtype=torch.long, device=x.device)
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream before capture (allocates the cache)
                for _ in range(2):
                    model.forward_cached(self.x, self.position, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model.forward_cached(self.x, self.position, self.cache)[:, -1]

    def __call__(self, x: Tensor, t: int) -> Tensor:
        self.x.copy_(x)
        self.position.fill_(t)
        self.graph.replay()
        return self.logits


@dataclass(frozen=True)
class KnownTokens:
    """Token grids with some positions fixed: ``tokens`` (B, H, W) int64 and ``mask`` (B, H, W) bool, True where the
    token is kept; a (H, W) pair applies to every row of the batch. Values under a False mask are ignored."""

    tokens: Tensor
    mask: Tensor

    def flat(self, batch: int, grid_size: int, vocab_size: int, device: torch.device) -> KnownTokens:
        """Checked and flattened to (batch, grid_size ** 2) on ``device``, in raster order; ValueError otherwise."""
        tokens, mask = self.tokens, self.mask
        if tokens.shape != mask.shape or tokens.dtype != torch.long or mask.dtype != torch.bool:
            raise ValueError(f"known tokens must be int64 and their mask bool, of one shape, got {tuple(tokens.shape)} "
                             f"{tokens.dtype} and {tuple(mask.shape)} {mask.dtype}")
        if tokens.shape[-2:] != (grid_size, grid_size) or tokens.dim() not in (2, 3) or (
                tokens.dim() == 3 and tokens.shape[0] != batch):
            raise ValueError(f"known tokens must be ({batch}, {grid_size}, {grid_size}) or ({grid_size}, {grid_size}), "
                             f"got {tuple(tokens.shape)}")
        kept = tokens[mask]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab_size):
            raise ValueError(f"known tokens must be codes in [0, {vocab_size}), got values outside")
        length = grid_size * grid_size
        return KnownTokens(tokens.to(device).reshape(-1, length).expand(batch, length),
                           mask.to(device).reshape(-1, length).expand(batch, length))


def sample_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one index per row of logits (B, vocab) -> (B,) int64.

    top_k = 0 and top_p = 1.0 switch those filters off. Top-p keeps the smallest set of most likely
    tokens whose probability reaches top_p (always at least one); it applies after top-k.
    """
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    labels: Tensor,
    *,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    cuda_graph: bool | None = None,
    known: KnownTokens | None = None,
) -> Tensor:
    """Sample (B, grid_size, grid_size) int64 token grids from a class-conditional GPT (gear.models.gpt) for class
    labels (B,) in [0, num_classes].

    ``seed`` seeds a local generator on the model's device (the global RNG is not touched); without a
    seed the global RNG is used. ``on_token(done, total)`` is called after each position (progress bars). The
    model runs in eval mode (no dropout) for the call; each module's train/eval flag is restored afterwards.
    ``cuda_graph`` (default: on CUDA) replays every decode step from one CUDA graph (``GraphedDecodeStep``); on a
    CPU the growing cache runs eagerly. ``known`` fixes some positions of every grid (editing: see the module doc).
    """
    cfg = model.config
    device = model.tok_embeddings.weight.device
    check_sampling_args(labels, cfg.num_classes, temperature, top_k, top_p)
    if cfg_interval < -1:
        raise ValueError(f"cfg_interval must be >= -1 (-1 = guidance on every token), got {cfg_interval}")
    labels = labels.to(device)
    if known is not None:
        known = known.flat(labels.shape[0], cfg.grid_size, cfg.vocab_size, device)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    guided = cfg_scale != 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    batch, length = labels.shape[0], cfg.seq_len
    tokens = torch.empty(batch, length, dtype=torch.long, device=device)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    # The last token is never fed back: positions are the class token plus L - 1 tokens.
    max_len = cfg.cls_token_num + length - 1
    cache = step = None
    try:
        x = model.cls_embedding(cond)  # (B or 2B, 1, dim)
        if cuda_graph:
            step = GraphedDecodeStep(model, x, max_len)
        else:
            cache = KVCache(cfg.n_layer, max_len)
            step = lambda x, t: model.forward_cached(x, start=t, cache=cache)[:, -1]  # noqa: E731
        decode(step, x, model.tok_embeddings, tokens, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
               top_p=top_p, generator=generator, on_token=on_token, cfg_interval=cfg_interval, known=known)
    finally:
        del cache, step  # never outlive the call, even when sampling fails
        for module, mode in modes:
            module.training = mode
    return tokens.view(batch, cfg.grid_size, cfg.grid_size)


def decode(step: Callable[[Tensor, int], Tensor], x: Tensor, embed: Callable[[Tensor], Tensor], tokens: Tensor, *,
           cfg_scale: float, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
           on_token: Callable[[int, int], None] | None, cfg_interval: int = -1,
           known: KnownTokens | None = None) -> None:
    """The decode loop of every generator: ``step(x, t)`` gives the logits of position t (the condition's rows
    first, then one token), guidance mixes the conditional and null halves when ``cfg_scale`` != 1 (for
    t <= cfg_interval + 1 only when ``cfg_interval`` >= 0), the sampled token goes to ``tokens[:, t]`` and its
    embedding (twice when guided) is the next input. ``known`` (flattened, (B, L)) replaces the sample wherever its
    mask is set."""
    guided = cfg_scale != 1.0
    length = tokens.shape[1]
    for t in range(length):
        logits = step(x, t)
        if guided:
            cond_logits, uncond_logits = logits.chunk(2)
            if cfg_interval < 0 or t <= cfg_interval + 1:
                logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)
            else:
                logits = cond_logits
        nxt = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if known is not None:  # editing: a kept position takes its known token, which is also what is fed back
            nxt = torch.where(known.mask[:, t], known.tokens[:, t], nxt)
        tokens[:, t] = nxt
        if on_token is not None:
            on_token(t + 1, length)
        if t + 1 < length:
            x = embed(torch.cat([nxt, nxt]) if guided else nxt).unsqueeze(1)


def check_sampling_args(labels: Tensor, num_classes: int, temperature: float, top_k: int, top_p: float) -> None:
    if labels.dim() != 1 or labels.shape[0] == 0 or labels.dtype != torch.long:
        raise ValueError(f"labels must be a non-empty int64 tensor of shape (B,), got {tuple(labels.shape)} {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) > num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} = null class), got values outside")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p}")
