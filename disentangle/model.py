"""The networks of paper §3.1: encoder, decoder, discriminator, chunk classifier, and the
mixing/unmixing cycle (Figure 1).

Normalisation follows the authors' released code unless a preset says otherwise (ModelConfig.norm,
.dsc_norm): instance norm in the encoder and decoder, batch norm in the discriminator and classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from . import architecture
from .config import ModelConfig


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> feature (B, n_chunks, chunk_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_chunks, self.chunk_dim = cfg.n_chunks, cfg.chunk_dim
        # the authors add a LeakyReLU after the encoder's last linear layer
        self.net, out = architecture.build(
            architecture.parse(cfg.encoder), (3, cfg.image_size, cfg.image_size), cfg.feature_dim,
            norm=cfg.norm, activation=cfg.activation, final_activation="lrelu")
        if out != (cfg.feature_dim,):
            raise ValueError(f"{cfg.name}: encoder gives {out}, expected ({cfg.feature_dim},)")
        # chunks narrower than chunk_dim: their last numbers are held at 0 (not saved: it follows
        # from the config, and checkpoints from before the option load unchanged)
        widths = cfg.chunk_widths or (cfg.chunk_dim,) * cfg.n_chunks
        used = torch.arange(cfg.chunk_dim) < torch.tensor(widths)[:, None]
        self.register_buffer("used", used.float() if not used.all() else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x).view(-1, self.n_chunks, self.chunk_dim)  # (B, chunks, dim)
        return f if self.used is None else f * self.used


class AffineWarp(nn.Module):
    """Feature -> a 2x3 affine map: the identity plus a small head's output, whose last layer
    starts at 0, so that a new decoder draws as it would without the warp."""

    def __init__(self, features: int, hidden: int = 64):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 6))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)
        self.register_buffer("identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), persistent=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.identity + self.head(f.flatten(1)).view(-1, 2, 3)


class ChunkWarp(nn.Module):
    """`wc`: feature -> a 2x3 map that shifts, scales and turns, whose four numbers (x shift, y shift,
    log scale, turn) each come from one chunk alone (chunks 0, 1, 2, 3), through a small head
    per number whose last layer starts at 0 (the identity); the decoder's layers read only the
    other chunks (`layers_read`). Those four chunks then act on the image only through their
    own number of the map: where `w`'s shared head let one chunk hold position and size together,
    and the layers let the chunk that held size hold colour too, here each can hold one thing."""

    NUMBERS = 4

    def __init__(self, n_chunks: int, chunk_dim: int, features: int, hidden: int = 32):
        super().__init__()
        if n_chunks < self.NUMBERS:
            raise ValueError(f"wc reads its {self.NUMBERS} numbers from {self.NUMBERS} chunks; "
                             f"this model has {n_chunks}")
        self.heads = nn.ModuleList()
        for _ in range(self.NUMBERS):
            head = nn.Sequential(nn.Linear(chunk_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
            nn.init.zeros_(head[2].weight)
            nn.init.zeros_(head[2].bias)
            self.heads.append(head)
        # which feature numbers each head reads (chunk k's), and which the layers read (1) or not
        # (0), wherever `retrieval group` moves them
        self.register_buffer("reads", torch.arange(self.NUMBERS * chunk_dim).view(self.NUMBERS, chunk_dim))
        layers_read = torch.ones(features)  # a grouped model's feature is wider than the learned one
        layers_read[: self.NUMBERS * chunk_dim] = 0
        self.register_buffer("layers_read", layers_read)

    def numbers(self, f: torch.Tensor) -> torch.Tensor:
        """(B, 4): x shift, y shift, log scale and turn (radians) of each feature's map."""
        f = f.flatten(1)
        return torch.cat([head(f[:, cols]) for head, cols in zip(self.heads, self.reads)], 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        tx, ty, log_scale, turn = self.numbers(f).unbind(1)
        s = torch.exp(log_scale)
        cos, sin = s * torch.cos(turn), s * torch.sin(turn)
        return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def _learned_chunks(cfg: ModelConfig) -> tuple[int, int]:
    """How many chunks the model learned, and how wide: a grouped config's chunks hold groups."""
    if not cfg.chunk_groups:
        return cfg.n_chunks, cfg.chunk_dim
    return sum(map(len, cfg.chunk_groups)), cfg.chunk_dim // max(map(len, cfg.chunk_groups))


def warped(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (B, C, H, W) images or maps through (B, 2, 3) affine maps of output to input
    coordinates (a spatial transformer, Jaderberg et al. 2015; [-1, 1] coordinates of pixel
    centres, so the identity returns them unchanged), bilinearly; places mapped outside take the
    nearest border value (in an image, the background's colour where the object does not touch
    the border)."""
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)


class Decoder(nn.Module):
    """Feature (B, n_chunks, chunk_dim) -> image (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        specs = architecture.parse(cfg.decoder)
        # a decoder that opens with a deconvolution reads the feature as a 1x1 map (DCGAN style)
        self.as_map = isinstance(specs[0], architecture.Deconv)
        in_shape = (cfg.feature_dim, 1, 1) if self.as_map else (cfg.feature_dim,)
        self.net, out = architecture.build(specs, in_shape, 3, norm=cfg.norm, activation=cfg.activation,
                                           final_activation="tanh", warp=True)
        expected = (3, cfg.image_size, cfg.image_size)
        if out != expected:
            raise ValueError(f"{cfg.name}: decoder gives {out}, expected {expected}")
        # `w`, `wc`: a few numbers of the feature can then place, size and turn what the layers draw
        warps = {s for s in specs if isinstance(s, architecture.Warp)}
        if len(warps) > 1:
            raise ValueError(f"{cfg.name}: a decoder warps through one map: w or wc, not both")
        self.warp = None
        if warps:
            self.warp = (ChunkWarp(*_learned_chunks(cfg), cfg.feature_dim) if warps.pop().per_chunk
                         else AffineWarp(cfg.feature_dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)  # (B, chunks * dim)
        x = f * self.warp.layers_read if isinstance(self.warp, ChunkWarp) else f
        x = x[:, :, None, None] if self.as_map else x
        if self.warp is None:
            return self.net(x)
        theta = self.warp(f)
        for layer in self.net:
            x = warped(x, theta) if isinstance(layer, architecture.WarpSlot) else layer(x)
        return x


class Discriminator(nn.Module):
    """DCGAN: image -> one real/fake logit. BEGAN: image -> its reconstruction (an autoencoder)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.began = cfg.gan == "began"
        if self.began:
            self.net = nn.Sequential(Encoder(cfg), Decoder(cfg))
        else:
            spectral = cfg.dsc_norm == "spectral"
            self.net, _ = architecture.build(
                architecture.parse(cfg.discriminator), (3, cfg.image_size, cfg.image_size), 1,
                norm="none" if spectral else "batch", activation=cfg.activation,
                final_activation="none")
            if spectral:  # every weight divided by its largest singular value (power iteration)
                for layer in self.net.modules():
                    if isinstance(layer, (nn.Conv2d, nn.Linear)):
                        nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if self.began else self.net(x).squeeze(1)


class ChunkClassifier(nn.Module):
    """(x1, x2, x3) stacked on channels -> one logit per chunk: was chunk i taken from x1?"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net, _ = architecture.build(
            architecture.parse(cfg.classifier), (9, cfg.image_size, cfg.image_size), cfg.n_chunks,
            norm="batch", activation=cfg.activation, final_activation="none")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x1, x2, x3], dim=1))  # (B, chunks) logits


def mix(f1: torch.Tensor, f2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m ⊙ f1 + (1 − m) ⊙ f2 chunk-wise; mask (chunks,) or (B, chunks), True = take from f1."""
    return torch.where(mask.bool()[..., None], f1, f2)  # mask broadcast over (B, chunks, dim)


class MixingAutoencoder(nn.Module):
    """Encoder, decoder and (when the variant uses it) the chunk classifier: the side that
    minimises every loss. One forward runs a whole step's cycle so DDP sees one call per step."""

    def __init__(self, cfg: ModelConfig, losses: tuple[str, ...] = ("mix", "c", "g")):
        super().__init__()
        self.losses = frozenset(losses)
        # the authors' direct reconstruction of both inputs next to the mixing cycle (λ_rec > 0)
        self.pair_rec = cfg.lambda_rec > 0 and "mix" in self.losses
        self.latent_cycle = cfg.lambda_feat > 0 and "mix" in self.losses
        self.decorrelate = cfg.lambda_xcov > 0 and "mix" in self.losses
        self.critic_on_rec = cfg.critic_real == "reconstruction" and "g" in self.losses
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.classifier = ChunkClassifier(cfg) if "c" in self.losses else None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.losses == {"rec"}:  # the plain autoencoder needs no second image
            out["rec"] = self.decoder(self.encoder(x1))
            return out
        f = self.encoder(torch.cat([x1, x2]))
        f1, f2 = f.chunk(2)  # (B, chunks, dim) each
        if "rec" in self.losses:
            out["rec"] = self.decoder(f1)
        elif self.pair_rec:
            out["rec"] = self.decoder(f)  # x1 then x2 reconstructed
        mixed = mix(f1, f2, mask)
        x3 = self.decoder(mixed)  # the mixed image
        out["x3"] = x3
        if "mix" in self.losses:
            f3 = self.encoder(x3)
            out["x4"] = self.decoder(mix(f3, f1, mask))  # unmixed: should give x1 back
            if self.latent_cycle:
                out["f3"], out["f_mixed"] = f3, mixed
            if self.latent_cycle or self.decorrelate:
                out["f_pair"] = f
        if self.critic_on_rec:  # the critic's real side: x1 as the decoder draws it
            if "rec" in out:
                out["critic_real"] = out["rec"][: len(x1)].detach()
            else:
                with torch.no_grad():
                    out["critic_real"] = self.decoder(f1)
        if self.classifier is not None:
            out["cls"] = self.classifier(x1, x2, x3)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f)
