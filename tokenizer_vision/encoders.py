"""Encoders: image (B, 3, H, W) -> continuous features on the code grid (B, d, h, w).

* `PixelEncoder`: a VQGAN-style CNN (Esser et al. 2021) for the pixel branch.
* `SemanticEncoder`: a Hugging Face vision tower (CLIP / SigLIP / ViT) whose patch tokens are pooled
  onto the code grid and projected to d_sem. TokenFlow starts this tower from the teacher's weights
  and distils the teacher into it; the frozen teacher is a deep copy made by the model.

The building blocks (`ResnetBlock`, `group_norm`) are shared with `decoders.py`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer_vision.config import SUPPORTED_TEACHER_TYPES, TokenizerConfig

# Normalisation of the towers' own preprocessing, used when neither the config nor the folder's
# preprocessor_config.json says otherwise.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
_DEFAULT_TOWER_NORMALISATION = {"clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}
# Tower parts that only feed the pooled output, which the tokenizer never reads (it uses the patch
# tokens of last_hidden_state). They are frozen in the trainable tower so every trainable parameter
# gets a gradient: no optimizer state for dead weights, and DDP needs no find_unused_parameters.
# (ViT's pooler is not even built, see `_tower_kwargs`.)
_POOLING_ONLY_MODULES = {"clip_vision_model": ("post_layernorm",), "siglip_vision_model": ("head",)}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels, so tiny test widths work too."""
    return nn.GroupNorm(num_groups=math.gcd(max(channels // 4, 1), 32), num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W): two GroupNorm-SiLU-conv3x3 layers plus a skip path."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def downsampling_levels(config: TokenizerConfig) -> nn.Sequential:
    """The encoders' levels, one per entry of channel_mult: `config.res_blocks(level)` residual blocks, then a
    stride-2 conv (except after the last level). (B, C0, H, W) -> (B, C_last, H / f, W / f)."""
    widths = [config.base_channels * m for m in config.channel_mult]
    levels = []
    in_width = widths[0]
    for level, width in enumerate(widths):
        blocks: list[nn.Module] = []
        for _ in range(config.res_blocks(level)):
            blocks.append(ResnetBlock(in_width, width))
            in_width = width
        if level != len(widths) - 1:
            blocks.append(nn.Conv2d(width, width, 3, stride=2, padding=1))  # halve H and W
        levels.append(nn.Sequential(*blocks))
    return nn.Sequential(*levels)


class PixelEncoder(nn.Module):
    """(B, 3, H, W) -> (B, d_pix, H / f, W / f), f = 2 ** (len(channel_mult) - 1).

    One level per entry of channel_mult: `config.res_blocks(level)` residual blocks, then a stride-2 conv
    (except after the last level); a middle block; GroupNorm-SiLU and a 1x1 projection to d_pix.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.levels = downsampling_levels(config)
        self.mid = ResnetBlock(widths[-1], widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.proj_out = nn.Conv2d(widths[-1], config.d_pix, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(pixel_values)  # (B, C0, H, W)
        h = self.mid(self.levels(h))  # (B, C_last, h, w)
        return self.proj_out(F.silu(self.norm_out(h)))  # (B, d_pix, h, w)


class LocalPatchEncoder(nn.Module):
    """(B, 3, H, W) -> (B, d_out, H / f, W / f) where each output position sees only its own f x f patch
    and `config.local_context` pixels around it (the image's border is extended by replication).

    The whole-image encoders make codes non-local: GroupNorm statistics span the image and the receptive
    fields cover several objects, so an edit that changes one object changes most codes. Here every
    code's crop goes through the CNN as its own sample (GroupNorm statistics are the crop's), so a region
    an edit leaves alone keeps its codes exactly. Levels as in `PixelEncoder`, on the crop; the last
    level's small map is flattened (not averaged) so where the content lies in the crop is kept.
    """

    def __init__(self, config: TokenizerConfig, out_dim: int) -> None:
        super().__init__()
        factor, context = config.downsample_factor, config.local_context
        self.factor, self.context = factor, context
        self.crop = factor + 2 * context
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.levels = downsampling_levels(config)
        self.mid = ResnetBlock(widths[-1], widths[-1])
        self.norm_out = group_norm(widths[-1])
        side = self.crop // factor  # the crop's side after the stride-2 convs
        self.proj_out = nn.Linear(widths[-1] * side * side, out_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixel_values.shape
        rows, cols = height // self.factor, width // self.factor
        padded = F.pad(pixel_values, (self.context,) * 4, mode="replicate")
        crops = F.unfold(padded, kernel_size=self.crop, stride=self.factor)  # (B, 3 * crop^2, rows * cols)
        crops = crops.transpose(1, 2).reshape(batch * rows * cols, channels, self.crop, self.crop)
        h = self.mid(self.levels(self.conv_in(crops)))  # (B * rows * cols, C_last, side, side)
        z = self.proj_out(F.silu(self.norm_out(h)).flatten(1))  # (B * rows * cols, d_out)
        return z.view(batch, rows, cols, -1).permute(0, 3, 1, 2)  # (B, d_out, rows, cols)


# ---------------------------------------------------------------------------- semantic tower


def vision_config_from_dict(values: dict[str, Any]):
    """An HF vision config from a dict with "model_type"; for a full CLIP/SigLIP config, its vision part."""
    from transformers import AutoConfig  # transformers is imported only where a tower is needed

    values = dict(values)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    return getattr(config, "vision_config", config)


def _tower_class(vision_config):
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(vision_config)]
    except KeyError as error:
        raise ValueError(
            f"no Hugging Face vision model for config type {type(vision_config).__name__}"
        ) from error


def _tower_kwargs(vision_config) -> dict[str, Any]:
    # ViTModel has a pooler the tokenizer never uses; leaving it out keeps every parameter trained.
    return {"add_pooling_layer": False} if vision_config.model_type == "vit" else {}


def build_vision_tower(config: TokenizerConfig, load_pretrained: bool = True):
    """The HF vision tower of the semantic branch (a `PreTrainedModel` in fp32, train mode).

    With `load_pretrained` and `config.teacher_path`, weights come from that local folder (a vision
    model, or a full CLIPModel/SiglipModel whose vision part is taken); otherwise the tower is built
    from `config.teacher_config` with random weights (tests, or before a state dict is loaded).
    """
    if load_pretrained and config.teacher_path is not None:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        if not os.path.isdir(config.teacher_path):
            raise ValueError(
                f"teacher_path {config.teacher_path!r} is not a local folder (nothing is downloaded)"
            )
        full_config = AutoConfig.from_pretrained(config.teacher_path, local_files_only=True)
        vision_config = getattr(full_config, "vision_config", full_config)
        # Loading the vision class with the vision config keeps the parameter names identical to a
        # tower rebuilt from teacher_config later, whether the folder held a vision or a full model.
        # A full CLIP/SigLIP folder also holds text weights; transformers would list each of them as
        # "unexpected". Its report is silenced and the check that matters is made here: no vision
        # weight may be missing.
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise inside a tokenizer build
        try:
            tower, loading_info = _tower_class(vision_config).from_pretrained(
                config.teacher_path,
                config=vision_config,
                dtype=torch.float32,
                local_files_only=True,
                output_loading_info=True,
                **_tower_kwargs(vision_config),
            )
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if loading_info.get("missing_keys"):
            missing = sorted(loading_info["missing_keys"])
            raise ValueError(
                f"{config.teacher_path} lacks vision-tower weights {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                "is it a CLIP, SigLIP or ViT checkpoint?"
            )
    elif config.teacher_config is not None:
        vision_config = vision_config_from_dict(config.teacher_config)
        tower = _tower_class(vision_config)(vision_config, **_tower_kwargs(vision_config))
    else:
        raise ValueError("the semantic tower needs teacher_path or teacher_config")
    if vision_config.model_type not in SUPPORTED_TEACHER_TYPES:
        raise ValueError(
            f"unsupported semantic tower {vision_config.model_type!r}; supported: {SUPPORTED_TEACHER_TYPES}"
        )
    return tower.float().train()


def resolve_teacher_settings(config: TokenizerConfig, tower) -> TokenizerConfig:
    """A copy of `config` with the tower's vision config, image size, mean and std filled in.

    Writing them into the config makes a saved tokenizer self-contained: `from_pretrained` rebuilds
    the tower from `teacher_config` and never needs `teacher_path` again.
    """
    vision_config = tower.config
    mean, std = config.teacher_mean, config.teacher_std
    if mean is None or std is None:
        folder_mean, folder_std = _folder_normalisation(config.teacher_path)
        default_mean, default_std = _DEFAULT_TOWER_NORMALISATION.get(vision_config.model_type, (HALF, HALF))
        mean = mean or folder_mean or default_mean
        std = std or folder_std or default_std
    return config.replace(
        teacher_config=json.loads(json.dumps(vision_config.to_dict())),  # JSON-clean (int dict keys etc.)
        teacher_image_size=config.teacher_image_size or int(vision_config.image_size),
        teacher_mean=tuple(mean),
        teacher_std=tuple(std),
    )


def _folder_normalisation(path: str | None) -> tuple[Any, Any]:
    if path is None:
        return None, None
    preprocessor_file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(preprocessor_file):
        return None, None
    with open(preprocessor_file) as handle:
        values = json.load(handle)
    return values.get("image_mean"), values.get("image_std")


def pool_to_grid(features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, gh, gw) -> (B, C, h, w): area pooling when shrinking (averages whole patches),
    bilinear interpolation when the tower's patch grid is coarser than the code grid."""
    if tuple(features.shape[-2:]) == tuple(grid_size):
        return features
    if features.shape[-2] >= grid_size[0] and features.shape[-1] >= grid_size[1]:
        return F.adaptive_avg_pool2d(features, grid_size)
    return F.interpolate(features, size=grid_size, mode="bilinear", align_corners=False)


class VisionTowerGrid(nn.Module):
    """Tokenizer-normalised images (B, 3, H, W) -> tower patch features on the code grid (B, C_t, h, w).

    Converts the input to the tower's resolution and normalisation, runs the tower, drops the
    leading non-patch tokens (CLIP and ViT have a CLS token, SigLIP has none), restores the patch
    grid and pools it to the code grid. Both the trainable semantic encoder and the frozen teacher
    are one of these.
    """

    def __init__(self, config: TokenizerConfig, tower) -> None:
        super().__init__()
        self.tower = tower
        self.grid_size = config.grid_size
        self.tower_image_size = config.teacher_image_size
        self.patch_size = int(tower.config.patch_size)
        self.hidden_size = int(tower.config.hidden_size)
        self.interpolate_position_embeddings = config.teacher_image_size != int(tower.config.image_size)
        # x_tower = (x * std + mean - t_mean) / t_std = x * scale + shift, per channel.
        mean, std = torch.tensor(config.image_mean), torch.tensor(config.image_std)
        tower_mean, tower_std = torch.tensor(config.teacher_mean), torch.tensor(config.teacher_std)
        self.register_buffer("input_scale", (std / tower_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "input_shift", ((mean - tower_mean) / tower_std).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values * self.input_scale + self.input_shift  # (B, 3, H, W) in the tower's normalisation
        if x.shape[-1] != self.tower_image_size or x.shape[-2] != self.tower_image_size:
            size = (self.tower_image_size, self.tower_image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        extra = {"interpolate_pos_encoding": True} if self.interpolate_position_embeddings else {}
        x = x.to(next(self.tower.parameters()).dtype)  # a bf16-cast tower outside autocast
        tokens = self.tower(pixel_values=x, **extra).last_hidden_state  # (B, T, C_t)
        patch_rows = patch_cols = self.tower_image_size // self.patch_size
        num_prefix = tokens.shape[1] - patch_rows * patch_cols  # CLS / register tokens come first
        if num_prefix < 0:
            raise ValueError(
                f"tower returned {tokens.shape[1]} tokens for a {patch_rows}x{patch_cols} patch grid"
            )
        patches = tokens[:, num_prefix:].transpose(1, 2)  # (B, C_t, gh * gw)
        patches = patches.reshape(
            tokens.shape[0], self.hidden_size, patch_rows, patch_cols
        )  # (B, C_t, gh, gw)
        return pool_to_grid(patches, self.grid_size)  # (B, C_t, h, w)


class SemanticEncoder(nn.Module):
    """(B, 3, H, W) -> (B, d_sem, h, w): vision-tower patch features on the grid, then a per-position MLP."""

    def __init__(self, config: TokenizerConfig, tower) -> None:
        super().__init__()
        self.backbone = VisionTowerGrid(config, tower)
        pooling_only = _POOLING_ONLY_MODULES.get(tower.config.model_type, ())
        for name, module in tower.named_modules():
            if name.split(".")[-1] in pooling_only:
                module.requires_grad_(False)
        width = self.backbone.hidden_size
        self.projection = nn.Sequential(
            nn.Conv2d(width, width, 1), nn.GELU(), nn.Conv2d(width, config.d_sem, 1)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(pixel_values))  # (B, d_sem, h, w)


__all__ = [
    "LocalPatchEncoder",
    "PixelEncoder",
    "ResnetBlock",
    "SemanticEncoder",
    "VisionTowerGrid",
    "build_vision_tower",
    "downsampling_levels",
    "group_norm",
    "pool_to_grid",
    "resolve_teacher_settings",
    "vision_config_from_dict",
]
