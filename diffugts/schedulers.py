"""Numpy schedulers for the torch-free loop, step-for-step equal to diffusers'.

DDIM (eta=0, epsilon prediction, scaled-linear betas as MAISI's DDPM, "leading" spacing) and
rectified flow (diffusers' FlowMatchEulerDiscreteScheduler, shift 1). Each sampler is a
stateless bundle of `timesteps`, `add_noise` and `step`; the loop owns the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def scaled_linear_alphas_cumprod(num_train_timesteps: int, beta_start: float = 0.0015,
                                 beta_end: float = 0.0195) -> np.ndarray:
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    return np.cumprod(1.0 - betas, axis=0).astype(np.float32)


def img2img_tail(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """The last `strength` share of a schedule, as diffusers' img2img pipelines take it."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = len(timesteps)
    init = min(int(n * strength), n)
    return timesteps[max(n - init, 0):]


@dataclass(frozen=True)
class DDIMSampler:
    """Deterministic DDIM (eta=0) on epsilon predictions."""

    num_train_timesteps: int = 1000
    num_inference_steps: int = 10
    beta_start: float = 0.0015
    beta_end: float = 0.0195

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return scaled_linear_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end)

    @property
    def step_ratio(self) -> int:
        return self.num_train_timesteps // self.num_inference_steps

    def timesteps(self, strength: float = 1.0) -> np.ndarray:
        full = (np.arange(self.num_inference_steps) * self.step_ratio).round()[::-1].astype(np.int64)
        return img2img_tail(full, strength)

    def model_timestep(self, t) -> float:
        """The value fed to the network's time embedding."""
        return float(t)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        if t < 0:  # past the end of the chain: the clean sample
            return x0
        a = self.alphas_cumprod[int(t)]
        return (np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise).astype(np.float32)

    def next_timestep(self, t) -> int:
        return int(t) - self.step_ratio

    def step(self, eps: np.ndarray, t, sample: np.ndarray) -> np.ndarray:
        acp = self.alphas_cumprod
        prev_t = self.next_timestep(t)
        a_t = acp[int(t)]
        a_prev = acp[prev_t] if prev_t >= 0 else acp[0]  # diffusers: set_alpha_to_one=False
        x0 = (sample - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
        return (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)


@dataclass(frozen=True)
class FlowSampler:
    """Rectified flow, Euler steps: x_t = (1 - s) x0 + s noise, velocity v = noise - x0.

    `velocity_sign=-1` reads networks trained with MONAI's RFlowScheduler, whose velocity
    points the other way (x0 - noise).
    """

    num_train_timesteps: int = 1000
    num_inference_steps: int = 30
    velocity_sign: float = 1.0

    def timesteps(self, strength: float = 1.0) -> np.ndarray:
        T = self.num_train_timesteps
        full = np.linspace(1.0 * T, 1.0 / T * T, self.num_inference_steps).astype(np.float32)
        return img2img_tail(full, strength)

    def sigma(self, t) -> float:
        return float(np.float32(t) / np.float32(self.num_train_timesteps))

    def model_timestep(self, t) -> float:
        return float(t)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        s = np.float32(max(self.sigma(t), 0.0))
        return (s * noise + (1.0 - s) * x0).astype(np.float32)

    def next_timestep(self, t) -> float:
        full = self.timesteps(1.0)
        idx = int(np.argmin(np.abs(full - np.float32(t))))
        return float(full[idx + 1]) if idx + 1 < len(full) else 0.0

    def step(self, velocity: np.ndarray, t, sample: np.ndarray) -> np.ndarray:
        s, s_next = np.float32(self.sigma(t)), np.float32(self.sigma(self.next_timestep(t)))
        v = self.velocity_sign * velocity
        return (sample.astype(np.float32) + (s_next - s) * v).astype(np.float32)


def make_sampler(preset) -> DDIMSampler | FlowSampler:
    if preset.scheduler == "ddim":
        return DDIMSampler(preset.num_train_timesteps, preset.inference_steps)
    if preset.scheduler == "flow":
        return FlowSampler(preset.num_train_timesteps, preset.inference_steps, preset.flow_velocity_sign)
    raise ValueError(f"unknown scheduler {preset.scheduler!r} (ddim or flow)")
