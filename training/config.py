"""The training configuration: one typed dataclass, defaults from the study (seed-spec), loadable
from TOML and recorded with every run and inside the exported bundle."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TrainConfig:
    # data
    images: str = ""
    metadata: str = ""
    out: str = "runs/latest"
    split_lists: tuple[str, str] | None = None  # official train_val_list.txt, test_list.txt
    limit: int | None = None  # use only the first N rows of the metadata (after filtering to present images)
    seed: int = 42
    test_fraction: float = 0.20  # study: 72% train / 8% validation / 20% test
    val_fraction: float = 0.08
    # undersampling of the whole set (study defaults)
    keep_no_finding: float = 0.10
    keep_only: dict = field(default_factory=lambda: {"Infiltration": 0.15, "Effusion": 0.50, "Atelectasis": 0.50})
    # train-only balancing (study defaults); counts scale with the training split's size
    # relative to balance_reference (the study's training split), 0 = use the counts as given
    mirror_below: int = 3000
    replicate_to: int = 1500
    balance_keep_no_finding: float = 0.25
    balance_keep_atelectasis: float = 0.50
    balance_reference: int = 36000
    # model
    image_size: int = 224
    dropout: float = 0.3
    hidden_dim: int = 128
    tabular_skip: bool = False
    skip_init: str = "random"  # "logistic": start the patient-data path at a logistic regression fit
    patient_prior: str = "none"  # "logistic": after training, add a patient-data logistic regression to the logits
    patient_prior_weight: float | str = 1.0  # its weight, or "validation": the best of PRIOR_WEIGHTS on validation
    patient_prior_center: bool = True  # add coef . (x - mean x) (keeps calibration); false adds the full intercept
    init_weights: str | None = None  # start from a bundle folder or state dict (epochs = 0: evaluate/export only)
    imagenet: str | None = None  # "torchvision" (download) or a local DenseNet-121 state dict
    # optimisation
    epochs: int = 15  # study: 3 cycles x 5 epochs
    batch_size: int = 160
    lr: float = 1e-3
    weight_decay: float = 0.0
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    pos_weight_overrides: dict = field(default_factory=dict)  # e.g. {"Pneumonia": 4.5}
    pos_weight_max: float = 10.0
    unknown_rate: float = 0.0  # chance that each patient value is replaced by "unknown" in training
    ema_decay: float = 0.0  # 0: off; else weights averaged over steps, evaluated and exported
    select_metric: str = "macro_f1"  # or "mean_auc", or "last" (the final, averaged weights)
    time_limit_minutes: float = 0.0  # 0: none; else stop after the epoch that passes it, then evaluate
    # thresholds and evaluation
    threshold_method: str = "dynamic"  # "youden", "precision_f1" or "dynamic"
    precision_min: float = 0.30
    dynamic_precision_min: float = 0.40
    dynamic_f1_floor: float = 0.30
    dynamic_step: float = 0.05
    bootstrap: int = 1000
    # runtime
    device: str = "auto"
    workers: int = 2
    model_name: str = "cxr-fpn"
    version: str = "dev"
    half_bundle: bool = True

    @classmethod
    def from_toml(cls, path: Path, **overrides) -> "TrainConfig":
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown training option(s): {sorted(unknown)}")
        if data.get("split_lists") is not None:
            data = {**data, "split_lists": tuple(data["split_lists"])}
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)
