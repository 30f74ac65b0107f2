"""Fold the out-of-fold-fitted combination into a trained ``CxrFusionNet`` so that the exported
model's plain ``sigmoid(logits)`` is the calibrated probability.

The image path of model v2 is trained with the patient input fixed at the "unknown" code ``u``,
so its logits are image evidence ``z_img(image) = head(image_proj(...), tabular_proj(u)) +
tabular_skip(u)``. After training:

1. :func:`freeze_tabular_proj` makes ``tabular_proj`` ignore its input (weight 0, bias set to
   the pre-activation it had at ``u``): the deep path can never react to patient data it never
   saw, and its output is unchanged for every input;
2. :func:`fold_combination` rescales the last head layer by ``a`` and rewrites ``tabular_skip``
   so that the logits become, per finding k,

       a_k * z_img_k + c_k * coef_k . (x - mean_x) + b_k

   with the centred patient prior (``training.prior``) and the combination ``a, c, b``
   (``training.cvstats.fit_combination``).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def freeze_tabular_proj(model, unknown: torch.Tensor) -> None:
    linear = model.tabular_proj[0]
    pre = linear(unknown.to(linear.weight).view(1, -1))[0]
    linear.weight.zero_()
    linear.bias.copy_(pre)


@torch.no_grad()
def fold_combination(model, unknown: torch.Tensor, a, c, b, coef, mean_x) -> None:
    """Rewrite ``head[-1]`` and ``tabular_skip`` in place (see the module docstring). ``a, c, b``
    [K], ``coef`` [K, 3], ``mean_x`` [3]. Call :func:`freeze_tabular_proj` first."""
    if model.tabular_skip is None:
        raise ValueError("model v2 needs ModelConfig(tabular_skip=True)")
    last, skip = model.head[-1], model.tabular_skip
    dev = last.weight
    a, c, b = (torch.as_tensor(np.asarray(v, dtype=np.float64)).to(dev) for v in (a, c, b))
    coef = torch.as_tensor(np.asarray(coef, dtype=np.float64)).to(dev)
    mean_x = torch.as_tensor(np.asarray(mean_x, dtype=np.float64)).to(dev)
    s_u = skip(unknown.to(dev).view(1, -1))[0]  # the constant the skip path added during training
    last.weight.mul_(a[:, None])
    last.bias.mul_(a)
    skip.weight.copy_(c[:, None] * coef)
    skip.bias.copy_(a * s_u + b - c * (coef @ mean_x))


def combined_logits_formula(z_img: np.ndarray, x: np.ndarray, a, c, b, coef, mean_x) -> np.ndarray:
    """The same log-odds computed from image logits [N, K] and patient vectors [N, 3]."""
    z_prior = (x - np.asarray(mean_x)) @ np.asarray(coef).T
    return np.asarray(a) * z_img + np.asarray(c) * z_prior + np.asarray(b)
