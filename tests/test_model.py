import pytest
import torch

from model_export.alexnet import AlexNet, count_parameters, weight_layers


@pytest.mark.parametrize(("layout", "expected"), [("paper", 60_965_224), ("torchvision", 61_100_840)])
def test_parameter_counts(layout: str, expected: int) -> None:
    assert count_parameters(AlexNet(layout, 1000)) == expected


@pytest.mark.parametrize("layout", ["paper", "torchvision"])
@pytest.mark.parametrize("size", [224, 64])
def test_forward_shapes(layout: str, size: int) -> None:
    model = AlexNet(layout, 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_paper_layout_is_the_2012_network() -> None:
    model = AlexNet("paper")
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]  # the two-GPU split
    assert convs[0].kernel_size == (11, 11) and convs[0].stride == (4, 4)
    lrns = [m for m in model.features if isinstance(m, torch.nn.LocalResponseNorm)]
    assert len(lrns) == 2
    # The paper's alpha = 1e-4 is not divided by n; PyTorch's is, hence 5e-4 with n = 5.
    assert all((lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 5e-4, 0.75, 2.0) for lrn in lrns)
    pools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert all((p.kernel_size, p.stride) == (3, 2) for p in pools)  # overlapping pooling
    # 224x224 crops give the paper's 55x55 conv1 maps and 6x6 maps before fc6.
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert model.features[0](x).shape[-2:] == (55, 55)
        assert model.features(x).shape[-3:] == (256, 6, 6)
    dropouts = [m for m in model.classifier if isinstance(m, torch.nn.Dropout)]
    assert [d.p for d in dropouts] == [0.5, 0.5]


def test_torchvision_state_dict_keys() -> None:
    keys = list(AlexNet("torchvision").state_dict())
    expected = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")]
    expected += [f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")]
    assert keys == expected


def test_paper_init_statistics() -> None:
    torch.manual_seed(0)
    layers = weight_layers(AlexNet("paper", init="paper"))
    assert len(layers) == 8
    for layer in layers:
        w = layer.weight.detach()
        assert abs(w.mean().item()) < 1e-3
        assert w.std().item() == pytest.approx(0.01, rel=0.05)
    biases = [layer.bias.detach() for layer in layers]
    for i, b in enumerate(biases):  # 1 in conv2, conv4, conv5, fc6, fc7; 0 in conv1, conv3, fc8
        assert torch.all(b == (1.0 if i in (1, 3, 4, 5, 6) else 0.0))


def test_caffe_init_statistics() -> None:
    torch.manual_seed(0)
    layers = weight_layers(AlexNet("torchvision", init="caffe"))
    stds = [layer.weight.detach().std().item() for layer in layers]
    assert stds[5] == pytest.approx(0.005, rel=0.05) and stds[6] == pytest.approx(0.005, rel=0.05)
    assert stds[0] == pytest.approx(0.01, rel=0.05)
    assert torch.all(layers[1].bias == 0.1) and torch.all(layers[0].bias == 0)


def test_default_init_is_pytorchs() -> None:
    torch.manual_seed(0)
    first = weight_layers(AlexNet("torchvision"))[0].weight.detach()
    # Kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in), far from N(0, 0.01).
    bound = 1 / (3 * 11 * 11) ** 0.5
    assert first.abs().max().item() <= bound
    assert first.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
