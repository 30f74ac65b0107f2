"""Training module: regenerates cxr-batch weights bundles from NIH ChestX-ray14.

Stages, each writing files the next one reads: prepare (table of targets, patient data and
split) -> cache (images decoded once to a resized uint8 array) -> train -> thresholds ->
evaluate -> export bundle. The model, findings list, preprocessing and patient-data encoding
all come from ``cxr_batch``.
"""
