"""training.export_v3 on synthetic cross-validation files: what it compares is what it ships."""

from dataclasses import replace

import numpy as np

from cxr_batch.findings import FINDINGS
from training import cvstats
from training.crossval import CVConfig
from training.export_v3 import ensemble_comparison

from .conftest import REPO


def test_rule_8_compares_the_ensemble_with_the_final_model_that_ships(tmp_path):
    """The final model's image logits reach the bundle aligned to the fold models' scale
    (``cvstats.alignment``) before the combination: rule 8 must score those, not the raw ones,
    or it compares the ensemble with a model of another image-to-patient-data balance."""
    cfg = replace(CVConfig.from_toml(REPO / "training" / "configs" / "v3.toml"), bootstrap=50)
    rng = np.random.default_rng(0)
    n, K = 300, len(FINDINGS)
    y = (rng.random((n, K)) < 0.2).astype(float)
    y[:4] = 1 - y[:4]  # both labels in every finding
    evidence = y + rng.normal(0, 1.0, (n, K))
    z_prior = y + rng.normal(0, 1.0, (n, K))
    patients = np.arange(n).astype(str)
    for f in range(cfg.folds):
        folder = tmp_path / "v3g64" / "rep0" / f"fold{f}"
        folder.mkdir(parents=True)
        np.savez(folder / "preds.npz", epochs=np.array([80]), ema_test=(evidence + rng.normal(0, 0.3, (n, K)))[None])
    (tmp_path / "v3g64" / "final").mkdir(parents=True)
    final = 4.0 * evidence - 1.0  # the same evidence on a wider scale than the fold models'
    np.savez(tmp_path / "v3g64" / "final" / "preds.npz", epochs=np.array([80]), ema_test=final[None])
    comb = {"a": [1.0] * K, "c": [1.0] * K, "b": [-1.5] * K}
    scale, offset = np.full(K, 0.25), np.full(K, 0.25)  # what cvstats.alignment gave for it

    got = ensemble_comparison(tmp_path, {"epoch": 80, "weights": "ema"}, "v3g64", z_prior, comb, y, patients, cfg,
                              (scale, offset))

    shipped = 1.0 * (scale * final + offset) + 1.0 * z_prior - 1.5  # export_v3's folded formula, label shift aside
    assert got["mean_auc"]["final"] == cvstats.mean_auc(y, shipped)
    assert got["mean_auc"]["final"] != cvstats.mean_auc(y, final + z_prior)  # the raw logits rank otherwise
