"""``cxr-batch evaluate`` on labels that are all one way: every study negative ("No Finding"), or
every study positive for the same findings. No AUROC can be measured; the line a user reads must
not show a number that looks like one (a prevalence of 0 for studies that all had the finding).
Real NIH radiographs, the bundled weights, fp32."""

from __future__ import annotations

import json

import pytest

from .test_evaluate_calibrate import cli_here as here


@pytest.mark.parametrize("label", ["No Finding", "Effusion|Mass"])
def test_labels_all_one_way_give_no_auroc_and_no_misread_prevalence(tmp_path, studies, label):
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\n" + "".join(f"{p.name},{label}\n" for p in studies.iterdir()))
    code, stderr = here("evaluate", studies, "--labels", labels, "--out", tmp_path / "eval", "--bootstrap", "0",
                        "--precision", "fp32")
    assert code == 0, stderr
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["mean_auroc"] is None and result["mean_auroc_ci95"] is None
    assert result["brier_prevalence"] == 0.0  # predicting 0 (or 1) for labels all 0 (or 1) is exact
    line = stderr.strip().splitlines()[-1]
    assert "mean AUROC n/a" in line and "CI" not in line, line
    # before: "Brier 0.1208 (prevalence 0.0000)" for studies that all had Effusion and Mass
    assert "(prevalence" not in line and "(0.0000 predicting the prevalence)" in line, line


@pytest.mark.parametrize("resamples", ["1", "3", "199"])
def test_too_few_bootstrap_resamples_for_an_interval_are_refused(tmp_path, studies, resamples):
    """'--bootstrap 1' printed "mean AUROC 0.574 (95% CI 0.583-0.583)": an interval of one resample
    that does not even hold the estimate, shown as if it measured something."""
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\n" + "".join(f"{p.name},No Finding\n" for p in studies.iterdir()))
    code, stderr = here("evaluate", studies, "--labels", labels, "--out", tmp_path / "eval", "--bootstrap", resamples)
    assert code == 2 and "at least 200" in stderr, stderr
    assert not (tmp_path / "eval").exists()
