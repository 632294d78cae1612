"""The losses of paper §3.1: mixing cycle L_M (Eq. 1), adversarial L_G (Eq. 2, DCGAN or BEGAN),
cooperative chunk classification L_C (Eq. 3, with its typo fixed: the second term is
(1 − m)·log(1 − y))."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mixing_loss(x4: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """L_M: squared L2 between the unmixed image and the original (mean over pixels)."""
    return F.mse_loss(x4, x1)


def latent_cycle_loss(f3: torch.Tensor, target: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """MUNIT's latent reconstruction: mean squared error between the mixed image's features and
    the mixed code, over the mean per-dimension variance of the batch's features, so that
    shrinking every feature cannot lower it."""
    scale = features.flatten(1).var(0).mean().clamp_min(1e-8)
    return F.mse_loss(f3, target) / scale


def cross_chunk_correlation(features: torch.Tensor) -> torch.Tensor:
    """XCov: the mean squared Pearson correlation over the batch between every dimension of a
    chunk and every dimension of every other chunk; features (B, chunks, dim)."""
    b, chunks, dim = features.shape
    z = features.flatten(1)
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-6)
    corr = z.T @ z / (b - 1)
    chunk = torch.arange(chunks, device=z.device).repeat_interleave(dim)  # each column's chunk
    return corr[chunk[:, None] != chunk[None, :]].square().mean()


def classifier_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_C: per-chunk binary cross-entropy; the target is 1 where the chunk came from x1."""
    target = mask.to(logits.dtype).expand_as(logits)  # a per-batch mask applies to every pair
    return F.binary_cross_entropy_with_logits(logits, target)


def dcgan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator side of Eq. 2: make the discriminator call x3 real."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def dcgan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator side of Eq. 2: x1 real, x3 fake."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def began_energy(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """BEGAN's L(v) = |v − D(v)|, the discriminator autoencoder's L1 reconstruction error."""
    return (x - reconstruction).abs().mean()


def began_discriminator_loss(real_energy: torch.Tensor, fake_energy: torch.Tensor,
                             k: float) -> torch.Tensor:
    """L_D = L(x) − k_t·L(G)."""
    return real_energy - k * fake_energy


def began_k_update(k: float, real_energy: float, fake_energy: float, gamma: float,
                   lambda_k: float = 1e-3) -> float:
    """k_{t+1} = clip(k_t + λ_k (γ L(x) − L(G)), 0, 1), BEGAN's proportional control."""
    return min(max(k + lambda_k * (gamma * real_energy - fake_energy), 0.0), 1.0)
