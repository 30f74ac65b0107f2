#!/usr/bin/env bash
# The GPU data path, end to end, on a lent GPU machine (one prepared run, about 5 minutes):
#   [IMAGES=DIR] bash benchmarks/gpu_bench.sh [N]   (N images per set, default 4096; IMAGES: PNGs to use,
#                                                     default ../shared/data/nih/images)
# Prints, for 512-px PNG and for 512-px JPEG-baseline DICOM: the whole `cxr-batch scan --no-pdf`
# process (start-up counted) and the model alone at fp16, batch 256 (benchmarks/scan_throughput.py).
# Workers send decoded uint8 images once; crop, resize and normalisation run on the GPU
# (cxr_batch.preprocess.eval_transform_batch), from pinned memory.
set -eu
N=${1:-4096}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
nproc
TMP=$(mktemp -d)
python3 - "$N" "$TMP" <<'PY'
import os, sys
from pathlib import Path
import numpy as np
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit
from benchmarks.common import NIH, link_folder, real_images
NIH_IMAGES = Path(os.environ["IMAGES"]) if os.environ.get("IMAGES") else NIH / "images"  # carried PNGs on a GPU machine
from cxr_batch.dicom_build import radiograph, save
n, tmp = int(sys.argv[1]), Path(sys.argv[2])
link_folder(real_images(NIH_IMAGES), n, tmp / "png")
src = tmp / "dcm_src"
for i, p in enumerate(real_images(NIH_IMAGES)[:256]):
    ds = radiograph(np.asarray(Image.open(p).convert("L")), PatientAge="050Y", PatientSex="F", ViewPosition="PA")
    save(ds, src / f"{i:04d}.dcm", JPEGBaseline8Bit)
link_folder(sorted(src.glob("*.dcm")), n, tmp / "dcm")
PY
for set in png dcm; do
  start=$(date +%s.%N)
  python3 -m cxr_batch scan "$TMP/$set" --out "$TMP/out_$set" --no-pdf --quiet --device cuda --batch-size 256
  end=$(date +%s.%N)
  python3 -c "import sys; n, s = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]); print(f'$set: {n} images in {s:.1f} s whole process = {n / s:.0f} images/s (start-up counted)')" "$N" "$start" "$end"
done
timeout 300 python3 benchmarks/scan_throughput.py --images "$TMP/png" --device cuda --batch-size 256 --n 2048 --memory-n 0
