"""From probabilities to flags, findings and a triage priority.

Flags: a finding is flagged when its probability reaches the bundle's threshold for it.
Priority: "urgent" when a flagged finding is in the urgent set (default Pneumothorax),
"abnormal" when any finding is flagged, "normal" otherwise.
Triage score (orders studies inside a priority on the worklist): the largest margin by
which a probability exceeds its threshold, as a fraction of the room above the threshold,
``max_f (p_f - t_f) / (1 - t_f)`` over all findings. Positive exactly when something is
flagged, 1 for a certain finding, and comparable across findings with different thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .findings import DEFAULT_URGENT, FINDINGS

PRIORITIES = ("urgent", "abnormal", "normal")


@dataclass(frozen=True)
class Triage:
    flags: np.ndarray  # [14] of 0/1
    findings: list[str]
    priority: str
    score: float


def triage(probs: np.ndarray, thresholds: np.ndarray, urgent=DEFAULT_URGENT) -> Triage:
    """probs, thresholds: [14] arrays in FINDINGS order."""
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    flags = (probs >= thresholds).astype(np.int8)
    flagged = [f for f, on in zip(FINDINGS, flags) if on]
    if any(f in urgent for f in flagged):
        priority = "urgent"
    elif flagged:
        priority = "abnormal"
    else:
        priority = "normal"
    margins = (probs - thresholds) / np.maximum(1.0 - thresholds, 1e-6)
    return Triage(flags, flagged, priority, float(np.max(margins)))
