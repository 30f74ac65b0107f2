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
from cxr_batch.study import StudyFailure

UNREADABLE = "unreadable_images.txt"  # the images a cache could not decode, by name, with why


def cache_size_for(prep: Preprocessing) -> int:
    return int(np.ceil(prep.image_size / prep.crop_fraction))


def decode_resized(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size] (bilinear, antialiased, like inference)."""
    torch.set_num_threads(1)
    grey = read_pil(Path(path), ScoringRules())
    out = resize(to_unit_tensor(grey), size)[0]
    return (out.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def decode_or_reason(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """:func:`decode_resized`, or (None, why) for a file that cannot be read (zero bytes,
    truncated, not an image), so one bad file among thousands is named, not a traceback."""
    try:
        return decode_resized(path, size), None
    except (StudyFailure, OSError) as e:
        return None, str(e) or type(e).__name__


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
    index_path.unlink(missing_ok=True)  # rewritten below: until then the data is no cache of anything
    arr = np.memmap(data_path, dtype=np.uint8, mode="w+", shape=(len(names), size, size))
    paths = [Path(images_dir[n]) if isinstance(images_dir, dict) else Path(images_dir) / n for n in names]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            decoded = pool.map(decode_or_reason, paths, [size] * len(paths), chunksize=8)
            bad = store_decoded(arr, names, decoded)
    else:
        bad = store_decoded(arr, names, (decode_or_reason(p, size) for p in paths))
    arr.flush()
    if bad:  # no index is written: the next run decodes again, after the files were fixed or removed
        listing = out / UNREADABLE
        listing.write_text("".join(f"{name}\t{why}\n" for name, why in bad))
        # names only in the file: a log line carries no file name (it may identify the patient)
        raise ValueError(f"{len(bad)} images cannot be read ({bad[0][1]}{', ...' if len(bad) > 1 else ''}), "
                         f"listed in {listing}: remove them from the images folder and run again")
    (out / UNREADABLE).unlink(missing_ok=True)  # an earlier run's list, since fixed
    index_path.write_text(json.dumps({"size": size, "names": names}))
    return np.memmap(data_path, dtype=np.uint8, mode="r", shape=(len(names), size, size)), {n: i for i, n in enumerate(names)}


def store_decoded(arr: np.memmap, names: list[str], decoded) -> list[tuple[str, str]]:
    """Write each decoded image into its row of ``arr``; returns (name, why) for those that failed."""
    bad = []
    for i, (img, why) in enumerate(decoded):
        if img is None:
            bad.append((names[i], why))
        else:
            arr[i] = img
    return bad
