"""The training module's pure functions against hand-computed cases and scikit-learn."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, hamming_loss, roc_auc_score

from cxr_batch.findings import FINDINGS
from training import metrics, thresholds
from training.config import TrainConfig
from training.prepare import (MIN_EVAL_IMAGES, assert_patient_disjoint, balance_train, multi_hot,
                              scaled_balance_counts, split_by_patient, split_from_lists, split_problems, undersample)
from training.train import mask_unknown, pos_weights


def table(labels, patients=None):
    n = len(labels)
    return pd.DataFrame({"image": [f"{i:03d}.png" for i in range(n)], "labels": labels,
                         "patient_id": patients or [str(i) for i in range(n)],
                         "age": ["50"] * n, "sex": ["M"] * n, "view": ["PA"] * n})


def test_multi_hot():
    y = multi_hot(pd.Series(["No Finding", "Hernia|Mass", "Atelectasis"]))
    assert y.shape == (3, 14) and y[0].sum() == 0
    assert y[1, FINDINGS.index("Hernia")] == y[1, FINDINGS.index("Mass")] == 1 and y[1].sum() == 2
    with pytest.raises(ValueError):
        multi_hot(pd.Series(["Covid"]))


def test_undersample_keeps_fractions_of_only_findings():
    df = table(["No Finding"] * 10 + ["Infiltration"] * 20 + ["Infiltration|Mass"] * 5 + ["Mass"] * 3)
    out = undersample(df, 0.1, {"Infiltration": 0.25}, np.random.default_rng(0))
    counts = out["labels"].value_counts()
    assert counts["No Finding"] == 1 and counts["Infiltration"] == 5
    assert counts["Infiltration|Mass"] == 5 and counts["Mass"] == 3


def test_split_by_patient_never_crosses_and_hits_fractions():
    patients = [str(i // 2) for i in range(400)]  # two images per patient
    df = table(["No Finding", "Mass", "Effusion", "Hernia"] * 100, patients)
    df["split"] = split_by_patient(df, 0.2, 0.08, seed=1)
    assert_patient_disjoint(df)
    frac = df["split"].value_counts(normalize=True)
    assert frac["test"] == pytest.approx(0.2, abs=0.03) and frac["val"] == pytest.approx(0.08, abs=0.03)
    again = split_by_patient(df, 0.2, 0.08, seed=1)
    assert (again == df["split"]).all()


def test_patient_crossing_is_caught():
    df = table(["Mass", "Mass"], ["7", "7"]).assign(split=["train", "test"])
    with pytest.raises(AssertionError, match="more than one side"):
        assert_patient_disjoint(df)


def test_split_from_official_lists():
    df = table(["Mass"] * 20, [str(i // 2) for i in range(20)])
    test_names = set(df["image"][:6])
    split = split_from_lists(df, set(df["image"][6:]), test_names, val_fraction=0.2, seed=0)
    assert (split[:6] == "test").all() and set(split[6:]) <= {"train", "val"} and (split[6:] == "val").any()


def test_balance_train_mirrors_replicates_and_thins():
    labels = ["Hernia"] * 2 + ["Mass"] * 10 + ["No Finding"] * 8 + ["Atelectasis"] * 4
    df = table(labels)
    out = balance_train(df, multi_hot(df["labels"]), mirror_below=5, replicate_to=6,
                        keep_no_finding=0.25, keep_atelectasis=0.5, rng=np.random.default_rng(0))
    counts = out["labels"].value_counts()
    # Hernia (2 < 5) and Atelectasis (4 < 5) mirrored: 4 and 8; Hernia replicated to 6
    assert counts["Hernia"] == 6 and (out[out["labels"] == "Hernia"]["mirror"] == 1).sum() >= 2
    assert counts["Mass"] == 10 and (out[out["labels"] == "Mass"]["mirror"] == 0).all()
    assert counts["No Finding"] == 2 and counts["Atelectasis"] == 4


def test_balance_counts_scale_with_split_size():
    cfg = TrainConfig()
    assert scaled_balance_counts(cfg, 36000) == (3000, 1500)
    assert scaled_balance_counts(cfg, 3600) == (300, 150)
    assert scaled_balance_counts(TrainConfig(balance_reference=0), 10) == (3000, 1500)


def test_pos_weights_rarer_class_larger_and_overrides():
    y = np.zeros((100, 14), dtype=np.uint8)
    y[:50, 0] = 1
    y[:4, 1] = 1
    w = pos_weights(y, {"Pneumonia": 4.5}, cap=10.0)
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(np.sqrt(96 / 4))
    assert w[FINDINGS.index("Pneumonia")] == 4.5 and w[FINDINGS.index("Hernia")] == 1.0


def test_mask_unknown_uses_the_neutral_code():
    import torch

    torch.manual_seed(0)
    t = torch.zeros(1000, 3)
    masked = mask_unknown(t, 0.3, 0.5)
    assert set(masked.unique().tolist()) == {0.0, 0.5}
    assert masked.eq(0.5).float().mean().item() == pytest.approx(0.3, abs=0.05)


Y = np.array([[1], [1], [0], [0], [1], [0]])
P = np.array([[0.9], [0.35], [0.3], [0.8], [0.7], [0.1]])


def test_youden_hand_case():
    # J = TPR - FPR: 0.9 -> 1/3, 0.8 -> 1/3 - 1/3, 0.7 -> 2/3 - 1/3, 0.35 -> 1 - 1/3 (best), 0.3 -> 1 - 2/3
    assert thresholds.youden(Y, P)[0] == pytest.approx(0.35)
    assert thresholds.youden(np.zeros((4, 1)), np.random.rand(4, 1))[0] == 0.5


def test_precision_constrained_hand_case():
    t, f1 = thresholds.precision_constrained(Y, P, precision_min=0.9)
    # precision >= 0.9 needs t > 0.8: only 0.9 is predicted, recall 1/3 -> F1 0.5 (lowest such t: 0.85)
    assert t[0] == pytest.approx(0.85) and f1[0] == pytest.approx(0.5)
    t, _ = thresholds.precision_constrained(Y, P, precision_min=0.3)
    assert t[0] == pytest.approx(0.35)  # F1 = 6/7 at 0.35 (precision 0.75)


def test_dynamic_lowers_weak_classes():
    y = np.array([[1], [0], [0], [0], [0], [0], [0], [0]])
    p = np.array([[0.2], [0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.3]])
    t = thresholds.dynamic(y, p, precision_min=0.4, f1_floor=0.3, step=0.05)
    best, f1 = thresholds.precision_constrained(y, p, 0.4)
    assert f1[0] < 0.3 and t[0] == pytest.approx(best[0] - 0.05)


def test_summary_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 14))
    p = np.clip(y * 0.3 + rng.random((60, 14)) * 0.7, 0, 1)
    pred = (p >= 0.5).astype(int)
    s = metrics.summary(y, p, pred)
    assert s["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    assert s["accuracy"] == pytest.approx(1 - hamming_loss(y, pred))
    assert s["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert s["auc"][3] == pytest.approx(roc_auc_score(y[:, 3], p[:, 3]))
    assert s["exact_match"] == pytest.approx(np.mean((y == pred).all(axis=1)))
    tn, fp, fn, tp = np.array(s["confusion"][0]).ravel()
    assert tp == ((y[:, 0] == 1) & (pred[:, 0] == 1)).sum() and tn + fp + fn + tp == 60


def test_single_class_auc_is_nan_with_warning():
    y = np.array([[0, 1], [0, 0], [0, 1]])
    p = np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.8]])
    with pytest.warns(UserWarning, match="single label"):
        aucs = metrics.auc_per_class(y, p)
    assert np.isnan(aucs[0]) and aucs[1] == 1.0
    assert metrics.mean_auc(y, p) == 1.0


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (200, 3))
    p = np.clip(y * 0.4 + rng.random((200, 3)) * 0.6, 0, 1)
    ci = metrics.bootstrap_ci(y, p, (p >= 0.5).astype(int), np.arange(200) // 2, n=200, seed=0)
    est = metrics.mean_auc(y, p)
    assert ci["mean_auc"][0] < est < ci["mean_auc"][1]
    f1 = f1_score(y, (p >= 0.5).astype(int), average="macro")
    assert ci["f1_macro"][0] < f1 < ci["f1_macro"][1] and len(ci["auc"]) == 3


def test_a_split_that_cannot_be_evaluated_is_named():
    every = "|".join(FINDINGS)
    part = ["No Finding"] * (MIN_EVAL_IMAGES - 1) + [every]  # each finding once positive, once negative
    good = table(part * 2).assign(split=["val"] * len(part) + ["test"] * len(part))
    assert split_problems(good) == []
    no_hernia = good.copy()
    no_hernia.loc[no_hernia["split"] == "test", "labels"] = "No Finding"
    no_hernia.loc[no_hernia.index[-1], "labels"] = every.replace("|Hernia", "")
    assert split_problems(no_hernia) == ["the test part has no positive image of Hernia"]
    small = good.iloc[: MIN_EVAL_IMAGES + 5]  # validation whole, test 5 images
    problems = split_problems(small)
    assert problems[0] == f"the test part has 5 images, fewer than {MIN_EVAL_IMAGES}"
    assert "the test part has no positive image of Atelectasis, Cardiomegaly" in problems[1]
    all_positive = good.assign(labels=every)
    assert split_problems(all_positive)[0].startswith("the validation part has no negative image of Atelectasis")


def test_a_runs_thresholds_and_test_figures_are_float32_whatever_it_trained_in(nih, tmp_path):
    """On a GPU training runs under bfloat16 autocast; the thresholds it chooses on validation and
    the test figures it writes into the bundle must be those of the float32 model a scan runs
    (bf16 moves probabilities by about 1%: a threshold at 0.30 then flags other studies)."""
    import json

    import torch

    from cxr_batch.model import build_model
    from cxr_batch.patient import PatientEncoding
    from training.config import TrainConfig
    from training.data import FINAL_WEIGHTS, HISTORY, Context
    from training.evaluate import evaluate_run
    from training.prepare import prepare

    from .conftest import REPO

    figures = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        out = tmp_path / name
        cfg = TrainConfig.load(REPO / "training" / "configs" / "quick.toml", images=str(nih / "images"),
                               metadata=str(nih / "labels.csv"), out=str(out), limit=40, bootstrap=0)
        prepare(cfg, out)
        torch.manual_seed(0)
        torch.save(build_model(cfg.model).state_dict(), out / FINAL_WEIGHTS)
        (out / HISTORY).write_text(json.dumps([{"epoch": 1, "train_loss": 0.7, "val_loss": 0.7, "precision_macro": 0.0,
                                                "recall_macro": 0.0, "f1_macro": 0.0, "mean_auc": 0.5, "lr": 1e-3,
                                                "seconds": 1.0}]))
        ctx = Context(cfg, cfg.preprocessing, PatientEncoding(), torch.device("cpu"), amp)
        evaluate_run(cfg, out, ctx)
        figures[name] = json.loads((out / "metrics.json").read_text())["test"]["brier"]
    assert figures["bf16"] == figures["fp32"]
