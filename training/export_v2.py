"""Model v2: train the chosen recipe on all shared images, fold in the out-of-fold-fitted
combination and calibration, set the out-of-fold thresholds, export the bundle.

    python -m training.export_v2 --images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv \
        --cv runs/cv --config training/configs/v2.toml --out runs/final --bundle weights/cxr-fpn-v2

Reads the choices from ``<cv>/cv_report.json`` (written by ``training.crossval``): the image
recipe (variant, epoch, EMA or raw weights), the patient prior (``<cv>/prior_<name>.json``),
the combination parameters fitted on all out-of-fold predictions and the thresholds. Training
is resumable (``<out>/checkpoint.pt``). Then checks that the exported network computes the
formula it documents, and copies the cross-validation artifacts into ``<bundle>/training_run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cxr_batch.bundle import load_bundle, save_bundle
from cxr_batch.findings import FINDINGS
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing

from . import cvstats
from .augment import eval_transform_batch
from .crossval import (FINAL_SEED_OFFSET, ConfigError, CVConfig, build_v2_model, image_logits, load_cache, load_labels,
                       train_model)
from .fuse import combined_logits_formula, fold_combination, freeze_tabular_proj
from .prepare import multi_hot
from .table_prior import encode_rows

log = logging.getLogger("cxr_batch.export_v2")


def train_final(args, cfg: CVConfig, variant: str, labels, y):
    """Train ``variant`` on all images for its full epochs, keeping the EMA and raw state dicts
    at every snapshot epoch (``<out>/state_<ema|raw>_epoch<E>.pt``): the cross-validation can
    then choose the epoch and weights afterwards, and nothing of it is needed to train."""
    v = cfg.variant(variant)
    images = load_cache(Path(args.images), list(labels["image"]), v.image_size, Path(args.cv))
    out = Path(args.out)
    t0 = time.perf_counter()
    seed = final_seed(cfg, v)
    result = train_model(images, y, v, seed, out, keep_states=True, device=args.device,
                         checkpoint_every=args.checkpoint_every)
    hist = out / "history.json"
    old = json.loads(hist.read_text())["seconds_by_process"] if hist.exists() else []
    hist.write_text(json.dumps({"variant": v.__dict__, "seed": seed, "device": device_name(args.device),
                                "history": result["history"],
                                "seconds_by_process": old + [time.perf_counter() - t0]}, indent=1))


def final_seed(cfg: CVConfig, v) -> int:
    return cfg.train_seed + FINAL_SEED_OFFSET + v.seed_offset


def device_name(device: str) -> str:
    """What trained the model, for the manifest: the GPU's name, or the CPU and its threads."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (float32, TF32 convolutions)"
    return f"cpu ({torch.get_num_threads()} threads, float32)"


def final_model(args, cfg: CVConfig, report: dict, labels, y):
    chosen = report["chosen_image"]
    v = cfg.variant(chosen["variant"])
    images = load_cache(Path(args.images), list(labels["image"]), v.image_size, Path(args.cv))
    state_path = Path(args.out) / f"state_{chosen['weights']}_epoch{chosen['epoch']}.pt"
    if not state_path.exists():
        train_final(args, cfg, chosen["variant"], labels, y)
    model = build_v2_model(v)
    model.load_state_dict(torch.load(state_path, weights_only=True))
    return model.eval(), v, images


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--cv", required=True, help="the cross-validation folder (cv_report.json)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True, help="folder of the final training run")
    ap.add_argument("--bundle", required=True, help="bundle folder to write, e.g. weights/cxr-fpn-v2")
    ap.add_argument("--version", default="2", help="the bundle's version (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the final model trains: cpu, cuda ...")
    ap.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                    help="resumable checkpoint every EPOCHS epochs (0: none)")
    ap.add_argument("--train-only", metavar="VARIANT",
                    help="only train VARIANT on all images (states kept at its snapshot epochs); no report needed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    try:
        cfg = CVConfig.from_toml(Path(args.config))
    except ConfigError as e:
        raise SystemExit(f"config: {e}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device on this machine (use --device cpu)")
    cv = Path(args.cv)
    labels = load_labels(Path(args.labels))
    y = multi_hot(labels["labels"]).astype(np.float32)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.train_only:
        train_final(args, cfg, args.train_only, labels, y)
        return
    report = json.loads((cv / "cv_report.json").read_text())
    enc = PatientEncoding()
    x = encode_rows(labels, enc)
    model, v, images = final_model(args, cfg, report, labels, y)
    hist_path = Path(args.out) / "history.json"
    final_hist = json.loads(hist_path.read_text()) if hist_path.exists() else {}
    seconds = final_hist.get("seconds_by_process")
    prep = Preprocessing(image_size=v.image_size)
    z_img = image_logits(model, images, prep, enc.unknown_value).astype(np.float64)  # in-sample
    prior = json.loads((cv / f"prior_{report['chosen_prior']}.json").read_text())
    comb = report["combination_fitted_on_all_oof"]
    a, c, b = (np.asarray(comb[k], dtype=np.float64) for k in ("a", "c", "b"))
    coef, mean_x = np.asarray(prior["coef"]), np.asarray(prior["mean_x"])

    # the fold models' in-sample logit moments (same epoch and weights) -> align the final model
    ref_mean, ref_sd = fold_in_sample_moments(cv, report["chosen_image"])
    scale, shift = cvstats.alignment(ref_mean, ref_sd, z_img)
    a_fit, b_fit = a, b
    a, b = a_fit * scale, b_fit + a_fit * shift  # a * (scale z + shift) + c prior + b

    unknown = torch.full((3,), enc.unknown_value)
    freeze_tabular_proj(model, unknown)
    fold_combination(model, unknown, a, c, b, coef, mean_x)
    with torch.inference_mode():
        xs = torch.from_numpy(x)
        got = []
        for s in range(0, len(images), 64):
            batch = eval_transform_batch(torch.from_numpy(images[s:s + 64])[:, None], prep)
            got.append(torch.sigmoid(model(batch, xs[s:s + 64])).numpy())
    got = np.concatenate(got)
    want = cvstats.sigmoid(combined_logits_formula(z_img, x, a, c, b, coef, mean_x))
    folded_error = float(np.abs(got - want).max())
    assert folded_error < 1e-4, f"folded model differs from its formula by {folded_error}"

    thresholds = report["chosen_thresholds"]["values"]
    m, g = report["model_with_patient_data"], report["gain_over_metadata_only"]
    chosen = report["chosen_image"]
    training = {
        "data": {"images": report["data"]["images"], "patients": report["data"]["patients"],
                 "source": "the 480 shared NIH ChestX-ray14 radiographs (../shared/data/nih/images, labels.csv)",
                 "positives": report["data"]["positives"]},
        "recipe": {**{k: v.__dict__[k] for k in v.__dict__ if k != "snapshots"}, "weights": chosen["weights"],
                   "seed": final_seed(cfg, v), "device": final_hist.get("device", "cpu (2 cores, float32)"),
                   "patient_input_during_training": "fixed at the unknown code (0.5, 0.5, 0.5)",
                   "augmentation": "training/augment.py train_transform (crop 90%, rotation 7 deg, translation 6%, "
                                   "blur p 0.4), no mirroring", "optimizer": "Adam, constant learning rate",
                   "loss": "BCE with pos weights sqrt(neg/pos) capped at pos_weight_max", "ema": "torch AveragedModel, buffers too"},
        "patient_prior": {k: prior[k] for k in ("config", "coef", "mean_x", "intercept", "rows", "patients",
                                                  "excluded_patients", "excluded_rows", "formula")},
        "combination": {"method": comb["method"], "a_fitted": a_fit.tolist(), "c": c.tolist(), "b_fitted": b_fit.tolist(),
                        "fitted_on": "the out-of-fold image and prior logits of the cross-validation (480 images)",
                        "alignment": {"scale": scale.tolist(), "shift": shift.tolist(),
                                      "why": "maps this model's image logits onto the fold models' scale: per finding, "
                                             "its logits on its own training images get the mean and sd the fold models' "
                                             "logits had on theirs (same epoch and weights)"},
                        "a": a.tolist(), "b": b.tolist(),
                        "formula": "logit_k = a_k * image_logit_k + c_k * coef_k . (x - mean_x) + b_k, with "
                                   "a = a_fitted * scale, b = b_fitted + a_fitted * shift",
                        "folded_into": "head[-1] (times a), tabular_skip (c * coef, bias), tabular_proj frozen "
                                       "(weight 0: the deep path ignores patient data)",
                        "folded_max_probability_error_float32": folded_error},
        "thresholds": {k: report["chosen_thresholds"][k] for k in ("method", "grid", "precision_min")},
        "cross_validation": {"folds": cfg.folds, "fold_seeds": cfg.fold_seeds, "chosen_image": chosen,
                             "prior": report["chosen_prior"], "report": "training_run/cv_report.json"},
        "commands": {
            "cross_validation": f"python -m training.crossval --images ../shared/data/nih/images --labels "
                                f"../shared/data/nih/labels.csv --metadata-table "
                                f"../shared/data/nih/metadata/Data_Entry_2017_v2020.csv.gz --out {args.cv} "
                                f"--config {args.config}",
            "export": f"python -m training.export_v2 --images ../shared/data/nih/images --labels "
                      f"../shared/data/nih/labels.csv --cv {args.cv} --config {args.config} "
                      f"--out {args.out} --bundle {args.bundle} --version {args.version}"},
        "final_training_seconds_by_process": seconds,
        # each finding's share of the 480 training images: evaluate's training-prevalence Brier baseline
        "prevalence": {f: float(v) for f, v in zip(FINDINGS, y.mean(axis=0))},
    }
    metrics = {
        "evaluation": "5-fold patient-level cross-validation on the 480 shared images, out-of-fold; "
                      "the bundle itself is trained on all 480 and has no held-out test of its own",
        "cv_mean_auc_with_patient_data": m["mean_auc"], "cv_mean_auc_with_patient_data_ci95": m["mean_auc_ci95"],
        "cv_mean_auc_image_only": report["model_image_only"]["mean_auc"],
        "cv_mean_auc_image_only_ci95": report["model_image_only"]["ci95"],
        "metadata_only_full_table_regression_mean_auc": report["metadata_only"]["full_table_regression"]["mean_auc"],
        "gain_over_metadata_only": g["vs_full_table_regression"],
        "cv_brier": m["brier"], "cv_brier_predicting_prevalence": m["brier_prevalence"], "cv_brier_skill": m["brier_skill"],
        "cv_pooled_ece_10_bins": m["ece_10"], "cv_pooled_ece_15_bins": m["ece_15"],
        "cv_auc_per_finding": m["auc"], "by_group": report["subgroups"],
        "threshold_flags": report["threshold_methods"][report["chosen_thresholds"]["method"]],
        # what every report quotes (cxr_batch/evidence.py): the out-of-fold numbers of the cross-validation
        "test_n": report["data"]["images"], "test_mean_auc": m["mean_auc"], "test_mean_auc_ci95": m["mean_auc_ci95"],
        "test_how": f"out of fold, {cfg.folds}-fold cross-validation by patient; per-finding counts at thresholds "
                    f"chosen on the same out-of-fold predictions",
        "per_finding": oof_counts(cv / "oof.csv", thresholds),
        "fold_models_in_sample_logit_sd": float(ref_sd.mean()),
        "final_model_in_sample_logit_sd": float(z_img.std(axis=0).mean()),
    }
    bundle = Path(args.bundle)
    lo, hi = m["mean_auc_ci95"]
    intended_use = (f"Research and software testing only, not for clinical use: trained from scratch on "
                    f"{report['data']['images']} public NIH ChestX-ray14 radiographs at {v.image_size} px; "
                    f"cross-validated mean AUROC {m['mean_auc']:.2f} (95% CI {lo:.2f}-{hi:.2f}), far below "
                    f"published models.")
    save_bundle(bundle, model.cpu().float(), name="cxr-fpn", version=args.version, preprocessing=prep, encoding=enc,
                thresholds=thresholds, training=training, metrics=metrics, half=True, intended_use=intended_use,
                # the final model trained on every image, and the cross-validation chose on all of them
                training_images=[(i, p, "development") for i, p in zip(labels["image"], labels["patient_id"])])
    loaded = load_bundle(bundle)
    with torch.inference_mode():
        half_p = []
        for s in range(0, len(images), 64):
            batch = eval_transform_batch(torch.from_numpy(images[s:s + 64])[:, None], prep)
            half_p.append(torch.sigmoid(loaded.model(batch, xs[s:s + 64])).numpy())
    half_error = float(np.abs(np.concatenate(half_p) - got).max())
    copy_artifacts(cv, Path(args.out), bundle / "training_run", report)
    summary = {"folded_max_probability_error_float32": folded_error, "float16_bundle_max_probability_error": half_error,
               "fold_models_in_sample_logit_sd_mean_over_findings": float(ref_sd.mean()),
               "final_model_in_sample_logit_sd_mean_over_findings": float(z_img.std(axis=0).mean()),
               "alignment_scale_range": [float(scale.min()), float(scale.max())],
               "alignment_shift_range": [float(shift.min()), float(shift.max())],
               "model_pt_bytes": (bundle / "model.pt").stat().st_size, "final_training_seconds_by_process": seconds}
    (bundle / "training_run" / "export_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    for k, val in summary.items():
        print(f"{k}: {val}")


def oof_counts(oof_csv: Path, thresholds: dict) -> dict:
    """Per finding, the out-of-fold positives flagged (tp) and missed (fn) at ``thresholds``."""
    import pandas as pd

    oof = pd.read_csv(oof_csv)
    out = {}
    for f in FINDINGS:
        positive = oof[f"y_{f}"].to_numpy() == 1
        flagged = oof[f"p_{f}"].to_numpy() >= thresholds[f]
        out[f] = {"tp": int((positive & flagged).sum()), "fn": int((positive & ~flagged).sum())}
    return out


def fold_in_sample_moments(cv: Path, chosen: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-finding mean and sd of the fold models' logits on their own training images at the
    chosen epoch and weights, averaged over the folds of the chosen repeat."""
    rep = int(chosen["id"].rsplit("rep", 1)[1])
    means, sds = [], []
    for p in sorted((cv / chosen["variant"] / f"rep{rep}").glob("fold*/preds.npz")):
        d = np.load(p)
        s = list(d["epochs"]).index(chosen["epoch"])
        z = d[f"{chosen['weights']}_train"][s]
        means.append(z.mean(axis=0))
        sds.append(z.std(axis=0))
    return np.mean(means, axis=0), np.mean(sds, axis=0)


def copy_artifacts(cv: Path, final: Path, dest: Path, report: dict) -> None:
    """The small, reproducible part of the runs: report, OOF predictions, priors, folds, diagram,
    histories and logs (not checkpoints or caches)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("cv_report.json", "oof.csv", "folds.csv", "reliability.png"):
        shutil.copy(cv / name, dest / name)
    for p in cv.glob("prior_*.json"):
        shutil.copy(p, dest / p.name)
    for name in ("choice.json", "machine.txt", "jobs.log"):  # a run made by training/gpu_cv.sh
        if (cv / name).exists():
            shutil.copy(cv / name, dest / name)
    for p in sorted(cv.glob("*.log")):
        shutil.copy(p, dest / p.name)
    histories = {}
    for h in sorted(cv.glob("*/rep*/fold*/history.json")):
        d = json.loads(h.read_text())
        histories[str(h.parent.relative_to(cv))] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                                                    for row in d["history"]]
    (dest / "cv_histories.json").write_text(json.dumps(histories, indent=0) + "\n")
    if (final / "history.json").exists():
        shutil.copy(final / "history.json", dest / "final_history.json")
    for p in sorted(final.glob("*.log")):
        shutil.copy(p, dest / p.name)


if __name__ == "__main__":
    main()
