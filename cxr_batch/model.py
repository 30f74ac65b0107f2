"""DenseNet-121 + Feature Pyramid Network image encoder fused with patient data.

Architecture (seed-spec, "Architecture"): DenseNet-121 features tapped after denseblock2 (C3,
512 channels, stride 8), denseblock3 (C4, 1024, stride 16) and denseblock4 (C5, 1024,
stride 32); ``torchvision.ops.FeaturePyramidNetwork`` to 256 channels (1x1 laterals, nearest
x2 top-down, 3x3 output convs); global average pool of P3/P4/P5 concatenated (768) ->
Linear(768, 256) + ReLU; patient vector [age, view, sex] -> Linear(3, 8) + ReLU; the two
concatenated (264) -> Dropout -> Linear(264, hidden) + ReLU -> Dropout -> Linear(hidden, 14).

``tabular_skip`` adds a direct linear path from the patient vector to the logits (a "wide"
part next to the deep one): patient data then shift the logits the way a logistic regression
on age/sex/view would, and the image branch only has to add what the image shows. The bundled
weights' model card gives the numbers behind using it.

``forward(image, tabular)`` returns logits [B, 14] and nothing else: sigmoid, thresholds and
triage live outside the model.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .config import bounded, validate
from .findings import FINDINGS

def _torchvision_parts():
    """torchvision's ``densenet121`` and ``FeaturePyramidNetwork``, importing only the modules
    that define them.

    ``import torchvision`` runs its package initialisers, which import every model, dataset,
    transform and detection op; ``torchvision.ops.roi_align`` alone imports ``torch._dynamo``.
    On a small CPU that costs as long as importing torch itself (``python -X importtime -c
    "import torchvision"``), every time the command starts, for nothing the model uses. So when
    torchvision is not imported yet, its three package initialisers are stood in for while the
    two modules load, then removed: a later ``import torchvision`` runs the real initialisers
    and finds these modules already loaded (the same classes). Any failure falls back to the
    plain import.
    """
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        stand_ins = ("torchvision", "torchvision.models", "torchvision.ops")
        if spec is not None and spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
            for name in stand_ins:
                package = types.ModuleType(name)
                package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
                package.__package__ = name
                sys.modules[name] = package
            try:
                from torchvision.models.densenet import densenet121
                from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

                return densenet121, FeaturePyramidNetwork
            except Exception:
                for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                    del sys.modules[name]
            finally:
                for name in stand_ins:
                    if isinstance(sys.modules.get(name), types.ModuleType) and not hasattr(sys.modules[name], "__file__"):
                        del sys.modules[name]
    from torchvision.models import densenet121
    from torchvision.ops import FeaturePyramidNetwork

    return densenet121, FeaturePyramidNetwork


TAPS = ("denseblock2", "denseblock3", "denseblock4")
TAP_CHANNELS = (512, 1024, 1024)


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = bounded(len(FINDINGS), min=1)
    fpn_channels: int = bounded(256, min=1)
    image_dim: int = bounded(256, min=1)
    tabular_inputs: int = bounded(3, min=1)
    tabular_dim: int = bounded(8, min=1)
    hidden_dim: int = bounded(128, min=1)
    dropout: float = bounded(0.3, min=0.0, max=0.95)
    tabular_skip: bool = False

    def __post_init__(self):
        validate(self, "model")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class CxrFusionNet(nn.Module):
    """Multi-label chest X-ray classifier; see the module docstring for the layout.

    Construction never downloads anything: the backbone starts from random weights. Use
    :func:`load_imagenet_backbone` (training, on request) for ImageNet initialisation.
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        densenet121, FeaturePyramidNetwork = _torchvision_parts()
        self.backbone = densenet121(weights=None).features
        self.fpn = FeaturePyramidNetwork(list(TAP_CHANNELS), config.fpn_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.image_proj = nn.Sequential(nn.Linear(3 * config.fpn_channels, config.image_dim), nn.ReLU(inplace=True))
        self.tabular_proj = nn.Sequential(nn.Linear(config.tabular_inputs, config.tabular_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(config.image_dim + config.tabular_dim, config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.num_classes),
        )
        self.tabular_skip = nn.Linear(config.tabular_inputs, config.num_classes) if config.tabular_skip else None

    def pyramid(self, image: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """image [B, 3, H, W] -> OrderedDict of P3, P4, P5, each [B, fpn_channels, h, w]."""
        taps = OrderedDict()
        x = image
        for name, layer in self.backbone.named_children():
            x = layer(x)
            if name in TAPS:
                taps[name] = x
            if name == TAPS[-1]:
                break  # norm5 after denseblock4 belongs to the classifier we replace
        levels = self.fpn(taps)
        return OrderedDict(zip(("p3", "p4", "p5"), levels.values()))

    def head_from_pyramid(self, levels, tabular: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([self.pool(p).flatten(1) for p in levels.values()], dim=1)
        fused = torch.cat([self.image_proj(pooled), self.tabular_proj(tabular.to(pooled.dtype))], dim=1)
        logits = self.head(fused)
        if self.tabular_skip is not None:
            logits = logits + self.tabular_skip(tabular.to(logits.dtype))
        return logits

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] normalised, tabular [B, 3] encoded -> logits [B, 14]."""
        return self.head_from_pyramid(self.pyramid(image), tabular)


def build_model(config: ModelConfig = ModelConfig()) -> CxrFusionNet:
    return CxrFusionNet(config)


# torchvision before 0.3 named a dense layer's parts 'norm.1', 'conv.2', ...; its released DenseNet
# checkpoints (the ImageNet file of DenseNet121_Weights.IMAGENET1K_V1 among them) still do, and
# torchvision renames them as it loads ('denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight')
LEGACY_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                              r"running_var|num_batches_tracked))$")


def current_densenet_key(key: str) -> str:
    """A DenseNet state dict key in today's torchvision names (pre-0.3 names renamed)."""
    m = LEGACY_DENSE_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


def imagenet_backbone_state(source: str = "torchvision") -> dict:
    """The DenseNet-121 features of ImageNet weights, as the backbone's state dict.

    ``source`` is "torchvision" (downloads DenseNet121_Weights.IMAGENET1K_V1 through
    torchvision's cache: needs network access) or a path to a local state dict of a
    torchvision DenseNet-121 (keys ``features.*``, as torchvision saves them, or in the pre-0.3
    names of the file torchvision downloads). Raises
    ValueError with a plain reason, e.g. when the download cannot reach the internet.
    """
    if source == "torchvision":
        from torchvision.models import DenseNet121_Weights, densenet121

        weights = DenseNet121_Weights.IMAGENET1K_V1
        try:
            return densenet121(weights=weights).features.state_dict()
        except OSError as e:  # URLError and socket errors: no internet, a proxy, a firewall
            raise ValueError(
                f"cannot download the ImageNet weights ({getattr(e, 'reason', None) or e}) from {weights.url}: "
                "download that file on a machine with internet and pass it as --imagenet FILE") from None
    full = torch.load(Path(source), map_location="cpu", weights_only=True)
    state = {current_densenet_key(k).removeprefix("features."): v for k, v in full.items() if k.startswith("features.")}
    if not state:
        raise ValueError(f"{source}: no 'features.*' keys; expected a torchvision DenseNet-121 state dict")
    return state


def load_imagenet_backbone(model: CxrFusionNet, source: "str | dict" = "torchvision") -> None:
    """Initialise the DenseNet-121 backbone from ImageNet weights: ``source`` as
    :func:`imagenet_backbone_state` takes it, or the state dict it returned."""
    state = source if isinstance(source, dict) else imagenet_backbone_state(source)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    # norm5 is kept in the backbone module but unused; the dense blocks must all load.
    if [k for k in missing if not k.startswith("norm5")] or unexpected:
        raise ValueError(f"ImageNet weights do not fit the backbone: missing {missing}, unexpected {unexpected}")
