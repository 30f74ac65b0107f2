"""``cxr-batch calibrate``: per-finding calibration and thresholds fitted on a site's labelled
studies, written as a new weights bundle.

The studies are scored in this process in float32 with the base bundle (its own calibration
applied, if it has one), and the calibration is fitted on those logits at full precision
(:mod:`cxr_batch.calibration` says how and how conservatively; the default is one logit offset
for all findings). Thresholds: by default ("keep") the bundle's operating points are moved with
the calibration, so that the new bundle flags and buckets exactly the studies the base did while
its probabilities match the site; another rule chooses them on the calibrated probabilities,
with two safeguards: a finding whose base operating point catches at least half of the site's
positives is never left catching less than a quarter of them out of fold (the base point is
kept, and the command says so), and ``sensitivity:S`` is checked out of fold (it raises its
in-sample target until the cross-validated sensitivity reaches S, or says it cannot). The new bundle is the base bundle's
``model.pt`` copied byte for byte, with a manifest that has a new version, the new thresholds,
``calibration`` and ``provenance`` (base bundle, labels file hash, n per finding, date). The
base bundle is only read; the new folder appears whole or not at all.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

from . import __version__, metrics
from .bundle import (DEFAULT_BUNDLE, MODEL_CARD_FILE, WEIGHTS_FILE, Bundle, BundleError, is_bundle, load_bundle,
                     manifest_sha256, sha256_file, write_manifest)
from .calibration import (FINDING_MARGIN_SE, FOLDS, MARGIN_SE, METHODS, MIN_POSITIVES, PULL, Calibration,
                          FitReport, fit_findings, from_fits)
from .config import ConfigError
from .discover import find_candidates
from .files import file_in_the_way
from .display import plural
from .findings import FINDINGS
from .folders import refuse_overlap
from .inference import BatchOptions, Engine, score_batches
from .labels import LabelsError, LabelTable, Matching, NoStudyFiles, match_labels
from .metadata import load_metadata_csv
from .provenance import CALIBRATION, PIXELS, image_list, overlap, pixel_key, read_image_list, read_rows
from .runtime import make_policy
from .thresholds import at_sensitivity, by_rule, parse_rule
from .triage import sensitivity_ladder

log = logging.getLogger("cxr_batch")
# the studies calibrate could not use are named nowhere it writes: where a user finds their names
IN_SAMPLE_FIT = ("a calibration and thresholds fitted on {these} learn how sure the model is of images it has seen, "
                 "not of new ones: fit on studies it was not trained on")
CALIBRATE_NAMES = "names: run 'cxr-batch evaluate' on the same studies and labels; its evaluation.json lists them"


@dataclass
class CalibrateOptions:
    weights: str | None = None  # base bundle (default: the bundled weights)
    method: str = "prevalence"
    thresholds: str = "keep"  # a rule of cxr_batch.thresholds.parse_rule
    min_positives: int = MIN_POSITIVES
    version: str | None = None  # default: <base version>+site.<date>.<hash of the new manifest>
    device: str = "auto"
    batch_size: int = 16
    workers: int | None = None
    follow_links: bool = False  # symbolic links leading outside the studies folder (as scan's --follow-links)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        parse_rule(self.thresholds)  # a bad rule fails before any scoring
        # recorded as written in the manifest, where 'keep' is looked for: 'KEEP' must read as 'keep'
        name, colon, target = self.thresholds.strip().partition(":")
        # 'keep:' is keep: recorded as 'keep:', reports took it for a rule that chose new points
        self.thresholds = name.strip().lower() + (colon + target.strip() if target.strip() else "")


@dataclass
class LabelledScores:
    """The labelled studies that were scored: the base bundle's logits and the labels."""

    files: list[str]
    logits: np.ndarray  # [N, 14] float64
    y: np.ndarray  # [N, 14] 0/1
    groups: np.ndarray  # [N] patient keys
    matching: Matching
    # [N] each study's provenance.pixel_key from the pixels scored, '' where they were decoded smaller than stored
    pixels: list[str] | None = None


def score_labelled(studies: Path, labels: LabelTable, bundle: Bundle, opts: CalibrateOptions) -> LabelledScores:
    """Score every study under ``studies`` in float32 (the labels' patient columns as patient
    data) and keep the logits of the ones that have labels."""
    candidates = find_candidates(studies, follow_links=opts.follow_links)
    if not candidates:  # not the labels' fault: said as scan says it, with its exit code
        raise NoStudyFiles(f"no files under {studies}: nothing to calibrate on (an unmounted share or a wrong path?)")
    metadata = None
    if labels.has_patient_data:
        metadata = load_metadata_csv(labels.path, only={c.path.name for c in candidates}, option="--labels")
    engine = Engine(bundle, make_policy(opts.device, "fp32"))
    batches = BatchOptions(batch_size=opts.batch_size, workers=opts.workers, progress=opts.progress)
    rows, logits, pixels = [], {}, []
    # the pixel keys calibration_images.csv lists: from the decoding done for scoring
    for scored in score_batches(candidates, engine, batches, metadata, pixel_keys=True):
        for pos, record in enumerate(scored.records):
            if pos in scored.ok:
                logits[len(rows)] = scored.logits[scored.ok.index(pos)].double().numpy()
            rows.append({"file": record.file, "status": record.status, "reason": record.reason,
                         "patient_id": record.ids.patient_id})
            pixels.append(scored.pixel_keys[pos])
    matching = match_labels(rows, labels)
    rows_idx = [i for i, _ in matching.pairs]
    return LabelledScores(
        files=[rows[i]["file"] for i in rows_idx],
        logits=np.array([logits[i] for i in rows_idx]).reshape(-1, len(FINDINGS)),
        y=labels.y[[j for _, j in matching.pairs]].astype(int).reshape(-1, len(FINDINGS)),
        groups=np.array(matching.groups, dtype=str), matching=matching, pixels=[pixels[i] for i in rows_idx],
    )


def check_destination(out: Path, base: Path) -> None:
    """The new bundle goes to a new place: not the base bundle, not inside it, not over files."""
    out, base = out.resolve(), base.resolve()
    if out == base or base in out.parents:
        raise BundleError(f"--out {out} is the base bundle or inside it; the base bundle is never changed")
    inside = next((folder for folder in out.parents if is_bundle(folder)), None)
    if inside is not None:  # a bundle in a bundle: the outer one's folder is no longer its own
        raise BundleError(f"--out {out} is inside the weights bundle {inside}; choose a folder of its own")
    # a new bundle beside the base (weights/NEW) is fine: only the base itself is protected
    in_the_way = file_in_the_way(out)
    if in_the_way is not None:  # found now, not when the bundle is written after all the scoring
        raise BundleError(f"--out {out}: {in_the_way} is a file, not a folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"--out {out} already exists and is not an empty folder; choose a new folder")


def write_bundle(base: Bundle, out: Path, manifest: dict, files: dict[str, bytes] | None = None) -> Path:
    """Copy the base weights, write ``files`` (name -> bytes: lists the manifest seals) and
    ``manifest`` in a temporary folder beside ``out``, check that it loads, then rename it to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        try:
            shutil.copyfile(base.path / base.manifest.get("weights_file", WEIGHTS_FILE), tmp / WEIGHTS_FILE)
        except OSError as e:  # name the destination (disk full there), not the base bundle's file
            raise OSError(e.errno, e.strerror, str(tmp / WEIGHTS_FILE)) from None
        if sha256_file(tmp / WEIGHTS_FILE) != base.manifest["sha256"]:
            raise BundleError("the copied weights differ from the base bundle's; nothing written")
        listed = (manifest.get("training_images") or {}).get("file")
        if listed:  # the same weights, trained on the same images: the list comes along (load_bundle checks it)
            shutil.copyfile(base.path / listed, tmp / listed)
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = {**manifest, "weights_file": WEIGHTS_FILE}
        write_manifest(tmp, manifest)
        load_bundle(tmp)  # the new bundle must load and verify before it is put in place
        os.chmod(tmp, 0o755)
        try:
            if out.exists():
                out.rmdir()  # empty, checked before any work
            os.rename(tmp, out)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # found empty before the scoring, filled since (two calibrations given one --out):
            # what is there now is left as it is
            raise BundleError(f"--out {out} was empty when this calibration started and holds files now (another "
                              "command wrote there meanwhile?): it is left as it is and this bundle was not "
                              "written; run again with another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class CalibrateResult:
    bundle: Path
    version: str
    lines: list[str]  # what was done: the pooled gate, then one line per finding
    matching: Matching
    ece_before: float  # in-sample, on the studies it was fitted on
    ece_after: float


def calibration_record(report: FitReport, calibration: Calibration, opts: CalibrateOptions, enough: np.ndarray,
                       scores: LabelledScores) -> dict:
    """The manifest's ``calibration``: method, rules, the pooled gate and, per finding, the
    parameters inference applies with n, positives and what was done."""
    per_finding = {}
    for k, (f, fit) in enumerate(zip(FINDINGS, report.fits)):
        rule = opts.thresholds if enough[k] else "kept from the base bundle"
        per_finding[f] = {**calibration.entry(k), **fit.record(), "threshold_rule": rule}
    return {
        "method": opts.method,
        "applies_to": "the model's logits: calibrated = slope * logit + intercept (temperature T: slope 1/T, "
                      "intercept 0); probability = sigmoid(calibrated); thresholds compare with that probability",
        "fitted_on": {"n": len(scores.files), "patients": int(len(set(scores.groups)))},
        "rules": {"min_positives": opts.min_positives, "l2_pull_to_unchanged": PULL,
                  "cross_validation": f"{FOLDS} folds by patient; fits are kept only if the held-out log-loss gain "
                                      f"over all findings exceeds {MARGIN_SE} standard errors and the finding's own "
                                      f"gain {FINDING_MARGIN_SE} of its own",
                  "thresholds": opts.thresholds},
        **report.record(),
        "per_finding": per_finding,
    }


def training_overlap(base: Bundle, labels: LabelTable, scores: LabelledScores) -> dict:
    """Whether the base bundle was trained on the fitting studies, said once: a calibration fitted
    on them learns how sure the model is of images it has seen. Counts only, for the new bundle's
    provenance."""
    patients = [g if not g.startswith("file:") else "" for g in scores.groups]  # file: no Patient ID
    said, _ = overlap(read_image_list(base.path, base.manifest), scores.files,
                      [labels.files[j] for _, j in scores.matching.pairs], patients, IN_SAMPLE_FIT)
    if said["message"]:
        (log.warning if said["checked"] else log.info)("%s%s", "warning: " if said["checked"] else "", said["message"])
    return {k: v for k, v in said.items() if k != "in_sample_files"}


def calibration_rows(base: Bundle, labels: LabelTable, studies: Path,
                     scores: LabelledScores) -> list[tuple[str, str, str, str]]:
    """The new bundle's ``calibration_images.csv``: the studies fitted on here, by the Image Index
    and Patient ID (else the scan's) of their label rows and their pixels' hash (the scoring's,
    else read again: a few milliseconds a study), and the base bundle's own, whose calibration
    the new one keeps under its own (an image in both keeps the earlier row)."""
    rows = {r["image"]: (r["image"], r["patient_id"], r["role"], r.get(PIXELS) or "")
            for r in read_rows(base.path, base.manifest, CALIBRATION) or []}
    pixels = scores.pixels or [""] * len(scores.files)
    for file, (_, j), group, key in zip(scores.files, scores.matching.pairs, scores.groups, pixels):
        if labels.files[j] not in rows:
            rows[labels.files[j]] = (labels.files[j], "" if group.startswith("file:") else group, CALIBRATION.kind,
                                     key or pixel_key(Path(studies) / file))
    return list(rows.values())


def provenance_record(base: Bundle, labels: LabelTable, studies: Path, report: FitReport,
                      date: datetime.datetime) -> dict:
    return {
        "base": {"name": base.name, "version": base.version, "bundle_sha256": base.sha256, "weights_sha256": base.manifest["sha256"],
                 "manifest_sha256": sha256_file(base.path / "manifest.json"), "path": str(base.path)},
        "labels": {"file": labels.path.name, "sha256": labels.sha256},
        "studies": str(Path(studies).resolve()),
        "n_per_finding": {f.finding: {"n": f.n, "positives": f.positives} for f in report.fits},
        "date": date.isoformat(timespec="seconds"),
        "tool": f"cxr-batch {__version__} calibrate",
        "command": " ".join(sys.argv),
        "metrics_note": "'metrics' are the base bundle's, measured before this calibration, with its per-finding "
                        "counts (measured at its thresholds) only for the findings whose threshold is the base's moved "
                        "with the calibration (the same studies flag); AUROC is unchanged by calibration "
                        "(slopes are positive), thresholds and flags are not",
    }


def calibrated_card(base: Bundle, provenance: dict, n_studies: int) -> str:
    """MODEL_CARD.md of a bundle calibrated from one that has a sealed card: which base, on what,
    and that the base's card does not describe it."""
    labels = provenance["labels"]
    return "\n".join([
        f"# Model card: {base.name}, calibrated by `cxr-batch calibrate`", "",
        f"**Not the base's card.** These are the weights of {base.name} {base.version} (bundle_sha256 "
        f"`{base.sha256}`), recalibrated on {n_studies} studies of `{provenance['studies']}` labelled by "
        f"`{labels['file']}` (sha256 `{labels['sha256']}`) on {provenance['date']}. The base's MODEL_CARD.md "
        "does not describe this bundle: its AUROCs still hold, its thresholds, F1, per-finding counts and "
        f"shares of studies flagged do not. In `manifest.json`: {provenance['metrics_note']}.", "",
        "The figures `cxr-batch calibrate` printed were measured on the studies it was fitted on (in-sample). "
        "Before use, run `cxr-batch evaluate STUDIES --labels LABELS --weights BUNDLE` (BUNDLE: this folder) on "
        "other labelled studies of the site.", "",
        "This card is sealed in `manifest.json` (`model_card`: its sha256): loading refuses an edited card."]) + "\n"


def summary_lines(report: FitReport, calibration: Calibration, base: Bundle, thresholds: dict) -> list[str]:
    verdict = "findings may move" if report.accepted else "no calibration changes"
    if math.isfinite(report.pooled_se):
        lines = [f"held-out log-loss gain over all findings {report.pooled_gain:.4f} per image (standard error "
                 f"{report.pooled_se:.4f}, needs > {MARGIN_SE:g} of them): {verdict}"]
    elif any(fit.reason.startswith("fewer than") for fit in report.fits):  # calibration.too_few_patients
        few = next(fit.reason for fit in report.fits if fit.reason.startswith("fewer than"))
        lines = [f"the studies come from {few} (their labels' Patient ID): a cross-validation by "
                 f"patient is impossible: no calibration changes"]
    else:  # no finding had enough positive and negative studies to be cross-validated
        lines = ["no finding has enough positive and negative studies to fit a calibration: no calibration changes"]
    for k, fit in enumerate(report.fits):
        params = ", ".join(f"{key} {value:.3f}" for key, value in calibration.entry(k).items())
        status = fit.record()["status"]
        lines.append(f"{fit.finding:<19} {fit.positives:>4}/{fit.n:<5} {params:<30} threshold "
                     f"{base.thresholds[fit.finding]:.4f} -> {thresholds[fit.finding]:.4f}  {status}")
    if not any(fit.changed for fit in report.fits):
        moved = sum(thresholds[f] != base.thresholds[f] for f in FINDINGS)
        lines.append("no finding's calibration changed; " + (
            f"{plural(moved, 'threshold')} moved" if moved else "no threshold moved either: the new bundle scores and flags "
                                                        "exactly as the base bundle does"))
    return lines


def check_version(version: str | None) -> None:
    """--version names the bundle in every log line, results.csv row and report it makes: a
    newline or an escape sequence there would forge log lines and recolour a terminal."""
    if version is not None and (not version.strip() or not version.isprintable() or len(version) > 200):
        raise ConfigError(f"--version {version[:200]!r}: expected printable text (no newline, tab or escape "
                          f"sequence), at most 200 characters")


def run_calibrate(studies: Path, labels: LabelTable, out: Path, opts: CalibrateOptions) -> CalibrateResult:
    """Fit, choose thresholds, write the new bundle. Raises FolderOverlap, BundleError, MetadataError,
    LabelsError; those that need no model before it loads."""
    check_version(opts.version)
    refuse_overlap(out, {"the studies folder": studies})
    check_destination(Path(out), Path(opts.weights) if opts.weights else DEFAULT_BUNDLE)
    base = load_bundle(opts.weights)
    scores = score_labelled(Path(studies), labels, base, opts)
    if len(scores.files) == 0:
        raise LabelsError("no labelled study was scored: " + "; ".join(scores.matching.problems(CALIBRATE_NAMES)
                                                                      or ["no studies"]))
    training = training_overlap(base, labels, scores)
    report = fit_findings(scores.logits, scores.y, scores.groups, opts.method, opts.min_positives, PULL, FOLDS,
                          opts.seed)
    on_top = from_fits(report, opts.method)
    calibration = (base.calibration or Calibration.identity(opts.method)).then(on_top)
    p_before, p_after = expit(scores.logits), expit(on_top.apply(scores.logits))
    enough = np.array([min(f.positives, f.n - f.positives) >= opts.min_positives for f in report.fits])
    moved = moved_operating_points(base, on_top)
    name, target = parse_rule(opts.thresholds)
    fallback = ladder_thresholds(base, on_top, target) if name == "sensitivity" else None
    fallback_at = ladder_sensitivities(base, target) if name == "sensitivity" else None
    base_policy = base.triage_policy()
    choice = choose_thresholds(opts.thresholds, scores, p_after, moved, enough, opts.seed, fallback, fallback_at,
                               written_flags(base_policy, p_before))
    # a normal study whose urgent finding is flagged is urgent and shows every flag: the urgent
    # finding's threshold (never masked, so the same in both passes) says which; 503 of 759 NIH
    # studies under sensitivity:0.8, rescuing 8 of the 10 nodules that P(any) put in the normal bucket
    rescued = urgent_flags(base_policy, p_after, choice.thresholds)
    if choice.cv_flags is not None and rescued.any():
        choice = choose_thresholds(opts.thresholds, scores, p_after, moved, enough, opts.seed, fallback, fallback_at,
                                   written_flags(base_policy, p_before, rescued))
    thresholds = choice.thresholds
    if name != "keep" and all(abs(thresholds[f] - moved[f]) < 1e-12 for f in FINDINGS):
        # the rule moved no operating point (fewer than 5 patients, too few positives of every
        # finding): the bundle is what 'keep' makes and says so; recorded as the rule, its reports
        # dropped the base's held-out catch (v3's pneumothorax: flagged 0 of 10) for nothing
        asked, name = opts.thresholds, "keep"
        opts = replace(opts, thresholds="keep")
        choice = ThresholdChoice(dict(moved), choice.lines + [
            f"{asked} moved no operating point: the new bundle keeps the bundle's operating points (moved with the "
            f"calibration) and their validation figures, as --thresholds keep does"])
        thresholds = choice.thresholds

    date = datetime.datetime.now(datetime.timezone.utc)
    # the base's per-finding counts were measured at its thresholds on its probabilities: at a
    # rule's new ones they would print a sensitivity nobody measured on every report. 'keep' moves
    # the thresholds with the calibration so the same studies flag: the counts still hold, and
    # dropping them left reports with only the kinder out-of-fold figure (v3's pneumothorax: 0.23
    # out of fold, flagged 0 of 10 held out)
    # A rule that moved only some findings leaves the others at the base's points moved with the
    # calibration: their counts still hold (dropped with the rest, a pneumothorax left at the base's
    # point lost its 'flagged 0 of 10 held-out images' on every report)
    base_metrics = dict(base.manifest.get("metrics") or {})
    if isinstance(base_metrics.get("per_finding"), dict):
        held = {f: row for f, row in base_metrics["per_finding"].items()
                if f in thresholds and abs(thresholds[f] - moved[f]) < 1e-12}
        base_metrics.pop("per_finding")
        if held:
            base_metrics["per_finding"] = held
    # evaluate names these studies when the new bundle is evaluated on them (cxr_batch.provenance)
    calibration_list, listed = image_list(calibration_rows(base, labels, studies, scores), CALIBRATION)
    # not the base's model card: its thresholds and figures are the base's (provenance names the
    # base); a card of this bundle's own is added below
    manifest = {**{k: v for k, v in base.manifest.items() if k != "model_card"},
                "thresholds": thresholds, "metrics": base_metrics, "calibration_images": listed,
                "calibration": calibration_record(report, calibration, opts, enough, scores),
                "provenance": {**provenance_record(base, labels, studies, report, date), "training_overlap": training}}
    triage_table = calibrated_triage(base.manifest.get("triage"), on_top, choice, opts.thresholds, len(scores.files),
                                     base_policy.p_any(p_before), scores.y.max(axis=1))
    if triage_table is not None:
        manifest["triage"] = triage_table
    # the default version ends with the new manifest's own hash: two calibrations of the same labels
    # on one day under different --thresholds (or methods, or bases) differ there, so results.csv's
    # model column, the reports and the worklist tell their bundles apart; the labels file is named
    # in provenance
    files = {CALIBRATION.file: calibration_list}
    if "model_card" in base.manifest:
        # a card of its own, sealed like the base's: without one a newcomer went to the base's card,
        # whose thresholds, F1 and counts are not this bundle's (it names no version: that hashes this)
        card = calibrated_card(base, manifest["provenance"], len(scores.files)).encode("utf-8")
        files[MODEL_CARD_FILE] = card
        manifest["model_card"] = {"file": MODEL_CARD_FILE, "sha256": hashlib.sha256(card).hexdigest()}
    content = manifest_sha256({k: v for k, v in manifest.items() if k != "version"})
    version = opts.version or f"{base.version}+site.{date:%Y%m%d}.{content[:8]}"
    manifest["version"] = version
    written = write_bundle(base, Path(out), manifest, files)
    lines = summary_lines(report, calibration, base, thresholds) + choice.lines
    return CalibrateResult(written, version, lines, scores.matching,
                           metrics.ece(scores.y, p_before), metrics.ece(scores.y, p_after))


# ---------------------------------------------------------------- thresholds
def moved_operating_points(base: Bundle, on_top: Calibration) -> dict:
    """The base bundle's thresholds carried through the new calibration: the probability the
    new bundle gives exactly where the base one gave its threshold, so the same studies flag."""
    z = np.array([math.log(base.thresholds[f] / (1 - base.thresholds[f])) for f in FINDINGS])
    z_moved = on_top.apply(z)
    moved = expit(z_moved)
    # a finding the calibration leaves alone keeps its threshold exactly (logit and back changes
    # the last bits: every threshold counted as moved when none had)
    return {f: base.thresholds[f] if z_moved[k] == z[k] else float(np.clip(moved[k], 1e-6, 1 - 1e-6))
            for k, f in enumerate(FINDINGS)}


def calibrations_since(table: dict) -> Calibration:
    """The site calibrations a triage table's study-level model and ladders have seen applied
    since they were fitted (``input_calibration``), as one; identity when none."""
    undo = table.get("input_calibration")
    if not isinstance(undo, dict):
        return Calibration.identity("platt")
    return Calibration("platt", np.asarray(undo["slope"], dtype=float), np.asarray(undo["intercept"], dtype=float))


def _ladders(base: Bundle) -> dict:
    """finding -> its (sensitivity, threshold) rungs, for the findings whose bundle stores them
    (checked when the bundle loaded: :func:`cxr_batch.triage.sensitivity_ladder`)."""
    table = (base.manifest.get("triage") or {}).get("findings") or {}
    ladders = {f: sensitivity_ladder(table.get(f) or {}, f) for f in FINDINGS}
    return {f: rungs for f, rungs in ladders.items() if rungs}


def ladder_thresholds(base: Bundle, on_top: Calibration, target: float) -> dict:
    """Per finding whose bundle stores out-of-fold thresholds at a ladder of sensitivities
    (``triage.findings.<f>.thresholds_at_sensitivity``, from its development images): the
    threshold at ``target`` (interpolated on the logit scale between the nearest rungs, the end
    rung beyond them: :func:`ladder_sensitivities` says which), carried through the site
    calibrations the bundle has had since (``triage.input_calibration``: the ladder was measured
    before them) and then the new one. What ``sensitivity:S`` uses for a finding with too few
    positives at the site to choose its own."""
    total = calibrations_since(base.manifest.get("triage") or {}).then(on_top)
    out = {}
    for f, rungs in _ladders(base).items():
        k = FINDINGS.index(f)
        z = float(np.interp(target, [s for s, _ in rungs], [math.log(t / (1 - t)) for _, t in rungs]))
        out[f] = float(np.clip(expit(z * total.slope[k] + total.intercept[k]), 1e-6, 1 - 1e-6))
    return out


def ladder_sensitivities(base: Bundle, target: float) -> dict:
    """finding -> the sensitivity its :func:`ladder_thresholds` threshold stands for: ``target``
    within its ladder, the nearest end rung outside it."""
    return {f: float(np.clip(target, rungs[0][0], rungs[-1][0])) for f, rungs in _ladders(base).items()}


@dataclass
class ThresholdChoice:
    thresholds: dict  # finding -> threshold of the new bundle
    lines: list[str]  # what was done beyond the rule (safeguards, targets not reached)
    cv_flags: np.ndarray | None = None  # [N, 14] out-of-fold flags of the chosen thresholds (None: 'keep')
    y: np.ndarray | None = None
    site_chosen: np.ndarray | None = None  # [14] bool: the rule chose on the site's studies (enough positives)
    ladder_at: dict | None = None  # finding -> sensitivity of the bundle's ladder rung its threshold came from


def patient_folds(groups: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number per study, every study of a patient in one fold, patients shuffled."""
    _, patient = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    k = max(1, min(folds, patient.max() + 1 if len(patient) else 1))
    order = np.random.default_rng(seed).permutation(patient.max() + 1 if len(patient) else 0)
    return order[patient] % k


def cross_validated_flags(y: np.ndarray, p: np.ndarray, groups: np.ndarray, rule, seed: int = 0,
                          folds: int = 5, fold: np.ndarray | None = None) -> np.ndarray:
    """[N, C] flags of each study by thresholds that ``rule(y, p)`` chose on the other folds'
    patients: how a threshold rule does on studies it has not seen."""
    fold = patient_folds(groups, folds, seed) if fold is None else fold
    if fold.max(initial=0) < 1:
        return (p >= rule(y, p)).astype(int)
    flags = np.zeros(y.shape, dtype=int)
    for f in np.unique(fold):
        held = fold == f
        flags[held] = (p[held] >= rule(y[~held], p[~held])).astype(int)
    return flags


def sensitivity_of(y: np.ndarray, flags: np.ndarray) -> np.ndarray:
    pos = y.sum(axis=0)
    return np.where(pos > 0, (flags * y).sum(axis=0) / np.maximum(pos, 1), np.nan)


def raised_sensitivity_targets(y: np.ndarray, p: np.ndarray, fold: np.ndarray, target: float,
                               enough: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per finding, the lowest in-sample sensitivity target (from ``target`` up in steps of 0.01)
    whose thresholds reach ``target`` on the folds they were not chosen on, and the
    cross-validated sensitivity it reaches. A threshold at exactly the in-sample target catches
    fewer positives on new studies; this is how much higher it has to aim."""
    inner = np.full(y.shape[1], target)
    reached = np.full(y.shape[1], np.nan)
    for k in np.flatnonzero(enough):
        for goal in np.round(np.arange(target, 1.0 + 1e-9, 0.01), 2):
            flags = cross_validated_flags(y[:, [k]], p[:, [k]], None, lambda yy, pp, g=goal: at_sensitivity(yy, pp, g),
                                          fold=fold)
            inner[k], reached[k] = goal, sensitivity_of(y[:, [k]], flags)[0]
            if reached[k] >= target - 1e-9:
                break
    return inner, reached


def urgent_flags(policy, p: np.ndarray, thresholds: dict) -> np.ndarray:
    """[N] bool: studies with an urgent finding flagged at ``thresholds`` (probabilities ``p``)."""
    cols = [k for k, f in enumerate(FINDINGS) if f in policy.urgent]
    over = p[:, cols] >= np.array([thresholds[FINDINGS[k]] for k in cols])
    return (over & policy.flaggable[cols]).any(axis=1)  # a finding a bundle never flags makes nothing urgent


def written_flags(policy, p_before: np.ndarray, urgent: np.ndarray | None = None) -> np.ndarray | None:
    """[N, 14] bool: where a study's flag of a finding is written at all. A study in the normal
    bucket (P(any) below the cutoff) carries no flag, except an urgent one, and all of them when
    that is flagged (``urgent`` [N]: those studies); the calibrated bundle puts the same studies
    there as its base (:func:`calibrated_triage` moves P(any) and its cutoff together), so the
    base's P(any) on ``p_before`` says which. None: no cutoff."""
    if policy.normal_below is None:
        return None
    above = policy.p_any(p_before) >= policy.normal_below
    if urgent is not None:
        above = above | urgent
    urgent = np.array([f in policy.urgent for f in FINDINGS])
    return above[:, None] | urgent[None, :]


def choose_thresholds(rule: str, scores: "LabelledScores", p: np.ndarray, moved: dict, enough: np.ndarray,
                      seed: int = 0, fallback: dict | None = None, fallback_at: dict | None = None,
                      written: np.ndarray | None = None) -> ThresholdChoice:
    """The new bundle's thresholds by ``rule`` on the calibrated probabilities ``p``, with the
    safeguards of the module docstring. Findings without enough positives keep the moved base
    operating point, except under ``sensitivity:S``, where ``fallback`` (finding -> threshold:
    the bundle's own out-of-fold threshold at S, :func:`ladder_thresholds`) stands in for the
    one the site's few positives cannot choose (``fallback_at``: the sensitivity each stands for,
    when the target lies beyond the bundle's ladder). ``written`` ([N, 14] bool, :func:`written_flags`):
    where a flag is written; thresholds are chosen and measured on the flags a site sees, so a
    positive in the normal bucket counts as missed (None: every flag is written)."""
    name, target = parse_rule(rule)
    # a positive whose flag the normal bucket removes is missed whatever the threshold: at
    # probability 0 it is, for every rule below (v3 on the 480 NIH images, sensitivity:0.8: 0.81
    # of the nodules over threshold, 0.797 flagged). Out of fold a study counts as rescued by its
    # urgent flag at the thresholds chosen on all studies (run_calibrate), not each fold's own
    p = p if written is None else np.where(written, p, 0.0)
    patients = len(np.unique(np.asarray(scores.groups, dtype=str)))
    if name != "keep" and patients < FOLDS:  # no folds to check a threshold on: it would be chosen in sample
        return ThresholdChoice(dict(moved), [f"{rule}: the studies come from fewer than {FOLDS} patients, so no "
                                             f"threshold can be checked out of fold: kept the bundle's operating "
                                             f"points (moved with the calibration)"])
    base = np.array([moved[f] for f in FINDINGS])
    fallback_lines, ladder_at = [], {}
    if name == "sensitivity":
        y = scores.y
        for k, f in enumerate(FINDINGS):
            if enough[k]:
                continue
            here = f"{plural(int(y[:, k].sum()), 'positive')} here"
            if fallback and f in fallback:
                base[k] = fallback[f]
                at = ladder_at[f] = (fallback_at or {}).get(f, target)
                beyond = "" if abs(at - target) < 1e-9 else (
                    f" (the {'highest' if at < target else 'lowest'} its ladder stores; {target:g} lies beyond it)")
                fallback_lines.append(f"{f}: {here}, too few to choose a threshold: the bundle's own out-of-fold "
                                      f"threshold at sensitivity {at:.2f}{beyond} on its development images "
                                      f"({base[k]:.4f}, moved with the calibration)")
            else:
                fallback_lines.append(f"{f}: {here}, too few to choose a threshold, and the bundle stores none at "
                                      f"other sensitivities: kept the bundle's operating point")
    if name == "keep":
        return ThresholdChoice(dict(moved), [])
    y, lines = scores.y, list(fallback_lines)
    # every positive in the normal bucket (no flag written): no threshold catches one, and a rule
    # aiming at them would flag the finding on every other study (sensitivity: 1e-06)
    hopeless = enough & (y == 1).any(axis=0) & ~((y == 1) & (p > 0)).any(axis=0)
    for k in np.flatnonzero(hopeless):
        lines.append(f"{FINDINGS[k]}: every one of its {plural(int(y[:, k].sum()), 'positive')} is in the normal "
                     f"bucket, which carries no {FINDINGS[k]} flag: no threshold catches one, kept the bundle's "
                     f"operating point")
    enough = enough & ~hopeless
    fold = patient_folds(scores.groups, 5, seed)
    if name == "sensitivity":  # aim higher in sample until the out-of-fold sensitivity reaches S
        inner, reached = raised_sensitivity_targets(y, p, fold, target, enough)
        hidden = ((y == 1) & (p <= 0)).sum(axis=0)  # positives in the normal bucket: never flagged
        for k in np.flatnonzero(enough & (reached < target - 1e-9)):
            lines.append(f"{FINDINGS[k]}: sensitivity {target:.2f} cannot be reached out of fold on these studies "
                         f"(at most {reached[k]:.2f}, with every positive flagged in sample"
                         + (f" but the {hidden[k]} in the normal bucket, which carries no flag" if hidden[k] else "")
                         + ")")

        def rule_fn(yy, pp):
            return np.where(enough, [at_sensitivity(yy[:, [k]], pp[:, [k]], inner[k])[0] for k in range(len(inner))],
                            base)
    else:
        def rule_fn(yy, pp):
            return np.where(enough, by_rule(rule, yy, pp), base)
    chosen = rule_fn(y, p)
    cv_new = cross_validated_flags(y, p, None, rule_fn, fold=fold)
    # the safeguard: never leave a finding the base catches with a sensitivity near 0 out of fold
    base_flags = (p >= base).astype(int)
    s_base, s_new = sensitivity_of(y, base_flags), sensitivity_of(y, cv_new)
    for k, f in enumerate(FINDINGS):
        if enough[k] and s_base[k] >= 0.5 and s_new[k] < 0.25:
            chosen[k] = base[k]
            cv_new[:, k] = base_flags[:, k]
            lines.append(f"{f}: kept the bundle's operating point: {rule} would catch {s_new[k]:.2f} of its "
                         f"{plural(int(y[:, k].sum()), 'positive')} out of fold, the bundle's catches {s_base[k]:.2f}")
    lines += flag_burden_lines(cv_new, (p >= np.array([moved[f] for f in FINDINGS])).astype(int))
    return ThresholdChoice({f: float(np.clip(chosen[k], 1e-6, 1 - 1e-6)) for k, f in enumerate(FINDINGS)}, lines,
                           cv_new, y, np.asarray(enough, dtype=bool), ladder_at)


def flag_burden_lines(cv_flags: np.ndarray, base_flags: np.ndarray) -> list[str]:
    """What the chosen thresholds cost, when they flag at least half of the studies for some
    finding: flags per study out of fold against the bundle's operating points, and those
    findings (a sensitivity target on a weak ranking flags most studies, and an urgent finding
    flagged on most studies empties the worklist's order of meaning)."""
    rates = cv_flags.mean(axis=0)
    heavy = [f"{f} {rates[k]:.2f}" for k, f in enumerate(FINDINGS) if rates[k] >= 0.5]
    if not heavy:
        return []
    return [f"out of fold these thresholds flag {cv_flags.sum(axis=1).mean():.1f} findings per study (the bundle's "
            f"operating points: {base_flags.sum(axis=1).mean():.1f}); flagged on half the studies or more: "
            + ", ".join(heavy)]


def calibrated_triage(table, on_top: Calibration, choice: ThresholdChoice, rule: str, n: int,
                      p_any_base: np.ndarray | None = None, any_finding: np.ndarray | None = None) -> dict | None:
    """The base bundle's ``triage`` table for the new bundle. P(any finding) keeps seeing the
    probabilities it was fitted on (``input_calibration``: every site calibration since, undone
    before its weights apply) and its level moves, when the calibration moved, by one offset
    fitted on the site's studies (``p_any_base``: the base bundle's P(any) of each study,
    ``any_finding``: whether it has a finding), the normal cutoff with it: the same studies are
    'normal' as with the base bundle. Each finding's evidence stays the base's when its
    operating point was kept (a finding with too few positives here, too), the sensitivity of the
    ladder rung its threshold came from (``sensitivity:S`` for such a finding: its few positives
    here measure nothing), or the site's cross-validated figures when a rule chose a new one."""
    if not isinstance(table, dict):
        return None
    table = json.loads(json.dumps(table))  # a copy
    total = calibrations_since(table).then(on_top)
    table["input_calibration"] = {"slope": total.slope.tolist(), "intercept": total.intercept.tolist(),
                                  "why": "the site calibrations since the study-level model was fitted: P(any) undoes "
                                         "them, so it sees the probabilities it was fitted on"}
    study = table.get("any_finding")
    moved = bool(np.any(on_top.slope != 1.0) or np.any(on_top.intercept != 0.0))
    if isinstance(study, dict) and moved and p_any_base is not None and len(p_any_base):
        from .calibration import PULL, _offset

        level = logit(np.clip(p_any_base, 1e-6, 1 - 1e-6))
        delta = _offset(level, np.asarray(any_finding, dtype=float), PULL)
        study["bias"] = float(study["bias"]) + delta
        if study.get("normal_below") is not None:
            cut = float(study["normal_below"])
            study["normal_below"] = float(np.clip(expit(math.log(cut / (1 - cut)) + delta), 1e-6, 1 - 1e-6))
        study["site_offset"] = {"offset": delta, "fitted_on": n,
                                "why": "P(any)'s level fitted on this site's studies; the normal cutoff moved with it, "
                                       "so the same studies are 'normal' as with the base bundle"}
    if choice.cv_flags is not None:
        y, flags = choice.y, choice.cv_flags
        base_source = table.get("measured_on") or "the base bundle's validation"
        findings = table.setdefault("findings", {})
        ladder_at = choice.ladder_at or {}
        for k, f in enumerate(FINDINGS):
            entry = findings.setdefault(f, {})
            if entry.get("flagged") is False:
                continue
            if choice.site_chosen is not None and not choice.site_chosen[k]:
                if f in ladder_at:
                    entry.update({"sensitivity": ladder_at[f], "specificity": None, "ppv_at_nih_prevalence": None,
                                  "ppv_at_site": None, "flag_rate": float(flags[:, k].mean()),
                                  "measured_on": f"the base bundle's out-of-fold ladder on its development images, "
                                                 f"at sensitivity {ladder_at[f]:.2f}: {plural(int(y[:, k].sum()), 'positive')} "
                                                 f"here {'is' if int(y[:, k].sum()) == 1 else 'are'} too few to measure"})
                # otherwise its base operating point (moved) is kept, and so is its evidence, which says so
                entry.setdefault("measured_on", f"the base bundle's figures ({base_source}): too few positives at "
                                                "this site")
                continue
            op = metrics.operating_point(y[:, k], flags[:, k])
            entry.update({"sensitivity": op["sensitivity"], "specificity": op["specificity"],
                          "ppv_at_nih_prevalence": None, "ppv_at_site": op["ppv"], "flag_rate": float(flags[:, k].mean()),
                          "positives": int(y[:, k].sum())})
        if isinstance(study, dict) and not study.get("measured_on"):
            # the buckets' figures stay the base's, measured at its thresholds: said, so reports do not
            # attribute them to the site's studies that the operating points' figures now come from
            study["measured_on"] = (f"{table.get('measured_on') or 'the base bundle validation'}, at the base bundle's "
                                    "thresholds before this site's calibration")
        table["measured_on"] = f"cross-validated on the {n} labelled studies of this site's calibration ({rule})"
        if choice.site_chosen is not None and not choice.site_chosen.all():
            table["measured_on"] += ("; findings with too few positives there: the base bundle's figures, or under "
                                     "sensitivity:S the sensitivity of its development images' threshold ladder")
    return table