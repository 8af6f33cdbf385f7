"""Three quantizer families behind one interface: VQ (cosine codebook), LFQ (sign bits), IBQ.

Every quantizer maps a latent ``z`` of shape (B, C, h, w) to a ``QuantizerOutput``: the quantized
latent, the hard indices, and ``d`` of shape (B*h*w, K) chosen so that ``softmax(-d / T)`` is the
family's soft assignment over its K codes (``gear.models.soft``). GEAR feeds that soft assignment to the
generator, so ``d`` is differentiable with respect to ``z`` and (VQ, IBQ) the codebook.

``QUANTIZERS`` maps a family's name (``TokenizerConfig.quantizer``) to its ``Quantizer`` subclass; each family
checks its own settings (``check_settings``), for the config and for its constructor alike.

The quantizer math always runs in float32, even under autocast: nearest-code search and the
entropy softmax at temperature 0.01 are too sensitive for bf16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ENTROPY_EPS = 1e-5  # keeps log() finite for codes with zero batch-average probability


@dataclass
class QuantizerLosses:
    """Scalar losses as each family weights them (VQ and LFQ: beta on commitment; IBQ: see IndexBackpropQuantizer);
    entropy already multiplied by entropy_ratio."""

    codebook: Tensor
    commitment: Tensor
    entropy: Tensor

    @property
    def total(self) -> Tensor:
        return self.codebook + self.commitment + self.entropy


@dataclass
class QuantizerOutput:
    z_q: Tensor  # (B, C, h, w) quantized latent (straight-through to z where the family uses it)
    indices: Tensor  # (B, h, w) int64
    d: Tensor  # (B*h*w, K): softmax(-d / T) is the soft assignment
    losses: QuantizerLosses


class _Assignment(NamedTuple):
    z_q: Tensor  # (N, C) quantized latents
    indices: Tensor  # (N,) int64
    d: Tensor  # (N, K)
    codebook: Tensor  # scalar, as the family weights it
    commitment: Tensor  # scalar, as the family weights it


def global_mean(x: Tensor, dim: int = 0) -> Tensor:
    """Mean over ``dim`` and, under torch.distributed with world size > 1, over all ranks.

    The cross-rank sum is autograd-aware: its backward sums the gradients of all ranks, so each
    rank's local gradient is world_size times its share. DDP then averages gradients over ranks,
    which gives exactly the gradient of the global quantity.
    """
    mean = x.mean(dim)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        mean = _SumOverRanks.apply(mean) / dist.get_world_size()
    return mean


class _SumOverRanks(torch.autograd.Function):
    """Blocking all-reduce (sum) whose backward all-reduces the gradient.

    Written out rather than taken from ``torch.distributed.nn.functional`` (deprecated), whose
    asynchronous work objects could outlive the process group and abort gloo ranks at exit.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def entropy_loss(d: Tensor, temperature: float, ratio: float) -> Tensor:
    """ratio * (mean per-token entropy - entropy of the batch-average assignment).

    Minimising it makes each token confident while spreading the batch over many codes.
    """
    if ratio == 0:
        return d.new_zeros(())
    logits = -d / temperature
    logp = torch.log_softmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)  # not logp.exp(): exp is ~10x slower on the very negative logp at T = 0.01
    sample_entropy = -(probs * logp).sum(-1).mean()
    avg_probs = global_mean(probs, dim=0)
    batch_entropy = -(avg_probs * torch.log(avg_probs + ENTROPY_EPS)).sum()
    return ratio * (sample_entropy - batch_entropy)


def indices_to_bits(indices: Tensor, dim: int) -> Tensor:
    """Integer codes -> bool bits (..., dim); bit i is ``(index >> i) & 1`` (least significant first)."""
    powers = 2 ** torch.arange(dim, device=indices.device, dtype=torch.long)
    return (indices.long().unsqueeze(-1) & powers) != 0


def bits_to_indices(bits: Tensor) -> Tensor:
    """Bits (..., dim) (bool, or any value where > 0 means 1) -> int64 codes; inverse of indices_to_bits."""
    powers = 2 ** torch.arange(bits.shape[-1], device=bits.device, dtype=torch.long)
    return ((bits > 0).long() * powers).sum(-1)


def _full_precision(device: torch.device):
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class Quantizer(nn.Module):
    """Base of the quantizer families: input checks, (B, C, h, w) <-> (N, C) reshapes, the entropy term.

    A family implements ``_codes`` and ``_quantize``, extends ``check_settings`` with its own constraints, and is
    listed in ``QUANTIZERS``; ``build`` makes it from a tokenizer's settings (override it if the constructor
    takes others).
    """

    codebook_size: int
    code_dim: int

    def __init__(self, codebook_size: int, code_dim: int, beta: float, entropy_ratio: float, entropy_temperature: float):
        super().__init__()
        self.check_settings(codebook_size, code_dim, beta, entropy_ratio, entropy_temperature)
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.entropy_ratio = entropy_ratio
        self.entropy_temperature = entropy_temperature

    @classmethod
    def check_settings(cls, codebook_size: int, code_dim: int, beta: float, entropy_ratio: float,
                       entropy_temperature: float) -> None:
        """Raise ValueError unless this family can be built with these settings (``TokenizerConfig`` calls it too)."""
        if codebook_size < 2 or code_dim < 1:
            raise ValueError(f"need codebook_size >= 2 and code_dim >= 1, got {codebook_size} and {code_dim}")
        if beta < 0 or entropy_ratio < 0 or entropy_temperature <= 0:
            raise ValueError(
                "need beta (commitment_beta) >= 0, entropy_ratio >= 0, entropy_temperature > 0; "
                f"got {beta}, {entropy_ratio}, {entropy_temperature}"
            )

    @classmethod
    def build(cls, codebook_size: int, code_dim: int, beta: float = 0.25, entropy_ratio: float = 0.05,
              entropy_temperature: float = 0.01) -> Quantizer:
        """The family's quantizer from a tokenizer's settings."""
        return cls(codebook_size, code_dim, beta, entropy_ratio, entropy_temperature)

    def forward(self, z: Tensor, with_entropy: bool = True) -> QuantizerOutput:
        """Quantize ``z``; ``with_entropy=False`` skips the entropy term, whose batch average is a collective
        under torch.distributed (encoding on one rank alone must not wait for the others)."""
        if z.ndim != 4 or z.shape[1] != self.code_dim or not z.is_floating_point():
            raise ValueError(
                f"expected a float latent of shape (B, {self.code_dim}, h, w), got {tuple(z.shape)} {z.dtype}"
            )
        b, _, h, w = z.shape
        with _full_precision(z.device):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.code_dim)
            a = self._quantize(flat)
            ratio = self.entropy_ratio if with_entropy else 0.0
            entropy = entropy_loss(a.d, self.entropy_temperature, ratio)
        return QuantizerOutput(
            z_q=a.z_q.view(b, h, w, self.code_dim).permute(0, 3, 1, 2).to(z.dtype).contiguous(),
            indices=a.indices.view(b, h, w),
            d=a.d,
            losses=QuantizerLosses(codebook=a.codebook, commitment=a.commitment, entropy=entropy),
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 indices -> (B, code_dim, h, w), equal to the ``z_q`` they came from."""
        if indices.ndim != 3 or indices.dtype != torch.long:
            raise ValueError(f"expected int64 indices of shape (B, h, w), got {tuple(indices.shape)} {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]")
        return self._codes()[indices].permute(0, 3, 1, 2).contiguous()

    def _codes(self) -> Tensor:
        """(K, code_dim) code vectors as they appear in z_q."""
        raise NotImplementedError

    def _quantize(self, flat: Tensor) -> _Assignment:
        """(N, C) float32 latents -> quantized latents, indices, d and the weighted losses."""
        raise NotImplementedError


class VectorQuantizer(Quantizer):
    """Nearest code under cosine similarity: z and codes are L2-normalised, d = |z - e|^2 = 2 - 2 cos.

    ``codebook_used`` (65536 floats) exists only so that released VQ-16 checkpoints, which carry it, load
    strictly; it is never updated: a forward pass changes no state (usage is tracked by the trainer).
    """

    USAGE_WINDOW = 65536

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        entropy_ratio: float = 0.05,
        entropy_temperature: float = 0.01,
    ):
        super().__init__(codebook_size, code_dim, beta, entropy_ratio, entropy_temperature)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.full((self.USAGE_WINDOW,), -1.0))

    def _codes(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def _quantize(self, flat: Tensor) -> _Assignment:
        z = F.normalize(flat, dim=-1)
        codes = self._codes().float()
        d = 2 - 2 * z @ codes.t()  # both unit-norm; normalize's Jacobian removes the norms' gradient too
        indices = d.argmin(-1)
        hard = codes[indices]
        codebook = F.mse_loss(hard, z.detach())
        commitment = self.beta * F.mse_loss(hard.detach(), z)
        return _Assignment(z + (hard - z).detach(), indices, d, codebook, commitment)


class LookupFreeQuantizer(Quantizer):
    """Sign quantization: the implicit codebook is {-1, +1}^dim, a code's index is its bits.

    d = -2 <z, c> over all 2^dim codes, so softmax(-d / T) = softmax(2 <z, c> / T) and its argmax
    is sign(z). z_q is sign(z) with a straight-through gradient; there is no codebook loss.
    """

    def __init__(
        self,
        code_dim: int,
        beta: float = 0.25,
        entropy_ratio: float = 0.05,
        entropy_temperature: float = 0.01,
    ):
        super().__init__(2**code_dim, code_dim, beta, entropy_ratio, entropy_temperature)
        all_codes = indices_to_bits(torch.arange(2**code_dim), code_dim).float() * 2 - 1
        self.register_buffer("codes", all_codes, persistent=False)

    @classmethod
    def check_settings(cls, codebook_size: int, code_dim: int, beta: float, entropy_ratio: float,
                       entropy_temperature: float) -> None:
        if not 1 <= code_dim <= 20:
            raise ValueError(f"LFQ code_dim must be in [1, 20] (2^dim codes are materialised), got {code_dim}")
        if codebook_size != 2**code_dim:
            raise ValueError(f"LFQ needs codebook_size == 2 ** code_dim (2 ** codebook_dim in a TokenizerConfig); "
                             f"got codebook_size={codebook_size}, code_dim={code_dim}")
        super().check_settings(codebook_size, code_dim, beta, entropy_ratio, entropy_temperature)

    @classmethod
    def build(cls, codebook_size: int, code_dim: int, beta: float = 0.25, entropy_ratio: float = 0.05,
              entropy_temperature: float = 0.01) -> LookupFreeQuantizer:
        cls.check_settings(codebook_size, code_dim, beta, entropy_ratio, entropy_temperature)
        return cls(code_dim, beta, entropy_ratio, entropy_temperature)

    def _codes(self) -> Tensor:
        return self.codes

    def _quantize(self, flat: Tensor) -> _Assignment:
        hard = torch.where(flat > 0, 1.0, -1.0).to(flat.dtype)
        indices = bits_to_indices(flat > 0)
        d = -2 * flat @ self.codes.t()
        commitment = self.beta * F.mse_loss(flat, hard)
        return _Assignment(flat + (hard - flat).detach(), indices, d, flat.new_zeros(()), commitment)


class IndexBackpropQuantizer(Quantizer):
    """Index backpropagation: logits <z, e_k>, hard argmax forward, softmax(logits) backward.

    z_q equals e[argmax] in value while its gradient flows through the soft assignment, so every
    code receives gradient. d = -logits. Losses follow the IBQ paper: ``codebook`` holds
    beta * |e[argmax] - sg(z)|^2 plus the straight-through term |z_q - z|^2 (it trains both the
    codebook and the encoder), ``commitment`` holds |sg(e[argmax]) - z|^2 (unweighted, as in IBQ).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        entropy_ratio: float = 0.05,
        entropy_temperature: float = 0.01,
    ):
        super().__init__(codebook_size, code_dim, beta, entropy_ratio, entropy_temperature)
        self.embedding = nn.Embedding(codebook_size, code_dim)  # default N(0, 1) init, as IBQ

    def _codes(self) -> Tensor:
        return self.embedding.weight

    def _quantize(self, flat: Tensor) -> _Assignment:
        codes = self._codes().float()
        logits = flat @ codes.t()
        indices = logits.argmax(-1)
        hard = codes[indices]
        soft = torch.softmax(logits, dim=-1)
        # Value: hard (the added term is exactly zero); gradient: through the soft assignment.
        z_q = hard + (soft - soft.detach()) @ codes
        codebook = self.beta * F.mse_loss(hard, flat.detach()) + F.mse_loss(z_q, flat)
        commitment = F.mse_loss(hard.detach(), flat)
        return _Assignment(z_q, indices, -logits, codebook, commitment)


QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "lfq": LookupFreeQuantizer,
    "ibq": IndexBackpropQuantizer,
}


def build_quantizer(
    kind: str,
    codebook_size: int,
    code_dim: int,
    beta: float = 0.25,
    entropy_ratio: float = 0.05,
    entropy_temperature: float = 0.01,
) -> Quantizer:
    """Quantizer by family name (a key of ``QUANTIZERS``); for "lfq" codebook_size must be 2 ** code_dim."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {kind!r}; expected one of {tuple(QUANTIZERS)}")
    return QUANTIZERS[kind].build(codebook_size, code_dim, beta, entropy_ratio, entropy_temperature)
