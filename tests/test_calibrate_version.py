"""``cxr-batch calibrate --version``: the text names the new bundle in every log line, results.csv
row and report it makes, so a newline or an escape sequence is refused before anything is scored."""

from __future__ import annotations

import pytest

from .test_evaluate_calibrate import cli_here as here


@pytest.mark.parametrize("version", ["3.0\nERROR forged line", "3.0\x1b[31mred", "\t", " "])
def test_a_version_that_would_forge_log_lines_is_refused_before_scoring(tmp_path, studies, version):
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\n" + "".join(f"{p.name},No Finding\n" for p in studies.iterdir()))
    code, stderr = here("calibrate", studies, "--labels", labels, "--out", tmp_path / "new", "--version", version)
    assert code == 2, stderr  # before: a bundle whose version printed a forged line under every scan
    assert "--version" in stderr and "printable" in stderr, stderr
    assert not (tmp_path / "new").exists()


def test_two_calibrations_of_one_day_with_different_rules_have_different_versions(tmp_path, nih, nih_images,
                                                                                  small_bundle):
    """The default version was <base>+site.<date>.<labels hash>: the same labels calibrated twice in
    a day with different --thresholds gave two bundles that flag differently under one name in
    results.csv's model column, on every report and on the worklist."""
    from cxr_batch.bundle import load_bundle
    from cxr_batch.calibrate import CalibrateOptions, run_calibrate
    from cxr_batch.labels import read_labels

    from .test_evaluate_calibrate import FAST, folder_of

    studies = folder_of(tmp_path, nih_images[:60], "s")
    labels = read_labels(nih / "labels.csv")
    made = {rule: load_bundle(run_calibrate(studies, labels, tmp_path / rule.replace(":", "_"),
                                            CalibrateOptions(weights=str(small_bundle), thresholds=rule, min_positives=3,
                                                             **FAST)).bundle)
            for rule in ("keep", "youden")}
    keep, youden = made["keep"], made["youden"]
    assert keep.thresholds != youden.thresholds and keep.sha256 != youden.sha256
    assert keep.label != youden.label, keep.label  # results.csv's model, the reports' and the worklist's name
    assert keep.version.startswith("test+site.") and youden.version.startswith("test+site.")
