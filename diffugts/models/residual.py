"""Pixel- and feature-level residual head: (x, x_h, |x - x_h|, M, M_h, feature distance) -> logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_INPUTS = 6


class ResidualHead(nn.Module):
    def __init__(self, channels: int, groups: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(RESIDUAL_INPUTS, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv3d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv3d(channels, 1, 1),
        )

    def forward(self, image, healthy, anomaly, healthy_anomaly, features, healthy_features):
        # feature residual: cosine distance of the projected features, at latent resolution
        distance = 1.0 - (features * healthy_features).sum(1, keepdim=True)
        distance = F.interpolate(distance, size=image.shape[2:], mode="trilinear", align_corners=False)
        inputs = torch.cat([image, healthy, (image - healthy).abs(), anomaly,
                            (anomaly - healthy_anomaly).clamp(min=0), distance], dim=1)
        return self.net(inputs)
