"""What a study's pixel key (cxr_batch.provenance.pixel_key) costs read again, and from the
pixels a scan already decoded: evaluate and calibrate hash the latter.

    python benchmarks/pixel_keys.py [--n 40]

Times, on --n real NIH images, decoding each again and hashing it (what evaluate and calibrate
did after scoring) against hashing the grey pixels already decoded; checks both give the same keys.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import real_images  # noqa: E402
from cxr_batch.provenance import pixel_key  # noqa: E402
from cxr_batch.readers import read_study  # noqa: E402
from cxr_batch.study import pixels_sha256  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--images", type=Path, help="a folder of PNGs (default: the NIH sample)")
    args = parser.parse_args()
    files = real_images(args.images)[: args.n]
    greys = [read_study(f).grey for f in files]
    t = time.perf_counter()
    again = [pixel_key(f) for f in files]
    decoded_again = time.perf_counter() - t
    t = time.perf_counter()
    held = [pixels_sha256(g) for g in greys]
    hashed = time.perf_counter() - t
    assert again == held, "the keys differ"
    print(f"{len(files)} PNGs of {greys[0].shape[1]} x {greys[0].shape[0]}: read again and hashed "
          f"{1000 * decoded_again / len(files):.1f} ms a study; hashed from the pixels decoded "
          f"{1000 * hashed / len(files):.2f} ms a study")


if __name__ == "__main__":
    main()
