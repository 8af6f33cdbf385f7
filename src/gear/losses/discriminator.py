"""PatchGAN discriminator (pix2pix's N-layer design) and the hinge GAN losses.

With kernel 4 and padding 1, each stride-2 conv halves an even size and each of the last two stride-1 convs
shrinks it by one: a side of ``s`` gives a patch map of side ``s / 2**n_layers - 2``. With 3 layers a 256 px
image gives 30x30 logits, a 32 px image 2x2; the smallest accepted side is ``3 * 2**n_layers`` (24 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchGANDiscriminator(nn.Module):
    """Conv(4, s2) - LReLU; (n_layers - 1) x [Conv(4, s2) - BN - LReLU]; Conv(4, s1) - BN - LReLU; Conv(4, s1) -> 1."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1 or channels < 1 or in_channels < 1:
            raise ValueError(f"need in_channels, channels, n_layers >= 1, got {in_channels}, {channels}, {n_layers}")
        self.in_channels, self.n_layers = in_channels, n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, n_layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            # No conv bias where BatchNorm follows: its shift makes the bias redundant.
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def min_size(self) -> int:
        return 3 * 2**self.n_layers

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, 1, h, w) real/fake logits, one per overlapping patch."""
        if images.ndim != 4 or images.shape[1] != self.in_channels or min(images.shape[-2:]) < self.min_size():
            raise ValueError(
                f"discriminator expects (B, {self.in_channels}, H, W) images with H, W >= {self.min_size()}, "
                f"got {tuple(images.shape)}"
            )
        return self.main(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: |grad rec_loss| / |grad g_loss| at the decoder's last layer weight, clamped, detached.

    Both losses must still have their graphs (this uses ``retain_graph=True``).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
