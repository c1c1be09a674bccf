"""MONAI networks for the reference models, and the export wrappers that add heatmaps/scores.

Only training/ imports this module (serving never imports torch).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, FlexibleUNet
from torch import nn


def cxr_network(labels: int, in_channels: int = 1) -> DenseNet121:
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=labels)


def pooled_statistics(fmaps: list[torch.Tensor]) -> torch.Tensor:
    """Per-channel spatial mean and standard deviation of each feature map, concatenated.

    The out-of-distribution gate (models/ood.py) fits a Gaussian to these: first and second
    moments of several depths describe both what the network saw and how it was textured.
    """
    parts = [f.mean(dim=(2, 3)) for f in fmaps]
    parts += [f.var(dim=(2, 3), unbiased=False).clamp_min(1e-12).sqrt() for f in fmaps]
    return torch.cat(parts, dim=1)


#: DenseNet121 stages whose pooled statistics form the ``features`` output.
CXR_FEATURE_STAGES = ("transition2", "transition3", "norm5")


class CxrWithCam(nn.Module):
    """DenseNet121 -> (logits, class activation maps[, features]).

    CAM is the classifier applied at every position of the last feature map: ``cam[k] =
    W_k . relu(features) + b_k``. Its spatial mean equals the logit exactly, so the heatmap is
    the score's own decomposition and costs one small einsum. With ``features=True`` a third
    output carries pooled statistics of intermediate stages for the out-of-distribution gate
    (same weights, same logits).
    """

    def __init__(self, net: DenseNet121, *, features: bool = False) -> None:
        super().__init__()
        self.features = net.features
        linear = net.class_layers.out
        if not isinstance(linear, nn.Linear):
            raise TypeError("DenseNet121 classifier head must end in a Linear layer named 'out'")
        self.linear = linear
        self.with_features = features

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.with_features:
            taps = []
            x = image
            for name, stage in self.features.named_children():
                x = stage(x)
                if name in CXR_FEATURE_STAGES:
                    taps.append(torch.relu(x) if name == "norm5" else x)
            fmap = torch.relu(x)
        else:
            fmap = torch.relu(self.features(image))
        cam = torch.einsum("bchw,kc->bkhw", fmap, self.linear.weight) + self.linear.bias[None, :, None, None]
        logits = cam.mean(dim=(2, 3))
        if self.with_features:
            return logits, cam, pooled_statistics(taps)
        return logits, cam


def polyp_network() -> FlexibleUNet:
    net = FlexibleUNet(in_channels=3, out_channels=1, backbone="efficientnet-b0", pretrained=False, spatial_dims=2)
    # MONAI's EfficientNet keeps TensorFlow's BatchNorm momentum (0.01): after a few hundred steps
    # the running statistics are still near their start and eval-mode output collapses to
    # background (Dice 0 while training Dice rises). PyTorch's default momentum fixes that.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return net


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics on training images (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the passes below
    model.train()
    for x in batches:
        model(x)
    for m in norms:
        m.momentum = 0.1
    model.eval()


class PolypWithScore(nn.Module):
    """FlexibleUNet -> (frame score logit, mask logits[, features]). The score is the mean of the
    top 1 % mask logits: high only when a compact region is confidently polyp. With
    ``features=True`` a third output carries pooled statistics of the encoder stages for the
    out-of-distribution gate (same weights, same mask)."""

    def __init__(self, net: FlexibleUNet, *, features: bool = False) -> None:
        super().__init__()
        self.net = net
        self.with_features = features

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.with_features:
            encoded = self.net.encoder(image)
            decoded = self.net.decoder(encoded, self.net.skip_connect)
            mask = self.net.segmentation_head(decoded)
        else:
            mask = self.net(image)
        flat = mask.flatten(1)
        k = max(1, flat.shape[1] // 100)
        score = flat.topk(k, dim=1).values.mean(dim=1, keepdim=True)
        if self.with_features:
            return score, mask, pooled_statistics(list(encoded[2:]))
        return score, mask
