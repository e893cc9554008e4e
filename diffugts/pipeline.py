"""The one DiffuGTS loop, in numpy, against the stage-executor interface.

encode (text + VAE taps + AOVA) -> attention probe and refinement -> latent inpainting with
RePaint blending on the cropped latent, decoded as a difference -> residual head -> postprocess.
Every executor (torch, ONNX Runtime, Triton, Triton BLS) runs exactly this code.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .component_rules import ComponentRule, component_rule
from .executors.base import StageExecutor
from .io import Volume
from .notices import empty_mask_notice, loop_notices
from .organ_regions import mostly_inside, organ_region, restriction_notice, with_margin
from .postprocess import mask_on_input_grid
from .preprocess import guess_modality, resample, to_model_grid
from .prompts import PromptSet, build_prompt_set, normalize_target, spelt_out
from .schedulers import make_sampler
from .windows import sliding_window


class Timings(defaultdict):
    """Seconds per stage, summed over windows and steps."""

    def __init__(self):
        super().__init__(float)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] += time.perf_counter() - start


ABLATIONS = ("full", "aova+attention", "aova", "baseline")


@dataclass
class LoopOptions:
    crop: bool = True  # run the inpainting loop on the mask's latent bounding box only
    seed: int = 0
    steps: int | None = None  # override the preset's inference steps
    strength: float | None = None
    # where the mask comes from: the residual head (full), the refined or raw AOVA map, or an
    # intensity-outlier baseline with no learning at all
    ablation: str = "full"
    # restrict the maps (and so the mask) to the organ the target names, where one is found in the
    # scan (`organ_regions`): ZePT's tumours-in-their-organ rule
    organ: bool = True
    # keep every component past the size and air floors: no one-per-lesion top-k, no near-the-best
    # rule for several lesions (`component_rules`); every candidate, and more false positives
    all_components: bool = False
    # training only: latent voxels inpainted whatever the map says (the ground truth, so that the
    # residual head learns what an inpainted lesion looks like)
    inpaint_also: np.ndarray | None = None

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}: {', '.join(ABLATIONS)}")


class OnRead:
    """A field that may be given as a function: computed on first read, then kept.

    Maps on the input grid cost a full-size resample each (seconds on a CT-sized volume); the
    mask does not need them, so a caller pays only for the maps it reads."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError(self.slot)  # no default for the dataclass
        value = obj.__dict__[self.slot]
        if callable(value):
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


@dataclass
class Segmentation:
    mask: np.ndarray  # uint8 on the input grid
    probability: np.ndarray | None = OnRead()  # float32 on the input grid (None from the BLS model)
    anomaly: np.ndarray = OnRead()  # refined AOVA map on the input grid
    healthy: np.ndarray | None = OnRead()  # pseudo-healthy volume on the input grid, model intensities [0, 1]
    modality: str
    prompts: PromptSet
    timings: dict = field(default_factory=dict)
    inpainted_fraction: float = 0.0  # share of latent voxels the loop touched
    notices: tuple[str, ...] = ()  # what a reader of the mask should know (`notices.py`)
    # which components the mask kept (`component_rules`); None from the BLS model, whose server
    # applied its own preset's rule
    components: ComponentRule | None = ComponentRule()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def block_reduce(volume: np.ndarray, factor: int, reduce=np.mean) -> np.ndarray:
    """Downsample a cube by an integer factor with `reduce` over each block."""
    n = [s // factor for s in volume.shape]
    blocks = volume.reshape(n[0], factor, n[1], factor, n[2], factor)
    return reduce(blocks, axis=(1, 3, 5))


def intensity_outlier(patch: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """No-learning baseline: robust z-score of the deviation from a smoothed patch, squashed."""
    residual = patch - ndimage.gaussian_filter(patch, sigma)
    body = patch > 0.05
    spread = np.median(np.abs(residual[body] - np.median(residual[body]))) if body.any() else 0.0
    z = np.abs(residual) / (1.4826 * spread + 1e-3)
    return sigmoid(z - 3.0) * body


def refine_with_attention(anomaly: np.ndarray, attention: np.ndarray, steps: int,
                          weight: float) -> np.ndarray:
    """Affinity propagation M <- normalize(A^k M) at the attention's resolution, blended back."""
    if steps <= 0 or weight <= 0:
        return anomaly
    side = round(attention.shape[-1] ** (1 / 3))
    if side**3 != attention.shape[-1] or anomaly.shape[0] % side:
        raise ValueError(f"attention of {attention.shape[-1]} tokens does not tile a {anomaly.shape} map")
    coarse = block_reduce(anomaly, anomaly.shape[0] // side).ravel()
    propagated = coarse
    for _ in range(steps):
        propagated = attention @ propagated
    peak = propagated.max()
    if peak > 0:  # keep the coarse map's peak level: propagation only redistributes mass
        propagated = propagated * (coarse.max() / peak)
    fine = resample(propagated.reshape(side, side, side).astype(np.float32), anomaly.shape)
    return ((1.0 - weight) * anomaly + weight * fine).astype(np.float32)


def flagged_latent(anomaly: np.ndarray, factor: int, threshold: float) -> np.ndarray:
    """Latent voxels holding a pixel of the map over `threshold`."""
    return block_reduce(anomaly > threshold, factor, np.max)


def is_flooded(flagged: np.ndarray, max_fraction: float) -> bool:
    """More than `max_fraction` of the latent voxels flagged: a map that marks most of the window
    localizes nothing, so nothing is inpainted there and the head does not see it."""
    return float(flagged.mean()) > max_fraction


def dilated(flagged: np.ndarray, dilation: int) -> np.ndarray:
    if dilation > 0 and flagged.any():
        return ndimage.binary_dilation(flagged, iterations=dilation)
    return flagged


def inpainting_mask(anomaly: np.ndarray, factor: int, threshold: float, dilation: int,
                    max_fraction: float = 1.0) -> np.ndarray:
    """Latent voxels to inpaint: those holding a pixel of the map over `threshold`, dilated, unless
    more than `max_fraction` of them are flagged."""
    flagged = flagged_latent(anomaly, factor, threshold)
    return np.zeros_like(flagged) if is_flooded(flagged, max_fraction) else dilated(flagged, dilation)


def crop_box(mask: np.ndarray, margin: int, multiple: int) -> tuple[slice, ...]:
    """Bounding box of the mask plus margin, grown to a size the UNet accepts."""
    box = []
    for axis, n in enumerate(mask.shape):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo, hi = max(idx[0] - margin, 0), min(idx[-1] + 1 + margin, n)
        size = min(-(-(hi - lo) // multiple) * multiple, n)
        lo = int(min(max(lo - (size - (hi - lo)) // 2, 0), n - size))
        box.append(slice(lo, lo + size))
    return tuple(box)


def inpaint_latent(executor: StageExecutor, sampler, latent: np.ndarray, mask: np.ndarray,
                   strength: float, rng: np.random.Generator) -> np.ndarray:
    """Denoise the masked region from `strength`, putting back the re-noised known region each step."""
    noise = rng.standard_normal(latent.shape).astype(np.float32)
    timesteps = sampler.timesteps(strength)
    sample = sampler.add_noise(latent, noise, timesteps[0])
    for t in timesteps:
        prediction = executor.unet(sample, sampler.model_timestep(t), attention=False).prediction
        sample = sampler.step(prediction, t, sample)
        known = sampler.add_noise(latent, noise, sampler.next_timestep(t))
        sample = (mask * sample + (1.0 - mask) * known).astype(np.float32)
    return sample


def pixel_region(box: tuple[slice, ...], factor: int) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(b.start * factor, b.stop * factor) for b in box)


def pseudo_healthy(executor: StageExecutor, image: np.ndarray, latent: np.ndarray, inpainted: np.ndarray,
                   box: tuple[slice, ...], preset) -> np.ndarray:
    """The scan's box with the change the inpainting made: x + D(z_h) - D(z).

    Decoding both latents of the box (one batch-2 call) and keeping only their difference cancels
    the VAE's reconstruction error, so outside the inpainted region x_h is x itself, and only the
    box is decoded (the decoder is the loop's most expensive call)."""
    original, healed = executor.decode(np.concatenate([latent, inpainted]) / preset.scale_factor)
    scan = image[pixel_region(box, preset.latent_factor)][0]
    return np.clip(scan + healed - original, 0.0, 1.0).astype(np.float32)


def segment_patch(executor: StageExecutor, patch: np.ndarray, prompts: PromptSet,
                  options: LoopOptions, rng: np.random.Generator, timings: Timings,
                  stats: dict | None = None) -> dict[str, np.ndarray]:
    preset = executor.preset
    sampler = make_sampler(preset.with_(inference_steps=options.steps or preset.inference_steps))
    image = patch[None, None].astype(np.float32)
    if options.ablation == "baseline":
        with timings.stage("baseline"):
            outlier = intensity_outlier(patch)
        return {"prob": outlier, "anomaly": outlier, "healthy": patch}

    with timings.stage("encode"):
        encoded = executor.encode(image, prompts)
    if options.ablation == "aova":
        return {"prob": encoded.anomaly[0, 0], "anomaly": encoded.anomaly[0, 0], "healthy": patch}
    latent = encoded.latent * preset.scale_factor

    with timings.stage("attention"):
        probe_noise = rng.standard_normal(latent.shape).astype(np.float32)
        probe = executor.unet(sampler.add_noise(latent, probe_noise, preset.probe_timestep),
                              float(preset.probe_timestep))
        anomaly = refine_with_attention(encoded.anomaly[0, 0], probe.attention[0],
                                        preset.affinity_steps, preset.refine_weight)
    if options.ablation == "aova+attention":
        return {"prob": anomaly, "anomaly": anomaly, "healthy": patch}

    with timings.stage("inpaint"):
        flagged = flagged_latent(anomaly, preset.latent_factor, preset.anomaly_threshold)
        flooded = is_flooded(flagged, preset.inpaint_max_fraction)  # decides the inpainting and the head's map
        mask = np.zeros_like(flagged) if flooded else dilated(flagged, preset.mask_dilation)
        if stats is not None:
            stats.setdefault("flagged_shares", []).append(float(flagged.mean()))
        if options.inpaint_also is not None:
            mask = mask | options.inpaint_also
        healthy = None  # x_h is x until something is inpainted
        if mask.any():
            full = tuple(slice(0, n) for n in mask.shape)
            box = crop_box(mask, preset.crop_margin, preset.unet_multiple) if options.crop else full
            region = (slice(None), slice(None)) + box
            inpainted = inpaint_latent(executor, sampler, latent[region], mask[box].astype(np.float32)[None, None],
                                       options.strength or preset.strength, rng)
            healthy = image.copy()
            healthy[pixel_region(box, preset.latent_factor)] = pseudo_healthy(executor, image, latent[region],
                                                                              inpainted, box, preset)
            if stats is not None:
                stats["inpainted_voxels"] = stats.get("inpainted_voxels", 0) + int(np.prod([s.stop - s.start for s in box]))
        if stats is not None:
            stats["latent_voxels"] = stats.get("latent_voxels", 0) + mask.size

    with timings.stage("score"):
        # a map that floods the window localizes nothing: there the head reads the scan alone, as
        # training's view dropout taught it (model card, "The scan alone where the map floods")
        seen_map = np.zeros_like(anomaly) if flooded else anomaly
        logits = executor.score(image, healthy, seen_map[None, None], encoded, prompts)
    return {"prob": sigmoid(logits[0, 0]), "anomaly": anomaly, "healthy": patch if healthy is None else healthy[0, 0]}


def segment_volume(executor: StageExecutor, volume: Volume, target: str, modality: str | None = None,
                   options: LoopOptions | None = None,
                   on_stage: Callable[[str], None] | None = None) -> Segmentation:
    options = options or LoopOptions()
    preset = executor.preset
    timings, stats = Timings(), {}
    modality = (modality or guess_modality(volume.array)).upper()
    prompts = build_prompt_set(target, modality)
    rng = np.random.default_rng(options.seed)

    with timings.stage("preprocess"):
        model_array, grid = to_model_grid(volume, modality, preset.spacing, preset.patch)

    def run_window(window: np.ndarray) -> dict[str, np.ndarray]:
        if on_stage:
            on_stage("window")
        return segment_patch(executor, window, prompts, options, rng, timings, stats)

    blended = sliding_window(model_array, preset.patch, preset.window_overlap, run_window)

    with timings.stage("postprocess"):
        region, envelope, organ_notices, spelt = None, None, (), spelt_out(target)
        if options.organ:
            region = organ_region(model_array, modality, spelt, preset.spacing)
            envelope = with_margin(region, preset.spacing)
            organ_notices = restriction_notice(spelt, envelope, preset.spacing)
        threshold = {"full": preset.mask_threshold, "baseline": 0.5}.get(options.ablation, preset.map_threshold)
        prob = blended["prob"] if envelope is None else blended["prob"] * envelope
        peak = float(prob[grid.unpadded].max())  # for an empty mask's notice; the padding is never in the mask
        if envelope is not None:
            prob *= mostly_inside(prob > threshold, region)
            blended = {**blended, "prob": prob, "anomaly": blended["anomaly"] * envelope}
        rule = component_rule(spelt, modality, preset, restricted=envelope is not None,
                              keep_all=options.all_components)
        mask, counts = mask_on_input_grid(grid, blended["prob"], threshold, volume.spacing,
                                          preset.min_component_mm3, rule.top_k, volume.array, rule.min_median,
                                          rule.rank, rule.near_best)
    timings["total"] = sum(timings.values())
    fraction = stats.get("inpainted_voxels", 0) / max(stats.get("latent_voxels", 1), 1)

    def on_input_grid(name):
        return lambda: grid.to_input_grid(blended[name])

    notices = loop_notices(normalize_target(target), stats.get("flagged_shares", []), preset.inpaint_max_fraction)
    notices += organ_notices + rule.notices(counts)
    if not mask.any():
        notices += empty_mask_notice(normalize_target(target), peak, threshold, preset.min_component_mm3)
    return Segmentation(mask, on_input_grid("prob"), on_input_grid("anomaly"), on_input_grid("healthy"),
                        modality, prompts, dict(timings), fraction, notices, rule)


def run_segmentation(executor, volume: Volume, target: str, modality: str | None = None,
                     options: LoopOptions | None = None, on_stage=None) -> Segmentation:
    """The loop here, or in the server when the executor runs it there (Triton BLS)."""
    if hasattr(executor, "segment_volume"):
        return executor.segment_volume(volume, target, modality, options)
    return segment_volume(executor, volume, target, modality, options, on_stage)
