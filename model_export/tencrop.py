"""The paper's test-time pipeline inside the graph: uint8 central squares in, probabilities out.

``TenCropModel`` wraps an ``AlexNet`` so that the exported file takes what the host has after
decoding and resizing, (N, S, S, 3) uint8 (196 KB per 256 px image instead of 6 MB of float crops),
and does the rest exactly as ``alexnet_core.pipeline`` does on the host:

    normalise (x - mean*255) / (std*255) -> four corners + centre (pipeline.crop_offsets) -> their
    mirrors -> the network on N*10 crops -> softmax -> mean over each image's ten crops

A model trained without flips gets ``crops=5``: no mirrors, the mean over the five crops
(``alexnet_core.pipeline.crops_for_training``). A second output, ``features``, is the last hidden
layer (fc7 after its ReLU) averaged over the same crops: the paper's Figure 4 feature vector,
from the same pass.
"""

import torch
from torch import nn

from alexnet_core.pipeline import CROP_COUNTS, N_CROPS, crop_offsets
from model_export.alexnet import AlexNet

PROBABILITIES_NAME = "probabilities"
FEATURES_NAME = "features"


class TenCropModel(nn.Module):
    def __init__(
        self,
        net: AlexNet,
        resize: int,
        crop: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crops: int = N_CROPS,
    ) -> None:
        super().__init__()
        if not isinstance(net.classifier[-1], nn.Linear):
            raise ValueError("the network's last layer must be the fully connected classifier (fc8)")
        if not 0 < crop <= resize:
            raise ValueError(f"crop {crop} must be between 1 and the square's side {resize}")
        if crops not in CROP_COUNTS:
            raise ValueError(f"crops per image must be one of {CROP_COUNTS}, not {crops}")
        self.net = net
        self.crop = crop
        self.crops = crops
        self.offsets = crop_offsets(resize, crop)
        # float32 mean * 255 and std * 255, computed as the host does (alexnet_core.pipeline.ten_crop),
        # so that every normalised value is the host's to the last bit.
        shift = torch.tensor(mean, dtype=torch.float32) * 255.0
        scale = torch.tensor(std, dtype=torch.float32) * 255.0
        self.register_buffer("shift", shift.reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        c = self.crop
        # Normalised once on the square (S*S values) rather than per crop (10*C*C, ~8x more). It is
        # divided, not multiplied by a reciprocal, like the host. It is not folded into conv1: conv1
        # zero-pads the *normalised* crop, so folding would change every border output.
        x = (images.permute(0, 3, 1, 2).to(torch.float32) - self.shift) / self.scale
        # Five slices, one concatenation, one reversed slice for the mirrors: no per-image loop.
        cut = torch.stack([x[:, :, top : top + c, left : left + c] for top, left in self.offsets], dim=1)
        if self.crops == N_CROPS:
            cut = torch.cat([cut, cut.flip(-1)], dim=1)
        crops = cut.reshape(n * self.crops, 3, c, c)
        net = self.net
        hidden = torch.flatten(net.avgpool(net.features(crops)), 1)
        fc7 = net.classifier[:-1](hidden)  # up to fc7's ReLU (dropout is the identity in eval)
        logits = net.classifier[-1](fc7)
        probabilities = torch.softmax(logits, dim=1).reshape(n, self.crops, -1).mean(dim=1)
        features = fc7.reshape(n, self.crops, -1).mean(dim=1)
        return probabilities, features

    @torch.no_grad()
    def fc7(self, crops: torch.Tensor) -> torch.Tensor:
        """fc7 after its ReLU for already normalised (k, 3, C, C) crops (parity checks)."""
        net = self.net
        return net.classifier[:-1](torch.flatten(net.avgpool(net.features(crops)), 1))
