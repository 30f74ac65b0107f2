"""The held-out test of a bundle: its images scored through the real command line.

    python -m training.heldout --cv runs/v3cv --bundle weights/cxr-fpn-v3 --out runs/v3heldout \\
        --images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv \\
        --images ../shared/data/nih_extra/images --labels ../shared/data/nih_extra/labels.csv \\
        [--write-manifest]

The test images (``test`` in ``<cv>/folds.csv``: patients no model trained on and no choice
looked at) are linked into ``<out>/studies`` and scored twice with ``cxr-batch evaluate``
(float32 on the CPU, so the figures are the same on any machine): with their patient data
(the labels' age, sex and view as ``--metadata``) and without it (image only). Beside them, the
age/sex/view regression fitted on the full NIH table without any of the labelled patients
(``<cv>/prior_<chosen>.json``), paired with the model by patient bootstrap. Writes
``<out>/heldout.json``; with ``--write-manifest`` the bundle's ``metrics`` get these figures
(``test_*``, what every report quotes, become the held-out ones) and the bundle is sealed again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_batch.bundle import read_manifest, write_manifest
from cxr_batch.findings import FINDINGS
from cxr_batch.patient import PatientEncoding

from . import cvstats
from .crossval import image_paths, load_sources
from .prepare import multi_hot
from .table_prior import encode_rows, prior_probabilities_uncentred

NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position"]


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def evaluate(studies: Path, labels: Path, out: Path, bundle: Path, bootstrap: int) -> dict:
    """``cxr-batch evaluate`` as a user runs it, float32 on the CPU; its evaluation.json."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "cxr_batch", "evaluate", str(studies), "--labels", str(labels), "--out", str(out),
           "--weights", str(bundle), "--device", "cpu", "--precision", "fp32", "--bootstrap", str(bootstrap),
           "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "evaluation.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cv", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", required=True, action="append")
    ap.add_argument("--labels", required=True, action="append")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--write-manifest", action="store_true",
                    help="put the held-out figures into the bundle's metrics (the bundle is sealed again)")
    args = ap.parse_args(argv)
    cv, out, bundle = Path(args.cv), Path(args.out), Path(args.bundle)
    labels = load_sources(args.images, args.labels)
    folds = pd.read_csv(cv / "folds.csv", dtype={"patient_id": str})
    if "test" not in folds or list(folds["image"]) != list(labels["image"]):
        raise SystemExit(f"{cv / 'folds.csv'} has no held-out test of these images")
    test = labels[folds["test"].to_numpy() == 1].reset_index(drop=True)
    studies = out / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    paths = image_paths(test)
    for name in test["image"]:
        if not (studies / name).exists():
            link_or_copy(paths[name], studies / name)
    rows = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in args.labels], ignore_index=True)
    rows = rows.set_index("Image Index").loc[test["image"]].reset_index()
    rows[NIH_COLUMNS].to_csv(out / "labels_with_patient_data.csv", index=False)
    rows[["Image Index", "Finding Labels", "Patient ID"]].to_csv(out / "labels_image_only.csv", index=False)

    with_data = evaluate(studies, out / "labels_with_patient_data.csv", out / "with_patient_data", bundle, args.bootstrap)
    image_only = evaluate(studies, out / "labels_image_only.csv", out / "image_only", bundle, args.bootstrap)

    # the age/sex/view regression on the same studies, paired with the model by patient
    results = pd.read_csv(out / "with_patient_data" / "results.csv", dtype=str, keep_default_na=False)
    results = results[results["status"] == "ok"].set_index("file").loc[test["image"]]
    p_model = results[[f"p_{f}" for f in FINDINGS]].astype(float).to_numpy()
    report = json.loads((cv / "cv_report.json").read_text())
    prior = json.loads((cv / f"prior_{report['chosen_prior']}.json").read_text())
    p_meta = prior_probabilities_uncentred(prior, encode_rows(test, PatientEncoding()))
    y = multi_hot(test["labels"]).astype(float)
    resamples, _ = cvstats.patient_bootstrap_indices(test["patient_id"].to_numpy(), y, args.bootstrap, 7)
    p_image = pd.read_csv(out / "image_only" / "results.csv", dtype=str, keep_default_na=False).set_index("file") \
        .loc[test["image"]][[f"p_{f}" for f in FINDINGS]].astype(float).to_numpy()
    summary = {
        "what": f"{len(test)} held-out images of {test['patient_id'].nunique()} patients (no model trained on them, "
                "no choice looked at them), scored by `cxr-batch evaluate` in float32",
        "bundle_sha256": with_data["bundle_sha256"], "model": with_data["model"],
        "with_patient_data": {k: with_data[k] for k in ("n_studies", "n_patients", "mean_auroc", "mean_auroc_ci95",
                                                        "ece", "brier", "brier_prevalence", "mean_probability",
                                                        "prevalence", "triage")},
        "image_only": {k: image_only[k] for k in ("mean_auroc", "mean_auroc_ci95", "ece")},
        "metadata_only_regression_mean_auroc": cvstats.mean_auc(y, p_meta),
        "gain_over_metadata_only": cvstats.paired_difference(y, p_model, p_meta, resamples),
        "image_only_vs_metadata_only": cvstats.paired_difference(y, p_image, p_meta, resamples),
        "per_finding": {f: {k: with_data["per_finding"][f][k] for k in
                            ("positives", "auroc", "auroc_ci95", "sensitivity", "specificity", "ppv", "flag_rate", "ece")}
                        | {"auroc_image_only": image_only["per_finding"][f]["auroc"],
                           "auroc_metadata_only": float(cvstats.auc_per_class(y[:, [k]], p_meta[:, [k]])[0])}
                        for k, f in enumerate(FINDINGS)},
        "by_view": {v: {"with_patient_data": with_data["by_group"]["view"].get(v),
                        "image_only_mean_auroc": _view_auc(y, p_image, test, v),
                        "metadata_only_mean_auroc": _view_auc(y, p_meta, test, v)}
                    for v in ("PA", "AP")},
        "commands": {"heldout": " ".join(["python -m training.heldout", *sys.argv[1:]])},
    }
    (out / "heldout.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("with_patient_data", "image_only", "metadata_only_regression_mean_auroc",
                                              "gain_over_metadata_only", "by_view")}, indent=1))
    if args.write_manifest:
        manifest = read_manifest(bundle)
        metrics = dict(manifest.get("metrics") or {})
        wp = summary["with_patient_data"]
        metrics.update({
            "heldout": summary,
            "test_n": wp["n_studies"], "test_mean_auc": wp["mean_auroc"], "test_mean_auc_ci95": wp["mean_auroc_ci95"],
            "per_finding": {f: {"tp": with_data["per_finding"][f]["tp"], "fn": with_data["per_finding"][f]["fn"]}
                            for f in FINDINGS},
        })
        metrics.pop("test_how", None)  # a plain held-out test now, not out of fold
        manifest["metrics"] = metrics
        write_manifest(bundle, manifest)
        keep_predictions(bundle / "training_run", test, y, out, summary)
        print(f"held-out figures written into {bundle / 'manifest.json'} (new bundle_sha256)")


def keep_predictions(folder: Path, test: pd.DataFrame, y: np.ndarray, out: Path, summary: dict) -> None:
    """The held-out predictions beside the bundle (``heldout_predictions.csv``: labels, patient
    data, both scorings' probabilities, bucket and worklist rank; public NIH file names, no
    pixels) and ``heldout.json``, so that anyone can recompute the card's held-out figures."""
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["file", "priority", "worklist_rank", "p_any", "findings", *[f"p_{f}" for f in FINDINGS]]
    scored = {name: pd.read_csv(out / name / "results.csv", dtype=str, keep_default_na=False)
              .set_index("file").loc[test["image"]].reset_index()[cols] for name in ("with_patient_data", "image_only")}
    table = pd.DataFrame({"image": test["image"], "patient_id": test["patient_id"], "age": test["age"],
                          "sex": test["sex"], "view": test["view"]})
    for k, f in enumerate(FINDINGS):
        table[f"y_{f}"] = y[:, k].astype(int)
    for name, frame in scored.items():
        short = "" if name == "with_patient_data" else "image_only_"
        for c in cols[1:]:
            table[f"{short}{c}"] = frame[c].to_numpy()
    table.to_csv(folder / "heldout_predictions.csv", index=False)
    (folder / "heldout.json").write_text(json.dumps(summary, indent=1) + "\n")


def _view_auc(y: np.ndarray, p: np.ndarray, table: pd.DataFrame, view: str) -> float | None:
    mask = (table["view"] == view).to_numpy()
    return cvstats.mean_auc(y[mask], p[mask]) if mask.sum() > 1 else None


if __name__ == "__main__":
    main()
