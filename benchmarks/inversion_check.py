"""How well do the image statistics tell an inverted chest radiograph (grey levels negated: a
MONOCHROME1 file shown as MONOCHROME2, an export that inverts) from one shown right, image by image?

    python benchmarks/inversion_check.py [--limit N]

Every NIH image of ``../shared/data/nih/images`` and ``../shared/data/nih_extra/images``, as it
is and inverted (255 - grey), goes through the inference transform of the default bundle (crop,
resize) and :func:`cxr_batch.image_stats.image_statistics`. Printed per statistic and collection:
the share of images shown right that a threshold flags, and the share of inverted ones it
catches, for the thresholds the check could use; then those of ``looks_inverted``, the rule
``monitor`` counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH  # noqa: E402
from cxr_batch.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from cxr_batch.image_stats import image_statistics, looks_inverted  # noqa: E402
from cxr_batch.preprocess import eval_transform  # noqa: E402
from cxr_batch.readers import read_study  # noqa: E402


def stats_of(paths: list[Path], prep, invert: bool, flip: bool = False) -> list:
    out = []
    for start in range(0, len(paths), 32):
        greys = [read_study(p).grey[::-1].copy() if flip else read_study(p).grey for p in paths[start:start + 32]]
        x = torch.stack([eval_transform(255 - g if invert else g, prep) for g in greys])
        out += image_statistics(x, prep.mean[0], prep.std[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="images per collection (0: all)")
    args = ap.parse_args()
    prep = load_bundle(DEFAULT_BUNDLE).preprocessing
    for name, folder in (("nih", NIH / "images"), ("nih_extra", NIH.parent / "nih_extra" / "images")):
        paths = sorted(folder.glob("*.png"))[:args.limit or None]
        right, inverted = stats_of(paths, prep, False), stats_of(paths, prep, True)
        print(f"== {name}: {len(paths)} images, as they are and inverted ==")
        for stat in ("inversion_cue", "intensity_skew", "top_bottom"):
            a = np.array([getattr(s, stat) for s in right])
            b = np.array([getattr(s, stat) for s in inverted])
            q = lambda v: " ".join(f"{x:+.3f}" for x in np.percentile(v, [0, 1, 5, 50, 95, 99, 100]))  # noqa: E731
            print(f"{stat}: shown right min/1/5/50/95/99/max% {q(a)}; inverted {q(b)}")
            for t in (0.0, -0.02, -0.05, -0.1):
                print(f"   < {t:+.2f}: flags {np.mean(a < t):.1%} shown right, catches {np.mean(b < t):.1%} inverted")
        fp, tp = sum(map(looks_inverted, right)), sum(map(looks_inverted, inverted))
        print(f"looks_inverted (inversion_cue < 0 and intensity_skew > 0): flags {fp} of {len(right)} shown right "
              f"({fp / len(right):.1%}), catches {tp} of {len(inverted)} inverted ({tp / len(inverted):.1%})")
        # a film upside down is not inverted (an orientation cue in the rule counted 72% of them)
        flip = sum(map(looks_inverted, stats_of(paths, prep, False, flip=True)))
        print(f"   upside down (grey levels right): flags {flip} of {len(paths)} ({flip / len(paths):.1%})")


if __name__ == "__main__":
    main()
