"""Which images (and patients) a bundle's weights, thresholds and choices were made from, and
whether a site's labelled studies are among them.

A bundle may hold ``training_images.csv`` (``image,patient_id,role``, one row per image, sorted),
named with its sha256 in the manifest's ``training_images``. ``image`` is the name the training
table gave the file (NIH's Image Index, e.g. ``00000001_000.png``): the name a labels table
gives it at evaluation time, the only key a scan of the same image can match whatever format it
was exported to (a DICOM copy has new bytes and a new SOP Instance UID, not a new Image Index).
Images are compared by that name without its image extension (any case), so ``00000001_000.dcm``
matches; a name without one (a DICOM file named by its UID) is compared whole.
``patient_id`` is the training table's Patient ID; patients are compared as written. A list may
also have ``pixels_sha256`` (:func:`pixel_key`: the decoded pixels' hash), which catches a copy
under another name or a lossless conversion (PNG to DICOM); ``calibrate`` writes it. The bundled
v3 and v2.1 lists lack it: adding it would change their sha256 and so their ``bundle_sha256``.

A bundle made by ``calibrate`` also holds ``calibration_images.csv``, the same format (role
``calibration``), named in the manifest's ``calibration_images``: the studies its calibration
and thresholds were fitted on (every site calibration the bundle has had, since each is kept).

``evaluate`` and ``calibrate`` use :func:`overlap` to say how many studies are the model's own
training images (or of its training patients); ``evaluate`` also says how many are the bundle's
calibration studies: figures measured on either are in-sample.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .bundle import MANIFEST_FILE, BundleError, sha256_file
from .display import plural
from .files import atomic_write_bytes
from .readers import image_stem, read_study
from .study import StudyFailure, pixels_sha256

TRAINING_IMAGES_FILE = "training_images.csv"
CALIBRATION_IMAGES_FILE = "calibration_images.csv"
COLUMNS = ("image", "patient_id", "role")
PIXELS = "pixels_sha256"  # optional column: an image's pixel_key
WHAT = ("every image whose pixels or labels shaped the weights, the thresholds or a choice made in training "
        "(roles: train, validation, development); the held-out test images are not listed")
NOT_RECORDED = "the bundle does not record its training images; overlap cannot be checked"


@dataclass(frozen=True)
class ImageList:
    """One kind of list a bundle may hold: which studies shaped it, and how a message names them."""

    kind: str  # "training": the manifest's 'training_images', evaluation.json's 'training_overlap' and its keys
    file: str
    what: str  # the manifest record's 'what'
    seen: str  # "N of M studies are images ..."
    patients: str  # "... other images of ..."
    not_recorded: str
    remake: str  # what to do when the sealed list cannot be read


TRAINING = ImageList("training", TRAINING_IMAGES_FILE, WHAT, "the model was trained or tuned on",
                     "its training patients", NOT_RECORDED,
                     "the bundle cannot say what it was trained on; make the list again (python -m "
                     "training.record_images) or remove it and its 'training_images' entry from the manifest")
CALIBRATION = ImageList(
    "calibration", CALIBRATION_IMAGES_FILE,
    "every labelled study a site calibration of this bundle fitted its calibration and thresholds on "
    "(role: calibration), named by the labels table's Image Index and Patient ID",
    "this bundle was calibrated on", "its calibration patients",
    "the bundle does not record the studies it was calibrated on (made by an older cxr-batch); overlap with them "
    "cannot be checked", "the bundle cannot say which studies it was calibrated on; calibrate the base bundle again")


@dataclass(frozen=True)
class TrainingImages:
    """The images (and patients) of one list: training or calibration."""

    images: frozenset[str]  # names without their extension
    patients: frozenset[str]
    pixels: frozenset[str] = frozenset()  # pixel_key of the images whose list row has one


def pixel_key(path: Path) -> str:
    """The sha256 of an image's decoded grey pixels at their stored size (with that size): the
    same for a copy under another name and for a lossless conversion of the same pixels (an 8-bit
    PNG made a DICOM file), not for a resized, recompressed or re-windowed export. '' when the
    file cannot be read now."""
    try:
        return pixels_sha256(read_study(Path(path)).grey)
    except (StudyFailure, OSError, ValueError):
        return ""


def image_key(name: str) -> str:
    """How an image is compared: its file name without folders and without its image extension
    (a DICOM file named by its UID has none: its last dot is the UID's)."""
    return image_stem(name)


def image_list(rows, kind: ImageList = TRAINING) -> tuple[bytes, dict]:
    """The CSV of ``rows`` (dicts or tuples of image, patient_id, role and optionally
    pixels_sha256; one per image) and the manifest's record of it (``training_images`` or
    ``calibration_images``). The pixels_sha256 column is written when a row has one."""
    table, with_pixels = {}, False
    for row in rows:
        if isinstance(row, dict):
            row = (*(row[c] for c in COLUMNS), *([row[PIXELS]] if PIXELS in row else []))
        image, patient, role, *pixels = row
        with_pixels |= bool(pixels)
        image, entry = PurePosixPath(str(image)).name, (str(patient).strip(), str(role), *map(str, pixels))
        if table.setdefault(image, entry) != entry:
            raise ValueError(f"{image} is listed twice, with other patient IDs, roles or pixels")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS + ((PIXELS,) if with_pixels else ()))
    for image in sorted(table):
        writer.writerow((image, *table[image], *([""] if with_pixels and len(table[image]) < 3 else [])))
    data = buffer.getvalue().encode()
    roles: dict[str, int] = {}
    for _, role, *_ in table.values():
        roles[role] = roles.get(role, 0) + 1
    matched_by = "image name without its extension (NIH Image Index); Patient ID as written"
    if with_pixels:
        matched_by += "; the decoded pixels' sha256 (pixels_sha256), whatever the file's name or format"
    return data, {"file": kind.file, "sha256": hashlib.sha256(data).hexdigest(), "images": len(table),
                  "patients": len({p for p, *_ in table.values() if p}), "roles": roles, "what": kind.what,
                  "matched_by": matched_by}


def write_image_list(folder: Path, rows, kind: ImageList = TRAINING) -> dict:
    """Write ``kind``'s list (``training_images.csv``, ``calibration_images.csv``) in ``folder``
    from ``rows`` (:func:`image_list`) and return the manifest's record of it."""
    data, record = image_list(rows, kind)
    atomic_write_bytes(Path(folder) / kind.file, data, mode=0o644)
    return record


def read_rows(folder: Path, manifest: dict, kind: ImageList = TRAINING) -> list[dict] | None:
    """The rows (image, patient_id, role) of the bundle's ``kind`` list, or None when its manifest
    records none. Raises BundleError when the manifest names a list that is missing or fails its
    checksum (an altered bundle)."""
    key = f"{kind.kind}_images"
    record = manifest.get(key)
    if not record:
        return None
    where = Path(folder) / MANIFEST_FILE
    if not isinstance(record.get("file"), str) or not isinstance(record.get("sha256"), str) \
            or PurePosixPath(record["file"]).name != record["file"]:
        raise BundleError(f"{where}: '{key}' must name a file in the bundle and its sha256")
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise BundleError(f"{where} names {record['file']}, which is missing from the bundle: the bundle is incomplete")
    if sha256_file(path) != record["sha256"]:
        raise BundleError(f"{path} fails its checksum (manifest sha256 {record['sha256']}): the list of {kind.kind} "
                          f"images was altered after the bundle was made; refusing to use it")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
            raise ValueError(f"its columns are {reader.fieldnames}, not {', '.join(COLUMNS)}")
        short = next((i for i, r in enumerate(rows, 2) if any(r[c] is None for c in COLUMNS)), None)
        if short is not None:
            raise ValueError(f"line {short} has fewer than {len(COLUMNS)} fields")
    except (UnicodeDecodeError, csv.Error, ValueError) as e:  # sealed as it is: made by another tool or by hand
        raise BundleError(f"{path} is not a list of {kind.kind} images ({e}): {kind.remake}") from None
    return rows


def read_image_list(folder: Path, manifest: dict, kind: ImageList = TRAINING) -> TrainingImages | None:
    """The images and patients of the bundle's ``kind`` list (training by default), or None when
    its manifest records none; raises as :func:`read_rows`."""
    rows = read_rows(folder, manifest, kind)
    if rows is None:
        return None
    return TrainingImages(frozenset(image_key(r["image"]) for r in rows),
                          frozenset(r["patient_id"].strip() for r in rows if r["patient_id"].strip()),
                          frozenset(r[PIXELS] for r in rows if r.get(PIXELS)))


IN_SAMPLE = "figures on {these} are in-sample (too good), not a test of the model"
CALIBRATION_IN_SAMPLE = ("its calibration and thresholds were fitted on {these}, so ECE, Brier and the flags' "
                         "sensitivity and specificity on them are in-sample (too good; AUROC is not changed by "
                         "calibration)")
# a bundle calibrated before calibration_images.csv existed names no study it fitted on; its
# provenance keeps the sha256 of the labels table it was given
CALIBRATED_ON = ("this bundle was calibrated on these labels (the same table, sha256 as in its provenance): its "
                 "calibration and thresholds were fitted on these studies, so ECE, Brier and the flags' sensitivity "
                 "and specificity here are in-sample (AUROC is not changed by calibration); evaluate it on studies it "
                 "was not calibrated on")


def calibration_labels(manifest: dict, labels_sha256: str) -> dict | None:
    """evaluation.json's ``calibrated_on``: whether a site-calibrated bundle is evaluated with
    the very labels table it was calibrated with (same sha256); None for a bundle not calibrated.
    A subset or an edited copy of that table is another file: not recognised. Its message is
    for a bundle that does not list its calibration studies: one that does says more in
    ``calibration_overlap`` (which studies, and the figures without them)."""
    recorded = ((manifest.get("provenance") or {}).get("labels") or {}).get("sha256")
    if "calibration" not in manifest or not isinstance(recorded, str):
        return None
    same = recorded == labels_sha256
    said = same and not manifest.get(f"{CALIBRATION.kind}_images")
    return {"labels_sha256": recorded, "same_labels": same, "message": CALIBRATED_ON if said else None}


def overlap(training: TrainingImages | None, files: list[str], labelled_as: list[str],
            patients: list[str], consequence: str = IN_SAMPLE, kind: ImageList = TRAINING,
            pixels: list[str] | None = None) -> tuple[dict, list[bool]]:
    """Which of the evaluated studies are in the bundle's ``kind`` list (``training``: its images
    and patients, :func:`read_image_list`). ``files``: each study's scanned file;
    ``labelled_as``: the label row's Image Index it matched; ``patients``: its Patient ID ('' when
    unknown); ``consequence``: what the message says follows ({these}: the in-sample studies);
    ``pixels``: each study's :func:`pixel_key` ('' when unknown; None: not computed), compared
    with the list's where it has them. Returns (the record evaluation.json keeps, its keys named
    after ``kind``; one bool per study: in-sample)."""
    n, of = len(files), kind.kind
    if training is None:
        return {"checked": False, "n_studies": n, "message": kind.not_recorded}, [False] * n
    by_name = [image_key(f) in training.images or image_key(label) in training.images
               for f, label in zip(files, labelled_as)]
    by_pixels = [bool(key) and key in training.pixels for key in (pixels or [""] * n)]
    by_image = [a or b for a, b in zip(by_name, by_pixels)]
    by_patient = [bool(p) and p.strip() in training.patients for p in patients]
    in_sample = [a or b for a, b in zip(by_image, by_patient)]
    record = {
        "checked": True, "n_studies": n,
        f"{of}_images": len(training.images), f"{of}_patients": len(training.patients),
        f"images_in_{of}": sum(by_image),
        # a copy under another name, or the same pixels in another format (None: the list has no pixels_sha256)
        "renamed_copies": sum(b and not a for a, b in zip(by_name, by_pixels)) if training.pixels else None,
        f"studies_of_{of}_patients": sum(by_patient),
        # the same patient's other images: in-sample for what the model learnt of that patient
        f"other_images_of_{of}_patients": sum(b and not a for a, b in zip(by_image, by_patient)),
        f"patients_in_{of}": len({p.strip() for p, hit in zip(patients, by_patient) if hit}),
        "in_sample_studies": sum(in_sample),
        "in_sample_files": [f for f, hit in zip(files, in_sample) if hit],
    }
    record["message"] = overlap_message(record, consequence, kind)
    return record, in_sample


def overlap_message(record: dict, consequence: str = IN_SAMPLE, kind: ImageList = TRAINING) -> str | None:
    """One sentence for the console and the report; None when nothing overlaps."""
    if not record["checked"]:
        return record["message"]
    if not record["in_sample_studies"]:
        return None
    n, of = record["n_studies"], kind.kind
    images, others = record[f"images_in_{of}"], record[f"other_images_of_{of}_patients"]

    def are(k, one, many):
        return f"is {one}" if k == 1 else f"are {many}"

    said = f"{images} of {plural(n, 'study')} {are(images, 'an image', 'images')} {kind.seen}" if images else ""
    if record.get("renamed_copies"):
        said += f" ({record['renamed_copies']} under another name or format, matched by their pixels)"
    if others:
        said += (f" and {others} more" if said else f"{others} of {plural(n, 'study')}") \
            + f" {are(others, 'another image', 'other images')} of {kind.patients} (Patient ID as written)"
    k = record["in_sample_studies"]
    return said + ": " + consequence.format(these="this one" if k == 1 else f"these {k}")
