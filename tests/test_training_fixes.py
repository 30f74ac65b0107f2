"""Issue 15's training fixes: centred patient prior, shared bootstrap, inference preprocessing in
evaluation, an official test list left whole, LRAP as scikit-learn defines it."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import label_ranking_average_precision_score

from cxr_batch.model import ModelConfig, build_model
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing, eval_transform
from cxr_batch.readers import read_pil
from cxr_batch.study import ScoringRules
from training import metrics
from training.config import TrainConfig
from training.data import Context, DecodedImages, predict
from training.prepare import PREPARED, prepare
from training.prior import apply_patient_prior

from .conftest import REPO


def test_lrap_counts_samples_without_labels_as_scikit_learn_does():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 14)) * (rng.random((50, 1)) < 0.6)  # 40% No Finding rows
    p = rng.random((50, 14))
    assert (y.sum(axis=1) == 0).any()
    assert metrics.lrap(y, p) == pytest.approx(label_ranking_average_precision_score(y, p))


def test_the_prior_is_centred_by_default_and_in_the_bundled_recipe():
    assert TrainConfig().patient_prior_center
    assert TrainConfig.load(REPO / "training" / "configs" / "bundled.toml").patient_prior_center


@pytest.mark.parametrize("centred", [True, False])
def test_a_centred_prior_leaves_the_average_training_patient_where_the_network_put_it(centred):
    rng = np.random.default_rng(1)
    tab = np.stack([rng.uniform(0.2, 0.9, 300), rng.integers(0, 2, 300), rng.integers(0, 2, 300)], 1).astype(np.float32)
    y = (rng.random((300, 14)) < 0.05 + 0.3 * tab[:, :1]).astype(int)
    model = build_model(ModelConfig(tabular_skip=True))
    cfg = TrainConfig(patient_prior="logistic", patient_prior_center=centred, model=ModelConfig(tabular_skip=True))
    ctx = Context(cfg, Preprocessing(), PatientEncoding(), torch.device("cpu"), None)
    x = torch.from_numpy(tab)
    with torch.no_grad():
        before = model.tabular_skip(x)
        record = apply_patient_prior(model, tab, y, None, ctx)
        added = (model.tabular_skip(x) - before).numpy()
    if centred:
        assert np.abs(added.mean(axis=0)).max() < 1e-5  # no second intercept
    else:  # v1's choice: the regression's intercept on top of the network's bias
        assert added.mean(axis=0) == pytest.approx(np.array(record["coef"]) @ tab.mean(0) + record["intercept"], abs=1e-4)
    assert {"method", "weight", "centred", "centre", "coef", "intercept", "offset", "formula"} <= set(record)
    assert record["centred"] is centred and np.array(record["coef"]).shape == (14, 3)


def test_evaluation_images_are_the_inference_transform_itself(nih, nih_images):
    prep = Preprocessing(image_size=96)
    table = pd.DataFrame({"image": [p.name for p in nih_images[:3]], "labels": ["No Finding", "Mass", "Hernia|Mass"],
                          "age": ["50", "", "70"], "sex": ["M", "F", ""], "view": ["PA", "AP", "PA"]})
    data = DecodedImages(table, nih / "images", prep, PatientEncoding())
    for i, path in enumerate(nih_images[:3]):
        assert torch.equal(data[i][0], eval_transform(read_pil(path, ScoringRules()), prep))
    torch.manual_seed(0)
    model = build_model(ModelConfig(tabular_skip=True)).eval()
    ctx = Context(TrainConfig(), prep, PatientEncoding(), torch.device("cpu"), None)
    p, y, _ = predict(model, torch.utils.data.DataLoader(data, batch_size=2), ctx)
    with torch.inference_mode():
        want = torch.sigmoid(model(torch.stack([data[i][0] for i in range(3)]), data.tabular)).numpy()
    assert p == pytest.approx(want, abs=1e-6) and y.sum() == 3


def test_an_official_test_list_is_never_undersampled(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(200):
        name = f"{i:08d}_000.png"
        (images / name).touch()  # prepare only needs the names
        labels = "No Finding" if i % 4 else ("Infiltration" if i % 8 else "Mass")
        rows.append((name, labels, str(i), "50", "M", "PA"))
    columns = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "meta.csv", index=False)
    names = [r[0] for r in rows]
    (tmp_path / "train_val.txt").write_text("\n".join(names[:120]))
    (tmp_path / "test.txt").write_text("\n".join(names[120:]))
    cfg = TrainConfig(images=str(images), metadata=str(tmp_path / "meta.csv"), keep_no_finding=0.1, balance_keep_no_finding=1.0,
                      keep_only={"Infiltration": 0.15}, split_lists=(str(tmp_path / "train_val.txt"),
                                                                    str(tmp_path / "test.txt")),
                      allow_degenerate_split=True)  # 200 names only: the split's contents are what is tested
    prepare(cfg, tmp_path / "run")
    table = pd.read_csv(tmp_path / "run" / PREPARED, dtype=str)
    assert sorted(table.loc[table["split"] == "test", "image"]) == names[120:]  # all 80, No Finding included
    fitting = table[table["split"].isin(["train", "val"]) & (table["mirror"] == "0")].drop_duplicates("image")
    assert (fitting["labels"] == "No Finding").sum() == 9  # 10% of the 90 in train_val
    info = json.loads((tmp_path / "run" / "prepare.json").read_text())
    assert info["images"]["test"] == 80 and "official test list is whole" in info["undersampled"]
