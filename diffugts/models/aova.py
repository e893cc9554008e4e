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
        # the frozen encoder's taps differ ~50x in scale between levels: standardize first
        x = F.instance_norm(features)
        first, activation, second = self.transform
        # the linear layers as 1x1x1 convolutions: no channels-last transposes in the exported
        # graph, which cost OpenVINO ~50 ms of layout reorders per encoder call at 64^3
        hidden = activation(F.conv3d(x, first.weight[:, :, None, None, None], first.bias))
        return self.ratio * F.conv3d(hidden, second.weight[:, :, None, None, None], second.bias) + (1 - self.ratio) * x


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

    def prompt_logits(self, projected: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every voxel to every prompt / temperature: (B, P, X, Y, Z)."""
        return torch.einsum("bexyz,bpe->bpxyz", projected, prompts) / self.log_temperature.exp()

    def anomaly_of(self, projected: torch.Tensor, prompts: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
        """prompts (B, P, E) and abnormal (B, P) per volume, so requests batch in Triton."""
        logits = self.prompt_logits(projected, prompts)
        return (logits.softmax(dim=1) * abnormal[:, :, None, None, None]).sum(1, keepdim=True)

    def log_masses(self, projected, prompts, abnormal) -> tuple[torch.Tensor, torch.Tensor]:
        """log P(abnormal) and log P(normal), stable where the softmax saturates (training)."""
        logits = self.prompt_logits(projected, prompts)
        total = torch.logsumexp(logits, 1, keepdim=True)
        is_abnormal = abnormal[:, :, None, None, None] > 0.5
        log_abnormal = torch.logsumexp(logits.masked_fill(~is_abnormal, -1e4), 1, keepdim=True) - total
        log_normal = torch.logsumexp(logits.masked_fill(is_abnormal, -1e4), 1, keepdim=True) - total
        return log_abnormal, log_normal

    def forward(self, taps: list[torch.Tensor], prompts: torch.Tensor, abnormal: torch.Tensor):
        """Tap i is 2**i times coarser than the image; the last tap is at latent resolution.

        Scale factors are Python ints so the exported graph has no shape arithmetic."""
        projected = self.project(taps)
        deepest = len(taps) - 1
        anomaly = [self.anomaly_of(p, prompts, abnormal) for p in projected]
        anomaly = torch.stack([a if i == 0 else F.interpolate(a, scale_factor=2**i, mode="trilinear",
                                                              align_corners=False)
                               for i, a in enumerate(anomaly)]).mean(0)
        features = torch.stack([p if i == deepest else F.avg_pool3d(p, 2 ** (deepest - i))
                                for i, p in enumerate(projected)]).mean(0)
        return anomaly, F.normalize(features, dim=1)
