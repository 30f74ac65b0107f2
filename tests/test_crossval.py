"""Model v2's cross-validation pieces: folds by patient, the prior's exclusion of shared
patients, calibration metrics, the patient bootstrap, combination fitting and its folding into
the network, thresholds on the 0.01 grid, and a tiny resumable training run. Seconds on CPU."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import brier_score_loss, f1_score, roc_auc_score

from cxr_batch.findings import FINDINGS
from cxr_batch.model import ModelConfig, build_model
from training import cvstats
from training.fuse import combined_logits_formula, fold_combination, freeze_tabular_proj
from training.table_prior import PriorConfig, encode_rows, fit_prior, fitting_rows, prior_logits
from training.thresholds import precision_constrained

K = len(FINDINGS)


def random_labels(n, rng, rates=None):
    rates = np.linspace(0.03, 0.3, K) if rates is None else rates
    return (rng.random((n, K)) < rates).astype(int)


# ---------------------------------------------------------------- folds
def test_folds_keep_patients_together_and_spread_rare_findings():
    rng = np.random.default_rng(0)
    y = random_labels(300, rng)
    patients = np.array([str(i // 3) for i in range(300)])  # 3 images per patient
    fold = cvstats.assign_folds(y, patients, 5, seed=1)
    assert set(fold) == set(range(5))
    assert pd.Series(fold).groupby(patients).nunique().max() == 1
    rare = int(np.argmin(y.sum(0)))
    per_fold = [y[fold == f, rare].sum() for f in range(5)]
    assert max(per_fold) - min(per_fold) <= 4
    assert (cvstats.assign_folds(y, patients, 5, seed=1) == fold).all()
    assert not (cvstats.assign_folds(y, patients, 5, seed=2) == fold).all()


def test_rarest_finding_strata():
    y = np.zeros((4, K), int)
    y[0, [0, 13]] = 1  # Hernia is the rarest column here
    y[1, 0] = 1
    y[2, 0] = 1
    y[2, 13] = 1
    assert cvstats.rarest_finding_strata(y).tolist() == [13, 0, 13, -1]


# ---------------------------------------------------------------- prior
def full_table():
    rows = []
    for pid in range(1, 41):
        for fu in range(3):
            label = "Effusion" if (pid % 2 and fu) else "No Finding"
            rows.append({"image": f"{pid:08d}_{fu:03d}.png", "labels": label, "follow_up": str(fu),
                         "patient_id": str(pid), "age": str(30 + pid), "sex": "MF"[pid % 2],
                         "view": "AP" if fu else "PA"})
    rows.append({"image": "x.png", "labels": "Mass", "follow_up": "0", "patient_id": "99", "age": "412",
                 "sex": "", "view": "LL"})
    return pd.DataFrame(rows)


def test_prior_excludes_every_image_of_shared_patients():
    full = full_table()
    shared = {"3", "4", "7"}
    for rows in ("all", "first_image"):
        kept = fitting_rows(full, shared, rows)
        assert not set(kept["patient_id"]) & shared
        assert kept["patient_id"].nunique() == 41 - 3
    assert len(fitting_rows(full, shared, "first_image")) == 38
    prior = fit_prior(full, shared, PriorConfig(rows="all"))
    assert prior["excluded_rows"] == 9 and prior["rows"] == len(full) - 9
    assert np.array(prior["coef"]).shape == (K, 3)
    # centred: the prior of the mean fitting vector is 0
    assert np.allclose(prior_logits(prior, np.array([prior["mean_x"]])), 0.0)
    # AP (view code 1) goes with Effusion in this table
    assert np.array(prior["coef"])[FINDINGS.index("Effusion"), 1] > 0


def test_prior_parses_values_as_inference_does():
    x = encode_rows(full_table().tail(1))
    # implausible age (412) and a lateral view are unknown, empty sex is unknown
    assert x.tolist() == [[0.5, 0.5, 0.5]]


# ---------------------------------------------------------------- metrics
def test_ece_hand_case():
    p = np.array([0.05, 0.05, 0.15, 0.95])
    y = np.array([0, 1, 0, 1])
    # bins: [0,0.1]: two pairs, mean p 0.05, observed 0.5 -> 0.45; (0.1,0.2]: 0.15 vs 0;
    # (0.9,1]: 0.95 vs 1 -> 0.05. ECE = 0.5*0.45 + 0.25*0.15 + 0.25*0.05 = 0.275
    assert cvstats.ece(y, p, 10) == pytest.approx(0.275)
    assert cvstats.ece(np.array([1]), np.array([1.0]), 10) == 0.0  # p = 1 falls in the last bin
    table = cvstats.reliability_table(y, p, 10)
    assert table[0]["n"] == 2 and table[0]["observed"] == 0.5 and table[5]["n"] == 0


def test_ece_is_the_one_cxr_batch_evaluate_computes():
    """A model card's out-of-fold ECE and a site's (cxr-batch evaluate) are one definition: the
    same bins, a probability on a bin edge in the same bin (v3's oof.csv holds 0.1 and 0.4)."""
    from cxr_batch import metrics

    rng = np.random.default_rng(0)
    p = np.concatenate([np.round(rng.random(200), 1), rng.random(200)])  # many on the edges of 10 bins
    y = (rng.random(400) < p).astype(int)
    for bins in (10, 15):
        assert cvstats.ece(y, p, bins) == metrics.ece(y, p, bins)
        table = cvstats.reliability_table(y, p, bins)
        assert [r["n"] for r in table] == metrics.reliability(y, p, bins)["count"]


def test_brier_and_auc_match_sklearn():
    rng = np.random.default_rng(3)
    y = random_labels(200, rng)
    p = np.round(rng.random((200, K)), 1)  # many ties
    assert cvstats.brier(y, p) == pytest.approx(np.mean([brier_score_loss(y[:, k], p[:, k]) for k in range(K)]))
    expected = [roc_auc_score(y[:, k], p[:, k]) for k in range(K)]
    assert np.allclose(cvstats.fast_auc(y, p), expected)
    assert np.allclose(cvstats.auc_per_class(y, p), expected)
    prev = y.mean(0)
    assert cvstats.brier_reference(y, prev) == pytest.approx(np.mean((y - prev) ** 2))


def test_patient_bootstrap_resamples_patients_and_keeps_every_class():
    rng = np.random.default_rng(5)
    y = random_labels(60, rng, rates=np.full(K, 0.08))
    y[0, 13] = 1  # make sure each class has positives
    y[:, 13] = 0
    y[[0, 1], 13] = 1  # a class with two positives: many resamples must be redrawn
    patients = np.array([str(i // 2) for i in range(60)])
    samples, redrawn = cvstats.patient_bootstrap_indices(patients, y, 200, seed=0)
    assert redrawn > 0
    for idx in samples:
        assert len(idx) == 60
        pos = y[idx].sum(0)
        assert (pos > 0).all() and (pos < len(idx)).all()
        assert (idx[0::2] + 1 == idx[1::2]).all()  # a patient's two images travel together


def test_paired_difference_of_identical_scores_is_zero():
    rng = np.random.default_rng(1)
    y = random_labels(100, rng, rates=np.full(K, 0.2))
    s = rng.random((100, K))
    samples, _ = cvstats.patient_bootstrap_indices(np.arange(100), y, 50, 0)
    d = cvstats.paired_difference(y, s, s, samples)
    assert d["difference"] == 0 and d["ci95"] == [0.0, 0.0]


# ---------------------------------------------------------------- combination
def synthetic_evidence(n, rng, a=0.8, c=1.2):
    z_img, z_prior = rng.normal(size=(n, K)), rng.normal(size=(n, K))
    b = np.linspace(-3, -1, K)
    y = (rng.random((n, K)) < cvstats.sigmoid(a * z_img + c * z_prior + b)).astype(int)
    return z_img, z_prior, y, b


def test_shared_combination_recovers_its_parameters():
    rng = np.random.default_rng(0)
    z_img, z_prior, y, b = synthetic_evidence(4000, rng)
    fit = cvstats.fit_combination(z_img, z_prior, y, "shared", C=np.inf)
    assert fit["a"][0] == pytest.approx(0.8, abs=0.08) and fit["c"][0] == pytest.approx(1.2, abs=0.1)
    assert np.allclose(fit["b"], b, atol=0.25)


def test_sum_offset_matches_prevalence_and_weights_stay_non_negative():
    rng = np.random.default_rng(2)
    z_img, z_prior, y, _ = synthetic_evidence(500, rng)
    fit = cvstats.fit_combination(z_img, z_prior, y, "sum")
    p = cvstats.sigmoid(cvstats.apply_combination(fit, z_img, z_prior))
    assert np.allclose(p.mean(0), y.mean(0), atol=1e-6)  # the score equation of the intercept
    for method in ("per_finding", "image_per_finding", "shared"):
        flipped = cvstats.fit_combination(-z_img, z_prior, y, method)
        assert max(flipped["a"]) == 0.0 and min(flipped["c"]) > 0, method
    assert cvstats.fit_combination(z_img, -z_prior, y, "prior_only")["c"] == [0.0] * K
    # one finding's image logits flipped: only that finding loses its image weight
    z = z_img.copy()
    z[:, 3] *= -1
    per = cvstats.fit_combination(z, z_prior, y, "image_per_finding")
    assert per["a"][3] == 0.0 and min(per["a"][:3] + per["a"][4:]) > 0 and len(set(per["c"])) == 1


def test_prior_only_keeps_the_prior_ranking():
    rng = np.random.default_rng(6)
    z_img, z_prior, y, _ = synthetic_evidence(300, rng)
    p = cvstats.sigmoid(cvstats.apply_combination(cvstats.fit_combination(z_img, z_prior, y, "prior_only"), z_img, z_prior))
    assert np.allclose(cvstats.auc_per_class(y, p), cvstats.auc_per_class(y, z_prior))


def test_cross_fit_never_uses_a_rows_own_label():
    rng = np.random.default_rng(4)
    z_img, z_prior, y, _ = synthetic_evidence(200, rng)
    folds = np.arange(200) % 5
    p = cvstats.cross_fit(z_img, z_prior, y, folds, "per_finding")
    y2 = y.copy()
    y2[folds == 0] = 1 - y2[folds == 0]  # changing fold 0's labels cannot change fold 0's predictions
    p2 = cvstats.cross_fit(z_img, z_prior, y2, folds, "per_finding")
    assert np.allclose(p[folds == 0], p2[folds == 0])


def test_folding_the_combination_into_the_model_gives_the_formula():
    torch.manual_seed(0)
    model = build_model(ModelConfig(tabular_skip=True)).eval()
    unknown = torch.full((3,), 0.5)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        z_img = model(images, unknown.expand(4, 3)).numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    a, c, b = rng.uniform(0.2, 1.5, K), rng.uniform(0.5, 2, K), rng.normal(-2, 0.5, K)
    coef, mean_x = rng.normal(size=(K, 3)), np.array([0.47, 0.4, 0.43])
    freeze_tabular_proj(model, unknown)
    with torch.no_grad():  # freezing alone changes nothing at the unknown code
        assert torch.allclose(model(images, unknown.expand(4, 3)), torch.from_numpy(z_img).float(), atol=1e-5)
    fold_combination(model, unknown, a, c, b, coef, mean_x)
    x = np.array([[0.57, 0.0, 1.0], [0.3, 1.0, 0.0], [0.5, 0.5, 0.5], [0.9, 0.0, 0.5]], dtype=np.float32)
    with torch.no_grad():
        got = torch.sigmoid(model(images, torch.from_numpy(x))).numpy()
    want = cvstats.sigmoid(combined_logits_formula(z_img, x, a, c, b, coef, mean_x))
    assert np.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # the deep path no longer sees patient data: only the linear skip does
        h1 = model.tabular_proj(torch.from_numpy(x))
    assert torch.allclose(h1, h1[:1].expand_as(h1))


def test_alignment_matches_the_reference_moments():
    rng = np.random.default_rng(8)
    z = rng.normal(2.0, 3.0, size=(500, K))
    scale, shift = cvstats.alignment(np.full(K, -1.0), np.full(K, 0.5), z)
    out = scale * z + shift
    assert np.allclose(out.mean(0), -1.0) and np.allclose(out.std(0), 0.5)


# ---------------------------------------------------------------- thresholds
def test_grid_thresholds_hand_case_and_agreement_with_the_training_search():
    y = np.zeros((10, K), int)
    p = np.tile(np.linspace(0.05, 0.95, 10)[:, None], (1, K))
    y[7:, :] = 1  # the three highest are positive
    for method in ("youden", "f1", "precision_f1"):
        t = cvstats.grid_thresholds(y, p, method)
        assert t[0] == pytest.approx(0.75)  # highest threshold that keeps p = 0.75 (ties -> fewer flags)
    rng = np.random.default_rng(7)
    y = random_labels(300, rng)
    p = np.clip(y * 0.2 + rng.random((300, K)) * 0.6, 0, 1)
    grid = np.round(np.arange(0.10, 0.85 + 1e-9, 0.05), 2)
    ours = cvstats.grid_thresholds(y, p, "precision_f1", grid=grid)
    theirs, _ = precision_constrained(y, p, 0.30, grid)
    for k in range(K):  # same F1 (tie-breaks differ: the training search takes the lowest)
        assert f1_score(y[:, k], p[:, k] >= ours[k]) == pytest.approx(f1_score(y[:, k], p[:, k] >= theirs[k]))
    assert cvstats.GRID_001[0] == 0.01 and cvstats.GRID_001[-1] == 0.99 and len(cvstats.GRID_001) == 99


# ---------------------------------------------------------------- a tiny training run
def test_tiny_training_run_saves_snapshots_and_resumes(tmp_path):
    from training.crossval import Variant, train_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 36, 36), dtype=np.uint8)
    y = random_labels(8, rng, rates=np.full(K, 0.4)).astype(np.float32)
    v = Variant(name="t", image_size=32, epochs=1, snapshots=[1], batch_size=4)
    first = train_model(images, y, v, seed=0, folder=tmp_path, held_out=images[:3])
    assert first["snapshots"][1]["ema_held_out"].shape == (3, K)
    longer = Variant(name="t", image_size=32, epochs=2, snapshots=[1, 2], batch_size=4)
    again = train_model(images, y, longer, seed=0, folder=tmp_path, held_out=images[:3])
    assert [h["epoch"] for h in again["history"]] == [1, 2]
    assert np.allclose(again["snapshots"][1]["raw_held_out"], first["snapshots"][1]["raw_held_out"])
    fresh = train_model(images, y, longer, seed=0, folder=tmp_path / "fresh", held_out=images[:3])
    assert np.allclose(fresh["snapshots"][2]["raw_held_out"], again["snapshots"][2]["raw_held_out"], atol=1e-4)
    with pytest.raises(ValueError):
        Variant(name="bad", epochs=2, snapshots=[3])


# ---------------------------------------------------------------- choosing among recipes
def _cand(variant, cost, auc, epoch=10):
    return {"id": f"{variant}/e{epoch}/ema/rep0", "variant": variant, "cost": cost, "repeat": 0,
            "image_only_mean_auc": auc, "image_size": int(64 * cost ** 0.5), "epoch": epoch, "weights": "ema"}


def test_choice_keeps_the_cheapest_recipe_unless_a_gain_is_sure_and_affordable():
    from training.crossval import choose

    cheap, costly, huge = _cand("g64", 1.0, 0.56), _cand("g96", 2.25, 0.60), _cand("g128", 4.0, 0.65)
    sure = {"ci95": [0.01, 0.05]}
    unsure = {"ci95": [-0.01, 0.05]}
    # a better point estimate is not enough: the paired CI must lie above 0
    assert choose([cheap, costly], {f"{costly['id']} - {cheap['id']}": unsure})["variant"] == "g64"
    assert choose([cheap, costly], {f"{costly['id']} - {cheap['id']}": sure})["variant"] == "g96"
    # a sure gain over the speed budget is not taken; order is by cost, not by config order
    comps = {f"{huge['id']} - {cheap['id']}": sure, f"{costly['id']} - {cheap['id']}": unsure,
             f"{huge['id']} - {costly['id']}": sure}
    assert choose([huge, costly, cheap], comps, max_cost=2.25)["variant"] == "g64"
    assert choose([huge, costly, cheap], comps)["variant"] == "g128"
    # within a variant, the best snapshot by image-only AUROC
    assert choose([cheap, _cand("g64", 1.0, 0.58, epoch=20)], {})["epoch"] == 20


def test_training_without_checkpoints_and_with_a_seed_offset(tmp_path):
    from training.crossval import Variant, train_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 36, 36), dtype=np.uint8)
    y = random_labels(8, rng, rates=np.full(K, 0.4)).astype(np.float32)
    v = Variant(name="t", image_size=32, epochs=1, snapshots=[1], batch_size=4, seed_offset=5)
    assert Variant(name="c", image_size=96).cost == 2.25
    out = train_model(images, y, v, seed=0, folder=tmp_path / "a", held_out=images[:2], checkpoint_every=0)
    assert not (tmp_path / "a" / "checkpoint.pt").exists() and out["snapshots"][1]["raw_held_out"].shape == (2, K)
    train_model(images, y, v, seed=0, folder=tmp_path / "b", held_out=images[:2])
    assert (tmp_path / "b" / "checkpoint.pt").exists()


def test_caches_stand_in_for_missing_images(tmp_path):
    import json

    from training.crossval import CVConfig, Variant, caches_ready

    cfg = CVConfig(variants=[Variant(name="a", image_size=64), Variant(name="b", image_size=96)])
    names = ["b.png", "a.png"]
    assert not caches_ready(tmp_path, names, cfg)
    (tmp_path / "cache").mkdir()
    for size in (72, 107):
        (tmp_path / "cache" / f"cache_{size}.json").write_text(json.dumps({"size": size, "names": sorted(names)}))
        (tmp_path / "cache" / f"cache_{size}.u8").write_bytes(bytes(2 * size * size))
    assert not caches_ready(tmp_path, names, cfg)  # held-out images are scored on the model views: needed too
    for size in (64, 96):
        (tmp_path / "cache" / f"views_{size}_0.9.json").write_text(
            json.dumps({"size": size, "crop_fraction": 0.9, "names": sorted(names)}))
        (tmp_path / "cache" / f"views_{size}_0.9.f32").write_bytes(bytes(2 * size * size * 4))
    assert caches_ready(tmp_path, names, cfg)
    (tmp_path / "cache" / "views_96_0.9.f32").unlink()  # an index without its data is no cache
    assert not caches_ready(tmp_path, names, cfg)
    assert not caches_ready(tmp_path, names + ["c.png"], cfg)  # a cache of other images does not count


def test_shipped_cv_configs_load_and_the_gpu_budget_excludes_128_px():
    from pathlib import Path

    from training.crossval import CVConfig

    root = Path(__file__).resolve().parent.parent / "training" / "configs"
    assert CVConfig.from_toml(root / "v2.toml").variant("px64").image_size == 64
    gpu = CVConfig.from_toml(root / "v2_gpu.toml")
    assert [v.name for v in gpu.variants if v.cost <= gpu.max_cost] == ["g64", "g96", "g64ls"]


@pytest.mark.parametrize("text, says", [
    ("folds = 5\nfold = 3\n", "unknown key(s) ['fold']"),
    ("[[variant]]\nname = 'a'\nlearning_rate = 0.1\n", "unknown key(s) ['learning_rate']"),
    ("[[variant]]\nname = 'a'\nepochs = '2'\n", "epochs = '2' should be int"),
    ("[[variant]]\nname = 'a'\nsnapshots = 2\n", "snapshots = 2 should be a list of whole numbers"),
    ("[[variant]]\nname = 'a'\nepochs = 2\nsnapshots = [3]\n", "outside 1..2"),
    ("folds = 1\n", "folds = 1: at least 2"),
    ("max_cost = -1\n[[variant]]\nname = 'a'\n", "max_cost = -1"),
    ("max_cost = 'fast'\n", "max_cost = 'fast' should be a number"),
    ("[[variant]]\nname = 'a'\n[[variant]]\nname = 'a'\n", "variant names repeat (a)"),
    ("[[prior]]\nrow = 'all'\n", "unknown key(s) ['row']"),
    ("folds = [\n", "not valid TOML"),
])
def test_a_config_typo_is_named_before_any_training(tmp_path, text, says):
    from training.crossval import ConfigError, CVConfig

    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        CVConfig.from_toml(tmp_path / "c.toml")
    assert says in str(e.value)


def test_the_logits_a_cross_validation_keeps_are_those_a_scan_computes(tmp_path, nih):
    """Every choice of the cross-validation (snapshot, combination, thresholds, the final model's
    alignment) rests on the logits it stores for held-out images: they must come from the
    inference transform (crop the decoded image, then resize), not from the training cache
    (resize to image_size / 0.9, then crop and resize again). At 64 px the two differ by 4.65
    grey levels on average (benchmarks/eval_input_gap.py --weights weights/cxr-fpn-v3)."""
    import pandas as pd
    import torch

    from cxr_batch.preprocess import Preprocessing, eval_transform
    from cxr_batch.readers import read_pil
    from cxr_batch.study import ScoringRules
    from training.crossval import Variant, build_v2_model, main

    labels = pd.read_csv(nih / "labels.csv", dtype=str, keep_default_na=False).iloc[:24]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "cv.toml").write_text('folds = 2\ntest_fraction = 0.25\n\n[[variant]]\nname = "t"\nimage_size = 32\n'
                                      'epochs = 1\nsnapshots = [1]\nbatch_size = 4\n')
    out = tmp_path / "cv"
    main(["--images", str(nih / "images"), "--labels", str(tmp_path / "labels.csv"), "--metadata-table",
          str(nih / "metadata" / "Data_Entry_2017_v2020.csv.gz"), "--out", str(out), "--config",
          str(tmp_path / "cv.toml"), "--stage", "final", "--variant", "t", "--checkpoint-every", "0", "--threads", "1"])
    preds = np.load(out / "t" / "final" / "preds.npz")
    model = build_v2_model(Variant(name="t", image_size=32, epochs=1, snapshots=[1], batch_size=4)).eval()
    model.load_state_dict(torch.load(out / "t" / "final" / "state_ema_epoch1.pt", weights_only=True))
    prep = Preprocessing(image_size=32)
    test = labels["Image Index"].to_numpy()[preds["test_rows"]]
    x = torch.stack([eval_transform(read_pil(nih / "images" / name, ScoringRules()), prep) for name in test])
    with torch.inference_mode():
        scan = model(x, torch.full((len(x), 3), 0.5)).numpy()
    assert len(test) > 0 and np.allclose(preds["ema_test"][0], scan, atol=1e-4)


def test_too_few_bootstrap_resamples_for_a_95_interval_are_refused_before_any_work(tmp_path):
    """`python -m training.crossval` with bootstrap = 50 ran the folds and wrote 95% intervals
    (and the paired differences the choice rests on) from 50 resamples, which `cxr-batch
    evaluate` and `cxr-batch train` refuse: the same minimum (cxr_batch.metrics.MIN_RESAMPLES),
    refused when the config is read."""
    import re

    from cxr_batch.metrics import MIN_RESAMPLES
    from training.crossval import CVConfig, ConfigError

    from .conftest import REPO

    text = (REPO / "training" / "configs" / "v3.toml").read_text()
    assert re.search(r"(?m)^bootstrap = \d+", text)
    for n, refused in ((50, True), (MIN_RESAMPLES - 1, True), (MIN_RESAMPLES, False)):
        (tmp_path / "cv.toml").write_text(re.sub(r"(?m)^bootstrap = \d+", f"bootstrap = {n}", text))
        if refused:
            with pytest.raises(ConfigError, match=f"bootstrap = {n}: at least {MIN_RESAMPLES} resamples"):
                CVConfig.from_toml(tmp_path / "cv.toml")
        else:
            assert CVConfig.from_toml(tmp_path / "cv.toml").bootstrap == MIN_RESAMPLES
