#!/usr/bin/env bash
# Model v3's cross-validation and final model on a CPU (issue 23), as background jobs:
#
#   bash training/v3_cpu.sh [VARIANT]        (default v3g64; output in runs/v3cv)
#
# Two single-threaded processes (one thread per process keeps 2 cores busy with less OpenMP
# waiting than one two-threaded process when other work shares the machine), niced: folds 0-2 in
# one, folds 3-4 and then the final model (every development image) in the other. Logs in
# runs/v3cv/train_<variant>_*.log; the process group id in runs/v3cv/<variant>.pgid, so the jobs
# can be paused (kill -STOP -PGID), resumed (kill -CONT -PGID) or stopped (kill -TERM -PGID).
# Resumable: a checkpoint every epoch; run the same command again after a stop. Then:
#   python -m training.crossval ... --stage report   and   python -m training.export_v3 ...
# (the README section "Model v3" gives the whole sequence).
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${1:-v3g64}
OUT=${OUT:-runs/v3cv}
PY=${PYTHON:-python}
mkdir -p "$OUT"
DATA="--images ../shared/data/nih/images --labels ../shared/data/nih/labels.csv \
 --images ../shared/data/nih_extra/images --labels ../shared/data/nih_extra/labels.csv \
 --metadata-table ../shared/data/nih/metadata/Data_Entry_2017_v2020.csv.gz \
 --out $OUT --config training/configs/v3.toml --variant $VARIANT --threads 1"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
# decode the images once, before two processes would race to build the same cache
$PY -m training.crossval $DATA --stage cache >> "$OUT/train_${VARIANT}_cache.log" 2>&1
setsid bash -c "
  nice -n 5 $PY -m training.crossval $DATA --stage train --folds 0,1,2 >> $OUT/train_${VARIANT}_folds0_1_2.log 2>&1 &
  { nice -n 5 $PY -m training.crossval $DATA --stage train --folds 3,4 >> $OUT/train_${VARIANT}_folds3_4.log 2>&1
    nice -n 5 $PY -m training.crossval $DATA --stage final >> $OUT/train_${VARIANT}_final.log 2>&1; } &
  wait" &
sleep 1
ps -o pgid= $! | tr -d ' ' > "$OUT/$VARIANT.pgid"
echo "started $VARIANT in the background: process group $(cat "$OUT/$VARIANT.pgid"), logs in $OUT/"
