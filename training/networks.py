"""MONAI networks for the reference models, and the export wrappers that add heatmaps/scores.

Only training/ imports this module (serving never imports torch).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, FlexibleUNet
from torch import nn


def cxr_network(labels: int, in_channels: int = 1) -> DenseNet121:
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=labels)


class CxrWithCam(nn.Module):
    """DenseNet121 -> (logits, class activation maps).

    CAM is the classifier applied at every position of the last feature map: ``cam[k] =
    W_k . relu(features) + b_k``. Its spatial mean equals the logit exactly, so the heatmap is
    the score's own decomposition and costs one small einsum.
    """

    def __init__(self, net: DenseNet121) -> None:
        super().__init__()
        self.features = net.features
        linear = net.class_layers.out
        if not isinstance(linear, nn.Linear):
            raise TypeError("DenseNet121 classifier head must end in a Linear layer named 'out'")
        self.linear = linear

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = torch.relu(self.features(image))
        cam = torch.einsum("bchw,kc->bkhw", fmap, self.linear.weight) + self.linear.bias[None, :, None, None]
        logits = cam.mean(dim=(2, 3))
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
    """FlexibleUNet -> (frame score logit, mask logits). The score is the mean of the top 1 %
    mask logits: high only when a compact region is confidently polyp."""

    def __init__(self, net: FlexibleUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.net(image)
        flat = mask.flatten(1)
        k = max(1, flat.shape[1] // 100)
        score = flat.topk(k, dim=1).values.mean(dim=1, keepdim=True)
        return score, mask
