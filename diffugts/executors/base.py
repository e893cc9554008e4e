"""The stage-executor interface the loop is written against (numpy in, numpy out)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    attention: np.ndarray | None  # (1, N, N) self-attention of the finest attention level, mean over heads


class StageExecutor(Protocol):
    preset: Preset

    def encode(self, image: np.ndarray, prompts: PromptSet) -> Encoded:
        """Text embeddings + VAE encoder taps + AOVA map (the `encode_aova` ensemble)."""

    def unet(self, latent: np.ndarray, timestep: float, attention: bool = True) -> Denoised:
        """One UNet pass on a (scaled) latent, with the attention hook. `attention=False`: the
        caller does not read it (the inpainting steps), and it is not returned (None): over the
        wire it is a 1 MB tensor per step at the demo size."""

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """(B, C, l, m, n) unscaled latents, a cropped box or the whole patch -> (B, 1, 4l, 4m, 4n) images."""

    def score(self, image: np.ndarray, healthy: np.ndarray | None, anomaly: np.ndarray, encoded: Encoded,
              prompts: PromptSet) -> np.ndarray:
        """Residual-head logits of an image against its pseudo-healthy counterpart (the `score`
        ensemble). `healthy=None`: nothing was inpainted, x_h is x, and the encoder's outputs for x
        stand in for those of x_h (the residual head alone runs)."""


@contextmanager
def preset_changes(executor: StageExecutor, **changes) -> Iterator[None]:
    """Run an in-process executor's loop with some preset fields changed, then put it back."""
    base = executor.preset
    executor.preset = base.with_(**changes)
    try:
        yield
    finally:
        executor.preset = base
