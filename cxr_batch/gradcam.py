"""Grad-CAM heatmaps: where the model looked for one finding.

For finding c, the gradient of its logit with respect to a pyramid level's feature map is
averaged per channel into weights; the weighted sum of the feature maps, through a ReLU and
upsampled to the input size, is the heatmap (Selvaraju et al., 2017). Maps are returned in
their own units, not scaled to [0, 1]: a report scales each map on its own and prints its
strength beside it (:func:`cxr_batch.reports.own_scale`), so a weak map next to a strong one is
never drawn invisible.

Which level: a map can only point to a lung zone if its grid is fine enough and its features
carry the findings. The FPN's levels have strides 8 (P3), 16 (P4) and 32 (P5); :func:`map_level`
takes P4 when it has at least :data:`MIN_CELLS` cells a side (8 x 8 at 128 px, 14 x 14 at 224 px:
the top-down pathway gives it P5's semantics at twice its resolution), else none, and the report
says why instead of drawing blobs. P3 is not a fallback: at 64 px its 8 x 8 maps of v3 put their
hottest point inside NIH's radiologist boxes no more often than a random point
(``python benchmarks/gradcam_pointing.py --level p3``: 7 of 56 boxes, chance 0.10).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .model import CxrFusionNet

LEVEL = "p4"
STRIDES = {"p3": 8, "p4": 16, "p5": 32}
MIN_CELLS = 8  # cells a side a map needs: lung zones (upper, middle, lower) on each side, with room


def map_level(image_size: int) -> tuple[str, int] | None:
    """(level, cells a side) of the map a report draws for a model of ``image_size`` px, or
    None when P4 is coarser than :data:`MIN_CELLS` cells a side."""
    cells = image_size // STRIDES[LEVEL]
    return (LEVEL, cells) if cells >= MIN_CELLS else None


def gradcam(model: CxrFusionNet, image: torch.Tensor, tabular: torch.Tensor, classes: list[int],
            level: str = LEVEL) -> dict[int, np.ndarray]:
    """image [3, S, S] (normalised), tabular [3] -> {class index: raw heatmap [S, S], >= 0}.

    Runs in float32 on the model's device with gradients, one forward and one backward per
    class; only called for flagged findings.
    """
    if not classes:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = image[None].to(device, torch.float32)
            levels = model.pyramid(x)
            features = levels[level]
            logits = model.head_from_pyramid(levels, tabular[None].to(device, torch.float32))
            maps = {}
            for i, c in enumerate(classes):
                (grad,) = torch.autograd.grad(logits[0, c], features, retain_graph=i < len(classes) - 1)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * features).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
                maps[c] = cam.detach().cpu().numpy()
            return maps
    finally:
        model.train(was_training)
