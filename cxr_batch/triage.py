"""From probabilities to flags, a bucket and a place on the worklist.

A bundle's triage policy (:class:`TriagePolicy`, from the manifest's ``thresholds`` and, for
bundles that carry one, its ``triage`` table) says:

- **flags**: finding k is flagged when its probability reaches its operating point
  (``thresholds``), unless the bundle marks it as not flagged at all (a finding whose validation
  ranking was no better than chance: ``triage.findings.<name>.flagged = false``);
- **P(any finding)**: a study-level probability that the study has at least one of the 14
  findings, ``sigmoid(bias + sum_k w_k * -log(1 - p_k))``: a weighted noisy-OR (with all weights
  1 and bias 0 it is ``1 - prod_k (1 - p_k)``, the findings taken as independent; the weights
  are fitted out of fold at export). A sum of logits would drown the one finding a study has in
  the noise of the thirteen it has not; -log(1 - p) is near 0 for an unlikely finding and grows
  fast for a likely one. Bundles without a study-level model use the plain noisy-OR. A site
  calibration (``cxr-batch calibrate``) records itself as ``input_calibration``: P(any) undoes
  it before the weights apply, so the study-level model sees the probabilities it was fitted
  on, and its own level moves by ``bias`` alone;
- **buckets**: ``urgent`` when an urgent finding (default Pneumothorax) is flagged, whatever
  else; ``normal`` when P(any) is below the bundle's ``normal_below``: the study-level model
  gates the findings, so a low-probability study carries no finding flag (14 findings at 90%
  specificity each would put a false flag on most studies without any finding, and "normal"
  and "flagged" would contradict each other); ``abnormal`` otherwise. Without a cutoff (bundles
  without a ``triage`` table), ``normal`` means nothing flagged;
- **worklist order** (:func:`worklist_key`): urgent studies first, by the urgent finding's
  probability, then abnormal, then normal studies, each by P(any), highest first.
  ``triage_score`` is the number that orders a study inside its bucket (the urgent finding's
  probability, or P(any)); ``worklist_rank`` is 1 for the study to read first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .findings import DEFAULT_URGENT, FINDINGS

PRIORITIES = ("urgent", "abnormal", "normal")
BUCKET_ORDER = {p: i for i, p in enumerate(PRIORITIES)}


def priority_words(priority: str, normal_below: float | None) -> str:
    """A bucket as every output names it in counts and titles: "normal" is never a clean bill;
    with a P(any) cutoff it is "low probability of any finding", without one (v1, v2 bundles) it
    holds every study with nothing flagged, whatever its P(any), and is named for that."""
    if priority != "normal":
        return priority
    return "low probability of any finding" if normal_below is not None else "no finding flagged"


class TriageError(ValueError):
    """A bundle's ``triage`` table that inference must not use."""


@dataclass(frozen=True)
class TriagePolicy:
    thresholds: np.ndarray  # [14] operating points on the (calibrated) probability
    flaggable: np.ndarray  # [14] bool: False = never flagged
    any_weights: np.ndarray | None = None  # [14]; None: 1 - prod(1 - p)
    any_bias: float = 0.0
    normal_below: float | None = None  # P(any) below it = normal (unless an urgent finding is flagged)
    urgent: tuple[str, ...] = DEFAULT_URGENT
    input_slope: np.ndarray | None = None  # a site calibration to undo before P(any): [14]
    input_intercept: np.ndarray | None = None

    @classmethod
    def simple(cls, thresholds, urgent=DEFAULT_URGENT) -> "TriagePolicy":  # noqa: D417
        """Thresholds only (bundles without a ``triage`` table): every finding flaggable,
        P(any) as if findings were independent, normal = nothing flagged."""
        return cls(np.asarray(thresholds, dtype=np.float64), np.ones(len(FINDINGS), dtype=bool), urgent=tuple(urgent))

    @classmethod
    def from_manifest(cls, manifest: dict, urgent=DEFAULT_URGENT) -> "TriagePolicy":
        """The policy a manifest describes. Raises TriageError for a malformed ``triage`` table
        (the thresholds themselves are checked by the bundle loader)."""
        thresholds = np.array([float(manifest["thresholds"][f]) for f in FINDINGS])
        table = manifest.get("triage")
        if table is None:
            return cls.simple(thresholds, urgent)
        if not isinstance(table, dict):
            raise TriageError("'triage' must be a table")
        findings = table.get("findings", {})
        if not isinstance(findings, dict):
            raise TriageError("triage.findings must be a table")
        flaggable = np.ones(len(FINDINGS), dtype=bool)
        for k, f in enumerate(FINDINGS):
            entry = findings.get(f, {})
            if not isinstance(entry, dict) or not isinstance(entry.get("flagged", True), bool):
                raise TriageError(f"triage.findings.{f}: expected a table whose 'flagged' is true or false")
            flaggable[k] = entry.get("flagged", True)
            sensitivity_ladder(entry, f)  # only calibrate reads it, but a tampered one is refused here
        weights, bias, normal_below = None, 0.0, None
        study = table.get("any_finding")
        if study is not None:
            if not isinstance(study, dict):
                raise TriageError("triage.any_finding must be a table")
            w = study.get("weights")
            if not isinstance(w, list) or len(w) != len(FINDINGS) or not all(_is_number(v) for v in w):
                raise TriageError(f"triage.any_finding.weights: expected {len(FINDINGS)} finite numbers")
            if not _is_number(study.get("bias")):
                raise TriageError("triage.any_finding.bias: expected a finite number")
            weights, bias = np.array(w, dtype=np.float64), float(study["bias"])
            if study.get("features", FEATURES) != FEATURES:
                raise TriageError(f"triage.any_finding.features = {study.get('features')!r}: this version reads {FEATURES!r}")
            cut = study.get("normal_below")
            if cut is not None and not (_is_number(cut) and 0.0 < cut < 1.0):
                raise TriageError("triage.any_finding.normal_below: expected a number strictly between 0 and 1")
            normal_below = None if cut is None else float(cut)
        slope = intercept = None
        undo = table.get("input_calibration")
        if undo is not None:
            ok = isinstance(undo, dict) and all(
                isinstance(undo.get(k), list) and len(undo[k]) == len(FINDINGS) and all(_is_number(v) for v in undo[k])
                for k in ("slope", "intercept"))
            if not ok or min(undo["slope"]) <= 0:
                raise TriageError("triage.input_calibration: expected 'slope' (positive) and 'intercept', 14 numbers each")
            slope, intercept = np.array(undo["slope"], dtype=np.float64), np.array(undo["intercept"], dtype=np.float64)
        return cls(thresholds, flaggable, weights, bias, normal_below, tuple(urgent), slope, intercept)

    def p_any(self, probs: np.ndarray) -> np.ndarray:
        """P(any finding) for probabilities [..., 14]."""
        p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
        if self.input_slope is not None:  # back to the probabilities the study-level model was fitted on
            z = (np.log(p / (1 - p)) - self.input_intercept) / self.input_slope
            p = np.clip(1.0 / (1.0 + np.exp(-z)), 1e-7, 1 - 1e-7)
        if self.any_weights is None:
            return 1.0 - np.prod(1.0 - p, axis=-1)
        z = self.any_bias + any_features(p) @ self.any_weights
        return 1.0 / (1.0 + np.exp(-z))


FEATURES = "minus_log_one_minus_p"  # what P(any)'s weights multiply


def any_features(p: np.ndarray) -> np.ndarray:
    """-log(1 - p) per finding: near 0 for an unlikely finding, large for a likely one."""
    return -np.log1p(-np.clip(np.asarray(p, dtype=np.float64), 0.0, 1 - 1e-7))


def sensitivity_ladder(entry: dict, finding: str) -> list[tuple[float, float]] | None:
    """A finding's ``thresholds_at_sensitivity`` (out-of-fold thresholds at a ladder of
    sensitivities, which ``calibrate --thresholds sensitivity:S`` uses for a finding with too few
    positives at the site) as (sensitivity, threshold) pairs by sensitivity; None when absent or
    empty. Raises TriageError for rungs that would give a NaN or wrong threshold: a sensitivity
    or a threshold that is not a number strictly between 0 and 1, one sensitivity written
    twice, or a threshold that rises with the sensitivity (a lower one catches more)."""
    where = f"triage.findings.{finding}.thresholds_at_sensitivity"
    ladder = entry.get("thresholds_at_sensitivity")
    if ladder is None:
        return None
    if not isinstance(ladder, dict):
        raise TriageError(f"{where}: expected a table of sensitivity -> threshold")
    pairs = []
    for key, value in ladder.items():
        try:
            s = float(key)
        except ValueError:
            s = math.nan
        if not (_is_number(s) and 0.0 < s < 1.0 and _is_number(value) and 0.0 < value < 1.0):
            raise TriageError(f"{where}: {key!r}: {value!r}: expected a sensitivity and a threshold, each a number "
                              "strictly between 0 and 1")
        pairs.append((s, float(value)))
    pairs.sort()
    for (s0, t0), (s1, t1) in zip(pairs, pairs[1:]):
        if s0 == s1 or t1 > t0:
            raise TriageError(f"{where}: sensitivity {s1:g} " + ("written twice" if s0 == s1 else
                              f"at threshold {t1:g}, above the {t0:g} of sensitivity {s0:g}: a threshold never "
                              "rises with the sensitivity it catches"))
    return pairs or None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Triage:
    flags: np.ndarray  # [14] of 0/1
    findings: list[str]
    priority: str
    score: float  # orders the study inside its bucket: the urgent finding's probability, or P(any)
    p_any: float


def triage(probs: np.ndarray, policy, urgent=None) -> Triage:
    """probs [14] in FINDINGS order; ``policy`` a :class:`TriagePolicy` (or, as before, a
    thresholds array [14] with ``urgent``)."""
    if not isinstance(policy, TriagePolicy):
        policy = TriagePolicy.simple(policy, DEFAULT_URGENT if urgent is None else urgent)
    elif urgent is not None:
        policy = dataclasses.replace(policy, urgent=tuple(urgent))
    probs = np.asarray(probs, dtype=np.float64)
    flags = ((probs >= policy.thresholds) & policy.flaggable).astype(np.int8)
    flagged = [f for f, on in zip(FINDINGS, flags) if on]
    p_any = float(policy.p_any(probs))
    urgent_flagged = [FINDINGS.index(f) for f in flagged if f in policy.urgent]
    if urgent_flagged:  # never hidden by the study-level gate
        return Triage(flags, flagged, "urgent", float(max(probs[k] for k in urgent_flagged)), p_any)
    if policy.normal_below is not None:
        if p_any >= policy.normal_below:
            return Triage(flags, flagged, "abnormal", p_any, p_any)
        return Triage(np.zeros_like(flags), [], "normal", p_any, p_any)
    return Triage(flags, flagged, "abnormal" if flagged else "normal", p_any, p_any)


def worklist_key(priority: str, score: float, file: str) -> tuple:
    """Sort key of a scored study on the worklist: bucket, then score (highest first), then
    file name (a stable order for ties)."""
    return (BUCKET_ORDER.get(priority, len(PRIORITIES)), -score, file)
