#!/usr/bin/env bash
# Model v3 after training (issue 23): the report, the bundle, its held-out test, its drift
# reference and the view analysis, in that order, from the runs of training/v3_cpu.sh (or of
# training/gpu_cv.sh unpacked into runs/v3cv):
#
#   bash training/v3_finish.sh            (writes weights/cxr-fpn-v3, runs/v3heldout)
#
# The drift reference is made from ../shared/data/nih only: nih_extra was gathered by selection
# (pneumonia and AP films over-represented, 50 images at 256 px), so its view, size and output
# mix is not what a hospital's stream looks like, and a reference made with it would raise view
# and size alarms on ordinary NIH-like studies.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/v3cv}
BUNDLE=${BUNDLE:-weights/cxr-fpn-v3}
PY=${PYTHON:-python}
NIH=../shared/data/nih
EXTRA=../shared/data/nih_extra
TABLE=$NIH/metadata/Data_Entry_2017_v2020.csv.gz
DATA=(--images $NIH/images --labels $NIH/labels.csv --images $EXTRA/images --labels $EXTRA/labels.csv)
export PYTHONPATH="$PWD"
$PY -m training.crossval "${DATA[@]}" --metadata-table $TABLE --out "$OUT" --config training/configs/v3.toml \
    --stage report
$PY -m training.export_v3 --cv "$OUT" --config training/configs/v3.toml "${DATA[@]}" --metadata-table $TABLE \
    --bundle "$BUNDLE" --version 3.0
$PY -m training.heldout --cv "$OUT" --bundle "$BUNDLE" --out runs/v3heldout "${DATA[@]}" --write-manifest
$PY -m training.reference "$BUNDLE" --images $NIH/images --metadata $NIH/labels.csv --in-place
$PY -m training.view_analysis --cv "$OUT" "${DATA[@]}"
