"""The peer: the program a user would write with TorchXRayVision, as a whole process.

    python benchmarks/peer_xrv.py STUDIES_DIR OUT.csv

Follows TorchXRayVision's documented use: read each image (``skimage.io.imread``, or pydicom's
``pixel_array`` for DICOM), ``xrv.datasets.normalize``, ``XRayCenterCrop`` + ``XRayResizer(224)``,
``xrv.models.DenseNet`` at batch 1 in float32, and write one CSV row of outputs per image.
The model has random weights (nothing can be downloaded here); its compute is the same as the
published weights'. Needs ``pip install torchxrayvision scikit-image`` (benchmark extras).
"""

import csv
import sys
from pathlib import Path

import numpy as np
import pydicom
import skimage.io
import torch
import torchvision
import torchxrayvision as xrv


def read(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        ds = pydicom.dcmread(path)
        img = ds.pixel_array.astype(np.float32)
        return xrv.datasets.normalize(img, float(2 ** int(ds.BitsStored) - 1))
    img = skimage.io.imread(path)
    if img.ndim == 3:
        img = img.mean(2)
    return xrv.datasets.normalize(img, 255)


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = xrv.models.DenseNet(weights=None).eval()
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])
    with torch.no_grad(), open(out, "w", newline="") as f:
        writer = csv.writer(f)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            img = transform(read(path)[None, ...])
            outputs = model(torch.from_numpy(img)[None].float())[0]
            writer.writerow([path.name, *(f"{v:.6f}" for v in outputs.tolist())])


if __name__ == "__main__":
    main()
