"""Could a looser operating point alone carry the pneumothorax worklist goal? Out of fold only.

    python benchmarks/urgent_operating_point.py [--weights BUNDLE] [--specificities 0.95,0.90,0.85,0.80,0.70]

The triage issue asks the worklist order to separate pneumothorax from the rest with AUROC >=
0.75. The worklist puts the urgent bucket (pneumothorax over its operating point) first, ordered
by the pneumothorax probability, then the rest by P(any finding); so the specificity of the
operating points (rule 6 of ``training/configs/v3.toml``: 0.90) decides how many
pneumothoraces reach the top. This re-runs the bundle's own cross-fitted triage
(``training.triage_fit.cross_fitted_triage``, exactly as ``training/export_v3.py`` rule 7 does,
on the bundle's out-of-fold predictions ``training_run/oof.csv`` moved to NIH prevalence) at
other specificities and prints, per specificity, the worklist AUROC for pneumothorax and for any
finding, the urgent bucket's share and sensitivity, and the flags per study. No held-out image is
looked at: the answer is for choosing a rule, not for reporting a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bundle_path  # noqa: E402
from cxr_batch.findings import FINDINGS  # noqa: E402
from training import cvstats, triage_fit  # noqa: E402
from training.export_v3 import MAX_MISSED, oof_arrays  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="a bundle with training_run/oof.csv and a triage table (v3)")
    ap.add_argument("--specificities", default="0.95,0.90,0.85,0.80,0.70")
    args = ap.parse_args(argv)
    bundle = bundle_path(args.weights)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if "triage" not in manifest or not (bundle / "training_run" / "oof.csv").exists():
        raise SystemExit(f"{bundle}: no triage table or no training_run/oof.csv (a v3 bundle has both)")
    triage = manifest["triage"]
    oof, y, p, folds = oof_arrays(bundle / "training_run")
    nih_prev = np.array([manifest["training"]["prevalence"][f] for f in FINDINGS])
    # as the export: out-of-fold probabilities moved from the development mix to NIH's prevalences
    p_nih = cvstats.sigmoid(triage_fit.logit(np.clip(p, 1e-6, 1 - 1e-6)) + triage_fit.label_shift(y.mean(axis=0), nih_prev))
    weights = triage_fit.raking_weights(y, nih_prev)
    flaggable = np.array([triage["findings"][f]["flagged"] for f in FINDINGS])
    nih_any = triage["any_finding"]["nih_rate"]
    print(f"{bundle.name}: {len(y)} development images out of fold, {int(y[:, FINDINGS.index('Pneumothorax')].sum())} "
          f"pneumothoraces; the bundle's rule: specificity 0.90")
    print("specificity  worklist AUROC pneumothorax / any finding  urgent share  urgent sensitivity  flags per study")
    for spec in (float(s) for s in args.specificities.split(",")):
        o = triage_fit.cross_fitted_triage(y, p_nih, folds, weights, nih_any, spec, MAX_MISSED, flaggable)
        sens = o["urgent_sensitivity"]
        print(f"{spec:11.2f}  {o['worklist_auroc_pneumothorax']:26.3f} / {o['worklist_auroc_any_finding']:.3f}"
              f"  {o['buckets']['urgent']:12.3f}  {'-' if sens is None else f'{sens:.3f}':>18s}  {o['flags_per_study']:15.2f}")


if __name__ == "__main__":
    main()
