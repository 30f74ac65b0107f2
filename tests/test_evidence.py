"""What a bundle says about its intended use and its validation, read from its manifest."""

import csv
import json
import shutil

import pytest

from cxr_batch.bundle import load_bundle, save_bundle
from cxr_batch.evidence import MIN_VALIDATION_IMAGES, NOT_STATED, bundle_evidence
from cxr_batch.findings import FINDINGS
from cxr_batch.model import build_model
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing

from .conftest import V1_BUNDLE


def manifest_with(**metrics) -> dict:
    return {"thresholds": {f: 0.5 for f in FINDINGS}, "metrics": metrics}


def test_a_bundle_without_metrics_has_no_evidence_and_no_stated_use():
    ev = bundle_evidence({})
    assert ev.problem == "no validation metrics in its manifest"
    assert ev.intended_use == NOT_STATED and "not for clinical use" in ev.intended_use
    assert ev.sensitivity("Pneumothorax") == "Pneumothorax: sensitivity at its threshold not measured for these weights"


@pytest.mark.parametrize("metrics, problem", [
    ({"test_n": 4, "test_mean_auc": 0.7}, f"metrics measured on 4 held-out images, fewer than the {MIN_VALIDATION_IMAGES}"),
    ({"test_n": 500, "test_mean_auc": float("nan")}, "no validation metrics"),  # a degenerate test part
    ({"test_mean_auc": 0.8}, "no validation metrics"),
    ({"test_n": 500, "test_mean_auc": 0.8}, None),
])
def test_validation_evidence_needs_finite_metrics_on_enough_images(metrics, problem):
    found = bundle_evidence(manifest_with(**metrics)).problem
    assert found == problem if problem is None else found.startswith(problem)


def test_sensitivity_comes_from_the_manifests_counts():
    counts = {f: {"tp": 3, "fn": 1, "fp": 0, "tn": 10} for f in FINDINGS}
    counts["Hernia"] = {"tp": 0, "fn": 0, "fp": 1, "tn": 13}
    ev = bundle_evidence(manifest_with(test_n=200, test_mean_auc=0.8, per_finding=counts))
    assert ev.sensitivity("Pleural_Thickening") == ("Pleural thickening: sensitivity 0.75 at its threshold "
                                                    "(flagged 3 of 4 held-out images that had it)")
    assert "not measured (no held-out image had it)" in ev.sensitivity("Hernia")


def test_cross_validated_metrics_say_how_the_images_were_held_out():
    ev = bundle_evidence(manifest_with(test_n=480, test_mean_auc=0.7, test_mean_auc_ci95=[0.65, 0.75],
                                       test_how="out of fold, 5-fold cross-validation by patient"))
    assert ev.problem is None
    assert ev.summary() == ("Mean AUROC 0.70 (95% CI 0.65-0.75) on 480 images, each scored by a model that had "
                            "not seen it (out of fold, 5-fold cross-validation by patient); these weights have no "
                            "held-out test of their own.")
    assert "(" not in bundle_evidence(manifest_with(test_n=480, test_mean_auc=0.7, test_how=" ")).summary()


@pytest.mark.parametrize("training, images", [
    ({"data": {"images": 480}}, 480),  # trained on every image it had (v2)
    ({"data": {"images": {"train": 329, "val": 55}}}, 329),  # a split (v1)
    ({"data": {"images": "many"}}, None), ({"data": 3}, None), ([], None), (None, None),
])
def test_training_size_is_read_from_either_manifest_shape(training, images):
    assert bundle_evidence({**manifest_with(), "training": training}).train_images == images


def test_bundled_weights_evidence_from_their_training_run():
    """v1 predates the manifest fields: the counts come from its training_run files, which
    were evaluated at the manifest's thresholds on its test images."""
    manifest = json.loads((V1_BUNDLE / "manifest.json").read_text())
    ev = bundle_evidence(manifest, V1_BUNDLE)
    assert "not for clinical use" in ev.intended_use
    assert ev.images == manifest["metrics"]["test_n"]
    with open(next((V1_BUNDLE / "training_run").glob("validation_metrics_*.csv")), newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["finding"] == "Pneumothorax")
    tp, fn = int(float(row["tp"])), int(float(row["fn"]))
    assert f"flagged {tp} of {tp + fn} held-out images" in ev.sensitivity("Pneumothorax")


def test_training_run_counts_at_other_thresholds_are_not_used(tmp_path):
    shutil.copytree(V1_BUNDLE / "training_run", tmp_path / "training_run")
    manifest = json.loads((V1_BUNDLE / "manifest.json").read_text())
    manifest["thresholds"]["Pneumothorax"] = 0.4  # the bundle's operating point moved after that evaluation
    ev = bundle_evidence(manifest, tmp_path)
    assert ev.counts == {} and "not measured" in ev.sensitivity("Pneumothorax")


def test_save_bundle_records_the_intended_use(tmp_path):
    folder = save_bundle(tmp_path / "b", build_model(), name="b", version="1", preprocessing=Preprocessing(image_size=64),
                         encoding=PatientEncoding(), thresholds={f: 0.5 for f in FINDINGS},
                         intended_use="Research use only, not for clinical use: a test.")
    bundle = load_bundle(folder)
    assert bundle_evidence(bundle.manifest, bundle.path).intended_use == "Research use only, not for clinical use: a test."


def test_a_finding_measured_both_out_of_fold_and_held_out_says_both_with_their_sources():
    """v3's pneumothorax: 0.23 at its operating point out of fold (what every flag's 'sens.'
    shows), 0 of 10 on the held-out test. The line under the bucket says both, each named, so
    a radiologist does not see two numbers that seem to contradict each other."""
    import json

    from cxr_batch.bundle import DEFAULT_BUNDLE

    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    line = bundle_evidence(manifest, DEFAULT_BUNDLE).sensitivity("Pneumothorax")
    point = manifest["triage"]["findings"]["Pneumothorax"]
    counts = manifest["metrics"]["per_finding"]["Pneumothorax"]
    positives = counts["tp"] + counts["fn"]
    assert f"flagged {counts['tp']} of {positives} held-out images" in line
    assert f"; {point['sensitivity']:.2f} out of fold on 1250 development images" in line


def test_a_site_calibrated_ppv_is_marked_as_the_sites_not_nihs():
    """After calibrate with a rule, a finding's PPV is the site's (ppv_at_site); the study report's
    legend must then not say 'at NIH prevalence'."""
    base = {"flagged": True, "sensitivity": 0.5, "specificity": 0.9}
    site = {"triage": {"findings": {"Effusion": {**base, "ppv_at_nih_prevalence": None, "ppv_at_site": 0.4}}}}
    nih = {"triage": {"findings": {"Effusion": {**base, "ppv_at_nih_prevalence": 0.2}}}}
    assert bundle_evidence(site).operating_points["Effusion"].ppv_at_site
    assert bundle_evidence(site).operating_points["Effusion"].ppv == 0.4
    assert not bundle_evidence(nih).operating_points["Effusion"].ppv_at_site


def test_a_site_measured_sensitivity_gives_its_count_of_positives():
    """A bundle calibrated with `--thresholds specificity:0.8 --min-positives 3` on 40 NIH
    studies printed on every urgent banner and worklist "Pneumothorax: sensitivity 0.67 at its
    threshold (cross-validated on the 40 labelled studies ...)": two of three pneumothoraces,
    read as two thirds of them all. The urgent finding's catch measured at the site says its count."""
    row = {"flagged": True, "sensitivity": 2 / 3, "specificity": 0.78, "positives": 3, "ppv_at_nih_prevalence": None,
           "ppv_at_site": 0.2, "measured_on": "cross-validated on the 40 labelled studies of this site's calibration"}
    ev = bundle_evidence({"triage": {"findings": {"Pneumothorax": row}}})
    said = ev.sensitivity("Pneumothorax")
    assert said.startswith("Pneumothorax: sensitivity 0.67 at its threshold (flagged 2 of 3 that had it; "
                           "cross-validated on the 40 labelled studies"), said
    # a figure from the bundle's own development images (NIH prevalence) stays as it was
    base = {**row, "ppv_at_nih_prevalence": 0.1, "ppv_at_site": None, "measured_on": "out of fold"}
    assert bundle_evidence({"triage": {"findings": {"Pneumothorax": base}}}).sensitivity("Pneumothorax") == (
        "Pneumothorax: sensitivity 0.67 at its threshold (out of fold)")
