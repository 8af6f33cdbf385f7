"""Tokenizer training losses: perceptual distance and the PatchGAN discriminator with hinge losses."""

from gear.losses.discriminator import PatchGANDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from gear.losses.perceptual import LPIPS, PerceptualLoss, build_perceptual_loss

__all__ = [
    "LPIPS",
    "PatchGANDiscriminator",
    "PerceptualLoss",
    "adaptive_gan_weight",
    "build_perceptual_loss",
    "hinge_d_loss",
    "hinge_g_loss",
]
