"""The fast paths: reduced precision against float32 on real images, sharding and merging."""

import numpy as np
import pytest
import torch

from cxr_batch.bundle import load_bundle
from cxr_batch.inference import Engine
from cxr_batch.preprocess import eval_transform
from cxr_batch.readers import read_pil
from cxr_batch.study import ScoringRules
from cxr_batch.results import MergeError, merge_results, read_results
from cxr_batch.runtime import RunPolicy, cpu_has_native_bf16, default_workers, pick_precision
from cxr_batch.scan import ScanConfig, run_scan


@pytest.fixture(scope="module")
def real_batch(nih_images):
    bundle = load_bundle()
    x = torch.stack([eval_transform(read_pil(p, ScoringRules()), bundle.preprocessing) for p in nih_images[:64]])
    t = torch.tensor([[0.5, 0.0, 1.0], [0.6, 1.0, 0.0]]).repeat(32, 1)
    return bundle, x, t


def test_bf16_probabilities_close_to_fp32_and_flags_identical(real_batch):
    bundle, x, t = real_batch
    p32 = Engine(bundle, RunPolicy(torch.device("cpu"), "fp32")).probabilities(x, t)
    raw = Engine(bundle, RunPolicy(torch.device("cpu"), "bf16"), refine_margin=0.0).probabilities(x, t)
    fast = Engine(bundle, RunPolicy(torch.device("cpu"), "bf16"))
    p16 = fast.probabilities(x, t)
    assert np.abs(raw - p32).max() <= 0.01  # the accuracy target without refinement
    thr = np.array(bundle.threshold_vector())
    assert ((p16 >= thr) == (p32 >= thr)).all()  # with refinement: exactly the fp32 flags
    assert np.abs(p16 - p32).max() <= 0.01 and fast.refined < len(x)


def test_reduced_precision_gives_way_to_fp32_when_re_scoring_does_not_pay(real_batch):
    """v2's probabilities sit near its thresholds: most images need re-scoring, so after 64
    images the engine scores in float32 directly, with exactly the float32 flags throughout."""
    bundle, x, t = real_batch
    p32 = Engine(bundle, RunPolicy(torch.device("cpu"), "fp32")).probabilities(x, t)
    fast = Engine(bundle, RunPolicy(torch.device("cpu"), "bf16"))
    got = np.concatenate([fast.probabilities(x[i:i + 16], t[i:i + 16]) for i in range(0, len(x), 16)] +
                         [fast.probabilities(x[:16], t[:16])])
    thr = np.array(bundle.threshold_vector())
    want = np.concatenate([p32, p32[:16]])
    assert ((got >= thr) == (want >= thr)).all()
    assert fast.refined > fast.scored / 2 and fast.fp32_from == 64 and fast.scored == 64
    np.testing.assert_allclose(got[64:], want[64:], atol=1e-6)  # float32 itself after the switch
    never = Engine(bundle, RunPolicy(torch.device("cpu"), "bf16"), refine_margin=0.0)
    never.probabilities(x, t)
    assert never.fp32_from is None  # without re-scoring there is nothing to judge


def test_precision_policy():
    cpu = torch.device("cpu")
    assert pick_precision(cpu, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert pick_precision(cpu, "fp32") == "fp32"
    assert default_workers(torch.device("cuda")) >= 1 and default_workers(cpu) >= 0


def test_shards_partition_the_files_and_merge_back(studies, tmp_path, small_bundle):
    options = dict(weights=str(small_bundle), device="cpu", precision="fp32", batch_size=4, workers=0,
                   progress=False, pdf=False)
    run_scan(studies, tmp_path / "all", ScanConfig(**options))
    parts = []
    for i in range(3):
        run_scan(studies, tmp_path / f"s{i}", ScanConfig(**options, shard=(i, 3)))
        parts.append(tmp_path / f"s{i}" / "results.csv")
    sizes = [len(read_results(p)) for p in parts]
    assert sum(sizes) == 6 and all(s == 2 for s in sizes)
    assert merge_results(parts, tmp_path / "merged.csv") == 6
    merged = read_results(tmp_path / "merged.csv")
    single = read_results(tmp_path / "all" / "results.csv")
    assert [r["file"] for r in merged] == [r["file"] for r in single]
    assert [r["p_Effusion"] for r in merged] == [r["p_Effusion"] for r in single]
    with pytest.raises(MergeError, match="shard 0/3 is given twice"):
        merge_results([parts[0], parts[0], parts[1], parts[2]], tmp_path / "bad.csv")


# ---------------------------------------------------------------- decoding only what the model needs
@pytest.fixture(scope="module")
def detector_dicoms(tmp_path_factory, nih):
    """2500 x 2000, 12 bits stored, from real 1024-px radiographs, in JPEG 2000 (lossless) and
    8-bit JPEG baseline."""
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    from cxr_batch.dicom_build import radiograph, save

    folder = tmp_path_factory.mktemp("detector")
    made = []
    for i, src in enumerate(sorted((nih / "full_res").glob("*.png"))[:6]):
        img = Image.open(src).convert("L").resize((2500, 2000), Image.BILINEAR)
        made.append(save(radiograph(np.asarray(img).astype(np.uint16) * 16, bits_stored=12, WindowCenter=2048,
                                    WindowWidth=4096), folder / f"j2k{i}.dcm", JPEG2000Lossless))
        made.append(save(radiograph(np.asarray(img)), folder / f"jpeg{i}.dcm", JPEGBaseline8Bit))
    return made


def test_reduced_decode_sizes_and_grey_levels(detector_dicoms):
    from cxr_batch.dicom import reduction
    from cxr_batch.readers import read_study

    assert reduction(2000, 2500, 144, 5) == 3 and reduction(2000, 2500, 0, 5) == 0
    assert reduction(2000, 2500, 500, 5) == 2 and reduction(300, 300, 144, 5) == 1
    for path in detector_dicoms:
        full = read_study(path, ScoringRules()).grey
        small = read_study(path, ScoringRules(), min_side=300).grey
        assert min(small.shape) >= 300 and small.shape[0] < full.shape[0]
        # the same picture: mean grey within 1 level, and a box-downsampled full decode alike
        k = full.shape[0] // small.shape[0]
        box = full[: small.shape[0] * k, : small.shape[1] * k].reshape(small.shape[0], k, small.shape[1], k).mean((1, 3))
        assert abs(float(full.mean()) - float(small.mean())) < 1.0
        assert np.abs(box - small[: box.shape[0], : box.shape[1]]).mean() < 6.0


def test_reduced_decode_keeps_the_bundled_models_probabilities(detector_dicoms):
    from cxr_batch.readers import read_study

    bundle = load_bundle()
    prep = bundle.preprocessing
    full = [eval_transform(read_study(p, ScoringRules()).grey, prep) for p in detector_dicoms]
    small = [eval_transform(read_study(p, ScoringRules(), prep.min_side).grey, prep) for p in detector_dicoms]
    engine = Engine(bundle, RunPolicy(torch.device("cpu"), "fp32"))
    t = torch.full((len(full), 3), 0.5)
    diff = np.abs(engine.probabilities(torch.stack(full), t) - engine.probabilities(torch.stack(small), t))
    assert diff.max() <= 0.01, diff.max()
