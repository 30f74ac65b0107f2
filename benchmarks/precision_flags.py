"""Reduced precision against float32 on the real NIH images: how far probabilities move, how
many (image, finding) flags differ with and without float32 re-scoring, and how many images the
re-scoring had to redo (the engine switches to float32 when more than half need it).

    python benchmarks/precision_flags.py [--weights BUNDLE] [--precision bf16|fp16] [--n 480]

bf16 runs on any CPU (emulated, slowly, where the CPU lacks native bf16): the numbers are about
accuracy, not speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import NIH, real_images  # noqa: E402
from cxr_batch.bundle import load_bundle  # noqa: E402
from cxr_batch.inference import Engine  # noqa: E402
from cxr_batch.preprocess import eval_transform  # noqa: E402
from cxr_batch.readers import read_pil  # noqa: E402
from cxr_batch.runtime import RunPolicy  # noqa: E402
from cxr_batch.study import ScoringRules  # noqa: E402


def scores(engine: Engine, x: torch.Tensor, t: torch.Tensor, batch: int = 16) -> np.ndarray:
    return np.concatenate([engine.probabilities(x[i:i + batch], t[i:i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--n", type=int, default=480)
    args = ap.parse_args()
    bundle = load_bundle(args.weights)
    paths = real_images(NIH / "images")[: args.n]
    x = torch.stack([eval_transform(read_pil(p, ScoringRules()), bundle.preprocessing) for p in paths])
    t = torch.tensor([[0.5, 0.0, 1.0], [0.6, 1.0, 0.0]]).repeat((len(x) + 1) // 2, 1)[: len(x)]
    cpu = torch.device("cpu")
    exact = scores(Engine(bundle, RunPolicy(cpu, "fp32")), x, t)
    raw = scores(Engine(bundle, RunPolicy(cpu, args.precision), refine_margin=0.0), x, t)
    fast_engine = Engine(bundle, RunPolicy(cpu, args.precision))
    fast = scores(fast_engine, x, t)
    thr = np.array(bundle.threshold_vector())
    same = lambda p: ((p >= thr) == (exact >= thr)).mean()  # noqa: E731
    print(f"{bundle.label}, {len(x)} NIH images at 512 px, {args.precision} against fp32 (batch 16)")
    print(f"  largest probability difference without re-scoring {np.abs(raw - exact).max():.4f}; "
          f"flags equal {same(raw):.2%} of {raw.size} (image, finding) pairs")
    switched = f", float32 from image {fast_engine.fp32_from} on" if fast_engine.fp32_from is not None else ""
    print(f"  with re-scoring within {fast_engine.refine_margin}: flags equal {same(fast):.2%}; "
          f"{fast_engine.refined} of {fast_engine.scored} images re-scored{switched}")


if __name__ == "__main__":
    main()
