"""A site calibrates on half of its patients; does it help, and can it hurt, on the other half?
(the acceptance check of issue 20, "calibration that cannot hurt").

    python benchmarks/site_calibration.py STUDIES LABELS.csv [--weights BUNDLE] [--splits 3] [--seed 0]

For each of ``--splits`` random halvings of the labelled studies by patient (folders of links):
``cxr-batch calibrate`` with its defaults (a logit offset per finding with enough positives, operating points kept) on half A,
and again with ``--thresholds sensitivity:0.9``; ``cxr-batch evaluate`` of the base bundle and
of both calibrated bundles on half B (float32). Prints, per split: ECE on B before and after; the
lowest sensitivity on B, after the default calibration, of a finding the base bundle catches on
B (at least 3 positives there and a base sensitivity of at least 0.5); the macro sensitivity on B
of the sensitivity:0.9 bundle; and whether evaluation.json names each bundle's bundle_sha256.
Use it on studies no model was trained on (e.g. the held-out test that ``training.heldout`` links
into ``runs/v3heldout/studies`` with ``labels_with_patient_data.csv``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import link_file  # noqa: E402
from cxr_batch.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from cxr_batch.calibrate import CalibrateOptions, run_calibrate  # noqa: E402
from cxr_batch.evaluate import run_evaluate  # noqa: E402
from cxr_batch.findings import FINDINGS  # noqa: E402
from cxr_batch.labels import read_labels  # noqa: E402
from cxr_batch.scan import ScanConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("studies", type=Path)
    ap.add_argument("labels", type=Path)
    ap.add_argument("--weights", default=str(DEFAULT_BUNDLE))
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    labels = read_labels(args.labels)
    names = sorted(p.name for p in args.studies.iterdir() if p.is_file())
    patient_of = dict(zip(labels.files, labels.patient_ids))
    groups = np.array([patient_of.get(n) or n for n in names])
    patients = np.unique(groups)
    fast = dict(device="cpu", batch_size=16, progress=False)
    rng = np.random.default_rng(args.seed)
    summary = []
    for split in range(args.splits):
        chosen = set(rng.permutation(patients)[: len(patients) // 2])
        with tempfile.TemporaryDirectory(prefix="cxr-site-calibration-") as tmp:
            work = Path(tmp)
            for side, keep in (("A", True), ("B", False)):
                (work / side).mkdir()
                for name, g in zip(names, groups):
                    if (g in chosen) == keep:
                        link_file((args.studies / name).resolve(), work / side / name)
            default = run_calibrate(work / "A", labels, work / "default", CalibrateOptions(weights=args.weights, **fast))
            sens = run_calibrate(work / "A", labels, work / "sens", CalibrateOptions(weights=args.weights,
                                                                                    thresholds="sensitivity:0.9", **fast))
            ev = {}
            for name, weights in (("base", args.weights), ("default", default.bundle), ("sens", sens.bundle)):
                ev[name], _ = run_evaluate(work / "B", labels, work / f"eval_{name}",
                                           ScanConfig(weights=str(weights), precision="fp32", **fast), n_bootstrap=0)
            caught = [f for f in FINDINGS if ev["base"]["per_finding"][f]["positives"] >= 3
                      and (ev["base"]["per_finding"][f]["sensitivity"] or 0) >= 0.5]
            lowest = min(((ev["default"]["per_finding"][f]["sensitivity"], f) for f in caught), default=(None, "-"))
            macro = np.nanmean([s if s is not None else np.nan
                                for s in (ev["sens"]["per_finding"][f]["sensitivity"] for f in FINDINGS)])
            floor = calibrated_noise_floor(work / "eval_default" / "results.csv")
            names_ok = all(ev[k]["bundle_sha256"] == load_bundle(w).sha256 for k, w in
                           (("base", args.weights), ("default", default.bundle), ("sens", sens.bundle)))
            accepted = "accepted" if "findings may move" in default.lines[0] else "refused"
            row = (split, ev["base"]["n_studies"], ev["base"]["ece"], ev["default"]["ece"], lowest,
                   len(caught), macro, names_ok, accepted)
            summary.append(row)
            print(f"split {split}: B {row[1]} studies; default calibration {accepted}: ECE on B {row[2]:.4f} -> {row[3]:.4f}; "
                  f"lowest sensitivity on B of the {row[5]} findings the base catches: "
                  f"{'-' if lowest[0] is None else f'{lowest[0]:.2f} ({lowest[1]})'}; sensitivity:0.9 macro "
                  f"sensitivity on B {macro:.3f}; evaluation.json names each bundle_sha256: {names_ok}", flush=True)
            print(f"     ECE a perfectly calibrated model would show on these {row[1]} studies (labels drawn from the "
                  f"calibrated probabilities, 200 draws): median {floor[0]:.4f}, 90th percentile {floor[1]:.4f}")
            moved = [line.split()[0] + " (" + line.split("intercept ")[1].split()[0].rstrip(",") + ")"
                     for line in default.lines if line.rstrip().endswith("fitted")]
            print(f"     the default calibration moved: {', '.join(moved) or 'nothing'} (logit offset)")
            for line in default.lines[:1] + sens.lines[-3:]:
                print("    ", line)
    ece_ok = sum(r[3] <= 0.015 for r in summary)
    print(f"ECE on B <= 0.015 after the default calibration in {ece_ok} of {len(summary)} splits; "
          f"sensitivity:0.9 macro sensitivity on B {', '.join(f'{r[6]:.3f}' for r in summary)}")


def calibrated_noise_floor(results_csv: Path, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """The ECE that chance alone gives on this many studies: labels drawn from the probabilities
    themselves (a model calibrated exactly), scored with evaluate's ECE."""
    import pandas as pd

    from cxr_batch.metrics import ece

    p = pd.read_csv(results_csv)[[f"p_{f}" for f in FINDINGS]].dropna().to_numpy(float)
    rng = np.random.default_rng(seed)
    values = [ece((rng.random(p.shape) < p).astype(float), p) for _ in range(draws)]
    return float(np.median(values)), float(np.percentile(values, 90))


if __name__ == "__main__":
    main()
