"""How far training's evaluation inputs were from inference's, before and after issue 15.

    python benchmarks/eval_input_gap.py [--weights BUNDLE] [--config training/configs/bundled.toml]

On the recipe's test patients (split by patient exactly as training splits them: 96 images for
the bundled recipe) it builds each image's model input three ways:

(a) before: the uint8 cache (decode, resize to image_size / 0.9) then centre crop and resize
    (``training/cache.py`` + ``eval_transform_batch``): what training evaluated on until now;
(b) after: ``training.data.DecodedImages``, what training's evaluation uses now;
(c) inference: ``read_pil`` + ``eval_transform``, what a scan computes;

and prints, for (a) and (b) against (c), the mean absolute input difference in grey levels (0-255,
before normalisation) and how many image-finding flags of the bundle (float32, its thresholds)
differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH, REPO, bundle_path  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.preprocess import eval_transform  # noqa: E402
from cxr_batch.readers import read_pil  # noqa: E402
from cxr_batch.study import ScoringRules  # noqa: E402
from training.augment import eval_transform_batch  # noqa: E402
from training.cache import cache_size_for, decode_resized  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import DecodedImages, encode_patients  # noqa: E402
from training.prepare import read_nih_metadata, split_by_patient  # noqa: E402


def grey_levels(x: torch.Tensor, prep) -> torch.Tensor:
    """Normalised model inputs [..., 3, S, S] -> the grey channel in 0-255."""
    return (x[..., 0, :, :] * prep.std[0] + prep.mean[0]) * 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="bundle (default: the bundled weights)")
    parser.add_argument("--config", default=str(REPO / "training" / "configs" / "bundled.toml"))
    parser.add_argument("--images", default=str(NIH / "images"))
    parser.add_argument("--labels", default=str(NIH / "labels.csv"))
    args = parser.parse_args()

    cfg = TrainConfig.load(args.config)
    table = read_nih_metadata(Path(args.labels))
    table["split"] = split_by_patient(table, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    test = table[table["split"] == "test"].reset_index(drop=True)
    bundle = load_bundle(bundle_path(args.weights))
    prep, size = bundle.preprocessing, cache_size_for(bundle.preprocessing)
    paths = [Path(args.images) / name for name in test["image"]]

    torch.set_num_threads(2)
    before = torch.cat([eval_transform_batch(torch.from_numpy(decode_resized(p, size))[None, None], prep) for p in paths])
    decoded = DecodedImages(test, args.images, prep, bundle.encoding)
    after = torch.stack([decoded[i][0] for i in range(len(decoded))])
    inference = torch.stack([eval_transform(read_pil(p, ScoringRules()), prep) for p in paths])

    tabular = torch.from_numpy(encode_patients(test, bundle.encoding))
    thresholds = np.array(bundle.threshold_vector())
    with torch.inference_mode():
        def flags(x):
            return torch.sigmoid(bundle.model(x, tabular)).numpy() >= thresholds

        reference = flags(inference)
        for name, x in (("before (cache, resize then crop)", before), ("after (DecodedImages)", after)):
            gap = (grey_levels(x, prep) - grey_levels(inference, prep)).abs()
            differ = int((flags(x) != reference).sum())
            print(f"{name:34s} mean |input - inference| {gap.mean():.3f} grey levels (max {gap.max():.1f}); "
                  f"flags differing {differ} of {reference.size}")
    print(f"{len(paths)} test images of {args.config}, bundle {bundle.label}, {prep.image_size} px")


if __name__ == "__main__":
    main()
