"""Tiny real training runs: all artifacts, a bundle that scans, resume, and 2-process DDP."""

import json
import subprocess
import sys

import pytest

from cxr_batch.findings import FINDINGS
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan

from .conftest import REPO

QUICK = REPO / "training" / "configs" / "quick.toml"
ARTIFACTS = ("validation_metrics_cxr-fpn.csv", "configuration.txt", "optimizer_classification.pt",
             "model_classification.pt", "thresholds.json", "figures/roc_test.png",
             "figures/training_curves.png", "figures/example_predictions.png", "bundle/manifest.json")


def train(nih, out, *extra, launcher=(), config=QUICK):
    cmd = [*launcher, "-m", "cxr_batch", "train", "--images", str(nih / "images"), "--metadata",
           str(nih / "labels.csv"), "--out", str(out), "--config", str(config), "--device", "cpu", *map(str, extra)]
    return subprocess.run([sys.executable, *cmd] if not launcher else cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_run_writes_all_artifacts_and_a_bundle_that_scans(nih, tmp_path, studies):
    run = tmp_path / "run"
    proc = train(nih, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr
    for name in ARTIFACTS:
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test", "test_ci95", "test_image_only", "by_group", "patient_only_logistic_regression"} <= set(metrics)
    assert len(metrics["test_ci95"]["auc"]) == 14 and "notes" in metrics["test_ci95"]
    training = json.loads((run / "bundle" / "manifest.json").read_text())["training"]
    assert len(training["history"]) == 1 and training["history_from"] == "this run"
    assert training["initialised_from"] == {"random": True}
    assert training["patient_prior"] == {"method": "none"} and set(training["prevalence"]) == set(FINDINGS)
    summary = run_scan(studies, tmp_path / "out", ScanConfig(weights=str(run / "bundle"), device="cpu", batch_size=4,
                                                             workers=0, progress=False, pdf=False))
    assert summary.counts["ok"] == 6
    assert read_results(tmp_path / "out" / "results.csv")[0]["model"] == "cxr-fpn@quick"

    again = train(nih, run, "--epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed after epoch 1" in again.stderr
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 2


@pytest.mark.slow
def test_the_bundle_records_the_patient_prior_and_keeps_the_history_through_an_export(nih, tmp_path):
    """A run with the patient prior, then an evaluate-and-export run from its bundle (epochs 0:
    how the shipped weights were made): the second bundle still carries the epoch history."""
    skip = QUICK.read_text() + "\n[model]\ntabular_skip = true\n"
    with_prior, without = tmp_path / "prior.toml", tmp_path / "skip.toml"
    with_prior.write_text(skip.replace("[preprocessing]", 'patient_prior = "logistic"\n\n[preprocessing]'))
    without.write_text(skip)
    proc = train(nih, tmp_path / "first", config=with_prior)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads((tmp_path / "first" / "bundle" / "manifest.json").read_text())["training"]
    prior = first["patient_prior"]
    assert prior["centred"] is True and prior["weight"] == 1.0 and len(prior["coef"]) == 14
    assert len(prior["offset"]) == 14 and len(prior["centre"]) == 3 and prior["method"] == "logistic"
    twice = train(nih, tmp_path / "twice", "--epochs", 0, "--init-weights", tmp_path / "first" / "bundle",
                  config=with_prior)
    assert twice.returncode == 1 and "already has a patient prior" in twice.stderr
    export = train(nih, tmp_path / "export", "--epochs", 0, "--init-weights", tmp_path / "first" / "bundle",
                   config=without)
    assert export.returncode == 0, export.stderr[-2000:]
    second = json.loads((tmp_path / "export" / "bundle" / "manifest.json").read_text())["training"]
    assert second["history"] == first["history"] and len(second["history"]) == 1
    assert second["history_from"].startswith("init_weights")
    first_sha = json.loads((tmp_path / "first" / "bundle" / "manifest.json").read_text())["bundle_sha256"]
    assert second["initialised_from"] == {"weights": {"bundle": str(tmp_path / "first" / "bundle"),
                                                      "bundle_sha256": first_sha}}


@pytest.mark.slow
def test_two_process_ddp_on_cpu(nih, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517")
    proc = train(nih, tmp_path / "ddp", "--limit", "32", launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "bundle" / "manifest.json").exists()
    assert "epoch 1" in proc.stderr


def test_a_split_that_cannot_be_evaluated_is_refused_before_any_work(nih, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text(QUICK.read_text().replace("allow_degenerate_split = true", ""))
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "train", "--images", str(nih / "images"), "--metadata",
                           str(nih / "labels.csv"), "--out", str(tmp_path / "run"), "--config", str(strict),
                           "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "this split cannot be evaluated: the validation part has 4 images, fewer than 30" in proc.stderr
    assert "allow_degenerate_split" in proc.stderr
    assert not (tmp_path / "run" / "bundle").exists() and not list((tmp_path / "run").glob("cache_*"))


@pytest.mark.slow
def test_a_degenerate_split_allowed_for_tests_gives_no_raw_warnings(nih, tmp_path):
    """4 images: no finding has both labels in the test part; the run says so in words."""
    proc = train(nih, tmp_path / "run", "--limit", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr and "nan" not in proc.stderr
    assert "test mean AUC not measurable" in proc.stderr


def test_a_finding_without_positives_in_the_whole_table_is_named_as_such(nih, tmp_path):
    """A site's labels without a single Hernia: the refusal listed the parts without one and
    advised more images or other fractions, and no fraction can put a Hernia in a part."""
    lines = (nih / "labels.csv").read_text().splitlines()
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([lines[0]] + [line for line in lines[1:] if "Hernia" not in line]) + "\n")
    strict = tmp_path / "strict.toml"
    strict.write_text(QUICK.read_text().replace("allow_degenerate_split = true", "").replace("limit = 48", ""))
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "train", "--images", str(nih / "images"), "--metadata",
                           str(labels), "--out", str(tmp_path / "run"), "--config", str(strict), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{labels} has no positive image of Hernia" in proc.stderr, proc.stderr
    assert "label more studies with it" in proc.stderr


def card_number(value, digits=3):
    return "not measurable" if value is None or value != value else f"{value:.{digits}f}"


def card_interval(ci):
    return "" if not ci or None in ci else f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def numeric_leaves(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numeric_leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from numeric_leaves(v)


@pytest.mark.slow
def test_a_trained_bundle_has_a_model_card_of_the_run_s_own_figures(nih, tmp_path):
    """A bundle from `cxr-batch train` had no MODEL_CARD.md, while the bundled weights have one:
    its card gives the run's own figures (those of metrics.json, prepare.json, thresholds.json),
    says which are the test part's and which validation's and that no evaluation on other
    studies was made, and is sealed in the manifest: an edited card is refused."""
    import hashlib
    import re

    from cxr_batch.bundle import BundleError, load_bundle
    from cxr_batch.evidence import MIN_VALIDATION_IMAGES
    from training.config import TrainConfig

    run = tmp_path / "run"
    proc = train(nih, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card_path = run / "bundle" / "MODEL_CARD.md"
    card = card_path.read_text()
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["model_card"] == {"file": "MODEL_CARD.md", "sha256": hashlib.sha256(card.encode()).hexdigest()}
    m = json.loads((run / "metrics.json").read_text())
    data = json.loads((run / "prepare.json").read_text())
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]
    assert thresholds == manifest["thresholds"]

    test, ci = m["test"], m["test_ci95"]
    measured = sum(1 for a in test["auc"] if a is not None and a == a)  # the findings with an AUROC
    over = f"mean AUROC over the {measured} of {len(FINDINGS)} findings with test positives and negatives"
    for line in (f"| {over}, with patient data | {card_number(test['mean_auc'])}{card_interval(ci['mean_auc'])} |",
                 f"| {over}, image only (patient data unknown) | {card_number(m['test_image_only']['mean_auc'])}"
                 f"{card_interval(m['test_image_only']['ci95']['mean_auc'])} |",
                 f"| {over}, patient data alone (logistic regression on age, sex and view) | "
                 f"{card_number(m['patient_only_logistic_regression']['mean_auc'])}"
                 f"{card_interval(m['patient_only_logistic_regression']['ci95'])} |",
                 f"| macro F1 at the thresholds | {card_number(test['f1_macro'])}{card_interval(ci['f1_macro'])} |",
                 f"| share of test studies with at least one flag | "
                 f"{card_number(m['threshold_methods']['dynamic']['studies_flagged'])} |",
                 f"## Test ({test['n']} images, held out by the split)"):
        assert line in card, line
    rows = {}
    for line in card.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    for k, f in enumerate(FINDINGS):
        c = m["test_counts"][f]
        assert rows[f] == [card_number(m["prevalence"][f]), f"{thresholds[f]:g}", card_number(test["auc"][k]),
                           str(c["tp"]), str(c["fn"]), str(c["fp"]), str(c["tn"])], f
    for key, name in (("train", "training"), ("val", "validation"), ("test", "test")):
        assert rows[name] == [str(data["images"][key]), str(data["patients"][key])], name
    for group, g in m["by_group"].items():
        assert rows[group] == [str(g["n"]), card_number(g["mean_auc"]), card_number(g["f1_macro"])], group
    for h in m["history"]:
        assert rows[str(h["epoch"])] == [card_number(h["train_loss"], 4), card_number(h["val_loss"], 4),
                                         card_number(h["f1_macro"]), card_number(h["mean_auc"])]
    assert f"{data['images']['test']} images of {data['patients']['test']} patients, held out by patient" in card
    assert f"**validation**: {m['validation_n']} images" in card
    assert "No evaluation on other studies has been done yet" in card and "cxr-batch evaluate" in card
    assert "lack validation evidence" in card and f"{test['n']} held-out images" in card  # 10 test images
    assert "Initialised from random weights" in card

    # no number the run did not measure or was not configured with (code spans, paths and hashes, aside)
    cfg = TrainConfig.load(QUICK).to_dict()
    allowed = {"95", str(MIN_VALIDATION_IMAGES), str(measured), str(len(FINDINGS))}
    for x in numeric_leaves([m, data, thresholds, cfg]):
        allowed |= {str(x), f"{x:g}", f"{x:.3f}", f"{x:.4f}"}
    prose = re.sub(r"`[^`]*`", "", card)
    shown = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])", prose)
    assert shown and not [x for x in shown if x not in allowed], [x for x in shown if x not in allowed]

    load_bundle(run / "bundle")  # it verifies
    card_path.write_text(card.replace(card_number(test["mean_auc"]), "0.990", 1))
    with pytest.raises(BundleError, match="MODEL_CARD.md fails its checksum"):
        load_bundle(run / "bundle")
    card_path.unlink()
    with pytest.raises(BundleError, match="MODEL_CARD.md, the model card .* names, is missing"):
        load_bundle(run / "bundle")


@pytest.mark.slow
def test_a_site_that_edits_its_model_card_is_told_how_to_get_its_bundle_back(nih, tmp_path):
    """A site that added a line to MODEL_CARD.md to record a local decision had its bundle refused
    ('refusing to use it') with no word of how to recover, and train kept no other copy of the
    card. The refusal stays (the card is what the bundle was approved on, inside bundle_sha256),
    but train leaves a copy in the run folder and the error says to restore the card and keep
    the site's notes in another file of the folder, which loading does not read."""
    import shutil

    from cxr_batch.bundle import BundleError, load_bundle

    run = tmp_path / "run"
    proc = train(nih, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = tmp_path / "site" / "cxr-fpn-quick"
    shutil.copytree(run / "bundle", installed)
    assert (run / "MODEL_CARD.md").read_bytes() == (installed / "MODEL_CARD.md").read_bytes()
    with (installed / "MODEL_CARD.md").open("a") as card:
        card.write("\nLocal decision 2026-12-07: used for PA views only.\n")
    with pytest.raises(BundleError) as refused:
        load_bundle(installed)
    said = str(refused.value)
    assert "edited after the bundle was made" in said, said
    assert "MODEL_CARD.md in the run folder" in said and "SITE_NOTES.md" in said, said
    shutil.copyfile(run / "MODEL_CARD.md", installed / "MODEL_CARD.md")  # what the error says to do
    (installed / "SITE_NOTES.md").write_text("Local decision 2026-12-07: used for PA views only.\n")
    assert load_bundle(installed).manifest["model_card"]["file"] == "MODEL_CARD.md"


@pytest.mark.slow
def test_the_model_card_of_a_run_with_a_tiny_test_part_says_its_figures_are_too_few(nih, tmp_path):
    """quick.toml's run tests 10 images: its card printed 'mean AUROC 0.412 (95% CI 0.363-0.516)'
    as if measured closely, over the findings that happened to have a test positive, unnamed,
    while metrics.json said that 4697 of 4897 resamples were drawn again to keep each finding's
    one positive patient in. The card says the test part is too small to judge the weights by,
    over how many findings the mean is, and quotes the interval's note."""
    import math

    from cxr_batch.evidence import MIN_VALIDATION_IMAGES

    run = tmp_path / "run"
    proc = train(nih, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = (run / "bundle" / "MODEL_CARD.md").read_text()
    m = json.loads((run / "metrics.json").read_text())
    n, measured = m["test"]["n"], sum(1 for a in m["test"]["auc"] if a is not None and math.isfinite(a))
    assert n < MIN_VALIDATION_IMAGES
    assert f"**Too few test images to judge these weights by**: {n} images" in card, card
    assert f"| mean AUROC over the {measured} of {len(FINDINGS)} findings with test positives and negatives, " \
           "with patient data |" in card, card
    note = m["test_ci95"]["notes"]["mean_auc"]
    assert note and f"`{note}`" in card, card
