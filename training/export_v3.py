"""Model v3: the chosen recipe's final model (every development image), with the out-of-fold
combination, the NIH-prevalence correction and the triage table folded into one bundle.

    python -m training.export_v3 --cv runs/v3cv --config training/configs/v3.toml \\
        --images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv \\
        --images ../shared/data/nih_extra/images --labels ../shared/data/nih_extra/labels.csv \\
        --metadata-table ../shared/data/nih/metadata/Data_Entry_2017_v2020.csv.gz \\
        --bundle weights/cxr-fpn-v3 --version 3.0

Reads ``<cv>/cv_report.json`` and ``<cv>/oof.csv`` (``training.crossval --stage report``, on the
development images only) and the final model's states (``--stage final``). Applies the rules of
training/configs/v3.toml: 5 (label shift to NIH prevalences), 6 (operating points at 90%
out-of-fold specificity, findings no better than chance never flagged), 7 (P(any finding) and the
normal cutoff) and 8 (the fold-model ensemble against the final model, on the held-out test, by
their image logits: the test labels are read for that comparison only). Writes the bundle,
``<bundle>/training_run`` (reports, out-of-fold predictions, histories) and prints what it chose.
The held-out test figures of the bundle itself come from ``python -m training.heldout``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_batch.bundle import load_bundle, save_bundle
from cxr_batch.findings import FINDINGS
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing, normalise

from . import cvstats, triage_fit
from .crossval import ConfigError, CVConfig, build_v2_model, image_logits, image_paths, load_sources, load_views
from .export_v2 import copy_artifacts, device_name, fold_in_sample_moments
from .fuse import combined_logits_formula, fold_combination, freeze_tabular_proj
from .prepare import multi_hot
from .record_images import development_rows
from .table_prior import encode_rows, read_table

log = logging.getLogger("cxr_batch.export_v3")
SPECIFICITY = 0.90  # rule 6
MAX_MISSED = 0.15  # rule 7: studies with a finding the normal bucket may hold


def oof_arrays(cv: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """(oof table, y [N, 14], calibrated out-of-fold probabilities [N, 14], folds [N])."""
    oof = pd.read_csv(cv / "oof.csv", dtype={"patient_id": str})
    y = oof[[f"y_{f}" for f in FINDINGS]].to_numpy().astype(int)
    p = oof[[f"p_{f}" for f in FINDINGS]].to_numpy().astype(float)
    return oof, y, p, oof["fold"].to_numpy()


def ensemble_comparison(cv: Path, chosen: dict, variant: str, z_prior_test: np.ndarray, comb: dict,
                        y_test: np.ndarray, patients: np.ndarray, cfg: CVConfig,
                        alignment: tuple[np.ndarray, np.ndarray]) -> dict:
    """Rule 8: on the held-out test, the fold models' averaged image logits against the final
    model's, each through the same combination with the patient prior (mean AUROC, paired).
    ``alignment``: the final model's (scale, shift) onto the fold models' logit scale
    (:func:`training.cvstats.alignment`), as the bundle applies it: the final model compared is
    the one that ships (its image evidence weighed against the prior as in the bundle)."""
    epoch, which = chosen["epoch"], chosen["weights"]

    def test_logits(path: Path) -> np.ndarray:
        d = np.load(path)
        return d[f"{which}_test"][list(d["epochs"]).index(epoch)]

    folds = [test_logits(cv / variant / "rep0" / f"fold{f}" / "preds.npz") for f in range(cfg.folds)]
    scale, shift = alignment
    final = scale * test_logits(cv / variant / "final" / "preds.npz") + shift
    a, c, b = (np.asarray(comb[k]) for k in ("a", "c", "b"))
    score = {"ensemble": a * np.mean(folds, axis=0) + c * z_prior_test + b,
             "final": a * final + c * z_prior_test + b,
             **{f"fold{f}": a * z + c * z_prior_test + b for f, z in enumerate(folds)}}
    resamples, _ = cvstats.patient_bootstrap_indices(patients, y_test, cfg.bootstrap, cfg.bootstrap_seed)
    out = {"n": int(len(y_test)), "mean_auc": {k: cvstats.mean_auc(y_test, s) for k, s in score.items()},
           "ensemble_minus_final": cvstats.paired_difference(y_test, score["ensemble"], score["final"], resamples),
           "image_only_mean_auc": {"ensemble": cvstats.mean_auc(y_test, np.mean(folds, axis=0)),
                                   "final": cvstats.mean_auc(y_test, final)}}
    out["chosen"] = "ensemble" if out["ensemble_minus_final"]["ci95"][0] > 0 else "final"
    out["rule"] = "the ensemble ships only if its paired held-out gain has a 95% CI above 0 (rule 8)"
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cv", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--images", required=True, action="append")
    ap.add_argument("--labels", required=True, action="append")
    ap.add_argument("--metadata-table", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--version", default="3.0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    try:
        cfg = CVConfig.from_toml(Path(args.config))
    except ConfigError as e:
        raise SystemExit(f"config: {e}") from None
    cv = Path(args.cv)
    report = json.loads((cv / "cv_report.json").read_text())
    chosen = report["chosen_image"]
    variant = cfg.variant(chosen["variant"])
    labels = load_sources(args.images, args.labels)
    folds_df = pd.read_csv(cv / "folds.csv", dtype={"patient_id": str})
    if list(folds_df["image"]) != list(labels["image"]):
        raise SystemExit(f"{cv / 'folds.csv'} lists other images than --images/--labels give")
    dev = folds_df["fold_rep0"].to_numpy() >= 0
    test = ~dev
    table = read_table(Path(args.metadata_table))
    enc = PatientEncoding()

    # ---- rule 5: NIH prevalences
    oof, y, p, folds = oof_arrays(cv)
    if list(oof["image"]) != list(labels["image"][dev]):
        raise SystemExit("oof.csv is not the development images of folds.csv: run the report stage again")
    nih_prev, nih_any = triage_fit.table_prevalence(table["labels"])
    dev_prev = y.mean(axis=0)
    shift = triage_fit.label_shift(dev_prev, nih_prev)
    p_nih = cvstats.sigmoid(triage_fit.logit(np.clip(p, 1e-6, 1 - 1e-6)) + shift)

    # ---- rule 6: operating points
    points = triage_fit.operating_points(y, p_nih, folds, oof["patient_id"].to_numpy(), nih_prev, SPECIFICITY,
                                         cfg.bootstrap, cfg.bootstrap_seed)
    flaggable = np.array([points[f]["flagged"] for f in FINDINGS])

    # ---- rule 7: P(any finding), the normal cutoff, and what the buckets did out of fold
    weights = triage_fit.raking_weights(y, nih_prev)
    policy, any_params = triage_fit.fit_policy(y, p_nih, folds, weights, nih_any, SPECIFICITY, MAX_MISSED, flaggable)
    outcomes = triage_fit.cross_fitted_triage(y, p_nih, folds, weights, nih_any, SPECIFICITY, MAX_MISSED, flaggable)

    # ---- the final model, its logits aligned to the fold models', the combination folded in
    # the development images as a scan sees them: the fold models' logits were computed on these
    views = load_views(image_paths(labels), list(labels["image"]), variant.image_size, cv)
    state = cv / variant.name / "final" / f"state_{chosen['weights']}_epoch{chosen['epoch']}.pt"
    if not state.exists():
        raise SystemExit(f"{state} missing: run `python -m training.crossval --stage final --variant {variant.name}`")
    model = build_v2_model(variant)
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    prep = Preprocessing(image_size=variant.image_size)
    z_img = image_logits(model, views[dev], prep, enc.unknown_value).astype(np.float64)  # in sample
    prior = json.loads((cv / f"prior_{report['chosen_prior']}.json").read_text())
    comb = report["combination_fitted_on_all_oof"]
    a_fit, c, b_fit = (np.asarray(comb[k], dtype=np.float64) for k in ("a", "c", "b"))
    coef, mean_x = np.asarray(prior["coef"]), np.asarray(prior["mean_x"])
    ref_mean, ref_sd = fold_in_sample_moments(cv, chosen)
    scale, offset = cvstats.alignment(ref_mean, ref_sd, z_img)
    a = a_fit * scale
    b = b_fit + a_fit * offset + shift  # rule 5 folded into the intercepts
    unknown = torch.full((3,), enc.unknown_value)
    freeze_tabular_proj(model, unknown)
    fold_combination(model, unknown, a, c, b, coef, mean_x)
    x_dev = encode_rows(labels[dev], enc)
    with torch.inference_mode():
        got = np.concatenate([torch.sigmoid(model(normalise(torch.from_numpy(views[dev][s:s + 64])[:, None], prep),
                                                  torch.from_numpy(x_dev[s:s + 64]))).numpy()
                              for s in range(0, int(dev.sum()), 64)])
    want = cvstats.sigmoid(combined_logits_formula(z_img, x_dev, a, c, b, coef, mean_x))
    folded_error = float(np.abs(got - want).max())
    assert folded_error < 1e-4, f"folded model differs from its formula by {folded_error}"

    # ---- rule 8 (on the held-out test: image logits and labels of the test images only)
    x_test = encode_rows(labels[test], enc)
    z_prior_test = (x_test - mean_x) @ coef.T
    y_test = multi_hot(labels["labels"][test]).astype(float)
    ensemble = ensemble_comparison(cv, chosen, variant.name, z_prior_test, comb, y_test,
                                   labels["patient_id"][test].to_numpy(), cfg, (scale, offset))
    if ensemble["chosen"] != "final":
        raise SystemExit(f"rule 8 chose the fold-model ensemble ({ensemble['ensemble_minus_final']}): a bundle of "
                         "several networks is not implemented; implement it before exporting")

    # ---- the bundle
    thresholds = {f: float(np.clip(policy.thresholds[k], 1e-6, 1 - 1e-6)) for k, f in enumerate(FINDINGS)}
    n_dev = int(dev.sum())
    measured = f"out of fold on {n_dev} development images, probabilities at NIH prevalence"
    triage_table = {
        "rule": f"training/configs/v3.toml rules 6-7: thresholds at {SPECIFICITY:.0%} out-of-fold specificity; a "
                "finding whose out-of-fold AUROC 95% CI reaches 0.5 is never flagged; P(any finding) a logistic "
                "regression on -log(1 - p) of the 14 calibrated probabilities (a weighted noisy-OR, non-negative "
                "weights, NIH-prevalence weighting); normal = P(any) below the cutoff that leaves at most "
                f"{MAX_MISSED:.0%} of the development studies with a finding below it, out of fold; a normal "
                "study carries no flag unless an urgent finding is flagged (then it is urgent)",
        "measured_on": measured,
        "findings": {f: {k: v for k, v in points[f].items() if k != "threshold"} for f in FINDINGS},
        "any_finding": {**any_params, "nih_rate": nih_any,
                        **{k: outcomes[k] for k in ("normal_share_of_abnormal", "normal_share_of_no_finding",
                                                   "flagged_share", "flags_per_study", "p_any_auroc")},
                        "buckets": outcomes["buckets"], "worklist_auroc_any_finding": outcomes["worklist_auroc_any_finding"],
                        "worklist_auroc_pneumothorax": outcomes["worklist_auroc_pneumothorax"],
                        "urgent_sensitivity": outcomes["urgent_sensitivity"], "how": outcomes["how"],
                        "auc": outcomes["p_any_auroc"]},
    }
    m = report["model_with_patient_data"]
    sources = "; ".join(f"{len(labels[labels['images_dir'] == d])} from {d}" for d in args.images)
    training = {
        "data": {"images": n_dev, "patients": int(labels["patient_id"][dev].nunique()),
                 "source": f"NIH ChestX-ray14 radiographs: {sources}; the development images of a patient-level "
                           f"split that holds out {int(test.sum())} images of {labels['patient_id'][test].nunique()} "
                           "patients as a test no model or choice saw",
                 "positives": dict(zip(FINDINGS, y.sum(axis=0).astype(int).tolist())),
                 "held_out_test_images": sorted(labels["image"][test])},
        "recipe": {**{k: variant.__dict__[k] for k in variant.__dict__ if k != "snapshots"}, "weights": chosen["weights"],
                   "epoch": chosen["epoch"], "device": device_name("cpu"),
                   "patient_input_during_training": "fixed at the unknown code (0.5, 0.5, 0.5)",
                   "loss_weights": "view_balance: P_NIH(view | No Finding or not) / P_here(view | the same)"},
        "patient_prior": {k: prior[k] for k in ("config", "coef", "mean_x", "intercept", "rows", "patients",
                                                  "excluded_patients", "excluded_rows", "formula")},
        "combination": {"method": comb["method"], "a_fitted": a_fit.tolist(), "c": c.tolist(), "b_fitted": b_fit.tolist(),
                        "alignment": {"scale": scale.tolist(), "shift": offset.tolist()},
                        "nih_label_shift": shift.tolist(), "a": a.tolist(), "b": b.tolist(),
                        "formula": "logit_k = a_k * image_logit_k + c_k * coef_k . (x - mean_x) + b_k; "
                                   "a = a_fitted * scale, b = b_fitted + a_fitted * alignment shift + NIH label shift",
                        "folded_max_probability_error_float32": folded_error},
        "ensembling": ensemble,
        "prevalence": {f: float(v) for f, v in zip(FINDINGS, nih_prev)},
        "prevalence_note": "the NIH table's (112,120 images): the probabilities are corrected to it (rule 5)",
    }
    flags_oof = (p_nih >= policy.thresholds) & flaggable
    metrics = {
        "evaluation": f"5-fold patient-level cross-validation on the {n_dev} development images, out of fold; the "
                      f"held-out test ({int(test.sum())} images) is added by training.heldout",
        "cv_mean_auc_with_patient_data": m["mean_auc"], "cv_mean_auc_with_patient_data_ci95": m["mean_auc_ci95"],
        "cv_mean_auc_image_only": report["model_image_only"]["mean_auc"],
        "metadata_only_full_table_regression_mean_auc": report["metadata_only"]["full_table_regression"]["mean_auc"],
        "gain_over_metadata_only": report["gain_over_metadata_only"]["vs_full_table_regression"],
        "cv_auc_per_finding": m["auc"], "by_group": report["subgroups"],
        "test_n": n_dev, "test_mean_auc": m["mean_auc"], "test_mean_auc_ci95": m["mean_auc_ci95"],
        "test_how": "out of fold, 5-fold cross-validation by patient on the development images",
        "per_finding": {f: {"tp": int((flags_oof[:, k] & (y[:, k] == 1)).sum()),
                            "fn": int((~flags_oof[:, k] & (y[:, k] == 1)).sum())} for k, f in enumerate(FINDINGS)},
    }
    bundle = Path(args.bundle)
    intended_use = (f"Research and software testing only, not for clinical use: trained from scratch on {n_dev} public "
                    f"NIH ChestX-ray14 radiographs at {variant.image_size} px; far below published models.")
    save_bundle(bundle, model.cpu().float(), name="cxr-fpn", version=args.version, preprocessing=prep, encoding=enc,
                thresholds=thresholds, training=training, metrics=metrics, half=True, intended_use=intended_use,
                training_images=development_rows(folds_df))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["triage"] = triage_table
    from cxr_batch.bundle import write_manifest

    write_manifest(bundle, manifest)
    loaded = load_bundle(bundle)
    with torch.inference_mode():
        half_p = np.concatenate([torch.sigmoid(loaded.model(normalise(torch.from_numpy(views[dev][s:s + 64])[:, None], prep),
                                                            torch.from_numpy(x_dev[s:s + 64]))).numpy()
                                 for s in range(0, n_dev, 64)])
    copy_artifacts(cv, cv / variant.name / "final", bundle / "training_run", report)
    summary = {"folded_max_probability_error_float32": folded_error,
               "float16_bundle_max_probability_error": float(np.abs(half_p - got).max()),
               "label_shift": dict(zip(FINDINGS, np.round(shift, 4).tolist())),
               "operating_points": {f: {k: points[f][k] for k in ("flagged", "threshold", "auc", "sensitivity",
                                                                  "flag_rate", "ppv_at_nih_prevalence")} for f in FINDINGS},
               "any_finding": any_params, "triage_out_of_fold": outcomes, "ensembling": ensemble}
    (bundle / "training_run" / "export_check.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
