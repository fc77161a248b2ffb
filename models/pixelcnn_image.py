"""ResNet encoder and PixelCNN decoder for 28x28 binary images (He et al. 2019, OMNIGLOT model).

The decoder maps z linearly to a few 28x28 feature maps, concatenates them to the image,
and runs a PixelCNN: one type-A masked convolution (the image channel may not see the
current pixel) followed by residual blocks of type-B masked convolutions. Unlike the
reference code it uses no batch normalisation: batch statistics would make one image's
likelihood depend on the rest of the batch, and spatial normalisation in the decoder
would leak later pixels into earlier ones. The encoder uses per-example GroupNorm instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from .base import LatentPair, expand_data, flatten_latent, rand
from .mlp_image import IMAGE_SHAPE, check_images

SIDE = 28


class MaskedConv2d(nn.Conv2d):
    """Convolution whose kernel cannot see later pixels (raster order) of the first ``masked_channels`` inputs.

    Type A also hides the current pixel; type B lets it through.
    """

    def __init__(self, mask_type: str, masked_channels: int, in_channels: int, out_channels: int, kernel_size: int) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"masked convolutions need an odd kernel_size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel_size // 2
        mask[:, :masked_channels, centre, centre + (mask_type == "B"):] = 0
        mask[:, :masked_channels, centre + 1:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNNBlock(nn.Module):
    """Residual block: 1x1 conv to half width, type-B masked conv, 1x1 conv back, ELU after the sum."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        half = max(channels // 2, 1)
        self.main = nn.Sequential(
            nn.Conv2d(channels, half, 1), nn.ELU(),
            MaskedConv2d("B", half, half, half, kernel_size), nn.ELU(),
            nn.Conv2d(half, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.main(x) + x)


class PixelCNNDecoder(nn.Module):
    """Bernoulli logits ``[N, 1, 28, 28]`` for images ``[N, 1, 28, 28]`` given z ``[N, D]`` (or no z)."""

    def __init__(self, latent_dim: int, hidden: int, kernel_sizes: Sequence[int], latent_feature_maps: int) -> None:
        super().__init__()
        if not kernel_sizes:
            raise ValueError("kernel_sizes must name at least one layer")
        self.feature_maps = latent_feature_maps if latent_dim > 0 else 0
        self.z_transform = nn.Linear(latent_dim, self.feature_maps * SIDE * SIDE) if latent_dim > 0 else None
        self.first = MaskedConv2d("A", 1, 1 + self.feature_maps, hidden, kernel_sizes[0])
        self.blocks = nn.Sequential(*(PixelCNNBlock(hidden, k) for k in kernel_sizes[1:]))
        self.head = nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.ELU(), nn.Conv2d(hidden, 1, 1))
        # How far (in pixels) one output looks: up/left/right through every layer, down only
        # through the unmasked latent maps of the first layer.
        self.reach = sum(k // 2 for k in kernel_sizes)
        self.reach_down = kernel_sizes[0] // 2

    def latent_maps(self, z: torch.Tensor | None) -> torch.Tensor | None:
        """The latent feature maps ``[N, F, 28, 28]`` that condition every pixel (None without z)."""
        if z is None:
            return None
        return self.z_transform(z).reshape(z.shape[0], self.feature_maps, SIDE, SIDE)

    def from_maps(self, x: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        """Logits for images ``x`` given precomputed latent maps (same height and width as x)."""
        if maps is not None:
            x = torch.cat([x, maps], dim=1)
        return self.head(self.blocks(F.elu(self.first(x))))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return self.from_maps(x, self.latent_maps(z))

    def pixel_logits(self, x: torch.Tensor, maps: torch.Tensor | None, i: int, j: int) -> torch.Tensor:
        """Logit ``[N]`` of pixel (i, j), computed on the smallest window that determines it (for sampling)."""
        r0, r1 = max(0, i - self.reach), min(SIDE, i + self.reach_down + 1)
        c0, c1 = max(0, j - self.reach), min(SIDE, j + self.reach + 1)
        window = None if maps is None else maps[:, :, r0:r1, c0:c1]
        return self.from_maps(x[:, :, r0:r1, c0:c1], window)[:, 0, i - r0, j - c0]


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and ELU, plus a (projected) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.GroupNorm(1, out_channels), nn.ELU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.GroupNorm(1, out_channels),
        )
        self.skip = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.GroupNorm(1, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.main(x) + self.skip(x))


class ResNetEncoder(nn.Module):
    """Stride-2 ResNet blocks, a convolution over the remaining map, and a linear map to (loc, scale)."""

    def __init__(self, channels: Sequence[int], hidden: int, latent_dim: int) -> None:
        super().__init__()
        blocks, in_ch, side = [], 1, SIDE
        for ch in channels:
            blocks.append(ResNetBlock(in_ch, ch, stride=2))
            in_ch, side = ch, (side + 1) // 2
        self.main = nn.Sequential(
            *blocks, nn.Conv2d(in_ch, hidden, side, bias=False), nn.GroupNorm(1, hidden), nn.ELU(), nn.Flatten(),
        )
        self.linear = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_variance = self.linear(self.main(x)).chunk(2, dim=-1)
        return loc, (0.5 * log_variance).exp()  # log-variance, as the paper's encoder


class PixelCNNImageVAE(LatentPair):
    """VAE with a ResNet encoder and a PixelCNN decoder on 28x28 binary images ``[B, 1, 28, 28]``."""

    kind = "image"

    def __init__(
        self,
        latent_dim: int = 32,
        enc_channels: Sequence[int] = (64, 64, 64),
        enc_hidden: int = 512,
        hidden: int = 64,
        kernel_sizes: Sequence[int] = (7, 7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3),
        latent_feature_maps: int = 4,
        name: str = "pixelcnn-image",
    ) -> None:
        super().__init__()
        if latent_dim < 0:
            raise ValueError(f"latent_dim must be >= 0, got {latent_dim}")
        self._config = dict(
            latent_dim=latent_dim, enc_channels=tuple(enc_channels), enc_hidden=enc_hidden, hidden=hidden,
            kernel_sizes=tuple(kernel_sizes), latent_feature_maps=latent_feature_maps, name=name,
        )
        self.name = name
        self.latent_dim = latent_dim
        self.encoder = ResNetEncoder(enc_channels, enc_hidden, latent_dim) if latent_dim > 0 else None
        self.decoder = PixelCNNDecoder(latent_dim, hidden, kernel_sizes, latent_feature_maps)

    def logits(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Pixel logits ``[*S, B, 1, 28, 28]`` for z ``[*S, B, D]`` (``[B, 1, 28, 28]`` without z)."""
        check_images(x)
        if z is None:
            return self.decoder(x, None)
        z_flat, lead = flatten_latent(z, x.shape[0])
        return self.decoder(expand_data(x, lead), z_flat).reshape(*lead, x.shape[0], *IMAGE_SHAPE)

    def likelihood(self, x: torch.Tensor, z: torch.Tensor | None) -> Distribution:
        return dist.Bernoulli(logits=self.logits(x, z)).to_event(3)

    def decode(self, z: torch.Tensor | None, n: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample images pixel by pixel (raster order) given z ``[N, D]`` (or ``n`` without z).

        Returns the Bernoulli means ``[N, 1, 28, 28]`` of the last pass, i.e. each pixel's
        probability given z and the sampled pixels before it.
        """
        count = z.shape[0] if z is not None else n
        device = self.device
        with self.evaluating():
            maps = self.decoder.latent_maps(z)
            img = torch.zeros(count, *IMAGE_SHAPE, device=device)
            for i in range(SIDE):
                for j in range(SIDE):
                    probs = self.decoder.pixel_logits(img, maps, i, j).sigmoid()
                    img[:, 0, i, j] = (rand((count,), generator, device) < probs).float()
            return self.decoder.from_maps(img, maps).sigmoid()

    def sample_prior(self, n: int, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """Mean images ``[n, 1, 28, 28]`` (see :meth:`decode`) for z ~ N(0, I)."""
        return self.decode(self._prior_z(n, generator), n=n, generator=generator)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """Mean images decoded autoregressively from each posterior mean E_q[z | x]."""
        check_images(x)
        with self.evaluating():
            z = self.encode(x)[0] if self.latent_dim > 0 else None
        return self.decode(z, n=x.shape[0], generator=generator)
