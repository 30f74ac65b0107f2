"""Why the image path does worse on AP films, and what might help: out of fold, on the
development images of a cross-validation (issue 23 item 1).

    python -m training.view_analysis --cv runs/v3cv \\
        --images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv \\
        --images ../shared/data/nih_extra/images --labels ../shared/data/nih_extra/labels.csv

Reads ``<cv>/oof.csv`` (out-of-fold image logits, prior logits and calibrated probabilities)
and prints, into ``<cv>/view_analysis.json`` too:

- mean AUROC by view of the image logits, the calibrated model and the age/sex/view prior, and
  per finding by view (which findings fail on AP);
- what differs between AP and PA films here: age, findings per image, share with no finding,
  and which folder they come from (nih_extra's AP films are mostly "No Finding" and pneumonia);
- one post-hoc remedy, cross-fitted on the same folds: a combination with a per-finding image
  weight for AP films of its own (the image evidence may mean less, or something else, on a
  portable film), against the chosen combination, paired by patient bootstrap. Post hoc: it
  would have to go through a cross-validation of its own before it is used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_batch.findings import FINDINGS

from . import cvstats
from .crossval import load_sources


def per_view_combination(z_img, z_prior, y, ap, folds, C: float = 1.0) -> np.ndarray:
    """Cross-fitted probabilities of logit_k = a_k z_img + a'_k z_img [AP] + c z_prior + b_k + d_k [AP]."""
    from sklearn.linear_model import LogisticRegression

    p = np.zeros(y.shape)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        for k in range(y.shape[1]):
            def features(rows):
                return np.column_stack([z_img[rows, k], z_img[rows, k] * ap[rows], z_prior[rows, k], ap[rows]])
            if y[tr, k].min() == y[tr, k].max():
                p[te, k] = y[tr, k].mean()
                continue
            lr = LogisticRegression(C=C, max_iter=5000).fit(features(tr), y[tr, k])
            p[te, k] = lr.predict_proba(features(te))[:, 1]
    return p


def main(argv=None) -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap_.add_argument("--cv", required=True)
    ap_.add_argument("--images", required=True, action="append")
    ap_.add_argument("--labels", required=True, action="append")
    ap_.add_argument("--bootstrap", type=int, default=1000)
    args = ap_.parse_args(argv)
    cv = Path(args.cv)
    oof = pd.read_csv(cv / "oof.csv", dtype={"patient_id": str})
    labels = load_sources(args.images, args.labels).set_index("image").loc[oof["image"]].reset_index()
    y = oof[[f"y_{f}" for f in FINDINGS]].to_numpy().astype(float)
    z_img = oof[[f"img_logit_{f}" for f in FINDINGS]].to_numpy()
    z_prior = oof[[f"prior_logit_{f}" for f in FINDINGS]].to_numpy()
    p = oof[[f"p_{f}" for f in FINDINGS]].to_numpy()
    folds = oof["fold"].to_numpy()
    view = labels["view"].to_numpy()
    ap = (view == "AP").astype(float)
    source = np.array([Path(d).parent.name for d in labels["images_dir"]])
    age = pd.to_numeric(labels["age"], errors="coerce").to_numpy()
    out: dict = {"n": int(len(y)), "by_view": {}, "per_finding_auroc": {}, "composition": {}}
    for v in ("PA", "AP"):
        m = view == v
        out["by_view"][v] = {"n": int(m.sum()), "image_only": cvstats.mean_auc(y[m], z_img[m]),
                             "with_patient_data": cvstats.mean_auc(y[m], p[m]),
                             "prior_only": cvstats.mean_auc(y[m], z_prior[m])}
        out["per_finding_auroc"][v] = dict(zip(FINDINGS, np.round(cvstats.auc_per_class(y[m], z_img[m]), 3).tolist()))
        out["composition"][v] = {
            "median_age": float(np.nanmedian(age[m])), "findings_per_image": float(y[m].sum(axis=1).mean()),
            "no_finding_share": float((y[m].sum(axis=1) == 0).mean()),
            "from_folder": {s: int((source[m] == s).sum()) for s in np.unique(source)},
            "positives": dict(zip(FINDINGS, y[m].sum(axis=0).astype(int).tolist())),
        }
        for s in np.unique(source):
            ms = m & (source == s)
            if ms.sum() > 20:
                out["by_view"][v][f"image_only_{s}"] = cvstats.mean_auc(y[ms], z_img[ms])
    chosen = cvstats.cross_fit(z_img, z_prior, y, folds, json.loads((cv / "cv_report.json").read_text())
                               ["chosen_combination"])
    remedy = per_view_combination(z_img, z_prior, y, ap, folds)
    resamples, _ = cvstats.patient_bootstrap_indices(oof["patient_id"].to_numpy(), y, args.bootstrap, 7)
    apm = view == "AP"
    ap_resamples, _ = cvstats.patient_bootstrap_indices(oof["patient_id"].to_numpy()[apm], y[apm], args.bootstrap, 7)
    out["post_hoc_per_view_image_weight"] = {
        "all": cvstats.paired_difference(y, remedy, chosen, resamples),
        "ap_only": cvstats.paired_difference(y[apm], remedy[apm], chosen[apm], ap_resamples),
        "note": "post hoc on the same out-of-fold predictions: a hypothesis, not a chosen recipe",
    }
    (cv / "view_analysis.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
