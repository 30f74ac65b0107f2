"""Shared fixtures: the real NIH images (tests skip cleanly without them) and small bundles."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxr_batch.bundle import save_bundle
from cxr_batch.findings import FINDINGS
from cxr_batch.model import ModelConfig, build_model
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing

REPO = Path(__file__).resolve().parent.parent


def _dcmtk_before_pynetdicom() -> None:
    """pynetdicom installs apps named like dcmtk's (storescu, echoscu, storescp...) into the
    environment's bin, which an activated virtual environment (the README's Quick start) puts
    first on PATH: the tests' dcmtk commands (`storescu -R -xv`) then ran pynetdicom's and failed.
    That folder goes to the end of PATH when dcmtk is installed elsewhere."""
    env_bin = str(Path(sys.executable).parent)
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if env_bin not in entries or not (Path(env_bin) / "storescu").exists():
        return
    others = [e for e in entries if e != env_bin]
    if shutil.which("storescu", path=os.pathsep.join(others)):
        os.environ["PATH"] = os.pathsep.join([*others, env_bin])


_dcmtk_before_pynetdicom()
NIH = REPO.parent / "shared" / "data" / "nih"
V1_BUNDLE = REPO / "weights" / "cxr-fpn-v1"  # still shipped; the default is v3 (cxr_batch.bundle.DEFAULT_BUNDLE)


@pytest.fixture(scope="session")
def nih() -> Path:
    if not (NIH / "images").is_dir() or not (NIH / "labels.csv").is_file():
        pytest.skip("real NIH data (../shared/data/nih) not present")
    return NIH


@pytest.fixture(scope="session")
def nih_images(nih) -> list[Path]:
    return sorted((nih / "images").glob("*.png"))


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory) -> Path:
    """A random-weights bundle at 96 px: fast, and every code path of a real bundle."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(tabular_skip=True))
    folder = tmp_path_factory.mktemp("bundle") / "small"
    thresholds = {f: 0.5 for f in FINDINGS}
    return save_bundle(folder, model, name="small", version="test", preprocessing=Preprocessing(image_size=96),
                       encoding=PatientEncoding(), thresholds=thresholds)


@pytest.fixture()
def studies(tmp_path, nih_images) -> Path:
    """A folder of 6 real NIH images."""
    folder = tmp_path / "studies"
    folder.mkdir()
    for p in nih_images[:6]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture()
def small_disk(tmp_path) -> Path:
    """A 4 MiB tmpfs to fill up (needs root; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs is not allowed here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# The night Europe/Berlin's clock goes back (2026-10-25, 03:00 CEST -> 02:00 CET at 01:00 UTC):
# a result made at 00:30 UTC reads 02:30 (+0200), its correction at 01:15 UTC reads 02:15 (+0100)
DST_NIGHT_BEFORE = dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.timezone.utc)
DST_NIGHT_AFTER = dt.datetime(2026, 10, 25, 1, 15, tzinfo=dt.timezone.utc)


@pytest.fixture()
def berlin(monkeypatch):
    """The local zone is Europe/Berlin (DST) for this test; the clock cxr-batch reads its times
    from (:mod:`cxr_batch.clock`) is set with ``berlin(moment)``, a UTC moment."""
    import cxr_batch.clock as clock

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()

    def set_clock(moment: dt.datetime) -> None:
        monkeypatch.setattr(clock, "utc_now", lambda: moment)

    yield set_clock
    monkeypatch.undo()
    time.tzset()
