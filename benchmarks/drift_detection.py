"""What drift monitoring detects on real radiographs, how often it alarms for nothing, and what
the image statistics cost.

    python benchmarks/drift_detection.py [--weights BUNDLE] [--images DIR --labels CSV]
        [--reference-n 400] [--stream-n 80] [--windows 200] [--sizes 30,100]
        [--extra DIR --extra-labels CSV --extra-n 300]

A reference is made from ``--reference-n`` NIH images (a random draw, seed 0) exactly as
``python -m training.reference`` makes it; ``--stream-n`` other images are scored as they are,
with inverted grey levels, resized to 64 px and with every patient aged 8, and each stream is
compared with the reference (``cxr_batch.drift.compare``, default alpha and minimum shifts).
Then ``--windows`` random windows of each size in ``--sizes`` are drawn from the reference's
own studies and compared with the rest: the share that raises any alarm is the false-alarm
rate. ``--extra`` (default: ../shared/data/nih_extra when present) scores images of another
NIH collection as one more stream. Last, what one evaluation of a window of 500 takes, and the
cost of the image statistics per batch of 16 against the model's forward pass on the same batch.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH, bundle_path, link_file, real_images  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.drift import compare, make_reference, output_fingerprint  # noqa: E402
from cxr_batch.image_stats import image_statistics  # noqa: E402
from cxr_batch.inference import Engine  # noqa: E402
from cxr_batch.runtime import make_policy  # noqa: E402
from training.reference import score_folders  # noqa: E402


def folder_of(paths, dest: Path, change=None) -> Path:
    dest.mkdir(parents=True)
    for p in paths:
        if change is None:
            link_file(p, dest / p.name)
        else:
            Image.fromarray(change(np.asarray(Image.open(p).convert("L")))).save(dest / p.name)
    return dest


def aged(labels: Path, dest: Path, age: str = "8") -> Path:
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(dest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "Patient Age": age} for r in rows)
    return dest


def describe(result: dict) -> str:
    inputs = [a for a in result["alarms"] if a["group"] != "output"]
    names = ", ".join(f"{a['quantity']} ({a['effect_name'].split()[0]} {a['effect']:.2f})" for a in inputs[:6])
    return (f"{len(inputs)} input alarm(s){': ' + names if names else ''}; "
            f"{len(result['alarms']) - len(inputs)} output alarm(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights")
    ap.add_argument("--images", type=Path)
    ap.add_argument("--labels", type=Path, default=NIH / "labels.csv")
    ap.add_argument("--reference-n", type=int, default=400)
    ap.add_argument("--stream-n", type=int, default=80)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--sizes", default="30,100")
    extra_default = NIH.parent / "nih_extra"
    ap.add_argument("--extra", type=Path, default=extra_default / "images" if extra_default.is_dir() else None)
    ap.add_argument("--extra-labels", type=Path, default=extra_default / "labels.csv")
    ap.add_argument("--extra-n", type=int, default=300)
    args = ap.parse_args()

    images = real_images(args.images)
    order = np.random.default_rng(0).permutation(len(images))
    ref_paths = [images[i] for i in order[:args.reference_n]]
    stream = [images[i] for i in order[args.reference_n:args.reference_n + args.stream_n]]
    bundle = load_bundle(bundle_path(args.weights))
    print(f"model {bundle.label}; reference {len(ref_paths)} images, streams of {len(stream)} other images")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ref_records = [r for r in score_folders(bundle, [(folder_of(ref_paths, tmp / "ref"), args.labels)]) if r.ok]
        reference = make_reference(ref_records, "benchmark", outputs_for=output_fingerprint(bundle.manifest))
        print(f"reference scored and summarised in {time.perf_counter() - t0:.1f} s")
        streams = {
            "as they are": (folder_of(stream, tmp / "same"), args.labels),
            "grey levels inverted": (folder_of(stream, tmp / "inverted", lambda g: 255 - g), args.labels),
            "resized to 64 px": (folder_of(stream, tmp / "small",
                                           lambda g: np.asarray(Image.fromarray(g).resize((64, 64)))), args.labels),
            "every patient aged 8": (folder_of(stream, tmp / "aged"), aged(args.labels, tmp / "aged.csv")),
        }
        if args.extra is not None and args.extra.is_dir():
            extra = sorted(args.extra.glob("*.png"))
            pick = [extra[i] for i in np.random.default_rng(0).permutation(len(extra))[:args.extra_n]]
            streams[f"{len(pick)} images of {args.extra.parent.name}"] = (folder_of(pick, tmp / "extra"),
                                                                        args.extra_labels)
        for name, (folder, labels) in streams.items():
            records = score_folders(bundle, [(folder, labels)])
            print(f"stream {name}: {describe(compare(reference, records))}")

    rng = np.random.default_rng(1)
    for size in (int(s) for s in args.sizes.split(",")):
        if size >= len(ref_records):
            continue
        any_alarm = input_alarm = 0
        for _ in range(args.windows):
            idx = rng.permutation(len(ref_records))
            base = make_reference([ref_records[i] for i in idx[size:]], "the other studies")
            result = compare(base, [ref_records[i] for i in idx[:size]])  # inputs and outputs
            any_alarm += bool(result["alarms"])
            input_alarm += any(a["group"] != "output" for a in result["alarms"])
        print(f"false alarms, windows of {size} drawn from the reference's studies against the other "
              f"{len(ref_records) - size}: {any_alarm} of {args.windows} windows with any alarm, "
              f"{input_alarm} with an input alarm")

    window = [ref_records[i] for i in rng.integers(0, len(ref_records), 500)]
    compare(reference, window)  # scipy's first use imports its tests
    t0 = time.perf_counter()
    for _ in range(5):
        compare(reference, window)
    print(f"one evaluation (every quantity of a window of 500 studies tested): "
          f"{(time.perf_counter() - t0) / 5 * 1000:.0f} ms")

    engine = Engine(bundle, make_policy("auto", "auto"))
    prep = bundle.preprocessing
    x = torch.rand(16, 3, prep.image_size, prep.image_size)
    t = torch.full((16, 3), 0.5)
    engine.logits(x, t)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        image_statistics(x, prep.mean[0], prep.std[0])
    stats_ms = (time.perf_counter() - t0) / reps * 1000
    t0 = time.perf_counter()
    for _ in range(reps // 4):
        engine.logits(x, t)
    model_ms = (time.perf_counter() - t0) / (reps // 4) * 1000
    print(f"image statistics of a batch of 16 at {prep.image_size} px: {stats_ms:.2f} ms; the model's forward pass "
          f"on it: {model_ms:.1f} ms ({stats_ms / model_ms:.1%})")


if __name__ == "__main__":
    main()
