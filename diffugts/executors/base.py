"""The stage-executor interface the loop is written against (numpy in, numpy out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config import Preset
from ..prompts import PromptSet


@dataclass
class Encoded:
    latent: np.ndarray  # (1, C, l, l, l) VAE latent (mean), unscaled
    anomaly: np.ndarray  # (1, 1, P, P, P) AOVA anomaly probability
    features: np.ndarray  # (1, E, l, l, l) projected, normalized adapter features


@dataclass
class Denoised:
    prediction: np.ndarray  # like the latent: epsilon or velocity
    attention: np.ndarray  # (1, N, N) self-attention of the finest attention level, mean over heads


@dataclass
class Scored:
    healthy: np.ndarray  # (1, 1, P, P, P) decoded pseudo-healthy patch
    logits: np.ndarray  # (1, 1, P, P, P) residual-head mask logits


class StageExecutor(Protocol):
    preset: Preset

    def encode(self, image: np.ndarray, prompts: PromptSet) -> Encoded:
        """Text embeddings + VAE encoder taps + AOVA map (the `encode_aova` ensemble)."""

    def unet(self, latent: np.ndarray, timestep: float) -> Denoised:
        """One UNet pass on a (scaled) latent, with the attention hook."""

    def decode_and_score(self, latent: np.ndarray, image: np.ndarray, anomaly: np.ndarray,
                         features: np.ndarray, prompts: PromptSet) -> Scored:
        """Decode the inpainted latent and run the residual head (the `decode_score` ensemble)."""
