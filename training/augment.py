"""Batch augmentation on the training device (seed-spec, "Augmentation", train part).

From cached uint8 images [B, 1, C, C] (C = image_size / 0.9): optional left-right mirror (the
balancing copies), a random crop of 90% of the image, resize to image_size, random affine
(rotation +-7 degrees, translation up to 6%) -- crop, resize and affine composed into one
``grid_sample`` -- then Gaussian blur (kernel 3, sigma 0.2-1.5) with probability 0.4 and the
ImageNet normalisation. Running it batched on the GPU keeps the data path off the critical path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxr_batch.preprocess import Preprocessing, center_crop, normalise, resize


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 7.0
    translate: float = 0.06
    blur_p: float = 0.4
    blur_sigma: tuple[float, float] = (0.2, 1.5)


def train_transform(batch: torch.Tensor, mirror: torch.Tensor, prep: Preprocessing,
                    aug: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None) -> torch.Tensor:
    """batch uint8 [B, 1, C, C], mirror bool [B] -> float [B, 3, S, S] normalised."""
    B, dev = batch.shape[0], batch.device
    x = batch.float().div_(255.0)
    x = torch.where(mirror.view(B, 1, 1, 1), x.flip(-1), x)

    def uniform(lo, hi):
        return torch.rand(B, device=dev, generator=generator) * (hi - lo) + lo

    s = prep.crop_fraction
    cx, cy = uniform(-(1 - s), 1 - s), uniform(-(1 - s), 1 - s)  # crop window centre, normalised coords
    angle = uniform(-aug.rotation_deg, aug.rotation_deg) * math.pi / 180
    tx, ty = uniform(-2 * aug.translate, 2 * aug.translate), uniform(-2 * aug.translate, 2 * aug.translate)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output coords -> crop coords (inverse rotation and translation) -> input coords
    theta = torch.stack([
        torch.stack([s * cos, s * sin, s * (cos * -tx + sin * -ty) + cx], dim=1),
        torch.stack([-s * sin, s * cos, s * (-sin * -tx + cos * -ty) + cy], dim=1),
    ], dim=1)
    size = (B, 1, prep.image_size, prep.image_size)
    grid = F.affine_grid(theta, size, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = blur(x, aug, generator)
    return normalise(x, prep)


def blur(x: torch.Tensor, aug: AugmentConfig, generator=None) -> torch.Tensor:
    """Gaussian blur, kernel 3, a random sigma per image, applied with probability blur_p."""
    B, dev = x.shape[0], x.device
    sigma = torch.rand(B, device=dev, generator=generator) * (aug.blur_sigma[1] - aug.blur_sigma[0]) + aug.blur_sigma[0]
    apply = torch.rand(B, device=dev, generator=generator) < aug.blur_p
    k1 = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0], device=dev)[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).view(B, 1, 3, 3)
    blurred = F.conv2d(F.pad(x.transpose(0, 1), (1, 1, 1, 1), mode="reflect"), k2, groups=B).transpose(0, 1)
    return torch.where(apply.view(B, 1, 1, 1), blurred, x)


def eval_transform_batch(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Cached uint8 [B, 1, C, C] -> [B, 3, S, S]: centre crop 90%, resize, normalise (as inference)."""
    x = batch.float().div_(255.0)
    return normalise(resize(center_crop(x, prep.crop_fraction), prep.image_size).clamp_(0, 1), prep)
