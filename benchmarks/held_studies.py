"""The scan's header pass for studies of two patients (cxr_batch.scan.two_patient_studies): its
cost over a folder of DICOM files, and how much of each file it reads.

    python benchmarks/held_studies.py [--files 2000] [--per-study 200] [--step 2] [--keep DIR]

N real NIH images written as DICOM (every ``step``-th pixel: 512 x 512, 256 KiB of pixel data
at step 2), in studies of ``per-study`` images; one image of the first study is of another
patient (misfiled). Prints the discovery time, the header pass's seconds (page cache warm:
the files were just written), the bytes it read per file against the file size (the process's
rchar: it should stop before the pixel data), and how many files it held (the one study's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import real_images  # noqa: E402
from cxr_batch.dicom_build import radiograph, save  # noqa: E402
from cxr_batch.discover import find_candidates  # noqa: E402
from cxr_batch.scan import two_patient_studies  # noqa: E402


def rchar() -> int:
    """Bytes this process has read through read() so far (page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise SystemExit("no /proc/self/io: bytes read not measured")


def fill(folder: Path, n: int, per_study: int, step: int) -> None:
    from pydicom.uid import generate_uid

    images = real_images()
    studies = [generate_uid() for _ in range((n + per_study - 1) // per_study)]
    for i in range(n):
        pixels = np.asarray(Image.open(images[i % len(images)]).convert("L"))[::step, ::step].copy()
        misfiled = i == 1  # the first study's second image: another patient's
        ds = radiograph(pixels, PatientID="P-B" if misfiled else f"P{i // per_study:04d}",
                        PatientBirthDate="19700202" if misfiled else "19600101", PatientSex="F", ViewPosition="PA",
                        StudyInstanceUID=studies[i // per_study])
        save(ds, folder / f"s{i // per_study:03d}" / f"{i:06d}.dcm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--per-study", type=int, default=200)
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="write the folder here and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="held-") as tmp:
        folder = args.keep or Path(tmp) / "studies"
        if not folder.exists():
            fill(folder, args.files, args.per_study, args.step)
        t = time.perf_counter()
        candidates = find_candidates(folder)
        found = time.perf_counter() - t
        size = sum(c.path.stat().st_size for c in candidates)
        before, t = rchar(), time.perf_counter()
        held = two_patient_studies(candidates)
        seconds, read = time.perf_counter() - t, rchar() - before
        n = len(candidates)
        print(f"{n} files ({size / n / 1024:.0f} KiB each): discovery {found:.2f} s; header pass {seconds:.2f} s "
              f"({1000 * seconds / n:.2f} ms/file), read {read / n / 1024:.1f} KiB/file "
              f"({100 * read / size:.1f}% of the bytes); {len(held)} files held back")


if __name__ == "__main__":
    main()
