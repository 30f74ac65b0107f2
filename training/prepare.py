"""Stage 1, prepare: metadata -> a table of targets, patient data, split and balancing copies.

Writes ``prepared.csv`` (one row per training example, mirrored and replicated copies
included) that the trainer only reads. Pure functions below take and return DataFrames or
arrays so each rule is tested on hand-made cases.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from cxr_batch.display import plural
from cxr_batch.findings import FINDINGS, NO_FINDING
from cxr_batch.labels import multi_hot
from cxr_batch.metadata import NIH_COLUMNS

from .config import TrainConfig

log = logging.getLogger("cxr_batch.train")
PREPARED = "prepared.csv"  # this stage's table, read by every later stage
# A validation or test part smaller than this cannot say much about any finding: thresholds
# tuned on it and metrics measured on it are noise (a 95% interval on a proportion measured
# on 30 images is about +/-18 percentage points wide).
MIN_EVAL_IMAGES = 30


def read_nih_metadata(path: Path) -> pd.DataFrame:
    """The NIH Data_Entry table (.csv or .csv.gz) -> columns image, labels, patient_id, age, sex, view."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    need = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    out = table[need].rename(columns={**NIH_COLUMNS, "Image Index": "image", "Finding Labels": "labels"})
    # one image on two rows (a table pasted twice, a re-export under other patient IDs) could be
    # split onto both sides: the test would score pixels training saw
    repeated = out.loc[out["image"].duplicated(), "image"].unique()
    if len(repeated):
        raise ValueError(f"{path}: {plural(len(repeated), 'image')} {'is' if len(repeated) == 1 else 'are'} on more "
                         f"than one row ({', '.join(repeated[:5])}{', ...' if len(repeated) > 5 else ''}): "
                         "keep one row per image")
    return out.reset_index(drop=True)


def undersample(df: pd.DataFrame, keep_no_finding: float, keep_only: dict, rng: np.random.Generator) -> pd.DataFrame:
    """Keep a fraction of 'No Finding' images and of images whose *only* finding is one of
    ``keep_only`` (images with those findings plus others are all kept)."""
    keep = np.ones(len(df), dtype=bool)
    rules = {NO_FINDING: keep_no_finding, **keep_only}
    labels = df["labels"].str.strip().to_numpy()
    for name, fraction in rules.items():
        rows = np.flatnonzero(labels == name)
        if fraction < 1.0 and len(rows):
            drop = rng.permutation(rows)[round(len(rows) * fraction):]
            keep[drop] = False
    return df[keep].reset_index(drop=True)


def split_by_patient(df: pd.DataFrame, test_fraction: float, val_fraction: float, seed: int) -> pd.Series:
    """'train'/'val'/'test' per row, no patient on two sides, stratified on the label string
    as far as grouping allows (StratifiedGroupKFold; GroupShuffleSplit when too few rows)."""
    split = pd.Series("train", index=df.index)
    groups = df["patient_id"].to_numpy()
    strata = df["labels"].to_numpy()

    def carve(index: np.ndarray, fraction: float, seed: int) -> np.ndarray:
        if fraction <= 0 or len(index) < 2:
            return np.array([], dtype=int)
        n_splits = max(2, round(1 / fraction))
        try:
            sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            with warnings.catch_warnings():  # rare label strings cannot be in every fold: expected
                warnings.simplefilter("ignore", UserWarning)
                _, held = next(sgkf.split(index, strata[index], groups[index]))
        except ValueError:  # fewer groups than folds
            gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            _, held = next(gss.split(index, groups=groups[index]))
        return index[held]

    everything = np.arange(len(df))
    test = carve(everything, test_fraction, seed)
    rest = np.setdiff1d(everything, test)
    val = carve(rest, val_fraction / max(1e-9, 1 - test_fraction), seed + 1)
    split.iloc[test] = "test"
    split.iloc[val] = "val"
    return split


def split_from_lists(df: pd.DataFrame, train_val: set[str], test: set[str], val_fraction: float, seed: int) -> pd.Series:
    """Official NIH split: test from test_list.txt; validation carved by patient from train_val."""
    split = pd.Series("unused", index=df.index)
    split[df["image"].isin(test)] = "test"
    tv = np.flatnonzero(df["image"].isin(train_val).to_numpy())
    split.iloc[tv] = "train"
    if len(tv):
        inner = split_by_patient(df.iloc[tv].reset_index(drop=True), 0.0, val_fraction, seed)
        split.iloc[tv[inner.to_numpy() == "val"]] = "val"
    return split


def list_leaks(df: pd.DataFrame, train_val: set[str], test: set[str]) -> list[str]:
    """Why a site's own split lists would test on what training saw: an image in both lists, or
    a patient of ``df`` with images in both. Empty when the lists keep them apart (NIH's do)."""
    problems = []
    both = sorted(train_val & test)
    if both:
        problems.append(f"{plural(len(both), 'image')} {'is' if len(both) == 1 else 'are'} in both --split-lists "
                        f"files ({', '.join(both[:5])}{', ...' if len(both) > 5 else ''})")
    sides = df[df["image"].isin(train_val)]["patient_id"], df[df["image"].isin(test)]["patient_id"]
    shared = sorted(set(sides[0]) & set(sides[1]))
    if shared:
        problems.append(f"{plural(len(shared), 'patient')} {'has' if len(shared) == 1 else 'have'} images in both "
                        f"--split-lists files ({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''})")
    return problems


def assert_patient_disjoint(df: pd.DataFrame) -> None:
    sides = df[df["split"].isin(["train", "val", "test"])].groupby("patient_id")["split"].nunique()
    crossing = sides[sides > 1]
    if len(crossing):
        raise AssertionError(f"{len(crossing)} patient(s) on more than one side of the split, e.g. {list(crossing.index[:5])}")


def finding_counts(y: np.ndarray) -> np.ndarray:
    return y.sum(axis=0)


def balance_train(train: pd.DataFrame, y: np.ndarray, mirror_below: int, replicate_to: int,
                  keep_no_finding: float, keep_atelectasis: float, rng: np.random.Generator) -> pd.DataFrame:
    """The study's train-only balancing, in its order:

    1. add a left-right mirrored copy of every image that has a finding with fewer than
       ``mirror_below`` occurrences;
    2. replicate images of findings with fewer than ``replicate_to`` occurrences (counted
       after step 1) until they reach it;
    3. keep ``keep_no_finding`` of 'No Finding' rows and ``keep_atelectasis`` of rows whose
       only finding is Atelectasis.

    ``train`` rows align with ``y`` [N, 14]; returns rows with a ``mirror`` column (0/1).
    """
    base = train.assign(mirror=0).reset_index(drop=True)
    counts = finding_counts(y)
    rare = counts < mirror_below
    to_mirror = (y[:, rare].sum(axis=1) > 0) if rare.any() else np.zeros(len(y), dtype=bool)
    rows = pd.concat([base, base[to_mirror].assign(mirror=1)], ignore_index=True)
    ys = np.concatenate([y, y[to_mirror]])
    counts = finding_counts(ys)
    extra = []
    for k, name in enumerate(FINDINGS):
        have = np.flatnonzero(ys[:, k])
        if 0 < counts[k] < replicate_to:
            extra.append(rng.choice(have, size=replicate_to - counts[k], replace=True))
    if extra:
        picks = np.concatenate(extra)
        rows = pd.concat([rows, rows.iloc[picks]], ignore_index=True)
        ys = np.concatenate([ys, ys[picks]])
    labels = rows["labels"].str.strip().to_numpy()
    keep = np.ones(len(rows), dtype=bool)
    for name, fraction in ((NO_FINDING, keep_no_finding), ("Atelectasis", keep_atelectasis)):
        idx = np.flatnonzero(labels == name)
        if fraction < 1.0 and len(idx):
            keep[rng.permutation(idx)[round(len(idx) * fraction):]] = False
    return rows[keep].reset_index(drop=True)


def scaled_balance_counts(cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """The balancing counts for a training split of ``n_train`` images: the study's counts
    scaled by n_train / balance_reference (or as given when balance_reference is 0)."""
    if not cfg.balance_reference:
        return cfg.mirror_below, cfg.replicate_to
    factor = n_train / cfg.balance_reference
    return max(1, round(cfg.mirror_below * factor)), max(1, round(cfg.replicate_to * factor))


def scarce_findings(df: pd.DataFrame, table) -> list[str]:
    """Findings of the rows used (after --limit and undersampling) with fewer than one positive
    image for each of training, validation and test: no fraction or seed can split them, only
    more labelled studies can."""
    y = multi_hot(df.loc[df["split"] != "unused", "labels"])
    problems = []
    for finding, n in zip(FINDINGS, y.sum(axis=0)):
        if n < 3:
            count = "no positive image" if n == 0 else f"{int(n)} positive image{'' if n == 1 else 's'}"
            problems.append(f"{table} has {count} of {finding} among the {len(y)} rows used (after --limit and "
                            "undersampling), where training, validation and test need one each: label more "
                            "studies with it")
    return problems


def split_problems(df: pd.DataFrame, min_images: int = MIN_EVAL_IMAGES) -> list[str]:
    """Why the validation and test parts of a split cannot be evaluated: a part under
    ``min_images`` images, or a finding with no positive or no negative image in it (its
    threshold cannot be tuned, its AUC is undefined). Empty when both parts are usable."""
    problems = []
    for part, name in (("val", "validation"), ("test", "test")):
        rows = df[df["split"] == part]
        if len(rows) < min_images:
            problems.append(f"the {name} part has {len(rows)} images, fewer than {min_images}")
        y = multi_hot(rows["labels"]) if len(rows) else np.zeros((0, len(FINDINGS)))
        for what, missing in (("positive", y.sum(axis=0) == 0), ("negative", y.sum(axis=0) == len(y))):
            if missing.any():
                names = ", ".join(f for f, m in zip(FINDINGS, missing) if m)
                problems.append(f"the {name} part has no {what} image of {names}")
    return problems


def prepare(cfg: TrainConfig, out: Path) -> pd.DataFrame:
    """Run the stage and write ``out/prepared.csv`` and ``out/prepare.json``."""
    rng = np.random.default_rng(cfg.seed)
    df = read_nih_metadata(Path(cfg.metadata))
    present = {p.name for p in Path(cfg.images).iterdir()}  # any name: the cache reads PNG, JPEG and DICOM
    n_rows = len(df)
    df = df[df["image"].isin(present)].reset_index(drop=True)
    if df.empty:
        raise ValueError(f"no image of {cfg.metadata} is in {cfg.images}")
    if len(df) < n_rows:  # expected with the full NIH table and part of its images; a wrong folder shows here
        log.warning("%d of %d rows of %s name images not in %s: left out, %d images used", n_rows - len(df),
                    n_rows, cfg.metadata, cfg.images, len(df))
    if cfg.limit:
        df = df.iloc[: cfg.limit].reset_index(drop=True)
    try:  # a misspelt finding: say in which table, and what it could have been
        multi_hot(df["labels"])
    except ValueError as e:
        raise ValueError(f"{cfg.metadata}: {e}; the findings are No Finding, {', '.join(FINDINGS)}") from None
    n_read = len(df)
    if cfg.split_lists:
        # The official test list is a fixed benchmark: split first and thin only the training
        # side, so results compare with published official-split numbers.
        lists = [set(Path(p).read_text().split()) for p in cfg.split_lists]
        leaks = list_leaks(df, *lists)
        if leaks:
            raise ValueError("; ".join(leaks) + ": the test would score images training saw (leakage). Each image, "
                             "and every image of a patient, belongs in one list")
        df["split"] = split_from_lists(df, lists[0], lists[1], cfg.val_fraction, cfg.seed)
        not_in_lists = int((df["split"] == "unused").sum())
        if not_in_lists:  # NIH's lists cover its table; a site's that miss images should be seen to
            log.warning("%s in neither --split-lists file: left out", plural(not_in_lists, "image is", "images are"))
        fitting = df["split"].isin(["train", "val"])
        df = pd.concat([undersample(df[fitting].reset_index(drop=True), cfg.keep_no_finding, cfg.keep_only, rng),
                        df[~fitting]], ignore_index=True)
        split_kind = "lists " + ", ".join(Path(p).name for p in cfg.split_lists)
        undersampled = "train and validation only (the official test list is whole)"
    else:
        df = undersample(df, cfg.keep_no_finding, cfg.keep_only, rng)
        df["split"] = split_by_patient(df, cfg.test_fraction, cfg.val_fraction, cfg.seed)
        split_kind, undersampled = f"by patient, seed {cfg.seed}", "all images, before the split (the study's order)"
        not_in_lists = 0
    assert_patient_disjoint(df)
    problems = split_problems(df) + scarce_findings(df, cfg.metadata)
    if problems and not cfg.allow_degenerate_split:
        raise ValueError("this split cannot be evaluated: " + "; ".join(problems) + ". Use more images (--limit, "
                         "--metadata) or other test_fraction/val_fraction; allow_degenerate_split = true trains "
                         "anyway, for tests only")
    train = df[df["split"] == "train"].reset_index(drop=True)
    mirror_below, replicate_to = scaled_balance_counts(cfg, len(train))
    balanced = balance_train(train, multi_hot(train["labels"]), mirror_below, replicate_to,
                             cfg.balance_keep_no_finding, cfg.balance_keep_atelectasis, rng)
    others = df[df["split"].isin(["val", "test"])].assign(mirror=0)
    table = pd.concat([balanced, others], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / PREPARED, index=False)
    info = {
        "rows_read": n_read, "after_undersampling": len(df), "undersampled": undersampled, "split": split_kind,
        "images": {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")},
        "patients": {s: int(df.loc[df["split"] == s, "patient_id"].nunique()) for s in ("train", "val", "test")},
        "not_in_lists": not_in_lists, "train_examples_after_balancing": len(balanced), "mirror_below": mirror_below, "replicate_to": replicate_to,
    }
    (out / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
    return table
