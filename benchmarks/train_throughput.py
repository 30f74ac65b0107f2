"""Training data path and training step throughput.

    python benchmarks/train_throughput.py [--n 128] [--image-size 224] [--batch-size 32] [--device auto]

Prints images/s, on one worker (one thread), of: decoding the PNGs every epoch as the study did
(read, resize to the cache size) against reading the uint8 cache that `cxr-batch train` builds
once; the batched augmentation on the training device; and full training steps (augmentation,
forward, backward, Adam) on the device, with bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import real_images  # noqa: E402
from cxr_batch.model import build_model  # noqa: E402
from cxr_batch.preprocess import Preprocessing  # noqa: E402
from cxr_batch.device import pick_device  # noqa: E402
from training.augment import train_transform  # noqa: E402
from training.cache import build_cache, cache_size_for, decode_resized  # noqa: E402


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    paths = real_images()[: args.n]
    prep = Preprocessing(image_size=args.image_size)
    size = cache_size_for(prep)
    device = pick_device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    png = rate(lambda: [decode_resized(p, size) for p in paths], len(paths))
    with tempfile.TemporaryDirectory() as tmp:
        cache, index = build_cache(paths[0].parent, [p.name for p in paths], size, Path(tmp), workers=1)
        cached = rate(lambda: [torch.from_numpy(np.array(cache[index[p.name]])) for p in paths], len(paths))
    torch.set_num_threads(threads)
    print(f"{len(paths)} real images, cache {size} px, training size {args.image_size}, device {device}")
    print(f"data path, one worker: PNG decode + resize {png:8.1f} images/s; from the uint8 cache {cached:8.1f} images/s "
          f"({cached / png:.0f}x)")
    batch = torch.randint(0, 256, (args.batch_size, 1, size, size), dtype=torch.uint8, device=device)
    mirror = torch.zeros(args.batch_size, dtype=torch.bool, device=device)
    train_transform(batch, mirror, prep)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    aug = rate(lambda: ([train_transform(batch, mirror, prep) for _ in range(args.steps)], sync()),
               args.steps * args.batch_size)
    print(f"batched augmentation on {device}: {aug:8.1f} images/s")
    model = build_model().to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    y = (torch.rand(args.batch_size, 14, device=device) > 0.8).float()
    tab = torch.rand(args.batch_size, 3, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step():
        x = train_transform(batch, mirror, prep).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, tab).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    sync()
    steps = rate(lambda: ([step() for _ in range(args.steps)], sync()), args.steps * args.batch_size)
    print(f"training steps on {device} ({'bf16 autocast' if dtype else 'fp32'}): {steps:8.1f} images/s")


if __name__ == "__main__":
    main()
