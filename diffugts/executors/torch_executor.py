"""Torch eager executor: the reference the other executors are checked against."""

from __future__ import annotations

import numpy as np
import torch

from ..config import bundled_weights, get_preset
from ..models import build_models
from ..models.weights import load_weights
from ..prompts import PromptSet
from ..tokenizer import tokenize
from .base import Denoised, Encoded


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


class TorchExecutor:
    def __init__(self, models):
        self.models = models.eval()
        self.preset = models.preset
        self.stages = models.stages()
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_preset(cls, preset_name: str = "tiny", weights: str | None = None) -> "TorchExecutor":
        preset = get_preset(preset_name)
        models = build_models(preset)
        path = weights or bundled_weights(preset)
        if path is not None and (weights or path.exists()):  # demo runs untrained until weights exist
            load_weights(models, path)
        return cls(models)

    @torch.inference_mode()
    def embed_prompts(self, prompts: PromptSet) -> torch.Tensor:
        todo = [t for t in prompts.texts if t not in self._prompt_cache]
        if todo:
            ids, mask = tokenize(todo)
            for text, emb in zip(todo, self.stages["text_encoder"](_t(ids)[None], _t(mask)[None])[0]):
                self._prompt_cache[text] = emb
        return torch.stack([self._prompt_cache[t] for t in prompts.texts])

    @torch.inference_mode()
    def _encode(self, image: torch.Tensor, prompts: PromptSet):
        return self.stages["vae_encoder_aova"](image, self.embed_prompts(prompts)[None],
                                               _t(prompts.abnormal_mask)[None])

    def encode(self, image: np.ndarray, prompts: PromptSet) -> Encoded:
        latent, anomaly, features = self._encode(_t(image), prompts)
        return Encoded(latent.numpy(), anomaly.numpy(), features.numpy())

    @torch.inference_mode()
    def unet(self, latent: np.ndarray, timestep: float, attention: bool = True) -> Denoised:
        prediction, weights = self.stages["unet"](_t(latent), torch.tensor([timestep], dtype=torch.float32))
        return Denoised(prediction.numpy(), weights.numpy() if attention else None)

    @torch.inference_mode()
    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self.stages["vae_decoder"](_t(latent)).numpy()

    @torch.inference_mode()
    def head_inputs(self, image, healthy, anomaly, encoded: Encoded, prompts: PromptSet) -> list[torch.Tensor]:
        """The residual head's six inputs; the encoder runs on x_h only if something was inpainted."""
        if healthy is None:
            healthy, healthy_anomaly, healthy_features = image, _t(encoded.anomaly), _t(encoded.features)
        else:
            _, healthy_anomaly, healthy_features = self._encode(_t(healthy), prompts)
        return [_t(image), _t(healthy), _t(anomaly), healthy_anomaly, _t(encoded.features), healthy_features]

    @torch.inference_mode()
    def score(self, image, healthy, anomaly, encoded: Encoded, prompts: PromptSet) -> np.ndarray:
        return self.stages["residual_head"](*self.head_inputs(image, healthy, anomaly, encoded, prompts)).numpy()
