"""The LDM hybrid loss of the autoencoder stages: L1 + perceptual + patch GAN + KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caldm.config import LossConfig
from caldm.nn.perceptual import PerceptualLoss


def kl_loss(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, 1)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var)
    return kl.flatten(1).sum(1).mean()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


class HybridLoss(nn.Module):
    """Reconstruction side of the LDM loss; the perceptual term is off without weights."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.perceptual = (
            PerceptualLoss(cfg.perceptual_weights_path) if cfg.perceptual_weights_path else None
        )

    def adversarial_active(self, step: int) -> bool:
        return self.cfg.adv_weight > 0 and step >= self.cfg.adv_start_step

    def forward(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        fake_logits: torch.Tensor | None = None,
        mu: torch.Tensor | None = None,
        log_var: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss parts and their weighted sum under ``"loss"``; all scalars."""
        parts: dict[str, torch.Tensor] = {"l1": (x - x_rec).abs().mean()}
        total = self.cfg.l1_weight * parts["l1"]
        if self.perceptual is not None and self.cfg.perceptual_weight > 0:
            parts["perceptual"] = self.perceptual(x.float(), x_rec.float())
            total = total + self.cfg.perceptual_weight * parts["perceptual"]
        if fake_logits is not None:
            parts["g_adv"] = -fake_logits.mean()
            total = total + self.cfg.adv_weight * parts["g_adv"]
        if mu is not None and log_var is not None:
            parts["kl"] = kl_loss(mu.float(), log_var.float())
            total = total + self.cfg.kl_weight * parts["kl"]
        parts["loss"] = total
        return parts
