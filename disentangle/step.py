"""One optimisation step of Eq. 4 (paper §3.1): the autoencoder side (encoder, decoder,
classifier) minimises λ_M L_M + λ_G L_G + λ_C L_C, then the discriminator maximises L_G.

Kept apart from the loop so benchmarks and tests can drive single steps.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import losses
from .config import ModelConfig, TrainConfig
from .errors import RetrievalError
from .model import Discriminator, MixingAutoencoder


class Critic(nn.Module):
    """The discriminator scoring real and mixed images in one call (one DDP forward per step)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dsc = Discriminator(cfg)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dsc(real), self.dsc(fake)


def _ddp(module: nn.Module) -> DDP:
    """DDP without buffer broadcasts: the networks run several times per step, so batch-norm
    statistics stay rank-local (parameters are still averaged every step)."""
    with warnings.catch_warnings():  # torch >= 2.14 renames the option; the old one still works
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(module, broadcast_buffers=False)


class MixingTrainer:
    """The networks, their Adam optimisers and BEGAN's k: everything a checkpoint must carry."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, device: torch.device, distributed: bool = False):
        self.cfg, self.tc = cfg, tc
        torch.manual_seed(tc.seed)  # same initial weights on every rank
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        self.ae = MixingAutoencoder(cfg, tc.losses).to(device, memory_format=self.memory_format)
        self.critic = (Critic(cfg).to(device, memory_format=self.memory_format)
                       if "g" in tc.losses else None)
        # one fused kernel per optimiser step instead of one per parameter tensor (CUDA only)
        adam = dict(lr=tc.lr, betas=(tc.beta1, 0.999), fused=device.type == "cuda")
        self.opt_ae = torch.optim.Adam(self.ae.parameters(), **adam)
        self.opt_d = (torch.optim.Adam(self.critic.parameters(), **{**adam, "lr": tc.lr * tc.critic_lr_scale})
                      if self.critic else None)
        self.began_k = 0.0
        self.ae_step = _ddp(self.ae) if distributed else self.ae
        self.critic_step = _ddp(self.critic) if distributed and self.critic else self.critic
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if tc.bf16 and device.type == "cuda" else nullcontext())

    def state_dict(self) -> dict:
        return {"began_k": self.began_k,
                "models": {"autoencoder": self.ae.state_dict(),
                           "discriminator": self.critic.dsc.state_dict() if self.critic else None},
                "optimizers": {"autoencoder": self.opt_ae.state_dict(),
                               "discriminator": self.opt_d.state_dict() if self.opt_d else None}}

    def load_state_dict(self, state: dict) -> None:
        self.ae.load_state_dict(state["models"]["autoencoder"])
        self.opt_ae.load_state_dict(state["optimizers"]["autoencoder"])
        if self.critic:
            self.critic.dsc.load_state_dict(state["models"]["discriminator"])
            self.opt_d.load_state_dict(state["optimizers"]["discriminator"])
        self.began_k = state["began_k"]

    def set_lr(self, lr: float) -> None:
        """The autoencoder's learning rate; the critic's follows at critic_lr_scale times it."""
        for opt, scale in ((self.opt_ae, 1.0), (self.opt_d, self.tc.critic_lr_scale)):
            for group in opt.param_groups if opt else ():
                group["lr"] = lr * scale

    def _generator_losses(self, x1: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The losses of the autoencoder side, and the forward's outputs for the critic step."""
        cfg, values = self.cfg, {}
        o = self.ae_step(x1, x2, mask)
        if "x4" in o:
            values["loss_mix"] = losses.mixing_loss(o["x4"].float(), x1)
        if "rec" in o:  # the plain autoencoder's x1, or both inputs next to the mixing cycle
            target = torch.cat([x1, x2]) if self.ae.pair_rec else x1
            values["loss_rec"] = losses.mixing_loss(o["rec"].float(), target)
        if "f3" in o:
            values["loss_feat"] = losses.latent_cycle_loss(o["f3"].float(), o["f_mixed"].float(),
                                                           o["f_pair"].float())
        if self.ae.decorrelate:
            values["loss_xcov"] = losses.cross_chunk_correlation(o["f_pair"].float())
        if "cls" in o:
            values["loss_c"] = losses.classifier_loss(o["cls"].float(), mask)
        if self.critic:
            dsc = self.critic.dsc.requires_grad_(False)  # this side must not step the critic
            x3 = o["x3"]
            values["loss_g"] = (losses.began_energy(x3.float(), dsc(x3).float()) if cfg.gan == "began"
                                else losses.dcgan_generator_loss(dsc(x3).float()))
            dsc.requires_grad_(True)
        rec_weight = cfg.lambda_rec if self.ae.pair_rec else cfg.lambda_m
        values["loss_total"] = (cfg.lambda_m * values.get("loss_mix", 0)
                                + rec_weight * values.get("loss_rec", 0)
                                + cfg.lambda_g * values.get("loss_g", 0)
                                + cfg.lambda_c * values.get("loss_c", 0)
                                + cfg.lambda_feat * values.get("loss_feat", 0)
                                + cfg.lambda_xcov * values.get("loss_xcov", 0))
        return values, o

    def warmup_step(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """One plain-autoencoder step on both inputs (no mixing, GAN or classifier): the encoder
        and decoder learn to draw before the mixing objective starts (TrainConfig.warmup_steps).
        Runs outside DDP (the classifier has no gradient here), so gradients are averaged by hand."""
        x = torch.cat([x1, x2]).contiguous(memory_format=self.memory_format)
        with self.autocast:
            rec = losses.mixing_loss(self.ae.decoder(self.ae.encoder(x)).float(), x)
        self._descend(rec, average_by_hand=self.ae_step is not self.ae)
        return {"loss_rec": rec.detach(), "loss_total": rec.detach()}

    def _descend(self, total: torch.Tensor, average_by_hand: bool = False) -> None:
        """One Adam step of the autoencoder side on `total`; RetrievalError before touching any
        weight when it is not finite. average_by_hand: all-reduce the gradients outside DDP."""
        if not math.isfinite(total.item()):
            raise RetrievalError(f"the loss became {total.item()}")
        self.opt_ae.zero_grad(set_to_none=True)
        total.backward()
        if average_by_hand:
            world = torch.distributed.get_world_size()
            for p in self.ae.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        self.opt_ae.step()

    def step(self, x1: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """One autoencoder step then one discriminator step; returns the losses (detached).

        Raises RetrievalError before touching any weight when the loss is not finite.
        """
        x1 = x1.contiguous(memory_format=self.memory_format)
        x2 = x2.contiguous(memory_format=self.memory_format)
        with self.autocast:
            values, o = self._generator_losses(x1, x2, mask)
        self._descend(values["loss_total"])

        if self.critic:  # the discriminator tells real x1 (or its reconstruction) from mixed x3
            fake, real = o["x3"].detach(), o.get("critic_real", x1)
            with self.autocast:
                real_out, fake_out = self.critic_step(real, fake)
                if self.cfg.gan == "began":
                    e_real = losses.began_energy(real, real_out.float())
                    e_fake = losses.began_energy(fake, fake_out.float())
                    loss_d = losses.began_discriminator_loss(e_real, e_fake, self.began_k)
                else:
                    loss_d = losses.dcgan_discriminator_loss(real_out.float(), fake_out.float())
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            values["loss_d"] = loss_d
            if self.cfg.gan == "began":
                self.began_k = losses.began_k_update(self.began_k, e_real.item(), e_fake.item(),
                                                     self.cfg.began_gamma)
        return {k: v.detach() for k, v in values.items()}
