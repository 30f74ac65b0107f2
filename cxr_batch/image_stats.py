"""A few statistics of each image as the model sees it, for drift monitoring.

Computed on the preprocessed model input (after crop and resize, before normalisation: grey
levels in [0, 1]), for a whole batch at once, so they describe exactly what inference received
and cost little next to the forward pass (``benchmarks/drift_detection.py`` prints the
figure). They are chosen to move when an export setting changes:

- ``intensity_p05``/``p50``/``p95``, ``intensity_mean``, ``intensity_std`` (contrast): the
  grey-level distribution (a different window, a flatter look-up table, another detector);
- ``intensity_skew``: (p95 + p05 - 2 p50) / (p95 - p05), the asymmetry of the grey levels
  (negative on the NIH radiographs: most of the image is brighter than its darkest parts), which
  changes sign when grey levels are inverted, while the mean and the contrast barely move;
- ``inversion_cue``: mean of the central vertical band (spine and mediastinum, bright on a
  MONOCHROME2 radiograph) minus that of the two lateral bands (the lungs, dark): positive on a
  chest radiograph shown as the model was trained, negative when grey levels are inverted;
- ``top_bottom`` (lower half minus upper half) and ``left_right`` (right half minus left half of
  the image): orientation cues that change sign when an image is upside down or mirrored;
- ``sharpness``: mean absolute difference between neighbouring pixels relative to
  ``intensity_std``: lower when a small image is enlarged (or a smoothing filter is applied).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# Rows of the image used by the band cues: 20%..80% of the height (leaves out the shoulders
# and the abdomen, which vary most between exposures).
BAND_ROWS = (0.2, 0.8)
VALUE_FORMAT = ".4f"  # as results.csv holds each statistic (drift compares every source at this precision)


@dataclass(frozen=True)
class ImageStats:
    intensity_p05: float
    intensity_p50: float
    intensity_p95: float
    intensity_mean: float
    intensity_std: float
    intensity_skew: float
    inversion_cue: float
    top_bottom: float
    left_right: float
    sharpness: float

    def to_row(self) -> dict[str, str]:
        return {f.name: format(getattr(self, f.name), VALUE_FORMAT) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict) -> "ImageStats | None":
        """From results.csv cells; None when the row has none (not scored, or an older file)."""
        try:
            return cls(**{f.name: float(row[f.name]) for f in fields(cls)})
        except (KeyError, TypeError, ValueError):
            return None

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict | None) -> "ImageStats | None":
        if not data:
            return None
        try:
            return cls(**{f.name: float(data[f.name]) for f in fields(cls)})
        except (KeyError, TypeError, ValueError):
            return None


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ImageStats))


def image_statistics(images, mean: float, std: float) -> list[ImageStats]:
    """Statistics of a batch of normalised model inputs (a tensor [B, C, S, S] on any device;
    channel 0 is the grey image; ``mean``/``std``: that channel's normalisation). One entry per
    image. In numpy on the host: on a CPU, a dozen small torch operations cost several times
    more than the same numpy ones (thread hand-offs per operation); a GPU batch sends only its
    grey channel."""
    if images is None or len(images) == 0:
        return []
    grey = images[:, 0].detach().float().cpu().numpy() * std + mean  # [B, S, S]: grey levels in [0, 1]
    b, h, w = grey.shape
    flat = grey.reshape(b, -1)
    p05, p50, p95 = np.percentile(flat, [5, 50, 95], axis=1)
    avg, sd = flat.mean(axis=1), flat.std(axis=1)
    top = round(h * BAND_ROWS[0])
    band = grey[:, top:max(round(h * BAND_ROWS[1]), top + 1)]
    third = max(1, w // 3)
    centre = band[:, :, third:w - third].mean(axis=(1, 2))
    sides = np.concatenate([band[:, :, :third], band[:, :, w - third:]], axis=2).mean(axis=(1, 2))
    half_h, half_w = h // 2, w // 2
    top_bottom = grey[:, h - half_h:].mean(axis=(1, 2)) - grey[:, :half_h].mean(axis=(1, 2))
    left_right = grey[:, :, w - half_w:].mean(axis=(1, 2)) - grey[:, :, :half_w].mean(axis=(1, 2))
    edges = (np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2)) + np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2))) / 2
    sharp = edges / np.maximum(sd, 1e-3)  # a flat image (std ~ 0) has no meaningful sharpness: bounded
    skew = (p95 + p05 - 2 * p50) / np.maximum(p95 - p05, 1e-3)
    table = np.stack([p05, p50, p95, avg, sd, skew, centre - sides, top_bottom, left_right, sharp], axis=1)
    return [ImageStats(*(float(v) for v in row)) for row in table.tolist()]


def looks_inverted(stats: ImageStats) -> bool:
    """Whether one image looks like a chest radiograph with its grey levels inverted (an export
    that negates them, a MONOCHROME1 file shown as MONOCHROME2): its band cue and its grey-level
    asymmetry both point the wrong way (``inversion_cue < 0`` and ``intensity_skew > 0``). Both
    change sign when the grey levels are inverted and neither when the film is upside down or
    mirrored; each alone is sometimes reversed on a radiograph shown right (the band cue on 7% of
    the NIH images, 16% of nih_extra's). Both: 0.6% and 1.6% of them, the same upside down 0.6%
    and 1.7%; catches 75.6% and 73.6% of the same images inverted (upright or upside down alike).
    The rule was ``inversion_cue + top_bottom < 0`` (catches 99%), but ``top_bottom`` is an
    orientation cue: it counted 72% of the films upside down as inverted (figures:
    ``benchmarks/inversion_check.py``). A film turned by 90 degrees still may (11 to 17%), as may
    a lateral or a paediatric film: a count of such images says "look at these", not "these are
    inverted"."""
    # as results.csv holds them: a study reads the same from the CSV, the ledger or a batch
    cue, skew = (float(format(v, VALUE_FORMAT)) for v in (stats.inversion_cue, stats.intensity_skew))
    return cue < 0 and skew > 0
