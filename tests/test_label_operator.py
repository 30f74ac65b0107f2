"""An unlucky operator of evaluate and calibrate: stopped half-way, pointed at the wrong folder.
Whatever is left in the folder must never be an evaluation or a bundle that a reader would trust
for numbers it does not hold."""

import json

import pytest

import cxr_batch.evaluation_report
from cxr_batch.evaluate import run_evaluate
from cxr_batch.labels import read_labels
from cxr_batch.scan import ScanConfig

from .test_evaluate_calibrate import cli_here

FAST = ScanConfig(device="cpu", batch_size=8, workers=0, progress=False, precision="fp32")


def labels_of(tmp_path, studies, nih, name):
    """The NIH labels of the images in ``studies`` (a table of their own: an evaluation names it)."""
    wanted = {p.name for p in studies.iterdir()}
    lines = (nih / "labels.csv").read_text().splitlines()
    path = tmp_path / name
    path.write_text("\n".join([lines[0]] + [r for r in lines[1:] if r.split(",")[0] in wanted]) + "\n")
    return path


def test_an_evaluation_stopped_while_writing_leaves_no_earlier_evaluation_beside_new_results(
        tmp_path, nih, studies, small_bundle, monkeypatch):
    """Ctrl-C while evaluation.pdf was drawn left the new results.csv and evaluation.json beside
    the evaluation.pdf of the earlier evaluation (other studies, other numbers), and the command
    said 'nothing was written'."""
    out = tmp_path / "eval"
    cfg = ScanConfig(**{**FAST.__dict__, "weights": str(small_bundle)})
    first = sorted(studies.iterdir())[:3]
    few = tmp_path / "few"
    few.mkdir()
    for p in first:
        (few / p.name).write_bytes(p.read_bytes())
    run_evaluate(few, read_labels(labels_of(tmp_path, few, nih, "few.csv")), out, cfg, n_bootstrap=0)
    assert json.loads((out / "evaluation.json").read_text())["n_studies"] == 3

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_batch.evaluation_report, "write_evaluation_pdf", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(studies, read_labels(labels_of(tmp_path, studies, nih, "all.csv")), out, cfg, n_bootstrap=0)
    assert not (out / "evaluation.pdf").exists(), "the earlier evaluation's PDF is left beside the new results"
    assert not (out / "evaluation.json").exists(), "an evaluation.json without its PDF reads as complete"
    assert len((out / "results.csv").read_text().splitlines()) == 7  # the scan itself is kept


def test_ctrl_c_after_the_scan_says_what_was_written(tmp_path, nih, studies, small_bundle, monkeypatch):
    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_batch.evaluation_report, "write_evaluation_pdf", stopped)
    code, err = cli_here("evaluate", studies, "--labels", labels_of(tmp_path, studies, nih, "l.csv"), "--out",
                         tmp_path / "eval", "--weights", small_bundle, "--device", "cpu", "--workers", 0,
                         "--bootstrap", 0)
    assert code == 130 and "Traceback" not in err
    assert "nothing was written" not in err and "results.csv" in err and "no evaluation" in err, err


def test_calibrate_never_writes_its_bundle_inside_another_bundle(tmp_path, nih, studies, small_bundle):
    """--out inside a bundle other than the base (weights/cxr-fpn-v2/site) made a bundle inside a
    bundle; only the base was protected."""
    import shutil

    from cxr_batch.bundle import BundleError
    from cxr_batch.calibrate import CalibrateOptions, run_calibrate

    other = tmp_path / "other-bundle"
    shutil.copytree(small_bundle, other)
    before = sorted(p.name for p in other.iterdir())
    opts = CalibrateOptions(weights=str(small_bundle), device="cpu", workers=0, progress=False)
    with pytest.raises(BundleError, match="inside the weights bundle"):
        run_calibrate(studies, read_labels(labels_of(tmp_path, studies, nih, "l.csv")), other / "site", opts)
    assert sorted(p.name for p in other.iterdir()) == before


def test_the_same_command_finishes_an_evaluation_that_was_stopped_while_writing(
        tmp_path, nih, studies, small_bundle, monkeypatch):
    """After a stop while the evaluation was written, the folder holds the scan without an
    evaluation.json, which read as 'a scan's results' and refused the very command that made them."""
    out, labels = tmp_path / "eval", labels_of(tmp_path, studies, nih, "l.csv")
    args = ("evaluate", studies, "--labels", labels, "--out", out, "--weights", small_bundle, "--device", "cpu",
            "--workers", 0, "--bootstrap", 0)
    real = cxr_batch.evaluation_report.write_evaluation_pdf

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")  # as reportlab raises it: no file name

    monkeypatch.setattr(cxr_batch.evaluation_report, "write_evaluation_pdf", full)
    code, err = cli_here(*args)
    assert code == 1 and "evaluation.pdf: No space left on device" in err and "no evaluation was written" in err, err
    monkeypatch.setattr(cxr_batch.evaluation_report, "write_evaluation_pdf", real)
    code, err = cli_here(*args)
    assert code == 0 and (out / "evaluation.json").is_file() and (out / "evaluation.pdf").is_file(), err


def test_results_of_a_scan_are_still_never_taken_for_an_evaluation(tmp_path, nih, studies, small_bundle):
    out, labels = tmp_path / "eval", labels_of(tmp_path, studies, nih, "l.csv")
    common = ("--weights", small_bundle, "--device", "cpu", "--workers", 0)
    code, err = cli_here("scan", studies, "--out", out, "--no-pdf", *common)
    assert code == 0, err
    code, err = cli_here("evaluate", studies, "--labels", labels, "--out", out, "--bootstrap", 0, *common)
    assert code == 1 and "holds the results of a scan" in err


def test_a_full_disk_while_evaluation_pdf_is_written_is_said_as_a_full_disk(tmp_path, nih, studies, small_bundle,
                                                                             small_disk):
    """matplotlib wrote the PDF to disk as it drew it: on a full disk the OSError was replaced by
    zlib's 'Error -2 while flushing: inconsistent stream state' ('unexpected error')."""
    import shutil

    out, labels = small_disk / "eval", labels_of(tmp_path, studies, nih, "l.csv")
    args = ("evaluate", studies, "--labels", labels, "--out", out, "--weights", small_bundle, "--device", "cpu",
            "--workers", 0, "--bootstrap", 0)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 40 * 1024))  # room for results.csv, not for the PDF
    code, err = cli_here(*args)
    assert code == 1 and "evaluation.pdf: No space left on device" in err and "unexpected" not in err, err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["results.csv", "run.json"]
    (small_disk / "filler").unlink()
    code, err = cli_here(*args)  # room again: the same command finishes the evaluation
    assert code == 0 and (out / "evaluation.pdf").is_file(), err


def test_calibrate_stopped_while_its_bundle_is_written_leaves_nothing(tmp_path, nih, studies, small_bundle,
                                                                      monkeypatch):
    """Ctrl-C after the weights were copied and before the bundle was put in place: no folder at
    --out, no temp folder beside it, and the command says it stopped (exit 130)."""
    import cxr_batch.calibrate

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_batch.calibrate, "write_manifest", stopped)
    parent = tmp_path / "bundles"
    parent.mkdir()
    code, err = cli_here("calibrate", studies, "--labels", labels_of(tmp_path, studies, nih, "l.csv"), "--out",
                         parent / "site", "--weights", small_bundle, "--device", "cpu", "--workers", 0)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert list(parent.iterdir()) == []


def test_calibrate_that_moves_nothing_says_so_and_keeps_every_threshold_exactly(tmp_path, nih, nih_images):
    """On 3 studies nothing may move; with v3's thresholds the output said 'no finding's calibration
    changed; 12 threshold(s) moved' above a table of 'threshold 0.1374 -> 0.1374': the thresholds
    had gone through logit and back and differed in their last bits."""
    import shutil

    import torch

    from cxr_batch.bundle import load_bundle, save_bundle
    from cxr_batch.findings import FINDINGS
    from cxr_batch.model import ModelConfig, build_model
    from cxr_batch.patient import PatientEncoding
    from cxr_batch.preprocess import Preprocessing

    from .conftest import REPO

    v3 = load_bundle(REPO / "weights" / "cxr-fpn-v3").thresholds
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "b", build_model(ModelConfig(tabular_skip=True)), name="small", version="t",
                         preprocessing=Preprocessing(image_size=96), encoding=PatientEncoding(),
                         thresholds={f: v3[f] for f in FINDINGS})
    studies = tmp_path / "three"
    studies.mkdir()
    for p in nih_images[:3]:
        shutil.copy(p, studies / p.name)
    code, err = cli_here("calibrate", studies, "--labels", labels_of(tmp_path, studies, nih, "l.csv"), "--out",
                         tmp_path / "site", "--weights", bundle, "--device", "cpu", "--workers", 0)
    assert code == 0, err
    assert "no threshold moved either" in err and "threshold(s) moved" not in err, err
    assert load_bundle(tmp_path / "site").thresholds == load_bundle(bundle).thresholds


def test_ctrl_c_during_the_scan_is_finished_by_the_same_command(tmp_path, nih, studies, small_bundle, monkeypatch):
    """Ctrl-C in the scan's last moments (results.csv written, the evaluation's mark not yet) said
    "nothing was written" beside a results.csv, and the same command then refused the folder as
    holding "the results of a scan": the operator had to delete it by hand."""
    import cxr_batch.evaluate
    from cxr_batch.scan import run_scan

    def scan_then_ctrl_c(*args, **kwargs):
        run_scan(*args, **kwargs)
        raise KeyboardInterrupt

    command = ("evaluate", studies, "--labels", labels_of(tmp_path, studies, nih, "l.csv"), "--out", tmp_path / "eval",
               "--weights", small_bundle, "--device", "cpu", "--workers", 0, "--bootstrap", 0)
    monkeypatch.setattr(cxr_batch.evaluate, "run_scan", scan_then_ctrl_c)
    code, err = cli_here(*command)
    assert code == 130 and "Traceback" not in err, err
    assert "nothing was written" not in err and "during the scan" in err and "same command" in err, err
    assert (tmp_path / "eval" / "results.csv").exists() and not (tmp_path / "eval" / "evaluation.json").exists()
    monkeypatch.setattr(cxr_batch.evaluate, "run_scan", run_scan)
    code, err = cli_here(*command)
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["n_studies"] == 6
