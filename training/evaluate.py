"""Stages 4-6: thresholds (validation only), evaluation on the test part, artifacts and bundle.

Each stage reads what the stages before it wrote to the run folder (``prepared.csv``,
``model_final.pt``, ``history.json``, ``prior.json``) and writes its own files. Validation and
test images are decoded and transformed by the inference code itself (``DecodedImages``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_batch.bundle import save_bundle
from cxr_batch.files import atomic_write_bytes
from cxr_batch.findings import FINDINGS
from cxr_batch.model import build_model

from . import metrics, thresholds
from .data import (FINAL_WEIGHTS, HISTORY, INIT_INFO, PRIOR_INFO, Context, encode_patients, evaluation_loader,
                   predict, prepared_parts, unique_training_images)
from .figures import example_predictions, roc_curves, training_curves
from .prepare import multi_hot

log = logging.getLogger("cxr_batch.train")


def auc_text(value: float, ci=None) -> str:
    """An AUC for the log: with its interval when there is one; a part without positive and
    negative images (allow_degenerate_split) has none, and the log says so rather than 'nan'."""
    if not np.isfinite(value):
        return "not measurable"
    if ci is not None and np.isfinite(ci).all():
        return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    return f"{value:.3f}"


def subgroup_metrics(table: pd.DataFrame, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict:
    """Mean AUC and macro F1 by view (PA/AP) and by sex: view is a known shortcut in NIH data."""
    out = {}
    for column, values in (("view", ("PA", "AP")), ("sex", ("M", "F"))):
        for value in values:
            mask = (table[column].str.upper() == value).to_numpy()
            if mask.sum() >= 2:
                s = metrics.summary(y[mask], p[mask], pred[mask])
                out[f"{column}={value}"] = {"n": int(mask.sum()), "mean_auc": s["mean_auc"], "f1_macro": s["f1_macro"]}
    return out


def patient_only_baseline(train: pd.DataFrame, test: pd.DataFrame, encoding, seed: int) -> np.ndarray:
    """Test probabilities of a logistic regression per finding on the encoded [age, view, sex]
    alone, fitted on the training images: the bar the image must raise."""
    from sklearn.linear_model import LogisticRegression

    train = unique_training_images(train)
    x_train, x_test = encode_patients(train, encoding), encode_patients(test, encoding)
    y_train = multi_hot(train["labels"])
    out = np.full((len(test), len(FINDINGS)), float(y_train.mean()))
    for c in range(len(FINDINGS)):
        if len(np.unique(y_train[:, c])) == 2:
            lr = LogisticRegression(random_state=seed, max_iter=1000).fit(x_train, y_train[:, c])
            out[:, c] = lr.predict_proba(x_test)[:, 1]
    return out


def compare_threshold_methods(cfg, y_val, p_val, y_test, p_test) -> dict:
    """Each threshold search tuned on validation, scored on test: macro F1 and how often a
    study gets flagged (a triage list that flags nearly every study is no triage)."""
    urgent = FINDINGS.index("Pneumothorax")
    out = {}
    for method in ("youden", "precision_f1", "dynamic"):
        t = thresholds.choose(method, y_val, p_val, cfg)
        pred = (p_test >= t).astype(int)
        s = metrics.summary(y_test, p_test, pred)
        out[method] = {"f1_macro": s["f1_macro"], "exact_match": s["exact_match"], "hamming_loss": s["hamming_loss"],
                       "studies_flagged": float(pred.any(axis=1).mean()),
                       "studies_flagged_pneumothorax": float(pred[:, urgent].mean())}
    return out


def confusion_counts(s: dict) -> dict:
    """Per finding, the test images at the chosen thresholds: {finding: {tp, fn, fp, tn}} (the
    bundle's manifest carries them, so a report can give the sensitivity behind a 'no flag')."""
    return {f: {"tp": int(tp), "fn": int(fn), "fp": int(fp), "tn": int(tn)}
            for f, ((tn, fp), (fn, tp)) in zip(FINDINGS, s["confusion"])}


def metrics_table(s: dict) -> pd.DataFrame:
    """The study's validation_metrics_<model>.csv: one row per finding plus the overall row."""
    rows = []
    for k, f in enumerate(FINDINGS):
        (tn, fp), (fn, tp) = s["confusion"][k]
        rows.append({"finding": f, "auc": s["auc"][k], "f1": s["f1"][k], "brier": s["brier"][k],
                     "tp": tp, "fp": fp, "fn": fn, "tn": tn})
    overall = {k: s[k] for k in ("exact_match", "hamming_loss", "accuracy", "recall_micro", "recall_macro",
                                 "f1_micro", "f1_macro", "lrap", "mean_auc")}
    rows.append({"finding": "ALL", "auc": s["mean_auc"], "f1": s["f1_macro"], "brier": float(np.mean(s["brier"])), **overall})
    return pd.DataFrame(rows)


def choose_thresholds(cfg, y_val: np.ndarray, p_val: np.ndarray, out: Path) -> np.ndarray:
    """Stage 4: per-finding thresholds on validation only; writes thresholds.json."""
    chosen = thresholds.choose(cfg.threshold_method, y_val, p_val, cfg)
    thr = {f: float(t) for f, t in zip(FINDINGS, chosen)}
    (out / "thresholds.json").write_text(json.dumps({"method": cfg.threshold_method, "thresholds": thr}, indent=2) + "\n")
    return chosen


def evaluate_test(cfg, ctx: Context, model, loaders: dict, parts: dict, chosen: np.ndarray,
                  y_val: np.ndarray, p_val: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """Stage 5: every metric on the test part. Returns (results for metrics.json, the test
    summary, test probabilities)."""
    p_test, y_test, _ = predict(model, loaders["test"], ctx)
    compared = compare_threshold_methods(cfg, y_val, p_val, y_test, p_test)
    pred = (p_test >= chosen).astype(int)
    test = metrics.summary(y_test, p_test, pred)
    patients = parts["test"]["patient_id"].to_numpy()  # the bootstrap resamples patients

    def interval(p, flags):
        return metrics.bootstrap_ci(y_test, p, flags, patients, n=cfg.bootstrap, seed=cfg.seed)

    ci = interval(p_test, pred)
    p_img, _, _ = predict(model, loaders["test"], ctx, unknown_patient=True)
    pred_img = (p_img >= chosen).astype(int)
    image_only = metrics.summary(y_test, p_img, pred_img)
    image_only_ci = interval(p_img, pred_img)
    groups = subgroup_metrics(parts["test"], y_test, p_test, pred)
    p_base = patient_only_baseline(parts["train"], parts["test"], ctx.encoding, cfg.seed)
    baseline = {"mean_auc": metrics.mean_auc(y_test, p_base),
                "ci95": interval(p_base, (p_base >= 0.5).astype(int))["mean_auc"]}
    results = {
        "test": {k: v for k, v in test.items() if k != "confusion"}, "test_ci95": ci,
        "test_image_only": {"mean_auc": image_only["mean_auc"], "f1_macro": image_only["f1_macro"],
                            "auc": image_only["auc"], "ci95": image_only_ci},
        "patient_only_logistic_regression": baseline, "threshold_methods": compared, "by_group": groups,
        "validation_n": int(len(y_val)), "test_counts": confusion_counts(test),
    }
    return results, test, p_test


def training_prevalence(train) -> dict:
    """Each finding's share of the unique training images: what evaluate's Brier baseline and a
    site's comparison of prevalences need."""
    y = multi_hot(unique_training_images(train)["labels"])
    return {f: float(v) for f, v in zip(FINDINGS, y.mean(axis=0))} if len(y) else {}


def inherited_history(cfg) -> tuple[list, str]:
    """The epoch history of a run that only evaluates and exports (epochs 0 from a bundle):
    the history recorded in that bundle, so the shipped bundle keeps how it was trained."""
    if not cfg.init_weights or not Path(cfg.init_weights).is_dir():
        return [], ""
    from cxr_batch.bundle import read_manifest

    history = read_manifest(Path(cfg.init_weights)).get("training", {}).get("history", [])
    return history, f"init_weights {cfg.init_weights}" if history else ""


def used_images(parts: dict) -> list[tuple[str, str, str]]:
    """(image, patient_id, role) of every image the bundle was made from: the training part
    (weights) and the validation part (checkpoint, patient prior's weight, thresholds); not the
    test part, which only measured it."""
    return [(image, patient, role) for split, role in (("train", "train"), ("val", "validation"))
            for image, patient in unique_training_images(parts[split])[["image", "patient_id"]].itertuples(index=False)]


def export_bundle(cfg, ctx: Context, model, chosen: np.ndarray, results: dict, record: dict, out: Path,
                  parts: dict) -> Path:
    """Stage 6: the weights bundle, with its recipe, data, training record (``record``: epoch
    history, patient prior, training prevalence) and measured metrics."""
    from cxr_batch.evidence import bundle_evidence

    from .model_card import CARD_FILE, model_card

    prepare_info = json.loads((out / "prepare.json").read_text())
    test, ci, image_only = results["test"], results["test_ci95"], results["test_image_only"]
    measured = {"test_mean_auc": test["mean_auc"], "test_mean_auc_ci95": ci["mean_auc"],
                "test_f1_macro": test["f1_macro"], "test_f1_macro_ci95": ci["f1_macro"],
                "test_image_only_mean_auc": image_only["mean_auc"],
                "test_image_only_mean_auc_ci95": image_only["ci95"]["mean_auc"], "test_n": test["n"],
                "test_patient_only_lr_mean_auc": results["patient_only_logistic_regression"]["mean_auc"],
                "by_group": results["by_group"], "per_finding": results["test_counts"]}
    thresholds = {f: float(t) for f, t in zip(FINDINGS, chosen)}
    # the card says whether every report will warn of missing validation evidence, by the rule reports use
    card = model_card(cfg, results, prepare_info, thresholds, bundle_evidence({"metrics": measured}).problem)
    # a copy beside the bundle: a site that edits the installed card restores it from here (check_model_card says so)
    atomic_write_bytes(out / CARD_FILE, card.encode("utf-8"), mode=0o644)
    return save_bundle(
        out / "bundle", model.cpu().float(), name=cfg.model_name, version=cfg.version, preprocessing=ctx.prep,
        encoding=ctx.encoding, thresholds=thresholds, half=cfg.half_bundle,
        intended_use=cfg.intended_use, training_images=used_images(parts),
        training={"data": prepare_info, "config": cfg.to_dict(), "threshold_method": cfg.threshold_method, **record},
        metrics=measured, model_card=card,
    )


def evaluate_run(cfg, out: Path, ctx: Context) -> dict:
    """Stages 4-6 on a run folder written by the training stages: thresholds on validation,
    evaluation on test, artifacts (metrics, configuration, figures) and the bundle."""
    out = Path(out)
    ctx = ctx.exact()  # thresholds and figures of the float32 model a scan runs, whatever training ran in
    parts = prepared_parts(out)
    loaders = {s: evaluation_loader(cfg, parts[s], ctx.prep, ctx.encoding) for s in ("val", "test")}
    model = build_model(cfg.model).to(ctx.device, memory_format=torch.channels_last)
    model.load_state_dict(torch.load(out / FINAL_WEIGHTS, map_location=ctx.device, weights_only=True))
    history, history_from = json.loads((out / HISTORY).read_text()), "this run"
    if not history:
        history, history_from = inherited_history(cfg)
    prior = json.loads((out / PRIOR_INFO).read_text()) if (out / PRIOR_INFO).exists() else {}
    started = json.loads((out / INIT_INFO).read_text()) if (out / INIT_INFO).exists() else {}

    p_val, y_val, _ = predict(model, loaders["val"], ctx)
    chosen = choose_thresholds(cfg, y_val, p_val, out)
    results, test, p_test = evaluate_test(cfg, ctx, model, loaders, parts, chosen, y_val, p_val)
    record = {"initialised_from": started, "history": history, "history_from": history_from, "patient_prior": prior,
              "prevalence": training_prevalence(parts["train"])}
    results.update(record)
    metrics_table(test).to_csv(out / f"validation_metrics_{cfg.model_name}.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    write_configuration(cfg, out, history, results)

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    roc_curves(multi_hot(parts["test"]["labels"]), p_test, figures / "roc_test.png")
    training_curves(history, figures / "training_curves.png")
    example_predictions(parts["test"], loaders["test"].dataset, p_test, chosen, figures / "example_predictions.png")
    export_bundle(cfg, ctx, model, chosen, results, record, out, parts)
    ci, image_only = results["test_ci95"], results["test_image_only"]
    log.info("test mean AUC %s, macro F1 %.3f; image only AUC %s; patient-data-only logistic regression AUC %s "
             "-> %s", auc_text(test["mean_auc"], ci["mean_auc"]), test["f1_macro"], auc_text(image_only["mean_auc"]),
             auc_text(results["patient_only_logistic_regression"]["mean_auc"]), out / "bundle")
    return results


def format_ci(ci) -> str:
    return "none (see metrics.json, test_ci95.notes)" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def write_configuration(cfg, out: Path, history: list, results: dict) -> None:
    lines = ["# configuration", json.dumps(cfg.to_dict(), indent=2), "", "# data",
             (out / "prepare.json").read_text(), "# epochs",
             "epoch  train_loss  val_loss  precision  recall  f1_macro  mean_auc  lr"]
    for h in history:
        lines.append(f"{h['epoch']:5d}  {h['train_loss']:10.4f}  {h['val_loss']:8.4f}  {h['precision_macro']:9.3f}  "
                     f"{h['recall_macro']:6.3f}  {h['f1_macro']:8.3f}  {h['mean_auc']:8.3f}  {h['lr']:.2g}")
    t = results["test"]
    lines += ["", "# test", f"mean AUC {t['mean_auc']:.4f}  CI95 {format_ci(results['test_ci95']['mean_auc'])}",
              f"macro F1 {t['f1_macro']:.4f}  CI95 {format_ci(results['test_ci95']['f1_macro'])}",
              f"image-only mean AUC {results['test_image_only']['mean_auc']:.4f}",
              f"patient-data-only logistic regression mean AUC "
              f"{results['patient_only_logistic_regression']['mean_auc']:.4f}"]
    (out / "configuration.txt").write_text("\n".join(lines) + "\n")
