"""Record in a cross-validated bundle (v2, v3) the images it was made from, from its own split record.

    python -m training.record_images weights/cxr-fpn-v3

``training.export_v2``/``export_v3`` copy the run's ``folds.csv`` (image, patient_id, fold_rep0)
into ``BUNDLE/training_run``: rows with a fold (>= 0) are the development images, which trained
the final model and every fold model and chose the recipe, the combination and the thresholds
out of fold; rows with fold -1 are the held-out test no model or choice saw. This writes the
development rows to ``BUNDLE/training_images.csv`` (role ``development``), after checking that
they are the manifest's own counts (``training.data.images``/``patients``) and that the other
rows are exactly its ``held_out_test_images``, and seals the manifest again: the bundle gets a
new ``bundle_sha256``; its weights, thresholds and outputs are unchanged (``drift``'s output
fingerprint too).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cxr_batch.bundle import load_bundle, read_manifest, write_manifest
from cxr_batch.provenance import write_image_list

FOLDS = Path("training_run") / "folds.csv"


def development_rows(folds: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(image, patient_id, 'development') of the rows of a folds table that are in a fold."""
    dev = folds[folds["fold_rep0"].astype(int) >= 0]
    return [(image, patient, "development") for image, patient in dev[["image", "patient_id"]].itertuples(index=False)]


def check_against_manifest(folds: pd.DataFrame, manifest: dict) -> None:
    """The folds table must be the bundle's own split: its development images and patients the
    manifest's counts, its other rows the manifest's held-out test. Raises SystemExit."""
    data = manifest.get("training", {}).get("data", {})
    dev = folds["fold_rep0"].astype(int) >= 0
    counts = (int(dev.sum()), int(folds.loc[dev, "patient_id"].nunique()))
    if counts != (data.get("images"), data.get("patients")):
        raise SystemExit(f"{FOLDS} has {counts[0]} development images of {counts[1]} patients; the manifest says "
                         f"{data.get('images')} of {data.get('patients')}: not this bundle's split")
    held_out = sorted(folds.loc[~dev, "image"])
    if held_out != sorted(data.get("held_out_test_images", [])):
        raise SystemExit(f"{FOLDS}'s rows outside the folds ({len(held_out)}) are not the manifest's "
                         f"held_out_test_images ({len(data.get('held_out_test_images', []))})")


def record(bundle: Path) -> dict:
    """Write the list and seal the manifest again; returns the manifest's new ``training_images``."""
    manifest = read_manifest(bundle)
    folds = pd.read_csv(bundle / FOLDS, dtype={"patient_id": str, "image": str})
    check_against_manifest(folds, manifest)
    manifest["training_images"] = write_image_list(bundle, development_rows(folds))
    write_manifest(bundle, manifest)
    load_bundle(bundle)  # verifies the weights, the manifest and the list
    return manifest["training_images"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle whose training_run/folds.csv holds its split")
    args = parser.parse_args(argv)
    before = read_manifest(args.bundle)["bundle_sha256"]
    made = record(args.bundle)
    after = read_manifest(args.bundle)["bundle_sha256"]
    print(f"{args.bundle}: {made['images']} images of {made['patients']} patients -> {made['file']} "
          f"(sha256 {made['sha256']}); bundle_sha256 {before} -> {after}")


if __name__ == "__main__":
    main()
