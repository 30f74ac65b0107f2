"""Hostile and broken files: each gets a clear row, the scan goes on, nothing is exhausted."""

import os
import shutil
import zlib
import struct

import numpy as np
import pydicom
import pytest

from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan

from .dicomgen import grey, write


def png_bomb(path, side=30000):
    """A valid PNG header claiming side x side grey pixels, with a tiny compressed body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (side + 1) * 16, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.fixture()
def corpus(tmp_path, nih_images):
    d = tmp_path / "corpus"
    d.mkdir()
    src = grey(nih_images[0])
    good = write(d / "good.dcm", src)
    data = good.read_bytes()
    (d / "zero.dcm").write_bytes(b"")
    (d / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (d / "random.dcm").write_bytes(np.random.default_rng(1).bytes(4096))
    (d / "random.png").write_bytes(np.random.default_rng(2).bytes(4096))
    (d / "preamble_only.dcm").write_bytes(b"\x00" * 128 + b"DICM")
    # a file meta element claiming 2 GB in a 156-byte file: reading it in a worker ran out of its
    # memory allowance, and the row said the header "needs more memory", which read as a limit to raise
    (d / "bad_length.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00"
                                       + struct.pack("<I", 0x7FFFFFF0) + b"\x00" * 16)
    ds = pydicom.dcmread(good)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 4]
    ds.save_as(d / "short_pixels.dcm")
    ds = pydicom.dcmread(good)
    ds.Rows = ds.Columns = 65535
    ds.save_as(d / "huge_header.dcm")
    png_bomb(d / "bomb.png")
    (d / "notes.txt").write_text("patient list\n")
    from PIL import Image

    colour = np.stack([src, np.roll(src, 40, axis=0), src // 2], axis=-1)
    Image.fromarray(colour.astype(np.uint8)).save(d / "colour.png")
    from cxr_batch.dicom_build import radiograph, save

    rgb = radiograph(src, PatientID="RGB")
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.PixelData = colour.astype(np.uint8).tobytes()
    save(rgb, d / "rgb.dcm")
    Image.fromarray(np.array([[7]], np.uint8)).save(d / "one_pixel.png")  # no radiograph: nothing to score
    save(radiograph(np.zeros_like(src), PatientID="BLANK"), d / "blank.dcm")  # a failed exposure, a placeholder
    floats = radiograph(src, PatientID="NAN")
    values = src.astype(np.float32)
    values[:8] = np.nan
    del floats.PixelData, floats.BitsStored, floats.HighBit, floats.PixelRepresentation
    floats.FloatPixelData, floats.BitsAllocated = values.tobytes(), 32
    save(floats, d / "nan_pixels.dcm")
    # PACS layout: patient/study/series/instance without extensions, plus a folder named like a file
    nested = d / "PAT1" / "ST1" / "SE1"
    nested.mkdir(parents=True)
    shutil.copy(good, nested / "1.2.3.4")
    (d / "folder.dcm").mkdir()
    os.symlink(d, d / "folder.dcm" / "loop")
    os.symlink(d / "missing-target", d / "dangling")
    return d


EXPECT = {
    "good.dcm": ("ok", ""),
    "PAT1/ST1/SE1/1.2.3.4": ("ok", ""),
    "zero.dcm": ("error", "empty file"),
    "truncated.dcm": ("error", "pixel data"),
    "random.dcm": ("error", "unrecognised content"),
    "random.png": ("error", "unrecognised content"),
    "preamble_only.dcm": ("error", "no data elements"),
    "bad_length.dcm": ("error", "DICOM header cannot be parsed (truncated or corrupt: an element claims more bytes"),
    "short_pixels.dcm": ("error", "pixel data"),
    "huge_header.dcm": ("error", "65535 x 65535"),
    "bomb.png": ("error", "decompression bomb"),
    "notes.txt": ("skipped", "not an image"),
    "colour.png": ("error", "colour"),
    "rgb.dcm": ("error", "colour"),
    "one_pixel.png": ("error", "1 x 1 pixels: too small"),
    "blank.dcm": ("error", "blank image"),
    "nan_pixels.dcm": ("error", "not finite numbers"),
    "folder.dcm/loop": ("skipped", "link loop"),  # the folder it points to is scanned already: nothing is missed
    "dangling": ("error", "broken symbolic link"),
}


def test_hostile_corpus_rows_and_exit_code(corpus, tmp_path, small_bundle):
    summary = run_scan(corpus, tmp_path / "out", ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4,
                                                            workers=1, progress=False, pdf=False))
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    assert set(rows) == set(EXPECT)
    for name, (status, reason) in EXPECT.items():
        assert rows[name]["status"] == status, (name, rows[name]["reason"])
        assert reason in rows[name]["reason"], (name, rows[name]["reason"])
    assert summary.exit_code == 3


def test_cli_shows_no_traceback_without_debug(corpus, tmp_path, small_bundle):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(corpus), "--out", str(tmp_path / "o"),
                           "--weights", str(small_bundle), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "DOE" not in proc.stderr  # no patient names in the default log


def test_file_names_that_are_not_utf8_are_scored(tmp_path, nih_images, small_bundle):
    """A file or folder name that is not UTF-8 (Latin-1 from an old export: a storescp folder
    named after Mr Müller) ended the whole scan with 'unexpected UnicodeEncodeError' (exit 1, no
    results.csv): its name was hashed for the log and the report. Now it is scored like any
    other; results.csv shows the odd bytes as U+FFFD, and --resume keeps its row."""
    studies = tmp_path / "studies"
    studies.mkdir()
    latin1 = os.fsdecode(os.fsencode(studies) + b"/M\xfcller")
    os.mkdir(latin1)
    write(os.path.join(latin1, "IM1.dcm"), grey(nih_images[0]), PatientID="L1")
    write(studies / "line\nbreak.dcm", grey(nih_images[1]), PatientID="L2")
    cfg = ScanConfig(weights=str(small_bundle), device="cpu", batch_size=4, workers=1, progress=False)
    summary = run_scan(studies, tmp_path / "out", cfg)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert summary.exit_code == 0 and [(r["file"], r["status"]) for r in rows] == [
        ("M\ufffdller/IM1.dcm", "ok"), ("linebreak.dcm", "ok")]
    assert all((tmp_path / "out" / "reports" / r["report"]).is_file() for r in rows)
    assert run_scan(studies, tmp_path / "out", cfg, earlier="resume").kept == 2


HOSTILE = "\x1b[2J\x1b]0;title\x07\x9b31m"  # clear the screen, retitle the window, a C1 CSI


def test_paths_with_terminal_escapes_are_printed_visibly(tmp_path, nih_images, small_bundle):
    """A folder named with '\\x1b[2J' (clear the screen) or '\\x1b]0;title\\x07' (retitle the
    window) was printed as given in the log lines that name paths ('N candidate files under
    ...', '-> OUT/results.csv', 'cxr-batch: error: ...'): click strips escapes only on a
    terminal, so a log kept with 2>file replayed them at whoever read it. Every line shows them
    as text ('\\x1b[2J'); none carries a control character."""
    import subprocess
    import sys

    studies, out = tmp_path / f"studies{HOSTILE}", tmp_path / f"out{HOSTILE}"
    studies.mkdir()
    shutil.copy(nih_images[0], studies / f"a{HOSTILE}.png")
    (studies / f"b{HOSTILE}.dcm").write_bytes(b"\x00" * 200)  # a failed row
    (tmp_path / f"file{HOSTILE}").write_text("not a folder")

    def stderr_of(*args):
        proc = subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args), "--weights", str(small_bundle),
                               "--device", "cpu", "--workers", "0"], capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stderr

    runs = [stderr_of("scan", studies, "--out", out),  # the summary names OUT
            stderr_of("scan", studies, "--out", tmp_path / "o2", "--metadata", studies / f"a{HOSTILE}.png"),
            stderr_of("scan", studies, "--out", tmp_path / f"file{HOSTILE}" / "out")]
    assert [code for code, _ in runs] == [3, 1, 1], runs
    visible = "\\x1b[2J\\x1b]0;title\\x07\\x9b31m"
    for code, err in runs:
        assert not any(ch in err for ch in "\x1b\x07\x9b"), repr(err[-2000:])
    assert f"under {tmp_path / 'studies'}{visible}" in runs[0][1], runs[0][1]
    assert f"-> {tmp_path / 'out'}{visible}" in runs[0][1], runs[0][1]
    assert f"cxr-batch: error: metadata file {studies}".replace(HOSTILE, visible) in runs[1][1], runs[1][1]
    assert f"file{visible}" in runs[2][1], runs[2][1]
