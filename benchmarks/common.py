"""Helpers shared by the benchmark scripts: real images, a bundle to run, memory polling."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NIH = REPO.parent / "shared" / "data" / "nih"


def real_images(folder: Path | None = None) -> list[Path]:
    folder = Path(folder) if folder else NIH / "images"
    images = sorted(folder.glob("*.png"))
    if not images:
        raise SystemExit(f"no PNG images in {folder}: pass --images")
    return images


def link_file(src: Path, target: Path) -> None:
    """A hard link where the file system allows (no copy), else a copy. Not a symbolic link: a
    scan does not follow links that leave the scanned folder."""
    import shutil

    try:
        os.link(src, target)
    except OSError:
        shutil.copyfile(src, target)


def link_folder(images: list[Path], n: int, dest: Path) -> Path:
    """A folder of ``n`` files cycling through ``images`` (see :func:`link_file`)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = images[i % len(images)].resolve()
        link_file(src, dest / f"{i:05d}_{src.name}")
    return dest


def bundle_path(weights: str | None) -> Path:
    """The given bundle, else the bundled weights, else a random-weights bundle in a temp folder
    (throughput does not depend on the weights' values)."""
    from cxr_batch.bundle import DEFAULT_BUNDLE, save_bundle
    from cxr_batch.findings import FINDINGS
    from cxr_batch.model import build_model
    from cxr_batch.patient import PatientEncoding
    from cxr_batch.preprocess import Preprocessing

    if weights:
        return Path(weights)
    if (DEFAULT_BUNDLE / "manifest.json").exists():
        return DEFAULT_BUNDLE
    folder = Path(tempfile.mkdtemp(prefix="cxr-bench-bundle-"))
    torch.manual_seed(0)
    return save_bundle(folder, build_model(), name="random", version="bench", preprocessing=Preprocessing(),
                       encoding=PatientEncoding(), thresholds={f: 0.5 for f in FINDINGS})


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            pass
        todo.extend(children.get(p, []))
    return total


class PeakMemory:
    """Polls the RSS of a process tree in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid or os.getpid(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))
