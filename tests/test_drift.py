"""Drift monitoring on real radiographs: a reference made from NIH images by the bundle's entry
point, streams of other NIH images scanned with the bundled weights in float32, and
``cxr-batch monitor`` telling which streams moved and how.

The reference is 200 NIH images; the streams are 40 other NIH images drawn from the same range
of the collection (every sixth image of the first 240), as they are (no shift), with inverted
grey levels, resized to 64 px, and with every patient aged 8. Each shifted stream must raise its
alarm and no alarm of an unrelated kind."""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader
from pypdf.errors import PdfReadError

from cxr_batch import exit_codes
from cxr_batch.bundle import DEFAULT_BUNDLE, BundleError, load_bundle, manifest_sha256, write_manifest
from cxr_batch.drift import (DEFAULT_ALPHA, QUANTITIES, compare, holm, make_reference, output_fingerprint,
                             summarise)
from cxr_batch.record import DRIFT_COLUMNS
from cxr_batch.results import read_records, read_results
from cxr_batch.scan import ScanConfig, run_scan

from .dicomgen import grey, write
from .test_evaluate_calibrate import cli_here
from .watchkit import start_daemon, status, stop, wait_for, watch_config

INPUT_GROUPS = {"acquisition", "image", "patient"}
INTENSITY = {"intensity_p05", "intensity_p50", "intensity_p95", "intensity_mean", "intensity_std", "intensity_skew",
             "inversion_cue", "top_bottom", "left_right"}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Done:
    returncode: int
    stderr: str


def here(*args) -> Done:
    """The command line in this process (no second torch import)."""
    return Done(*cli_here(*args))


def copy_images(paths, folder, change=None):
    folder.mkdir(parents=True)
    for p in paths:
        if change is None:
            shutil.copy(p, folder / p.name)
        else:
            Image.fromarray(change(grey(p))).save(folder / p.name)
    return folder


@pytest.fixture(scope="module")
def split(nih_images):
    """(reference images, stream images): interleaved over the same part of the collection."""
    first = nih_images[:240]
    return [p for i, p in enumerate(first) if i % 6], first[::6]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("drift")


@pytest.fixture(scope="module")
def reference_images(split, work):
    return copy_images(split[0], work / "reference_images")


@pytest.fixture(scope="module")
def v2_with_reference(reference_images, work, nih):
    """A copy of the bundled weights with a reference from the 200 reference images (in place of
    the one it ships with), made by the module entry point the lead runs when exporting a model."""
    out = work / "v2ref"
    done = subprocess.run([sys.executable, "-m", "training.reference", str(DEFAULT_BUNDLE), "--images",
                           str(reference_images), "--metadata", str(nih / "labels.csv"), "--out", str(out),
                           "--workers", "1", "--replace"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def scan(folder, out, weights, metadata):
    cfg = ScanConfig(weights=str(weights), metadata=str(metadata), precision="fp32", pdf=False, progress=False,
                     workers=1)
    summary = run_scan(folder, out, cfg)
    assert summary.counts["ok"] == sum(p.is_file() for p in folder.rglob("*"))
    return out


@pytest.fixture(scope="module")
def streams(split, work, v2_with_reference, nih):
    """The four streams, scanned: {name: results folder}."""
    labels = nih / "labels.csv"
    aged = work / "aged8.csv"
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(aged, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "Patient Age": "8"} for r in rows)
    stream = split[1]
    folders = {
        "same": (copy_images(stream, work / "same"), labels),
        "inverted": (copy_images(stream, work / "inverted", lambda g: 255 - g), labels),
        "small": (copy_images(stream, work / "small", lambda g: np.asarray(Image.fromarray(g).resize((64, 64)))),
                  labels),
        "aged8": (copy_images(stream, work / "aged8"), aged),
    }
    return {name: scan(folder, work / f"results_{name}", v2_with_reference, metadata)
            for name, (folder, metadata) in folders.items()}


def monitor(results, out, *extra):
    done = here("monitor", results, "--out", out, *extra)
    report = json.loads((out / "monitor.json").read_text()) if (out / "monitor.json").exists() else None
    return done, report


def alarmed(report, groups=None):
    return {a["quantity"] for a in report["alarms"] if groups is None or a["group"] in groups}


# ---------------------------------------------------------------------------- the four streams
def test_stream_like_the_reference_raises_no_input_alarm(streams, tmp_path):
    done, report = monitor(streams["same"], tmp_path / "m")
    assert done.returncode in (exit_codes.OK, exit_codes.DRIFT_ALARM), done.stderr
    assert report["models"][0]["reference"]["kind"] == "bundle"  # found by its bundle_sha256 through run.json
    assert report["models"][0]["reference"]["outputs_compared"] is True
    (window,) = report["models"][0]["windows"]
    assert window["n"] == 40 and not window["too_small"]
    assert alarmed(report, INPUT_GROUPS) == set(), report["alarms"]
    # every input quantity was tested (PNGs have no pixel spacing: the reference has none either)
    untested = {n for n, s in window["statistics"].items() if "p_value" not in s and s["group"] != "output"}
    assert untested == {"pixel_spacing"}


def test_inverted_grey_levels_raise_an_intensity_alarm(streams, tmp_path):
    done, report = monitor(streams["inverted"], tmp_path / "m")
    assert done.returncode == exit_codes.DRIFT_ALARM, done.stderr
    inputs = alarmed(report, INPUT_GROUPS)
    # and, counted image by image, the images that look inverted (40 of 40 or nearly)
    assert {"inversion_cue", "top_bottom", "looks_inverted"} <= inputs and inputs <= INTENSITY | {"looks_inverted"}, \
        report["alarms"]
    alarm = next(a for a in report["alarms"] if a["quantity"] == "inversion_cue")
    assert alarm["effect"] > 0.6 and alarm["p_holm"] < DEFAULT_ALPHA and alarm["group"] == "image"
    assert alarm["window"]["n"] == 40 and alarm["window"]["rows"] == [1, 40]
    assert len(alarm["studies"]["examples"]) == 10 and all(e["study"].startswith("file#")
                                                         for e in alarm["studies"]["examples"])
    assert "ALARM" in done.stderr and "inversion_cue" in done.stderr
    assert (tmp_path / "m" / "monitor.pdf").read_bytes().startswith(b"%PDF")


def test_64_px_images_raise_a_size_alarm(streams, tmp_path):
    done, report = monitor(streams["small"], tmp_path / "m")
    assert done.returncode == exit_codes.DRIFT_ALARM, done.stderr
    assert {"image_rows", "image_columns"} <= alarmed(report, {"acquisition"})
    assert "age" not in alarmed(report) and "inversion_cue" not in alarmed(report)
    rows = next(a for a in report["alarms"] if a["quantity"] == "image_rows")
    assert rows["effect"] == 1.0 and "512 -> 64" in rows["shift"]


def test_every_patient_aged_8_raises_an_age_alarm(streams, tmp_path):
    done, report = monitor(streams["aged8"], tmp_path / "m")
    assert done.returncode == exit_codes.DRIFT_ALARM, done.stderr
    assert alarmed(report, INPUT_GROUPS) == {"age"}  # the images are the reference's kind: only age moved
    age = next(a for a in report["alarms"] if a["quantity"] == "age")
    assert "-> 8" in age["shift"] and age["effect"] > 0.9


# ---------------------------------------------------------------------------- references
def test_bundle_reference_is_sealed_and_matches_what_a_scan_records(v2_with_reference, reference_images, nih,
                                                                    work):
    manifest = json.loads((v2_with_reference / "manifest.json").read_text())
    shipped = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    assert manifest["bundle_sha256"] != shipped["bundle_sha256"] and manifest["sha256"] == shipped["sha256"]
    assert manifest_sha256(manifest) == manifest["bundle_sha256"]  # the reference is inside the hash
    ref = manifest["reference"]
    assert ref["n_studies"] == 200 and ref["outputs_for"] == output_fingerprint(manifest)
    # a scan of the same images records the same quantities the reference summarises
    records = read_records(scan(reference_images, work / "results_reference", v2_with_reference,
                                nih / "labels.csv") / "results.csv")
    again = summarise(records)
    for q in QUANTITIES:
        a, b = ref["quantities"][q.name], again[q.name]
        assert a["n"] == b["n"], q.name
        if q.kind == "continuous" and a["n"]:
            assert abs(a["mean"] - b["mean"]) < 1e-3 * max(1.0, abs(a["mean"])), q.name
        elif q.kind == "categorical":
            assert a["counts"] == b["counts"], q.name
        elif q.kind == "proportion":
            assert a["k"] == b["k"], q.name
    # an edited reference breaks the seal: the bundle is refused
    tampered = work / "tampered"
    shutil.copytree(v2_with_reference, tampered)
    manifest["reference"]["quantities"]["age"]["mean"] = 8.0
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(tampered)


def test_false_alarms_are_rare_in_windows_drawn_from_the_reference_population(work, v2_with_reference):
    """100 random windows of 40 of the 200 reference studies, each against the other 160: Holm at
    alpha 0.001 over every quantity bounds the chance that a window alarms at 0.1%, and the minimum
    shifts lower it further: at most one of 100 may alarm (expected: 0.1)."""
    records = [r for r in read_records(work / "results_reference" / "results.csv") if r.ok]
    assert len(records) == 200
    rng = np.random.default_rng(0)
    alarms = 0
    for _ in range(100):
        order = rng.permutation(len(records))
        reference = make_reference([records[i] for i in order[40:]], "test", weights_sha256=records[0].weights_sha256)
        result = compare(reference, [records[i] for i in order[:40]])
        assert sum("p_value" in s for s in result["statistics"].values()) >= 40  # inputs and outputs tested
        alarms += bool(result["alarms"])
    assert alarms <= 1


def test_site_baseline_results_folder_as_reference(streams, work, tmp_path):
    done, report = monitor(streams["inverted"], tmp_path / "m", "--reference", work / "results_reference")
    assert done.returncode == exit_codes.DRIFT_ALARM, done.stderr
    assert report["models"][0]["reference"]["kind"] == "results"
    assert {"inversion_cue", "top_bottom"} <= alarmed(report, {"image"})
    done, report = monitor(streams["same"], tmp_path / "m2", "--reference", work / "results_reference")
    assert alarmed(report, INPUT_GROUPS) == set(), report["alarms"]


def test_without_reference_the_first_window_is_the_baseline(split, work, small_bundle, nih, tmp_path):
    """A bundle without a reference: the first window is the baseline, and a later window of
    inverted images alarms; --window 14d puts a one-scan folder in one window (nothing to test)."""
    mixed = tmp_path / "mixed"
    copy_images(split[1], mixed / "a_plain")
    copy_images(split[1], mixed / "b_inverted", lambda g: 255 - g)
    results = scan(mixed, tmp_path / "results", small_bundle, nih / "labels.csv")
    done, report = monitor(results, tmp_path / "m", "--window", "40")
    assert done.returncode == exit_codes.DRIFT_ALARM, done.stderr
    model = report["models"][0]
    assert model["reference"]["kind"] == "baseline" and [w["window"]["index"] for w in model["windows"]] == [1]
    assert {"inversion_cue", "top_bottom"} <= alarmed(report, {"image"})
    assert all(a["window"]["rows"] == [41, 80] for a in report["alarms"])
    done, report = monitor(results, tmp_path / "m2", "--window", "14d")
    assert done.returncode == exit_codes.FATAL and "nothing was compared" in report["problem"]


def test_monitor_usage_and_unusable_inputs(tmp_path, streams, v2_with_reference):
    assert cli("monitor", streams["same"], "--out", tmp_path / "m", "--window", "two weeks").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    done = cli("monitor", empty, "--out", tmp_path / "m")
    assert done.returncode == exit_codes.FATAL and "no results.csv" in done.stderr
    done = here("monitor", streams["same"], "--out", tmp_path / "m", "--reference",
                    DEFAULT_BUNDLE.parent / "cxr-fpn-v1")
    assert done.returncode == exit_codes.FATAL and "carries no reference" in done.stderr
    # results written before drift monitoring: refused, not read as a change of format
    older = tmp_path / "older"
    older.mkdir()
    rows = read_results(streams["same"] / "results.csv")
    columns = [c for c in rows[0] if c not in DRIFT_COLUMNS]
    with open(older / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    done = here("monitor", older, "--out", tmp_path / "m")
    assert done.returncode == exit_codes.FATAL and "before drift monitoring" in done.stderr
    # a row cut short by a crash mid-append costs itself; monitoring into a bundle is refused
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(streams["same"] / "run.json", cut / "run.json")  # names the bundle that scored them
    text = (streams["same"] / "results.csv").read_text()
    last = text.splitlines()[-1]
    (cut / "results.csv").write_text(text + last[: last.index("0.", len(last) // 3) + 3] + "\n")
    done, report = monitor(cut, tmp_path / "m3")
    assert done.returncode in (exit_codes.OK, exit_codes.DRIFT_ALARM), done.stderr
    assert report["studies"] == {"rows": 41, "scored": 40} and "1 row of results.csv that could not be read" in \
        " ".join(report["notes"])
    done = here("monitor", streams["same"], "--out", v2_with_reference / "drift", "--reference", v2_with_reference)
    assert done.returncode == exit_codes.FATAL and "a bundle is never written to" in done.stderr
    assert not (v2_with_reference / "drift").exists()
    # a reference that is malformed but sealed (someone re-sealed an edited manifest): named, exit 1
    broken = tmp_path / "broken"
    shutil.copytree(v2_with_reference, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["reference"]["quantities"]["age"]["counts"] = "many"
    write_manifest(broken, manifest)
    done = here("monitor", streams["same"], "--out", tmp_path / "m", "--reference", broken)
    assert done.returncode == exit_codes.FATAL and "summary of 'age' is malformed" in done.stderr
    manifest["reference"] = ["not", "a", "table"]
    with pytest.raises(BundleError, match="'reference' must be a table"):
        write_manifest(broken, manifest) or load_bundle(broken)


def test_holm_adjustment():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adjusted == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})


# ---------------------------------------------------------------------------- what is recorded
def test_acquisition_and_image_statistics_recorded_per_study(nih_images, small_bundle, tmp_path):
    folder = tmp_path / "studies"
    pixels = grey(nih_images[0])
    write(folder / "mono1.dcm", 255 - pixels, photometric="MONOCHROME1", Manufacturer="ACME", PixelSpacing=[0.2, 0.2],
          ManufacturerModelName="=cmd|' /C calc'!A0")  # a hostile header value stays text in a spreadsheet
    write(folder / "inverted_export.dcm", 255 - pixels, Manufacturer="ACME")
    shutil.copy(nih_images[0], folder / "plain.png")
    run_scan(folder, tmp_path / "out", ScanConfig(weights=str(small_bundle), pdf=False, progress=False, workers=0))
    rows = {r["file"]: r for r in read_results(tmp_path / "out" / "results.csv")}
    mono1, inverted, png = rows["mono1.dcm"], rows["inverted_export.dcm"], rows["plain.png"]
    assert (mono1["format"], mono1["modality"], mono1["photometric"], mono1["bits_stored"]) == \
        ("dicom", "DX", "MONOCHROME1", "8")
    assert (mono1["image_rows"], mono1["image_columns"], mono1["pixel_spacing"], mono1["manufacturer"]) == \
        ("512", "512", "0.2", "ACME")
    assert mono1["manufacturer_model"].startswith("'=")
    assert (png["format"], png["modality"], png["photometric"], png["bits_stored"], png["image_rows"],
            png["pixel_spacing"]) == ("png", "", "", "8", "512", "")
    # MONOCHROME1 is shown as a viewer shows it: the model sees the PNG's radiograph; an export that
    # inverts the grey levels under MONOCHROME2 flips the inversion cue
    assert float(mono1["inversion_cue"]) == pytest.approx(float(png["inversion_cue"]), abs=1e-3)
    assert float(png["inversion_cue"]) > 0 > float(inverted["inversion_cue"])
    assert float(png["intensity_skew"]) * float(inverted["intensity_skew"]) < 0
    assert png["scored_at"].endswith("+00:00")
    records = read_records(tmp_path / "out" / "results.csv")  # back from the CSV, whole
    back = {r.file: r for r in records}
    assert back["mono1.dcm"].acquisition.pixel_spacing == 0.2
    assert back["mono1.dcm"].acquisition.manufacturer_model == "=cmd|' /C calc'!A0"
    assert back["plain.png"].image_stats.inversion_cue == float(png["inversion_cue"])


# ---------------------------------------------------------------------------- the daemon
@pytest.mark.slow
def test_watch_daemon_alarms_in_status_and_worklist_and_a_new_model_starts_a_new_baseline(
        split, work, v2_with_reference, small_bundle, tmp_path):
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    config = watch_config(tmp_path / "watch.toml", drift_every=10, drift_min_studies=10, workers=0)
    daemon = start_daemon(incoming, out, v2_with_reference, config, "--precision", "fp32")
    try:
        assert wait_for(lambda: status(out).get("state") == "running", timeout=120)
        for p in split[1][:20]:
            Image.fromarray(255 - grey(p)).save(incoming / p.name)
        assert wait_for(lambda: status(out).get("drift", {}).get("state") == "alarm", timeout=180), status(out)
        drift = status(out)["drift"]
        assert {"inversion_cue", "top_bottom"} <= {a["quantity"] for a in drift["alarms"]}
        assert drift["reference"].startswith("bundle") and drift["detail"] == "drift.json"
        assert wait_for(lambda: len(read_results(out / "results.csv")) == 20, timeout=60)  # every study scored
        detail = json.loads((out / "drift.json").read_text())
        assert detail["window"]["n"] >= 10 and detail["alarms"]
        assert wait_for(lambda: "DRIFT ALARM" in pdf_text(out / "reports" / "worklist.pdf"), timeout=60)
    finally:
        assert stop(daemon) == 0
    # another model: its own window and, without a reference, its own baseline
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: status(out).get("state") == "running", timeout=120)
        drift = status(out)["drift"]
        assert drift["state"] == "waiting" and "site baseline" in drift["reference"] and "alarms" not in drift
    finally:
        assert stop(daemon) == 0


def pdf_text(path) -> str:
    try:
        return " ".join(page.extract_text() for page in PdfReader(path).pages)
    except (FileNotFoundError, PdfReadError):  # not written yet, or being replaced
        return ""


def test_the_orientation_alarm_of_inverted_images_says_inversion_flips_it_too(streams, tmp_path):
    """40 inverted NIH images: monitor.pdf listed 'lower half minus upper half (orientation cue)'
    first (its p-value is the smallest), which reads as 'the images are upside down'; inverted
    grey levels flip that cue as much, as the skewness's label already said of itself."""
    done, _ = monitor(streams["inverted"], tmp_path / "m")
    assert done.returncode == exit_codes.DRIFT_ALARM, done.stderr
    text = " ".join(PdfReader(tmp_path / "m" / "monitor.pdf").pages[0].extract_text().split())
    assert "lower half minus upper half (orientation cue; flips when the image is upside down or its grey levels " \
           "are inverted)" in text


def test_a_year_of_alarms_is_not_printed_line_by_line(monkeypatch, tmp_path):
    """A drift lasting months alarms in nearly every window: monitor printed every alarm (4,486
    lines for `python benchmarks/monitor_large.py`), burying the summary. The terminal gets the
    newest windows' alarms and a line saying how many more monitor.json and monitor.pdf hold."""
    from click.testing import CliRunner

    import cxr_batch.monitor as monitor
    from cxr_batch.cli import main

    def alarm(index):
        return {"model": "m@1", "label": "mean grey level", "quantity": "mean_grey", "shift": "brighter",
                "effect_name": "d", "effect": 0.9, "p_holm": 1e-6, "window": {"index": index, "n": 500}}

    report = {"notes": [], "models": [{"notes": [], "windows": [{"too_small": False}] * 300}],
              "alarms": [alarm(i) for i in range(300)], "studies": {"scored": 150000}, "exit_code": 5}
    monkeypatch.setattr(monitor, "run_monitor", lambda *args: report)
    (tmp_path / "daemon").mkdir()
    (tmp_path / "daemon" / "results.csv").write_text("file\n")
    done = CliRunner().invoke(main, ["monitor", str(tmp_path / "daemon"), "--out", str(tmp_path / "mon")])
    lines = [line for line in done.output.splitlines() if "ALARM" in line]
    assert done.exit_code == 5 and 0 < len(lines) <= 20, done.output
    assert "window 299 " in lines[-1] and "window 0 " not in done.output
    assert "280 earlier alarms not printed: monitor.json lists every one" in done.output
    assert "300 alarms" in done.output


def test_the_alarms_printed_are_the_newest_of_every_model_not_the_highest_window_numbers(monkeypatch, tmp_path):
    """Each model's windows are numbered from 0: after a bundle change, the old model's hundredth
    window outranked the current model's first, and the 20 alarms printed were months old while
    those of the model scoring today were 'not printed'. The newest by time are printed."""
    from click.testing import CliRunner

    import cxr_batch.monitor as monitor
    from cxr_batch.cli import main

    def alarm(model, index, day):
        last = (dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=day)).isoformat()
        return {"model": model, "label": "mean grey level", "quantity": "mean_grey", "shift": "brighter",
                "effect_name": "d", "effect": 0.9, "p_holm": 1e-6,
                "window": {"index": index, "n": 500, "rows": [day * 500 + 1, day * 500 + 500], "last": last}}

    alarms = [alarm("old@1", i, i) for i in range(100)] + [alarm("new@2", i, 100 + i) for i in range(5)]
    report = {"notes": [], "models": [{"notes": [], "windows": [{"too_small": False}] * 100}],
              "alarms": alarms, "studies": {"scored": 52500}, "exit_code": 5}
    monkeypatch.setattr(monitor, "run_monitor", lambda *args: report)
    (tmp_path / "daemon").mkdir()
    (tmp_path / "daemon" / "results.csv").write_text("file\n")
    done = CliRunner().invoke(main, ["monitor", str(tmp_path / "daemon"), "--out", str(tmp_path / "mon")])
    lines = [line for line in done.output.splitlines() if "ALARM" in line]
    assert sum("ALARM new@2" in line for line in lines) == 5 and len(lines) == 20, done.output
    assert "ALARM new@2" in lines[-1] and "window 99 " in lines[-6] and "window 85 " in lines[0], done.output


def test_a_year_of_windows_gets_an_axis_that_can_be_read():
    """monitor.pdf's trend panels numbered every window (196 labels on a 3-cm axis run into one
    another) and drew two artists per window (most of monitor's time on a year of rows): a few
    whole-number ticks, and one mark collection per kind."""
    from matplotlib.figure import Figure

    from cxr_batch.monitor_report import _panel

    def entry(i, alarm=False):
        return {"kind": "continuous", "reference_iqr": [0.4, 0.6], "reference_median": 0.5,
                "window_iqr": [0.45, 0.65], "window_median": 0.55, "alarm": alarm}

    ax = Figure().add_subplot()
    _panel(ax, "intensity_p50", [(i, entry(i, i % 50 == 0)) for i in range(196)])
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 195]
    assert 3 <= len(ticks) <= 8 and all(float(t).is_integer() for t in ticks), ticks
    assert len(ax.collections) <= 3 and len(ax.lines) <= 2  # not 2 x 196 artists
    few = Figure().add_subplot()
    _panel(few, "intensity_p50", [(i, entry(i)) for i in range(5)])
    assert list(few.get_xticks()) == [0, 1, 2, 3, 4]  # a few windows: each numbered


@pytest.mark.parametrize("k, n", [(0, 1), (0, 500), (1, 500), (166, 500), (499, 500), (500, 500), (7, 13)])
def test_a_flag_rate_s_interval_is_the_exact_clopper_pearson_one(k, n):
    """monitor.pdf and every alarm line quote a window's flag rate with its 95% interval; it is
    the exact (Clopper-Pearson) interval, as scipy's binomial test gives it, at both ends of the
    range too (no flags, every study flagged)."""
    from scipy.stats import binomtest

    from cxr_batch.drift import _proportion

    said = _proportion({"n": 1000, "k": 100}, [True] * k + [False] * (n - k) + [None] * 3)
    exact = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert said["n_window"] == n and said["k_window"] == k
    assert said["window_ci95"] == pytest.approx([exact.low, exact.high], abs=1e-6)


def test_a_window_much_like_its_reference_is_tested_without_a_scipy_warning():
    # a window of the reference's own 480 images printed scipy's "RuntimeWarning: ks_2samp: Exact
    # calculation unsuccessful. Switching to method=asymp." on the operator's terminal, once per quantity
    import warnings

    from cxr_batch.drift import TESTS, summarise_values

    reference = np.linspace(0, 1, 480)
    window = reference.copy()
    window[:2] += 2  # two studies of 480 differ: KS distance 2/480, p-value about 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = TESTS["continuous"][1](summarise_values("continuous", list(reference)), list(window))
    assert result["effect"] < 0.01 and result["p_value"] > 0.99


def test_the_remembered_tests_say_what_scipy_says():
    """The drift tests keep each p-value they computed (keyed by what it depends on): what they
    return is scipy's answer for these very samples and tables, ties and sample sizes that take
    scipy's exact and asymptotic methods included."""
    from scipy.stats import chi2_contingency, fisher_exact, ks_2samp

    from cxr_batch.drift import chi_square_p, fisher_p, ks_test

    rng = np.random.default_rng(0)
    for n1, n2, shift, rounding in [(480, 490, 0.0, 2), (480, 490, 0.3, 6), (480, 20, 1.0, 1), (500, 500, 0.1, 3),
                                    (12000, 300, 0.05, 4), (101, 7, 0.0, 0)] * 3:
        ref, win = np.round(rng.normal(size=n1), rounding), np.round(rng.normal(shift, size=n2), rounding)
        for a, b in ((ref, win), (ref, win[::-1])):  # the same samples again: remembered
            ks = ks_2samp(a, b)
            assert ks_test(a, b) == (float(ks.statistic), float(ks.pvalue))
    for _ in range(200):
        table = tuple(int(v) for v in rng.integers(0, 60, 4))
        assert fisher_p(table) == float(fisher_exact([table[:2], table[2:]])[1])
        r, w = tuple(int(v) for v in rng.integers(1, 80, 4)), tuple(int(v) for v in rng.integers(1, 80, 4))
        assert chi_square_p(r, w) == float(chi2_contingency(np.vstack([r, w]).astype(float))[1])
    # other samples at the same distance: the remembered answer is scipy's for them too
    base = np.arange(40.0)
    for offset in (0.5, 0.25, 0.75):
        ks = ks_2samp(base, base[5:] + offset)
        assert ks_test(base, base[5:] + offset) == (float(ks.statistic), float(ks.pvalue))
