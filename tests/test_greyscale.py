"""Mapping stored values to the model's 8-bit grey scale."""

import numpy as np
import pytest

from cxr_batch.greyscale import robust_range, to_uint8, window_to_uint8


def test_window_maps_ends_and_clips():
    values = np.array([[0, 100, 200, 300]], dtype=np.int32)
    out = window_to_uint8(values, 100, 200)
    assert out.dtype == np.uint8 and out.tolist() == [[0, 0, 255, 255]]
    assert window_to_uint8(np.array([[150]]), 100, 200)[0, 0] == 128  # rounds half up


@pytest.mark.parametrize("low, high", [(5, 5), (10, 0), (np.nan, 1), (0, np.inf)])
def test_invalid_window_is_refused(low, high):
    with pytest.raises(ValueError):
        window_to_uint8(np.zeros((2, 2)), low, high)


def test_robust_range_ignores_a_few_hot_pixels():
    rng = np.random.default_rng(0)
    img = rng.integers(1000, 3000, size=(600, 600)).astype(np.uint16)
    img[0, :5] = 65535  # dead/hot pixels
    low, high = robust_range(img)
    assert 1000 <= low < 1010 and 2990 < high <= 3000


def test_constant_image_does_not_fail():
    low, high = robust_range(np.full((10, 10), 7.0))
    assert high > low
    assert to_uint8(np.full((10, 10), 7, dtype=np.uint16)).max() == 0


def test_uint8_is_unchanged_and_16_bit_spans_the_range():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert to_uint8(img) is img
    deep = (img.astype(np.uint16) * 257)
    out = to_uint8(deep)
    assert out.min() == 0 and out.max() == 255
