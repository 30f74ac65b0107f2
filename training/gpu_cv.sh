#!/usr/bin/env bash
# A model's cross-validation on one GPU, as one prepared run (v2: issue 15 item 4; v3: issue 23).
#
#   CONFIG=training/configs/v3.toml DATA="../shared/data/nih ../shared/data/nih_extra" \
#       bash training/gpu_cv.sh prepare CARRY_DIR        (v3: both folders, held-out test split)
#   CONFIG=training/configs/v3.toml bash training/gpu_cv.sh run CARRY_DIR OUT_DIR
#
# DATA: folders holding images/ and labels.csv (default ../shared/data/nih). With a held-out test
# in the config (test_fraction > 0) the final models train on the development images
# (crossval --stage final); otherwise on all of them (export_v2 --train-only). BENCH=1 (default
# when prepare carried bench PNGs) ends the run with benchmarks/gpu_bench.sh on those images: the
# GPU scan path measured in the same call.
#
#   bash training/gpu_cv.sh prepare CARRY_DIR      here, beside ../shared/data/nih: decodes the
#        480 images once per variant size (crossval --stage cache) and puts the caches and the model
#        views held-out images are scored on (gzipped),
#        labels.csv and the NIH metadata table in CARRY_DIR, about 13 MB, for a machine without them.
#   bash training/gpu_cv.sh run CARRY_DIR OUT_DIR  on the GPU machine: every variant of
#        training/configs/v2_gpu.toml, five folds and a final model each, as parallel jobs on the one
#        GPU (launch-bound at these sizes, so several processes share it well), in config order
#        until TRAIN_SECONDS (default 300) have passed, none running past STOP_SECONDS (380); then
#        the image choice (crossval --stage choose) and OUT_DIR/runs.tar.gz (predictions,
#        histories, logs: no weights), and the chosen final model's weights (float16, split into
#        15 MB parts: join with cat) plus the best other variant's.
#
# Back here: untar runs.tar.gz at the repository root, join the parts into
# runs/gpu_final/<variant>/state_<ema|raw>_epoch<E>.pt, run the report stage again (the same
# numbers) and `python -m training.export_v2 --cv runs/gpu_cv --out runs/gpu_final/<variant>
# --config training/configs/v2_gpu.toml --bundle weights/cxr-fpn-v2 ...`.
set -u
MODE=${1:?prepare or run} CARRY=${2:?carry folder}
case "$MODE" in prepare|run) ;; *) echo "gpu_cv.sh: unknown mode '$MODE' (prepare or run)" >&2; exit 2 ;; esac
CONFIG=${CONFIG:-training/configs/v2_gpu.toml}
CV=runs/gpu_cv FINAL=runs/gpu_final
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}

if [ "$MODE" = prepare ]; then
  DATA=${DATA:-${NIH:-../shared/data/nih}}
  TABLE=${TABLE:-../shared/data/nih/metadata/Data_Entry_2017_v2020.csv.gz}
  set -e
  mkdir -p "$CARRY"
  SRC="" k=0
  for d in $DATA; do
    SRC="$SRC --images $d/images --labels $d/labels.csv"
    cp "$d/labels.csv" "$CARRY/labels_$k.csv"
    k=$((k + 1))
  done
  $PY -m training.crossval --stage cache $SRC --metadata-table "$TABLE" --out "$CV" --config "$CONFIG"
  for f in "$CV"/cache/cache_*.u8 "$CV"/cache/views_*.f32; do gzip -c "$f" > "$CARRY/$(basename "$f").gz"; done
  cp "$CV"/cache/cache_*.json "$CV"/cache/views_*.json "$TABLE" "$CARRY/"
  if [ "${BENCH_IMAGES:-256}" -gt 0 ]; then  # 512-px PNGs for benchmarks/gpu_bench.sh at the end of the run
    mkdir -p "$CARRY/bench_png"
    ls "${DATA%% *}/images"/*.png | head -n "${BENCH_IMAGES:-256}" | xargs -I{} cp {} "$CARRY/bench_png/"
  fi
  du -sh "$CARRY"
  exit 0
fi

OUT=${3:?out folder}
[ -f "$CARRY/labels.csv" ] && cp "$CARRY/labels.csv" "$CARRY/labels_0.csv"  # a carry made for v2
for f in labels_0.csv Data_Entry_2017_v2020.csv.gz; do
  [ -f "$CARRY/$f" ] || { echo "gpu_cv.sh: $CARRY/$f missing: run 'gpu_cv.sh prepare $CARRY' first" >&2; exit 2; }
done
SRC="" k=0
for f in "$CARRY"/labels_*.csv; do SRC="$SRC --images $CARRY/none$k --labels $f"; k=$((k + 1)); done
HELD_OUT=$($PY -c "import tomllib, sys; print(int(tomllib.load(open(sys.argv[1], 'rb')).get('test_fraction', 0) > 0))" "$CONFIG")
export SRC HELD_OUT
ls "$CARRY"/cache_*.u8.gz "$CARRY"/views_*.f32.gz > /dev/null 2>&1 || { echo "gpu_cv.sh: no caches in $CARRY: run 'gpu_cv.sh prepare' first" >&2; exit 2; }
if [ "${DEVICE:-cuda}" != cpu ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_cv.sh: torch sees no CUDA device here (DEVICE=cpu runs the same jobs on the CPU)" >&2; exit 2
fi
T0=$(date +%s)
export DEADLINE=$(( T0 + ${TRAIN_SECONDS:-300} )) STOP=$(( T0 + ${STOP_SECONDS:-380} ))
export PY CONFIG CV FINAL CARRY
mkdir -p "$CV/cache" "$FINAL" "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  nproc; } 2>&1 | tee "$CV/machine.txt"
for f in "$CARRY"/cache_*.u8.gz "$CARRY"/views_*.f32.gz; do gunzip -c "$f" > "$CV/cache/$(basename "$f" .gz)"; done
cp "$CARRY"/cache_*.json "$CARRY"/views_*.json "$CV/cache/"
COMMON="--config $CONFIG --threads 1 --device ${DEVICE:-cuda} --checkpoint-every 0"
export COMMON
# folds.csv once, before the parallel jobs read it
$PY -m training.crossval --stage cache $SRC \
  --metadata-table "$CARRY/Data_Entry_2017_v2020.csv.gz" --out "$CV" --config "$CONFIG" || exit 1

run_job() {  # cv VARIANT FOLD | final VARIANT
  local now; now=$(date +%s)
  if [ "$now" -ge "$DEADLINE" ]; then echo "skipped $*: training time is up"; return 0; fi
  if [ "$1" = cv ]; then
    timeout $(( STOP - now )) $PY -m training.crossval --stage train --variant "$2" --folds "$3" \
      $SRC --metadata-table "$CARRY/Data_Entry_2017_v2020.csv.gz" --out "$CV" \
      $COMMON >> "$CV/train_$2_fold$3.log" 2>&1
  elif [ "$HELD_OUT" = 1 ]; then  # the development images only: the held-out test stays unseen
    timeout $(( STOP - now )) $PY -m training.crossval --stage final --variant "$2" $SRC \
      --metadata-table "$CARRY/Data_Entry_2017_v2020.csv.gz" --out "$CV" $COMMON >> "$CV/train_$2_final.log" 2>&1
  else
    timeout $(( STOP - now )) $PY -m training.export_v2 --train-only "$2" --images "$CARRY/none0" \
      --labels "$CARRY/labels_0.csv" --cv "$CV" --out "$FINAL/$2" --bundle unused $COMMON >> "$CV/train_$2_final.log" 2>&1
  fi
  echo "$* exit $? after $(( $(date +%s) - now )) s (at $(( $(date +%s) - T0 )) s)"
}
export -f run_job
export T0
$PY -c "
import tomllib, sys
config = tomllib.load(open(sys.argv[1], 'rb'))
for v in config['variant']:
    for f in range(config.get('folds', 5)):
        print('cv', v['name'], f)
    print('final', v['name'])" "$CONFIG" > "$CV/jobs.txt"
xargs -P "${PARALLEL:-8}" -L 1 bash -c 'run_job "$@"' _ < "$CV/jobs.txt" 2>&1 | tee "$CV/jobs.log"
nvidia-smi --query-gpu=memory.used --format=csv | tee -a "$CV/machine.txt"

# the image choice only (seconds); the whole report (minutes of CPU) is run again where the runs land
timeout "${CHOOSE_SECONDS:-90}" $PY -m training.crossval --stage choose $SRC \
  --metadata-table "$CARRY/Data_Entry_2017_v2020.csv.gz" --out "$CV" \
  --config "$CONFIG" --threads 8 > "$CV/choose.log" 2>&1
echo "choose exit $? at $(( $(date +%s) - T0 )) s"; cat "$CV/choose.log"

# weights: the chosen final model and the best other variant's (or, without a choice, the last
# EMA of the first three finished finals), float16, in parts under 16 MB
$PY - "$CV" "$FINAL" "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
cv, final, out = (Path(a) for a in sys.argv[1:])
picks = []
choice = cv / "choice.json"
if choice.exists():
    r = json.loads(choice.read_text())
    chosen = r["chosen"]
    picks.append((chosen["variant"], chosen["weights"], chosen["epoch"]))
    others = sorted((c for c in r["bests"] if c["variant"] != chosen["variant"]), key=lambda c: -c["image_only_mean_auc"])
    others = [c for c in others if any((root / f"state_{c['weights']}_epoch{c['epoch']}.pt").exists()
                                       for root in (final / c["variant"], cv / c["variant"] / "final"))]
    picks += [(c["variant"], c["weights"], c["epoch"]) for c in others[:1]]
else:
    for d in sorted(final.iterdir()):
        states = sorted(d.glob("state_ema_epoch*.pt"), key=lambda p: int(p.stem.rsplit("epoch", 1)[1]))
        if states:
            picks.append((d.name, "ema", int(states[-1].stem.rsplit("epoch", 1)[1])))
    picks = picks[:3]
for variant, which, epoch in picks:
    path = final / variant / f"state_{which}_epoch{epoch}.pt"
    if not path.exists():  # a held-out-test config: the final model is under the cross-validation folder
        path = cv / variant / "final" / f"state_{which}_epoch{epoch}.pt"
    if not path.exists():
        print("missing", path)
        continue
    state = {k: (t.half() if t.is_floating_point() else t) for k, t in torch.load(path, weights_only=True).items()}
    blob = out / f"{variant}_{which}_e{epoch}.pt"
    torch.save(state, blob)
    data = blob.read_bytes()
    blob.unlink()
    for i in range(0, len(data), 15_000_000):
        (out / f"{variant}_{which}_e{epoch}.pt.part{i // 15_000_000}").write_bytes(data[i:i + 15_000_000])
    print("packed", path, len(data), "bytes")
PY
tar -czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='*.u8' --exclude='*.tmp' "$CV" "$FINAL"
ls -la "$OUT"
echo "done at $(( $(date +%s) - T0 )) s"
# the GPU scan path, measured in the same call (benchmarks/gpu_bench.sh on the carried PNGs)
if [ "${BENCH:-1}" = 1 ] && [ -d "$CARRY/bench_png" ] && [ "${DEVICE:-cuda}" != cpu ]; then
  IMAGES="$CARRY/bench_png" timeout "${BENCH_SECONDS:-240}" bash benchmarks/gpu_bench.sh "${BENCH_N:-2048}" 2>&1 \
    | tee "$OUT/gpu_bench.log"
fi
# success only if a choice was made and the chosen model's weights travel back
[ -f "$CV/choice.json" ] && ls "$OUT"/*.pt.part0 > /dev/null 2>&1 || { echo "gpu_cv.sh: no model was chosen or packed" >&2; exit 1; }
