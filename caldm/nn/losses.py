"""The LDM hybrid loss of the autoencoder stages: L1 + perceptual + patch GAN + KL.

The perceptual term (``model.loss.perceptual``) is one of:

- ``vgg``: LPIPS-style distance on VGG16 features (:mod:`caldm.nn.perceptual`), with weights
  the user provides (``perceptual_weights_path``); nothing is downloaded.
- ``ssim``: ``1 - SSIM`` (MONAI's :class:`~monai.losses.SSIMLoss`, Gaussian window). It compares
  local means, contrasts and structure, so unlike L1 it penalises a reconstruction that has
  lost the speckle's local contrast (too smooth); needs no weights.
- ``spectral``: L1 between the images' Fourier amplitudes (MONAI's
  :class:`~monai.losses.JukeboxLoss`): matches how much energy each frequency has, not where,
  so it rewards speckle of the right strength whatever its pattern. The default without VGG.
- ``none``.

``auto`` (the default) is ``vgg`` when a weights path is given, else ``spectral``.

With ``l1_lowpass_sigma`` the pixel term compares Gaussian-blurred images: anatomy (low
frequencies) is still paid for pixel by pixel, speckle (high frequencies) only by the spectral
and adversarial terms, so a decoder with noise inputs can draw it instead of its mean.

With ``column_weight`` the slice autoencoder also pays for fine column texture that does not come
from its noise inputs and is not in the real slice (:func:`shared_column_texture`): texture a
decoder paints as a function of the latent runs through every slice of a volume whose latents are
alike, and the en-face projection shows it as vertical lines.

The adversarial term has a fixed weight (``adv_weight``), or with ``adv_adaptive`` LDM's adaptive
one (:func:`adaptive_adversarial`), which keeps the GAN term as strong as the reconstruction terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caldm.config import LossConfig
from caldm.errors import ConfigError
from caldm.nn.perceptual import PerceptualLoss


def perceptual_kind(cfg: LossConfig) -> str:
    """The perceptual term in use: ``cfg.perceptual`` with ``auto`` resolved."""
    if cfg.perceptual_weight <= 0:
        return "none"
    if cfg.perceptual == "auto":
        return "vgg" if cfg.perceptual_weights_path else "spectral"
    if cfg.perceptual == "vgg" and not cfg.perceptual_weights_path:
        raise ConfigError(
            "model.loss.perceptual=vgg needs model.loss.perceptual_weights_path (VGG16 "
            "weights are never downloaded); or use ssim or spectral"
        )
    return cfg.perceptual


class SSIMDistance(nn.Module):
    """``1 - SSIM`` of images in [-1, 1]; the window shrinks for small images.

    Computed on [0, 1], SSIM's usual range: on [-1, 1] the luminance term, a ratio of local
    means, would blow up where the mean is near 0 (mid-grey).
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from monai.losses import SSIMLoss

        win = min(11, (min(x.shape[-2:]) - 1) | 1)  # odd, smaller than the image
        return SSIMLoss(spatial_dims=2, data_range=1.0, win_size=win)((x + 1) / 2, (y + 1) / 2)


class SpectralDistance(nn.Module):
    """L1 between Fourier amplitudes (MONAI's JukeboxLoss, orthonormal FFT)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from monai.losses import JukeboxLoss

        return JukeboxLoss(spatial_dims=2, fft_norm="ortho")(x, y)


def kl_loss(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, 1)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var)
    return kl.flatten(1).sum(1).mean()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_adversarial(
    rec: torch.Tensor, adv: torch.Tensor, x_rec: torch.Tensor, max_weight: float = 1e4
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDM's adaptive GAN weight ``w = |d rec / d x_rec| / |d adv / d x_rec|`` (detached) and
    the adversarial term to add to the loss, ``(w * adv, w)``.

    LDM takes the gradients at the decoder's last layer weights; here they are taken at the
    decoder's output, which every ZeRO stage keeps whole (ZeRO-3 partitions the weights). Both
    balance the two terms where they reach the decoder.

    The discriminator is backpropagated once, here: the returned term has the value ``w * adv``
    but reaches ``x_rec`` through ``d adv / d x_rec`` already computed (ZeRO-3 frees the
    discriminator's gathered weights after a backward pass, so a second one through it fails).
    Without a graph (validation) it is ``adv`` with ``w = 1``.
    """
    if not (rec.requires_grad and adv.requires_grad and x_rec.requires_grad):
        return adv, torch.ones((), device=adv.device)
    (g_rec,) = torch.autograd.grad(rec, x_rec, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adv, x_rec)
    w = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
    through = (x_rec * g_adv.detach()).sum()  # its gradient at x_rec is g_adv
    return w * (through + (adv.detach() - through.detach())), w


#: Columns of the moving average that high-passes a column profile (as ColumnPersistence's).
COLUMN_WINDOW = 5
#: Least real column-texture energy the column term divides by (images in [-1, 1]; speckle
#: averaged over 64-512 rows leaves about 1e-4-1e-3).
COLUMN_ENERGY_FLOOR = 1e-6


def column_texture(x: torch.Tensor, window: int = COLUMN_WINDOW) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, W)``: each image's column profile (its mean over depth) minus a
    moving average of ``window`` columns (border replicated): the texture finer than anatomy
    that an en-face projection keeps."""
    x = x if x.dtype == torch.float64 else x.float()
    profile = x.mean(dim=(1, 2))[:, None]  # (B, 1, W)
    left = window // 2  # scipy's uniform_filter1d placement, even windows too
    padded = F.pad(profile, (left, window - 1 - left), mode="replicate")
    smooth = F.avg_pool1d(padded, window, stride=1)
    return (profile - smooth)[:, 0]


def shared_column_texture(
    x: torch.Tensor, rec_a: torch.Tensor, rec_b: torch.Tensor
) -> torch.Tensor:
    """How far the column texture a decoder draws from the latent alone is from the real one.

    ``rec_a`` and ``rec_b`` decode the same latent with independent noise. Write a decode's
    column texture as ``d + n`` (``d`` fixed by the latent, ``n`` from the noise) and the real
    one as ``r``: ``mean((a - r) * (b - r))`` estimates ``|d - r|^2`` without bias, since the two
    draws' noise parts are independent. Unlike an L1 or L2 on one decode it does not pay for
    ``|n|^2``, so drawn speckle costs nothing, while a pattern drawn the same way whatever the
    noise costs as much as it differs from the real slice's. Its minimum is ``d = E[r | latent]``:
    vessel shadows the latent knows, not speckle it cannot. Divided by the real texture's
    energy (1.0 for a decoder with no latent-driven texture on unpredictable speckle).
    """
    r = column_texture(x)
    shared = ((column_texture(rec_a) - r) * (column_texture(rec_b) - r)).mean()
    # floored: a flat real batch (a blank scan, micro-batch 1) has no texture to divide by
    return shared / r.pow(2).mean().clamp_min(COLUMN_ENERGY_FLOOR)


#: Gaussian kernel of the low-pass pixel term cut at this many sigmas (MONAI's GaussianFilter).
LOWPASS_TRUNCATED = 3.0

class HybridLoss(nn.Module):
    """Reconstruction side of the LDM loss; ``perceptual_kind`` names the perceptual term."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.perceptual_kind = perceptual_kind(cfg)
        builders = {
            "vgg": lambda: PerceptualLoss(cfg.perceptual_weights_path),
            "ssim": SSIMDistance,
            "spectral": SpectralDistance,
        }
        build = builders.get(self.perceptual_kind)
        self.perceptual = build() if build is not None else None
        self.lowpass = None
        if cfg.l1_lowpass_sigma > 0:
            from monai.networks.layers import GaussianFilter

            self.lowpass = GaussianFilter(
                spatial_dims=2, sigma=cfg.l1_lowpass_sigma, truncated=LOWPASS_TRUNCATED
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
        diff = x - x_rec
        if self.lowpass is not None:
            # blur(x) - blur(x_rec), the border replicated: zeros there would pay less for
            # the border columns, and the decoder drew strips into them
            r = int(max(self.cfg.l1_lowpass_sigma * LOWPASS_TRUNCATED, 0.5) + 0.5)  # MONAI's tail
            padded = F.pad(diff.float(), (r, r, r, r), mode="replicate")
            diff = self.lowpass(padded)[..., r : padded.shape[-2] - r, r : padded.shape[-1] - r]
        parts: dict[str, torch.Tensor] = {"l1": diff.abs().mean()}
        total = self.cfg.l1_weight * parts["l1"]
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(x.float(), x_rec.float())
            total = total + self.cfg.perceptual_weight * parts["perceptual"]
        if fake_logits is not None:
            parts["g_adv"] = adv = -fake_logits.mean()
            if self.cfg.adv_adaptive:
                adv, w = adaptive_adversarial(total, adv, x_rec)
                parts["adv_weight"] = self.cfg.adv_weight * w
            total = total + self.cfg.adv_weight * adv
        if mu is not None and log_var is not None:
            parts["kl"] = kl_loss(mu.float(), log_var.float())
            total = total + self.cfg.kl_weight * parts["kl"]
        parts["loss"] = total
        return parts
