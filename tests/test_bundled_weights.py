"""The bundled weights: they load, verify, and rank real held-out radiographs better than chance."""

import json

import numpy as np
import pytest
import torch

from cxr_batch.bundle import load_bundle
from cxr_batch.findings import FINDINGS
from cxr_batch.preprocess import eval_transform
from cxr_batch.readers import read_pil
from cxr_batch.study import ScoringRules

from .conftest import V1_BUNDLE


def test_bundled_manifest_documents_training_and_metrics():
    manifest = json.loads((V1_BUNDLE / "manifest.json").read_text())
    assert manifest["findings"] == list(FINDINGS)
    assert manifest["training"]["data"]["images"]["test"] > 50
    assert 0.5 < manifest["metrics"]["test_mean_auc"] <= 1.0
    assert manifest["weights_dtype"] == "float16"


def test_bundled_weights_rank_held_out_patients_above_chance(nih):
    """On the 96 test patients the bundle was never trained or tuned on, with patient data."""
    from training.config import TrainConfig
    from training.prepare import multi_hot, read_nih_metadata, split_by_patient
    from training.data import encode_patients
    from training import metrics

    bundle = load_bundle(V1_BUNDLE)
    cfg = TrainConfig.load(V1_BUNDLE.parent.parent / "training" / "configs" / "bundled.toml")
    table = read_nih_metadata(nih / "labels.csv")
    table["split"] = split_by_patient(table, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    test = table[table["split"] == "test"]
    assert len(test) == bundle.manifest["training"]["data"]["images"]["test"]
    x = torch.stack([eval_transform(read_pil(nih / "images" / n, ScoringRules()), bundle.preprocessing)
                     for n in test["image"]])
    tab = torch.from_numpy(encode_patients(test, bundle.encoding))
    with torch.inference_mode():
        p = torch.sigmoid(bundle.model(x, tab)).numpy()
    auc = metrics.mean_auc(multi_hot(test["labels"]), p)
    # the model card's figure, reproduced (float32 here, as in training's evaluation)
    assert auc == pytest.approx(bundle.manifest["metrics"]["test_mean_auc"], abs=0.01)
    assert auc > 0.6
    assert np.isfinite(p).all()


def test_v2_card_numbers_are_recomputed_from_its_out_of_fold_predictions():
    """v2.1's headline numbers come from training_run/oof.csv, which anyone can check: mean
    AUROC over the 14 findings and the per-finding counts at the bundle's thresholds."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    v2 = V1_BUNDLE.parent / "cxr-fpn-v2"
    bundle = load_bundle(v2)
    assert bundle.version == "2.1"
    oof = pd.read_csv(v2 / "training_run" / "oof.csv")
    metrics = bundle.manifest["metrics"]
    assert len(oof) == metrics["test_n"] == 480 and oof["patient_id"].nunique() == 480
    auc = np.mean([roc_auc_score(oof[f"y_{f}"], oof[f"p_{f}"]) for f in FINDINGS])
    assert abs(auc - metrics["test_mean_auc"]) < 1e-3  # oof.csv keeps 5 decimals
    for f in FINDINGS:
        positive, flagged = oof[f"y_{f}"] == 1, oof[f"p_{f}"] >= bundle.thresholds[f]
        assert metrics["per_finding"][f] == {"tp": int((positive & flagged).sum()), "fn": int((positive & ~flagged).sum())}
    assert "not for clinical use" in bundle.manifest["intended_use"]



def test_v3_held_out_figures_are_recomputed_from_its_held_out_predictions():
    """The default bundle (v3) ships its held-out test's predictions (training_run/
    heldout_predictions.csv, written by training.heldout from `cxr-batch evaluate`): the card's
    and manifest's held-out headline, per-finding counts and worklist figures are recomputed here
    from them, and the held-out patients are none of the development patients."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from cxr_batch.bundle import DEFAULT_BUNDLE

    bundle = load_bundle()
    assert bundle.path == DEFAULT_BUNDLE and bundle.version == "3.0"
    run = DEFAULT_BUNDLE / "training_run"
    held = pd.read_csv(run / "heldout_predictions.csv", dtype={"patient_id": str}, keep_default_na=False)
    oof = pd.read_csv(run / "oof.csv", dtype={"patient_id": str})
    metrics = bundle.manifest["metrics"]
    assert len(held) == metrics["test_n"] > 300
    assert not set(held["patient_id"]) & set(oof["patient_id"]) and not set(held["image"]) & set(oof["image"])
    assert sorted(held["image"]) == bundle.manifest["training"]["data"]["held_out_test_images"]
    y = held[[f"y_{f}" for f in FINDINGS]].to_numpy()
    auc = np.mean([roc_auc_score(y[:, k], held[f"p_{f}"]) for k, f in enumerate(FINDINGS)])
    assert abs(auc - metrics["test_mean_auc"]) < 1e-3  # results.csv keeps 4 decimals
    for k, f in enumerate(FINDINGS):
        flagged = held["findings"].str.split(";").apply(lambda names: f in names)
        assert metrics["per_finding"][f] == {"tp": int((flagged & (y[:, k] == 1)).sum()),
                                             "fn": int((~flagged & (y[:, k] == 1)).sum())}
    # the worklist: rank 1..n, and what the card quotes of it
    triage = metrics["heldout"]["with_patient_data"]["triage"]
    assert sorted(held["worklist_rank"].astype(int)) == list(range(1, len(held) + 1))
    any_finding = y.max(axis=1)
    assert abs(roc_auc_score(any_finding, -held["worklist_rank"].astype(int)) - triage["worklist_auroc_any_finding"]) < 1e-6
    normal = held["priority"] == "normal"
    assert abs(normal[any_finding == 0].mean() - triage["buckets"]["without_a_finding"]["normal"]) < 1e-9
    assert (held.loc[normal, "findings"] == "").all()  # a normal study carries no flag
    assert "not for clinical use" in bundle.manifest["intended_use"]
    assert "reference" in bundle.manifest  # drift monitoring has something to compare with


def test_v3_held_out_predictions_are_what_the_bundle_scores_now(nih, tmp_path):
    """Every held-out figure of the v3 card is recomputed from training_run/heldout_predictions.csv
    (above); those predictions must be what `cxr-batch evaluate` gives with the shipped bundle
    today, or the card describes another model. Twelve of the held-out images of ../shared/data/nih,
    scored as training.heldout scores them (float32, with their patient data)."""
    import subprocess
    import sys

    import pandas as pd

    from cxr_batch.bundle import DEFAULT_BUNDLE

    held = pd.read_csv(DEFAULT_BUNDLE / "training_run" / "heldout_predictions.csv", dtype=str, keep_default_na=False)
    table = pd.read_csv(nih / "labels.csv", dtype=str, keep_default_na=False)
    names = sorted(set(held["image"]) & set(table["Image Index"]))[:12]
    assert len(names) == 12
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in names:
        (studies / name).symlink_to(nih / "images" / name)
    labels = tmp_path / "labels.csv"
    table[table["Image Index"].isin(names)][["Image Index", "Finding Labels", "Patient ID", "Patient Age",
                                               "Patient Gender", "View Position"]].to_csv(labels, index=False)
    done = subprocess.run([sys.executable, "-m", "cxr_batch", "evaluate", studies, "--labels", labels,
                           "--out", tmp_path / "eval", "--device", "cpu", "--precision", "fp32", "--bootstrap", "0",
                           "--follow-links", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    now = pd.read_csv(tmp_path / "eval" / "results.csv", dtype=str, keep_default_na=False).set_index("file").loc[names]
    shipped = held.set_index("image").loc[names]
    p = [f"p_{f}" for f in FINDINGS] + ["p_any"]
    assert np.abs(now[p].astype(float).to_numpy() - shipped[p].astype(float).to_numpy()).max() < 5e-5
    assert list(now["priority"]) == list(shipped["priority"]) and list(now["findings"]) == list(shipped["findings"])


def _numbers(line: str) -> list[str]:
    """The numbers of a table row as written: '0.671-0.747' is two numbers, '+0.094' one."""
    import re

    return re.findall(r"(?<![\d.])[+-]?\d+(?:\.\d+)?", line)


def _agrees(written: str, measured: float) -> bool:
    """A figure written with d decimals agrees with the measured value rounded to d decimals."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    return abs(float(written) - measured) <= 0.5 * 10 ** -decimals + 1e-9


def _card_row(card: str, label: str) -> tuple[str, list[str]]:
    rows = [line for line in card.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"the card has {len(rows)} rows '{label}'"
    return rows[0], _numbers(rows[0][len(f"| {label} |"):].replace("95% CI", ""))


def test_v3_card_tables_are_the_figures_its_files_compute():
    """Every figure of the v3 card's headline table (held out and out of fold) and of its held-out
    per-finding table, against training_run/heldout.json (what `python -m training.heldout --cv
    weights/cxr-fpn-v3/training_run ...` prints), the out-of-fold predictions (oof.csv), the
    report (cv_report.json) and the out-of-fold triage (export_check.json): a figure edited in the
    card or a file re-made without the card fails here."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from cxr_batch.bundle import DEFAULT_BUNDLE

    run = DEFAULT_BUNDLE / "training_run"
    card = (DEFAULT_BUNDLE / "MODEL_CARD.md").read_text()
    held = json.loads((run / "heldout.json").read_text())
    report = json.loads((run / "cv_report.json").read_text())
    oof_triage = json.loads((run / "export_check.json").read_text())["triage_out_of_fold"]
    oof = pd.read_csv(run / "oof.csv")
    y = oof[[f"y_{f}" for f in FINDINGS]].to_numpy()

    def oof_auc(prefix: str) -> float:
        return float(np.mean([roc_auc_score(y[:, k], oof[f"{prefix}{f}"]) for k, f in enumerate(FINDINGS)]))

    wp, t = held["with_patient_data"], held["with_patient_data"]["triage"]
    gain, oof_gain = held["gain_over_metadata_only"], report["gain_over_metadata_only"]["vs_full_table_regression"]
    expected = {
        "mean AUROC with patient data": [wp["mean_auroc"], *wp["mean_auroc_ci95"], oof_auc("p_"),
                                         *report["model_with_patient_data"]["mean_auc_ci95"]],
        "image only": [held["image_only"]["mean_auroc"], *held["image_only"]["mean_auroc_ci95"], oof_auc("img_logit_")],
        "age/sex/view regression (full NIH table)": [held["metadata_only_regression_mean_auroc"], oof_auc("prior_logit_")],
        "gain over that regression": [gain["difference"], *gain["ci95"], oof_gain["difference"], *oof_gain["ci95"]],
        "studies flagged / flags per study": [100 * t["studies_flagged"], t["flags_per_study"],
                                              100 * oof_triage["flagged_share"], oof_triage["flags_per_study"]],
        '"normal" bucket: of studies without a finding / with one': [
            100 * t["buckets"]["without_a_finding"]["normal"], 100 * t["buckets"]["with_a_finding"]["normal"],
            100 * oof_triage["normal_share_of_no_finding"], 100 * oof_triage["normal_share_of_abnormal"]],
        "worklist order: AUROC for any finding": [t["worklist_auroc_any_finding"], oof_triage["worklist_auroc_any_finding"]],
        "worklist order: AUROC for pneumothorax": [t["worklist_auroc_pneumothorax"],
                                                   held["per_finding"]["Pneumothorax"]["positives"],
                                                   oof_triage["worklist_auroc_pneumothorax"], int(y[:, 7].sum())],
    }
    for f, d in held["per_finding"].items():
        expected[f.replace("_", " ").capitalize()] = [
            d["positives"], d["auroc"], *(d["auroc_ci95"] or []), d["auroc_image_only"], d["auroc_metadata_only"],
            d["sensitivity"], d["specificity"], d["ppv"], d["flag_rate"], d["ece"]]
    for label, measured in expected.items():
        line, written = _card_row(card, label)
        assert len(written) == len(measured), (line, measured)
        wrong = [(w, round(m, 4)) for w, m in zip(written, measured) if not _agrees(w, m)]
        assert not wrong, f"{line}: written vs measured {wrong}"
