"""Stage 2, cache: decode every image once into a resized uint8 array on disk.

The study decoded PNGs every epoch and reached 19 images/s. Here each image is read once
(with cxr_batch's reader), resized to ``cache_size`` = image_size / crop_fraction (so that a
90% crop is exactly the training size) and stored in a memory-mapped ``cache_<size>.u8``;
training then augments from memory.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cxr_batch.preprocess import Preprocessing, resize, to_unit_tensor
from cxr_batch.readers import ScoringRules, read_pil


def cache_size_for(prep: Preprocessing) -> int:
    return int(np.ceil(prep.image_size / prep.crop_fraction))


def decode_resized(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size] (bilinear, antialiased, like inference)."""
    torch.set_num_threads(1)
    grey = read_pil(Path(path), ScoringRules())
    out = resize(to_unit_tensor(grey), size)[0]
    return (out.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def build_cache(images_dir, names: list[str], size: int, out: Path, workers: int = 2) -> tuple[np.memmap, dict]:
    """Decode ``names`` (files in the folder ``images_dir``, or ``images_dir[name]`` when it is a
    mapping, for images from several folders) into ``out/cache_<size>.u8``; reuse a cache built
    for the same names and size. Returns (array [N, size, size], {name: row})."""
    data_path, index_path = out / f"cache_{size}.u8", out / f"cache_{size}.json"
    names = sorted(set(names))
    if index_path.exists() and data_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("names") == names and index.get("size") == size:
            arr = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(len(names), size, size))
            return arr, {n: i for i, n in enumerate(names)}
    arr = np.memmap(data_path, dtype=np.uint8, mode="w+", shape=(len(names), size, size))
    paths = [Path(images_dir[n]) if isinstance(images_dir, dict) else Path(images_dir) / n for n in names]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for i, img in enumerate(pool.map(decode_resized, paths, [size] * len(paths), chunksize=8)):
                arr[i] = img
    else:
        for i, p in enumerate(paths):
            arr[i] = decode_resized(p, size)
    arr.flush()
    index_path.write_text(json.dumps({"size": size, "names": names}))
    return np.memmap(data_path, dtype=np.uint8, mode="r", shape=(len(names), size, size)), {n: i for i, n in enumerate(names)}
