"""Calibration: the manifest record, inference applying it, and the conservative fit."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from scipy.special import expit

from cxr_batch.bundle import BundleError, load_bundle, write_manifest
from cxr_batch.calibration import Calibration, CalibrationError, fit_findings, from_fits
from cxr_batch.findings import FINDINGS
from cxr_batch.inference import Engine
from cxr_batch.runtime import RunPolicy


def record(method="platt", **override):
    per = {f: ({"temperature": 1.5} if method == "temperature" else {"slope": 0.5 + k / 10, "intercept": -1.0 + k / 7})
           for k, f in enumerate(FINDINGS)}
    per.update(override)
    return {"method": method, "per_finding": per}


def test_manifest_records_parse_into_slopes_and_intercepts():
    platt = Calibration.from_manifest(record())
    assert platt.slope[3] == pytest.approx(0.8) and platt.intercept[3] == pytest.approx(-1 + 3 / 7)
    temperature = Calibration.from_manifest(record("temperature"))
    assert temperature.slope == pytest.approx(np.full(14, 1 / 1.5)) and not temperature.intercept.any()
    assert temperature.entry(0) == {"temperature": pytest.approx(1.5)}
    assert Calibration.from_manifest({"method": "platt", "per_finding": {f: platt.entry(k) for k, f in
                                                                          enumerate(FINDINGS)}}).slope == pytest.approx(platt.slope)


@pytest.mark.parametrize("bad, message", [
    ({"Mass": {"temperature": 0}}, "must be positive"),
    ({"Mass": {"temperature": -2.0}}, "must be positive"),
    ({"Mass": {"slope": 0.0, "intercept": 0.0}}, "reverse or erase the ranking"),
    ({"Mass": {"slope": -1.0, "intercept": 0.0}}, "reverse or erase the ranking"),
    ({"Mass": {"slope": float("nan"), "intercept": 0.0}}, "finite number"),
    ({"Mass": {"slope": 1.0, "intercept": float("inf")}}, "finite number"),
    ({"Mass": {"slope": "1", "intercept": 0.0}}, "finite number"),
    ({"Mass": {"temperature": True}}, "finite number"),
    ({"Mass": {"slope": 1.0}}, "finite number"),
    ({"Mass": {"temperature": 1.0, "slope": 1.0, "intercept": 0.0}}, "either 'temperature' or"),
    ({"Mass": 2.0}, "either 'temperature' or"),
])
def test_unsafe_calibrations_are_refused(bad, message):
    with pytest.raises(CalibrationError, match=message):
        Calibration.from_manifest(record(**bad))


def test_incomplete_or_unknown_calibrations_are_refused():
    missing = record()
    del missing["per_finding"]["Hernia"]
    for rec, message in ((missing, "lacks"), ({**record(), "method": "isotonic"}, "method"), ([], "table")):
        with pytest.raises(CalibrationError, match=message):
            Calibration.from_manifest(rec)


def with_calibration(bundle, tmp_path, rec):
    folder = tmp_path / "calibrated"
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"] = rec
    write_manifest(folder, manifest)  # sealed again, as calibrate seals what it writes
    return folder


def test_a_bundle_with_a_broken_calibration_is_refused(small_bundle, tmp_path):
    with pytest.raises(BundleError, match="must be positive"):
        load_bundle(with_calibration(small_bundle, tmp_path, record(Mass={"temperature": 0.0})))


def test_inference_applies_the_calibration_and_bf16_flags_match_fp32(small_bundle, tmp_path):
    base = load_bundle(small_bundle)
    calibrated = load_bundle(with_calibration(small_bundle, tmp_path, record()))
    torch.manual_seed(0)
    x, t = torch.randn(9, 3, 96, 96), torch.rand(9, 3)
    cpu = torch.device("cpu")
    raw = Engine(base, RunPolicy(cpu, "fp32")).logits(x, t).numpy()
    p32 = Engine(calibrated, RunPolicy(cpu, "fp32")).probabilities(x, t)
    assert p32 == pytest.approx(expit(raw * calibrated.calibration.slope + calibrated.calibration.intercept), abs=1e-6)
    # thresholds exactly at image 0's bf16 calibrated probabilities: re-scoring must look at calibrated values
    at = Engine(calibrated, RunPolicy(cpu, "bf16"), refine_margin=0.0).probabilities(x[:1], t[:1])[0]
    calibrated.thresholds = {f: float(at[k]) for k, f in enumerate(FINDINGS)}
    fast = Engine(calibrated, RunPolicy(cpu, "bf16"))
    p16 = fast.probabilities(x, t)
    assert fast.refined >= 1 and ((p16 >= at) == (p32 >= at)).all()


def test_composition_equals_applying_one_after_the_other():
    first, second = Calibration.from_manifest(record()), Calibration.from_manifest(record("temperature"))
    z = np.linspace(-6, 4, 14 * 5).reshape(5, 14)
    assert first.then(second).apply(z) == pytest.approx(second.apply(first.apply(z)))


def synthetic(n, slope, intercept, seed):
    """Logits of a model whose true log-odds are slope * logit + intercept, and labels drawn from them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-2.5, 1.5, (n, 14))
    y = (rng.random((n, 14)) < expit(slope * z + intercept)).astype(int)
    return z, y, np.arange(n).astype(str)


def test_a_miscalibrated_model_is_corrected_on_held_out_studies():
    z, y, groups = synthetic(600, 0.6, 0.8, seed=1)  # overconfident, probabilities too low
    report = fit_findings(z[:300], y[:300], groups[:300], "platt")
    assert report.accepted and all(f.changed for f in report.fits)
    cal = from_fits(report, "platt")
    held = z[300:], y[300:]
    loss = lambda logits: np.mean(np.logaddexp(0, logits) - held[1] * logits)  # noqa: E731
    assert loss(cal.apply(held[0])) < loss(held[0]) - 0.02
    assert cal.slope == pytest.approx(np.full(14, 0.6), abs=0.25)


def test_a_calibrated_model_is_left_alone():
    z, y, groups = synthetic(300, 1.0, 0.0, seed=2)
    report = fit_findings(z, y, groups, "platt")
    assert not report.accepted  # chance gains of single findings do not add up to a clear one
    assert all(f.slope == 1.0 and f.intercept == 0.0 and "no clear gain over all findings" in f.reason
               for f in report.fits)
    assert report.record()["pooled_gain_clear"] is False


def test_a_finding_with_too_few_positives_keeps_its_parameters_and_says_so():
    z, y, groups = synthetic(200, 0.6, 0.8, seed=3)
    y[:, 13] = 0
    y[:4, 13] = 1
    fits = fit_findings(z, y, groups, "temperature", min_positives=10).fits
    assert not fits[13].changed and fits[13].reason == "4 positives (needs 10)"
    assert fits[13].record()["status"] == "kept: 4 positives (needs 10)"
    assert all(math.isclose(f.intercept, 0.0) for f in fits)  # temperature moves the slope only
    y[1:4, 13] = 0  # one positive was "1 positives (needs 10)"
    assert fit_findings(z, y, groups, "temperature", min_positives=10).fits[13].reason == "1 positive (needs 10)"


def test_a_fit_report_without_any_qualifying_finding_is_strict_json():
    """No finding with enough positives -> no standard error: null in the manifest, never
    Infinity (which strict JSON parsers, e.g. browsers' JSON.parse, refuse)."""
    from cxr_batch.calibration import FitReport

    record = FitReport([], 0.0, float("inf"), False).record()
    assert record["pooled_cv_gain_se"] is None
    json.dumps(record, allow_nan=False)


@pytest.mark.parametrize("method", ["prevalence", "temperature", "platt", "offset"])
@pytest.mark.parametrize("patients", [1, 4])
def test_studies_of_fewer_patients_than_folds_keep_the_calibration_and_say_why(method, patients):
    """An anonymising export that writes one Patient ID on every study (or a site with a few
    patients' many follow-ups): a cross-validation by patient needs 5 patients. Every method
    keeps the bundle's calibration and says so, never an unexpected ValueError after scoring."""
    z, y, _ = synthetic(300, 0.6, 0.8, seed=4)  # miscalibrated: with 300 patients it would move
    groups = np.array([f"p{i % patients}" for i in range(len(z))])
    report = fit_findings(z, y, groups, method)
    assert not report.accepted and not any(f.changed for f in report.fits)
    assert all(f.reason == "fewer than 5 patients" for f in report.fits)
    json.dumps(report.record(), allow_nan=False)


def test_a_finding_kept_for_no_clear_gain_says_what_its_figures_are():
    # calibrate printed "kept: no clear gain for this finding (0.2603 -> 0.2542)": two numbers
    # with no name, the second lower, beside "no clear gain"
    z, y, groups = synthetic(600, 0.6, 0.8, seed=1)
    rng = np.random.default_rng(5)
    y[:, 13] = rng.random(600) < expit(z[:, 13])  # this finding is calibrated already
    report = fit_findings(z, y, groups, "platt")
    assert report.accepted and not report.fits[13].changed
    reason = report.fits[13].reason
    assert reason.startswith("no clear gain for this finding (held-out log-loss ") and "standard error" in reason, reason
