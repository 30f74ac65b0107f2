"""Calibrate on half the patients, measure on the other half (the acceptance check of issue 15),
on the shared NIH images.

    python benchmarks/calibration_split.py [--weights BUNDLE] [--method platt] [--seed 0] [--repeats 10]

1. End to end, once: the images are split by patient into halves A and B (folders of links);
   ``run_calibrate`` (what ``cxr-batch calibrate`` runs) fits on A and writes a new bundle;
   ``run_evaluate`` (``cxr-batch evaluate``) measures the base and the new bundle on B. Prints
   ECE, Brier and mean AUROC of both, and checks the base bundle's files are unchanged.
2. ``--repeats N``: the images are scored once (float32 logits, as calibrate scores them), then
   for N other random halvings the calibration is fitted on A and the ECE measured on B, for
   both methods; and, for a base that is already calibrated (fitted on A without the
   cross-validation margins), re-calibration on a quarter B1 measured on the other quarter B2,
   with the rules and without their margins: what the conservative rules are for. Prints mean ECE before/after and how often it got worse.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH, bundle_path, link_file  # noqa: E402
from cxr_batch import calibration, metrics  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.calibrate import CalibrateOptions, run_calibrate, score_labelled  # noqa: E402
from cxr_batch.evaluate import run_evaluate  # noqa: E402
from cxr_batch.labels import read_labels  # noqa: E402
from cxr_batch.scan import ScanConfig  # noqa: E402


NO_GATES = {"margin_se": 0.0, "finding_margin_se": 0.0}  # keep any fit that lowers held-out log-loss at all


def halves(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask: True for the images of a random half of the patients."""
    patients = np.unique(groups)
    chosen = set(rng.permutation(patients)[: len(patients) // 2])
    return np.array([g in chosen for g in groups])


def folder_hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def end_to_end(args, labels, work: Path) -> None:
    names = np.array(labels.files)
    in_a = halves(np.array([pid or n for pid, n in zip(labels.patient_ids, names)]), np.random.default_rng(args.seed))
    for side, mask in (("A", in_a), ("B", ~in_a)):
        (work / side).mkdir()
        for name in names[mask]:
            link_file((Path(args.images) / name).resolve(), work / side / name)
    base = bundle_path(args.weights)
    untouched = folder_hashes(base)
    options = dict(device=args.device, batch_size=16, progress=False)
    result = run_calibrate(work / "A", labels, work / "site", CalibrateOptions(weights=str(base), method=args.method,
                                                                              **options))
    print(f"calibrated on A ({in_a.sum()} images): {sum('fitted' in l for l in result.lines)} of 14 findings moved; "
          f"in-sample ECE {result.ece_before:.4f} -> {result.ece_after:.4f}")
    for line in result.lines:
        print("   ", line)
    rows = {}
    for name, weights in (("base", base), ("calibrated", result.bundle)):
        ev, _ = run_evaluate(work / "B", labels, work / f"eval_{name}", ScanConfig(weights=str(weights), **options))
        rows[name] = ev
        print(f"on B ({ev['n_studies']} images) {name:10s} {ev['model']}: ECE {ev['ece']:.4f}, Brier {ev['brier']:.4f} "
              f"(prevalence {ev['brier_prevalence']:.4f}), mean AUROC {ev['mean_auroc']:.4f}")
    print(f"ECE on B {'no worse' if rows['calibrated']['ece'] <= rows['base']['ece'] else 'WORSE'}; base bundle "
          f"{'unchanged' if folder_hashes(base) == untouched else 'CHANGED'}")


def repeated(args, labels, work: Path) -> None:
    (work / "all").mkdir()
    for name in labels.files:
        link_file((Path(args.images) / name).resolve(), work / "all" / name)
    opts = CalibrateOptions(device=args.device, progress=False)
    scores = score_labelled(work / "all", labels, load_bundle(bundle_path(args.weights)), opts)
    z, y, g = scores.logits, scores.y, scores.groups
    rng = np.random.default_rng(args.seed + 1)
    results = {}
    for _ in range(args.repeats):
        a = halves(g, rng)
        for method in calibration.METHODS:
            cal = calibration.from_fits(calibration.fit_findings(z[a], y[a], g[a], method), method)
            results.setdefault(("miscalibrated?", method), []).append(
                (metrics.ece(y[~a], expit(z[~a])), metrics.ece(y[~a], expit(cal.apply(z[~a])))))
        # an already calibrated base: fitted on A with no margin, then re-calibrated on a quarter
        base = calibration.from_fits(calibration.fit_findings(z[a], y[a], g[a], "platt", **NO_GATES), "platt")
        zb, yb, gb = base.apply(z[~a]), y[~a], g[~a]
        b1 = halves(gb, rng)
        for method, margins in [(m, {}) for m in calibration.METHODS] + [("platt, no gates", NO_GATES)]:
            fitted = calibration.fit_findings(zb[b1], yb[b1], gb[b1], method.split(",")[0], **margins)
            cal = calibration.from_fits(fitted, method.split(",")[0])
            results.setdefault(("calibrated", method), []).append(
                (metrics.ece(yb[~b1], expit(zb[~b1])), metrics.ece(yb[~b1], expit(cal.apply(zb[~b1])))))
    for (base, method), pairs in results.items():
        pairs = np.array(pairs)
        worse = pairs[:, 1] > pairs[:, 0]
        what = "this bundle, fit on 1/2, ECE on the other 1/2" if base != "calibrated" else \
            "calibrated base, fit on 1/4, ECE on another 1/4"
        print(f"{what:48s} {method:15s} ECE {pairs[:, 0].mean():.4f} -> {pairs[:, 1].mean():.4f}; worse in "
              f"{worse.sum()} of {len(pairs)} (largest increase {max(0.0, (pairs[:, 1] - pairs[:, 0]).max()):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="base bundle (default: the bundled weights)")
    parser.add_argument("--images", default=str(NIH / "images"))
    parser.add_argument("--labels", default=str(NIH / "labels.csv"))
    parser.add_argument("--method", default="platt", choices=calibration.METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--no-end-to-end", action="store_true", help="only the repeated halvings")
    args = parser.parse_args()
    labels = read_labels(args.labels)
    with tempfile.TemporaryDirectory(prefix="cxr-calibration-split-") as tmp:
        if not args.no_end_to_end:
            end_to_end(args, labels, Path(tmp))
        if args.repeats:
            repeated(args, labels, Path(tmp))


if __name__ == "__main__":
    main()
