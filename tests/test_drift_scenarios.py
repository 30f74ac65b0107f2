"""``cxr-batch monitor`` as a hospital's quality manager runs it: real NIH radiographs sent as a
hospital's archive sends them (DX DICOM files, patient data in the header), scored by the
bundled weights, and results.csv files as operators leave them (concatenated twice, a week
missing). Each test is a way the monitor misled its reader (``benchmarks/drift_scenarios.py``
measures the rest)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cxr_batch import exit_codes
from cxr_batch.dicom_build import radiograph, save
from cxr_batch.scan import ScanConfig, run_scan

from .test_evaluate_calibrate import cli_here as here

N = 30


@pytest.fixture(scope="module")
def dicom_site(tmp_path_factory, nih, nih_images):
    """30 NIH radiographs as a hospital's DX DICOM files (8 bits, MONOCHROME2, a vendor, the NIH
    table's age, sex and view in the header), scored by the default bundle in fp32."""
    root = tmp_path_factory.mktemp("dicom_site")
    with open(nih / "labels.csv", newline="") as f:
        labels = {r["Image Index"]: r for r in csv.DictReader(f)}
    files = root / "files"
    files.mkdir()
    for p in nih_images[::16][:N]:
        label = labels[p.name]
        ds = radiograph(np.asarray(Image.open(p).convert("L")), PatientID=f"P{label['Patient ID']}",
                        PatientAge=f"{int(label['Patient Age']):03d}Y", PatientSex=label["Patient Gender"],
                        ViewPosition=label["View Position"], Manufacturer="Vendor A", ManufacturerModelName="DR-1",
                        PixelSpacing=[0.286, 0.286])
        save(ds, files / f"{p.stem}.dcm")
    out = root / "results"
    run_scan(files, out, ScanConfig(precision="fp32", pdf=False, progress=False, workers=0))
    return out


def report_of(out):
    return json.loads((out / "monitor.json").read_text())


def test_a_dicom_site_is_not_alarmed_for_being_dicom_against_a_reference_of_png_files(dicom_site, tmp_path):
    """The bundled reference was made from the NIH PNG files. A hospital sending the very same
    radiographs as DICOM got an alarm in every window, forever: 'file format: dicom 0% -> 100%',
    'DICOM modality: DX 0% -> 100%', 'manufacturer: Vendor A 0% -> 100%', ... (60 alarms over 12
    weeks of `benchmarks/drift_scenarios.py`'s site): nothing the quality manager could act on but
    to stop reading them. A reference holding no study of the window's file format cannot say
    what a header, matrix or bit depth of that format should be: those are not compared with it,
    and the note says how to watch them (a site baseline); the images and outputs still are."""
    code, stderr = here("monitor", dicom_site, "--out", tmp_path / "m")
    report = report_of(tmp_path / "m")
    assert [a["quantity"] for a in report["alarms"] if a["group"] == "acquisition"] == [], report["alarms"]
    assert code == exit_codes.OK, stderr
    (window,) = report["models"][0]["windows"]
    stats = window["statistics"]
    assert "png" in stats["format"]["not_tested"] and "dicom" in stats["format"]["not_tested"]
    assert "p_value" in stats["inversion_cue"] and "p_value" in stats["age"]  # the images and patients still are
    note = " ".join(report["models"][0]["notes"])
    assert "--reference RESULTS_DIR" in note and "site baseline" in note
    assert "--reference RESULTS_DIR" in stderr


def test_a_results_csv_appended_to_itself_counts_each_study_once(dicom_site, tmp_path):
    """An operator merging exports appended a results.csv to itself: every study counted twice, a
    window's tests saw twice the studies they had, and their p-values shrank as if twice the
    evidence were there. 12 weeks of a site's studies, no change, monitored against a site baseline
    with --window 7d: 0 alarms as written, 2 (flag_Effusion) with the rows doubled
    (`benchmarks/drift_scenarios.py`'s pools), and nothing said. A row that repeats an earlier one in
    every column is a copy, not a study: counted once, and said."""
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    shutil.copy(dicom_site / "run.json", doubled / "run.json")
    lines = (dicom_site / "results.csv").read_text().splitlines(keepends=True)
    (doubled / "results.csv").write_text("".join(lines + lines[1:]))
    code, stderr = here("monitor", doubled, "--out", tmp_path / "m")
    report = report_of(tmp_path / "m")
    assert report["studies"]["scored"] == N and report["models"][0]["windows"][0]["n"] == N, report["studies"]
    assert any(f"{N} rows repeat an earlier row" in n for n in report["notes"]), report["notes"]
    assert f"{N} rows repeat an earlier row" in stderr
    # the same site's results compared with themselves as written: identical statistics
    code2, _ = here("monitor", dicom_site, "--out", tmp_path / "m2")
    once = report_of(tmp_path / "m2")
    assert report["models"][0]["windows"][0]["statistics"] == once["models"][0]["windows"][0]["statistics"]


def test_a_week_without_any_study_is_said_not_skipped_in_silence(dicom_site, tmp_path):
    """A daemon stopped for a week (or a week's results lost when exports were merged): monitor
    --window 7d numbered the windows either side consecutively, and the report, the trends and
    the terminal read as weeks without a break; the quality manager, who signs off every week, was
    never told one was never checked. A period without any study is named."""
    gap = tmp_path / "gap"
    gap.mkdir()
    shutil.copy(dicom_site / "run.json", gap / "run.json")
    with open(dicom_site / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    start = dt.datetime(2026, 1, 5, 8, tzinfo=dt.timezone.utc)
    for k, row in enumerate(rows):  # 15 studies in the week of 5 January, 15 in that of 19 January
        row["scored_at"] = (start + dt.timedelta(days=(k % 15) * 0.4 + (14 if k >= 15 else 0))).isoformat()
    with open(gap / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    code, stderr = here("monitor", gap, "--out", tmp_path / "m", "--window", "7d", "--min-studies", "10")
    report = report_of(tmp_path / "m")
    assert len(report["models"][0]["windows"]) == 2, stderr
    said = [n for n in report["models"][0]["notes"] if "no study was scored" in n]
    assert said and "2026-01-12" in said[0] and "2026-01-19" in said[0], report["models"][0]["notes"]
    assert "no study was scored" in stderr


def test_a_quantity_every_study_shares_is_drawn_with_its_value_not_an_offset():
    """One detector, one pixel spacing: every window's median and quartiles 0.286, and monitor.pdf's
    trend panel labelled its axis '1e-13+2.86e-1' with ticks at rounding noise, which a quality
    manager cannot read as 'pixel spacing 0.286, unchanged'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cxr_batch.monitor_report import _trend_page

    entry = {"kind": "continuous", "reference_iqr": [0.286, 0.286], "reference_median": 0.286,
             "window_iqr": [0.286, 0.286], "window_median": 0.286}
    model = {"model": "cxr-fpn@3.0", "weights_sha256": "a" * 64,
             "windows": [{"window": {"index": i}, "statistics": {"pixel_spacing": entry}} for i in range(12)]}
    fig = _trend_page(model, ["pixel_spacing"])
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    low, high = ax.get_ylim()
    assert low < 0.286 < high and high - low > 0.01, (low, high)
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(len(t) <= 6 for t in labels), labels


def test_monitor_pdf_says_once_per_quantity_what_moved_and_since_when(tmp_path):
    """An ICU flood of AP films (`benchmarks/drift_scenarios.py`): page 1 opened on '44 ALARMS (3 on
    inputs, 41 on outputs)' and fifteen lines of window after window, output flag after flag; the
    view position, the one thing the quality manager could go and ask the wards about, was one
    line among them and its recurrence had to be counted by eye. Page 1 now says, once per
    quantity and inputs first, what moved, from which window and date, and in how many windows
    since."""
    import subprocess

    from .test_monitor_same_output import synthetic_results

    results = synthetic_results(tmp_path / "results", 330, seed=0, shift_from=200, odd=False)
    code, stderr = here("monitor", results, "--out", tmp_path / "m", "--window", "40")
    assert code == exit_codes.DRIFT_ALARM, stderr
    report = report_of(tmp_path / "m")
    text = subprocess.run(["pdftotext", "-f", "1", "-l", "1", str(tmp_path / "m" / "monitor.pdf"), "-"],
                          capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())
    assert "What moved" in flat
    block = flat[flat.index("What moved"):]
    photometric = [a for a in report["alarms"] if a["quantity"] == "photometric"]
    first = min(photometric, key=lambda a: a["window"]["index"])
    assert (f"photometric interpretation: {first['shift']} from window {first['window']['index']} "
            f"({first['window']['first'][:10]}); in {len(photometric)} of the") in block, block[:800]
    inputs, outputs = block.index("photometric interpretation:"), block.find("output:")
    assert outputs == -1 or inputs < outputs  # what the wards can be asked about first
    assert len({a["quantity"] for a in report["alarms"]}) > 10 and "more quantities in monitor.json" in block

