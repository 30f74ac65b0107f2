"""What a weights bundle says about itself to the people who read its output: its intended use
and the evidence that it works (metrics measured on held-out images).

Read from the bundle's manifest: ``intended_use`` (a sentence; bundles written before the
field existed get a fallback that says it is not stated, hence not for clinical use) and
``metrics`` (``test_n`` held-out images, ``test_mean_auc`` and its interval, per finding the
confusion counts at the bundle's thresholds, ``per_finding``, and optionally ``test_how``, e.g.
out of fold in a cross-validation). A bundle exported before
``per_finding`` existed may carry the same counts in ``training_run/`` beside its manifest
(the evaluation's ``validation_metrics_<model>.csv``); they are used only when that run's
``thresholds.json`` is the manifest's and its ``metrics.json`` counts the same test images.

A bundle has **no validation evidence** when its manifest has no finite held-out metrics, or
when they were measured on fewer than :data:`MIN_VALIDATION_IMAGES` images: scan warns about
it on every run and every report carries a line that says so.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .display import finding_label, plural
from .findings import FINDINGS

# Below 100 images, the 95% interval of any proportion measured on them (accuracy, the share
# of studies flagged) can be wider than +/-10 percentage points (1.96 * sqrt(0.25 / n) > 0.098):
# too few to say how a model performs.
MIN_VALIDATION_IMAGES = 100
NOT_STATED = "Not stated by these weights: research use only, not for clinical use."


@dataclass(frozen=True)
class FindingCounts:
    """Held-out images with a finding that the model flagged (tp) and missed (fn) at its threshold."""

    tp: int
    fn: int

    @property
    def positives(self) -> int:
        return self.tp + self.fn


@dataclass(frozen=True)
class OperatingPoint:
    """What a flag of one finding means, measured where the bundle says (its ``triage`` table):
    at the finding's threshold, the share of studies with it that get flagged (sensitivity), of
    studies without it that do not (specificity), of flagged studies that have it at the NIH
    prevalence (PPV), and of all studies flagged. ``flagged`` False: the finding is never flagged,
    ``why`` says why."""

    flagged: bool = True
    ppv_at_site: bool = False  # the PPV was measured at a calibrating site's own prevalence, not NIH's
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    flag_rate: float | None = None
    positives: int | None = None
    auc: float | None = None
    why: str = ""
    source: str | None = None  # where this finding's figures were measured, when not the triage table's

    def trust(self) -> str:
        """A short phrase for beside a flag: 'catches 45% (PPV 0.21)'."""
        if not self.flagged:
            return "never flagged: " + (self.why or "validation ranking no better than chance")
        parts = []
        if self.sensitivity is not None:
            parts.append(f"sens. {self.sensitivity:.2f}")
        if self.ppv is not None:
            parts.append(f"PPV {self.ppv:.2f}")
        return ", ".join(parts) if parts else "not measured"


@dataclass(frozen=True)
class StudyLevel:
    """How the buckets behaved where the bundle was validated (its ``triage.any_finding``)."""

    normal_below: float | None = None
    normal_share_of_abnormal: float | None = None  # studies with a finding that fell in "normal"
    normal_share_of_no_finding: float | None = None
    flagged_share: float | None = None  # studies with at least one flag
    flags_per_study: float | None = None
    auc: float | None = None  # P(any finding): studies with a finding against those without


@dataclass(frozen=True)
class Evidence:
    intended_use: str
    images: int | None = None  # held-out images the metrics were measured on
    train_images: int | None = None
    mean_auc: float | None = None
    mean_auc_ci95: tuple[float, float] | None = None
    counts: dict[str, FindingCounts] = field(default_factory=dict)  # at the bundle's thresholds
    how: str | None = None  # how the images were held out, when not a plain test split
    operating_points: dict[str, OperatingPoint] = field(default_factory=dict)
    study_level: StudyLevel = field(default_factory=StudyLevel)
    triage_source: str | None = None  # where the operating points were measured
    study_level_source: str | None = None  # where the buckets' figures (study_level) were measured
    calibrated: str | None = None  # a site calibration of a base bundle, said first

    @property
    def problem(self) -> str | None:
        """Why the bundle lacks validation evidence, or None when it has it."""
        if self.images is None or self.mean_auc is None:
            return "no validation metrics in its manifest"
        if self.images < MIN_VALIDATION_IMAGES:
            return f"metrics measured on {self.images} held-out images, fewer than the {MIN_VALIDATION_IMAGES} required"
        return None

    def summary(self) -> str:
        """One line: what the weights were trained on and how they measured on held-out images."""
        parts = []
        if self.train_images:
            parts.append(f"trained on {plural(self.train_images, 'image')}")
        if self.mean_auc is not None and self.images is not None:
            ci = (f" (95% CI {self.mean_auc_ci95[0]:.2f}-{self.mean_auc_ci95[1]:.2f})"
                  if self.mean_auc_ci95 else "")
            if self.how:  # cross-validation: the images were held out from the fold models, not from these weights
                parts.append(f"mean AUROC {self.mean_auc:.2f}{ci} on {plural(self.images, 'image')}, each scored by a model "
                             f"that had not seen it ({self.how}); these weights have no held-out test of their own")
            else:
                parts.append(f"mean AUROC {self.mean_auc:.2f}{ci} on {plural(self.images, 'held-out image')}")
        text = "; ".join(parts) or "no training or evaluation record"
        text = text[0].upper() + text[1:] + "."
        return f"{self.calibrated} Base bundle: {text}" if self.calibrated else text

    def catch(self, finding: str) -> str:
        """How many images with ``finding`` its flag caught, and where they were counted: 'flagged
        0 of 10 held-out images that had it', or out of fold for a bundle without a held-out test
        (v2.1: its counts are at thresholds chosen on the same predictions); '' when not counted."""
        counts = self.counts.get(finding)
        if counts is None or counts.positives == 0:
            return ""
        if self.how:
            return f"flagged {counts.tp} of {counts.positives} out-of-fold images that had it; no held-out test"
        return f"flagged {counts.tp} of {counts.positives} held-out images that had it"

    def measured(self, finding: str, default: str | None = None) -> str | None:
        """Where ``finding``'s operating point was measured (its own source, else the triage
        table's, else ``default``), led by its count when a calibrating site's few positives
        measured its sensitivity: 'flagged 2 of 3 that had it; cross-validated on the 40 ...'
        (0.67 alone reads as two thirds of them all). The one wording of the PDFs' urgent catch,
        the SR's line per finding and the ORU's note beside a flag."""
        point = self.operating_points.get(finding)
        where = (point.source if point is not None else None) or self.triage_source or default
        if point is not None and point.ppv_at_site and point.positives and point.sensitivity is not None:
            count = f"flagged {round(point.sensitivity * point.positives)} of {point.positives} that had it"
            where = f"{count}; {where}" if where else count
        return where

    def sensitivity(self, finding: str) -> str:
        """The model's sensitivity for ``finding`` at its operating point, with its counts, or
        an honest 'not measured'."""
        counts = self.counts.get(finding)
        name = finding_label(finding)
        point = self.operating_points.get(finding)
        if point is not None and not point.flagged:
            return f"{name}: never flagged by these weights ({point.why or 'validation ranking no better than chance'})"
        if point is not None and point.sensitivity is not None and counts is None:
            return f"{name}: sensitivity {point.sensitivity:.2f} at its threshold ({self.measured(finding, 'validation')})"
        if counts is None:
            return f"{name}: sensitivity at its threshold not measured for these weights"
        if counts.positives == 0:
            return f"{name}: sensitivity not measured (no held-out image had it)"
        held_out = f"sensitivity {counts.tp / counts.positives:.2f} at its threshold ({self.catch(finding)})"
        if point is not None and point.sensitivity is not None:
            # both measured: the flag's "sens." elsewhere on the report is the operating point's, so
            # say both, each with its source, rather than two numbers that seem to disagree
            return f"{name}: {held_out}; {point.sensitivity:.2f} {point.source or self.triage_source or 'in validation'}"
        return f"{name}: {held_out}"


def _triage_evidence(manifest: dict) -> tuple[dict[str, OperatingPoint], StudyLevel, str | None]:
    """Operating points and bucket behaviour from a manifest's ``triage`` table (absent: none)."""
    table = manifest.get("triage")
    if not isinstance(table, dict):
        return {}, StudyLevel(), None
    points = {}
    findings = table.get("findings") if isinstance(table.get("findings"), dict) else {}
    for f in FINDINGS:
        row = findings.get(f)
        if not isinstance(row, dict):
            continue
        positives = row.get("positives")
        points[f] = OperatingPoint(
            flagged=row.get("flagged", True) is not False, sensitivity=_finite(row.get("sensitivity")),
            ppv_at_site=row.get("ppv_at_nih_prevalence") is None and row.get("ppv_at_site") is not None,
            specificity=_finite(row.get("specificity")),
            ppv=_finite(row.get("ppv_at_nih_prevalence") if row.get("ppv_at_nih_prevalence") is not None
                        else row.get("ppv_at_site")),
            flag_rate=_finite(row.get("flag_rate")),
            positives=positives if isinstance(positives, int) and not isinstance(positives, bool) else None,
            auc=_finite(row.get("auc")), why=row.get("why") if isinstance(row.get("why"), str) else "",
            source=row["measured_on"].strip() if isinstance(row.get("measured_on"), str) and row["measured_on"].strip()
            else None)
    study = table.get("any_finding") if isinstance(table.get("any_finding"), dict) else {}
    level = StudyLevel(**{k: _finite(study.get(k)) for k in StudyLevel.__dataclass_fields__})
    source = table.get("measured_on")
    return points, level, source.strip() if isinstance(source, str) and source.strip() else None


def _base_bundle(manifest: dict) -> str | None:
    """'cxr-fpn@3.0' for a bundle that ``calibrate`` gave new operating points, else None."""
    calibration = manifest.get("calibration") if isinstance(manifest.get("calibration"), dict) else {}
    rules = calibration.get("rules") if isinstance(calibration.get("rules"), dict) else {}
    if rules.get("thresholds", "keep") == "keep":
        return None
    provenance = manifest.get("provenance") if isinstance(manifest.get("provenance"), dict) else {}
    base = provenance.get("base") if isinstance(provenance.get("base"), dict) else {}
    return f"{base.get('name', '?')}@{base.get('version', '?')}"


def _kept_from_base(points: dict[str, OperatingPoint], manifest: dict) -> dict[str, OperatingPoint]:
    """A calibration that chose operating points on the site's studies names the site as the
    table's source; a finding it left alone (too few positives there) keeps the base bundle's
    figures (a PPV at NIH prevalence, not the site's): each such point names the base as its own
    source, for bundles calibrated before they recorded it."""
    base = _base_bundle(manifest)
    if base is None:
        return points
    return {f: p if p.source or p.ppv_at_site or not p.flagged else
            replace(p, source=f"the base bundle {base}'s validation: too few positives at this site")
            for f, p in points.items()}


def _study_level_source(manifest: dict, triage_source: str | None) -> str | None:
    """Where the buckets' figures (``triage.any_finding``) were measured: its own ``measured_on``,
    else the triage table's. A site calibration that chose new operating points rewrote the
    table's source (the site's studies) but keeps the base bundle's study-level figures, measured
    at the base's thresholds: said so for bundles calibrated before they recorded it."""
    table = manifest.get("triage") if isinstance(manifest.get("triage"), dict) else {}
    study = table.get("any_finding") if isinstance(table.get("any_finding"), dict) else {}
    own = study.get("measured_on")
    if isinstance(own, str) and own.strip():
        return own.strip()
    base = _base_bundle(manifest)
    if base is not None:
        return f"the base bundle {base}'s validation, at its thresholds before this site's calibration"
    return triage_source


def _calibration_note(manifest: dict) -> str | None:
    """'Calibrated at a site on 120 studies (offset; thresholds: keep) on 2026-12-06 from
    cxr-fpn@3.0.' for a bundle made by ``cxr-batch calibrate``; None otherwise."""
    provenance, calibration = manifest.get("provenance"), manifest.get("calibration")
    if not isinstance(provenance, dict) or not isinstance(calibration, dict):
        return None
    base = provenance.get("base") if isinstance(provenance.get("base"), dict) else {}
    fitted = calibration.get("fitted_on") if isinstance(calibration.get("fitted_on"), dict) else {}
    rules = calibration.get("rules") if isinstance(calibration.get("rules"), dict) else {}
    n, date = fitted.get("n"), str(provenance.get("date", ""))[:10]
    moved = "probabilities recalibrated" if calibration.get("pooled_gain_clear") else "probabilities unchanged (no clear gain)"
    return (f"Site calibration of {base.get('name', '?')}@{base.get('version', '?')} on {n} labelled studies"
            f"{' on ' + date if date else ''} (method {calibration.get('method')}: {moved}; thresholds: "
            f"{rules.get('thresholds', '?')}).")


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _counts_from_manifest(metrics: dict) -> dict[str, FindingCounts]:
    table = metrics.get("per_finding")
    table = table if isinstance(table, dict) else {}
    out = {}
    for f in FINDINGS:
        row = table.get(f)
        row = row if isinstance(row, dict) else {}
        if isinstance(row.get("tp"), int) and isinstance(row.get("fn"), int):
            out[f] = FindingCounts(row["tp"], row["fn"])
    return out


def _counts_from_training_run(folder: Path, manifest: dict, images: int | None) -> dict[str, FindingCounts]:
    """Counts from the evaluation files a bundle keeps in ``training_run/``, only when they are
    provably about these thresholds and these test images."""
    run = folder / "training_run"
    tables = sorted(run.glob("validation_metrics_*.csv"))
    try:
        thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]
        run_images = json.loads((run / "metrics.json").read_text())["test"]["n"]
        if len(tables) != 1 or thresholds != manifest["thresholds"] or run_images != images:
            return {}
        with open(tables[0], newline="", encoding="utf-8") as f:
            rows = {r["finding"]: r for r in csv.DictReader(f)}
        return {f: FindingCounts(int(float(rows[f]["tp"])), int(float(rows[f]["fn"]))) for f in FINDINGS}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _train_images(manifest: dict) -> int | None:
    """Images the weights were trained on: ``training.data.images`` is the count (a model trained
    on every image it had, e.g. v2) or a table by split whose ``train`` counts (v1)."""
    data = (manifest.get("training") or {}).get("data") if isinstance(manifest.get("training"), dict) else None
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, dict):
        images = images.get("train")
    return images if isinstance(images, int) and not isinstance(images, bool) else None


def bundle_evidence(manifest: dict, folder: Path | None = None) -> Evidence:
    """The intended use and validation evidence of a bundle, from its manifest (and, for older
    bundles, its ``training_run/`` folder)."""
    metrics = manifest.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}  # load_bundle refuses other types
    images = metrics.get("test_n")
    images = images if isinstance(images, int) and not isinstance(images, bool) else None
    ci = metrics.get("test_mean_auc_ci95")
    ci = tuple(map(_finite, ci)) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
    train = _train_images(manifest)
    counts = _counts_from_manifest(metrics)
    if not counts and folder is not None:
        counts = _counts_from_training_run(Path(folder), manifest, images)
    intended = manifest.get("intended_use")
    points, level, source = _triage_evidence(manifest)
    return Evidence(
        operating_points=_kept_from_base(points, manifest), study_level=level, triage_source=source, calibrated=_calibration_note(manifest),
        study_level_source=_study_level_source(manifest, source),
        intended_use=intended.strip() if isinstance(intended, str) and intended.strip() else NOT_STATED,
        images=images, train_images=train,
        mean_auc=_finite(metrics.get("test_mean_auc")),
        mean_auc_ci95=ci if ci and None not in ci else None, counts=counts,
        how=how.strip() if isinstance(how := metrics.get("test_how"), str) and how.strip() else None,
    )
