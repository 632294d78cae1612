"""Model presets (paper Table 1 and §3.2) and the training options, as frozen dataclasses.

Table 1's strings are kept verbatim except where they do not produce consistent sizes; every
such change is marked FIX here and listed in docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .errors import RetrievalError

# Table 1 prints one classifier for every dataset: AlexNet with batch norm, no dropout (§3.2).
ALEXNET_CLS = "c96k8s2-p-c256k5-p-c384k3-c384k3-c256k3-p-f4096-f4096-f"
DCGAN_DSC = "c64k3s2-c128k3s2-c256k3s2-c512-f"
# FIX: the printed last layer 'd3k2' (stride 1) turns 32x32 into 33x33; stride 2 gives 64x64.
DCGAN_DEC = "d512k4-d512k4s2-d256k4s2-d128k4s2-d3k2s2"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the networks; stored in every checkpoint."""
    name: str
    image_size: int           # square input side; loaders pad or resize to it
    encoder: str
    decoder: str
    discriminator: str        # unused for BEGAN, whose discriminator is an autoencoder (Table 1)
    classifier: str = ALEXNET_CLS
    n_chunks: int = 8         # "We separate it into 8 chunks" (§3.2)
    chunk_dim: int = 64       # 64 for Sprites and CelebA, 8 for MNIST (§3.2)
    gan: str = "dcgan"        # "dcgan" or "began"
    activation: str = "lrelu"  # LeakyReLU(0.2) after each conv (Table 1 caption)
    # encoder/decoder normalisation: "instance" (the authors' code), "batch" or "none"
    norm: str = "instance"
    lambda_m: float = 1.0     # λ_M = λ_G = λ_C = 1 for MNIST and Sprites (§3.2)
    lambda_g: float = 1.0
    lambda_c: float = 1.0
    began_gamma: float = 0.5  # γ for BEGAN (Table 1 caption)
    # Not in Eq. 4: the authors' released code also trains the mixing variants to reconstruct x1
    # and x2 directly. λ_rec weighs the mean of those two errors; 0 = the paper's objective.
    lambda_rec: float = 0.0
    # DCGAN discriminator normalisation: "batch" (the authors' code) or "spectral" (Miyato et
    # al. 2018), which bounds how steeply the critic's verdict can change with the image.
    dsc_norm: str = "batch"
    # Not in Eq. 4: MUNIT's latent cycle (Huang et al. 2018) on the mixed image,
    # λ_feat · mean‖Enc(x3) − mix(f1, f2)‖² over the mean per-dimension variance of f1 and f2.
    # Eq. 1 only checks what the decoder reads from a chunk; this also penalises what a chunk
    # carries without controlling it. 0 = the paper's objective.
    lambda_feat: float = 0.0
    # What the critic is shown as real: "data" (Eq. 2) or "reconstruction", Dec(Enc(x1)), so
    # that it can tell mixed images only by mixing artefacts, never by the decoder's blur.
    critic_real: str = "data"
    # Not in Eq. 4: XCov (Cheung et al. 2015), λ_xcov · the mean squared correlation between
    # feature dimensions of different chunks over the batch. The factors of Sprites are drawn
    # independently, so chunks that each hold one factor are uncorrelated; a factor split over
    # several chunks makes them correlate. 0 = the paper's objective.
    lambda_xcov: float = 0.0
    # Not in the paper: how many of each chunk's chunk_dim numbers the encoder may use (the rest
    # stay 0, so the index keeps one width and L2 is unchanged); () = all of them. Measured as a
    # few wide chunks for pose beside narrow ones for the colours (docs/results.md, "Sixteen
    # chunks of 16, and chunks of two widths"); no preset uses it.
    chunk_widths: tuple[int, ...] = ()
    # Not in the paper: after training, chunks whose dependence on training images is at least
    # this multiple of the median between any two chunks are searched as one chunk
    # (disentangle/grouping.py); 0 = every learned chunk is searched alone.
    group_ratio: float = 0.0
    # Set on the config a grouped model is served with (never trained with): the learned chunks
    # each of its chunks holds, in order.
    chunk_groups: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "chunk_widths", tuple(self.chunk_widths))  # JSON gives a list
        object.__setattr__(self, "chunk_groups", tuple(tuple(g) for g in self.chunk_groups))
        if self.chunk_groups and len(self.chunk_groups) != self.n_chunks:
            raise RetrievalError(f"chunk_groups must give the learned chunks of each of the {self.n_chunks} "
                                 f"chunks, not {len(self.chunk_groups)} groups")
        if self.group_ratio < 0:
            raise RetrievalError(f"group_ratio must be >= 0, not {self.group_ratio}")
        if self.chunk_widths and (len(self.chunk_widths) != self.n_chunks
                                  or not all(1 <= w <= self.chunk_dim for w in self.chunk_widths)):
            raise RetrievalError(f"chunk_widths must give one width in 1..chunk_dim ({self.chunk_dim}) "
                                 f"for each of the {self.n_chunks} chunks, not {list(self.chunk_widths)}")
        if self.norm not in ("instance", "batch", "none"):
            raise RetrievalError(f"norm must be 'instance', 'batch' or 'none', not {self.norm!r}")
        if self.dsc_norm not in ("batch", "spectral"):
            raise RetrievalError(f"dsc_norm must be 'batch' or 'spectral', not {self.dsc_norm!r}")
        if self.critic_real not in ("data", "reconstruction"):
            raise RetrievalError(f"critic_real must be 'data' or 'reconstruction', not {self.critic_real!r}")
        if self.lambda_feat < 0:
            raise RetrievalError(f"lambda_feat must be >= 0, not {self.lambda_feat}")
        if self.lambda_xcov < 0:
            raise RetrievalError(f"lambda_xcov must be >= 0, not {self.lambda_xcov}")

    @property
    def feature_dim(self) -> int:
        return self.n_chunks * self.chunk_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, ModelConfig] = {
    # Sprites frames are 60x60; padded to 64 because the decoder's strides produce 64.
    "sprites": ModelConfig(
        name="sprites", image_size=64,
        encoder="c64k3s2-c128k3s2-c256k3s2-c512k2s2-c512k2-f",
        decoder=DCGAN_DEC, discriminator=DCGAN_DSC),
    "celeba-dcgan": ModelConfig(
        name="celeba-dcgan", image_size=64,
        encoder="c64k3s2-c128k3s2-c256k3s2-c512k3s2-c512k2-f",
        decoder=DCGAN_DEC, discriminator=DCGAN_DSC, lambda_m=30.0),
    # Four pools in the encoder and four upsamplings in the decoder: 128x128 images.
    "celeba-began": ModelConfig(
        name="celeba-began", image_size=128,
        encoder="c32k3-c32k3-c32k3-c64-p-c64k3-c64k3-c96-p-c96k3-c96k3-c128-p-c128k3-c128k3-"
                "c160-c160-p-c160k3-c160k3-f",
        decoder="f4096-r(8,8,64)-c64k3-c64k3-u-c64k3-c64k3-u-c64k3-c64k3-u-c64k3-c64k3-c64k3-u-"
                "c64k3-c64k3-c3",
        discriminator="", gan="began", activation="relu", lambda_m=30.0),
    # FIX: MNIST's 28x28 is padded to 32x32 (the decoder's strides give 32) and greys are
    # replicated to RGB, matching the printed 'd3'; the last layer gets stride 2 as above.
    "mnist": ModelConfig(
        name="mnist", image_size=32, chunk_dim=8,
        encoder="c64k3s2-c128k3s2-c256k3s2-f",
        decoder="d512k4-d256k4s2-d128k4s2-d3k2s2", discriminator=DCGAN_DSC),
    # Not in the paper: small networks for the built-in shapes data, sized to train on a CPU.
    "shapes": ModelConfig(
        name="shapes", image_size=32, chunk_dim=16,
        encoder="c16k3s2-c32k3s2-c64k3s2-c128k2-f",
        # a spatial broadcast (position as a number compared with coordinates) plus a dense map
        # of places of their own (draws as fast as a DCGAN decoder): the first decoder here that
        # draws the shapes themselves (docs/results.md, "Decoders that draw"); its 8x8 map then
        # shifted, scaled and turned by four numbers read from chunks 0 to 3, one each, which the
        # layers do not read (`wc`): position and size each in a chunk of its own, and shape apart
        # for the first time (docs/results.md, "A warp whose numbers are chunks")
        decoder="b8t64-c128-c64k3-c64k3-wc-d32k4s2-d3k2s2",
        discriminator="c16k3s2-c32k3s2-c64k3s2-f",
        classifier="c16k3s2-p-c32k3-p-c64k3-f128-f",
        # A spectrally normalised critic (a batch-norm one collapsed the decoder), the authors'
        # weights 10 on both reconstructions and L_M, and the latent cycle; with a decoder that
        # draws sharply the critic is shown real data again (reconstructions were shown while
        # they were blurred: docs/results.md, "The demo's setting")
        lambda_m=10.0, lambda_rec=10.0, dsc_norm="spectral", norm="batch", lambda_feat=1.0),
    # For tests: seconds per run.
    "tiny": ModelConfig(
        name="tiny", image_size=16, chunk_dim=4,
        encoder="c8k3s2-c16k3s2-f", decoder="d16k4-d8k4s2-d3k2s2",
        discriminator="c8k3s2-c16k3s2-f", classifier="c8k3s2-p-c16k3-f32-f"),
}

# Not in the paper: Sprites sized for a 2-core CPU (the `sprites` preset runs at 2.5 pairs/s
# there). Frames resized to 32x32 (every attribute stays visible), the `shapes` networks,
# and the authors' released loss weights: 10 on the direct reconstructions and on L_M, 1 on
# L_G and L_C. 32 chunks of 8, not 8 of 64: pose spreads over several chunks, and with 8 the
# seven character attributes shared the rest (docs/results.md, "Sprites on the CPU").
# Pose still spreads over several of the 32, so chunks that depend on each other are searched as one
# (group_ratio; docs/results.md, "Dependent chunks searched as one").
# Its decoder and critic are the shapes preset's as they were when it was measured (up to 2026-12-06).
PRESETS["sprites-cpu"] = replace(PRESETS["shapes"], name="sprites-cpu", lambda_m=10.0, lambda_rec=10.0,
                                 n_chunks=32, chunk_dim=8, group_ratio=2.5,
                                 decoder="d128k4-d64k4s2-d32k4s2-d3k2s2", critic_real="reconstruction")

# Training options a preset brings along, the setting it was measured with; each CLI option
# given explicitly overrides its entry, and presets not listed take TrainConfig's defaults.
RECIPES: dict[str, dict] = {
    # a time budget, so that the run fits in an hour on any 2-core CPU and a faster one trains
    # further (the average was still rising at the last step measured); the step cap is not
    # reached on this machine (docs/results.md, "How long the recipe takes, and what it reaches")
    # one mask per batch, as in the authors' code: ahead of per-pair masks on every seed measured
    "sprites-cpu": {"minutes": 55.0, "steps": 40_000, "batch_size": 64, "lr": 5e-4, "mask": "per-batch"},
}
# The paper's own networks: a GPU job (weeks at the paper's 100,000 steps on a 2-core CPU)
GPU_PRESETS = frozenset({"sprites", "celeba-dcgan", "celeba-began"})
# The CPU recipe that stands in for a GPU preset when no GPU is present
CPU_STAND_IN = {"sprites": "sprites-cpu"}

# Table 2's rows: which losses each variant trains with.
VARIANTS: dict[str, frozenset[str]] = {
    "ae": frozenset({"rec"}),
    "ae+c+g": frozenset({"rec", "c", "g"}),
    "mix": frozenset({"mix"}),
    "mix+c": frozenset({"mix", "c"}),
    "mix+g": frozenset({"mix", "g"}),
    "mix+c+g": frozenset({"mix", "c", "g"}),
    "c+g": frozenset({"c", "g"}),
}


def preset(name: str) -> ModelConfig:
    """The named preset, or a RetrievalError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise RetrievalError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


MASK_MODES = ("per-batch", "per-sample", "per-group", "one-chunk")


@dataclass(frozen=True)
class TrainConfig:
    """Training options; defaults are the authors' released Sprites settings (DESIGN.md)."""
    steps: int = 100_000
    batch_size: int = 64          # pairs per step and process
    lr: float = 2e-4              # Adam, all three networks
    critic_lr_scale: float = 1.0  # the critic's lr = lr x this (TTUR, Heusel et al. 2017)
    beta1: float = 0.5
    lr_decay: float = 0.9         # staircase: lr x 0.9 every 20k steps
    lr_decay_every: int = 20_000
    minutes: float = 0.0          # stop once this much training time is spent (0: run to steps)
    # Not in the paper: plain-autoencoder steps (both inputs reconstructed, no mixing, GAN or
    # classifier) before the mixing objective starts; they count toward steps and minutes
    warmup_steps: int = 0
    variant: str = "mix+c+g"
    mask: str = "per-batch"       # the authors' code draws one mask per batch; the paper's text per sample
    # Not in the paper: with mask "per-group", this many masks per batch, each shared by a run of
    # batch_size / mask_groups consecutive pairs (between one per batch and one per pair)
    mask_groups: int = 8
    seed: int = 0
    bf16: bool = False            # autocast on CUDA only
    channels_last: bool = False   # NHWC activations: faster convolutions on tensor cores
    checkpoint_every: int = 1000
    figure_every: int = 1000
    log_every: int = 10
    losses: tuple[str, ...] = field(default=())  # filled from `variant`

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise RetrievalError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.mask not in MASK_MODES:
            raise RetrievalError(f"unknown mask mode {self.mask!r}; choose one of {', '.join(MASK_MODES)}")
        if self.mask == "per-group" and not 1 <= self.mask_groups <= self.batch_size:
            raise RetrievalError(f"--mask-groups must be between 1 and the batch size ({self.batch_size}), "
                                 f"got {self.mask_groups}")
        if not self.critic_lr_scale > 0:
            raise RetrievalError(f"--critic-lr-scale must be > 0, got {self.critic_lr_scale}")
        if not self.minutes >= 0:
            raise RetrievalError(f"--minutes must be >= 0, got {self.minutes}")
        if self.warmup_steps < 0:
            raise RetrievalError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.steps < 0 or self.batch_size < 1:
            raise RetrievalError("--steps must be >= 0 and --batch-size >= 1")
        object.__setattr__(self, "losses", tuple(sorted(VARIANTS[self.variant])))

    def to_dict(self) -> dict:
        return asdict(self)
