"""The patient-data prior: a logistic regression on [age, view, sex] that joins the model's logits
through its ``tabular_skip`` path (before training as an initialisation, or after it as a prior)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from . import metrics
from .data import Context, predict

log = logging.getLogger("cxr_batch.train")

PRIOR_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0)


def fit_patient_logistic(tabular: np.ndarray, y: np.ndarray, pos_weight: np.ndarray | None = None,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per finding on patient vectors [N, 3] -> (coef [14, 3], bias [14]).
    ``pos_weight`` weights positives as the loss does; a class with one label value gets zeros."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((y.shape[1], tabular.shape[1]), dtype=np.float32)
    bias = np.zeros(y.shape[1], dtype=np.float32)
    for c in range(y.shape[1]):
        if len(np.unique(y[:, c])) == 2:
            weight = {0: 1.0, 1: float(pos_weight[c])} if pos_weight is not None else None
            lr = LogisticRegression(class_weight=weight, max_iter=1000, random_state=seed).fit(tabular, y[:, c])
            coef[c], bias[c] = lr.coef_[0], lr.intercept_[0]
    return coef, bias


def init_skip_from_logistic(model, coef: np.ndarray, bias: np.ndarray) -> None:
    """skip_init "logistic": the patient-data path starts as the fitted logistic regression and
    the deep head's last layer at zero, so step 0 predicts what patient data alone predict."""
    with torch.no_grad():
        model.tabular_skip.weight.copy_(torch.from_numpy(coef))
        model.tabular_skip.bias.copy_(torch.from_numpy(bias))
        model.head[-1].weight.zero_()
        model.head[-1].bias.zero_()


def add_patient_prior(model, coef: np.ndarray, offset: np.ndarray) -> None:
    """patient_prior "logistic": add a patient-data-only logistic regression's log-odds,
    ``coef . x + offset``, to the trained model's logits (through ``tabular_skip``). With
    patient data unknown the term is the same constant for every image, so image-only rankings
    are unchanged. ``offset`` is the regression's intercept, or ``-coef . mean x`` to centre
    the term on the average training patient, which keeps the model's calibration."""
    with torch.no_grad():
        model.tabular_skip.weight.add_(torch.from_numpy(coef).to(model.tabular_skip.weight))
        model.tabular_skip.bias.add_(torch.from_numpy(offset).to(model.tabular_skip.bias))


def choose_prior_weight(model, coef: np.ndarray, bias: np.ndarray, loader, ctx: Context) -> tuple[float, dict]:
    """The prior weight (from PRIOR_WEIGHTS) whose logits, model + weight x regression, give the
    best mean AUC on the validation loader. Returns (weight, {weight: validation AUC})."""
    p, y, _ = predict(model, loader, ctx)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    logits = np.log(p / (1 - p))
    prior = loader.dataset.tabular.numpy() @ coef.T + bias
    scores = {w: metrics.mean_auc(y, logits + w * prior) for w in PRIOR_WEIGHTS}
    best = max(scores, key=lambda w: np.nan_to_num(scores[w], nan=-1.0))
    return best, scores


def apply_patient_prior(model, train_tabular: np.ndarray, train_y: np.ndarray, val_loader, ctx: Context) -> dict:
    """The configured prior (``ctx.cfg.patient_prior*``) fitted on the training patients and
    added to ``model``; returns what was done, for the run's records."""
    cfg = ctx.cfg
    coef, bias = fit_patient_logistic(train_tabular, train_y, seed=cfg.seed)
    if cfg.patient_prior_weight == "validation":
        weight, scores = choose_prior_weight(model, coef, bias, val_loader, ctx)
    else:
        weight, scores = float(cfg.patient_prior_weight), {}
    centre = train_tabular.mean(axis=0)
    offset = -(coef @ centre) if cfg.patient_prior_center else bias
    add_patient_prior(model, weight * coef, (weight * offset).astype(np.float32))
    log.info("patient prior added with weight %g (%s)", weight, "centred" if cfg.patient_prior_center else "with intercept")
    return {"method": "logistic", "formula": "logit += weight * (coef . x + offset), x = [age, view, sex] encoded",
            "weight": weight, "weight_choice": cfg.patient_prior_weight, "centred": cfg.patient_prior_center,
            "centre": centre.tolist(), "coef": coef.tolist(), "intercept": bias.tolist(), "offset": offset.tolist(),
            "fitted_on": f"{len(train_tabular)} unique training images", "validation_mean_auc_by_weight": scores}
