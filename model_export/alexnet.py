"""AlexNet (Krizhevsky, Sutskever, Hinton, 2012) in two layouts.

``paper``: the 2012 network. conv2, conv4 and conv5 are grouped convolutions (groups=2), the
two-GPU split. conv1 is padded by 2 so that a 224x224 crop gives the paper's 55x55 maps (and 6x6
before fc6); an adaptive average pool, the identity at 224, lets smaller inputs through too.
Local response normalisation follows the paper's formula, b = a / (k + alpha * sum(a^2))^beta
with alpha = 1e-4; PyTorch divides alpha by the window size, hence ``alpha=5e-4`` with ``size=5``.

``torchvision``: the single-GPU variant of the public ImageNet weights (64-192-384-256-256), with
the same state-dict keys as ``torchvision.models.alexnet`` so that the official file loads strictly.
"""

import torch
from torch import nn

from alexnet_core.training import DEFAULT_LAYOUT, INITS, LAYOUTS, Init, Layout

__all__ = ["DEFAULT_LAYOUT", "INITS", "LAYOUTS", "AlexNet", "Init", "Layout", "count_parameters"]


def _paper_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2),  # conv1
        nn.ReLU(inplace=True),
        nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),  # conv2
        nn.ReLU(inplace=True),
        nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1),  # conv3
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),  # conv4
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),  # conv5
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def _torchvision_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class AlexNet(nn.Module):
    def __init__(
        self,
        layout: Layout = DEFAULT_LAYOUT,
        num_classes: int = 1000,
        dropout: float = 0.5,
        init: Init = "default",
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        self.layout = layout
        self.features = _paper_features() if layout == "paper" else _torchvision_features()
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        if layout == "paper":  # dropout on the outputs of the two hidden layers, as in the paper
            self.classifier = nn.Sequential(
                nn.Linear(256 * 6 * 6, 4096),  # fc6
                nn.ReLU(inplace=True),
                nn.Dropout(p=dropout),
                nn.Linear(4096, 4096),  # fc7
                nn.ReLU(inplace=True),
                nn.Dropout(p=dropout),
                nn.Linear(4096, num_classes),  # fc8
            )
        else:  # torchvision's order, which its state-dict keys (classifier.1/4/6) depend on
            self.classifier = nn.Sequential(
                nn.Dropout(p=dropout),
                nn.Linear(256 * 6 * 6, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(p=dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Linear(4096, num_classes),
            )
        initialise(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def weight_layers(model: AlexNet) -> list[nn.Conv2d | nn.Linear]:
    """conv1..conv5, fc6, fc7, fc8 in order."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def initialise(model: AlexNet, init: Init) -> None:
    """``paper``: weights N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7 and 0 elsewhere.
    ``caffe``: the reference Caffe model's variant (biases 0.1, fc6/fc7 weights N(0, 0.005)),
    which learns from scratch where the paper's constants stay at chance (see docs/api/training.md).
    ``default``: PyTorch's own initialisation, left as constructed."""
    if init == "default":
        return
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    ones = {1, 3, 4, 5, 6}  # conv2, conv4, conv5, fc6, fc7 (0-based)
    with torch.no_grad():
        for i, layer in enumerate(weight_layers(model)):
            std = 0.005 if init == "caffe" and i in (5, 6) else 0.01
            layer.weight.normal_(0.0, std)
            bias = 0.0
            if i in ones:
                bias = 1.0 if init == "paper" else 0.1
            layer.bias.fill_(bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
