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

