"""The patient-data prior of model v2 (not the in-training prior of :mod:`training.prior`): per
finding, a logistic regression on the encoded [age, view, sex] fitted on the full NIH metadata
table, *without* any patient whose images are in the shared development set, and centred.

Patient values are parsed exactly as inference parses a metadata CSV
(``cxr_batch.metadata.load_metadata_csv`` strips each value and treats an empty one as missing,
then ``patient_from_values(..., "metadata")``), and encoded with ``PatientEncoding``; an
implausible age (NIH has a few over 120) becomes the unknown code as it would at inference.

Centring: the prior's log-odds are ``coef . (x - mean_x)``, with ``mean_x`` the mean encoded
vector of the fitting rows. Its intercept (the full table's prevalence) is *not* used: the
shared images are enriched for findings, so the level of every finding is fitted later, with
the image evidence, on out-of-fold predictions (``training.cvstats.fit_combination``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_batch.findings import FINDINGS
from cxr_batch.patient import PatientEncoding, patient_from_values

from .prepare import multi_hot

NIH_NEEDED = {"Image Index": "image", "Finding Labels": "labels", "Follow-up #": "follow_up",
              "Patient ID": "patient_id", "Patient Age": "age", "Patient Gender": "sex", "View Position": "view"}


@dataclass(frozen=True)
class PriorConfig:
    rows: str = "all"  # "all" rows of the table, or "first_image": each patient's lowest follow-up number
    C: float = 1.0  # inverse L2 strength of the logistic regression (n is ~10^5: barely matters)
    hide_rate: float = 0.0  # > 0: also fit on a copy with each value hidden (unknown code) with this chance
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def read_table(path: Path) -> pd.DataFrame:
    """An NIH Data_Entry table (.csv or .csv.gz) -> columns image, labels, follow_up, patient_id,
    age, sex, view, all as stripped strings."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in NIH_NEEDED if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    out = table[list(NIH_NEEDED)].rename(columns=NIH_NEEDED)
    return out.apply(lambda s: s.str.strip()).reset_index(drop=True)


def encode_rows(table: pd.DataFrame, encoding: PatientEncoding = PatientEncoding()) -> np.ndarray:
    """[N, 3] encoded patient vectors, parsed as inference parses a metadata CSV row."""
    out = np.empty((len(table), 3), dtype=np.float32)
    for i, (age, sex, view) in enumerate(zip(table["age"], table["sex"], table["view"])):
        p = patient_from_values(age or None, sex or None, view or None, "metadata")
        out[i] = encoding.encode(p.age, p.view, p.sex)
    return out


def fitting_rows(full: pd.DataFrame, exclude_patients: set[str], rows: str) -> pd.DataFrame:
    """The rows the prior is fitted on: every patient of ``exclude_patients`` removed (all of
    their images, not only the shared ones), then all rows or each patient's first image."""
    keep = full[~full["patient_id"].isin(exclude_patients)]
    if rows == "first_image":
        fu = pd.to_numeric(keep["follow_up"], errors="coerce").fillna(np.inf)
        keep = keep.assign(_fu=fu).sort_values(["patient_id", "_fu"]).drop_duplicates("patient_id").drop(columns="_fu")
    elif rows != "all":
        raise ValueError(f"unknown prior rows {rows!r}: 'all' or 'first_image'")
    return keep.reset_index(drop=True)


def hide_values(x: np.ndarray, rate: float, unknown: float, rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random(x.shape) < rate, np.float32(unknown), x)


def fit_prior(full: pd.DataFrame, exclude_patients: set[str], cfg: PriorConfig = PriorConfig(),
              encoding: PatientEncoding = PatientEncoding()) -> dict:
    """Fit the prior. Returns a JSON-ready dict: ``coef`` [14][3], ``intercept`` [14] (the
    uncentred regression's, kept for reference), ``mean_x`` [3] and what it was fitted on."""
    from sklearn.linear_model import LogisticRegression

    rows = fitting_rows(full, exclude_patients, cfg.rows)
    overlap = set(rows["patient_id"]) & set(exclude_patients)
    assert not overlap, f"prior rows include excluded patients {sorted(overlap)[:5]}"
    x = encode_rows(rows, encoding)
    y = multi_hot(rows["labels"])
    if cfg.hide_rate > 0:
        rng = np.random.default_rng(cfg.seed)
        x = np.concatenate([x, hide_values(x, cfg.hide_rate, encoding.unknown_value, rng)])
        y = np.concatenate([y, y])
    coef = np.zeros((len(FINDINGS), 3))
    intercept = np.zeros(len(FINDINGS))
    for k in range(len(FINDINGS)):
        if y[:, k].min() == y[:, k].max():  # a finding absent (or everywhere) in the table: no slope
            rate = np.clip(y[:, k].mean(), 1e-4, 1 - 1e-4)
            intercept[k] = np.log(rate / (1 - rate))
            continue
        lr = LogisticRegression(C=cfg.C, max_iter=2000).fit(x, y[:, k])
        coef[k], intercept[k] = lr.coef_[0], lr.intercept_[0]
    return {
        "config": cfg.to_dict(), "findings": list(FINDINGS), "inputs": ["age", "view", "sex"],
        "coef": coef.tolist(), "intercept": intercept.tolist(), "mean_x": x.mean(axis=0).astype(float).tolist(),
        "prevalence": y.mean(axis=0).astype(float).tolist(),
        "rows": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
        "excluded_patients": int(len(exclude_patients)),
        "excluded_rows": int((full["patient_id"].isin(exclude_patients)).sum()),
        "formula": "prior log-odds = coef . (x - mean_x), x = encoded [age, view, sex]",
    }


def prior_logits(prior: dict, x: np.ndarray) -> np.ndarray:
    """Centred prior log-odds [N, 14] for encoded patient vectors [N, 3]."""
    coef, mean_x = np.asarray(prior["coef"]), np.asarray(prior["mean_x"])
    return (x - mean_x) @ coef.T


def prior_probabilities_uncentred(prior: dict, x: np.ndarray) -> np.ndarray:
    """The regression's own probabilities (with its intercept): the metadata-only baseline."""
    z = x @ np.asarray(prior["coef"]).T + np.asarray(prior["intercept"])
    return 1.0 / (1.0 + np.exp(-z))
