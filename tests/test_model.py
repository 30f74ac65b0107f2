import pytest
import torch

from cxr_batch.findings import FINDINGS
from cxr_batch.model import ModelConfig, build_model


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(tabular_skip=True)], ids=["spec", "skip"])
def test_output_shape_finite_and_backward_reaches_both_inputs(config):
    torch.manual_seed(0)
    model = build_model(config).train()
    image = torch.randn(2, 3, 96, 96, requires_grad=True)
    tabular = torch.tensor([[0.57, 0.0, 1.0], [0.3, 1.0, 0.0]], requires_grad=True)
    logits = model(image, tabular)
    assert logits.shape == (2, len(FINDINGS))
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert tabular.grad is not None and tabular.grad.abs().sum() > 0


def test_pyramid_levels_have_spec_channels_and_strides():
    model = build_model().eval()
    with torch.no_grad():
        levels = model.pyramid(torch.randn(1, 3, 224, 224))
    assert list(levels) == ["p3", "p4", "p5"]
    assert [tuple(v.shape[1:]) for v in levels.values()] == [(256, 28, 28), (256, 14, 14), (256, 7, 7)]


def test_construction_never_downloads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("model construction tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    build_model()


def test_imagenet_init_from_local_file(tmp_path):
    from torchvision.models import densenet121

    from cxr_batch.model import load_imagenet_backbone

    torch.manual_seed(1)
    reference = densenet121(weights=None)
    torch.save(reference.state_dict(), tmp_path / "densenet121.pth")
    model = build_model()
    load_imagenet_backbone(model, str(tmp_path / "densenet121.pth"))
    assert torch.equal(model.backbone.conv0.weight, reference.features.conv0.weight)


def test_imagenet_init_from_the_file_torchvision_downloads(tmp_path):
    """The file at DenseNet121_Weights.IMAGENET1K_V1.url (what the message of a failed download
    says to fetch and pass as --imagenet FILE) keeps torchvision's pre-0.3 key names
    ('denselayer1.norm.1.weight'); torchvision renames them as it loads, and so must we."""
    import re

    from torchvision.models import densenet121

    from cxr_batch.model import load_imagenet_backbone

    torch.manual_seed(2)
    reference = densenet121(weights=None)
    # the inverse of torchvision.models.densenet._load_state_dict's renaming
    legacy = {re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", k): v
              for k, v in reference.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "densenet121-a639ec97.pth")
    model = build_model()
    load_imagenet_backbone(model, str(tmp_path / "densenet121-a639ec97.pth"))
    for name, value in reference.features.state_dict().items():
        if not name.startswith("norm5"):
            assert torch.equal(model.backbone.state_dict()[name], value), name
