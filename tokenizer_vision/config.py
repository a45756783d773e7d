"""Configuration of the dual-codebook visual tokenizer, and the registry of named sizes.

`TokenizerConfig` is the schema: every knob of the tokenizer lives here, it serialises to the
`config.json` next to `model.safetensors`, and `TokenizerConfig.from_name("tiny" | "shapes" | "photo" | "base")`
gives the sizes that tests, docs and recipes share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tokenizer_vision.schema import check_keys, field_names, unknown_name

QUANTIZER_MODES = ("dual", "pixel", "semantic")
CODEBOOK_UPDATES = ("ema", "loss")
CODE_SEARCH_PRECISIONS = ("fp32", "bf16")
ALLOWED_DOWNSAMPLE_FACTORS = (8, 16)

# Hugging Face vision towers the semantic branch accepts. A full CLIP/SigLIP config (`clip`,
# `siglip`) is accepted too: only its vision part is used.
SUPPORTED_TEACHER_TYPES = ("clip_vision_model", "siglip_vision_model", "vit", "clip", "siglip")

IMAGE_CHANNELS = 3  # the tokenizer reads and writes RGB; image_mean/std have one entry per channel


@dataclass
class TokenizerConfig:
    """Everything that defines a `DualCodebookTokenizer` (architecture, quantizer, losses).

    Grid: an `image_size` image becomes an (image_size / f) x (image_size / f) grid of codes, where
    the downsampling factor f = 2 ** (len(channel_mult) - 1) must be 8 or 16.

    Semantic tower: `teacher_path` (a local Hugging Face folder: CLIPVisionModel, CLIPModel,
    SiglipVisionModel, SiglipModel or ViTModel) wins over `teacher_config` (an HF vision config as a
    dict with "model_type"). When the tokenizer is built, the tower's resolved vision config, image
    size, mean and std are written back into the model's copy of this config, so a saved folder is
    self-contained and `teacher_path` is only read the first time.
    """

    # --- pixel encoder / decoder (VQGAN-style CNN) ---
    image_size: int = 64
    in_channels: int = IMAGE_CHANNELS
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    # Residual blocks at the image's own resolution (the encoder's first level, the decoder's last), where a
    # conv costs the most on a CPU; None: num_res_blocks. 0 leaves that level its stem, stride-2 and upsampling
    # convs only.
    full_resolution_res_blocks: int | None = None
    # Local codes: each code is chosen from its own f x f patch plus this many pixels around it, both
    # branches from one CNN run on each code's crop (`encoders.LocalPatchEncoder`), so what an edit leaves
    # alone keeps its codes; the semantic branch is still distilled from the teacher through the semantic
    # decoder. None: whole-image encoders (a CNN for pixels, the vision tower for semantics). A multiple of
    # f / 2, so the crop halves evenly.
    local_context: int | None = None

    # --- dual codebook (one shared index into a semantic and a pixel codebook) ---
    d_pix: int = 8
    d_sem: int = 32
    codebook_size: int = 1024
    quantizer_mode: str = "dual"  # "dual" | "pixel" (classic VQGAN) | "semantic" (SEED-like)
    w_sem: float = 1.0  # weight of the semantic distance when choosing the shared index
    w_pix: float = 1.0  # weight of the pixel distance when choosing the shared index
    beta: float = 0.25  # commitment weight
    codebook_update: str = "ema"  # "ema" (running averages) | "loss" (gradient on ||sg(z) - e||^2)
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.01  # EMA assignments per step below which a code is restarted
    # Training forward passes (counted by the quantizer itself) between dead-code restarts; 0: never.
    restart_every: int = 100
    entropy_loss_weight: float = 0.0
    entropy_temperature: float = 0.01  # softmax temperature over distances for the entropy loss
    # Precision of the code search in training steps: "fp32", or "bf16" scores (on a CPU with bf16 matrix
    # units the search then costs about half; a near tie may go to the other of two nearly equal codes).
    # Encoding outside training always searches in fp32, so the codes of an image do not depend on it.
    training_code_search: str = "fp32"
    # Common codes first: outside training steps, among the codes whose combined distance is within this
    # margin of the nearest one, the code chosen is the one the training images used most
    # (`DualCodebookQuantizer.code_preference`, counted when training ends). A codebook holds near-duplicate
    # codes (restarts seed codes from the features of a noisy batch), and a slight change of a patch moves
    # it from one to another; preferring the common one gives every drawing of a scene the same codes.
    # 0: the nearest code always (no preference counts are kept).
    code_preference_margin: float = 0.0

    # --- image normalisation of the tokenizer's own input ---
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    # --- semantic tower (trainable copy) and its frozen teacher ---
    teacher_config: dict[str, Any] | None = None
    teacher_path: str | None = None
    teacher_image_size: int | None = None  # None: the tower's own config.image_size
    # None: the folder's preprocessor_config.json, else the family's usual values (CLIP's or 0.5).
    teacher_mean: tuple[float, ...] | None = None
    teacher_std: tuple[float, ...] | None = None
    semantic_decoder_channels: int = 128

    # --- loss weights ---
    pixel_l1_weight: float = 1.0
    pixel_l2_weight: float = 1.0
    vq_weight: float = 1.0
    semantic_weight: float = 1.0
    perceptual_weight: float = 0.0  # LPIPS; needs perceptual_path (a local safetensors file)
    perceptual_path: str | None = None
    gan_weight: float = 0.0  # PatchGAN hinge loss, active from gan_start_step on
    gan_start_step: int = 0
    discriminator_channels: int = 64
    discriminator_layers: int = 3

    def __post_init__(self) -> None:
        # JSON gives lists; the dataclass wants tuples so configs compare and hash the same.
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if self.teacher_mean is not None:
            self.teacher_mean = tuple(float(v) for v in self.teacher_mean)
        if self.teacher_std is not None:
            self.teacher_std = tuple(float(v) for v in self.teacher_std)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.downsample_factor
        return (side, side)

    def res_blocks(self, level: int) -> int:
        """Residual blocks at level `level` of the pixel encoder and decoder (0: full resolution)."""
        if level == 0 and self.full_resolution_res_blocks is not None:
            return self.full_resolution_res_blocks
        return self.num_res_blocks

    @property
    def uses_semantic(self) -> bool:
        return self.quantizer_mode in ("dual", "semantic")

    @property
    def uses_pixel(self) -> bool:
        return self.quantizer_mode in ("dual", "pixel")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"TokenizerConfig: {message}")

        if self.quantizer_mode not in QUANTIZER_MODES:
            fail(f"quantizer_mode must be one of {QUANTIZER_MODES}, got {self.quantizer_mode!r}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            fail(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {self.codebook_update!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            fail(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.downsample_factor not in ALLOWED_DOWNSAMPLE_FACTORS:
            fail(
                f"channel_mult {self.channel_mult} gives a downsampling factor of {self.downsample_factor}; "
                f"it must be one of {ALLOWED_DOWNSAMPLE_FACTORS} (len(channel_mult) of 4 or 5)"
            )
        if self.image_size <= 0 or self.image_size % self.downsample_factor:
            fail(f"image_size {self.image_size} must be a positive multiple of {self.downsample_factor}")
        if self.in_channels != IMAGE_CHANNELS:
            fail(f"in_channels must be {IMAGE_CHANNELS} (RGB), got {self.in_channels}")
        for name in (
            "base_channels",
            "num_res_blocks",
            "d_pix",
            "d_sem",
            "codebook_size",
            "semantic_decoder_channels",
            "discriminator_channels",
            "discriminator_layers",
        ):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_mean", "image_std", "teacher_mean", "teacher_std"):
            value = getattr(self, name)
            if value is not None and len(value) != IMAGE_CHANNELS:
                fail(f"{name} needs {IMAGE_CHANNELS} values, got {value}")
        if any(s <= 0 for s in self.image_std) or any(s <= 0 for s in self.teacher_std or ()):
            fail("image_std and teacher_std must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            fail(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.restart_every < 0 or self.dead_code_threshold < 0:
            fail("restart_every and dead_code_threshold must be >= 0")
        if self.full_resolution_res_blocks is not None and self.full_resolution_res_blocks < 0:
            fail(f"full_resolution_res_blocks must be >= 0 or None, got {self.full_resolution_res_blocks}")
        if self.local_context is not None and (
            self.local_context < 0 or (2 * self.local_context) % self.downsample_factor
        ):
            fail(
                f"local_context must be None or a non-negative multiple of {self.downsample_factor // 2} "
                f"(half the code patch), got {self.local_context}"
            )
        if self.training_code_search not in CODE_SEARCH_PRECISIONS:
            fail(f"training_code_search must be one of {CODE_SEARCH_PRECISIONS}, got {self.training_code_search!r}")
        if self.code_preference_margin < 0:
            fail(f"code_preference_margin must be >= 0, got {self.code_preference_margin}")
        if self.entropy_temperature <= 0:
            fail(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        weights = (
            "w_sem",
            "w_pix",
            "beta",
            "entropy_loss_weight",
            "pixel_l1_weight",
            "pixel_l2_weight",
            "vq_weight",
            "semantic_weight",
            "perceptual_weight",
            "gan_weight",
        )
        for name in weights:
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.uses_semantic:
            if self.teacher_path is None and self.teacher_config is None:
                fail(
                    f"quantizer_mode={self.quantizer_mode!r} needs a semantic tower: set teacher_path "
                    "(a local CLIP/SigLIP/ViT folder) or teacher_config (an HF vision config dict)"
                )
            if self.teacher_config is not None:
                model_type = self.teacher_config.get("model_type")
                if model_type not in SUPPORTED_TEACHER_TYPES:
                    fail(
                        f"teacher_config['model_type'] must be one of {SUPPORTED_TEACHER_TYPES}, "
                        f"got {model_type!r}"
                    )
        if self.perceptual_weight > 0 and not self.perceptual_path:
            fail(
                "perceptual_weight > 0 needs perceptual_path: a LOCAL safetensors file with LPIPS-VGG "
                "weights (nothing is ever downloaded; see tokenizer_vision.losses.LPIPS)"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TokenizerConfig:
        check_keys(values, field_names(cls), "TokenizerConfig")
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TokenizerConfig:
        """A named size from `TOKENIZER_SIZES`, with keyword overrides (unknown keys raise)."""
        if name not in TOKENIZER_SIZES:
            raise unknown_name("tokenizer size", name, TOKENIZER_SIZES)
        return cls.from_dict({**TOKENIZER_SIZES[name], **overrides})

    def replace(self, **changes: Any) -> TokenizerConfig:
        """A validated copy with some fields changed (unknown keys raise)."""
        return self.from_dict({**self.to_dict(), **changes})


# A one-layer CLIP vision tower: enough to exercise the real HF loading and feature path in tests.
_TINY_TEACHER = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}

# Stand-in for the demo's shapes teacher so the size is constructible on its own. The shapes recipe
# passes teacher_path=<the CLIP trained by `mllm train-teacher`>, which replaces this random tower.
_SHAPES_TEACHER = {
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}

TOKENIZER_SIZES: dict[str, dict[str, Any]] = {
    # Tests: 32 px -> 4 x 4 grid, K = 64, about 80k parameters including the one-layer CLIP teacher.
    "tiny": {
        "image_size": 32,
        "base_channels": 8,
        "channel_mult": (1, 1, 2, 2),
        "num_res_blocks": 1,
        "d_pix": 4,
        "d_sem": 8,
        "codebook_size": 64,
        "semantic_decoder_channels": 16,
        "restart_every": 10,
        "discriminator_channels": 8,
        "discriminator_layers": 2,
        "teacher_config": _TINY_TEACHER,
    },
    # The shapes world: 64 px -> 8 x 8 grid, K = 1024, ~1.9M trainable parameters. Sized for a 2-core
    # CPU: forward + backward of a batch of 32 under bf16 autocast takes about 0.3 s (AMD EPYC, 2 cores).
    "shapes": {
        "image_size": 64,
        "base_channels": 32,
        "channel_mult": (1, 2, 2, 4),
        "num_res_blocks": 1,
        "d_pix": 8,
        "d_sem": 32,
        "codebook_size": 1024,
        "semantic_decoder_channels": 64,
        "restart_every": 20,  # the scenes are simple and the encoder moves fast early: restart often
        "teacher_config": _SHAPES_TEACHER,
    },
    # Photos on a CPU (the tokenizer-photo recipe): 128 px -> 16 x 16 grid, K = 16384. Narrow at full
    # resolution (the costliest layers on a CPU), wide at the grid. A short run needs every code early: EMA
    # codebooks that follow the encoder quickly (decay 0.95), and a code counts as dead, and is restarted
    # from batch features, once it averages under 0.125 assignments per step (the recipe's batch of 8 has
    # 2048 positions: 0.125 per code on average, so the threshold scales with batch_size / K). Pixel L2
    # weighs 4x (PSNR is an L2 measure). The semantic tower comes from a local CLIP/SigLIP/ViT folder (teacher_path).
    # Speed on a CPU buys training steps, which is what the 15-minute recipe is short of: no residual block at
    # 128 px (those convs cost the most) and bf16 scores in the training steps' code search, together 1.3x the
    # steps per second for 0.2 dB less at equal steps (docs/experiments.md, "The photo tokenizer").
    "photo": {
        "image_size": 128,
        "base_channels": 16,
        "channel_mult": (1, 2, 4, 8),
        "num_res_blocks": 1,
        "full_resolution_res_blocks": 0,
        "training_code_search": "bf16",
        "d_pix": 8,
        "d_sem": 32,
        "codebook_size": 16384,
        "semantic_decoder_channels": 64,
        "ema_decay": 0.95,
        "dead_code_threshold": 0.125,
        "restart_every": 10,
        "pixel_l2_weight": 4.0,
        "teacher_config": None,
        "teacher_path": None,
    },
    # Documented recipe for real images (TokenFlow-like): 256 px -> 16 x 16 grid, K = 16384, a SigLIP
    # teacher read from a local folder, e.g.
    #   TokenizerConfig.from_name("base", teacher_path="/models/siglip-so400m-patch14-384")
    # For sharper reconstructions add perceptual_weight=1.0 with perceptual_path=<local LPIPS file>.
    "base": {
        "image_size": 256,
        "base_channels": 128,
        "channel_mult": (1, 1, 2, 2, 4),
        "num_res_blocks": 2,
        "d_pix": 8,
        "d_sem": 32,
        "codebook_size": 16384,
        "semantic_decoder_channels": 256,
        "restart_every": 200,
        "gan_weight": 0.1,
        "gan_start_step": 20000,
        "teacher_config": None,
        "teacher_path": None,
    },
}

# Named tokenizer sizes that can be built fresh (random weights) without any file: their semantic tower is
# described by a config. The others (photo, base) need a local teacher folder and are trained, not named.
FRESH_TOKENIZER_SIZES = tuple(sorted(name for name, size in TOKENIZER_SIZES.items()
                                     if size.get("teacher_config") is not None))

__all__ = ["CODEBOOK_UPDATES", "FRESH_TOKENIZER_SIZES", "QUANTIZER_MODES", "TOKENIZER_SIZES", "TokenizerConfig"]
