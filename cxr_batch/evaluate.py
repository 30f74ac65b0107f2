"""``cxr-batch evaluate``: how the model does on a site's own labelled studies.

It runs the normal scan (``DIR/results.csv``, same schema as ``scan``; the labels' patient
columns serve as ``--metadata``), then computes every number from that results.csv and the
labels, so anyone can recompute them from the two files: the probabilities as written (6
decimals) and the flags as written (the bundle's thresholds). ``DIR/evaluation.json`` holds
the numbers and their definitions; ``DIR/evaluation.pdf`` shows them to a clinical lead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import metrics
from .bundle import DEFAULT_BUNDLE, atomic_write_bytes, read_manifest, sha256_file
from .evidence import bundle_evidence
from .findings import FINDINGS
from .journal import STATE_DIR, EarlierResults
from .labels import LabelsError, LabelTable, Matching, NoStudyFiles, match_labels
from .provenance import (CALIBRATION, CALIBRATION_IN_SAMPLE, TrainingImages, calibration_labels, overlap, pixel_key,
                         read_image_list)
from .results import read_results
from .scan import ScanConfig, ScanSummary, run_scan

log = logging.getLogger("cxr_batch")
# the sha256 of the results.csv an evaluation scanned, written before the evaluation itself: a
# run stopped after its scan leaves results that are an evaluation's, not a scan's
EVALUATED_RESULTS = "evaluation-results.sha256"

AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, math.inf, "80+"))
UNKNOWN = "unknown"
DEFINITIONS = {
    "matching": "a scored file matches the label row whose 'Image Index' is its file name, else its name without "
                "the extension; a label that several files match is left out",
    "patient": "the labels' Patient ID, else the scan's patient_id, else the file (its own patient)",
    "probabilities": "p_<Finding> of results.csv as written (6 decimals); flags: flag_<Finding> as written",
    "auroc": "sklearn.metrics.roc_auc_score per finding; null when the finding has only one label value",
    "mean_auroc": "mean of the per-finding AUROCs over the findings with both labels (listed in mean_auroc_findings)",
    "bootstrap": f"percentile interval ({metrics.LEVEL:.0%}) over resamples of patients drawn with replacement, each "
                 "bringing all its images; resamples lacking positives or negatives of a finding in the statistic "
                 f"are drawn again; a finding with fewer than {metrics.MIN_CI_PATIENTS} positive or negative "
                 "patients gets no interval",
    "ece": f"{metrics.ECE_BINS} equal-width bins of probability over [0, 1]; sum over bins of (pairs in bin / pairs) "
           "x |observed frequency - mean probability|; 'ece' pools every image-finding pair, per_finding ECE uses "
           "that finding's images",
    "brier": "mean of (probability - label)^2 over every image-finding pair",
    "brier_prevalence": "Brier score of predicting, for every image, each finding's prevalence in this evaluation set",
    "brier_training_prevalence": "the same with the bundle's training prevalence (null when its manifest has none)",
    "operating_point": "sensitivity, specificity, PPV, NPV of the flags at the bundle's thresholds; null when the "
                       "denominator is zero; flag_rate: the share of all studies flagged for the finding",
    "training_overlap": "a study is in-sample when its file name or the Image Index it matched, without the "
                        "extension, is in the bundle's training_images.csv, or its Patient ID (as written) is one of "
                        "the patients there, or its decoded pixels' sha256 is the pixels_sha256 of a row there (a "
                        "copy under another name or format; renamed_copies counts them, null when the list has no "
                        "pixels_sha256); without_them: the headline numbers on the studies in-sample in no way "
                        "(neither training nor calibration studies), or too_few (why not) when fewer than "
                        f"{metrics.MIN_CI_PATIENTS} of their patients have a positive, or a negative, of the "
                        "findings in the mean",
    "calibration_overlap": "for a site-calibrated bundle: the same check against its calibration_images.csv, the "
                           "studies its calibration and thresholds were fitted on; null for a bundle not calibrated",
    "calibrated_on": "for a site-calibrated bundle, whether these labels are the table it was calibrated with (the "
                     "same sha256): its calibration and thresholds were fitted on them; null for a bundle not calibrated",
    "triage": "study-level rates from results.csv as written: the share of studies in each bucket (priority), among "
              "all studies, those with a finding (any of the 14) and those without; flags per study; worklist AUROC: "
              "how well the order of worklist_rank (1 = read first) puts studies with a finding before those "
              "without (and studies with the urgent finding before the rest); p_any AUROC likewise for P(any); "
              "normal_below: the bundle's P(any) cutoff of the normal (low-probability) bucket, null when it has "
              "none and 'normal' means nothing flagged",
}


@dataclass
class LabelledResults:
    """The scored, labelled studies of a results.csv: arrays in FINDINGS order."""

    rows: list[dict]  # results.csv rows, one per study
    y: np.ndarray  # [N, 14] 0/1
    p: np.ndarray  # [N, 14] probabilities as written
    flags: np.ndarray  # [N, 14] 0/1 as written
    groups: np.ndarray  # [N] patient keys
    matching: Matching
    labelled_as: list[str]  # [N] the label row's Image Index each study matched
    patient_ids: list[str]  # [N] the Patient ID (labels', else the scan's), '' when unknown
    pixels: list[str] | None = None  # [N] each file's provenance.pixel_key, when a list to compare has them


def labelled_results(rows: list[dict], labels: LabelTable) -> LabelledResults:
    matching = match_labels(rows, labels)
    picked = [rows[i] for i, _ in matching.pairs]
    shape = (len(picked), len(FINDINGS))
    p = np.array([[float(r[f"p_{f}"]) for f in FINDINGS] for r in picked], dtype=float).reshape(shape)
    flags = np.array([[int(r[f"flag_{f}"]) for f in FINDINGS] for r in picked], dtype=int).reshape(shape)
    y = labels.y[[j for _, j in matching.pairs]].astype(int).reshape(shape)
    return LabelledResults(picked, y, p, flags, np.array(matching.groups, dtype=str), matching,
                           [labels.files[j] for _, j in matching.pairs],
                           [labels.patient_ids[j] or rows[i].get("patient_id") or "" for i, j in matching.pairs])


def in_sample_overlaps(data: LabelledResults, training: TrainingImages | None, calibrated: bool,
                       calibration: TrainingImages | None) -> tuple[dict, dict | None]:
    """evaluation.json's ``training_overlap`` and ``calibration_overlap`` (None for a bundle not
    calibrated): how many studies (and patients) the bundle was trained or tuned on, and
    calibrated on, each with the headline numbers on the studies in neither (the out-of-sample part)."""
    files = [r["file"] for r in data.rows]
    training_said, in_training = overlap(training, files, data.labelled_as, data.patient_ids, pixels=data.pixels)
    calibration_said, in_calibration = None, [False] * len(files)
    if calibrated:
        calibration_said, in_calibration = overlap(calibration, files, data.labelled_as, data.patient_ids,
                                                   CALIBRATION_IN_SAMPLE, CALIBRATION, data.pixels)
    rest = ~(np.array(in_training, dtype=bool) | np.array(in_calibration, dtype=bool))
    for said in (training_said, calibration_said):
        if said and said["checked"] and said["in_sample_studies"]:
            said["without_them"] = out_of_sample(data.y[rest], data.p[rest], data.groups[rest]) if rest.any() else None
    return training_said, calibration_said


def out_of_sample(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict:
    """``without_them``: the headline numbers of the studies in neither the training nor the calibration list; of
    too few to measure (the rule of the mean AUROC's interval: at least MIN_CI_PATIENTS patients
    with a positive and with a negative of the findings in the mean), their counts and
    ``too_few``, saying why, instead: a mean AUROC of two studies reads as a finding."""
    short = patients_short(y, groups)
    if short is None:
        return summary_of(y, p, groups)
    return {"n": int(len(y)), "patients": int(len(set(groups))),
            "too_few": f"{short} for the findings in the mean, too few to measure (needs "
                       f"{metrics.MIN_CI_PATIENTS} positive and {metrics.MIN_CI_PATIENTS} negative)"}


def age_band(age: str) -> str:
    try:
        years = float(age)
    except ValueError:
        return UNKNOWN
    return next(name for low, high, name in AGE_BANDS if low <= years < high)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def per_finding(data: LabelledResults, thresholds: dict, n_bootstrap: int, seed: int) -> dict:
    out = {}
    for k, f in enumerate(FINDINGS):
        y, p = data.y[:, k], data.p[:, k]
        pos_patients, neg_patients = metrics.patients_per_label(y, data.groups)
        interval = metrics.auroc_interval(y, p, data.groups, n_bootstrap, seed)
        prevalence = float(y.mean())
        out[f] = {
            "positives": int(y.sum()), "negatives": int(len(y) - y.sum()), "positive_patients": pos_patients,
            "negative_patients": neg_patients, "prevalence": prevalence, "mean_probability": float(p.mean()),
            "auroc": _finite(metrics.auroc(y, p)), "auroc_ci95": interval.to_dict()["ci"], "auroc_ci_note": interval.note,
            "threshold": float(thresholds[f]), **metrics.operating_point(y, data.flags[:, k]),
            "flag_rate": float(data.flags[:, k].mean()),
            "ece": _finite(metrics.ece(y, p)), "brier": _finite(metrics.brier(y, p)),
            "brier_prevalence": _finite(metrics.brier_of_constant(y[:, None], [prevalence])),
        }
    return out


def summary_of(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict:
    """The headline numbers of a set of studies (the whole set or a subgroup), without intervals."""
    aucs = metrics.auroc_per_finding(y, p)
    return {"n": int(len(y)), "patients": int(len(set(groups))), "mean_auroc": _finite(metrics.mean_auroc(y, p)),
            "findings_in_mean": int(np.isfinite(aucs).sum()), "ece": _finite(metrics.ece(y, p)),
            "brier": _finite(metrics.brier(y, p))}


def by_group(data: LabelledResults) -> dict:
    """Headline numbers by view, sex and age band (as the model received them), with n."""
    keys = {
        "view": [r["view"] or UNKNOWN for r in data.rows],
        "sex": [r["sex"] or UNKNOWN for r in data.rows],
        "age_band": [age_band(r["age"]) for r in data.rows],
    }
    out = {}
    for name, values in keys.items():
        values = np.array(values)
        out[name] = {v: summary_of(data.y[values == v], data.p[values == v], data.groups[values == v])
                     for v in sorted(set(values))}
    return out


def study_level(data: LabelledResults, urgent: str = "Pneumothorax") -> dict:
    """What the worklist did with these studies: buckets overall, among studies with and without
    a finding, flags per study, and how well its order ranks them (see DEFINITIONS['triage'])."""
    priority = np.array([r.get("priority", "") for r in data.rows])
    rank = np.array([float(r["worklist_rank"]) if r.get("worklist_rank") else np.nan for r in data.rows])
    p_any = np.array([float(r["p_any"]) if r.get("p_any") else np.nan for r in data.rows])
    any_finding = data.y.max(axis=1) if len(data.y) else np.zeros(0)
    u = data.y[:, FINDINGS.index(urgent)] if len(data.y) else np.zeros(0)

    def shares(mask):
        n = int(mask.sum())
        return {"n": n, **{b: (float((priority[mask] == b).mean()) if n else None) for b in ("urgent", "abnormal", "normal")}}

    def ranked(y, score):
        ok = np.isfinite(score)
        return _finite(metrics.auroc(y[ok], score[ok])) if ok.any() else None

    return {
        "buckets": {"all": shares(np.ones(len(priority), dtype=bool)), "with_a_finding": shares(any_finding == 1),
                    "without_a_finding": shares(any_finding == 0)},
        "studies_flagged": _finite(float(data.flags.any(axis=1).mean())) if len(data.y) else None,
        "flags_per_study": _finite(float(data.flags.sum(axis=1).mean())) if len(data.y) else None,
        "worklist_auroc_any_finding": ranked(any_finding, -rank),
        f"worklist_auroc_{urgent.lower()}": ranked(u, -rank),
        "p_any_auroc": ranked(any_finding, p_any),
    }


def training_prevalence(manifest: dict) -> np.ndarray | None:
    """The bundle's training prevalence per finding, when its manifest records it."""
    record = manifest.get("training", {}).get("prevalence")
    if not isinstance(record, dict) or any(not isinstance(record.get(f), (int, float)) for f in FINDINGS):
        return None
    return np.array([float(record[f]) for f in FINDINGS])


def patients_short(y: np.ndarray, groups: np.ndarray) -> str | None:
    """Whether the findings in the mean AUROC (those with both labels) rest on too few patients:
    "K positive patient(s)" (or negative) when fewer than MIN_CI_PATIENTS have a positive (a
    negative) of them, "no finding with both labels" when there is none; None when enough.
    ``y`` [N, 14], ``groups`` [N] the patient of each study."""
    cols = [c for c in range(y.shape[1]) if metrics.has_both_labels(y[:, c])]
    if not cols:
        return "no finding with both positive and negative studies"
    pos = metrics.patients_per_label(y[:, cols].max(axis=1), groups)[0]
    neg = metrics.patients_per_label(y[:, cols].min(axis=1), groups)[1]
    if min(pos, neg) < metrics.MIN_CI_PATIENTS:
        return f"{pos} positive patient(s)" if pos < metrics.MIN_CI_PATIENTS else f"{neg} negative patient(s)"
    return None


def mean_auroc_interval(y, p, groups, n_bootstrap: int, seed: int) -> metrics.Interval:
    """The mean AUROC's interval under each finding's rule: none when fewer than
    MIN_CI_PATIENTS patients have a positive (or a negative) of the findings in the mean (three
    labelled studies gave "95% CI 0.000-0.500" from resamples of three patients)."""
    short = patients_short(y, groups)
    if short is not None and any(metrics.has_both_labels(y[:, c]) for c in range(y.shape[1])):
        return metrics.Interval(None, None, 0, 0, f"{short} for the findings in the mean: no CI "
                                                  f"(needs {metrics.MIN_CI_PATIENTS})")
    return metrics.mean_auroc_interval(y, p, groups, n_bootstrap, seed)


def evaluation(data: LabelledResults, manifest: dict, n_bootstrap: int = 1000, seed: int = 0,
               training: TrainingImages | None = None, calibration: TrainingImages | None = None) -> dict:
    """Every number of evaluation.json from the labelled results and the bundle's manifest;
    ``training``, ``calibration``: the bundle's training images and calibration studies
    (:func:`cxr_batch.provenance.read_image_list`)."""
    y, p, groups = data.y, data.p, data.groups
    overall = mean_auroc_interval(y, p, groups, n_bootstrap, seed)
    aucs = metrics.auroc_per_finding(y, p)
    train_prev = training_prevalence(manifest)
    brier, brier_prev = metrics.brier(y, p), metrics.brier_of_constant(y, y.mean(axis=0))
    training_said, calibration_said = in_sample_overlaps(data, training, "calibration" in manifest, calibration)
    return {
        "model": f"{manifest.get('name', '')}@{manifest.get('version', '')}",
        # the bundle's identity (weights, thresholds, calibration: what results.csv names), and its weights file's
        "bundle_sha256": manifest.get("bundle_sha256"), "weights_sha256": manifest["sha256"],
        "calibrated": "calibration" in manifest,
        "n_studies": int(len(y)), "n_patients": int(len(set(groups))),
        # studies the model was trained or tuned on, or calibrated on: its figures on them are in-sample
        "training_overlap": training_said, "calibration_overlap": calibration_said,
        "mean_auroc": _finite(metrics.mean_auroc(y, p)), "mean_auroc_ci95": overall.to_dict()["ci"],
        "mean_auroc_ci_note": overall.note,
        "mean_auroc_findings": [f for f, a in zip(FINDINGS, aucs) if math.isfinite(a)],
        "ece": _finite(metrics.ece(y, p)), "ece_bins": metrics.ECE_BINS,
        "brier": _finite(brier), "brier_prevalence": _finite(brier_prev),
        "brier_prevalence_source": "this evaluation set's prevalence per finding",
        "brier_training_prevalence": _finite(metrics.brier_of_constant(y, train_prev)) if train_prev is not None else None,
        "brier_skill": _finite(1 - brier / brier_prev) if brier_prev > 0 else None,
        "mean_probability": _finite(float(p.mean())), "prevalence": _finite(float(y.mean())),
        "per_finding": per_finding(data, manifest["thresholds"], n_bootstrap, seed),
        # the bundle's P(any) cutoff; null: no cutoff (v1, v2), its "normal" bucket is "nothing flagged"
        "triage": {**study_level(data), "normal_below": bundle_evidence(manifest).study_level.normal_below},
        "by_group": by_group(data),
        "reliability": metrics.reliability(y, p),
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "level": metrics.LEVEL,
                      "resamples_drawn_for_mean": overall.drawn},
        "matching": data.matching.summary(),
        "definitions": DEFINITIONS,
    }


def _scanned_by_evaluate(out: Path) -> bool:
    """Whether ``out/results.csv`` is the one an evaluation scanned (and was stopped after)."""
    mark = out / STATE_DIR / EVALUATED_RESULTS
    try:
        return mark.read_text().strip() == sha256_file(out / "results.csv")
    except OSError:
        return False


def _mark_as_evaluated(out: Path) -> None:
    """Record that ``out/results.csv``, when there is one, is what an evaluation scanned."""
    if (out / "results.csv").is_file():
        atomic_write_bytes(out / STATE_DIR / EVALUATED_RESULTS, sha256_file(out / "results.csv").encode(), mode=0o640)


def run_evaluate(studies: Path, labels: LabelTable, out: Path, cfg: ScanConfig = ScanConfig(),
                 n_bootstrap: int = 1000, seed: int = 0) -> tuple[dict, ScanSummary]:
    """Scan ``studies`` into ``out/results.csv`` and write ``out/evaluation.json`` and
    ``out/evaluation.pdf``. Raises what run_scan raises, and LabelsError when no labelled study
    was scored."""
    out = Path(out)
    cfg = replace(cfg, metadata=str(labels.path) if labels.has_patient_data else None, pdf=False)
    if (out / "results.csv").exists() and not (out / "evaluation.json").exists() and not _scanned_by_evaluate(out):
        raise EarlierResults(f"{out} holds the results of a scan (results.csv without evaluation.json): an "
                             f"evaluation would replace them; choose another --out (or remove that results.csv "
                             f"if it is left from an evaluation that was stopped)")
    folder = Path(cfg.weights) if cfg.weights else DEFAULT_BUNDLE
    manifest = read_manifest(folder)
    training, calibration = read_image_list(folder, manifest), read_image_list(folder, manifest, CALIBRATION)
    # the studies' pixel keys, where a list has them to compare: from the scan's own decoding
    pixels = any(listed and listed.pixels for listed in (training, calibration))
    try:
        summary = run_scan(studies, out, cfg, earlier="overwrite", metadata_option="--labels",  # an earlier evaluation here is replaced
                           pixel_keys=pixels, resumable=False)
    except BaseException as e:
        # stopped during the scan (Ctrl-C, a full disk): a results.csv there now is this scan's, so
        # marked as an evaluation's the same command replaces it, not refuses it as a scan's
        with contextlib.suppress(OSError):  # a full disk: what stopped the scan is what is said
            _mark_as_evaluated(out)
        if isinstance(e, KeyboardInterrupt) and (out / "results.csv").exists():
            raise KeyboardInterrupt(f"interrupted (Ctrl-C) during the scan: {out / 'results.csv'} holds what was "
                                    f"scored, no evaluation was written; the same command evaluates again") from None
        raise
    _mark_as_evaluated(out)
    if summary.files_found == 0:  # not the labels' fault: said as scan says it, with its exit code
        raise NoStudyFiles(f"no files under {studies}: nothing to evaluate (an unmounted share or a wrong path?)")
    data = labelled_results(read_results(summary.results), labels)
    if len(data.y) == 0:
        listed = f"{summary.results}'s file column and {labels.path}"
        raise LabelsError("no labelled study was scored: " + "; ".join(data.matching.problems(listed) or ["no studies"]))
    if pixels:  # a study whose pixels the scan decoded smaller than stored is read again (milliseconds)
        data = replace(data, pixels=[summary.pixel_keys.get(r["file"]) or pixel_key(Path(studies) / r["file"])
                                     for r in data.rows])
    result = evaluation(data, manifest, n_bootstrap, seed, training, calibration)
    for said in (result["training_overlap"], result["calibration_overlap"]):
        if said and said["message"]:  # once per evaluation; a bundle without the list is no error
            (log.warning if said["checked"] else log.info)("%s%s", "warning: " if said["checked"] else "",
                                                           said["message"])
    result["labels"] = {"file": str(labels.path), "sha256": labels.sha256}
    result["calibrated_on"] = calibration_labels(manifest, labels.sha256)
    if result["calibrated_on"] and result["calibrated_on"]["message"]:
        log.warning("warning: %s", result["calibrated_on"]["message"])
    result["results_csv"] = str(summary.results)
    generated = dt.datetime.now().astimezone().replace(microsecond=0)  # the moment both files name
    result["generated"] = generated.isoformat()
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    from .evaluation_report import write_evaluation_pdf  # matplotlib only when the report is drawn

    # the PDF, then evaluation.json, the mark of a complete evaluation: a stop or a failure in
    # between leaves neither (the scan's overwrite removed the earlier evaluation's, so nothing
    # here describes other results)
    writing = out / "evaluation.pdf"
    try:
        write_evaluation_pdf(result, data.y, data.p, writing, generated)
        writing = out / "evaluation.json"
        atomic_write_bytes(writing, text.encode(), mode=0o640)
    except BaseException as e:
        for name in ("evaluation.pdf", "evaluation.json"):
            (out / name).unlink(missing_ok=True)
        after = f"{summary.results} holds the scan, no evaluation was written; the same command finishes it"
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(f"interrupted (Ctrl-C) after the scan: {after}") from None
        if isinstance(e, OSError):  # a full disk: say which file, and what is there now
            raise OSError(e.errno, f"{e.strerror or e} ({after})", str(writing)) from None
        raise
    return result, summary
