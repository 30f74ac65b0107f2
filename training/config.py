"""The training configuration: one typed dataclass, defaults from the study (seed-spec), loaded
from TOML with :func:`cxr_batch.config.load_dataclass`, validated when it is built (so a typo
fails before any work starts), and recorded with every run and inside the exported bundle.

The model's shape (``[model]``) and the input preprocessing (``[preprocessing]``) are the
runtime's own dataclasses, nested here, so a bundle records exactly what inference rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cxr_batch.config import ConfigError, bounded, load_dataclass, read_toml, to_plain, validate
from cxr_batch.findings import FINDINGS
from cxr_batch.metrics import MIN_RESAMPLES
from cxr_batch.model import ModelConfig
from cxr_batch.preprocess import Preprocessing


MIN_TRAIN_IMAGE_SIZE = 32  # the smallest input DenseNet-121's five halvings leave a pixel of


@dataclass
class TrainConfig:
    # data
    images: str = ""
    metadata: str = ""
    out: str = "runs/latest"
    split_lists: tuple[str, str] | None = None  # official train_val_list.txt, test_list.txt
    limit: int | None = bounded(None, min=1)  # use only the first N rows of the metadata (after filtering to present images)
    seed: int = 42
    test_fraction: float = bounded(0.20, min=0.0, max=0.9)  # study: 72% train / 8% validation / 20% test
    val_fraction: float = bounded(0.08, min=0.0, max=0.9)
    # true: train even when the validation or test part cannot be evaluated (too few images, a
    # finding without positives or negatives; see training/prepare.py:split_problems). Tests only.
    allow_degenerate_split: bool = False
    # undersampling of the whole set (study defaults)
    keep_no_finding: float = bounded(0.10, min=0.0, max=1.0)
    keep_only: dict = field(default_factory=lambda: {"Infiltration": 0.15, "Effusion": 0.50, "Atelectasis": 0.50})
    # train-only balancing (study defaults); counts scale with the training split's size
    # relative to balance_reference (the study's training split), 0 = use the counts as given
    mirror_below: int = bounded(3000, min=0)
    replicate_to: int = bounded(1500, min=0)
    balance_keep_no_finding: float = bounded(0.25, min=0.0, max=1.0)
    balance_keep_atelectasis: float = bounded(0.50, min=0.0, max=1.0)
    balance_reference: int = bounded(36000, min=0)
    # model and its input
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    skip_init: Literal["random", "logistic"] = "random"  # "logistic": start the patient-data path at a logistic regression fit
    patient_prior: Literal["none", "logistic"] = "none"  # "logistic": after training, add a patient-data logistic regression to the logits
    patient_prior_weight: float | Literal["validation"] = 1.0  # its weight, or the best of PRIOR_WEIGHTS on validation
    patient_prior_center: bool = True  # add coef . (x - mean x) (keeps calibration); false adds the full intercept
    init_weights: str | None = None  # start from a bundle folder or state dict (epochs = 0: evaluate/export only)
    imagenet: str | None = None  # "torchvision" (download) or a local DenseNet-121 state dict
    init_backbone: str | None = None  # a pretrained DenseNet-121 file (training/backbones.py): torchvision, xrv, chexnet
    init_format: Literal["auto", "torchvision", "xrv", "chexnet"] = "auto"
    # optimisation
    epochs: int = bounded(15, min=0)  # study: 3 cycles x 5 epochs
    batch_size: int = bounded(160, min=1)
    lr: float = bounded(1e-3, gt=0.0)
    weight_decay: float = bounded(0.0, min=0.0)
    plateau_patience: int = bounded(2, min=0)
    plateau_factor: float = bounded(0.5, gt=0.0, max=1.0)
    pos_weight_overrides: dict = field(default_factory=dict)  # e.g. {"Pneumonia": 4.5}
    pos_weight_max: float = bounded(10.0, min=1.0)
    unknown_rate: float = bounded(0.0, min=0.0, max=1.0)  # chance that each patient value is hidden in training
    ema_decay: float = bounded(0.0, min=0.0, max=0.9999)  # 0: off; else weights averaged over steps
    select_metric: Literal["macro_f1", "mean_auc", "last"] = "macro_f1"  # "last": the final, averaged weights
    time_limit_minutes: float = bounded(0.0, min=0.0)  # 0: none; else stop after the epoch that passes it
    # thresholds and evaluation
    threshold_method: Literal["youden", "precision_f1", "dynamic"] = "dynamic"
    precision_min: float = bounded(0.30, min=0.0, max=1.0)
    dynamic_precision_min: float = bounded(0.40, min=0.0, max=1.0)
    dynamic_f1_floor: float = bounded(0.30, min=0.0, max=1.0)
    dynamic_step: float = bounded(0.05, min=0.0, max=0.5)
    bootstrap: int = bounded(1000, min=0)  # 0 (no intervals) or at least MIN_RESAMPLES, as evaluate takes
    # runtime
    device: str = "auto"
    workers: int = bounded(2, min=0, max=64)
    model_name: str = "cxr-fpn"
    version: str = "dev"
    # printed on every report of the exported bundle (manifest "intended_use")
    intended_use: str = ("Research use only, not for clinical use: weights trained with cxr-batch train and not "
                         "validated for clinical use.")
    half_bundle: bool = True

    def __post_init__(self):
        validate(self, "train")
        for key, table, low, high in (("keep_only", self.keep_only, 0.0, 1.0),
                                      ("pos_weight_overrides", self.pos_weight_overrides, 1e-6, 1e6)):
            for name, value in table.items():
                if name not in FINDINGS:
                    raise ConfigError(f"train.{key}: {name!r} is not a finding; known: {', '.join(FINDINGS)}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                    raise ConfigError(f"train.{key}.{name} = {value!r}: expected a number in [{low:g}, {high:g}]")
        if self.preprocessing.image_size < MIN_TRAIN_IMAGE_SIZE:  # --image-size has the same bound
            raise ConfigError(f"train.preprocessing.image_size = {self.preprocessing.image_size}: at least "
                              f"{MIN_TRAIN_IMAGE_SIZE} (DenseNet-121 halves it five times)")
        if 0 < self.bootstrap < MIN_RESAMPLES:  # the run would print a "95% CI" that evaluate refuses to make
            raise ConfigError(f"train.bootstrap = {self.bootstrap}: too few resamples for a 95% interval; give at least "
                              f"{MIN_RESAMPLES} (as cxr-batch evaluate --bootstrap does), or 0 for no intervals")
        needs_skip = [k for k in ("skip_init", "patient_prior") if getattr(self, k) == "logistic"]
        if needs_skip and not self.model.tabular_skip:
            raise ConfigError(f"train.{needs_skip[0]} = 'logistic' needs model.tabular_skip = true")

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides) -> "TrainConfig":
        """From a TOML file (or defaults without one), ``overrides`` (None = not given) on top.
        ``image_size`` among the overrides sets ``preprocessing.image_size``."""
        table = read_toml(path) if path is not None else {}
        image_size = overrides.pop("image_size", None)
        if image_size is not None:
            table = {**table, "preprocessing": {**table.get("preprocessing", {}), "image_size": image_size}}
        return load_dataclass(cls, table, "train", **overrides)

    def to_dict(self) -> dict:
        return to_plain(self)
