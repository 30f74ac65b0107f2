import json
import shutil

import numpy as np
import pytest
import torch

from cxr_batch.bundle import BundleError, load_bundle, save_bundle, write_manifest
from cxr_batch.findings import FINDINGS
from cxr_batch.model import build_model
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing, eval_transform
from cxr_batch.readers import read_pil
from cxr_batch.study import ScoringRules


def test_manifest_is_self_describing(small_bundle):
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    assert manifest["findings"] == list(FINDINGS)
    assert manifest["preprocessing"]["image_size"] == 96
    assert manifest["patient_encoding"]["unknown_value"] == 0.5
    assert set(manifest["thresholds"]) == set(FINDINGS)
    assert len(manifest["sha256"]) == 64


def test_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(3)
    model = build_model().eval()
    save_bundle(tmp_path / "b", model, name="rt", version="1", preprocessing=Preprocessing(),
                encoding=PatientEncoding(), thresholds={f: 0.4 for f in FINDINGS})
    loaded = load_bundle(tmp_path / "b")
    x, t = torch.randn(2, 3, 64, 64), torch.rand(2, 3)
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded.model(x, t))
    assert loaded.thresholds["Hernia"] == 0.4 and loaded.label == "rt@1"


def test_tampered_weights_are_refused(small_bundle, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(small_bundle, copy)
    data = bytearray((copy / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(copy)


def test_a_bundle_of_a_newer_format_is_refused_naming_both_formats(small_bundle, tmp_path):
    """A bundle exported by a newer cxr-batch may carry settings this version does not read (a
    preprocessing step it would skip): its scores would be wrong without a word. It is refused."""
    copy = tmp_path / "newer"
    shutil.copytree(small_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 3
    manifest["preprocessing"]["invert"] = True  # a step this version would not apply
    write_manifest(copy, manifest)  # sealed as the newer version would have sealed it
    with pytest.raises(BundleError, match="newer cxr-batch.*format 3.*format 2"):
        load_bundle(copy)
    manifest["format_version"] = "3.0"
    write_manifest(copy, manifest)
    with pytest.raises(BundleError, match="newer cxr-batch"):
        load_bundle(copy)


def test_missing_or_broken_manifest_is_refused(tmp_path):
    with pytest.raises(BundleError, match="not a folder"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="manifest"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "b")


def test_half_precision_storage_keeps_probabilities(tmp_path, nih_images):
    torch.manual_seed(5)
    model = build_model().eval()
    common = dict(name="h", version="1", preprocessing=Preprocessing(image_size=128), encoding=PatientEncoding(),
                  thresholds={f: 0.5 for f in FINDINGS})
    full = load_bundle(save_bundle(tmp_path / "f32", model, **common))
    half = load_bundle(save_bundle(tmp_path / "f16", model, half=True, **common))
    assert (tmp_path / "f16" / "model.pt").stat().st_size < 0.6 * (tmp_path / "f32" / "model.pt").stat().st_size
    x = torch.stack([eval_transform(read_pil(p, ScoringRules()), full.preprocessing) for p in nih_images[:4]])
    t = torch.tensor([[0.5, 0.0, 1.0]] * 4)
    with torch.no_grad():
        p32, p16 = torch.sigmoid(full.model(x, t)), torch.sigmoid(half.model(x, t))
    assert np.abs((p32 - p16).numpy()).max() < 5e-3


def test_weights_given_a_folder_of_bundles_or_no_bundle_name_the_weights_not_the_out(small_bundle, studies, tmp_path):
    # `--weights weights` (the folder the bundles are in) said only "has no manifest.json"; and
    # `--weights /tmp --out /tmp/x` blamed --out ("is the weights bundle /tmp or inside it")
    from tests.test_evaluate_calibrate import cli_here

    shutil.copytree(small_bundle, tmp_path / "weights" / "small")
    code, err = cli_here("scan", studies, "--out", tmp_path / "o1", "--weights", tmp_path / "weights")
    assert code == 1 and f"use --weights {tmp_path / 'weights' / 'small'}" in err, err
    code, err = cli_here("scan", studies, "--out", tmp_path / "o2", "--weights", tmp_path)
    assert code == 1 and "has no manifest.json" in err and "is the weights bundle" not in err, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_results_folder_given_as_weights_is_said_to_be_one(small_bundle, studies, tmp_path):
    # `--weights RESULTS` (a scan's or an evaluation's folder, the one beside it) said only "weights
    # bundle RESULTS has no manifest.json": neither what the folder is nor what --weights takes
    from tests.test_evaluate_calibrate import cli_here

    results = tmp_path / "results"
    results.mkdir()
    (results / "results.csv").write_text("file,status\n")
    code, err = cli_here("scan", studies, "--out", tmp_path / "o1", "--weights", results)
    assert code == 1 and f"{results} is a results folder (results.csv), not a weights bundle" in err, err
    (tmp_path / "empty").mkdir()
    code, err = cli_here("scan", studies, "--out", tmp_path / "o2", "--weights", tmp_path / "empty")
    assert code == 1 and "has no manifest.json: --weights takes a bundle folder (manifest.json, model.pt)" in err, err


def test_the_same_weights_saved_twice_make_the_same_bundle_sha256(tmp_path):
    """model.pt was written by torch.save to a temp file of a random name, which torch puts in the
    archive's every entry (.model.k3j2h1/data.pkl): each save of the same weights was another
    file and another bundle_sha256, so a bundle made again could not be told the same one."""
    from cxr_batch.bundle import read_manifest
    from cxr_batch.model import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(tabular_skip=True))
    made = [read_manifest(save_bundle(tmp_path / name, model, name="x", version="t", preprocessing=Preprocessing(),
                                      encoding=PatientEncoding(), thresholds={f: 0.5 for f in FINDINGS}))
            for name in ("one", "two")]
    assert made[0]["sha256"] == made[1]["sha256"] and made[0]["bundle_sha256"] == made[1]["bundle_sha256"]
