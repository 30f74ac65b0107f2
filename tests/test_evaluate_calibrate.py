"""`cxr-batch evaluate` and `cxr-batch calibrate` end to end on real NIH radiographs."""

import hashlib
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from cxr_batch.bundle import load_bundle, write_manifest
from cxr_batch.calibrate import CalibrateOptions, run_calibrate
from cxr_batch.cli import main
from cxr_batch.evaluate import run_evaluate
from cxr_batch.evidence import bundle_evidence
from cxr_batch.findings import FINDINGS
from cxr_batch.labels import read_labels
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig

FAST = dict(device="cpu", batch_size=8, workers=0, progress=False)
# Scans whose numbers are compared with another run's: float32 on every CPU (auto is bf16 on one
# with native bf16, and bf16 moves probabilities by up to a few thousandths). Calibrate scores in
# float32 whatever the machine.
EXACT = dict(FAST, precision="fp32")


def cli(*args):
    """The real command line, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def cli_here(*args):
    """The same command line in this process (no second torch import): (exit code, stderr)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:  # the command pointed logging at the runner's stream, closed now
        root.handlers[:] = handlers
        root.setLevel(level)
    return result.exit_code, result.stderr


def folder_of(tmp_path, images, name):
    folder = tmp_path / name
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    return folder


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_evaluate_writes_numbers_anyone_can_recompute_from_its_results(tmp_path, nih, nih_images, small_bundle):
    studies = folder_of(tmp_path, nih_images[:16], "studies")
    shutil.copy(nih_images[20], studies / "unlabelled.png")
    out = tmp_path / "eval"
    proc = cli("evaluate", studies, "--labels", nih / "labels.csv", "--out", out, "--weights", small_bundle,
               "--device", "cpu", "--batch-size", 8, "--workers", 0, "--bootstrap", 200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # named as logs name files: a path may name the patient; the names are in evaluation.json
    assert "1 scored files have no label row: file#" in proc.stderr and "unlabelled.png" not in proc.stderr
    assert "464 label rows have no file" in proc.stderr and "00000" not in proc.stderr
    assert f"names in {out / 'evaluation.json'}" in proc.stderr
    ev = json.loads((out / "evaluation.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    # the hidden check: mean AUROC recomputed from results.csv and the labels by other code
    results = pd.read_csv(out / "results.csv")
    truth = pd.read_csv(nih / "labels.csv").set_index("Image Index")
    results = results[results["file"].isin(truth.index)]
    aucs = []
    for f in FINDINGS:
        y = results["file"].map(lambda n: int(f in truth.loc[n, "Finding Labels"].split("|")))
        if y.nunique() == 2:
            aucs.append(roc_auc_score(y, results[f"p_{f}"]))
    assert ev["mean_auroc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert len(ev["mean_auroc_findings"]) == len(aucs)

    assert ev["n_studies"] == 16 and ev["n_patients"] == len(truth.loc[results["file"], "Patient ID"].unique())
    assert ev["matching"]["scored_without_label"] == ["unlabelled.png"]
    low, high = ev["mean_auroc_ci95"]
    assert low <= ev["mean_auroc"] <= high
    for f, r in ev["per_finding"].items():
        assert r["positives"] == sum(f in truth.loc[n, "Finding Labels"] for n in results["file"])
        assert r["tp"] + r["fn"] == r["positives"] and r["threshold"] == 0.5
        assert (r["auroc_ci95"] is None) == bool(r["auroc_ci_note"])
    assert ev["brier_prevalence"] <= ev["brier"]  # random weights: no skill over the prevalence
    assert set(ev["by_group"]) == {"view", "sex", "age_band"}
    assert sum(g["n"] for g in ev["by_group"]["view"].values()) == 16
    assert (out / "evaluation.pdf").read_bytes().startswith(b"%PDF")
    if shutil.which("pdftoppm"):
        subprocess.run(["pdftoppm", "-r", "30", "-png", out / "evaluation.pdf", tmp_path / "page"], check=True)
        assert len(list(tmp_path.glob("page-*.png"))) == 3


def test_evaluate_refuses_labels_that_match_nothing(tmp_path, studies, small_bundle):
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\nother.png,Mass\n")
    code, err = cli_here("evaluate", studies, "--labels", labels, "--out", tmp_path / "eval", "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0)
    assert code == 1 and "no labelled study was scored" in err and "Traceback" not in err


def test_calibrate_on_labels_that_match_nothing_says_where_the_names_can_be_listed(tmp_path, studies, small_bundle):
    # it said "(names in the evaluation.json of 'cxr-batch evaluate' on the same studies and
    # labels)", a file no command had written, as if it were there
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\nother.png,Mass\n")
    code, err = cli_here("calibrate", studies, "--labels", labels, "--out", tmp_path / "new", "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0)
    assert code == 1 and "no labelled study was scored" in err, err
    assert "(names: run 'cxr-batch evaluate' on the same studies and labels; its evaluation.json lists them)" in err, err


def test_evaluate_of_one_study_says_what_it_cannot_measure(tmp_path, nih, nih_images, small_bundle):
    studies = folder_of(tmp_path, nih_images[:1], "one")
    code, err = cli_here("evaluate", studies, "--labels", nih / "labels.csv", "--out", tmp_path / "eval",
                         "--weights", small_bundle, "--device", "cpu", "--workers", 0)
    assert code == 0 and "Traceback" not in err and "mean AUROC n/a" in err, err
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["mean_auroc"] is None


def test_evaluate_follows_links_out_of_the_folder_only_when_asked(tmp_path, nih, nih_images, small_bundle):
    """The link message says --follow-links allows it: evaluate and calibrate take it too."""
    studies = folder_of(tmp_path, nih_images[:4], "studies")
    elsewhere = folder_of(tmp_path, nih_images[4:6], "elsewhere")
    for p in elsewhere.iterdir():
        (studies / p.name).symlink_to(p)
    common = ["--labels", nih / "labels.csv", "--weights", small_bundle, "--device", "cpu", "--workers", 0]
    code, err = cli_here("evaluate", studies, *common, "--out", tmp_path / "plain")
    rows = read_results(tmp_path / "plain" / "results.csv")
    assert sum(r["status"] == "ok" for r in rows) == 4
    assert "--follow-links allows it" in " ".join(r["reason"] for r in rows)
    code, err = cli_here("evaluate", studies, *common, "--out", tmp_path / "followed", "--follow-links")
    assert code == 0, err
    assert json.loads((tmp_path / "followed" / "evaluation.json").read_text())["n_studies"] == 6
    code, err = cli_here("calibrate", studies, *common, "--out", tmp_path / "cal", "--follow-links")
    assert "no such option" not in err.lower()


def test_calibrate_on_half_the_patients_helps_the_other_half(tmp_path, nih, nih_images, small_bundle):
    """The shape of the acceptance check: calibrate on one half, ECE on the other half no worse,
    the base bundle untouched. Random weights give probabilities near 0.5 for findings that
    are rare: clearly miscalibrated."""
    base = tmp_path / "base"
    shutil.copytree(small_bundle, base)
    sealed = json.loads((base / "manifest.json").read_text())  # counts measured at the base's thresholds
    sealed["metrics"] = {**sealed.get("metrics", {}), "per_finding": {f: {"tp": 3, "fn": 1} for f in FINDINGS}}
    write_manifest(base, sealed)
    before = file_hashes(base)
    half_a = folder_of(tmp_path, nih_images[:60], "a")
    half_b = folder_of(tmp_path, nih_images[60:100], "b")  # one image per patient: halves by patient
    labels = read_labels(nih / "labels.csv")
    result = run_calibrate(half_a, labels, tmp_path / "site", CalibrateOptions(weights=str(base), min_positives=5,
                                                                                 **FAST))
    assert file_hashes(base) == before
    new = load_bundle(result.bundle)
    old = load_bundle(base)
    assert new.manifest["sha256"] == old.manifest["sha256"]  # the same weights...
    assert new.sha256 != old.sha256 and new.version.startswith("test+site.")  # ...in a new bundle: rows say which
    assert (result.bundle / "model.pt").read_bytes() == (base / "model.pt").read_bytes()
    fitted = [f for f, r in new.manifest["calibration"]["per_finding"].items() if r["status"] == "fitted"]
    assert fitted, "an intercept shift from 0.5 to the prevalence must pass cross-validation"
    kept = [r for r in new.manifest["calibration"]["per_finding"].values() if r["status"].startswith("kept")]
    assert all(r["positives"] < 5 or "no clear gain" in r["status"] for r in kept)
    # 'keep' (the default) flags the studies the base flags: the base's held-out counts still hold
    assert bundle_evidence(new.manifest).counts == bundle_evidence(old.manifest).counts != {}
    prov = new.manifest["provenance"]
    assert prov["labels"]["sha256"] == labels.sha256 and prov["base"]["bundle_sha256"] == old.sha256
    assert prov["n_per_finding"]["Infiltration"]["n"] == 60 and prov["date"]

    cfg = ScanConfig(**EXACT)
    ev_base, _ = run_evaluate(half_b, labels, tmp_path / "eval_base", ScanConfig(weights=str(base), **EXACT), 0)
    ev_new, _ = run_evaluate(half_b, labels, tmp_path / "eval_new", ScanConfig(weights=str(result.bundle), **EXACT), 0)
    assert cfg.weights is None
    assert ev_new["ece"] < ev_base["ece"]
    assert ev_new["mean_auroc"] == pytest.approx(ev_base["mean_auroc"], abs=0.005)  # ranking kept (6-decimal rounding)
    assert ev_new["calibrated"] and ev_new["model"] == f"small@{new.version}"
    # evaluation.json names the bundle as results.csv does: two calibrated bundles can be told apart
    assert ev_new["bundle_sha256"] == new.sha256 != ev_base["bundle_sha256"] == old.sha256
    rows = read_results(tmp_path / "eval_new" / "results.csv")
    assert {r["weights_sha256"] for r in rows} == {new.sha256}
    # the default thresholds rule ('keep') moves the operating points with the calibration: same flags
    flags = lambda folder: [[r[f"flag_{f}"] for f in FINDINGS] for r in read_results(folder / "results.csv")]  # noqa: E731
    assert flags(tmp_path / "eval_new") == flags(tmp_path / "eval_base")
    assert ev_new["triage"]["buckets"] == ev_base["triage"]["buckets"]

    # inference applied exactly the manifest's parameters
    p_base = np.array([[float(r[f"p_{f}"]) for f in FINDINGS] for r in read_results(tmp_path / "eval_base" / "results.csv")])
    p_new = np.array([[float(r[f"p_{f}"]) for f in FINDINGS] for r in read_results(tmp_path / "eval_new" / "results.csv")])
    cal = new.calibration
    assert p_new == pytest.approx(expit(cal.slope * logit(np.clip(p_base, 1e-6, 1 - 1e-6)) + cal.intercept), abs=2e-5)


def test_calibrate_never_writes_over_a_bundle_and_checks_its_options(tmp_path, nih, studies, small_bundle):
    common = ["--labels", nih / "labels.csv", "--device", "cpu", "--workers", 0]
    code, err = cli_here("calibrate", studies, *common, "--out", small_bundle, "--weights", small_bundle)
    assert code == 1 and "the base bundle is never changed" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, err = cli_here("calibrate", studies, *common, "--out", tmp_path / "busy", "--weights", small_bundle)
    assert code == 1 and "already exists" in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    code, err = cli_here("calibrate", studies, *common, "--out", tmp_path / "new", "--thresholds", "sensitivity:1.5")
    assert code == 2 and "between 0 and 1" in err
    code, err = cli_here("calibrate", studies, *common, "--out", tmp_path / "new", "--weights", small_bundle,
                         "--thresholds", "sensitivity:0.9", "--method", "temperature")
    assert code == 0, err[-2000:]
    assert "kept: 0 positives (needs 10)" in err  # 6 studies: nothing moves, and it says so
    assert "no threshold moved either: the new bundle scores and flags exactly as the base bundle does" in err
    assert "no finding has enough positive and negative studies to fit a calibration" in err and "inf" not in err
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert manifest["thresholds"] == load_bundle(small_bundle).thresholds
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_results_never_go_into_a_weights_bundle(tmp_path, nih, studies, small_bundle):
    bundle = tmp_path / "weights" / "mine"
    shutil.copytree(small_bundle, bundle)
    before = file_hashes(bundle)
    common = ["--labels", nih / "labels.csv", "--device", "cpu", "--workers", 0, "--weights", bundle]
    other = tmp_path / "elsewhere" / "theirs"  # a bundle that is not the one in use
    shutil.copytree(small_bundle, other)
    for out in (bundle, bundle / "eval", bundle.parent, other, other / "run" / "x"):
        code, err = cli_here("evaluate", studies, *common, "--out", out)
        assert code == 1 and ("a bundle is never written to" in err or "holds weights bundles" in err), (out, err)
    code, err = cli_here("scan", studies, "--weights", bundle, "--device", "cpu", "--out", bundle.parent)
    assert code == 1 and "choose a folder of its own" in err
    assert file_hashes(bundle) == before and sorted(p.name for p in bundle.parent.iterdir()) == ["mine"]
    from cxr_batch.bundle import DEFAULT_BUNDLE

    code, err = cli_here("scan", studies, "--weights", bundle, "--device", "cpu", "--out", DEFAULT_BUNDLE.parent / "new")
    assert code == 1 and "holds weights bundles" in err and not (DEFAULT_BUNDLE.parent / "new").exists()
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in small_bundle.iterdir())


def test_evaluate_of_three_studies_gives_no_interval_for_the_mean_auroc(tmp_path, nih, nih_images, small_bundle):
    """Three labelled studies (three patients): the mean AUROC rests on one or two positive
    patients per finding, so, as for each finding (fewer than 5 positive or negative patients),
    no bootstrap interval is printed as if it measured something."""
    studies = folder_of(tmp_path, nih_images[:3], "three")
    code, err = cli_here("evaluate", studies, "--labels", nih / "labels.csv", "--out", tmp_path / "eval",
                         "--weights", small_bundle, "--device", "cpu", "--workers", 0, "--precision", "fp32")
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert code == 0 and "Traceback" not in err, err
    assert result["n_patients"] == 3 and result["mean_auroc"] is not None
    assert result["mean_auroc_ci95"] is None and "no CI (needs 5)" in result["mean_auroc_ci_note"]
    assert "(no CI)" in err
    if shutil.which("pdftotext"):  # the PDF's headline read "mean AUROC 0.50 (95% CI no CI)"
        first = " ".join(subprocess.run(["pdftotext", "-l", "1", tmp_path / "eval" / "evaluation.pdf", "-"],
                                        capture_output=True, text=True, check=True).stdout.split())
        assert f"mean AUROC {result['mean_auroc']:.2f} (no 95% CI) over" in first and "CI no CI" not in first, first


def test_calibrate_on_three_patients_moves_nothing(tmp_path, nih, nih_images, small_bundle):
    """Three labelled studies: the default offset's "5-fold cross-validation by patient" was a
    leave-one-out over 3 patients whose standard error passed the gate, and a site bundle moved
    every threshold (0.5 -> 0.14) on 3 studies. Fewer patients than folds: nothing moves."""
    studies = folder_of(tmp_path, nih_images[:3], "three")
    for method, said in (("offset", "fewer than 5 patients"), ("prevalence", "(needs 10)")):
        out = tmp_path / f"new_{method}"
        code, err = cli_here("calibrate", studies, "--labels", nih / "labels.csv", "--out", out, "--method", method,
                             "--weights", small_bundle, "--device", "cpu", "--workers", 0)
        assert code == 0, err[-2000:]
        assert said in err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["thresholds"] == load_bundle(small_bundle).thresholds


def test_evaluate_and_calibrate_name_the_labels_table_by_the_option_the_user_typed(tmp_path, nih, nih_images,
                                                                                  small_bundle):
    """The labels table also serves as patient data, and its warnings were the scan's: 'cxr-batch:
    --metadata labels.csv has a row for 3 of 4 files' and 'metadata file labels.csv has no
    column(s) 'Patient Age'', an option evaluate and calibrate do not have: the user typed --labels."""
    studies = folder_of(tmp_path, nih_images[:3], "three")
    shutil.copy(nih_images[20], studies / "unlabelled.png")
    table = pd.read_csv(nih / "labels.csv", dtype=str).drop(columns=["Patient Age"])
    labels = tmp_path / "labels.csv"
    table.to_csv(labels, index=False)
    code, err = cli_here("evaluate", studies, "--labels", labels, "--out", tmp_path / "eval", "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0, "--bootstrap", 0)
    assert code == 0, err[-2000:]
    assert f"--labels {labels} has a row for 3 of 4 files" in err, err
    assert f"labels file {labels} has no column(s) 'Patient Age'" in err, err
    assert "--metadata" not in err and "metadata file" not in err, err
    code, err = cli_here("calibrate", studies, "--labels", labels, "--out", tmp_path / "site", "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0)
    assert code == 0, err[-2000:]
    assert f"labels file {labels} has no column(s) 'Patient Age'" in err, err
    assert "--metadata" not in err and "metadata file" not in err, err


@pytest.mark.parametrize("size", [8, 9, 10, 12])
def test_evaluation_pdf_text_is_wrapped_inside_the_page_at_every_font_size(size):
    """evaluation.pdf's 'Worklist: ...' paragraph (size 10, wrapped at 110 characters) ran past
    the right edge of the page: '... and 16% of the 183 with one. Th' was cut off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cxr_batch.evaluation_report import A4, Figure, _text

    text = ("Worklist: 46% of studies flagged (1.5 flags per study); buckets urgent / abnormal / low probability "
            "7% / 60% / 32%. The low-probability bucket held 55% of the 130 studies without a finding and 16% of the "
            "183 with one. The worklist order puts studies with a finding first with AUROC 0.808, pneumothorax 0.461.")
    fig = Figure(figsize=A4)
    canvas = FigureCanvasAgg(fig)
    _text(fig, 0.9, text, size)
    canvas.draw()
    right = max(t.get_window_extent(canvas.get_renderer()).x1 for t in fig.texts)
    assert right <= 0.96 * fig.bbox.width


def test_calibrate_out_under_a_file_is_refused_before_any_scoring(tmp_path, studies, small_bundle):
    # `calibrate ... --out a-file/new` scored and fitted everything, then said "a-file: File exists"
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\n" + "".join(f"{p.name},No Finding\n" for p in studies.iterdir()))
    (tmp_path / "a-file").write_text("not a folder")
    code, err = cli_here("calibrate", studies, "--labels", labels, "--out", tmp_path / "a-file" / "new",
                         "--weights", small_bundle, "--device", "cpu")
    assert code == 1 and "a-file is a file, not a folder" in err and "bundle sha256" not in err, err
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_evaluation_pdf_prints_auroc_as_its_interval_and_roc_curve_do_and_says_what_findings_counts(
        tmp_path, nih, nih_images, small_bundle):
    """evaluation.pdf printed 'mean AUROC 0.665 (95% CI 0.59-0.73)' and, in the table, 'Atelectasis
    5 0.663 0.39-0.97' beside a ROC curve titled 'AUROC 0.66': three decimals on 5 positives are
    false precision, and two figures for one AUROC. The subgroup table's 'findings' column was
    not explained anywhere."""
    studies = folder_of(tmp_path, nih_images[:16], "studies")
    out = tmp_path / "eval"
    code, err = cli_here("evaluate", studies, "--labels", nih / "labels.csv", "--out", out, "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0, "--bootstrap", 200)
    assert code == 0, err[-2000:]
    ev = json.loads((out / "evaluation.json").read_text())

    def page(n):
        return subprocess.run(["pdftotext", "-layout", "-f", str(n), "-l", str(n), out / "evaluation.pdf", "-"],
                              capture_output=True, text=True, check=True).stdout

    first = page(1)
    assert f"mean AUROC {ev['mean_auroc']:.2f} (95% CI" in first
    from cxr_batch.display import finding_label
    for f, r in ev["per_finding"].items():
        if r["auroc"] is None:
            continue
        row = next(line.split() for line in first.splitlines() if line.split()[:1] == finding_label(f).split()[:1])
        auroc = row[len(finding_label(f).split()) + 1]  # finding, positives, AUROC
        assert auroc == f"{r['auroc']:.2f}", (f, row)
        assert f"AUROC {r['auroc']:.2f}, {r['positives']} pos." in page(2)
    third = " ".join(page(3).split())
    for value in ev["by_group"]["sex"].values():
        if value["mean_auroc"] is not None:
            assert f" {value['mean_auroc']:.2f} " in third and f" {value['mean_auroc']:.3f} " not in third
    assert "findings: how many findings the group's mean AUROC averages" in third


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_evaluation_pdf_of_a_bundle_without_a_cutoff_has_no_low_probability_bucket(tmp_path, nih, nih_images,
                                                                                   small_bundle):
    """v1 (no P(any) cutoff: a study with nothing flagged is 'normal' whatever its P(any)) got
    'buckets urgent / abnormal / low probability' and 'none in the low-probability bucket
    (P(any finding) below its cutoff)', a cutoff the bundle does not have."""
    studies = folder_of(tmp_path, nih_images[:8], "studies")
    out = tmp_path / "eval"
    code, err = cli_here("evaluate", studies, "--labels", nih / "labels.csv", "--out", out, "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0, "--bootstrap", 0)
    assert code == 0, err[-2000:]
    assert json.loads((out / "evaluation.json").read_text())["triage"]["normal_below"] is None
    first = " ".join(subprocess.run(["pdftotext", "-f", "1", "-l", "1", out / "evaluation.pdf", "-"],
                                    capture_output=True, text=True, check=True).stdout.split())
    assert "low probability" not in first and "low-probability" not in first and "cutoff" not in first
    assert "buckets urgent / abnormal / no finding flagged" in first
    assert "The no-finding-flagged bucket held" in first


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_evaluation_pdf_says_when_it_was_generated_as_the_study_reports_do(tmp_path, nih, nih_images, small_bundle):
    """The study reports and the worklist print 'Generated 2024-04-15 10:32:05 CEST (UTC+02:00)';
    evaluation.pdf printed no time at all, so two evaluations of one site could not be told apart
    on paper. evaluation.json records the same moment."""
    import datetime as dt

    from cxr_batch.display import format_time

    studies = folder_of(tmp_path, nih_images[:8], "studies")
    out = tmp_path / "eval"
    before = dt.datetime.now().astimezone().replace(microsecond=0)
    code, err = cli_here("evaluate", studies, "--labels", nih / "labels.csv", "--out", out, "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0, "--bootstrap", 0)
    assert code == 0, err[-2000:]
    generated = dt.datetime.fromisoformat(json.loads((out / "evaluation.json").read_text())["generated"])
    assert before <= generated <= dt.datetime.now().astimezone()
    first = " ".join(subprocess.run(["pdftotext", "-f", "1", "-l", "1", out / "evaluation.pdf", "-"],
                                    capture_output=True, text=True, check=True).stdout.split())
    assert f"Generated {format_time(generated)} by cxr-batch." in first, first[:600]


def test_a_site_calibration_that_keeps_the_operating_points_keeps_the_held_out_catch_on_its_reports(
        tmp_path, nih, nih_images, small_bundle):
    """v3 calibrated with the default --thresholds keep flags exactly the studies v3 flags, yet its
    reports lost 'Pneumothorax: sensitivity 0.00 at its threshold (flagged 0 of 10 held-out images
    that had it)' and printed only the out-of-fold 0.23: the site's calibration made the urgent
    finding look better caught than it is. Under a rule the counts hold only where it kept the point."""
    import io

    from pypdf import PdfReader

    from cxr_batch.reports import ModelInfo, ReportOptions, study_pdf
    from cxr_batch.record import Scores, StudyRecord

    base = base_that_caught_none_of_ten(tmp_path, small_bundle)
    studies = folder_of(tmp_path, nih_images[:40], "site")
    labels = read_labels(nih / "labels.csv")
    kept = run_calibrate(studies, labels, tmp_path / "kept", CalibrateOptions(weights=str(base), min_positives=5,
                                                                              **FAST))
    ruled = run_calibrate(studies, labels, tmp_path / "ruled", CalibrateOptions(
        weights=str(base), min_positives=5, thresholds="specificity:0.8", **FAST))
    record = StudyRecord(file="a.png", scores=Scores(tuple([0.01] * 14), tuple([0] * 14), "normal", 0.1, 0.1))

    def banner(bundle):
        pdf = study_pdf(record, None, {}, ModelInfo.from_bundle(load_bundle(bundle)), ReportOptions(),
                        __import__("datetime").datetime.now().astimezone())
        return " ".join(PdfReader(io.BytesIO(pdf)).pages[0].extract_text().split())

    assert "Pneumothorax: sensitivity 0.00 at its threshold (flagged 0 of 10 held-out images that had it)" \
        in banner(kept.bundle)
    # under a rule, a finding with too few positives here (3 pneumothoraces of 40 studies) stays at
    # the base's point moved with the calibration: its counts still hold (the findings the rule moved
    # lose theirs: test_a_threshold_rule_that_moves_some_operating_points_keeps_the_base_s_catch...)
    rules = load_bundle(ruled.bundle).manifest["calibration"]["per_finding"]
    assert rules["Pneumothorax"]["threshold_rule"] == "kept from the base bundle"
    assert "Pneumothorax: sensitivity 0.00 at its threshold (flagged 0 of 10 held-out images that had it)" \
        in banner(ruled.bundle)


def test_sensitivity_rule_holds_for_the_flags_a_site_sees_not_only_for_p_over_threshold(tmp_path, nih, nih_images):
    """v3 on the 480 real NIH images, calibrated with sensitivity:0.8 and evaluated on the same
    studies: the flags written to results.csv (a study in the normal bucket carries none) must
    catch at least 0.8 of each finding's positives there, since the thresholds were chosen on
    them. Chosen on p >= threshold alone, 0.81 of the 69 nodules were over it but the written
    flags caught 55 (0.797): 2 sat in the normal bucket; the bundle recorded 0.83 out of fold."""
    labels = read_labels(nih / "labels.csv")
    studies = folder_of(tmp_path, nih_images, "site")
    result = run_calibrate(studies, labels, tmp_path / "bundle", CalibrateOptions(thresholds="sensitivity:0.8", **FAST))
    new = load_bundle(result.bundle)
    ev, _ = run_evaluate(studies, labels, tmp_path / "eval", ScanConfig(weights=str(result.bundle), **EXACT), 0)
    assert ev["bundle_sha256"] == new.sha256
    chosen = [f for f, r in new.manifest["calibration"]["per_finding"].items() if min(r["positives"], r["n"] - r["positives"]) >= 10]
    cannot = {line.split(":")[0] for line in result.lines if "cannot be reached" in line}
    assert chosen
    short = {f: round(ev["per_finding"][f]["sensitivity"], 3) for f in chosen
             if f not in cannot and ev["per_finding"][f]["sensitivity"] < 0.8}
    assert not short, f"sensitivity of the written flags below the 0.8 asked for, in sample: {short}"


def test_calibrate_of_a_bundle_with_a_sealed_model_card_writes_a_bundle_that_loads(tmp_path, nih, nih_images):
    """A trained bundle's manifest seals its MODEL_CARD.md; calibrate copied that manifest into the
    new bundle without the card, so the new bundle would not load. The card's thresholds and
    figures are the base's: the new bundle does not name it (its provenance names the base)."""
    import torch

    from cxr_batch.bundle import save_bundle
    from cxr_batch.model import ModelConfig, build_model
    from cxr_batch.patient import PatientEncoding
    from cxr_batch.preprocess import Preprocessing

    torch.manual_seed(0)
    base = save_bundle(tmp_path / "base", build_model(ModelConfig(tabular_skip=True)), name="small", version="test",
                       preprocessing=Preprocessing(image_size=96), encoding=PatientEncoding(),
                       thresholds={f: 0.5 for f in FINDINGS}, model_card="# Model card: small test\n")
    assert load_bundle(base).manifest["model_card"]["file"] == "MODEL_CARD.md"
    studies = folder_of(tmp_path, nih_images[:3], "three")
    code, err = cli_here("calibrate", studies, "--labels", nih / "labels.csv", "--out", tmp_path / "new",
                         "--weights", base, "--device", "cpu", "--workers", 0)
    assert code == 0, err[-2000:]
    new = load_bundle(tmp_path / "new")
    # its own card (test_a_calibrated_bundle_of_a_carded_base_says_the_base_s_card_does_not_describe_it), not the base's
    assert new.manifest["model_card"]["sha256"] != load_bundle(base).manifest["model_card"]["sha256"]
    assert new.manifest["provenance"]["base"]["bundle_sha256"] == load_bundle(base).sha256


def test_a_calibrated_bundle_of_a_carded_base_says_the_base_s_card_does_not_describe_it(tmp_path, nih, nih_images):
    """Calibrate of a trained bundle dropped the base's MODEL_CARD.md and said nothing in its
    place: a newcomer opening the new bundle found no card, and the base's (its thresholds, F1 and
    counts) is what they would go and read. The new bundle has a sealed card of its own that names
    the base, says the base's card does not describe its thresholds, and that its figures are
    in-sample until `cxr-batch evaluate` is run on other studies."""
    import torch

    from cxr_batch.bundle import BundleError, save_bundle
    from cxr_batch.model import ModelConfig, build_model
    from cxr_batch.patient import PatientEncoding
    from cxr_batch.preprocess import Preprocessing

    torch.manual_seed(0)
    base = save_bundle(tmp_path / "base", build_model(ModelConfig(tabular_skip=True)), name="small", version="test",
                       preprocessing=Preprocessing(image_size=96), encoding=PatientEncoding(),
                       thresholds={f: 0.5 for f in FINDINGS}, model_card="# Model card: small test\n")
    studies = folder_of(tmp_path, nih_images[:3], "three")
    code, err = cli_here("calibrate", studies, "--labels", nih / "labels.csv", "--out", tmp_path / "new",
                         "--weights", base, "--device", "cpu", "--workers", 0)
    assert code == 0, err[-2000:]
    new = load_bundle(tmp_path / "new")
    card = (tmp_path / "new" / "MODEL_CARD.md").read_text()
    assert new.manifest["model_card"]["file"] == "MODEL_CARD.md"
    assert load_bundle(base).sha256 in card and "small test" in card
    assert "does not describe this bundle" in card and "cxr-batch evaluate" in card, card
    assert new.manifest["provenance"]["metrics_note"] in card
    (tmp_path / "new" / "MODEL_CARD.md").write_text(card + "edited\n")
    with pytest.raises(BundleError, match="model card was edited"):
        load_bundle(tmp_path / "new")


def test_evaluate_without_patient_data_names_its_labels_not_a_metadata_option(tmp_path, studies, nih, small_bundle):
    """Labels whose Image Index lost the extension match every study's label but give none its
    patient data: the closing warning said "nor the --metadata table gives any" to a user who
    gave no --metadata, only --labels."""
    labels = pd.read_csv(nih / "labels.csv")
    labels = labels[labels["Image Index"].isin([p.name for p in studies.glob("*.png")])]
    labels["Image Index"] = labels["Image Index"].str.removesuffix(".png")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    code, err = cli_here("evaluate", studies, "--labels", tmp_path / "labels.csv", "--out", tmp_path / "e",
                         "--weights", small_bundle, "--device", "cpu", "--bootstrap", 0, "-q")
    said = [line for line in err.splitlines() if "without any patient data" in line]
    assert code == 0 and len(said) == 1, err
    assert "--labels" in said[0] and "--metadata" not in said[0], said[0]


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_evaluation_pdf_with_the_bootstrap_off_says_so_not_too_few_patients(tmp_path, nih, nih_images,
                                                                             small_bundle):
    """`evaluate --bootstrap 0` on 40 NIH studies printed "no CI: 7 pos. patients" beside
    Atelectasis, as if 7 were too few (5 are enough; with the bootstrap on it had 0.37-0.78):
    evaluation.json's note said "bootstrap off". The table says why there is no interval."""
    studies = folder_of(tmp_path, nih_images[:24], "studies")
    out = tmp_path / "eval"
    code, err = cli_here("evaluate", studies, "--labels", nih / "labels.csv", "--out", out, "--weights",
                         small_bundle, "--device", "cpu", "--workers", 0, "--bootstrap", 0)
    assert code == 0, err[-2000:]
    first = subprocess.run(["pdftotext", "-layout", "-f", "1", "-l", "1", out / "evaluation.pdf", "-"],
                           capture_output=True, text=True, check=True).stdout
    ev = json.loads((out / "evaluation.json").read_text())
    measured = [f for f, r in ev["per_finding"].items() if r["auroc"] is not None]
    assert measured
    from cxr_batch.display import finding_label
    for f in measured:
        row = next(line for line in first.splitlines() if line.split()[:1] == finding_label(f).split()[:1])
        assert "bootstrap off" in row and "pos. patient" not in row, row


@pytest.mark.parametrize("n_studies, min_positives", [(4, 10), (40, 50)])
def test_a_threshold_rule_that_moves_no_operating_point_keeps_the_base_s_held_out_catch(
        tmp_path, nih, nih_images, small_bundle, n_studies, min_positives):
    """`calibrate --thresholds youden` on 4 NIH studies (fewer than 5 patients: no threshold can
    be checked out of fold) or on studies with too few positives of every finding kept every
    operating point of the base, yet the bundle recorded 'thresholds: youden', so its reports
    dropped the base's held-out catch (v3's pneumothorax: flagged 0 of 10) for figures that
    were not replaced. A rule that moved nothing makes the bundle that 'keep' makes."""
    import io

    from pypdf import PdfReader

    from cxr_batch.record import Scores, StudyRecord
    from cxr_batch.reports import ModelInfo, ReportOptions, study_pdf

    base = base_that_caught_none_of_ten(tmp_path, small_bundle)
    studies = folder_of(tmp_path, nih_images[:n_studies], "site")
    labels = read_labels(nih / "labels.csv")
    ruled = run_calibrate(studies, labels, tmp_path / "ruled", CalibrateOptions(
        weights=str(base), min_positives=min_positives, thresholds="youden", **FAST))
    bundle = load_bundle(ruled.bundle)
    assert bundle.thresholds == load_bundle(base).thresholds  # nothing moved (prevalence: nothing fitted)
    assert bundle.manifest["calibration"]["rules"]["thresholds"] == "keep"
    assert any("youden moved no operating point" in line for line in ruled.lines), ruled.lines
    record = StudyRecord(file="a.png", scores=Scores(tuple([0.01] * 14), tuple([0] * 14), "normal", 0.1, 0.1))
    pdf = study_pdf(record, None, {}, ModelInfo.from_bundle(bundle), ReportOptions(),
                    __import__("datetime").datetime.now().astimezone())
    assert "Pneumothorax: sensitivity 0.00 at its threshold (flagged 0 of 10 held-out images that had it)" in \
        " ".join(PdfReader(io.BytesIO(pdf)).pages[0].extract_text().split())


@pytest.mark.parametrize("args, said", [
    (["evaluate", "--labels", "L", "--metadata", "L"], "evaluate reads patient data from --labels"),
    (["calibrate", "--labels", "L", "--metadata", "L"], "calibrate reads patient data from --labels"),
    (["scan", "--labels", "L"], "scan takes no labels: patient data go in --metadata"),
])
def test_an_option_of_the_other_command_says_which_one_is_meant(tmp_path, args, said):
    """A newcomer who read that the labels "serve as patient data, as --metadata does" gave
    evaluate --metadata and was told only "No such option '--metadata'"; scan --labels the same."""
    (tmp_path / "in").mkdir()
    (tmp_path / "L").write_text("Image Index,Finding Labels\na.png,No Finding\n")
    command, *rest = args
    rest = [str(tmp_path / a) if a == "L" else a for a in rest]
    code, err = cli_here(command, tmp_path / "in", *rest, "--out", tmp_path / "o")
    assert code == 2 and said in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_threshold_rule_that_moves_some_operating_points_keeps_the_base_s_catch_for_the_others(
        tmp_path, nih, nih_images, small_bundle):
    """`calibrate --thresholds youden` on 40 NIH studies moved the few findings with enough
    positives there, yet dropped the base's held-out counts of every finding: a finding left at
    the base's operating point (moved with the calibration, so the same studies flag) lost its
    'flagged 0 of 10 held-out images that had it' on every report, as a rule that moved nothing
    did before it was made 'keep'."""
    base = base_that_caught_none_of_ten(tmp_path, small_bundle)
    studies = folder_of(tmp_path, nih_images[:40], "site")
    ruled = run_calibrate(studies, read_labels(nih / "labels.csv"), tmp_path / "ruled", CalibrateOptions(
        weights=str(base), min_positives=3, thresholds="youden", **FAST))
    bundle = load_bundle(ruled.bundle)
    rules = {f: r["threshold_rule"] for f, r in bundle.manifest["calibration"]["per_finding"].items()}
    # too few positives here: the base's point, moved with the calibration; the others chosen by
    # the rule, unless a safeguard kept the base's point (said in a line of its own)
    kept = [f for f in FINDINGS if rules[f] == "kept from the base bundle"]
    chosen = [f for f in FINDINGS if rules[f] == "youden"
              and not any(line.startswith(f + ":") for line in ruled.lines)]
    assert kept and chosen, (rules, ruled.lines)
    evidence = bundle_evidence(bundle.manifest, bundle.path)
    for f in kept:
        assert evidence.catch(f) == "flagged 0 of 10 held-out images that had it", (f, evidence.counts)
    for f in chosen:  # the base's counts were measured at a threshold this bundle no longer has
        assert evidence.catch(f) == "", (f, evidence.counts)


def base_that_caught_none_of_ten(tmp_path, small_bundle):
    """A copy of the small bundle whose held-out test caught none of 10 images of each finding
    (300 test images): the catch a site's reports must keep where its thresholds stand."""
    base = tmp_path / "base"
    shutil.copytree(small_bundle, base)
    sealed = json.loads((base / "manifest.json").read_text())
    sealed["metrics"] = {**sealed.get("metrics", {}), "test_n": 300,
                         "per_finding": {f: {"tp": 0, "fn": 10, "fp": 5, "tn": 285} for f in FINDINGS}}
    write_manifest(base, sealed)
    return base
