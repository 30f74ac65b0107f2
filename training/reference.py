"""Add a drift-monitoring reference to a weights bundle, from its training images.

    python -m training.reference BUNDLE --images DIR --metadata LABELS.csv \\
        [--images DIR2 --metadata LABELS2.csv ...] (--out NEW_BUNDLE | --in-place) [--replace]
        [--device auto] [--batch-size 16] [--workers N]

Scores every image under each ``--images`` folder exactly as ``cxr-batch scan`` does (same
readers, preprocessing and engine, in float32; the ``--metadata`` table of the same position
gives the patient data, NIH Data_Entry format) and stores the summary of every quantity drift
monitoring watches (:mod:`cxr_batch.drift`: acquisition data, statistics of the model's input,
patient data, outputs) in the manifest under ``reference``. The manifest is sealed again, so the
reference is covered by ``bundle_sha256`` (which therefore changes). ``--out`` writes a new bundle
(the weights copied byte for byte) and leaves BUNDLE as it is; ``--in-place`` rewrites BUNDLE's
manifest (for a bundle just exported, before it is shipped). ``cxr-batch monitor`` and the
daemons then compare a site's studies with it.

The outputs in the reference are the model's own outputs on its training images (in-sample);
``outputs_for`` names the weights, thresholds and calibration they belong to, so a bundle
calibrated from this one compares inputs only.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

from cxr_batch.bundle import Bundle, BundleError, load_bundle, write_manifest
from cxr_batch.discover import find_candidates
from cxr_batch.drift import DriftError, make_reference, output_fingerprint
from cxr_batch.inference import BatchOptions, Engine, score_batches
from cxr_batch.device import DeviceError
from cxr_batch.metadata import MetadataError, load_metadata_csv
from cxr_batch.record import StudyRecord
from cxr_batch.runtime import make_policy

log = logging.getLogger("cxr_batch.reference")


def score_folders(bundle: Bundle, sources: list[tuple[Path, Path | None]], device: str = "auto",
                  batch_size: int = 16, workers: int | None = None) -> list[StudyRecord]:
    """The records of every image under each folder of ``sources`` ((images, metadata CSV or
    None) pairs), scored as a scan scores them, in float32."""
    engine = Engine(bundle, make_policy(device, "fp32"))
    options = BatchOptions(batch_size=batch_size, workers=workers, progress=False)
    records = []
    for images, metadata_csv in sources:
        candidates = find_candidates(Path(images), follow_links=True)  # training images: a trusted folder
        metadata = None
        if metadata_csv is not None:
            metadata = load_metadata_csv(metadata_csv, only={c.path.name for c in candidates})
        for scored in score_batches(candidates, engine, options, metadata):
            records.extend(scored.records)
        ok = sum(r.ok for r in records)
        log.info("%s: %d files, %d scored so far", images, len(candidates), ok)
    return records


def reference_for(bundle: Bundle, sources: list[tuple[Path, Path | None]], **scoring) -> dict:
    """The reference of ``bundle`` from the images of ``sources`` (see :func:`score_folders`)."""
    records = score_folders(bundle, sources, **scoring)
    described = []
    for images, metadata_csv in sources:
        part = "/".join(Path(images).resolve().parts[-2:])
        if metadata_csv is not None:
            digest = hashlib.sha256(Path(metadata_csv).read_bytes()).hexdigest()[:16]
            part += f" with {Path(metadata_csv).name} (sha256 {digest}...)"
        described.append(part)
    scored = sum(r.ok for r in records)
    source = (f"training images scored by {bundle.label} in float32: {scored} of {len(records)} files from "
              + "; ".join(described))
    return make_reference(records, source, outputs_for=output_fingerprint(bundle.manifest))


def add_reference(bundle_path: Path, sources: list[tuple[Path, Path | None]], out: Path | None = None,
                  replace: bool = False, **scoring) -> Path:
    """Add a reference to the bundle at ``bundle_path``: into a new bundle at ``out``, or in
    place when ``out`` is None. Returns the bundle written. Raises BundleError/DriftError."""
    from cxr_batch.calibrate import check_destination, write_bundle

    bundle = load_bundle(bundle_path)
    if "reference" in bundle.manifest and not replace:
        raise BundleError(f"{bundle_path} already carries a reference (made {bundle.manifest['reference'].get('created')}"
                          f"): --replace makes a new one")
    if out is not None:
        check_destination(Path(out), Path(bundle_path))
    reference = reference_for(bundle, sources, **scoring)
    manifest = {**bundle.manifest, "reference": reference}
    if out is not None:
        return write_bundle(bundle, Path(out), manifest)
    write_manifest(Path(bundle_path), manifest)
    load_bundle(bundle_path)  # sealed and loadable
    return Path(bundle_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--images", type=Path, action="append", required=True, help="folder of training images")
    ap.add_argument("--metadata", type=Path, action="append", default=[],
                    help="patient data for the --images folder in the same position (NIH Data_Entry format)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write a new bundle here (BUNDLE is left as it is)")
    where.add_argument("--in-place", action="store_true", help="rewrite BUNDLE's manifest")
    ap.add_argument("--replace", action="store_true", help="replace a reference the bundle already carries")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="cxr-batch: %(message)s", stream=sys.stderr, force=True)
    if args.metadata and len(args.metadata) != len(args.images):
        ap.error(f"{len(args.images)} --images folders but {len(args.metadata)} --metadata files: give one per folder "
                 f"(or none)")
    for folder in args.images:
        if not folder.is_dir():
            ap.error(f"--images {folder} is not a folder")
    for table in args.metadata:
        if not table.is_file():
            ap.error(f"--metadata {table} is not a file")
    sources = list(zip(args.images, args.metadata or [None] * len(args.images)))
    try:
        written = add_reference(args.bundle, sources, args.out, args.replace, device=args.device,
                                batch_size=args.batch_size, workers=args.workers)
    except (BundleError, DriftError, DeviceError, MetadataError, OSError, ValueError) as e:
        print(f"cxr-batch: error: {e}", file=sys.stderr)
        return 1
    manifest = load_bundle(written).manifest
    ref = manifest["reference"]
    print(f"reference of {ref['n_studies']} studies added: {written} (bundle_sha256 {manifest['bundle_sha256']})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
