"""The model card of a bundle ``cxr-batch train`` writes (``MODEL_CARD.md``, sealed in its
manifest): what the weights are for, what they were trained on and how they measured, from the
run's own files (``prepare.json``, ``metrics.json``, ``thresholds.json``) and configuration, and
nothing else: no figure in it was measured anywhere but in this run. It says which figures are
the test part's (held out by the split, scored by the run itself) and which are validation's
(the part that chose the checkpoint and the thresholds), and that no evaluation on other
studies has been made (``cxr-batch evaluate`` makes one).
"""

from __future__ import annotations

import math

from cxr_batch.evidence import MIN_VALIDATION_IMAGES
from cxr_batch.findings import FINDINGS

CARD_FILE = "MODEL_CARD.md"
PARTS = (("train", "training"), ("val", "validation"), ("test", "test"))


def number(value, digits: int = 3) -> str:
    """A measured figure, or why there is none (a part without positive and negative images)."""
    if value is None or not math.isfinite(value):
        return "not measurable"
    return f"{value:.{digits}f}"


def interval(ci) -> str:
    """' (95% CI lo-hi)', or nothing where the bootstrap gave none (or was off)."""
    if not ci or None in ci or not all(math.isfinite(v) for v in ci):
        return ""
    return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def threshold_rule(cfg) -> str:
    """The rule the thresholds were chosen by, on the validation part, with the run's settings."""
    if cfg.threshold_method == "youden":
        return "per finding, the threshold with the largest sensitivity + specificity - 1 (Youden's J)"
    if cfg.threshold_method == "precision_f1":
        return (f"per finding, the threshold with the best F1 among those with precision at least "
                f"{cfg.precision_min:g} (the best F1 of all where none reaches it)")
    return (f"per finding, the threshold with the best F1 among those with precision at least "
            f"{cfg.dynamic_precision_min:g}; where that F1 stays under {cfg.dynamic_f1_floor:g}, lowered by "
            f"{cfg.dynamic_step:g} to favour sensitivity (`dynamic`, the study's rule)")


def initialisation_text(started: dict) -> str:
    """``training.initialised_from`` in words: each file by its sha256 and the format it was read as."""
    if not started or started.get("random"):
        return "random weights (no pretrained file, no ImageNet weights)."
    lines = []
    if "imagenet" in started:
        imagenet = started["imagenet"]
        lines.append(f"ImageNet backbone: torchvision `{imagenet['torchvision']}`" if "torchvision" in imagenet else
                     f"ImageNet backbone: `{imagenet.get('file')}` (sha256 `{imagenet.get('sha256')}`)")
    if "backbone" in started:
        b = started["backbone"]
        lines.append(f"backbone: `{b.get('file')}` (sha256 `{b.get('sha256')}`), read as format "
                     f"`{b.get('format')}`; its input normalisation became this bundle's")
    if "weights" in started:
        w = started["weights"]
        lines.append(f"whole model: bundle `{w['bundle']}` (bundle_sha256 `{w.get('bundle_sha256')}`)" if "bundle" in w
                     else f"whole model: `{w.get('file')}` (sha256 `{w.get('sha256')}`)")
    return "; ".join(lines) + "."


def model_card(cfg, results: dict, data: dict, thresholds: dict, evidence_problem: str | None) -> str:
    """MODEL_CARD.md of a trained bundle. ``results``: the run's metrics.json; ``data``: its
    prepare.json; ``thresholds``: {finding: threshold}; ``evidence_problem``: why reports will
    say the bundle lacks validation evidence (:mod:`cxr_batch.evidence`), or None."""
    images, patients = data.get("images", {}), data.get("patients", {})
    test, ci = results["test"], results["test_ci95"]
    image_only, baseline = results["test_image_only"], results["patient_only_logistic_regression"]
    prior = results.get("patient_prior") or {}
    chose = {"macro_f1": "the epoch kept (the best validation macro F1)", "mean_auc":
             "the epoch kept (the best validation mean AUROC)", "last": "nothing of the epochs (the last is kept)"}[
        cfg.select_metric]
    chose += (", the patient prior's weight" if prior.get("method") == "logistic"
              and cfg.patient_prior_weight == "validation" else "") + " and the thresholds"
    out = [f"# Model card: {cfg.model_name} {cfg.version} (written by `cxr-batch train`)", "",
           f"**Intended use.** {cfg.intended_use}", "",
           "**What the figures are.** Every figure below was measured by the run that made these weights, "
           "and is in its run folder (`metrics.json`, `prepare.json`, `thresholds.json`, `history.json`):",
           f"- **test**: the run's test part, {images.get('test')} images of {patients.get('test')} patients, held "
           "out by patient when the data were split: no weights, checkpoint or threshold were chosen on them. "
           "They were scored by `cxr-batch train` itself (float32, the scan's preprocessing), not through "
           "`cxr-batch evaluate`, and come from the same table and image folder as the training images.",
           f"- **validation**: {images.get('val')} images of {patients.get('val')} patients that chose {chose}: "
           "figures measured on them favour these weights.",
           "- **No evaluation on other studies has been done yet.** Before any use, run `cxr-batch evaluate "
           "STUDIES --labels LABELS --weights BUNDLE` (BUNDLE: this folder) on the site's own labelled studies (it names any "
           "that are among `training_images.csv`), then, if the figures justify it, `cxr-batch calibrate` on one "
           "part and `evaluate` the new bundle on another (README, \"Evaluating and calibrating\")."]
    if evidence_problem:
        out.append(f"- **Every scan and report of these weights warns that they lack validation evidence**: "
                   f"{evidence_problem}.")
    out += ["", "## Data", "", "| part | images | patients |", "| --- | --- | --- |"]
    out += [f"| {name} | {images.get(key)} | {patients.get(key)} |" for key, name in PARTS]
    out += ["", f"Rows of the metadata table read: {data.get('rows_read')}; after undersampling "
                f"({data.get('undersampled')}): {data.get('after_undersampling')}. Split: {data.get('split')}. "
                "Training examples after "
                f"balancing (mirrored and replicated copies of training images): {data.get('train_examples_after_balancing')}. "
                "The training and validation images are listed in `training_images.csv`.", "",
            f"Input: {cfg.preprocessing.image_size} x {cfg.preprocessing.image_size} pixels. Initialised from "
            + initialisation_text(results.get("initialised_from") or {}),
            "", "Patient prior: " + ("none." if prior.get("method") != "logistic" else
                                     f"a logistic regression on the patient data added to the logits, weight "
                                     f"{prior.get('weight')}."),
            "", f"## Test ({test['n']} images, held out by the split)", ""]
    # a tiny test part printed 'mean AUROC 0.412 (95% CI 0.363-0.516)' as if measured closely, over
    # the findings that happened to have a test positive, unnamed: say so, in the card's own words
    if test["n"] < MIN_VALIDATION_IMAGES:
        out += [f"**Too few test images to judge these weights by**: {test['n']} images of {patients.get('test')} "
                f"patients, fewer than the {MIN_VALIDATION_IMAGES} below which every report warns. A rare finding "
                "has one or two test positives, or none; the intervals below keep only the resamples that draw "
                "every finding's positive and negative patients, and understate what is not known.", ""]
    measured = sum(1 for a in test["auc"] if a is not None and math.isfinite(a))
    over = f"mean AUROC over the {measured} of {len(FINDINGS)} findings with test positives and negatives"
    out += ["| | test |", "| --- | --- |",
            f"| {over}, with patient data | {number(test['mean_auc'])}{interval(ci['mean_auc'])} |",
            f"| {over}, image only (patient data unknown) | {number(image_only['mean_auc'])}"
            f"{interval(image_only['ci95']['mean_auc'])} |",
            f"| {over}, patient data alone (logistic regression on age, sex and view) | "
            f"{number(baseline['mean_auc'])}{interval(baseline['ci95'])} |",
            f"| macro F1 at the thresholds | {number(test['f1_macro'])}{interval(ci['f1_macro'])} |"]
    flagged = (results.get("threshold_methods") or {}).get(cfg.threshold_method, {}).get("studies_flagged")
    if flagged is not None:
        out.append(f"| share of test studies with at least one flag | {number(flagged)} |")
    out += ["", "Intervals: bootstrap by patient (`cxr_batch/metrics.py`, the one `cxr-batch evaluate` uses); none "
                "where too few patients had a finding (`metrics.json`, `test_ci95.notes`, says why)."]
    note = (ci.get("notes") or {}).get("mean_auc")
    if note:  # quoted as metrics.json has it: how many resamples were drawn again to keep every finding
        out += ["", f"The mean AUROC's interval, in `metrics.json`'s words: `{note}`."]
    groups = results.get("by_group") or {}
    if groups:
        out += ["", "| test subgroup | images | mean AUROC | macro F1 |", "| --- | --- | --- | --- |"]
        out += [f"| {name} | {g['n']} | {number(g['mean_auc'])} | {number(g['f1_macro'])} |" for name, g in groups.items()]
    counts, prevalence = results.get("test_counts") or {}, results.get("prevalence") or {}
    out += ["", "## Per finding", "",
            "Training prevalence: the share of the unique training images with the finding. Threshold: chosen on "
            f"the validation part, {threshold_rule(cfg)}. Test counts at that threshold.", "",
            "| finding | training prevalence | threshold | test AUROC | TP | FN | FP | TN |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, f in enumerate(FINDINGS):
        c = counts.get(f, {})
        out.append(f"| {f} | {number(prevalence.get(f))} | {thresholds[f]:g} | {number(test['auc'][k])} | "
                   f"{c.get('tp')} | {c.get('fn')} | {c.get('fp')} | {c.get('tn')} |")
    history = results.get("history") or []
    out += ["", "## Training (validation figures per epoch)", "",
            f"Epoch history from {results.get('history_from') or 'this run'}. Per-epoch validation reads the "
            "training image cache (it only picks the checkpoint); the thresholds were tuned on the validation "
            "images read as a scan reads them.", ""]
    if history:
        out += ["| epoch | training loss | validation loss | validation macro F1 | validation mean AUROC |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {h['epoch']} | {number(h['train_loss'], 4)} | {number(h['val_loss'], 4)} | {number(h['f1_macro'])} | "
                f"{number(h['mean_auc'])} |" for h in history]
    else:
        out.append("No epochs were trained and no history was inherited.")
    out += ["", "This card is sealed in `manifest.json` (`model_card`: its sha256), so `bundle_sha256` covers it "
                "and loading refuses an edited card. `cxr-batch calibrate` does not copy it into the bundle it "
                "writes: that bundle's thresholds and figures are not these."]
    return "\n".join(out) + "\n"
