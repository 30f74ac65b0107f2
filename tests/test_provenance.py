"""A bundle records the images it was trained on; evaluate and calibrate say when a site's
"held-out" studies are among them (figures on them are in-sample)."""

import csv
import json
import shutil
import subprocess

import pandas as pd
import pytest
import torch

from cxr_batch.bundle import DEFAULT_BUNDLE, BundleError, load_bundle, read_manifest, save_bundle
from cxr_batch.findings import FINDINGS
from cxr_batch.model import ModelConfig, build_model
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing
from cxr_batch.provenance import (CALIBRATION_IMAGES_FILE, NOT_RECORDED, TRAINING_IMAGES_FILE, TrainingImages,
                                  image_key, overlap, read_image_list)
from training.record_images import FOLDS, check_against_manifest, development_rows

from .test_evaluate_calibrate import cli, folder_of
from .test_training_run import train


CPU = ("--device", "cpu", "--batch-size", 8, "--workers", 0)


def listed(bundle):
    with open(bundle / TRAINING_IMAGES_FILE, newline="") as f:
        return list(csv.DictReader(f))


def labels_of(nih, images, path):
    table = pd.read_csv(nih / "labels.csv", dtype=str)
    table[table["Image Index"].isin([p.name for p in images])].to_csv(path, index=False)
    return path


def evaluate(tmp_path, nih, images, bundle, name):
    studies = folder_of(tmp_path, images, f"{name}_studies")
    out = tmp_path / name
    proc = cli("evaluate", studies, "--labels", labels_of(nih, images, tmp_path / f"{name}.csv"), "--weights", bundle,
               "--out", out, "--bootstrap", 0, *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr, json.loads((out / "evaluation.json").read_text()), out


@pytest.mark.slow
def test_a_trained_bundle_lists_its_images_and_evaluate_names_the_overlap(nih, nih_images, tmp_path):
    run = tmp_path / "run"
    proc = train(nih, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = run / "bundle"
    rows = listed(bundle)
    # what training read: the training and validation rows of prepared.csv (balancing may leave
    # some of the training split out), never the test part, which only measured the bundle
    prepared = pd.read_csv(run / "prepared.csv", dtype=str)
    assert {r["image"] for r in rows} == set(prepared.loc[prepared["split"] != "test", "image"])
    assert not {r["image"] for r in rows} & set(prepared.loc[prepared["split"] == "test", "image"])
    assert {r["role"] for r in rows} == {"train", "validation"}
    assert read_manifest(bundle)["training_images"]["images"] == len(rows)
    by_name = {p.name: p for p in nih_images}
    trained = [by_name[r["image"]] for r in rows if r["role"] == "train"][:5]
    patients = {r["patient_id"] for r in rows}
    table = pd.read_csv(nih / "labels.csv", dtype=str)
    unseen = [by_name[i] for i, p in zip(table["Image Index"], table["Patient ID"])
              if p not in patients and i in by_name][:7]

    stderr, ev, out = evaluate(tmp_path, nih, trained + unseen, bundle, "overlap")
    said = ev["training_overlap"]
    assert said["checked"] and said["images_in_training"] == 5 and said["in_sample_studies"] == 5
    assert sorted(said["in_sample_files"]) == sorted(p.name for p in trained)
    assert said["without_them"]["n"] == 7
    assert stderr.count("5 of 12 studies are images the model was trained or tuned on") == 1
    assert "in-sample" in stderr
    text = subprocess.run(["pdftotext", "-layout", str(out / "evaluation.pdf"), "-"], capture_output=True,
                          text=True).stdout
    assert "In-sample: 5 of 12 studies are images the model was trained or" in text
    assert "Without them (7 studies" in text

    stderr, ev, out = evaluate(tmp_path, nih, unseen, bundle, "disjoint")
    said = ev["training_overlap"]
    assert said["checked"] and said["in_sample_studies"] == 0 and said["message"] is None
    assert "in-sample" not in stderr.lower() and "trained or tuned on" not in stderr
    text = subprocess.run(["pdftotext", "-layout", str(out / "evaluation.pdf"), "-"], capture_output=True,
                          text=True).stdout
    assert "In-sample" not in text


def test_a_bundle_without_the_list_says_so_once_and_evaluates(nih, nih_images, tmp_path, small_bundle):
    stderr, ev, _ = evaluate(tmp_path, nih, nih_images[:4], small_bundle, "unlisted")
    assert ev["training_overlap"] == {"checked": False, "n_studies": 4, "message": NOT_RECORDED}
    assert stderr.count(NOT_RECORDED) == 1 and "error" not in stderr.lower()


def test_bundled_v3_lists_exactly_its_development_images(nih):
    """v3's list is its folds.csv's development rows: the manifest's 1250 images of 967 patients,
    none of its 313 held-out test images; 394 of the 480 shared NIH images are among them."""
    manifest = read_manifest(DEFAULT_BUNDLE)
    folds = pd.read_csv(DEFAULT_BUNDLE / FOLDS, dtype={"patient_id": str, "image": str})
    check_against_manifest(folds, manifest)
    rows = listed(DEFAULT_BUNDLE)
    assert [(r["image"], r["patient_id"], r["role"]) for r in rows] == sorted(development_rows(folds))
    training = read_image_list(DEFAULT_BUNDLE, manifest)
    assert len(training.images) == 1250 and len(training.patients) == 967
    assert not training.images & {image_key(i) for i in manifest["training"]["data"]["held_out_test_images"]}
    shared = pd.read_csv(nih / "labels.csv", dtype=str)["Image Index"]
    assert sum(image_key(i) in training.images for i in shared) == 394


def test_an_altered_or_missing_list_is_refused_and_calibrate_carries_it(nih, nih_images, tmp_path):
    torch.manual_seed(0)
    names = [p.name for p in nih_images[:3]]
    table = pd.read_csv(nih / "labels.csv", dtype=str).set_index("Image Index")
    bundle = save_bundle(tmp_path / "b", build_model(ModelConfig(tabular_skip=True)), name="listed", version="t",
                         preprocessing=Preprocessing(image_size=64), encoding=PatientEncoding(),
                         thresholds={f: 0.5 for f in FINDINGS},
                         training_images=[(n, table.loc[n, "Patient ID"], "train") for n in names])
    assert load_bundle(bundle).manifest["training_images"]["images"] == 3

    images = nih_images[:40]
    studies = folder_of(tmp_path, images, "fit")
    proc = cli("calibrate", studies, "--labels", labels_of(nih, images, tmp_path / "fit.csv"), "--weights", bundle,
               "--out", tmp_path / "calibrated", *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("3 of 40 studies are images the model was trained or tuned on") == 1
    calibrated = load_bundle(tmp_path / "calibrated")  # the list came along, verified
    assert calibrated.manifest["provenance"]["training_overlap"]["in_sample_studies"] == 3
    assert (tmp_path / "calibrated" / TRAINING_IMAGES_FILE).read_bytes() == (bundle / TRAINING_IMAGES_FILE).read_bytes()

    with open(bundle / TRAINING_IMAGES_FILE, "a") as f:
        f.write("00099999_000.png,99999,train\n")
    with pytest.raises(BundleError, match="fails its checksum"):
        load_bundle(bundle)
    (bundle / TRAINING_IMAGES_FILE).unlink()
    with pytest.raises(BundleError, match="missing from the bundle"):
        load_bundle(bundle)


def test_overlap_counts_images_by_name_without_extension_and_other_images_of_training_patients():
    """A training image exported as DICOM is still that image; another image of a training
    patient is counted apart (patient IDs can coincide across sites); unknown patients never match."""
    training = TrainingImages(frozenset({"00000001_000", "00000002_000"}), frozenset({"1", "2", "7"}))
    files = ["a/00000001_000.dcm", "renamed.png", "00000007_003.png", "00000009_000.png", "00000010_000.png"]
    labelled_as = ["00000001_000.png", "00000002_000.png", "00000007_003.png", "00000009_000.png", "00000010_000.png"]
    record, in_sample = overlap(training, files, labelled_as, ["1", "2", "7", "9", ""])
    assert in_sample == [True, True, True, False, False]
    assert (record["images_in_training"], record["other_images_of_training_patients"],
            record["patients_in_training"], record["in_sample_studies"]) == (2, 1, 3, 3)
    assert record["message"].startswith("2 of 5 studies are images the model was trained or tuned on and 1 more is "
                                        "another image of its training patients")
    assert overlap(training, files[3:], labelled_as[3:], ["9", ""])[0]["message"] is None


def test_a_calibrated_bundle_evaluated_on_its_own_calibration_labels_says_so(nih, nih_images, tmp_path, small_bundle):
    """calibrate fits the calibration and thresholds on its studies but copies the base bundle's
    training list unchanged: evaluating the calibrated bundle on the very studies and labels it
    was calibrated on said nothing, and its ECE, Brier and operating point read as a test. A
    bundle that lists its calibration studies says it once, with them counted; one calibrated
    before the list existed still says it from the labels table's sha256."""
    import shutil

    from cxr_batch.bundle import write_manifest

    images = nih_images[:40]
    studies = folder_of(tmp_path, images, "fit")
    labels = labels_of(nih, images, tmp_path / "fit.csv")
    proc = cli("calibrate", studies, "--labels", labels, "--weights", small_bundle, "--out", tmp_path / "calibrated",
               *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "ev"
    proc = cli("evaluate", studies, "--labels", labels, "--weights", tmp_path / "calibrated", "--out", out,
               "--bootstrap", 0, *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((out / "evaluation.json").read_text())
    said = ev["calibrated_on"]
    assert said["same_labels"] and said["labels_sha256"] == load_bundle(tmp_path / "calibrated").manifest[
        "provenance"]["labels"]["sha256"]
    assert ev["calibration_overlap"]["in_sample_studies"] == 40 and ev["calibration_overlap"]["without_them"] is None
    assert proc.stderr.count("40 of 40 studies are images this bundle was calibrated on") == 1, proc.stderr[-2000:]
    assert "calibrated on these labels" not in proc.stderr  # said once, not twice
    text = " ".join(subprocess.run(["pdftotext", "-layout", str(out / "evaluation.pdf"), "-"], capture_output=True,
                                   text=True).stdout.split())
    assert "In-sample: 40 of 40 studies are images this bundle was calibrated on" in text
    assert "Every study here is in-sample" in text

    older = tmp_path / "calibrated_before_the_list"  # as calibrate made it before calibration_images.csv
    shutil.copytree(tmp_path / "calibrated", older)
    (older / CALIBRATION_IMAGES_FILE).unlink()
    manifest = read_manifest(older)
    del manifest["calibration_images"]
    write_manifest(older, manifest)
    out = tmp_path / "ev_older"
    proc = cli("evaluate", studies, "--labels", labels, "--weights", older, "--out", out, "--bootstrap", 0, *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((out / "evaluation.json").read_text())
    assert not ev["calibration_overlap"]["checked"]
    assert proc.stderr.count("was calibrated on these labels") == 1, proc.stderr[-2000:]
    assert proc.stderr.count("does not record the studies it was calibrated on") == 1
    text = subprocess.run(["pdftotext", "-layout", str(out / "evaluation.pdf"), "-"], capture_output=True,
                          text=True).stdout
    assert "calibrated on these labels" in " ".join(text.split())

    other = labels_of(nih, nih_images[40:60], tmp_path / "other.csv")  # a held-out set: nothing said
    out = tmp_path / "ev_other"
    proc = cli("evaluate", folder_of(tmp_path, nih_images[40:60], "other"), "--labels", other, "--weights",
               tmp_path / "calibrated", "--out", out, "--bootstrap", 0, *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((out / "evaluation.json").read_text())
    assert not ev["calibrated_on"]["same_labels"]
    assert ev["calibration_overlap"]["checked"] and ev["calibration_overlap"]["message"] is None
    assert "calibrated on" not in proc.stderr  # other patients too: no study of theirs was fitted on


@pytest.mark.parametrize("text", [
    b"image,patient_id,role\n00000001_000.png\n",  # a short row: patient_id None
    b"name,pid\n00000001_000.png,1\n",  # not the list's columns
    b"image,patient_id,role\n\xff\xfe.png,1,train\n",  # not UTF-8
])
def test_a_sealed_but_malformed_training_list_is_a_bundle_error_not_a_crash(small_bundle, tmp_path, text):
    """A list written by another tool (or by hand) and sealed into the manifest with its sha256:
    load_bundle, so every scan, watch and evaluate, died with AttributeError, KeyError or
    UnicodeDecodeError and a traceback instead of saying which file of the bundle is wrong."""
    from cxr_batch.bundle import sha256_file, write_manifest

    bundle = tmp_path / "hand_made"
    shutil.copytree(small_bundle, bundle)
    (bundle / TRAINING_IMAGES_FILE).write_bytes(text)
    manifest = read_manifest(bundle)
    manifest["training_images"] = {"file": TRAINING_IMAGES_FILE, "sha256": sha256_file(bundle / TRAINING_IMAGES_FILE)}
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=f"{TRAINING_IMAGES_FILE} is not a list of training images"):
        load_bundle(bundle)


def test_images_named_by_uid_are_compared_whole_and_extensions_in_any_case():
    """A bundle trained on a PACS export (files named by SOP Instance UID, no extension): the
    UID's last component was dropped as an 'extension', so every other instance of the series
    (…100.2 beside the trained …100.1) counted as a training image. An upper-case extension or
    a folder still matches."""
    training = TrainingImages(frozenset({image_key("1.2.826.0.1.3680043.100.1"), image_key("00000001_000.png")}),
                              frozenset())
    files = ["1.2.826.0.1.3680043.100.2", "1.2.826.0.1.3680043.100.1", "site/00000001_000.PNG", "x\\00000001_000.DCM"]
    _, in_sample = overlap(training, files, files, [""] * 4)
    assert in_sample == [False, True, True, True]


def test_monitor_says_why_studies_scored_before_the_list_was_added_have_no_reference(nih_images, tmp_path):
    """v3's bundle_sha256 changed when its training-image list was added (10420af2... ->
    e8447f67...), its weights did not: a daemon's results.csv then holds the same model under two
    hashes, and monitor gave the older rows no reference ('no reference for this model') without
    saying why or which bundle they probably are."""
    from cxr_batch.monitor import MonitorOptions, WindowSpec, run_monitor
    from cxr_batch.scan import ScanConfig, run_scan

    studies = folder_of(tmp_path, nih_images[:12], "stream")
    run_scan(studies, tmp_path / "results", ScanConfig(device="cpu", pdf=False, progress=False, workers=0))
    csv_path = tmp_path / "results" / "results.csv"
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    before = "10420af232e50742c4dc3d3971f5d0150a77f7868e4b0cbb123ed1c53d82866d"
    table.loc[:5, "weights_sha256"] = before  # scored before the upgrade
    table.to_csv(csv_path, index=False)
    report = run_monitor(tmp_path / "results", tmp_path / "m", None,
                         MonitorOptions(window=WindowSpec.parse("6"), min_studies=6))
    old = next(m for m in report["models"] if m["weights_sha256"] == before)
    said = " ".join(old["notes"])
    assert (f"no bundle here has the bundle_sha256 {before[:8]}... that scored these studies; {DEFAULT_BUNDLE} is "
            f"cxr-fpn@3.0 too") in said, said
    assert f"--reference {DEFAULT_BUNDLE}" in said


def test_two_studies_left_out_of_the_training_list_are_too_few_to_measure(nih, nih_images, tmp_path):
    """Four of six studies in-sample: evaluation.json and evaluation.pdf gave a mean AUROC, ECE
    and Brier "without them", of two studies, read as the model's figures on new studies."""
    torch.manual_seed(0)
    images = nih_images[:6]
    table = pd.read_csv(nih / "labels.csv", dtype=str).set_index("Image Index")
    trained = [p.name for p in images[:4]]
    bundle = save_bundle(tmp_path / "b", build_model(ModelConfig(tabular_skip=True)), name="listed", version="t",
                         preprocessing=Preprocessing(image_size=64), encoding=PatientEncoding(),
                         thresholds={f: 0.5 for f in FINDINGS},
                         training_images=[(n, table.loc[n, "Patient ID"], "train") for n in trained])
    _, ev, out = evaluate(tmp_path, nih, images, bundle, "two_left")
    rest = ev["training_overlap"]["without_them"]
    assert rest["n"] == 2 and "mean_auroc" not in rest and "ece" not in rest and "brier" not in rest, rest
    assert "too few to measure (needs 5 positive and 5 negative)" in rest["too_few"], rest
    text = " ".join(subprocess.run(["pdftotext", "-layout", str(out / "evaluation.pdf"), "-"], capture_output=True,
                                   text=True).stdout.split())
    said = text[text.index("Without them"):text.index("lists the in-sample files")]
    assert said.startswith("Without them (2 studies of 2 patients):") and "too few to measure" in said, said
    assert "AUROC" not in said and "ECE" not in said and "Brier" not in said, said


def test_the_studies_left_out_are_measured_from_as_many_patients_as_an_interval_needs():
    """The rule of the mean AUROC's interval (metrics.MIN_CI_PATIENTS positive and negative
    patients of the findings in the mean), applied to the out-of-sample rest."""
    import numpy as np

    from cxr_batch.evaluate import out_of_sample
    from cxr_batch.metrics import MIN_CI_PATIENTS

    def rest(positives, negatives):
        y = np.zeros((positives + negatives, len(FINDINGS)), dtype=int)
        y[:positives, 0] = 1
        p = np.linspace(0.1, 0.9, len(y))[:, None].repeat(len(FINDINGS), axis=1)
        return out_of_sample(y, p, np.array([f"P{i}" for i in range(len(y))]))

    enough = rest(MIN_CI_PATIENTS, MIN_CI_PATIENTS)
    assert enough["n"] == 2 * MIN_CI_PATIENTS and enough["mean_auroc"] is not None and "too_few" not in enough
    short = rest(MIN_CI_PATIENTS - 1, 20)
    assert "mean_auroc" not in short and short["too_few"].startswith(f"{MIN_CI_PATIENTS - 1} positive patient(s)")
    assert "too_few" in rest(0, 20)  # no finding with both labels: nothing measured either


def test_a_calibrated_bundle_names_its_calibration_studies_and_evaluate_finds_them_in_another_table(
        nih, nih_images, tmp_path, small_bundle):
    """calibrate fitted offsets and thresholds on its studies but recorded only the labels file's
    sha256: evaluating the calibrated bundle on some of those studies under a new labels table (a
    subset, or the same studies beside new ones) gave in-sample ECE, Brier and operating points
    with no warning. The bundle now lists them, sealed, and evaluate names them apart from
    training images, with the figures without them."""
    fitted = nih_images[:40]
    proc = cli("calibrate", folder_of(tmp_path, fitted, "fit"), "--labels",
               labels_of(nih, fitted, tmp_path / "fit.csv"), "--weights", small_bundle, "--out",
               tmp_path / "calibrated", *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calibrated = load_bundle(tmp_path / "calibrated")
    table = pd.read_csv(nih / "labels.csv", dtype=str).set_index("Image Index")
    with open(tmp_path / "calibrated" / CALIBRATION_IMAGES_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["patient_id"], r["role"]) for r in rows] == \
        [(p.name, table.loc[p.name, "Patient ID"], "calibration") for p in fitted]
    assert calibrated.manifest["calibration_images"]["images"] == 40

    mixed = fitted[20:] + nih_images[40:60]  # half of them fitted on, in a table of its own (another sha256)
    calibration_patients = {table.loc[p.name, "Patient ID"] for p in fitted}
    others = sum(table.loc[p.name, "Patient ID"] in calibration_patients for p in nih_images[40:60])
    stderr, ev, out = evaluate(tmp_path, nih, mixed, tmp_path / "calibrated", "mixed")
    assert not ev["calibrated_on"]["same_labels"]
    said = ev["calibration_overlap"]
    assert said["checked"] and said["images_in_calibration"] == 20
    assert said["other_images_of_calibration_patients"] == others
    assert said["in_sample_studies"] == 20 + others and len(said["in_sample_files"]) == 20 + others
    assert said["without_them"]["n"] == 40 - 20 - others
    assert stderr.count("20 of 40 studies are images this bundle was calibrated on") == 1, stderr[-2000:]
    assert not ev["training_overlap"]["checked"]  # small_bundle lists no training images: said apart
    text = " ".join(subprocess.run(["pdftotext", "-layout", str(out / "evaluation.pdf"), "-"], capture_output=True,
                                   text=True).stdout.split())
    assert "In-sample: 20 of 40 studies are images this bundle was calibrated on" in text
    assert f"Without them ({40 - 20 - others} studies" in text

    with open(tmp_path / "calibrated" / CALIBRATION_IMAGES_FILE, "a") as f:
        f.write("00099999_000.png,99999,calibration\n")
    with pytest.raises(BundleError, match="fails its checksum"):
        load_bundle(tmp_path / "calibrated")


@pytest.mark.skipif(shutil.which("img2dcm") is None, reason="dcmtk's img2dcm is not installed")
def test_a_calibration_study_copied_under_another_name_or_made_dicom_is_still_found(
        nih, nih_images, tmp_path, small_bundle):
    """A calibration study copied under a new name (an accession number), or converted to DICOM
    with the same pixels, in a labels table without Patient IDs matched no name and no patient:
    its in-sample figures read as a test. The calibration list keeps each study's decoded
    pixels' hash, and evaluate compares it."""
    from PIL import Image

    fitted = nih_images[:12]
    proc = cli("calibrate", folder_of(tmp_path, fitted, "fit"), "--labels",
               labels_of(nih, fitted, tmp_path / "fit.csv"), "--weights", small_bundle, "--out",
               tmp_path / "calibrated", *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(nih / "labels.csv", dtype=str).set_index("Image Index")
    studies = tmp_path / "site"
    studies.mkdir()
    renamed = {}
    for k, p in enumerate(fitted[:2]):  # the same file under an accession number
        shutil.copy(p, studies / f"ACC{k:04d}.png")
        renamed[f"ACC{k:04d}.png"] = p.name
    bmp = tmp_path / "converted.bmp"  # img2dcm reads BMP, not PNG: the same 8-bit grey pixels
    Image.open(fitted[2]).convert("L").save(bmp)
    subprocess.run(["img2dcm", "-i", "BMP", str(bmp), str(studies / "1.2.826.0.1.3680043.8.498.1.dcm")], check=True)
    renamed["1.2.826.0.1.3680043.8.498.1.dcm"] = fitted[2].name
    for p in nih_images[40:43]:  # studies it was not calibrated on
        shutil.copy(p, studies / p.name)
        renamed[p.name] = p.name
    labels = tmp_path / "site.csv"  # no Patient ID: no patient to match
    pd.DataFrame({"Image Index": list(renamed), "Finding Labels": [table.loc[n, "Finding Labels"] for n in
                                                                     renamed.values()]}).to_csv(labels, index=False)
    out = tmp_path / "ev"
    proc = cli("evaluate", studies, "--labels", labels, "--weights", tmp_path / "calibrated", "--out", out,
               "--bootstrap", 0, *CPU)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = json.loads((out / "evaluation.json").read_text())["calibration_overlap"]
    assert said["images_in_calibration"] == 3 and said["renamed_copies"] == 3, said
    assert sorted(said["in_sample_files"]) == sorted(list(renamed)[:3])
    assert said["without_them"]["n"] == 3
    assert proc.stderr.count("3 of 6 studies are images this bundle was calibrated on (3 under another name or "
                             "format, matched by their pixels)") == 1, proc.stderr[-2000:]


def test_a_calibration_list_is_written_and_read_back_as_an_image_list(tmp_path):
    """write_training_images/read_training_images served the calibration list too (kind=CALIBRATION)
    under a name that said training: the functions say image list, whichever kind it is."""
    from cxr_batch.provenance import CALIBRATION, read_image_list, write_image_list

    rows = [("00000001_000.png", " 7 ", "calibration", "ab" * 32), ("00000002_000.png", "", "calibration", "")]
    record = write_image_list(tmp_path, rows, CALIBRATION)
    assert record["file"] == CALIBRATION_IMAGES_FILE and (tmp_path / CALIBRATION_IMAGES_FILE).is_file()
    assert not (tmp_path / TRAINING_IMAGES_FILE).exists()
    listed_images = read_image_list(tmp_path, {"calibration_images": record}, CALIBRATION)
    assert listed_images == TrainingImages(frozenset({"00000001_000", "00000002_000"}), frozenset({"7"}),
                                           frozenset({"ab" * 32}))
    assert read_image_list(tmp_path, {"calibration_images": record}) is None  # no training list recorded


def test_evaluate_decodes_each_study_once_and_still_finds_a_renamed_or_converted_calibration_study(
        nih, nih_images, tmp_path, small_bundle, monkeypatch):
    """`evaluate` with a bundle whose list has pixels_sha256 decoded every study a second time,
    after its scan, to hash its pixels: twice the decoding for a check the scan's own decode
    could answer. The scan hands back each study's pixels' hash; a renamed copy and a DICOM
    conversion of a calibration study are still found, and a JPEG's copy too, though the scan
    decoded it smaller than stored (all the model needs): that one alone is read again."""
    from PIL import Image

    from tests.dicomgen import grey, write

    from .test_evaluate_calibrate import cli_here

    fitted = nih_images[:12]
    fit = folder_of(tmp_path, fitted, "fit")
    jpeg = fit / fitted[3].with_suffix(".jpg").name  # a calibration study that is a JPEG (its labels' row: by stem)
    Image.open(fitted[3]).convert("L").save(jpeg, quality=95)
    (fit / fitted[3].name).unlink()
    code, stderr = cli_here("calibrate", fit, "--labels", labels_of(nih, fitted, tmp_path / "fit.csv"), "--weights",
                            small_bundle, "--out", tmp_path / "calibrated", *CPU)
    assert code == 0, stderr[-2000:]
    table = pd.read_csv(nih / "labels.csv", dtype=str).set_index("Image Index")
    studies = tmp_path / "site"
    studies.mkdir()
    renamed = {}
    for k, p in enumerate(fitted[:2]):  # the same file under an accession number
        shutil.copy(p, studies / f"ACC{k:04d}.png")
        renamed[f"ACC{k:04d}.png"] = p.name
    write(studies / "converted.dcm", grey(fitted[2]))  # the same 8-bit grey pixels as DICOM
    renamed["converted.dcm"] = fitted[2].name
    shutil.copy(jpeg, studies / "ACC0003.jpg")
    renamed["ACC0003.jpg"] = fitted[3].name
    for p in nih_images[40:43]:  # studies it was not calibrated on
        shutil.copy(p, studies / p.name)
        renamed[p.name] = p.name
    labels = tmp_path / "site.csv"  # no Patient ID: no patient to match
    pd.DataFrame({"Image Index": list(renamed), "Finding Labels": [table.loc[n, "Finding Labels"] for n in
                                                                     renamed.values()]}).to_csv(labels, index=False)

    decoded = count_decodes(monkeypatch)
    out = tmp_path / "ev"
    code, stderr = cli_here("evaluate", studies, "--labels", labels, "--weights", tmp_path / "calibrated", "--out",
                            out, "--bootstrap", 0, *CPU)  # --workers 0: decoded in this process, where they are counted
    assert code == 0, stderr[-2000:]
    assert sorted(decoded) == sorted([*renamed, "ACC0003.jpg"]), decoded  # the JPEG: smaller, then as stored
    said = json.loads((out / "evaluation.json").read_text())["calibration_overlap"]
    assert said["images_in_calibration"] == 4 and said["renamed_copies"] == 4, said
    assert sorted(said["in_sample_files"]) == sorted(list(renamed)[:4])


def test_calibrate_decodes_each_study_once_and_lists_the_pixels_of_each(nih, nih_images, tmp_path, small_bundle,
                                                                       monkeypatch):
    """`calibrate` decoded every study a second time after scoring it, to hash its pixels for
    calibration_images.csv. The scoring hands back each study's pixels' hash; a JPEG it decoded
    smaller than stored (all the model needs) alone is read again, and the list holds for
    every study the hash of its pixels as stored."""
    from PIL import Image

    from cxr_batch.provenance import pixel_key

    from .test_evaluate_calibrate import cli_here

    fitted = nih_images[:12]
    fit = folder_of(tmp_path, fitted, "fit")
    jpeg = fit / fitted[3].with_suffix(".jpg").name  # its labels' row: by the name without its extension
    Image.open(fitted[3]).convert("L").save(jpeg, quality=95)
    (fit / fitted[3].name).unlink()
    decoded = count_decodes(monkeypatch)
    code, stderr = cli_here("calibrate", fit, "--labels", labels_of(nih, fitted, tmp_path / "fit.csv"), "--weights",
                            small_bundle, "--out", tmp_path / "calibrated", *CPU)  # --workers 0: counted here
    assert code == 0, stderr[-2000:]
    files = sorted(p.name for p in fit.iterdir())
    assert sorted(decoded) == sorted([*files, jpeg.name]), decoded  # the JPEG: smaller, then as stored
    monkeypatch.undo()
    with open(tmp_path / "calibrated" / CALIBRATION_IMAGES_FILE, newline="") as f:
        listed_pixels = {r["image"]: r["pixels_sha256"] for r in csv.DictReader(f)}
    assert listed_pixels == {p.name: pixel_key(jpeg if p == fitted[3] else p) for p in fitted}


def count_decodes(monkeypatch) -> list[str]:
    """The name of each file the PNG/JPEG and DICOM decoders are given, in order, as they decode
    (they are given /proc/self/fd/N, the open file: its real path names it)."""
    import os

    import cxr_batch.dicom
    import cxr_batch.readers

    decoded = []

    def counted(decoder):
        def decode(path, *args, **kwargs):
            decoded.append(os.path.basename(os.path.realpath(path)))
            return decoder(path, *args, **kwargs)
        return decode

    monkeypatch.setattr(cxr_batch.readers, "read_pil_study", counted(cxr_batch.readers.read_pil_study))
    monkeypatch.setattr(cxr_batch.dicom, "read_dicom", counted(cxr_batch.dicom.read_dicom))
    return decoded
