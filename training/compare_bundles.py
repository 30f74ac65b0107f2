"""Two bundles on held-out images that neither was trained on, paired by patient.

    python -m training.compare_bundles --heldout runs/v3heldout --bundle weights/cxr-fpn-v3 \\
        --against weights/cxr-fpn-v2 --only ../shared/data/nih_extra/images --out runs/v3_vs_v2

What did more data buy? v3's held-out test (``training.heldout``'s ``<heldout>/studies`` and
``labels_with_patient_data.csv``) holds images of both folders; v2.1 was trained on all of
``../shared/data/nih``, so only the test images of ``--only`` (nih_extra: seen by neither model) are
a fair test of both. Each bundle scores them with ``cxr-batch evaluate`` (float32, with patient
data); the mean AUROC over the findings with at least ``--min-positives`` positives there, and the
paired difference with a patient-bootstrap 95% CI, go to ``<out>/compare.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_batch.findings import FINDINGS

from . import cvstats
from .heldout import evaluate, link_or_copy
from .prepare import multi_hot


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", required=True, help="training.heldout's --out folder")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--against", required=True)
    ap.add_argument("--only", required=True, help="keep the held-out images whose file is in this folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-positives", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args(argv)
    heldout, out = Path(args.heldout), Path(args.out)
    labels = pd.read_csv(heldout / "labels_with_patient_data.csv", dtype=str, keep_default_na=False)
    only = {p.name for p in Path(args.only).iterdir()}
    labels = labels[labels["Image Index"].isin(only)].reset_index(drop=True)
    if labels.empty:
        raise SystemExit(f"no held-out image of {args.heldout} is in {args.only}")
    studies = out / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    for name in labels["Image Index"]:
        if not (studies / name).exists():
            link_or_copy(heldout / "studies" / name, studies / name)
    labels.to_csv(out / "labels.csv", index=False)

    y = multi_hot(labels["Finding Labels"]).astype(float)
    kept = [k for k in range(len(FINDINGS)) if y[:, k].sum() >= args.min_positives]
    p = {}
    for name, bundle in (("bundle", args.bundle), ("against", args.against)):
        evaluate(studies, out / "labels.csv", out / name, Path(bundle), 200)
        rows = pd.read_csv(out / name / "results.csv", dtype=str, keep_default_na=False).set_index("file")
        p[name] = rows.loc[labels["Image Index"]][[f"p_{f}" for f in FINDINGS]].astype(float).to_numpy()[:, kept]
    yk = y[:, kept]
    resamples, _ = cvstats.patient_bootstrap_indices(labels["Patient ID"].to_numpy(), yk, args.bootstrap, 7)
    summary = {
        "what": f"{len(labels)} held-out images of {labels['Patient ID'].nunique()} patients in {args.only}, their "
                f"images seen in training by neither bundle; with patient data, float32; mean AUROC over the {len(kept)} findings "
                f"with at least {args.min_positives} positives there",
        "findings": [FINDINGS[k] for k in kept],
        "bundle": args.bundle, "against": args.against,
        "mean_auroc": {"bundle": cvstats.mean_auc(yk, p["bundle"]), "against": cvstats.mean_auc(yk, p["against"])},
        "bundle_minus_against": cvstats.paired_difference(yk, p["bundle"], p["against"], resamples),
        "per_finding_auroc": {FINDINGS[k]: {n: float(cvstats.auc_per_class(yk[:, [j]], p[n][:, [j]])[0]) for n in p}
                              for j, k in enumerate(kept)},
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("what", "mean_auroc", "bundle_minus_against")}, indent=1))
    if not np.isfinite(summary["mean_auroc"]["bundle"]):
        raise SystemExit("no finding could be measured")


if __name__ == "__main__":
    main()
