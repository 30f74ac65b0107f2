"""`--init-backbone`: each pretrained format, with randomly initialised weights of its own
architecture (nothing can be downloaded here), computes on our input exactly what it computes
on its own: the dense blocks' features agree within float tolerance."""

import subprocess
import sys

import pytest
import torch
from torchvision.models import densenet121

from cxr_batch.model import TAPS, CxrFusionNet, ModelConfig
from cxr_batch.preprocess import Preprocessing, normalise
from training.backbones import IMAGENET_MEAN, IMAGENET_STD, LEGACY, XRV_MEAN, XRV_STD, load_backbone, read_backbone


def taps(features: torch.nn.Sequential, x: torch.Tensor) -> dict:
    """The outputs of denseblock2-4 of a torchvision-style ``features`` Sequential."""
    out = {}
    for name, layer in features.named_children():
        x = layer(x)
        if name in TAPS:
            out[name] = x
        if name == TAPS[-1]:
            return out
    raise AssertionError("no denseblock4")


def ours(init, grey: torch.Tensor) -> dict:
    """Our model's taps for grey images [B, 1, S, S] in [0, 1], normalised as the bundle will."""
    model = CxrFusionNet(ModelConfig()).eval()
    load_backbone(model, init)
    prep = Preprocessing(image_size=grey.shape[-1], mean=init.mean, std=init.std)
    return taps(model.backbone, normalise(grey.expand(-1, 3, -1, -1), prep))


def grey_images(n: int = 2, size: int = 96) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(n, 1, size, size)


def assert_same(theirs: dict, mine: dict) -> None:
    for name in TAPS:
        scale = theirs[name].abs().max()
        assert torch.allclose(mine[name], theirs[name], atol=1e-5 * float(scale), rtol=1e-4), name


@torch.no_grad()
def test_a_torchvision_densenet121_state_dict(tmp_path):
    torch.manual_seed(1)
    net = densenet121(weights=None).eval()
    torch.save(net.state_dict(), tmp_path / "tv.pt")
    init = read_backbone(tmp_path / "tv.pt")
    assert init.format == "torchvision" and (init.mean, init.std) == (IMAGENET_MEAN, IMAGENET_STD)
    g = grey_images()
    x = (g.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert_same(taps(net.features, x), ours(init, g))


@torch.no_grad()
def test_a_torchxrayvision_densenet121_on_its_one_channel_minus_1024_to_1024_input(tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(2)
    net = xrv.models.DenseNet(weights=None).eval()
    torch.save(net.state_dict(), tmp_path / "xrv.pt")
    init = read_backbone(tmp_path / "xrv.pt")
    assert init.format == "xrv" and (init.mean, init.std) == (XRV_MEAN, XRV_STD)
    g = grey_images()
    import numpy as np

    # TorchXRayVision's own input: xrv.datasets.normalize of 8-bit grey levels, one channel
    x = torch.from_numpy(xrv.datasets.normalize((g.numpy() * 255).astype(np.float32), 255)).float()
    assert float(x.min()) >= -1024 and float(x.max()) <= 1024
    assert_same(taps(net.features, x), ours(init, g))


@torch.no_grad()
def test_a_chexnet_checkpoint_with_legacy_key_names(tmp_path):
    torch.manual_seed(3)
    net = densenet121(weights=None).eval()
    state = {}
    for key, value in net.state_dict().items():  # as CheXNet saved them: DataParallel, torchvision < 0.3 names
        legacy = key
        for part in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            legacy = legacy.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        state[f"module.densenet121.{legacy}"] = value
    assert any(LEGACY.match(k.removeprefix("module.densenet121.")) for k in state)
    state["module.densenet121.classifier.0.weight"] = torch.zeros(14, 1024)
    torch.save({"epoch": 7, "arch": "densenet121", "state_dict": state, "best_loss": 0.15}, tmp_path / "chexnet.pth.tar")
    init = read_backbone(tmp_path / "chexnet.pth.tar")
    assert init.format == "chexnet" and init.mean == IMAGENET_MEAN
    g = grey_images()
    x = (g.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert_same(taps(net.features, x), ours(init, g))


@torch.no_grad()
def test_the_imagenet_file_torchvision_downloads_is_named_torchvision(tmp_path):
    """DenseNet121_Weights.IMAGENET1K_V1's file keeps the pre-0.3 key names but is no CheXNet
    checkpoint: the bundle's record must name what the backbone is."""
    torch.manual_seed(5)
    net = densenet121(weights=None).eval()
    state = {}
    for key, value in net.state_dict().items():
        for part in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        state[key] = value
    assert any(LEGACY.match(k) for k in state)
    torch.save(state, tmp_path / "densenet121-a639ec97.pth")
    init = read_backbone(tmp_path / "densenet121-a639ec97.pth")
    assert init.format == "torchvision" and init.mean == IMAGENET_MEAN
    g = grey_images()
    x = (g.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert_same(taps(net.features, x), ours(init, g))


def test_files_that_are_not_a_densenet121_backbone_are_refused_clearly(tmp_path):
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="no DenseNet-121 features"):
        read_backbone(tmp_path / "resnet.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a PyTorch state dict"):
        read_backbone(tmp_path / "junk.pt")
    torch.save(densenet121(weights=None).state_dict(), tmp_path / "tv.pt")
    with pytest.raises(ValueError, match="--init-format xrv but the first convolution takes 3"):
        read_backbone(tmp_path / "tv.pt", "xrv")
    half = {k: v for k, v in densenet121(weights=None).state_dict().items() if "denseblock4" not in k}
    torch.save(half, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="not a DenseNet-121 backbone"):
        load_backbone(CxrFusionNet(ModelConfig()), read_backbone(tmp_path / "half.pt"))


@pytest.mark.slow
def test_train_with_a_pretrained_backbone_puts_its_normalisation_in_the_bundle(nih, tmp_path):
    """`cxr-batch train --init-backbone` end to end (0 epochs: evaluate and export): the bundle's
    preprocessing is TorchXRayVision's contract and its backbone is the file's."""
    xrv = pytest.importorskip("torchxrayvision")
    import json

    from cxr_batch.bundle import load_bundle

    from .conftest import REPO

    torch.manual_seed(4)
    net = xrv.models.DenseNet(weights=None)
    torch.save(net.state_dict(), tmp_path / "xrv.pt")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "train", "--images", str(nih / "images"), "--metadata",
                           str(nih / "labels.csv"), "--out", str(run), "--config",
                           str(REPO / "training" / "configs" / "quick.toml"), "--device", "cpu", "--epochs", "0",
                           "--init-backbone", str(tmp_path / "xrv.pt")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["preprocessing"]["mean"] == [0.5] * 3
    assert manifest["preprocessing"]["std"] == pytest.approx([1 / 2048] * 3)
    # what it was initialised from, by content and the format it was read as (the config
    # alone kept the path given and init_format "auto")
    from cxr_batch.bundle import sha256_file

    started = manifest["training"]["initialised_from"]
    assert started["backbone"]["format"] == "xrv" and started["backbone"]["sha256"] == sha256_file(tmp_path / "xrv.pt")
    bundle = load_bundle(run / "bundle")
    conv0 = bundle.model.backbone.conv0.weight
    assert torch.allclose(conv0, net.features.conv0.weight.repeat(1, 3, 1, 1) / 3, atol=1e-3)  # float16 bundle


def test_another_densenet_is_refused_when_read_before_any_work(tmp_path):
    """A DenseNet-169 has DenseNet-121's key names with other shapes: it was read as a
    torchvision backbone, then the data stages ran and loading it ended in a traceback of
    hundreds of 'size mismatch' lines. Refused when the file is read, naming one weight."""
    from torchvision.models import densenet169

    torch.save(densenet169(weights=None).state_dict(), tmp_path / "densenet169.pth")
    with pytest.raises(ValueError, match=r"not a DenseNet-121 backbone: \d+ weights have other shapes "
                                         r"\(transition3.norm.weight is \(1280,\) where DenseNet-121.s is \(1024,\)"):
        read_backbone(tmp_path / "densenet169.pth")


def test_a_cut_off_download_or_a_pickled_model_is_refused_in_words_the_operator_can_act_on(tmp_path):
    """torch's own messages were cut to 200 characters: a truncated file ended mid-sentence
    ('... your checkpoint file is'), and a whole model saved with torch.save(model) told the
    operator to load it with weights_only=False, i.e. to let the file run code."""
    net = densenet121(weights=None)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    data = (tmp_path / "tv.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut off") as cut:
        read_backbone(tmp_path / "cut.pth")
    assert "download it again" in str(cut.value)
    torch.save(net, tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"state_dict\(\)") as whole:
        read_backbone(tmp_path / "model.pth")
    assert "weights_only" not in str(whole.value) and "can run code" in str(whole.value)


def stand_in(kind: str) -> dict:
    """A stand-in for each format's file, in its own key layout (DenseNet-121's random
    weights at their real shapes; nothing is downloaded): what a format is told by."""
    import re

    conv0 = torch.randn(64, 1 if kind == "xrv" else 3, 7, 7)
    # every DenseNet-121 weight (a file missing some is refused), by its pre-0.3 name, as all three keep
    features = {"features." + re.sub(r"(denselayer\d+)\.(norm|conv)(\d)", r"\1.\2.\3", k): v
                for k, v in densenet121(weights=None).features.state_dict().items()}
    features["features.conv0.weight"] = conv0
    if kind == "torchvision":  # torchvision's ImageNet densenet121: features.*, a 1000-class classifier
        return {**features, "classifier.weight": torch.zeros(1000, 1024), "classifier.bias": torch.zeros(1000)}
    if kind == "xrv":
        return {**features, "classifier.weight": torch.zeros(18, 1024), "op_threshs": torch.zeros(18)}
    # CheXNet: a training checkpoint of a DataParallel model around torchvision's densenet121, 14 outputs
    state = {f"module.densenet121.{k}": v for k, v in features.items()}
    state["module.densenet121.classifier.0.weight"] = torch.zeros(14, 1024)
    return {"epoch": 7, "arch": "densenet121", "state_dict": state}


@pytest.mark.parametrize("actual", ["torchvision", "xrv", "chexnet"])
def test_an_init_format_the_file_is_not_is_refused_naming_what_it_is(tmp_path, actual):
    """`--init-format chexnet` with a plain torchvision state dict was recorded as chexnet in the
    bundle's training.initialised_from: the file's keys say what it is, and a format that
    contradicts them is refused, naming the format that fits."""
    torch.save(stand_in(actual), tmp_path / f"{actual}.pt")
    assert read_backbone(tmp_path / f"{actual}.pt").format == actual  # auto reads it as what it is
    assert read_backbone(tmp_path / f"{actual}.pt", actual).format == actual
    for given in {"torchvision", "xrv", "chexnet"} - {actual}:
        with pytest.raises(ValueError, match=f"--init-format {given} but") as refused:
            read_backbone(tmp_path / f"{actual}.pt", given)
        said = str(refused.value)
        assert f"--init-format {actual} (or auto)" in said, said
        assert {"torchvision": "torchvision", "xrv": "TorchXRayVision", "chexnet": "CheXNet"}[actual] in said, said


def test_train_with_an_init_format_the_file_is_not_stops_before_any_work(nih, tmp_path):
    from .conftest import REPO

    torch.save(stand_in("torchvision"), tmp_path / "densenet121.pth")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "train", "--images", str(nih / "images"), "--metadata",
                           str(nih / "labels.csv"), "--out", str(run), "--config",
                           str(REPO / "training" / "configs" / "quick.toml"), "--device", "cpu",
                           "--init-backbone", str(tmp_path / "densenet121.pth"), "--init-format", "chexnet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("cxr-batch: error:")]
    assert len(error) == 1 and "--init-format chexnet but" in error[0], proc.stderr
    assert "--init-format torchvision (or auto)" in error[0]
    assert not (run / "prepared.csv").exists() and not (run / "bundle").exists()


def test_a_backbone_missing_weights_or_with_extra_ones_is_refused_when_read_before_any_work(tmp_path):
    """A torchvision file without its last dense block (a partial export) passed read_backbone,
    so `train` prepared and cached every image before load_backbone refused it: refused when the
    file is read, naming what is missing (norm5, unused by the pyramid, may be absent) or extra.
    A classifier of another size is no part of the backbone: it is not read, and does not matter."""
    state = densenet121(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if "denseblock4" not in k}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"not a DenseNet-121 backbone: \d+ weights missing \(features.denseblock4"):
        read_backbone(tmp_path / "cut.pth")
    torch.save({**state, "features.denseblock4.denselayer17.conv1.weight": torch.zeros(128, 1024, 1, 1)},
               tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"not a DenseNet-121 backbone: 1 weight\(s\) DenseNet-121 has not "
                                         r"\(features.denseblock4.denselayer17.conv1.weight"):
        read_backbone(tmp_path / "extra.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("features.norm5")}, tmp_path / "no_norm5.pth")
    torch.save({**state, "classifier.weight": torch.zeros(14, 1024), "classifier.bias": torch.zeros(14)},
               tmp_path / "classifier14.pth")
    for name in ("no_norm5.pth", "classifier14.pth"):
        load_backbone(CxrFusionNet(ModelConfig()), read_backbone(tmp_path / name))
