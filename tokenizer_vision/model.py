"""`DualCodebookTokenizer`: image <-> grid of integer codes, with a TokenFlow-style dual codebook.

    image (B, 3, H, W) --PixelEncoder----> z_pix (B, d_pix, h, w) --+
                       --SemanticEncoder-> z_sem (B, d_sem, h, w) --+--> DualCodebookQuantizer
                                                                           | shared index k (B, h, w)
                          e_sem[k], e_pix[k] (straight-through) <----------+
    [e_sem; e_pix] --PixelDecoder----> reconstruction (B, 3, H, W)      (pixel losses, LPIPS, GAN)
    e_sem          --SemanticDecoder-> teacher features (B, C_t, h, w)  (1 - cos vs frozen teacher)

Codes k in [0, K) become LLM vocabulary entries downstream; `encode`, `decode`, `embed` and
`encode_features` are the API the unified model uses. A saved folder holds `config.json` and
`model.safetensors` (every parameter and buffer, the frozen teacher included), so `teacher_path` is
only read when a tokenizer is first built.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from tokenizer_vision.config import TokenizerConfig
from tokenizer_vision.decoders import PixelDecoder, SemanticDecoder
from tokenizer_vision.encoders import (
    LocalPatchEncoder,
    PixelEncoder,
    SemanticEncoder,
    VisionTowerGrid,
    build_vision_tower,
    resolve_teacher_settings,
)
from tokenizer_vision.image_processing import ImageProcessor, ImageSource
from tokenizer_vision.losses import (
    LPIPS,
    PatchDiscriminator,
    hinge_discriminator_loss,
    hinge_generator_loss,
    pixel_l1_loss,
    pixel_l2_loss,
    semantic_distillation_loss,
)
from tokenizer_vision.quantizer import DualCodebookQuantizer, QuantizerOutput

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPTIONAL_STATE = "quantizer.code_preference"  # state a saved tokenizer may lack: it then loads as zeros


@dataclass
class EncodedFeatures:
    """What `encode_features` returns: codes plus their quantized features.

    The features equal the codebook rows `embed(indices)` in value, but carry gradients back to the
    encoders (straight-through) and to the codebook rows (when codebook_update="loss"): the path by
    which an LLM loss reaches the tokenizer in end-to-end tuning.
    """

    indices: torch.Tensor  # (B, h, w) int64
    quantized_sem: torch.Tensor | None  # (B, h, w, d_sem); None in "pixel" mode
    quantized_pix: torch.Tensor | None  # (B, h, w, d_pix); None in "semantic" mode
    vq_loss: torch.Tensor  # (): codebook + beta * commitment, to add to an end-to-end objective


def _channels_last(feature_map: torch.Tensor | None) -> torch.Tensor | None:
    return None if feature_map is None else feature_map.permute(0, 2, 3, 1)  # (B, d, h, w) -> (B, h, w, d)


def _end_to_end_features(
    quantized: torch.Tensor | None, codebook_rows: torch.Tensor | None
) -> torch.Tensor | None:
    """(B, d, h, w) straight-through features + their codebook rows (B, h, w, d) -> (B, h, w, d).

    Adding `rows - sg(rows)` (exactly zero) keeps the value e[k] but opens a second gradient path,
    into the codebook rows, next to the straight-through one into the encoder: an LLM loss on these
    features then trains both (when the codebooks require grad, i.e. codebook_update="loss").
    """
    if quantized is None:
        return None
    return _channels_last(quantized) + (codebook_rows - codebook_rows.detach()).to(quantized.dtype)


def _channels_first(rows: torch.Tensor | None) -> torch.Tensor | None:
    return None if rows is None else rows.permute(0, 3, 1, 2)  # (B, h, w, d) -> (B, d, h, w)


class DualCodebookTokenizer(nn.Module):
    """Discrete visual tokenizer: `encode` images to (B, h, w) codes, `decode` codes to images.

    `load_external_weights=False` builds the semantic tower and LPIPS without reading
    `teacher_path` / `perceptual_path` (random weights, to be overwritten by a state dict);
    `from_pretrained` uses it.
    """

    def __init__(self, config: TokenizerConfig, load_external_weights: bool = True) -> None:
        super().__init__()
        local = config.local_context is not None
        self.pixel_encoder = PixelEncoder(config) if config.uses_pixel and not local else None
        self.semantic_encoder = self.teacher = self.semantic_decoder = self.local_encoder = None
        if config.uses_semantic:
            tower = build_vision_tower(config, load_pretrained=load_external_weights)
            config = resolve_teacher_settings(config, tower)
            if local:
                # Local codes: the teacher is only the distillation target; the codes come from the crops.
                self.teacher = VisionTowerGrid(config, tower).requires_grad_(False).eval()
            else:
                self.semantic_encoder = SemanticEncoder(config, tower)
                # TokenFlow: the semantic encoder starts from the teacher and is distilled from a frozen
                # copy of it, so the semantic codes keep the teacher's meaning while adapting to the codebook.
                self.teacher = copy.deepcopy(self.semantic_encoder.backbone).requires_grad_(False).eval()
            self.semantic_decoder = SemanticDecoder(config, teacher_width=self.teacher.hidden_size)
        if local:
            self.local_encoder = LocalPatchEncoder(
                config, out_dim=config.d_sem * config.uses_semantic + config.d_pix * config.uses_pixel
            )
        self.quantizer = DualCodebookQuantizer(config)
        self.pixel_decoder = PixelDecoder(config)
        self.perceptual = None
        if config.perceptual_weight > 0:
            self.perceptual = (
                LPIPS.from_safetensors(config.perceptual_path) if load_external_weights else LPIPS()
            )
        self.discriminator = None
        if config.gan_weight > 0:
            self.discriminator = PatchDiscriminator(
                config.in_channels, config.discriminator_channels, config.discriminator_layers
            )
        self.config = config  # with the semantic tower's settings resolved
        self._processor = ImageProcessor(config.image_size, config.image_mean, config.image_std)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: TokenizerConfig) -> DualCodebookTokenizer:
        return cls(config)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DualCodebookTokenizer:
        """A fresh tokenizer of a named size ("tiny", "shapes", "base") with config overrides,
        e.g. from_name("tiny", quantizer_mode="pixel")."""
        return cls(TokenizerConfig.from_name(name, **overrides))

    # ------------------------------------------------------------------ properties
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def processor(self) -> ImageProcessor:
        return self._processor

    @property
    def device(self) -> torch.device:
        return self.pixel_decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pixel_decoder.conv_in.weight.dtype

    def train(self, mode: bool = True) -> DualCodebookTokenizer:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen targets: no dropout, ever
        return self

    def generator_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of everything but the discriminator (the first optimizer's)."""
        return [
            p
            for name, p in self.named_parameters()
            if p.requires_grad and not name.startswith("discriminator.")
        ]

    # ------------------------------------------------------------------ training
    def forward(
        self,
        pixel_values: torch.Tensor,
        step: int | None = None,
        adversarial: bool = True,
        target: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """One training/validation pass on normalised images (B, 3, H, W).

        Returns a dict with "loss" (the weighted total to backpropagate), "losses" (each term),
        "reconstruction" (B, 3, H, W), "indices" (B, h, w), "quantized_sem" / "quantized_pix"
        (B, h, w, d) features for end-to-end tuning (as in `encode_features`), and this batch's
        "usage_fraction" and "perplexity".
        `step` drives the GAN schedule (None counts as step 0); `adversarial=False` leaves the GAN term out
        (end-to-end tuning trains no discriminator). In train mode with gradients on, the quantizer also
        updates its EMA codebooks and restarts dead codes.
        `target` (same shape; default `pixel_values`): what the reconstruction and the teacher's features are
        taken from, while the codes come from `pixel_values` (a degraded input learns the clean image's codes).
        """
        config = self.config
        quantized = self._quantize(pixel_values)
        if target is None:
            target = pixel_values
        reconstruction = self.pixel_decoder(quantized.quantized_sem, quantized.quantized_pix)  # (B, 3, H, W)

        losses = {
            "pixel_l1": pixel_l1_loss(reconstruction, target),
            "pixel_l2": pixel_l2_loss(reconstruction, target),
            "vq": quantized.vq_loss,
            "codebook": quantized.codebook_loss,
            "commitment": quantized.commitment_loss,
            "entropy": quantized.entropy_loss,
        }
        total = (
            config.pixel_l1_weight * losses["pixel_l1"]
            + config.pixel_l2_weight * losses["pixel_l2"]
            + config.vq_weight * losses["vq"]
            + config.entropy_loss_weight * losses["entropy"]
        )
        if self.semantic_decoder is not None:
            predicted = self.semantic_decoder(quantized.quantized_sem)  # (B, C_t, h, w)
            losses["semantic"] = semantic_distillation_loss(predicted, self.teacher_features(target))
            total = total + config.semantic_weight * losses["semantic"]
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(
                self._to_signed_unit(reconstruction), self._to_signed_unit(target)
            ).mean()
            total = total + config.perceptual_weight * losses["perceptual"]
        if adversarial and self.gan_active(step):
            # The discriminator is read with detached weights so the generator's backward leaves its
            # gradients untouched; it is trained separately through `discriminator_loss`.
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            fake_logits = torch.func.functional_call(self.discriminator, frozen, (reconstruction,))
            losses["gan"] = hinge_generator_loss(fake_logits)
            total = total + config.gan_weight * losses["gan"]

        return {
            "loss": total,
            "losses": losses,
            "reconstruction": reconstruction,
            "indices": quantized.indices,
            **self._end_to_end_outputs(quantized),
            "usage_fraction": quantized.usage_fraction,
            "perplexity": quantized.perplexity,
        }

    def gan_active(self, step: int | None) -> bool:
        """Whether the adversarial terms apply at this training step."""
        return self.discriminator is not None and (step or 0) >= self.config.gan_start_step

    def discriminator_loss(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Hinge loss for the discriminator's own optimizer step (reconstruction is detached here)."""
        if self.discriminator is None:
            raise ValueError("this tokenizer has no discriminator (gan_weight is 0)")
        return hinge_discriminator_loss(
            self.discriminator(pixel_values), self.discriminator(reconstruction.detach())
        )

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen teacher patch features pooled to the code grid: (B, 3, H, W) -> (B, C_t, h, w)."""
        if self.teacher is None:
            raise ValueError("a pixel-only tokenizer has no semantic teacher")
        return self.teacher(pixel_values)

    # ------------------------------------------------------------------ images <-> codes
    @torch.no_grad()
    def encode(self, images: ImageSource | Sequence[ImageSource] | torch.Tensor) -> torch.Tensor:
        """Images -> codes (B, h, w) int64.

        Takes one image or a list (PIL images, paths or bytes: resized, cropped and normalised by
        `processor`) or an already normalised tensor (B, 3, S, S) / (3, S, S).
        """
        return self._quantize(self._pixel_values(images)).indices

    def encode_features(self, pixel_values: torch.Tensor) -> EncodedFeatures:
        """Normalised images (B, 3, S, S) -> codes and quantized features that carry gradients to the
        encoders and codebooks (end-to-end tuning, where an LLM loss flows into the tokenizer)."""
        quantized = self._quantize(self._pixel_values(pixel_values))
        return EncodedFeatures(
            indices=quantized.indices,
            **self._end_to_end_outputs(quantized),
            vq_loss=quantized.vq_loss,
        )

    def embed(self, codes: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Codes of any shape (...) -> codebook rows ((..., d_sem), (..., d_pix)), unit-norm and
        differentiable with respect to the codebooks; None for the branch a mode does not have."""
        return self.quantizer.lookup(self._checked_codes(codes))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) or (B, h * w) in raster order -> normalised images (B, 3, H, W)."""
        sem, pix = self.quantizer.lookup(self._grid_codes(codes))  # (B, h, w, d)
        return self.pixel_decoder(_channels_first(sem), _channels_first(pix))  # (B, 3, H, W)

    @torch.no_grad()
    def semantic_cosine(self, pixel_values: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w) cosine similarity between the frozen teacher's features of the images and the
        semantic decoder's reconstruction of them from the codes (encoded here when not given):
        how much of the teacher's meaning the semantic codes keep. A metric; 1 is perfect."""
        if self.semantic_decoder is None:
            raise ValueError("a pixel-only tokenizer has no semantic codebook")
        pixel_values = self._pixel_values(pixel_values)
        codes = self.encode(pixel_values) if codes is None else self._grid_codes(codes)
        sem, _ = self.quantizer.lookup(codes)  # (B, h, w, d_sem)
        predicted = self.semantic_decoder(_channels_first(sem))  # (B, C_t, h, w)
        return F.cosine_similarity(predicted.float(), self.teacher_features(pixel_values).float(), dim=1)

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        """Codes (B, h, w) -> RGB PIL images of image_size x image_size."""
        return self.processor.postprocess(self.decode(codes))

    # ------------------------------------------------------------------ helpers
    def _end_to_end_outputs(self, quantized: QuantizerOutput) -> dict[str, torch.Tensor | None]:
        sem_rows, pix_rows = self.quantizer.lookup(quantized.indices)  # (B, h, w, d)
        return {
            "quantized_sem": _end_to_end_features(quantized.quantized_sem, sem_rows),
            "quantized_pix": _end_to_end_features(quantized.quantized_pix, pix_rows),
        }

    def encoder_outputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Normalised images (B, 3, S, S) -> the quantizer's inputs (z_sem (B, d_sem, h, w), z_pix (B, d_pix,
        h, w)), None for a branch the mode lacks; with gradients when enabled."""
        if self.local_encoder is not None:
            z = self.local_encoder(pixel_values)  # (B, d_sem + d_pix, h, w): [semantic; pixel]
            d_sem = self.config.d_sem if self.config.uses_semantic else 0
            return (z[:, :d_sem] if d_sem else None), (z[:, d_sem:] if self.config.uses_pixel else None)
        # pixel first, as before: the order of the random draws (dropout) in training stays the same
        z_pix = self.pixel_encoder(pixel_values) if self.pixel_encoder is not None else None
        z_sem = self.semantic_encoder(pixel_values) if self.semantic_encoder is not None else None
        return z_sem, z_pix

    def _quantize(self, pixel_values: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(*self.encoder_outputs(pixel_values))

    def _pixel_values(self, images: ImageSource | Sequence[ImageSource] | torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            images = self.processor.preprocess(images)
        if images.dim() == 3:
            images = images.unsqueeze(0)
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected normalised images of shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(images.shape)}; pass PIL images to have them resized by `processor`"
            )
        return images.to(device=self.device, dtype=self.dtype)

    def _grid_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Validated codes of shape (B, h, w); (B, h * w) in raster order is reshaped."""
        codes = self._checked_codes(codes)
        height, width = self.grid_size
        if codes.dim() == 2 and codes.shape[1] == height * width:
            codes = codes.view(codes.shape[0], height, width)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (height, width):
            raise ValueError(
                f"expected codes of shape (B, {height}, {width}) or (B, {height * width}), "
                f"got {tuple(codes.shape)}"
            )
        return codes

    def _checked_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        codes = codes.to(device=self.device, dtype=torch.long)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got min {int(codes.min())} "
                f"max {int(codes.max())}"
            )
        return codes

    def _to_signed_unit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokenizer-normalised images -> [-1, 1] (LPIPS's input range)."""
        mean = torch.tensor(self.config.image_mean, device=pixel_values.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, device=pixel_values.device).view(1, 3, 1, 1)
        return (pixel_values.float() * std + mean) * 2.0 - 1.0

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (all parameters and buffers, teacher included)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as handle:
            json.dump(self.config.to_dict(), handle, indent=2)
            handle.write("\n")
        # save_model drops duplicate names of shared tensors (safetensors refuses aliasing) and
        # load_model restores them; no pickle anywhere.
        save_model(self, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **config_overrides: Any,
    ) -> DualCodebookTokenizer:
        """Load a folder written by `save_pretrained`, in eval mode.

        `config_overrides` change settings that do not alter the weights' shapes, e.g.
        codebook_update="loss" to train the codebooks by gradient during end-to-end tuning.
        """
        config_file = os.path.join(directory, CONFIG_NAME)
        weights_file = os.path.join(directory, WEIGHTS_NAME)
        for required in (config_file, weights_file):
            if not os.path.isfile(required):
                raise ValueError(
                    f"{os.fspath(directory)!r} is not a saved tokenizer: {os.path.basename(required)} missing"
                )
        try:
            with open(config_file, encoding="utf-8") as handle:
                saved = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_file} is damaged ({error}; save the tokenizer again)") from None
        config = TokenizerConfig.from_dict(saved)
        if config_overrides:
            config = config.replace(**config_overrides)
        model = cls(config, load_external_weights=False)
        try:
            missing, unexpected = load_model(model, weights_file, strict=False)
        except RuntimeError as error:
            raise ValueError(f"weights in {weights_file!r} do not match its config: {error}") from error
        except SafetensorError as error:  # a truncated or garbage file
            raise ValueError(f"{weights_file} is damaged ({error}; save the tokenizer again)") from None
        missing = set(missing) - {OPTIONAL_STATE}  # tokenizers saved before code preferences keep zeros
        if missing or unexpected:
            raise ValueError(f"weights in {weights_file!r} do not match its config: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "DualCodebookTokenizer", "EncodedFeatures"]
