"""``cxr-batch monitor`` on a results.csv that is not exactly what scan wrote: a column removed or
a value typed over by hand, a row cut short because a daemon was still writing it. Each must be
named (the row, the column), the rest monitored; never a silent gap or an alarm about nothing.
Real NIH radiographs scored by the bundled weights (which carry a reference), in fp32."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from cxr_batch import exit_codes

from . import test_drift_little_data as little
from .test_evaluate_calibrate import cli_here as here

scored = little.scored  # 25 real radiographs scored by the bundled weights (a module fixture)
report_of = little.report_of


def edited(scored, folder, edit):
    """A copy of the ``scored`` results folder whose rows (dicts) went through ``edit``."""
    folder.mkdir()
    shutil.copy(scored / "run.json", folder / "run.json")
    with open(scored / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_a_column_removed_by_hand_is_named_not_taken_for_drift(scored, tmp_path):
    """Without its sex column every study read as 'sex unknown': an alarm about the patient mix
    that nothing had changed. Now the missing column is named and nothing is concluded."""
    no_sex = edited(scored, tmp_path / "no_sex", lambda rows: [{k: v for k, v in r.items() if k != "sex"} for r in rows])
    code, stderr = here("monitor", no_sex, "--out", tmp_path / "m")
    assert code == exit_codes.FATAL, stderr
    assert "lacks column(s) sex" in stderr, stderr
    assert "ALARM" not in stderr and not (tmp_path / "m" / "monitor.json").exists()
    # the same results folder as a site baseline is refused the same way
    code, stderr = here("monitor", scored, "--out", tmp_path / "m2", "--reference", no_sex)
    assert code == exit_codes.FATAL and "lacks column(s) sex" in stderr, stderr


def test_a_probability_removed_is_named_rather_than_no_scored_study(scored, tmp_path):
    """Before: 'holds no scored study with drift data' for 25 scored studies."""
    folder = edited(scored, tmp_path / "r", lambda rows: [{k: v for k, v in r.items() if k != "p_Mass"} for r in rows])
    code, stderr = here("monitor", folder, "--out", tmp_path / "m")
    assert code == exit_codes.FATAL, stderr
    assert "lacks column(s) p_Mass" in stderr and "no scored study" not in stderr, stderr


def test_a_value_typed_over_is_left_out_naming_its_row_and_column(scored, tmp_path):
    def typed_over(rows):
        rows[3]["p_Mass"] = "high"
        return rows

    folder = edited(scored, tmp_path / "r", typed_over)
    code, stderr = here("monitor", folder, "--out", tmp_path / "m")
    assert code in (exit_codes.OK, exit_codes.DRIFT_ALARM), stderr
    # said on the terminal, not only inside monitor.json
    assert "note: left out: 1 row of results.csv that could not be read" in stderr and "row 4: p_Mass 'high' is not a number" \
        in stderr, stderr
    report = report_of(tmp_path / "m")
    assert report["studies"] == {"rows": 25, "scored": 24}
    assert any("row 4: p_Mass" in n for n in report["notes"])


def test_a_row_being_written_by_a_daemon_is_left_out_and_said(scored, tmp_path):
    """A results.csv read while its last row is half appended: that row is named, the others decide."""
    folder = tmp_path / "live"
    folder.mkdir()
    shutil.copy(scored / "run.json", folder / "run.json")
    text = (scored / "results.csv").read_text()
    (folder / "results.csv").write_text(text[:-300])  # the last row cut inside its image statistics
    code, stderr = here("monitor", folder, "--out", tmp_path / "m")
    assert code in (exit_codes.OK, exit_codes.DRIFT_ALARM), stderr
    assert "row 25: fewer fields than the header" in stderr, stderr
    assert report_of(tmp_path / "m")["studies"] == {"rows": 25, "scored": 24}


def test_a_bundle_given_by_a_relative_path_is_found_from_any_folder(tmp_path, nih_images, monkeypatch):
    """run.json recorded --weights as typed ('site-bundle'): monitor run from another folder could
    not find that bundle, so its reference went unused and 'nothing was compared' (exit 1)."""
    from cxr_batch.bundle import DEFAULT_BUNDLE, manifest_sha256
    from cxr_batch.scan import ScanConfig, run_scan

    site = tmp_path / "scanned-here"
    bundle = site / "site-bundle"  # a bundle of its own (another bundle_sha256) that carries a reference
    bundle.mkdir(parents=True)
    for name in ("model.pt", "training_images.csv"):  # the manifest names its list: a copy without it is refused
        shutil.copy(DEFAULT_BUNDLE / name, bundle / name)
    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    manifest["version"] += "+copy"
    manifest["bundle_sha256"] = manifest_sha256(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    images = site / "images"
    images.mkdir()
    for p in nih_images[:24]:
        shutil.copy(p, images / p.name)
    monkeypatch.chdir(site)
    run_scan(Path("images"), Path("results"), ScanConfig(weights="site-bundle", precision="fp32", pdf=False,
                                                         progress=False, workers=0))
    monkeypatch.chdir(tmp_path)  # elsewhere
    code, stderr = here("monitor", site / "results", "--out", tmp_path / "m")
    assert code in (exit_codes.OK, exit_codes.DRIFT_ALARM), stderr
    reference = report_of(tmp_path / "m")["models"][0]["reference"]
    assert reference["kind"] == "bundle" and "site-bundle" in reference["source"], reference


def test_a_results_csv_saved_again_by_a_spreadsheet_reads_as_before(scored, tmp_path):
    """Saved as 'CSV UTF-8' by a spreadsheet: a byte-order mark and CRLF line ends. The mark became
    part of the first column's name, so no row had a 'file' ('no scored study')."""
    folder = tmp_path / "resaved"
    folder.mkdir()
    shutil.copy(scored / "run.json", folder / "run.json")
    text = (scored / "results.csv").read_text()
    (folder / "results.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    code, stderr = here("monitor", folder, "--out", tmp_path / "m")
    assert code in (exit_codes.OK, exit_codes.DRIFT_ALARM), stderr
    assert report_of(tmp_path / "m")["studies"] == {"rows": 25, "scored": 25}


@pytest.mark.parametrize("column, value, said", [
    ("p_Mass", "7", "p_Mass 7 is not a probability"),
    ("p_Mass", "nan", "p_Mass nan is not a probability"),
    ("flag_Mass", "2", "flag_Mass 2 is not 0 or 1"),
    ("flag_Mass", "1.0", "flag_Mass '1.0' is not a whole number"),
    ("age", "-40", "age -40 is not a plausible age"),
])
def test_a_number_scan_never_writes_is_left_out_not_counted(scored, tmp_path, column, value, said):
    """A probability of 7 moved the window's mean probability (0.07 -> 0.32 for one row in 30), a
    flag of 2 counted twice in a flag rate, an age of -40 was a patient's age: silently wrong numbers."""
    def typed_over(rows):
        rows[5][column] = value
        return rows

    folder = edited(scored, tmp_path / "r", typed_over)
    code, stderr = here("monitor", folder, "--out", tmp_path / "m")
    assert code in (exit_codes.OK, exit_codes.DRIFT_ALARM), stderr
    assert f"row 6: {said}" in stderr, stderr
    assert report_of(tmp_path / "m")["studies"]["scored"] == 24


def test_time_windows_without_any_time_say_so_rather_than_no_reference(scored, tmp_path):
    """A spreadsheet rewrote every scored_at ('06/12/2026 22:13'): --window 14d placed no study in
    a window, and monitor said no reference had been found (the bundle's was) and to give one."""
    folder = edited(scored, tmp_path / "r", lambda rows: [{**r, "scored_at": "06/12/2026 22:13"} for r in rows])
    code, stderr = here("monitor", folder, "--out", tmp_path / "m", "--window", "14d")
    assert code == exit_codes.FATAL, stderr
    assert "none of the 25 scored studies has a time" in stderr and "--window of studies" in stderr, stderr
    assert "no reference was found" not in stderr, stderr
    code, stderr = here("monitor", folder, "--out", tmp_path / "m2", "--window", "25")  # studies: still monitored
    assert code in (exit_codes.OK, exit_codes.DRIFT_ALARM), stderr


def test_a_results_csv_saved_in_a_local_code_page_is_said_to_be_so(scored, tmp_path):
    """Saved again as 'CSV (comma delimited)' in Latin-1, a file name with an umlaut made monitor
    say 'unexpected UnicodeDecodeError ... (run with --debug for details)', as for a bug."""
    folder = tmp_path / "latin1"
    folder.mkdir()
    shutil.copy(scored / "run.json", folder / "run.json")
    lines = (scored / "results.csv").read_text().splitlines(keepends=True)
    lines[1] = "J\u00fcrgen.png" + lines[1][lines[1].index(","):]
    (folder / "results.csv").write_bytes("".join(lines).encode("latin-1"))
    for args in ((folder,), (scored, "--reference", folder)):
        code, stderr = here("monitor", *args, "--out", tmp_path / "m")
        assert code == exit_codes.FATAL, stderr
        assert "is not UTF-8 text" in stderr and "unexpected" not in stderr, stderr


def test_results_from_before_the_study_level_columns_are_said_to_be_older_not_edited(scored, tmp_path):
    """A results.csv of a cxr-batch from before p_any and worklist_rank (and drift monitoring)
    was said to lack those columns, 'removed by hand?'. Nothing was removed: it is older, and
    monitor says so as it does for one from before drift monitoring (scan them again)."""
    from cxr_batch.record import DRIFT_COLUMNS

    dropped = {*DRIFT_COLUMNS, "p_any", "worklist_rank"}
    folder = edited(scored, tmp_path / "older", lambda rows: [{k: v for k, v in r.items() if k not in dropped}
                                                              for r in rows])
    code, stderr = here("monitor", folder, "--out", tmp_path / "m")
    assert code == exit_codes.FATAL, stderr
    assert "before drift monitoring" in stderr and "lacks column" not in stderr, stderr
