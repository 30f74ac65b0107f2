"""``cxr-batch monitor`` keeps of each results.csv row only the columns it uses (a daemon's file
holds a year of studies): what it writes must be what it wrote when it kept every column, on a
results.csv as odd as real ones get. Real NIH radiographs scored by the bundled weights (which
carry a reference), in fp32, made into 400 rows."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
import random
import shutil
import subprocess

import pytest

import cxr_batch.monitor as monitor
from cxr_batch.display import format_time
from cxr_batch.findings import FINDINGS
from cxr_batch.image_stats import COLUMNS as IMAGE_COLUMNS

from . import test_drift_little_data as little
from .test_evaluate_calibrate import cli_here as here

scored = little.scored  # 25 real radiographs scored by the bundled weights (a module fixture)


def odd_results(scored, folder, n=400):
    """``n`` rows made from the scored ones, with what real files hold: error rows, scored rows
    without probabilities or image statistics, a corrected version of a study (its file twice,
    the note a daemon writes), long UIDs and formula-like notes, rows out of time order, rows
    without a time, values typed over, a second model (no reference: a baseline window), a byte-
    order mark and CRLF (saved again by a spreadsheet) and a last row cut short."""
    folder.mkdir()
    shutil.copy(scored / "run.json", folder / "run.json")
    with open(scored / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        columns, base = reader.fieldnames, list(reader)
    rng = random.Random(0)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(n):
        row = dict(base[i % len(base)])
        when = start + dt.timedelta(hours=4 * i)
        if i % 17 == 5:
            when -= dt.timedelta(days=9)  # appended late (a daemon catching up after an outage)
        row.update(file=f"p{i // 50:03d}/IM{i:05d}.dcm", scored_at=when.isoformat(timespec="seconds"),
                   study_date=when.strftime("%Y-%m-%d"), study_uid="1.2.840." + "9" * 120 + f".{i}",
                   patient_id=f"'=P{i:05d}", accession_number=f"A{i:06d}", notes=f"'=HYPERLINK(\"x{i}\")",
                   worklist_rank="")
        for f_ in FINDINGS:
            row[f"p_{f_}"] = f"{min(max(float(row[f'p_{f_}']) + rng.gauss(0, 0.03), 0), 1):.6f}"
        for c in IMAGE_COLUMNS:
            row[c] = f"{float(row[c]) + rng.gauss(0, 0.02):.4f}"
        if i % 23 == 7:  # a file that failed
            row.update({c: "" for c in columns if c.startswith(("p_", "flag_")) or c in IMAGE_COLUMNS},
                       status="error", reason="could not read: truncated", findings="", priority="",
                       triage_score="", p_any="")
        elif i % 29 == 3:  # blank probabilities
            row.update({c: "" for c in columns if c.startswith("p_")})
        elif i % 31 == 11:  # scored before drift monitoring
            row.update(dict.fromkeys(IMAGE_COLUMNS, ""))
        if i % 37 == 13:
            row["scored_at"] = ""  # only a study date
        if i % 41 == 19:
            row.update(scored_at="", study_date="")  # no time at all
        if i >= n - 80:  # another model took over
            row.update(model="other@9", weights_sha256="f" * 64)
        rows.append(row)
    corrected = dict(rows[120], notes="a later version of this instance could not be read (truncated), so this "
                                      "result is of the earlier version", p_Mass="0.912345")
    rows.insert(200, corrected)
    rows[64]["p_Mass"] = "high"  # typed over: unreadable
    rows[65]["flag_Mass"] = "2"  # a value scan never writes
    rows[66]["worklist_rank"] = "first"  # unreadable, in a column monitoring does not use
    rows[67]["age"] = "-40"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    text = out.getvalue()
    (folder / "results.csv").write_bytes(b"\xef\xbb\xbf" + text[:-200].encode())  # the last row cut short
    return folder


def monitored_output(out, stderr):
    """What monitor wrote, the moments it ran and its output folder aside."""
    report = json.loads((out / "monitor.json").read_text())
    generated = report.pop("generated")
    for model in report["models"]:
        if (model["reference"] or {}).get("kind") in ("baseline", "results"):
            model["reference"].pop("created")  # made from results as monitor runs
    pdf = subprocess.run(["pdftotext", "-layout", str(out / "monitor.pdf"), "-"], capture_output=True, text=True,
                         check=True).stdout
    shown = format_time(dt.datetime.fromisoformat(generated))  # monitor.pdf prints it as every report does
    return report, pdf.replace(shown, "GENERATED"), stderr.replace(str(out), "OUT")


@pytest.mark.parametrize("options", [("--window", "50"), ("--window", "14d"), ("--window", "60", "--reference", None)],
                         ids=["studies", "days", "site-baseline"])
def test_monitor_writes_the_same_keeping_only_the_columns_it_uses(scored, tmp_path, monkeypatch, options):
    results = odd_results(scored, tmp_path / "results")
    options = [scored if o is None else o for o in options]  # the scored folder as a site baseline
    code, stderr = here("monitor", results, "--out", tmp_path / "now", *options)
    now = monitored_output(tmp_path / "now", stderr)
    with monkeypatch.context() as m:  # as before: every column of every row
        m.setattr(monitor, "readable_records", functools.partial(monitor.readable_records, columns=None))
        code_before, stderr = here("monitor", results, "--out", tmp_path / "before", *options)
    before = monitored_output(tmp_path / "before", stderr)
    assert code == code_before
    assert now[0] == before[0]  # monitor.json
    assert now[1] == before[1]  # monitor.pdf's text
    assert now[2] == before[2]  # the terminal
    # the file is as odd as intended, and both models were monitored
    report = now[0]
    notes = " ".join(report["notes"])
    for said in ("row 65: p_Mass 'high' is not a number", "row 66: flag_Mass 2 is not 0 or 1",
                 "row 67: worklist_rank 'first' is not a whole number", "row 68: age -40",
                 "row 401: fewer fields than the header", "without drift data"):
        assert said in notes, notes
    assert len(report["models"]) == 2 and report["studies"]["rows"] == 401


def test_the_records_monitor_keeps_hold_no_identifiers(scored, tmp_path):
    """The comparison above compares two readings that differ: only the study date is kept."""
    csv_path = odd_results(scored, tmp_path / "results") / "results.csv"
    kept, _ = monitor.readable_records(csv_path)
    whole, _ = monitor.readable_records(csv_path, columns=None)
    assert [i for i, _ in kept] == [i for i, _ in whole]
    assert whole[0][1].ids.patient_id and whole[0][1].patient.notes
    assert not kept[0][1].ids.patient_id and not kept[0][1].patient.notes
    assert kept[0][1].ids.study_date == whole[0][1].ids.study_date


def test_monitor_runs_without_importing_torch(scored, tmp_path):
    """`cxr-batch monitor` reads results.csv and bundle manifests only, yet importing it imported
    torch (through the bundle module): seconds of start-up each cron run paid for nothing."""
    import sys

    command = ["monitor", str(scored), "--out", str(tmp_path / "out"), "--min-studies", "5"]
    probe = ("import sys\n"
             "import cxr_batch.monitor, cxr_batch.monitor_report, cxr_batch.drift\n"
             "imported = 'torch' in sys.modules\n"
             "from cxr_batch.cli import main\n"
             "try:\n"
             f"    main({command!r})\n"
             "except SystemExit as e:\n"
             "    print(imported, 'torch' in sys.modules, e.code)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    imported, after_run, code = done.stdout.split() or ["", "", ""]
    assert code in ("0", "5"), (done.stdout, done.stderr[-2000:])  # no alarm, or an alarm: a verdict
    assert (imported, after_run) == ("False", "False"), done.stdout
    assert (tmp_path / "out" / "monitor.json").is_file() and (tmp_path / "out" / "monitor.pdf").is_file()
