"""Image preprocessing: the one definition shared by training (evaluation part) and inference.

Input is a grey image as the model was trained on it: a 2-D uint8 array like the 8-bit NIH
PNGs (readers window DICOM pixel data into that range). The evaluation transform, from the
study: centre crop 90% of the image, resize to ``image_size`` (square), replicate the grey
channel to 3 and normalise with the ImageNet mean and std. A weights bundle stores this
configuration, and inference rebuilds the transform from the bundle, never from defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, bounded, validate


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = bounded(224, min=16, max=4096)
    crop_fraction: float = bounded(0.9, gt=0.0, max=1.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        validate(self, "preprocessing")
        if min(self.std) <= 0:
            raise ConfigError(f"preprocessing.std = {self.std}: must be positive")

    @property
    def min_side(self) -> int:
        """The short side a decoder must deliver (when it can deliver less for free): twice what
        the centre crop needs to cover ``image_size`` pixels. A wavelet level's low-pass is not
        the resize's antialiasing filter; with one level of headroom the resize does the last
        averaging itself and the probabilities stay close to a full decode's
        (tests/test_speed_paths.py holds them within 0.01 for the bundled weights)."""
        return 2 * math.ceil(self.image_size / self.crop_fraction)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["input"] = "grey uint8 (8-bit-like, MONOCHROME2: bright bone), replicated to 3 channels"
        d["resize"] = "bilinear with antialias, to image_size x image_size"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            image_size=int(d["image_size"]),
            crop_fraction=float(d["crop_fraction"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )


def to_unit_tensor(grey: np.ndarray) -> torch.Tensor:
    """uint8 array [H, W] -> float32 tensor [1, H, W] in [0, 1]."""
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    # np.require copies only arrays torch cannot share (read-only or non-contiguous).
    return torch.from_numpy(np.require(grey, requirements=["C", "W"])).to(torch.float32).div_(255.0)[None]


def center_crop(image: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the central ``fraction`` of height and width of a [..., H, W] tensor."""
    h, w = image.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[..., top : top + ch, left : left + cw]


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a [C, H, W] or [B, C, H, W] tensor to size x size (bilinear, antialiased)."""
    if image.shape[-2:] == (size, size):
        return image
    batch = image if image.ndim == 4 else image[None]
    out = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out if image.ndim == 4 else out[0]


def normalise(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """[..., 1, H, W] in [0, 1] -> [..., 3, H, W] normalised with the ImageNet statistics."""
    mean = torch.tensor(prep.mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(prep.std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    shape = list(image.shape)
    shape[-3] = 3
    return (image.expand(shape) - mean) / std


def denormalise(image: torch.Tensor, prep: Preprocessing) -> np.ndarray:
    """A normalised model input [3, S, S] -> the grey image the model saw, [S, S] in [0, 1]."""
    return (image[0].float() * prep.std[0] + prep.mean[0]).clamp(0, 1).cpu().numpy()


def model_view(grey: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """The radiograph as the model sees it, before normalisation: [1, S, S] in [0, 1]."""
    return resize(center_crop(to_unit_tensor(grey), prep.crop_fraction), prep.image_size).clamp_(0.0, 1.0)


def eval_transform(grey: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """The evaluation/inference transform: uint8 [H, W] -> float32 [3, S, S]."""
    return normalise(model_view(grey, prep), prep)


def eval_transform_batch(greys: list[np.ndarray], prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """:func:`eval_transform` of several images on ``device`` (a GPU): uint8 images travel
    (a quarter of float32's bytes, from pinned memory), and images of one size are cropped,
    resized and normalised together. -> float32 [N, 3, S, S] on ``device``, in input order."""
    out = torch.empty((len(greys), 3, prep.image_size, prep.image_size), dtype=torch.float32, device=device)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, grey in enumerate(greys):
        by_shape.setdefault(grey.shape, []).append(i)
    for positions in by_shape.values():
        stack = torch.from_numpy(np.stack([greys[i] for i in positions]))
        if device.type == "cuda":
            stack = stack.pin_memory()
        x = stack.to(device, non_blocking=True)[:, None].to(torch.float32).div_(255.0)
        x = resize(center_crop(x, prep.crop_fraction), prep.image_size).clamp_(0.0, 1.0)
        out[positions] = normalise(x, prep)
    return out
