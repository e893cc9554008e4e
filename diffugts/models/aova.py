"""Anomaly-aware open-vocabulary attention (AOVA) maps from multi-scale VAE-encoder taps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureAdapter(nn.Module):
    """Two linear layers with a residual mix: F' = a * T(F) + (1 - a) * F (per voxel)."""

    def __init__(self, channels: int, ratio: float, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(channels // 2, 4)
        self.ratio = ratio
        self.transform = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, C, X, Y, Z)
        x = features.movedim(1, -1)
        return (self.ratio * self.transform(x) + (1 - self.ratio) * x).movedim(-1, 1)


class AOVAHead(nn.Module):
    """Per scale: adapter -> 1x1x1 projection -> cosine similarity to prompts / temperature ->
    softmax over prompts -> mass on abnormal prompts; the scales are upsampled and averaged."""

    def __init__(self, tap_channels: tuple[int, ...], embed_dim: int, ratio: float):
        super().__init__()
        self.adapters = nn.ModuleList(FeatureAdapter(c, ratio) for c in tap_channels)
        self.projections = nn.ModuleList(nn.Conv3d(c, embed_dim, 1) for c in tap_channels)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.07)))

    def project(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [F.normalize(proj(adapt(t)), dim=1)
                for t, adapt, proj in zip(taps, self.adapters, self.projections)]

    def anomaly_of(self, projected: torch.Tensor, prompts: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bexyz,pe->bpxyz", projected, prompts) / self.log_temperature.exp()
        return (logits.softmax(dim=1) * abnormal.view(1, -1, 1, 1, 1)).sum(1, keepdim=True)

    def forward(self, taps: list[torch.Tensor], prompts: torch.Tensor, abnormal: torch.Tensor,
                image_size: tuple[int, int, int], latent_size: tuple[int, int, int]):
        projected = self.project(taps)
        anomaly = torch.stack([
            F.interpolate(self.anomaly_of(p, prompts, abnormal), size=image_size, mode="trilinear",
                          align_corners=False) for p in projected]).mean(0)
        features = F.normalize(torch.stack([
            F.adaptive_avg_pool3d(p, latent_size) for p in projected]).mean(0), dim=1)
        return anomaly, features
