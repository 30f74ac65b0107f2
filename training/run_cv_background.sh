#!/bin/bash
# Background launcher for the CV training on a shared CPU (the numbers in
# weights/cxr-fpn-v2/MODEL_CARD.md came from runs started this way):
#   training/run_cv_background.sh VARIANT "FOLDSET [FOLDSET ...]"     e.g.  px64 "1,2 3,4 final"
# A fold set "final" trains the variant on all 480 images instead (training.export_v2 --train-only,
# into runs/final), keeping its weights at every snapshot epoch for the export to pick from.
# One process per fold set, one thread each (with other jobs on the CPU, one thread per process
# avoids OpenMP threads waiting on each other), niced, in one process group whose id is written
# to /tmp/cxr-cv.pid so the group can be paused (kill -STOP -PGID) and resumed (kill -CONT -PGID).
# Resumable: run the same command again after a kill.
set -euo pipefail
export PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
VARIANT=${1:?variant}; FOLDSETS=${2:-"0,1,2,3,4"}
OUT=${OUT:-runs/cv}; mkdir -p "$OUT"
setsid bash -c '
  for fs in '"$FOLDSETS"'; do
    if [ "$fs" = final ]; then
      nice -n 10 env PYTHONPATH="$PWD" "$PYTHON" -m training.export_v2 --train-only '"$VARIANT"' \
        --images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv --cv '"$OUT"' \
        --config training/configs/v2.toml --out runs/final --bundle unused --threads 1 \
        >> '"$OUT"'/train_'"$VARIANT"'_final.log 2>&1 &
      continue
    fi
    nice -n 10 env PYTHONPATH="$PWD" "$PYTHON" -m training.crossval \
      --images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv \
      --metadata-table ../shared/data/nih/metadata/Data_Entry_2017_v2020.csv.gz \
      --out '"$OUT"' --config training/configs/v2.toml --stage train --variant '"$VARIANT"' \
      --folds "$fs" --threads 1 >> '"$OUT"'/train_'"$VARIANT"'_folds${fs//,/_}.log 2>&1 &
  done
  wait' > /dev/null 2>&1 &
echo $! > /tmp/cxr-cv.pid
echo "process group $(cat /tmp/cxr-cv.pid)"
