"""Do the study reports' Grad-CAM maps point at the finding? The pointing game on NIH's boxes.

    python benchmarks/gradcam_pointing.py [--weights BUNDLE] [--level p3|p4|p5]

NIH ChestX-ray14 ships radiologists' boxes for some findings (metadata/BBox_List_2017.csv.gz,
coordinates on the 1024-px release). For every box on an image found in ../shared/data/nih/images
or ../shared/data/nih_extra/images, the map a report would draw for that finding (the level and
grid of :func:`cxr_batch.gradcam.map_level`, or ``--level``: how a level a report does not draw,
such as a 64-px model's P3, would have done; patient data unknown) is computed whether or not
the finding is flagged, and its hottest pixel is checked against the box mapped into the model's
view (centre crop, resize). "Chance" is the box's share of the view: what a point drawn at random
would score. Prints one line per finding and the total: hits, boxes, hit rate and chance.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bundle_path  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.findings import FINDINGS  # noqa: E402
from cxr_batch.gradcam import STRIDES, gradcam, map_level  # noqa: E402
from cxr_batch.preprocess import eval_transform  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FOLDERS = [DATA / "nih" / "images", DATA / "nih_extra" / "images"]
BOXES = DATA / "nih" / "metadata" / "BBox_List_2017.csv.gz"
RELEASE_SIDE = 1024  # the boxes' coordinates are on NIH's 1024 x 1024 release


def box_in_view(box, width: int, height: int, crop: float, size: int) -> tuple[float, float, float, float]:
    """A release box (x, y, w, h) in the model's view: scaled to the file, centre-cropped, resized."""
    x, y, w, h = (float(v) for v in box)
    sx, sy = width / RELEASE_SIDE, height / RELEASE_SIDE
    cw, ch = max(1, round(width * crop)), max(1, round(height * crop))
    left, top = (width - cw) // 2, (height - ch) // 2
    fx, fy = size / cw, size / ch
    x0, y0 = (x * sx - left) * fx, (y * sy - top) * fy
    return x0, y0, x0 + w * sx * fx, y0 + h * sy * fy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights")
    ap.add_argument("--level", choices=sorted(STRIDES), help="the pyramid level to test (default: the reports')")
    args = ap.parse_args()
    bundle = load_bundle(bundle_path(args.weights))
    prep = bundle.preprocessing
    level = (args.level, prep.image_size // STRIDES[args.level]) if args.level else map_level(prep.image_size)
    if level is None:
        sys.exit(f"{bundle.label}: reports draw no maps at {prep.image_size} px; --level p3 tests its finest level")
    files = {p.name: p for folder in FOLDERS if folder.is_dir() for p in folder.iterdir()}
    hits, totals, chance = defaultdict(int), defaultdict(int), defaultdict(list)
    with gzip.open(BOXES, "rt", newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    tabular = torch.full((3,), 0.5)
    oof = Path(bundle.path) / "training_run" / "oof.csv"  # the development images the bundle was trained on
    trained_on = {r["image"] for r in csv.DictReader(open(oof, newline=""))} if oof.is_file() else set()
    on_training = 0
    for name, label, *box in rows:
        label = "Infiltration" if label == "Infiltrate" else label
        if name not in files or label not in FINDINGS:
            continue
        grey = np.asarray(Image.open(files[name]).convert("L"))
        k = FINDINGS.index(label)
        cam = gradcam(bundle.model, eval_transform(grey, prep), tabular, [k], level=level[0])[k]
        x0, y0, x1, y1 = box_in_view(box[:4], grey.shape[1], grey.shape[0], prep.crop_fraction, prep.image_size)
        py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
        totals[label] += 1
        on_training += name in trained_on
        hits[label] += int(cam.max() > 0 and x0 <= px + 0.5 <= x1 and y0 <= py + 0.5 <= y1)
        side = prep.image_size
        chance[label].append(max(0.0, min(x1, side) - max(x0, 0)) * max(0.0, min(y1, side) - max(y0, 0)) / side ** 2)
    print(f"{bundle.label}: maps on {level[0].upper()} ({level[1]} x {level[1]} cells), {prep.image_size} px")
    for label in sorted(totals):
        print(f"{label:14s} {hits[label]:3d} of {totals[label]:3d} boxes hit ({hits[label] / totals[label]:.2f}), "
              f"chance {np.mean(chance[label]):.2f}")
    n, h = sum(totals.values()), sum(hits.values())
    every = [c for cs in chance.values() for c in cs]
    print(f"all            {h:3d} of {n:3d} boxes hit ({h / max(n, 1):.2f}), chance {np.mean(every) if every else 0:.2f}")
    if trained_on:
        print(f"{on_training} of the {n} boxes are on images the bundle was trained on")


if __name__ == "__main__":
    main()
