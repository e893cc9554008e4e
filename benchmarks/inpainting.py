"""Does the inpainting heal a lesion? Inpaint exactly the (dilated) true lesion and measure.

The best case for the stage: the mask is the ground truth, not the AOVA map. A healing model
removes the lesion's contrast against its surroundings (contrast_removed near 1) and changes
the lesion far more than the healthy tissue around it (residual lesion / ring well above 1).
The lesion's contrast in the VAE's own reconstruction D(E(x)) says whether the latent holds the
lesion at all (contrast_kept_by_vae near 1): what the latent does not hold, no inpainting in
latent space can remove, since x_h = x + D(z_h) - D(z).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffugts.executors.base import preset_changes
from diffugts.pipeline import LoopOptions, Timings, inpainting_mask, segment_patch
from diffugts.prompts import build_prompt_set


def lesion_contrast(image: np.ndarray, lesion: np.ndarray, ring: np.ndarray) -> float:
    return float(image[lesion].mean() - image[ring].mean())


def vae_reconstruction(executor, patch: np.ndarray, prompts) -> np.ndarray:
    """D(E(x)) of a patch (the encoder's latent mean, unscaled)."""
    encoded = executor.encode(patch[None, None].astype(np.float32), prompts)
    return executor.decode(encoded.latent)[0, 0]


def inpainting_effect(executor, cases, seed: int = 0) -> dict:
    """Per case and on average: lesion contrast before / after, mean |x - x_h| in lesion and ring."""
    preset = executor.preset
    rows = []
    with preset_changes(executor, anomaly_threshold=2.0):  # the map never adds to the mask
        for i, case in enumerate(cases):
            lesion = case.label > 0.5
            if not lesion.any():
                continue
            ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
            mask = inpainting_mask(case.label, preset.latent_factor, 0.5, preset.mask_dilation)
            prompts = build_prompt_set(case.prompt, case.modality)
            out = segment_patch(executor, case.image, prompts,
                                LoopOptions(seed=seed + i, inpaint_also=mask), np.random.default_rng(seed + i),
                                Timings())
            residual = np.abs(case.image - out["healthy"])
            before, after = lesion_contrast(case.image, lesion, ring), lesion_contrast(out["healthy"], lesion, ring)
            reconstructed = lesion_contrast(vae_reconstruction(executor, case.image, prompts), lesion, ring)
            rows.append({"prompt": case.prompt, "contrast_before": before, "contrast_after": after,
                         "contrast_removed": 1.0 - abs(after) / max(abs(before), 1e-6),
                         "contrast_reconstructed": reconstructed,
                         "contrast_kept_by_vae": reconstructed / before if before else 0.0,
                         "residual_lesion": float(residual[lesion].mean()),
                         "residual_ring": float(residual[ring].mean())})
    if not rows:
        raise ValueError("no case with a lesion to inpaint")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "prompt"}
    mean["residual_ratio"] = mean["residual_lesion"] / max(mean["residual_ring"], 1e-9)
    return {"cases": rows, "mean": mean}
