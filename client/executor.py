"""The stage-executor interface over a model repository, whatever carries the tensors."""

from __future__ import annotations

import numpy as np

from diffugts.config import Preset
from diffugts.executors.base import Denoised, Encoded
from diffugts.prompts import PromptSet
from diffugts.stages import ensemble_specs, stage_specs


def _names(spec) -> list[str]:
    return [t.name for t in spec.outputs]


class RepositoryExecutor:
    """encode -> `encode_aova` ensemble (then `vae_encoder_aova` with cached prompt embeddings),
    unet -> `unet`, decode -> `vae_decoder`, score -> `score` ensemble."""

    def __init__(self, transport, preset: Preset):
        self.transport, self.preset = transport, preset
        self._stages, self._ensembles = stage_specs(preset), ensemble_specs(preset)
        self._prompt_cache: dict[tuple[str, ...], np.ndarray] = {}

    def embeddings(self, prompts: PromptSet) -> np.ndarray:
        return self._prompt_cache[prompts.texts]

    def encode(self, image: np.ndarray, prompts: PromptSet) -> Encoded:
        abnormal = prompts.abnormal_mask[None]
        if prompts.texts in self._prompt_cache:
            out = self.transport.infer("vae_encoder_aova", {
                "image": image, "prompt_embeddings": self._prompt_cache[prompts.texts][None],
                "abnormal": abnormal}, _names(self._stages["vae_encoder_aova"]))
        else:
            texts = np.array([[t.encode("utf-8") for t in prompts.texts]], dtype=np.object_)
            out = self.transport.infer("encode_aova", {"prompts": texts, "image": image, "abnormal": abnormal},
                                       _names(self._ensembles["encode_aova"]))
            self._prompt_cache[prompts.texts] = out["prompt_embeddings"][0]
        return Encoded(out["latent"], out["anomaly"], out["features"])

    def unet(self, latent: np.ndarray, timestep: float, attention: bool = True) -> Denoised:
        out = self.transport.infer("unet", {"latent": np.ascontiguousarray(latent, np.float32),
                                            "timestep": np.full((latent.shape[0], 1), timestep, np.float32)},
                                   _names(self._stages["unet"]) if attention else ["prediction"])
        return Denoised(out["prediction"], out.get("attention"))

    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self.transport.infer("vae_decoder", {"latent": np.ascontiguousarray(latent, np.float32)},
                                    _names(self._stages["vae_decoder"]))["healthy"]

    def score(self, image, healthy, anomaly, encoded: Encoded, prompts: PromptSet) -> np.ndarray:
        anomaly = np.ascontiguousarray(anomaly, np.float32)
        if healthy is None:  # x_h is x: the residual head alone, on the encoder's outputs for x
            return self.transport.infer("residual_head", {
                "image": image, "healthy": image, "anomaly": anomaly, "healthy_anomaly": encoded.anomaly,
                "features": encoded.features, "healthy_features": encoded.features},
                _names(self._stages["residual_head"]))["logits"]
        return self.transport.infer("score", {
            "image": image, "healthy": np.ascontiguousarray(healthy, np.float32), "anomaly": anomaly,
            "features": encoded.features, "prompt_embeddings": self.embeddings(prompts)[None],
            "abnormal": prompts.abnormal_mask[None]}, _names(self._ensembles["score"]))["logits"]
