"""Pretrained DenseNet-121 backbones for ``cxr-batch train --init-backbone FILE``: the road to a
full-strength model for a site with more data (a pretrained backbone, then the FPN and the
fusion head trained on its labelled studies).

Three formats, read from a file the user downloaded (nothing is downloaded here):

- ``torchvision``: a ``torchvision.models.densenet121`` state dict (``features.*`` keys, e.g.
  ImageNet's ``DenseNet121_Weights.IMAGENET1K_V1``, whose file keeps the pre-0.3 key names
  such as ``norm.1``), input normalised with ImageNet's mean and
  standard deviation on 3 channels;
- ``xrv``: a TorchXRayVision DenseNet-121 state dict (``xrv.models.DenseNet(weights=...)
  .state_dict()``, saved with ``torch.save``): one input channel scaled to [-1024, 1024]
  (``xrv.datasets.normalize``: ``2048 * g - 1024`` for a grey level g in [0, 1]);
- ``chexnet``: a CheXNet training checkpoint (``{"state_dict": ...}`` of a ``DataParallel``
  model whose ``densenet121`` is torchvision's, in torchvision's pre-0.3 key names such as
  ``norm.1``), ImageNet normalisation.

The input contract is carried over exactly, so that the backbone computes on our input what it
computed on its own: the bundle's preprocessing gets the normalisation (``mean``/``std`` per
channel; for TorchXRayVision mean 0.5 and std 1/2048 on each channel, so each channel is
``2048 g - 1024``), and a one-channel first convolution becomes three channels of a third of its
weights each: on three equal channels it sums to the original (zero padding is the same value,
-1024's neighbour 0, in both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cxr_batch.model import LEGACY_DENSE_KEY, current_densenet_key

FORMATS = ("auto", "torchvision", "xrv", "chexnet")
NAMES = {"torchvision": "torchvision", "xrv": "TorchXRayVision", "chexnet": "CheXNet"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
XRV_MEAN, XRV_STD = (0.5, 0.5, 0.5), (1 / 2048, 1 / 2048, 1 / 2048)
# torchvision's own conversion of pre-0.3 DenseNet keys ('denselayer1.norm.1.weight' -> 'norm1')
LEGACY = LEGACY_DENSE_KEY
PREFIXES = ("module.", "densenet121.", "model.")


@dataclass(frozen=True)
class BackboneInit:
    state: dict  # for CxrFusionNet.backbone: torchvision DenseNet-121 feature names, 3-channel conv0
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    format: str
    source: str

    def record(self) -> dict:
        """What the bundle's ``training.initialised_from`` says of it: the file by its content
        too (a path names whatever is there later), and the format it was read as."""
        from cxr_batch.bundle import sha256_file

        return {"file": self.source, "sha256": sha256_file(Path(self.source)), "format": self.format,
                "mean": list(self.mean), "std": list(self.std)}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def read_backbone(path: Path | str, fmt: str = "auto") -> BackboneInit:
    """The backbone weights of ``path`` and the input normalisation they were trained with.
    Raises ValueError naming what is wrong (not a state dict, not a DenseNet-121, a format
    that does not match)."""
    if fmt not in FORMATS:
        raise ValueError(f"--init-format {fmt!r}: one of {', '.join(FORMATS)}")
    path = Path(path)
    blob = load_as_data(path)
    checkpoint = isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict)
    state = blob["state_dict"] if checkpoint else blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a checkpoint with 'state_dict')")
    # CheXNet saved a training checkpoint of a DataParallel wrapper ('module.densenet121.'); the
    # pre-0.3 key names alone do not make one: torchvision's own ImageNet file keeps them too
    wrapped = any(k.startswith(("module.", "densenet121.")) for k in state)
    features = {}
    for key, value in state.items():
        key = current_densenet_key(_strip(key))
        if key.startswith("features."):
            features[key.removeprefix("features.")] = value
    conv0 = features.get("conv0.weight")
    if conv0 is None:
        raise ValueError(f"{path}: no DenseNet-121 features (no 'features.conv0.weight' among {len(state)} keys)")
    channels = conv0.shape[1]
    detected, layout = file_format(channels, checkpoint, wrapped)
    if fmt != "auto" and fmt != detected:
        # the bundle's training.initialised_from records the format: it must be what the file is
        if (fmt == "xrv") != (detected == "xrv"):
            said = f"the first convolution takes {channels} channel(s), which is {NAMES[detected]}'s"
            layout = said if detected == "xrv" else f"{said}; {layout}"
        raise ValueError(f"{path}: --init-format {fmt} but {layout}: pass --init-format {detected} (or auto), "
                         "or the file you meant to give")
    fmt = detected
    if channels == 1:
        features["conv0.weight"] = conv0.repeat(1, 3, 1, 1) / 3  # three equal channels sum to the one
        mean, std = XRV_MEAN, XRV_STD
    elif channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ValueError(f"{path}: the first convolution takes {channels} channels; a DenseNet-121 takes 1 or 3")
    # another DenseNet (169, 201) shares the key names with other shapes: refused here, before
    # the data stages, not as hundreds of 'size mismatch' lines when it is loaded
    shapes = densenet121_shapes()
    other = [k for k, v in features.items() if k in shapes and v.shape != shapes[k]]
    if other:
        raise ValueError(f"{path}: not a DenseNet-121 backbone: {len(other)} weights have other shapes ({other[0]} is "
                         f"{tuple(features[other[0]].shape)} where DenseNet-121's is {tuple(shapes[other[0]])})")
    # a file with weights missing (a partial export) or unknown ones was refused only by
    # load_backbone, after the data stages: refused here too (norm5, unused by the pyramid, may be absent)
    missing = sorted(k for k in shapes if k not in features and not k.startswith("norm5"))
    if missing:
        raise ValueError(f"{path}: not a DenseNet-121 backbone: {len(missing)} weights missing "
                         f"(features.{missing[0]}, ...)")
    extra = sorted(k for k in features if k not in shapes)
    if extra:
        raise ValueError(f"{path}: not a DenseNet-121 backbone: {len(extra)} weight(s) DenseNet-121 has not "
                         f"(features.{extra[0]}, ...)")
    return BackboneInit(features, mean, std, fmt, str(path))


def file_format(channels: int, checkpoint: bool, wrapped: bool) -> tuple[str, str]:
    """The format a file's key layout says it is, and those words for an operator: one input
    channel is TorchXRayVision's; a training checkpoint ('state_dict' inside) or CheXNet's
    DataParallel names ('module.densenet121.') is CheXNet's; ``features.*`` alone is torchvision's
    (its ImageNet file keeps the pre-0.3 names CheXNet has, so those tell nothing)."""
    if channels == 1:
        return "xrv", "a TorchXRayVision DenseNet-121 (one input channel)"
    if checkpoint:
        return "chexnet", "it is a training checkpoint (a 'state_dict' inside), as CheXNet's is"
    if wrapped:
        return "chexnet", "its keys are CheXNet's ('module.densenet121.' or 'densenet121.' before 'features.')"
    return "torchvision", ("it is a plain torchvision DenseNet-121 state dict ('features.*' keys, no CheXNet "
                           "checkpoint or 'module.densenet121.' names)")


def read_imagenet(path: Path | str) -> BackboneInit:
    """``--imagenet FILE``: a torchvision (or CheXNet) DenseNet-121 file, with the checks
    :func:`read_backbone` makes, before any work. A TorchXRayVision file is refused: it needs its
    own input normalisation, which only ``--init-backbone`` carries into the bundle."""
    init = read_backbone(path)
    if init.format == "xrv":
        raise ValueError(f"{path}: a TorchXRayVision backbone (one input channel), not ImageNet weights: pass it as "
                         "--init-backbone, which also takes its input normalisation")
    return init


def load_as_data(path: Path):
    """``torch.load`` of tensors and plain containers only: a file cannot run code. Raises
    ValueError saying what the file is in words an operator can act on (torch's own messages
    end mid-sentence when cut to a line, or advise loading with ``weights_only=False``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Unsupported global" in text:  # a pickled object: torch.save(model), not its state_dict()
            named = re.search(r"GLOBAL (\S+)", text)
            raise ValueError(f"{path}: holds Python objects{f' ({named.group(1)})' if named else ''}, not only tensors "
                             "(a whole model saved with torch.save(model)?): refused, since loading it can run code; "
                             "save the model's state_dict() instead") from None
        if isinstance(e, EOFError) or "central directory" in text or "truncated" in text:
            raise ValueError(f"{path}: cut off (the file ends before its data does, as an interrupted download "
                             "does): download it again") from None
        # torch's first line, unless it is the advice to load with weights_only=False
        why = "" if "weights_only" in text or not text else f" ({type(e).__name__}: {text.splitlines()[0][:200]})"
        raise ValueError(f"{path}: not a PyTorch state dict or checkpoint that loads as data{why}") from None


def densenet121_shapes() -> dict[str, torch.Size]:
    """The shape of every weight of torchvision's DenseNet-121 ``features``, without allocating them."""
    from torchvision.models import densenet121

    with torch.device("meta"):
        return {k: v.shape for k, v in densenet121(weights=None).features.state_dict().items()}


def load_backbone(model, init: BackboneInit) -> None:
    """Copy ``init`` into ``model.backbone``; every dense block must load (norm5, unused by the
    pyramid, may be absent). Raises ValueError on a mismatch."""
    result = model.backbone.load_state_dict(init.state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("norm5")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{init.source}: not a DenseNet-121 backbone: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
