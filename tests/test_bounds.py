"""Bounded input, sanitised output: crafted files cannot exhaust the machine, and nothing written
can hurt whoever opens it (a spreadsheet, a file browser, a log reader)."""

import io
import json
import math
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless,
                         generate_uid)

from cxr_batch.bundle import BundleError, load_bundle, manifest_sha256
from cxr_batch.codestream import first_fragment, j2k_frame, jpeg_frame
from cxr_batch.dicom_build import radiograph, save
from cxr_batch.image_stats import COLUMNS as IMAGE_COLUMNS
from cxr_batch.readers import read_study
from cxr_batch.record import COLUMNS
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan
from cxr_batch.study import ReadError, ScoringRules

from .conftest import REPO
from .dicomgen import grey, write


# ---------------------------------------------------------------- crafting
def jpeg_bytes(side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def patch_jpeg_size(data: bytes, rows: int, cols: int, marker: int = 0xC0) -> bytes:
    pos = data.index(bytes([0xFF, marker]))
    return data[:pos + 5] + struct.pack(">HH", rows, cols) + data[pos + 9:]


def dicom_with_fragment(path: Path, fragment: bytes, transfer_syntax, rows=256, cols=256, bits=8) -> Path:
    ds = radiograph(np.zeros((rows, cols), np.uint8 if bits == 8 else np.uint16), PatientID="LIAR")
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def compressed_fragment(tmp: Path, transfer_syntax) -> bytes:
    src = save(radiograph(np.tile(np.arange(64, dtype=np.uint8), (64, 1))), tmp / "src.dcm", transfer_syntax)
    return first_fragment(pydicom.dcmread(src).PixelData, limit=1 << 30)


def deflate_bomb(path: Path, inflated: int = 300 << 20) -> Path:
    """A Deflated Explicit VR file of a few hundred KB whose data set inflates to ``inflated``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = io.BytesIO()
    for tag, vr, value in ((0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.1.1\x00"), (0x00080060, b"CS", b"DX"),
                           (0x00280010, b"US", struct.pack("<H", 64)), (0x00280011, b"US", struct.pack("<H", 64))):
        body.write(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value)
    body.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00" + struct.pack("<I", inflated))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(compressor.compress(body.getvalue()))
        zeros = b"\x00" * (1 << 20)
        for _ in range(inflated >> 20):
            f.write(compressor.compress(zeros))
        f.write(compressor.flush())
    return path


# ---------------------------------------------------------------- codestream sizes
def test_codestream_headers_read_back():
    assert (jpeg_frame(jpeg_bytes(16)).rows, jpeg_frame(jpeg_bytes(16)).columns) == (16, 16)
    lie = patch_jpeg_size(jpeg_bytes(16), 65000, 65000)
    assert jpeg_frame(lie).rows == 65000


@pytest.mark.parametrize("syntax, marker", [(JPEGBaseline8Bit, 0xC0), (JPEGLSLossless, 0xF7), (JPEG2000Lossless, None)])
def test_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path, syntax, marker):
    if syntax == JPEGBaseline8Bit:
        fragment = patch_jpeg_size(jpeg_bytes(16), 65000, 65000)
    else:
        fragment = compressed_fragment(tmp_path, syntax)
        if marker is not None:
            fragment = patch_jpeg_size(fragment, 65000, 65000, marker)
        else:  # J2K SIZ: Xsiz and Ysiz
            assert j2k_frame(fragment).rows == 64
            fragment = fragment[:8] + struct.pack(">II", 65000, 65000) + fragment[16:]
    path = dicom_with_fragment(tmp_path / "lie.dcm", fragment, syntax, rows=64, cols=64)
    with pytest.raises(ReadError, match="65000 x 65000"):
        read_study(path, ScoringRules())


def test_codestream_that_disagrees_within_the_limit_is_refused_too(tmp_path):
    fragment = patch_jpeg_size(jpeg_bytes(16), 512, 512)
    path = dicom_with_fragment(tmp_path / "lie.dcm", fragment, JPEGBaseline8Bit, rows=256, cols=256)
    with pytest.raises(ReadError, match="header says 256 x 256"):
        read_study(path, ScoringRules())


def test_deflate_bomb_is_refused_without_inflating_it(tmp_path):
    path = deflate_bomb(tmp_path / "bomb.dcm")
    assert path.stat().st_size < 2 << 20
    with pytest.raises(ReadError, match="deflate bomb"):
        read_study(path, ScoringRules())


def test_a_normal_deflated_file_still_reads(tmp_path, nih_images):
    src = grey(nih_images[0])
    study = read_study(write(tmp_path / "d.dcm", src, DeflatedExplicitVRLittleEndian), ScoringRules())
    assert np.array_equal(study.grey, src)


# ---------------------------------------------------------------- a hostile folder, scanned as a user would
@pytest.fixture()
def hostile(tmp_path, nih_images):
    d = tmp_path / "hostile"
    d.mkdir()
    write(d / "formula.dcm", grey(nih_images[0]), PatientID='=HYPERLINK("http://evil.example","click")',
          AccessionNumber="+123", StudyDate="-1", PatientName="@SUM(A1)", InstitutionName="\t=1+1")
    write(d / "tabbed.dcm", grey(nih_images[1]), PatientID="\t-2+3", AccessionNumber="\r=cmd")
    write(d / "poison.dcm", grey(nih_images[2]), PatientID="P" * 10_000, PatientName="N" * 10_000)
    dicom_with_fragment(d / "liar.dcm", patch_jpeg_size(jpeg_bytes(16), 65000, 65000), JPEGBaseline8Bit)
    deflate_bomb(d / "bomb.dcm")
    with open(d / "zeros.dcm", "wb") as f:
        f.truncate(64 << 20)
    (d / "random.bin").write_bytes(np.random.default_rng(0).bytes(5000))
    (d / "random.dcm").write_bytes(np.random.default_rng(0).bytes(5000))
    good = write(d / "good.dcm", grey(nih_images[3]), PatientID="GOOD").read_bytes()
    (d / "truncated.dcm").write_bytes(good[: len(good) // 2])
    return d


def test_hostile_folder_scan(hostile, tmp_path, small_bundle):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(hostile), "--out", str(out), "--weights",
                           str(small_bundle), "--device", "cpu", "--no-heatmaps"], capture_output=True, text=True,
                          timeout=600, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    rows = {r["file"]: r for r in read_results(out / "results.csv")}
    assert set(rows) == {p.name for p in hostile.iterdir()}
    for name in ("formula.dcm", "tabbed.dcm", "poison.dcm", "good.dcm"):
        assert rows[name]["status"] == "ok" and (out / "reports" / rows[name]["report"]).is_file()
    assert "65000 x 65000" in rows["liar.dcm"]["reason"]
    assert "deflate bomb" in rows["bomb.dcm"]["reason"]
    assert rows["random.bin"]["status"] == rows["random.dcm"]["status"] == rows["zeros.dcm"]["status"] == "error"
    assert rows["poison.dcm"]["patient_id"] == "P" * 64
    # no cell a spreadsheet would run, no control characters, no library jargon or paths
    for row in rows.values():
        for column in COLUMNS:
            value = row[column]
            assert not value.startswith(("=", "+", "@", "\t", "\r")), (column, value)
            # numbers cxr-batch writes may be negative (a spreadsheet reads "-0.09" as a number)
            assert not (value.startswith("-") and column not in ("triage_score", *IMAGE_COLUMNS)), (column, value)
            assert not re.search(r"[\x00-\x1f]", value)
        assert str(hostile) not in row["reason"] and "(FFFE" not in row["reason"]
    assert rows["formula.dcm"]["patient_id"].startswith("'=HYPERLINK")
    # permissions under umask 022, and no patient identifiers in file names or logs
    for path in [out, out / "reports"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o750, path
    for path in [out / "results.csv", out / "run.json", *(out / "reports").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    names = " ".join(p.name for p in (out / "reports").iterdir())
    assert "GOOD" not in names and "PPPP" not in names
    assert "GOOD" not in proc.stderr and "NNNN" not in proc.stderr


def test_links_and_special_files(tmp_path, nih_images, small_bundle):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    write(outside / "secret.dcm", grey(nih_images[0]), PatientID="OUTSIDE")
    write(root / "real.dcm", grey(nih_images[1]), PatientID="INSIDE")
    os.symlink("/etc", root / "etc")
    os.symlink(outside / "secret.dcm", root / "secret_link.dcm")
    os.symlink(root / "real.dcm", root / "again.dcm")
    os.symlink("/dev/zero", root / "zero.dcm")
    os.mkfifo(root / "pipe.dcm")
    cfg = ScanConfig(weights=str(small_bundle), device="cpu", pdf=False, progress=False, workers=1)
    run_scan(root, tmp_path / "out", cfg)
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert set(rows) == {"real.dcm", "etc", "secret_link.dcm", "again.dcm", "zero.dcm", "pipe.dcm"}
    assert rows["real.dcm"]["status"] == "ok"
    for name in ("etc", "secret_link.dcm", "zero.dcm"):
        assert rows[name]["status"] == "skipped" and "outside the scanned folder" in rows[name]["reason"]
    assert rows["again.dcm"]["status"] == "skipped" and "real.dcm" in rows["again.dcm"]["reason"]
    assert rows["pipe.dcm"]["status"] == "error" and "not a regular file" in rows["pipe.dcm"]["reason"]
    followed = ScanConfig(weights=str(small_bundle), device="cpu", pdf=False, progress=False, follow_links=True)
    run_scan(root, tmp_path / "out2", ScanConfig(**{**followed.__dict__, "scoring": ScoringRules()}))
    rows = {r["file"]: r for r in read_results(tmp_path / "out2" / "results.csv")}
    assert rows["secret_link.dcm"]["status"] == "ok" and rows["zero.dcm"]["status"] == "error"


# ---------------------------------------------------------------- the bundle is one thing
@pytest.fixture()
def bundle_copy(tmp_path, small_bundle):
    return Path(shutil.copytree(small_bundle, tmp_path / "b"))


def edit(folder: Path, change, reseal: bool) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    if reseal:
        manifest["bundle_sha256"] = manifest_sha256(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_edited_manifest_is_refused(bundle_copy):
    good = load_bundle(bundle_copy)
    edit(bundle_copy, lambda m: m["thresholds"].update(Pneumothorax=0.05), reseal=False)
    with pytest.raises(BundleError, match="fails its checksum"):
        load_bundle(bundle_copy)
    edit(bundle_copy, lambda m: None, reseal=True)  # resealed: a different bundle, a different hash
    assert load_bundle(bundle_copy).sha256 != good.sha256


@pytest.mark.parametrize("key, value, message", [
    ("metrics", 5, "'metrics' must be a table"), ("training", "x", "'training' must be a table"),
    ("intended_use", 3, "'intended_use' must be a string"), ("patient_encoding", "x", "'patient_encoding' must be"),
    ("preprocessing", [64], "'preprocessing' must be"), ("model_config", "x", "'model_config' must be"),
    ("calibration", "x", "'calibration' must be"),
])
def test_a_manifest_part_of_the_wrong_type_is_named(bundle_copy, key, value, message):
    edit(bundle_copy, lambda m: m.update({key: value}), reseal=True)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["preprocessing"].update(image_size=0), "'preprocessing' is not valid: .*image_size"),
    (lambda m: m["preprocessing"].pop("mean"), "'preprocessing' is not valid: lacks 'mean'"),
    (lambda m: m["patient_encoding"].update(view_codes=[1]), "'patient_encoding' is not valid"),
    (lambda m: m["model_config"].update(fpn_channels="wide"), "'model_config' is not valid"),
])
def test_invalid_settings_in_a_manifest_are_named(bundle_copy, change, message):
    edit(bundle_copy, change, reseal=True)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("value", [1.0, 0.0, -5, math.nan, "0.5", None])
def test_thresholds_must_be_numbers_strictly_between_0_and_1(bundle_copy, value):
    edit(bundle_copy, lambda m: m["thresholds"].update(Edema=value), reseal=True)
    with pytest.raises(BundleError, match="Edema"):
        load_bundle(bundle_copy)


def test_findings_and_thresholds_must_match(bundle_copy):
    edit(bundle_copy, lambda m: m["thresholds"].pop("Hernia"), reseal=True)
    with pytest.raises(BundleError, match="Hernia"):
        load_bundle(bundle_copy)


def test_a_planted_checkpoint_cannot_run_code(tmp_path):
    from training.train import load_checkpoint

    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Planted(), "optimizer": {}, "lr_scheduler": {}, "epoch": 0}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a checkpoint this program wrote"):
        load_checkpoint(tmp_path / "checkpoint.pt", "cpu")
    assert not marker.exists()


def test_every_torch_load_in_the_project_is_data_only():
    calls = []
    for folder in ("cxr_batch", "training", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                depth, i = 1, m.end()
                while depth:
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                calls.append((path.name, text[m.start():i]))
    assert calls and all("weights_only=True" in call for _, call in calls), [c for c in calls if "weights_only=True" not in c[1]]


@pytest.mark.parametrize("study", [{"PatientID": "P1"}, {"PatientName": "DOE^JANE", "PatientID": "P1",
                                                        "PatientBirthDate": "19600101", "PatientSex": "F",
                                                        "StudyDate": "20240312", "StudyTime": "101500",
                                                        "AccessionNumber": "ACC1", "StudyID": "7"}])
def test_encapsulated_pdf_has_every_attribute_its_iod_requires(tmp_path, study):
    # dciodvfy found 7 errors in every --dicom-pdf object: Type 2 attributes (birth date, study
    # time and ID, referring physician, manufacturer, acquisition time, concept name) absent, not empty
    import subprocess

    from cxr_batch.dicom_build import encapsulated_pdf
    from tests.dicomgen import have

    if not have("dciodvfy"):
        pytest.skip("dciodvfy not installed")
    ds = encapsulated_pdf(b"%PDF-1.4 x", {**study, "StudyInstanceUID": "1.2.3.4"}, "report")
    ds.save_as(tmp_path / "r.dcm", enforce_file_format=True)
    done = subprocess.run(["dciodvfy", str(tmp_path / "r.dcm")], capture_output=True, text=True, timeout=60)
    errors = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("Error")]
    assert not errors, errors
    back = pydicom.dcmread(tmp_path / "r.dcm")
    assert back.Manufacturer == "cxr-batch" and all(back.get(k) == v for k, v in study.items())


def test_encapsulated_pdf_keeps_names_and_gets_valid_uids(tmp_path):
    from cxr_batch.dicom_build import encapsulated_pdf

    for name in ("DOE^JANE", "Łukasiewicz^Zoë", "山田^太郎"):
        ds = encapsulated_pdf(b"%PDF-1.4 x", {"PatientName": name, "PatientID": "P1",
                                              "StudyInstanceUID": "1.2.03.x-not-a-uid"}, "report")
        ds.save_as(tmp_path / "r.dcm", enforce_file_format=True)
        back = pydicom.dcmread(tmp_path / "r.dcm")
        assert str(back.PatientName) == name and back.SpecificCharacterSet == "ISO_IR 192"
        assert back.StudyInstanceUID.is_valid and back.StudyInstanceUID != "1.2.03.x-not-a-uid"
    again = encapsulated_pdf(b"%PDF", {"StudyInstanceUID": "1.2.03.x-not-a-uid"}, "r")
    assert again.StudyInstanceUID == back.StudyInstanceUID  # every object of that study agrees
