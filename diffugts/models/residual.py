"""Pixel- and feature-level residual head: (x, x_h, |x - x_h|, M, M_h, feature distance) -> logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_INPUTS = 6


class ResidualHead(nn.Module):
    """A small MONAI UNet (three levels): the residuals need context to tell a lesion from an
    organ boundary, more than two 3x3x3 convolutions can see."""

    def __init__(self, channels: int, groups: int = 4):
        super().__init__()
        from monai.networks.nets import UNet

        self.net = UNet(spatial_dims=3, in_channels=RESIDUAL_INPUTS, out_channels=1,
                        channels=(channels, 2 * channels, 4 * channels), strides=(2, 2),
                        num_res_units=1, norm="instance")

    def forward(self, image, healthy, anomaly, healthy_anomaly, features, healthy_features):
        # feature residual: cosine distance of the projected features, at latent resolution
        distance = 1.0 - (features * healthy_features).sum(1, keepdim=True)
        distance = F.interpolate(distance, size=image.shape[2:], mode="trilinear", align_corners=False)
        inputs = torch.cat([image, healthy, (image - healthy).abs(), anomaly,
                            (anomaly - healthy_anomaly).clamp(min=0), distance], dim=1)
        return self.net(inputs)
