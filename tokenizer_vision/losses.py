"""Training losses of the tokenizer: reconstruction, semantic distillation, perceptual, adversarial.

The VQ / commitment / entropy terms live with the quantizer (`quantizer.py`); `model.py` weighs all
terms into the total. Every loss is computed in fp32, also under bf16 autocast.

Defaults use neither LPIPS nor the GAN. Both are opt-in (`perceptual_weight`, `gan_weight`), and
LPIPS reads its weights from a LOCAL safetensors file only: nothing here ever downloads.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tokenizer_vision.encoders import group_norm


def pixel_l1_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between (B, 3, H, W) images."""
    return F.l1_loss(reconstruction.float(), target.float())


def pixel_l2_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between (B, 3, H, W) images."""
    return F.mse_loss(reconstruction.float(), target.float())


def semantic_distillation_loss(predicted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over channels between (B, C_t, h, w) feature maps, averaged over positions.

    Cosine rather than L2 because teacher features (e.g. SigLIP's) have large, layer-dependent norms;
    the direction carries the semantics.
    """
    return 1.0 - F.cosine_similarity(predicted.float(), teacher.float(), dim=1).mean()


# ---------------------------------------------------------------------------- LPIPS

# torchvision's vgg16().features layer list: ints are 3x3 conv widths, "M" a 2x2 max pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: these index ranges of the layer list.
_LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class _ScalingLayer(nn.Module):
    """Maps [-1, 1] images to VGG's ImageNet normalisation (constants from the lpips package)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _VGG16Slices(nn.Module):
    """VGG16 features cut into LPIPS's five slices, keeping torchvision's layer indices as names."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in _VGG16_LAYOUT:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, entry, 3, padding=1), nn.ReLU()]
                in_channels = entry
        for number, (start, end) in enumerate(_LPIPS_SLICES, start=1):
            stage = nn.Sequential()
            for index in range(start, end):
                stage.add_module(str(index), layers[index])
            self.add_module(f"slice{number}", stage)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for number in range(1, len(_LPIPS_SLICES) + 1):
            x = getattr(self, f"slice{number}")(x)
            taps.append(x)
        return taps


class _LinearHead(nn.Module):
    """LPIPS's learned per-channel weights (a 1x1 conv to one channel); dropout is a no-op in eval."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS-VGG perceptual distance (Zhang et al. 2018), frozen; images in [-1, 1].

    Parameter names match `lpips.LPIPS(net="vgg").state_dict()`, so the weights file is made once,
    on a machine that has the `lpips` package and its weights, with
        safetensors.torch.save_file(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.safetensors")
    and read here with `LPIPS.from_safetensors(path)`. Written out (rather than depending on `lpips`)
    because that package fetches torchvision weights from the internet when constructed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Slices()
        for number, channels in enumerate(_LPIPS_CHANNELS):
            self.add_module(f"lin{number}", _LinearHead(channels))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike) -> LPIPS:
        if not os.path.isfile(path):
            raise ValueError(
                f"LPIPS weights not found at {os.fspath(path)!r}: perceptual_path must be a local "
                "safetensors file (see tokenizer_vision.losses.LPIPS for how to make one)"
            )
        module = cls()
        module.load_state_dict(load_file(os.fspath(path)), strict=True)
        return module

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a frozen metric: dropout stays off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) x2 in [-1, 1] -> (B,) perceptual distances."""
        features_x = self.net(self.scaling_layer(x.float()))
        features_y = self.net(self.scaling_layer(y.float()))
        distance = x.new_zeros(x.shape[0], dtype=torch.float32)
        for number, (fx, fy) in enumerate(zip(features_x, features_y)):
            fx = fx.float() / (fx.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-length channels
            fy = fy.float() / (fy.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            distance = distance + getattr(self, f"lin{number}")((fx - fy).pow(2)).float().mean(dim=(1, 2, 3))
        return distance


# ---------------------------------------------------------------------------- PatchGAN


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, Isola et al. 2017, as used by VQGAN).

    (B, 3, H, W) -> (B, 1, H', W') real/fake logits, one per overlapping patch. GroupNorm instead of
    BatchNorm so the result does not depend on the batch composition or on DDP buffer syncing.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for layer in range(1, num_layers + 1):
            next_width = channels * min(2**layer, 8)
            stride = 2 if layer < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                group_norm(next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: real above +1, fake below -1."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator: raise the discriminator's logits on reconstructions."""
    return -fake_logits.float().mean()


__all__ = [
    "LPIPS",
    "PatchDiscriminator",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "pixel_l1_loss",
    "pixel_l2_loss",
    "semantic_distillation_loss",
]
