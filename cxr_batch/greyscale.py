"""Mapping stored pixel values to the 8-bit grey scale the model was trained on."""

from __future__ import annotations

import numpy as np

# Percentiles that define the "robust range" used when deep (over 8-bit) pixel data carry no
# window. Nearly the full range: the NIH PNGs the model learned from span almost all of 0..255
# (median image: 0 to 251), so a narrower range would raise the contrast above what the model
# saw; the extreme 0.01% at each end only drops dead and hot pixels.
ROBUST_LOW_PERCENTILE = 0.01
ROBUST_HIGH_PERCENTILE = 99.99


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to [0, 255] (clipped), returning uint8."""
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        raise ValueError(f"invalid grey range [{low}, {high}]")
    # in place on one float32 copy: a 40-megapixel image costs 160 MB here, not four times that
    scaled = values.astype(np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(255.0 / (high - low))
    scaled += np.float32(0.5)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """The 0.01th..99.99th percentile range of an image; falls back to min..max when flat."""
    sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
    low, high = np.percentile(sample, [ROBUST_LOW_PERCENTILE, ROBUST_HIGH_PERCENTILE])
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0  # a constant image maps to black rather than failing
    return float(low), float(high)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Grey values of any integer or float type -> uint8, windowed to their robust range.
    uint8 input is returned unchanged (it already is what the model was trained on)."""
    if values.dtype == np.uint8:
        return values
    return window_to_uint8(values, *robust_range(values))
