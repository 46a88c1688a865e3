"""VQGAN training objective as in taming-transformers, minus LPIPS (no VGG weights can be downloaded here):
pixel L1/L2 reconstruction + codebook loss + hinge PatchGAN term with the adaptive weight, switched on at disc_start.

The discriminator uses GroupNorm instead of taming's BatchNorm: real and fake images go through it in separate
batches, so batch statistics would differ by class (a shortcut for D) and are noisy at the small per-GPU batches
a 256px VQGAN trains with; GroupNorm is batch-independent and behaves the same in train and eval.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.vqgan import Normalize


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix): 4x4 convs, stride 2 for the first n_layers, one logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       Normalize(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class RealFakeLogits(nn.Module):
    """The discriminator's step in one forward call: ``(D(x), D(xrec))`` on detached images, two passes of
    ``discriminator`` (not one batch of both: that would change the convolutions' batching and the numbers). One
    forward per backward is what DDP needs, so this is the module the training loop wraps for DDP; the generator's
    GAN term calls the bare discriminator (frozen: no gradients to average)."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(x.detach()), self.discriminator(xrec.detach())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class VQGANLoss(nn.Module):
    """Holds the discriminator (optimise ``self.discriminator`` with its own optimiser). Before ``disc_start`` both
    GAN terms are a constant 0 (no graph): skip the discriminator step while ``step < disc_start``."""

    def __init__(self, disc_start: int, disc_weight: float = 0.8, codebook_weight: float = 1.0,
                 pixel_l1_weight: float = 1.0, pixel_l2_weight: float = 0.0, disc_in_channels: int = 3,
                 disc_ndf: int = 64, disc_num_layers: int = 3):
        super().__init__()
        self.disc_start, self.disc_weight, self.codebook_weight = disc_start, disc_weight, codebook_weight
        self.pixel_l1_weight, self.pixel_l2_weight = pixel_l1_weight, pixel_l2_weight
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)

    @staticmethod
    def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer (taming)."""
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, qloss: torch.Tensor, step: int,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        rec_loss = (self.pixel_l1_weight * (x - xrec).abs().mean()
                    + self.pixel_l2_weight * (x - xrec).pow(2).mean())
        g_loss = d_weight = x.new_zeros(())
        if step >= self.disc_start:
            g_loss = -self.discriminator(xrec).mean()
            if torch.is_grad_enabled():  # no gradients to balance in evaluation
                d_weight = self.adaptive_weight(rec_loss, g_loss, last_layer) * self.disc_weight
        loss = rec_loss + self.codebook_weight * qloss.mean() + d_weight * g_loss
        logs = {"loss": loss, "rec_loss": rec_loss, "q_loss": qloss.mean(), "g_loss": g_loss, "d_weight": d_weight}
        return loss, {k: v.item() for k, v in logs.items()}

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor, step: int,
                           real_fake: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The hinge loss of D on real ``x`` and reconstructed ``xrec`` (both detached). ``real_fake``: a
        :class:`RealFakeLogits` of ``self.discriminator``, e.g. wrapped for DDP; default: an unwrapped one."""
        if step < self.disc_start:
            zero = x.new_zeros(())
            return zero, {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        logits_real, logits_fake = (real_fake if real_fake is not None else RealFakeLogits(self.discriminator))(x, xrec)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
                        "logits_fake": logits_fake.mean().item()}
