"""Stages 4-6: thresholds (validation only), evaluation on the test part, artifacts and bundle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_batch.bundle import save_bundle
from cxr_batch.findings import FINDINGS

from . import metrics, thresholds
from .figures import example_predictions, roc_curves, training_curves

log = logging.getLogger("cxr_batch.train")


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

    from .prepare import multi_hot
    from .train import encode_patients

    train = train[train["mirror"] == 0].drop_duplicates("image")
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


def evaluate_and_export(cfg, ctx, model, val_loader, test_loader, parts: dict, history: list, out: Path,
                        extra: dict | None = None) -> dict:
    from .train import predict

    p_val, y_val, _ = predict(model, val_loader, ctx)
    p_test, y_test, _ = predict(model, test_loader, ctx)
    compared = compare_threshold_methods(cfg, y_val, p_val, y_test, p_test)
    chosen = thresholds.choose(cfg.threshold_method, y_val, p_val, cfg)
    thr = {f: float(t) for f, t in zip(FINDINGS, chosen)}
    (out / "thresholds.json").write_text(json.dumps({"method": cfg.threshold_method, "thresholds": thr}, indent=2) + "\n")

    pred = (p_test >= chosen).astype(int)
    test = metrics.summary(y_test, p_test, pred)
    ci = metrics.bootstrap_ci(y_test, p_test, pred, n=cfg.bootstrap, seed=cfg.seed)
    p_img, _, _ = predict(model, test_loader, ctx, unknown_patient=True)
    pred_img = (p_img >= chosen).astype(int)
    image_only = metrics.summary(y_test, p_img, pred_img)
    image_only_ci = metrics.bootstrap_ci(y_test, p_img, pred_img, n=cfg.bootstrap, seed=cfg.seed)
    groups = subgroup_metrics(parts["test"], y_test, p_test, pred)
    p_base = patient_only_baseline(parts["train"], parts["test"], ctx.encoding, cfg.seed)
    baseline = {"mean_auc": metrics.mean_auc(y_test, p_base),
                "ci95": metrics.bootstrap_ci(y_test, p_base, (p_base >= 0.5).astype(int), n=cfg.bootstrap,
                                             seed=cfg.seed)["mean_auc"]}
    results = {
        "test": {k: v for k, v in test.items() if k != "confusion"}, "test_ci95": ci,
        "test_image_only": {"mean_auc": image_only["mean_auc"], "f1_macro": image_only["f1_macro"],
                            "auc": image_only["auc"], "ci95": image_only_ci},
        "patient_only_logistic_regression": baseline, "threshold_methods": compared, "by_group": groups, "validation_n": int(len(y_val)), "history": history,
        **(extra or {}),
    }
    name = f"{cfg.model_name}"
    metrics_table(test).to_csv(out / f"validation_metrics_{name}.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    write_configuration(cfg, out, history, results)

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    roc_curves(y_test, p_test, figures / "roc_test.png")
    training_curves(history, figures / "training_curves.png")
    example_predictions(parts["test"], test_loader.dataset, p_test, chosen, figures / "example_predictions.png")

    prepare_info = json.loads((out / "prepare.json").read_text())
    save_bundle(
        out / "bundle", model.cpu().float(), name=cfg.model_name, version=cfg.version, preprocessing=ctx.prep,
        encoding=ctx.encoding, thresholds=thr, half=cfg.half_bundle,
        training={"data": prepare_info, "config": cfg.to_dict(), "threshold_method": cfg.threshold_method,
                  **(extra or {})},
        metrics={"test_mean_auc": test["mean_auc"], "test_mean_auc_ci95": ci["mean_auc"],
                 "test_f1_macro": test["f1_macro"], "test_f1_macro_ci95": ci["f1_macro"],
                 "test_image_only_mean_auc": image_only["mean_auc"],
                 "test_image_only_mean_auc_ci95": image_only_ci["mean_auc"], "test_n": test["n"],
                 "test_patient_only_lr_mean_auc": baseline["mean_auc"],
                 "by_group": groups},
    )
    log.info("test mean AUC %.3f (95%% CI %.3f-%.3f), macro F1 %.3f; image only AUC %.3f; patient-data-only "
             "logistic regression AUC %.3f -> %s", test["mean_auc"], *ci["mean_auc"], test["f1_macro"],
             image_only["mean_auc"], baseline["mean_auc"], out / "bundle")
    return results


def write_configuration(cfg, out: Path, history: list, results: dict) -> None:
    lines = ["# configuration", json.dumps(cfg.to_dict(), indent=2), "", "# data",
             (out / "prepare.json").read_text(), "# epochs",
             "epoch  train_loss  val_loss  precision  recall  f1_macro  mean_auc  lr"]
    for h in history:
        lines.append(f"{h['epoch']:5d}  {h['train_loss']:10.4f}  {h['val_loss']:8.4f}  {h['precision_macro']:9.3f}  "
                     f"{h['recall_macro']:6.3f}  {h['f1_macro']:8.3f}  {h['mean_auc']:8.3f}  {h['lr']:.2g}")
    t = results["test"]
    lines += ["", "# test", f"mean AUC {t['mean_auc']:.4f}  CI95 {results['test_ci95']['mean_auc']}",
              f"macro F1 {t['f1_macro']:.4f}  CI95 {results['test_ci95']['f1_macro']}",
              f"image-only mean AUC {results['test_image_only']['mean_auc']:.4f}",
              f"patient-data-only logistic regression mean AUC "
              f"{results['patient_only_logistic_regression']['mean_auc']:.4f}"]
    (out / "configuration.txt").write_text("\n".join(lines) + "\n")
