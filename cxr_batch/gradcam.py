"""Grad-CAM heatmaps: where the model looked for one finding.

For finding c, the gradient of its logit with respect to a pyramid level's feature map is
averaged per channel into weights; the weighted sum of the feature maps, through a ReLU and
upsampled to the input size, is the heatmap (Selvaraju et al., 2017). Maps are returned in
their own units, not scaled to [0, 1]: a report puts all of a study's maps on one colour scale
(:func:`cxr_batch.reports.shared_scale`), so weak evidence is drawn faint next to strong.
The level is P4 (14 x 14 at 224 px): the FPN's top-down pathway gives it P5's semantics at
twice P5's resolution, so maps are less blocky than the 7 x 7 of the last level.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .model import CxrFusionNet

LEVEL = "p4"


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
