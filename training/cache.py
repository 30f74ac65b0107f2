"""Stage 2, cache: decode every image once into a resized uint8 array on disk.

The study decoded PNGs every epoch and reached 19 images/s. Here each image is read once
(with cxr_batch's reader), resized to ``cache_size`` = image_size / crop_fraction (so that a
90% crop is exactly the training size) and stored in a memory-mapped ``cache_<size>.u8``;
training then augments from memory. Held-out images are scored from a second array, the
inference-exact model views (:func:`build_views`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cxr_batch.preprocess import Preprocessing, model_view, resize, to_unit_tensor
from cxr_batch.readers import read_study
from cxr_batch.study import StudyFailure

UNREADABLE = "unreadable_images.txt"  # the images a cache could not decode, by name, with why


def cache_size_for(prep: Preprocessing) -> int:
    return int(np.ceil(prep.image_size / prep.crop_fraction))


def read_grey(path: Path) -> np.ndarray:
    """One training image (PNG of any depth, JPEG or DICOM, known by its content) -> uint8 grey,
    decoded by the scan's own reader: a site's DICOM studies train on the pixels a scan sees."""
    return read_study(Path(path)).grey


def decode_resized(path: Path, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size] (bilinear, antialiased, like inference)."""
    grey = read_grey(path)
    out = resize(to_unit_tensor(grey), size)[0]
    return (out.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def decode_view(path: Path, prep: Preprocessing) -> np.ndarray:
    """One image file -> float32 [S, S]: the model's view of it exactly as inference makes it
    (``cxr_batch.preprocess.model_view``: crop the decoded image, then resize), before the
    normalisation."""
    return model_view(read_grey(path), prep)[0].numpy()


def decode_or_reason(path: Path, size: int, decode=None) -> tuple[np.ndarray | None, str | None]:
    """``decode(path)`` (default :func:`decode_resized` to ``size``), or (None, why) for a file that
    cannot be read (zero bytes, truncated, not an image), so one bad file among thousands is
    named, not a traceback."""
    try:
        return (decode(path) if decode is not None else decode_resized(path, size)), None
    except (StudyFailure, OSError) as e:
        return None, str(e) or type(e).__name__


def build_cache(images_dir, names: list[str], size: int, out: Path, workers: int = 2) -> tuple[np.memmap, dict]:
    """Decode ``names`` (files in the folder ``images_dir``, or ``images_dir[name]`` when it is a
    mapping, for images from several folders) into ``out/cache_<size>.u8``; reuse a cache built
    for the same names and size. Returns (array [N, size, size], {name: row})."""
    return _build(images_dir, names, out, _cache_spec(size), partial(decode_or_reason, size=size), workers)


def build_views(images_dir, names: list[str], prep: Preprocessing, out: Path, workers: int = 2) -> tuple[np.memmap, dict]:
    """As :func:`build_cache`, the inference-exact model views (:func:`decode_view`, float32
    [N, S, S]) in ``out/views_<S>_<crop>.f32``: what held-out images are scored on, so that the
    logits every choice rests on are those a scan computes (the uint8 cache, made for the
    training augmentation, resizes before it crops: 4.6 grey levels away at 64 px)."""
    return _build(images_dir, names, out, _views_spec(prep),
                  partial(decode_or_reason, size=0, decode=partial(decode_view, prep=prep)), workers)


# A cache's files: stem (data stem.suffix, index stem.json), dtype, image side, and what its index says of it
def _cache_spec(size: int) -> tuple:
    return f"cache_{size}", ".u8", np.uint8, size, {"size": size}


def _views_spec(prep: Preprocessing) -> tuple:
    meta = {"size": prep.image_size, "crop_fraction": prep.crop_fraction}
    return f"views_{prep.image_size}_{prep.crop_fraction:g}", ".f32", np.float32, prep.image_size, meta


def built(out: Path, names: list[str], prep: Preprocessing) -> bool:
    """Whether ``out`` holds both caches of ``names`` for ``prep`` whole (built elsewhere and
    copied: then the images are not needed)."""
    return all(_built(out, sorted(set(names)), spec) for spec in (_cache_spec(cache_size_for(prep)), _views_spec(prep)))


def _built(out: Path, names: list[str], spec: tuple) -> bool:
    """Whether the cache ``spec`` in ``out`` holds ``names`` (sorted) and nothing else: its index
    says so, and its data file has their size (a copy stopped part way is shorter, and another
    run's data beside this index longer: read, they would be other pixels than these images')."""
    stem, suffix, dtype, size, meta = spec
    data_path, index_path = out / f"{stem}{suffix}", out / f"{stem}.json"
    try:
        index = json.loads(index_path.read_text())
        length = data_path.stat().st_size
    except (OSError, ValueError):
        return False
    return (isinstance(index, dict) and index.get("names") == names and all(index.get(k) == v for k, v in meta.items())
            and length == len(names) * size * size * np.dtype(dtype).itemsize)


def _build(images_dir, names: list[str], out: Path, spec: tuple, decode, workers: int) -> tuple[np.memmap, dict]:
    stem, suffix, dtype, size, meta = spec
    data_path, index_path = out / f"{stem}{suffix}", out / f"{stem}.json"
    names = sorted(set(names))
    shape = (len(names), size, size)
    if _built(out, names, spec):
        return np.memmap(data_path, dtype=dtype, mode="r", shape=shape), {n: i for i, n in enumerate(names)}
    index_path.unlink(missing_ok=True)  # rewritten below: until then the data is no cache of anything
    reserve(data_path, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    arr = np.memmap(data_path, dtype=dtype, mode="r+", shape=shape)
    paths = [Path(images_dir[n]) if isinstance(images_dir, dict) else Path(images_dir) / n for n in names]
    if workers > 1:
        with decoding_pool(workers) as pool:
            bad = store_decoded(arr, names, pool.map(decode, paths, chunksize=8))
    else:
        bad = store_decoded(arr, names, (decode(p) for p in paths))
    arr.flush()
    if bad:  # no index is written: the next run decodes again, after the files were fixed or removed
        listing = out / UNREADABLE
        listing.write_text("".join(f"{name}\t{why}\n" for name, why in bad))
        # names only in the file: a log line carries no file name (it may identify the patient)
        raise ValueError(f"{len(bad)} images cannot be read ({bad[0][1]}{', ...' if len(bad) > 1 else ''}), "
                         f"listed in {listing}: remove them from the images folder and run again")
    (out / UNREADABLE).unlink(missing_ok=True)  # an earlier run's list, since fixed
    index_path.write_text(json.dumps({**meta, "names": names}))
    return np.memmap(data_path, dtype=dtype, mode="r", shape=shape), {n: i for i, n in enumerate(names)}


def decoding_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` processes that decode, each with one thread, each ending when this process
    is gone: forked, they outlived a run killed with SIGKILL, asleep for ever."""
    return ProcessPoolExecutor(workers, initializer=_decoding_worker, initargs=(os.getpid(),))


def _decoding_worker(parent: int) -> None:
    # one thread per decoding process, set there: set in the parent it would leave training
    # single-threaded after a cache was built, and not after one was reused (a resumed run)
    torch.set_num_threads(1)
    threading.Thread(target=_end_without, args=(parent,), daemon=True, name="cxr-follow").start()


def _end_without(parent: int) -> None:
    """End this worker once ``parent`` is gone (it is then another process's child)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def reserve(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` of disk space taken. A memory map of a sparse file (what
    ``np.memmap(mode="w+")`` makes) finds a full disk only when a page is written back, and the
    process dies of SIGBUS without a word; taken up front, the disk says no here, as an OSError
    that names the file and what it needs."""
    try:
        with open(path, "wb") as f:
            if nbytes:
                os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        path.unlink(missing_ok=True)  # a partly taken file would only hold the space
        raise OSError(f"cannot write the image cache {path} ({e.strerror or e}; it needs "
                               f"{nbytes / 1e6:.1f} MB): free space there, or choose another --out, and run again") from None


def store_decoded(arr: np.memmap, names: list[str], decoded) -> list[tuple[str, str]]:
    """Write each decoded image into its row of ``arr``; returns (name, why) for those that failed."""
    bad = []
    for i, (img, why) in enumerate(decoded):
        if img is None:
            bad.append((names[i], why))
        else:
            arr[i] = img
    return bad
