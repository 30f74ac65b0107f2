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
from dataclasses import dataclass, field
from pathlib import Path

from .display import finding_label
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
class Evidence:
    intended_use: str
    images: int | None = None  # held-out images the metrics were measured on
    train_images: int | None = None
    mean_auc: float | None = None
    mean_auc_ci95: tuple[float, float] | None = None
    counts: dict[str, FindingCounts] = field(default_factory=dict)  # at the bundle's thresholds
    how: str | None = None  # how the images were held out, when not a plain test split

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
            parts.append(f"trained on {self.train_images} images")
        if self.mean_auc is not None and self.images is not None:
            ci = (f" (95% CI {self.mean_auc_ci95[0]:.2f}-{self.mean_auc_ci95[1]:.2f})"
                  if self.mean_auc_ci95 else "")
            if self.how:  # cross-validation: the images were held out from the fold models, not from these weights
                parts.append(f"mean AUROC {self.mean_auc:.2f}{ci} on {self.images} images, each scored by a model "
                             f"that had not seen it ({self.how}); these weights have no held-out test of their own")
            else:
                parts.append(f"mean AUROC {self.mean_auc:.2f}{ci} on {self.images} held-out images")
        text = "; ".join(parts) or "no training or evaluation record"
        return text[0].upper() + text[1:] + "."

    def sensitivity(self, finding: str) -> str:
        """The model's sensitivity for ``finding`` at its operating point, with its counts, or
        an honest 'not measured'."""
        counts = self.counts.get(finding)
        name = finding_label(finding)
        if counts is None:
            return f"{name}: sensitivity at its threshold not measured for these weights"
        if counts.positives == 0:
            return f"{name}: sensitivity not measured (no held-out image had it)"
        return (f"{name}: sensitivity {counts.tp / counts.positives:.2f} at its threshold "
                f"(flagged {counts.tp} of {counts.positives} held-out images that had it)")


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
    return Evidence(
        intended_use=intended.strip() if isinstance(intended, str) and intended.strip() else NOT_STATED,
        images=images, train_images=train,
        mean_auc=_finite(metrics.get("test_mean_auc")),
        mean_auc_ci95=ci if ci and None not in ci else None, counts=counts,
        how=how.strip() if isinstance(how := metrics.get("test_how"), str) and how.strip() else None,
    )
