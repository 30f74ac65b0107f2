"""Threshold choice in a training run: the searches live in :mod:`cxr_batch.thresholds` (shared with
``cxr-batch calibrate``); this picks one by the run's configuration."""

from __future__ import annotations

import numpy as np

from cxr_batch.thresholds import dynamic, precision_constrained, youden


def choose(method: str, y_true: np.ndarray, y_prob: np.ndarray, cfg) -> np.ndarray:
    """Dispatch by name: 'youden', 'precision_f1' or 'dynamic' (options from the config)."""
    if method == "youden":
        return youden(y_true, y_prob)
    if method == "precision_f1":
        return precision_constrained(y_true, y_prob, cfg.precision_min)[0]
    if method == "dynamic":
        return dynamic(y_true, y_prob, cfg.dynamic_precision_min, cfg.dynamic_f1_floor, cfg.dynamic_step)
    raise ValueError(f"unknown threshold method {method!r}: youden, precision_f1 or dynamic")
