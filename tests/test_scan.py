"""A scan of real images: schema, patient data, row states, batching invariance, exit codes."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cxr_batch.findings import FINDINGS
from cxr_batch.record import COLUMNS
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan


def scan(studies, out, bundle, **kw):
    kw = {"batch_size": 4, "workers": 0, "pdf": False, **kw}
    if "metadata" in kw:
        kw["metadata"] = str(kw["metadata"])
    return run_scan(studies, out, ScanConfig(weights=str(bundle), device="cpu", progress=False, **kw))


def test_scan_real_images_with_nih_metadata(studies, tmp_path, small_bundle, nih):
    summary = scan(studies, tmp_path / "out", small_bundle, metadata=nih / "labels.csv")
    rows = read_results(tmp_path / "out" / "results.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert summary.exit_code == 0 and summary.counts["ok"] == 6
    truth = pd.read_csv(nih / "labels.csv").set_index("Image Index")
    for row in rows:
        t = truth.loc[row["file"]]
        assert row["status"] == "ok" and row["reason"] == ""
        assert float(row["age"]) == t["Patient Age"] and row["sex"] == t["Patient Gender"]
        assert row["view"] == t["View Position"] and row["patient_id"] == str(t["Patient ID"])
        assert row["age_source"] == row["sex_source"] == row["view_source"] == "metadata"
        probs = np.array([float(row[f"p_{f}"]) for f in FINDINGS])
        assert np.all((probs >= 0) & (probs <= 1))
        flags = [int(row[f"flag_{f}"]) for f in FINDINGS]
        assert flags == [int(p >= 0.5) for p in probs]  # the bundle's thresholds are all 0.5
        assert row["findings"] == ";".join(f for f, on in zip(FINDINGS, flags) if on)
        expected = "urgent" if row["flag_Pneumothorax"] == "1" else ("abnormal" if any(flags) else "normal")
        assert row["priority"] == expected
        assert row["model"] == "small@test" and len(row["weights_sha256"]) == 64
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["counts"] == {"ok": 6}


def test_unknown_patient_data_are_reported_not_zero(studies, tmp_path, small_bundle):
    scan(studies, tmp_path / "out", small_bundle)
    row = read_results(tmp_path / "out" / "results.csv")[0]
    assert row["age"] == "" and row["age_source"] == "unknown"
    assert row["sex_source"] == row["view_source"] == "unknown"


def test_same_image_same_probabilities_alone_and_in_a_batch(studies, tmp_path, small_bundle):
    alone = tmp_path / "alone"
    alone.mkdir()
    first = sorted(studies.iterdir())[0]
    shutil.copy(first, alone / first.name)
    # float32 on every CPU: the comparison is of batching, not of precision (auto is bf16 where
    # the CPU has it, and bf16 kernels may pick other blockings for other batch sizes)
    scan(alone, tmp_path / "o1", small_bundle, batch_size=1, precision="fp32")
    scan(studies, tmp_path / "o2", small_bundle, batch_size=6, workers=1, precision="fp32")
    a = read_results(tmp_path / "o1" / "results.csv")[0]
    b = next(r for r in read_results(tmp_path / "o2" / "results.csv") if r["file"] == first.name)
    pa = np.array([float(a[f"p_{f}"]) for f in FINDINGS])
    pb = np.array([float(b[f"p_{f}"]) for f in FINDINGS])
    assert np.abs(pa - pb).max() < 1e-4  # float32 sums in another order; 6 decimals written


def test_bad_files_get_error_rows_and_the_scan_goes_on(studies, tmp_path, small_bundle):
    (studies / "empty.png").write_bytes(b"")
    (studies / "random.png").write_bytes(np.random.default_rng(0).bytes(5000))
    good = sorted(studies.glob("0*.png"))[0].read_bytes()
    (studies / "truncated.png").write_bytes(good[: len(good) // 3])
    (studies / "readme.txt").write_text("not an image")
    (studies / "sub").mkdir()
    shutil.copy(sorted(studies.glob("0*.png"))[1], studies / "sub" / "nested.png")
    summary = scan(studies, tmp_path / "out", small_bundle)
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert rows["empty.png"]["status"] == "error" and "empty" in rows["empty.png"]["reason"]
    assert rows["random.png"]["status"] == "error" and "unrecognised content" in rows["random.png"]["reason"]
    assert rows["truncated.png"]["status"] == "error" and "truncated" in rows["truncated.png"]["reason"]
    assert rows["readme.txt"]["status"] == "skipped"
    assert rows["sub/nested.png"]["status"] == "ok"
    assert rows["empty.png"]["p_Hernia"] == ""
    assert summary.exit_code == 3 and summary.counts["ok"] == 7


def test_lateral_view_from_sidecar_is_skipped(studies, tmp_path, small_bundle):
    first = sorted(studies.glob("*.png"))[0]
    first.with_suffix(".json").write_text(json.dumps({"ViewPosition": "LL", "PatientAge": "50"}))
    scan(studies, tmp_path / "out", small_bundle)
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert rows[first.name]["status"] == "skipped" and "lateral" in rows[first.name]["reason"]
    assert first.with_suffix(".json").name not in rows


def test_a_sidecar_age_too_large_for_a_number_is_unknown_not_the_end_of_the_scan(studies, tmp_path, small_bundle):
    """JSON has integers of any size: a 401-digit PatientAge (float() overflows) is an implausible
    age for its study, not an OverflowError that ended the whole scan (exit 1, no results)."""
    first = sorted(studies.glob("*.png"))[0]
    first.with_suffix(".json").write_text('{"PatientAge": 1' + "0" * 400 + ', "PatientSex": "F"}')
    summary = scan(studies, tmp_path / "out", small_bundle)
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert summary.exit_code == 0 and summary.counts["ok"] == 6
    row = rows[first.name]
    assert row["age"] == "" and row["age_source"] == "unknown" and row["sex"] == "F"
    assert "sidecar implausible age" in row["notes"]

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True)


def test_cli_exit_codes(studies, tmp_path, small_bundle):
    ok = run_cli("scan", studies, "--out", tmp_path / "o", "--weights", small_bundle, "--device", "cpu", "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert "6 scored" in ok.stderr
    usage = run_cli("scan", studies, "--batch-size", "0", "--out", tmp_path / "o")
    assert usage.returncode == 2
    shutil.copytree(small_bundle, tmp_path / "bad")
    with open(tmp_path / "bad" / "model.pt", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    bad = run_cli("scan", studies, "--out", tmp_path / "o2", "--weights", tmp_path / "bad", "--device", "cpu")
    assert bad.returncode == 1 and "checksum" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "o2" / "results.csv").exists()
    nodev = run_cli("scan", studies, "--out", tmp_path / "o3", "--weights", small_bundle, "--device", "cuda:7")
    assert nodev.returncode == 2 and "cuda" in nodev.stderr.lower()


def test_an_empty_folder_is_a_warning_with_its_own_exit_code(tmp_path, small_bundle):
    empty = tmp_path / "share"
    empty.mkdir()
    (empty / "upload.part").write_bytes(b"in progress")  # not a study yet: the folder is still empty
    proc = run_cli("scan", empty, "--out", tmp_path / "o", "--weights", small_bundle, "--device", "cpu")
    assert proc.returncode == 4, proc.stderr
    assert "no files under" in proc.stderr and "nothing scored" in proc.stderr
    assert read_results(tmp_path / "o" / "results.csv") == []
    assert json.loads((tmp_path / "o" / "run.json").read_text())["files_found"] == 0


def test_a_shard_with_no_files_of_a_full_folder_is_no_error(studies, tmp_path, small_bundle):
    summary = scan(studies, tmp_path / "o", small_bundle, shard=(7, 8))  # 6 files: shard 7 of 8 gets none
    assert summary.exit_code == 0 and summary.files_found == 6 and sum(summary.counts.values()) == 0


def test_studies_scored_without_patient_data_are_counted(studies, tmp_path, small_bundle, nih):
    first = sorted(studies.glob("*.png"))[0]
    first.with_suffix(".json").write_text(json.dumps({"PatientSex": "F"}))  # one value is patient data enough
    summary = scan(studies, tmp_path / "o", small_bundle)
    assert summary.without_patient_data == 5 and "5 without patient data" in summary.line()
    assert json.loads((tmp_path / "o" / "run.json").read_text())["scored_without_patient_data"] == 5
    assert scan(studies, tmp_path / "m", small_bundle, metadata=nih / "labels.csv").without_patient_data == 0


def test_weights_without_validation_evidence_are_warned_about(studies, tmp_path, small_bundle):
    proc = run_cli("scan", studies, "--out", tmp_path / "o", "--weights", small_bundle, "--device", "cpu",
                   "--no-pdf", "--quiet")
    assert proc.returncode == 0
    assert "have no validation evidence (no validation metrics in its manifest)" in proc.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["validation_evidence_problem"] == "no validation metrics in its manifest"


def test_a_training_run_folder_as_weights_points_at_its_bundle(studies, tmp_path, small_bundle):
    shutil.copytree(small_bundle, tmp_path / "run" / "bundle")
    proc = run_cli("scan", studies, "--out", tmp_path / "o", "--weights", tmp_path / "run", "--device", "cpu")
    assert proc.returncode == 1 and f"use --weights {tmp_path / 'run' / 'bundle'}" in proc.stderr


def test_the_closing_line_names_the_low_bucket_as_the_reports_do(studies, tmp_path, small_bundle):
    """The closing line said '6 normal' where every report and the worklist say 'low probability
    of any finding' (a bundle with a P(any) cutoff) or 'no finding flagged' (one without): the
    same studies must not be a clean bill on the terminal and a hedge on paper."""
    from cxr_batch.bundle import read_manifest, write_manifest

    def bundle(name, triage=None):
        folder = tmp_path / name
        shutil.copytree(small_bundle, folder)
        manifest = read_manifest(folder)
        manifest["thresholds"] = {f: 0.999 for f in FINDINGS}  # nothing flagged by the random weights
        if triage:
            manifest["triage"] = triage
        write_manifest(folder, manifest)
        return folder

    without = scan(studies, tmp_path / "o", bundle("plain"), pdf=True)
    assert "6 no finding flagged" in without.line() and " normal" not in without.line()
    worklist = subprocess.run(["pdftotext", str(without.worklist), "-"], capture_output=True, text=True).stdout
    assert "6 with no finding flagged" in " ".join(worklist.split())
    # P(any) = sigmoid(-20) for every study: all below the cutoff
    cut = bundle("cut", {"any_finding": {"weights": [0.0] * len(FINDINGS), "bias": -20.0, "normal_below": 0.4}})
    low = scan(studies, tmp_path / "c", cut)
    assert "6 low probability of any finding" in low.line() and " normal" not in low.line()


def test_the_closing_lines_count_one_of_a_thing_in_the_singular(tmp_path):
    from collections import Counter

    from cxr_batch.journal import describe
    from cxr_batch.scan import ScanSummary

    one = ScanSummary(tmp_path / "results.csv", counts=Counter(ok=1, skipped=0, error=0), files_found=1,
                      priorities=Counter(urgent=1), reports_failed=1, seconds=1.0)
    assert one.line().startswith("1 file: 1 scored (1 urgent, ") and "1 report could not be written" in one.line()
    stopped = ScanSummary(tmp_path / "results.csv", counts=Counter(ok=1), not_scored=1, stopped_by="SIGINT")
    assert "the 1 row written so far (1 scored)" in stopped.line() and "1 file not read yet" in stopped.line()
    (tmp_path / "run.json").write_text(json.dumps({"complete": False, "stopped_by": "SIGINT", "files_not_scored": 1}))
    assert describe(tmp_path, 1) == "an unfinished scan (SIGINT: 1 study scored, 1 file not scored yet)"
    (tmp_path / "run.json").write_text(json.dumps({"complete": True, "counts": {"ok": 1}}))
    assert describe(tmp_path, 1) == "the results of an earlier scan (1 row)"


def test_an_image_in_a_format_not_read_is_named_with_what_to_do(tmp_path, nih_images):
    # a TIFF from a film digitiser, a BMP, a PDF requisition in the export all read "unrecognised
    # content: not a PNG, JPEG or DICOM file": the operator could not tell a format from a broken file
    from PIL import Image

    from cxr_batch.readers import ReadError, read_study

    grey = Image.open(nih_images[0])
    grey.save(tmp_path / "film.tif")
    grey.save(tmp_path / "film.bmp")
    (tmp_path / "request.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n" + bytes(range(256)) * 4)
    for name, said in (("film.tif", "a TIFF image"), ("film.bmp", "a BMP image"), ("request.pdf", "a PDF document")):
        with pytest.raises(ReadError) as e:
            read_study(tmp_path / name)
        assert str(e.value).startswith(f"{said}: only PNG, JPEG and DICOM files are read"), str(e.value)


def test_the_summary_of_one_file_says_one_file(tmp_path, small_bundle):
    # "1 files: 0 scored (...), 1 skipped"
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    summary = scan(folder, tmp_path / "out", small_bundle)
    assert summary.line().startswith("1 file: 0 scored"), summary.line()


def test_a_png_folder_scanned_without_metadata_is_told_how_to_give_patient_data(studies, tmp_path, small_bundle,
                                                                                  caplog):
    # a newcomer's first scan of NIH PNGs without --metadata: the warning must say what to add
    with caplog.at_level("WARNING", logger="cxr_batch"):
        summary = scan(studies, tmp_path / "o", small_bundle)
    assert summary.exit_code == 0 and summary.without_patient_data == 6
    said = [r.getMessage() for r in caplog.records if "without any patient data" in r.getMessage()]
    assert len(said) == 1 and "--metadata" in said[0] and "sidecar" in said[0], said
