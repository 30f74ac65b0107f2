"""Training's data path: the uint8 cache and the batched augmentation."""

import numpy as np
import torch

from cxr_batch.preprocess import Preprocessing, normalise
from training.augment import AugmentConfig, eval_transform_batch, train_transform
from training.cache import build_cache, cache_size_for, decode_resized


def test_cache_is_built_once_and_reused(tmp_path, nih_images):
    names = [p.name for p in nih_images[:3]]
    size = cache_size_for(Preprocessing(image_size=64))
    assert size == 72
    arr, index = build_cache(nih_images[0].parent, names, size, tmp_path, workers=0)
    assert arr.shape == (3, 72, 72) and arr.dtype == np.uint8 and set(index) == set(names)
    assert np.array_equal(arr[index[names[1]]], decode_resized(nih_images[1], size))
    stamp = (tmp_path / "cache_72.u8").stat().st_mtime_ns
    build_cache(nih_images[0].parent, list(reversed(names)), size, tmp_path, workers=0)
    assert (tmp_path / "cache_72.u8").stat().st_mtime_ns == stamp  # same names: reused, not rebuilt


def test_model_views_are_exactly_what_inference_feeds_the_model(tmp_path, nih_images):
    from cxr_batch.preprocess import eval_transform
    from cxr_batch.readers import read_pil
    from cxr_batch.study import ScoringRules
    from training.cache import build_views

    prep = Preprocessing(image_size=64)
    names = [p.name for p in nih_images[:3]]
    views, index = build_views(nih_images[0].parent, names, prep, tmp_path, workers=2)
    assert views.shape == (3, 64, 64) and views.dtype == np.float32
    for p in nih_images[:3]:
        scan = eval_transform(read_pil(p, ScoringRules()), prep)
        assert torch.equal(normalise(torch.from_numpy(np.array(views[index[p.name]]))[None], prep), scan)


def test_train_transform_shapes_mirror_and_identity():
    prep = Preprocessing(image_size=32)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 36, 36), dtype=torch.uint8)
    out = train_transform(x, torch.tensor([True, False, False, True]), prep, generator=g)
    assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all()
    # no crop movement, rotation, translation or blur, no crop: the identity up to resampling
    still = AugmentConfig(rotation_deg=0.0, translate=0.0, blur_p=0.0)
    full = Preprocessing(image_size=36, crop_fraction=1.0)
    ident = train_transform(x, torch.zeros(4, dtype=torch.bool), full, still, generator=g)
    assert torch.allclose(ident, normalise(x.float() / 255, full), atol=1e-5)
    mirrored = train_transform(x, torch.ones(4, dtype=torch.bool), full, still, generator=g)
    assert torch.allclose(mirrored, normalise(x.float().flip(-1) / 255, full), atol=1e-5)


def test_eval_batch_is_deterministic_and_normalised():
    prep = Preprocessing(image_size=32)
    x = torch.full((2, 1, 36, 36), 255, dtype=torch.uint8)
    out = eval_transform_batch(x, prep)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[:, 0], torch.full((2, 32, 32), (1 - 0.485) / 0.229), atol=1e-5)


def test_a_cache_whose_data_file_is_not_its_index_s_size_is_rebuilt_not_read(tmp_path, nih_images):
    """A views_*.f32 or cache_*.u8 cut short (a copy to the GPU machine stopped part way) or
    grown (another run's data beside this run's index) was mapped as it was: the short one ended
    the run with mmap's 'length is greater than file size', the long one was read as these
    images. Only a data file of the index's size is reused, and crossval's check that the caches
    are there (so the PNGs are not needed) says the same."""
    from training.cache import build_views, decode_view
    from training.crossval import CVConfig, Variant, caches_ready

    prep = Preprocessing(image_size=64)
    names = [p.name for p in nih_images[:3]]
    (tmp_path / "cache").mkdir()
    build_views(nih_images[0].parent, names, prep, tmp_path / "cache", workers=0)
    build_cache(nih_images[0].parent, names, cache_size_for(prep), tmp_path / "cache", workers=0)
    cfg = CVConfig(variants=[Variant(name="v", image_size=64)])
    data = tmp_path / "cache" / "views_64_0.9.f32"
    whole = data.read_bytes()
    for damaged in (whole[: len(whole) // 2], whole + b"\0" * 4 * 64 * 64):
        data.write_bytes(damaged)
        assert not caches_ready(tmp_path, names, cfg)
        views, index = build_views(nih_images[0].parent, names, prep, tmp_path / "cache", workers=0)
        assert data.stat().st_size == len(whole)
        assert np.array_equal(views[index[names[2]]], decode_view(nih_images[2], prep))
    assert caches_ready(tmp_path, names, cfg)
