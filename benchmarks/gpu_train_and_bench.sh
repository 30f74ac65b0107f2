#!/usr/bin/env bash
# The GPU session behind the README's GPU figures and the bundled weights:
#   benchmarks/gpu_train_and_bench.sh IMAGES_DIR LABELS_CSV OUT_DIR
# 1. scan throughput on the GPU (model-only, end-to-end, decode rate, memory);
# 2. the bundled recipe and three ablations trained side by side on the one GPU;
# 3. their metrics, logs and figures packed into OUT_DIR/runs.tar.gz, bundles split into
#    15 MB parts (join with cat). QUICK=1 shrinks everything for a dry run on a CPU.
set -u
IMAGES=$1 LABELS=$2 OUT=$3
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
RUNS=${RUNS:-/tmp/cxr-runs}
mkdir -p "$RUNS" "$OUT"
extra=() ; bench=(--device cuda --batch-size 256 --n 4096 --memory-n 2000)
if [ "${QUICK:-0}" = 1 ]; then
  extra=(--epochs 1 --image-size 64 --limit 40 --device cpu); bench=(--device cpu --n 32 --memory-n 0)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  nproc; } > "$RUNS/machine.txt" 2>&1
[ "${SKIP_BENCH:-0}" = 1 ] || timeout 150 python3 benchmarks/scan_throughput.py --images "$IMAGES" "${bench[@]}" > "$RUNS/bench_scan.log" 2>&1
pids=()
for cfg in bundled ablation/no_skip ablation/skip_random ablation/select_last; do
  name=$(basename "$cfg")
  timeout "${TRAIN_TIMEOUT:-400}" python3 -m cxr_batch train --images "$IMAGES" --metadata "$LABELS" --out "$RUNS/$name" \
    --config "training/configs/$cfg.toml" "${extra[@]}" > "$RUNS/train_$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude='*.u8' --exclude='prepared.csv' .
for name in bundled select_last skip_random; do
  b="$RUNS/$name/bundle"
  [ -f "$b/model.pt" ] || continue
  split -b 15000000 -d "$b/model.pt" "$OUT/${name}_model.pt.part"
done
ls -la "$OUT"
