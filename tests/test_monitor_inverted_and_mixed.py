"""What a quality manager needs to hear that distribution tests cannot say: a tenth of the studies
exported with their grey levels inverted (a distribution moved by a KS distance of about 0.1, under
the 0.3 that alarms: never alarmed), and two models scoring in the same period (a site that swapped
bundles mid-week, two nodes running different bundles: that period's figures mix two models)."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import torch

from cxr_batch import exit_codes
from cxr_batch.bundle import DEFAULT_BUNDLE, load_bundle
from cxr_batch.image_stats import COLUMNS as IMAGE_COLUMNS
from cxr_batch.image_stats import image_statistics
from cxr_batch.preprocess import eval_transform
from cxr_batch.readers import read_study

from .test_evaluate_calibrate import cli_here as here
from .test_monitor_same_output import MODEL_A, MODEL_B, synthetic_results


@pytest.fixture(scope="module")
def real_stats(nih_images):
    """The image statistics inference records for 60 real NIH radiographs, as they are and with
    their grey levels inverted (what an export that inverts, or a MONOCHROME1 file read as
    MONOCHROME2, gives the model)."""
    prep = load_bundle(DEFAULT_BUNDLE).preprocessing
    greys = [read_study(p).grey for p in nih_images[::8][:60]]

    def stats(invert):
        x = torch.stack([eval_transform(255 - g if invert else g, prep) for g in greys])
        return image_statistics(x, prep.mean[0], prep.std[0])

    return stats(False), stats(True)


def test_the_per_image_check_tells_inverted_radiographs_from_ones_shown_right(real_stats):
    """Measured on every image of nih and nih_extra (`benchmarks/inversion_check.py`): 0.6% and
    1.6% of the radiographs shown right look inverted, 75.6% and 73.6% of the inverted ones do."""
    from cxr_batch.image_stats import looks_inverted

    right, inverted = real_stats
    assert sum(map(looks_inverted, right)) <= 1
    assert sum(map(looks_inverted, inverted)) >= 40


def with_real_stats(folder, right, inverted, inverted_rows=()):
    """Give the rows of ``folder``/results.csv the image statistics of real radiographs (row k:
    image k mod 60), inverted in ``inverted_rows`` (0 = the first row)."""
    path = folder / "results.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for k, row in enumerate(rows):
        s = (inverted if k in inverted_rows else right)[k % len(right)].to_row()
        row.update({c: s[c] for c in IMAGE_COLUMNS})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def page_one(pdf) -> str:
    text = subprocess.run(["pdftotext", "-f", "1", "-l", "1", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    return " ".join(text.split())


def test_a_tenth_of_the_studies_inverted_is_counted_per_period_and_alarmed(real_stats, tmp_path):
    """One scanner in ten sends negative images: monitor --window 14d said nothing (the shift of
    each distribution is a KS distance of about 0.1). Each window now counts the studies whose
    image looks inverted, and alarms when they are more than the stated share."""
    right, inverted = real_stats
    site = with_real_stats(synthetic_results(tmp_path / "site", 300, seed=1, odd=False), right, inverted)
    # 8 studies a day for 8 weeks; from day 28 (row 224) every tenth study inverted
    results = with_real_stats(synthetic_results(tmp_path / "results", 448, seed=2, odd=False), right, inverted,
                              inverted_rows=set(range(224, 448, 10)))
    code, stderr = here("monitor", results, "--out", tmp_path / "m", "--window", "14d", "--reference", site)
    report = json.loads((tmp_path / "m" / "monitor.json").read_text())
    windows = report["models"][0]["windows"]
    counts = [w["looks_inverted"]["count"] for w in windows]
    assert [w["looks_inverted"]["n"] for w in windows] == [112] * 4
    assert counts[0] <= 1 and counts[1] <= 1 and counts[2] >= 11 and counts[3] >= 11, counts
    assert [w["looks_inverted"]["alarm"] for w in windows] == [False, False, True, True]
    alarms = [a for a in report["alarms"] if a["quantity"] == "looks_inverted"]
    assert [a["window"]["index"] for a in alarms] == [2, 3]
    assert all(e["row"] - 1 in range(224, 448, 10) for e in alarms[0]["studies"]["examples"])
    assert code == exit_codes.DRIFT_ALARM, stderr
    flat = page_one(tmp_path / "m" / "monitor.pdf")
    block = flat[flat.index("What moved"):]
    assert f"{counts[2]} of 112 studies" in block and "look inverted" in block, block[:600]


def test_a_quiet_site_raises_no_inversion_alarm_but_its_count_is_given(real_stats, tmp_path):
    right, inverted = real_stats
    site = with_real_stats(synthetic_results(tmp_path / "site", 300, seed=1, odd=False), right, inverted)
    results = with_real_stats(synthetic_results(tmp_path / "results", 448, seed=2, odd=False), right, inverted,
                              inverted_rows={300})  # one negative image in 8 weeks
    code, stderr = here("monitor", results, "--out", tmp_path / "m", "--window", "14d", "--reference", site)
    report = json.loads((tmp_path / "m" / "monitor.json").read_text())
    assert not [a for a in report["alarms"] if a["quantity"] == "looks_inverted"]
    assert sum(w["looks_inverted"]["count"] for w in report["models"][0]["windows"]) >= 1
    flat = page_one(tmp_path / "m" / "monitor.pdf")
    assert "Worth a look" in flat and "look inverted" in flat.split("Worth a look")[1]


def test_two_models_scoring_in_one_period_are_warned_with_each_bundle_and_its_count(tmp_path):
    """A site swapped bundles mid-week: the week's flag rates and worklist mixed two models and
    nothing said so (each model is windowed on its own). The period is named with each
    bundle_sha256 and how many studies it scored."""
    results = synthetic_results(tmp_path / "results", 200, seed=3, second_model_from=100, odd=False)
    code, stderr = here("monitor", results, "--out", tmp_path / "m", "--window", "7d")
    report = json.loads((tmp_path / "m" / "monitor.json").read_text())
    # 8 studies a day from 2026-03-01: the week of 2026-03-08 holds rows 57-112, model B from row 101
    (mixed,) = report["mixed_models"]
    assert mixed["first"].startswith("2026-03-08") and mixed["n"] == 56
    assert [(m["weights_sha256"], m["n"]) for m in mixed["models"]] == [(MODEL_A, 44), (MODEL_B, 12)]
    note = [n for n in report["notes"] if "models scored side by side" in n]
    assert note and MODEL_A[:12] in note[0] and MODEL_B[:12] in note[0] and "44" in note[0], report["notes"]
    assert MODEL_B[:12] in stderr
    flat = page_one(tmp_path / "m" / "monitor.pdf")
    assert "2026-03-08" in flat and f"{MODEL_B[:12]}" in flat and "12 studies" in flat, flat[:1500]


def test_a_model_swap_between_periods_is_not_a_mix(tmp_path):
    results = synthetic_results(tmp_path / "results", 200, seed=3, second_model_from=112, odd=False)
    here("monitor", results, "--out", tmp_path / "m", "--window", "7d")
    report = json.loads((tmp_path / "m" / "monitor.json").read_text())
    assert report["mixed_models"] == []


def test_a_film_upside_down_is_not_counted_as_inverted(nih_images):
    """A film hung upside down (a cassette turned over, a rotated export) has its grey levels right:
    it is not inverted. The orientation cue top_bottom changes sign with it, and the rule
    inversion_cue + top_bottom < 0 counted 72% of the NIH radiographs upside down as inverted: a
    site sending a few such films a week got a weekly 'images that look inverted' alarm for a
    fault it does not have. Real NIH radiographs: upside down, at most 3% look inverted; the same
    upright with grey levels negated, most still do."""
    from cxr_batch.image_stats import looks_inverted

    prep = load_bundle(DEFAULT_BUNDLE).preprocessing
    greys = [read_study(p).grey for p in nih_images[::8][:60]]

    def flagged(transform):
        x = torch.stack([eval_transform(transform(g), prep) for g in greys])
        return sum(map(looks_inverted, image_statistics(x, prep.mean[0], prep.std[0]))) / len(greys)

    assert flagged(lambda g: g[::-1].copy()) <= 0.03
    assert flagged(lambda g: (255 - g)[::-1].copy()) >= 0.6
    assert flagged(lambda g: 255 - g) >= 0.6
    assert flagged(lambda g: g) <= 0.03
