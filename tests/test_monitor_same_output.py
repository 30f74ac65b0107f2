"""``cxr-batch monitor`` reports exactly what it reported before it was made to scale: every
statistic of every window, every alarm, the exit code, the terminal and monitor.pdf's text, on
synthetic results.csv files that hold what real ones do (alarms and quiet windows, windows too
small for a verdict, two models, a site baseline and a first-window baseline, rows that cannot
be read, rows without drift data or without a time, rows out of time order, a last row cut
short). The expected output was written by monitor as it was before (tests/data/
monitor_same_output.json); :func:`freeze` writes it again when a change is meant."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from cxr_batch.display import format_time
from cxr_batch.findings import FINDINGS
from cxr_batch.image_stats import COLUMNS as IMAGE_COLUMNS
from cxr_batch.record import COLUMNS

from .test_evaluate_calibrate import cli_here as here

EXPECTED = Path(__file__).parent / "data" / "monitor_same_output.json"
MODEL_A, MODEL_B = "a" * 64, "b" * 64  # in no bundle: no bundle reference
CASES = {  # name: (monitor's options, "SITE" standing for the site baseline's folder)
    "first-window-baseline": ("--window", "40"),
    "site-baseline-days": ("--window", "3d", "--reference", "SITE"),
    "site-baseline-strict": ("--window", "35", "--reference", "SITE", "--min-studies", "30", "--alpha", "0.01"),
}


def synthetic_results(folder: Path, n: int, seed: int, shift_from: int | None = None,
                      second_model_from: int | None = None, odd: bool = True) -> Path:
    """A results.csv of ``n`` rows, one every 3 hours from 2026-03-01. From row ``shift_from``
    the inputs move (grey levels inverted: MONOCHROME1, intensities flipped; another detector's
    size; older patients) and the outputs with them; from ``second_model_from`` another model
    scores. ``odd``: with the rows real files hold (see the module's docstring)."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    start = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(n):
        shifted = shift_from is not None and i >= shift_from
        when = start + dt.timedelta(hours=3 * i)
        if odd and i % 19 == 4:
            when -= dt.timedelta(days=2)  # appended late
        probs = [min(max(rng.betavariate(1.2, 8) + (0.15 if shifted and k < 3 else 0), 0), 1)
                 for k in range(len(FINDINGS))]
        flags = [int(p > 0.3) for p in probs]
        p_any = max(probs)
        row = dict.fromkeys(COLUMNS, "")
        row.update(file=f"p{i // 20:03d}/IM{i:05d}.dcm", status="ok", patient_id=f"P{i:05d}", study_uid=f"1.2.9.{i}",
                   study_date=when.strftime("%Y-%m-%d"), scored_at=when.isoformat(timespec="seconds"),
                   age="" if rng.random() < 0.08 else f"{rng.gauss(68 if shifted else 55, 12):.0f}",
                   age_source="header:PatientAge", sex=rng.choice("MF"), sex_source="header:PatientSex",
                   view=rng.choice(("PA", "PA", "AP")), view_source="header:ViewPosition",
                   findings=";".join(f for f, x in zip(FINDINGS, flags) if x),
                   priority="urgent" if p_any > 0.6 else "abnormal" if p_any > 0.3 else "routine",
                   triage_score=f"{p_any:.6f}", p_any=f"{p_any:.6f}", report=f"cxr_{i:08d}.pdf",
                   model="synthetic@1", weights_sha256=MODEL_A, format="dicom", modality="DX",
                   photometric="MONOCHROME1" if shifted else "MONOCHROME2",
                   bits_stored=rng.choice(("12", "12", "10")) if not shifted else "16",
                   image_rows="2500" if shifted else rng.choice(("2048", "2048", "1024")),
                   image_columns="2048" if shifted else "2048", pixel_spacing=f"{rng.choice((0.143, 0.139)):.4g}",
                   manufacturer="Vendor B" if shifted else rng.choice(("Vendor A", "Vendor A", "Vendor C")),
                   manufacturer_model="DR-2" if shifted else "DR-1")
        for f, p, x in zip(FINDINGS, probs, flags):
            row[f"p_{f}"], row[f"flag_{f}"] = f"{p:.6f}", str(x)
        sign = -1 if shifted else 1
        stats = {"intensity_p05": 0.2, "intensity_p50": 0.6, "intensity_p95": 0.9, "intensity_mean": 0.58,
                 "intensity_std": 0.2, "intensity_skew": -0.3 * sign, "inversion_cue": 0.08 * sign,
                 "top_bottom": 0.12 * sign, "left_right": -0.05, "sharpness": 0.15}
        for c in IMAGE_COLUMNS:
            value = stats[c] if c in stats else 0.5
            if shifted and c.startswith("intensity_p"):
                value = 1 - value
            row[c] = f"{value + rng.gauss(0, 0.03):.4f}"
        if second_model_from is not None and i >= second_model_from:
            row.update(model="synthetic@2", weights_sha256=MODEL_B)
        if odd and i % 23 == 7:  # a file that failed
            row.update({c: "" for c in COLUMNS if c.startswith(("p_", "flag_")) or c in IMAGE_COLUMNS},
                       status="error", reason="could not read the file: truncated", findings="", priority="",
                       triage_score="", p_any="")
        elif odd and i % 31 == 11:  # scored before drift monitoring
            row.update(dict.fromkeys(IMAGE_COLUMNS, ""))
        if odd and i % 37 == 13:
            row["scored_at"] = ""  # only a study date
        if odd and i % 41 == 19:
            row.update(scored_at="", study_date="")  # no time at all
        rows.append(row)
    if odd:
        rows[50]["p_Mass"] = "high"  # typed over: unreadable
        rows[51]["flag_Mass"] = "2"  # a value scan never writes
        rows[52]["age"] = "-40"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    text = out.getvalue()
    (folder / "results.csv").write_text(text[:-150] if odd else text)  # the last row cut short
    return folder


def _replaced(value, old: str, new: str):
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replaced(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replaced(v, old, new) for k, v in value.items()}
    return value


def monitored(tmp_path: Path, case: str) -> dict:
    """Monitor the case's results: exit code, monitor.json, monitor.pdf's text and the terminal,
    the moments it ran and the temporary folder aside."""
    results = synthetic_results(tmp_path / "results", 330, seed=0, shift_from=200, second_model_from=270)
    site = synthetic_results(tmp_path / "site", 120, seed=1, odd=False)
    options = [site if o == "SITE" else o for o in CASES[case]]
    code, stderr = here("monitor", results, "--out", tmp_path / "out", *options)
    report = json.loads((tmp_path / "out" / "monitor.json").read_text())
    generated = dt.datetime.fromisoformat(report.pop("generated")).astimezone()
    for model in report["models"]:
        if model["reference"]:
            model["reference"].pop("created")  # made from results as monitor runs
    pdf = subprocess.run(["pdftotext", str(tmp_path / "out" / "monitor.pdf"), "-"], capture_output=True, text=True,
                         check=True).stdout
    # the text's lines break where the temporary folder's length puts them: compared without spaces
    pdf = re.sub(r"\s+", "", pdf).replace(re.sub(r"\s+", "", str(tmp_path)), "TMP")
    # the moment it ran is printed as the study reports and the worklist print theirs
    shown = re.sub(r"\s+", "", format_time(generated))
    assert shown in pdf and generated.isoformat() not in pdf
    pdf = pdf.replace(shown, "GENERATED")
    return {"exit_code": code, "report": _replaced(report, str(tmp_path), "TMP"), "pdf": pdf,
            "terminal": stderr.replace(str(tmp_path), "TMP")}


def freeze(tmp_path: Path) -> None:
    """Write the expected output again (a change of what monitor reports that is meant)."""
    EXPECTED.parent.mkdir(exist_ok=True)
    frozen = {case: monitored(tmp_path / case, case) for case in CASES}
    EXPECTED.write_text(json.dumps(frozen, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("case", list(CASES))
def test_monitor_reports_what_it_reported_before(tmp_path, case):
    expected = json.loads(EXPECTED.read_text())[case]
    now = monitored(tmp_path, case)
    assert now["exit_code"] == expected["exit_code"]
    assert now["report"] == expected["report"]  # every statistic, alarm and note, to the last digit
    assert now["pdf"] == expected["pdf"]
    assert now["terminal"] == expected["terminal"]


def test_the_cases_hold_what_they_are_meant_to():
    """Alarms and quiet windows, windows too small, unreadable rows, both kinds of baseline."""
    frozen = json.loads(EXPECTED.read_text())
    first, days, strict = (frozen[c]["report"] for c in CASES)
    for report in (first, days, strict):
        assert report["alarms"] and len(report["models"]) == 2
        windows = [w for m in report["models"] for w in m["windows"]]
        assert any(not w["alarms"] and not w["too_small"] for w in windows)
        assert any(w["too_small"] for w in windows)
        assert "row 51: p_Mass 'high' is not a number" in " ".join(report["notes"])
        assert {a["group"] for a in report["alarms"]} >= {"acquisition", "image", "output"}
    assert [m["reference"]["kind"] for m in first["models"]] == ["baseline", "baseline"]
    assert [m["reference"]["kind"] for m in days["models"]] == ["results", "results"]
    assert [m["reference"]["outputs_compared"] for m in days["models"]] == [True, False]
    assert any("without a time" in n for m in days["models"] for n in m["notes"])
