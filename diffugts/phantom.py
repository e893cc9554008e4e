"""Synthetic CT-like and MR-like volumes with lesions, written in the MSD layout.

Each lesion category has its own organ, shape and intensity signature, so that a model
trained on some categories can be evaluated on categories it never saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Category:
    prompt: str
    organ: str
    modality: str
    shape: str  # "sphere", "lobulated", "irregular", "rim"
    delta: float  # intensity change inside the lesion (HU for CT, fraction of tissue for MR)
    radius_mm: tuple[float, float]


CATEGORIES: dict[str, Category] = {c.prompt: c for c in (
    Category("kidney tumor", "kidney", "CT", "lobulated", -90.0, (10, 18)),
    Category("liver tumor", "liver", "CT", "irregular", -60.0, (12, 24)),
    Category("liver cyst", "liver", "CT", "sphere", -55.0, (8, 16)),
    Category("pancreas tumor", "pancreas", "CT", "irregular", -45.0, (9, 15)),
    Category("spleen lesion", "spleen", "CT", "sphere", -50.0, (8, 14)),
    Category("lung nodule", "lung", "CT", "lobulated", 820.0, (5, 11)),
    Category("brain tumor", "brain", "MR", "rim", 0.7, (10, 20)),
    Category("liver metastasis", "liver", "MR", "lobulated", 0.6, (8, 16)),
)}

# CT: HU; MR: relative intensity (scaled to a scanner-like range at the end)
TISSUE = {
    "CT": {"air": -1000, "body": 40, "fat": -100, "liver": 60, "spleen": 50, "kidney": 160,
           "pancreas": 45, "lung": -850, "bone": 700},
    "MR": {"air": 0.0, "body": 0.35, "fat": 0.9, "liver": 0.45, "spleen": 0.6, "kidney": 0.55,
           "pancreas": 0.5, "lung": 0.05, "bone": 0.15, "brain": 0.5, "csf": 0.9, "skull": 0.1},
}


def _ellipsoid(grid, center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _body_ct(rng, grid, size_mm) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Abdomen/chest in mm coordinates centred on the volume."""
    t = TISSUE["CT"]
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - jitter in mm
    shape = grid[0].shape
    extent = [n / 2 for n in size_mm]
    body = _ellipsoid(grid, (0, j(5), 0), (0.85 * extent[0], 0.7 * extent[1], 10 * extent[2]))
    inner = _ellipsoid(grid, (0, j(5), 0), (0.78 * extent[0], 0.62 * extent[1], 10 * extent[2]))
    z_top = 0.25 * extent[2]
    organs = {
        "lung": inner & (grid[2] > z_top) & (np.abs(grid[0]) > 0.12 * extent[0]),
        "liver": _ellipsoid(grid, (-0.35 * extent[0] + j(6), 0.05 * extent[1] + j(6), 0.05 * extent[2] + j(4)),
                            (0.38 * extent[0], 0.4 * extent[1], 0.3 * extent[2])),
        "spleen": _ellipsoid(grid, (0.5 * extent[0] + j(4), 0.2 * extent[1] + j(4), 0.05 * extent[2]),
                             (0.15 * extent[0], 0.2 * extent[1], 0.2 * extent[2])),
        "kidney": _ellipsoid(grid, (-0.3 * extent[0] + j(4), 0.3 * extent[1], -0.3 * extent[2] + j(4)),
                             (0.13 * extent[0], 0.15 * extent[1], 0.25 * extent[2]))
        | _ellipsoid(grid, (0.3 * extent[0] + j(4), 0.3 * extent[1], -0.3 * extent[2] + j(4)),
                     (0.13 * extent[0], 0.15 * extent[1], 0.25 * extent[2])),
        "pancreas": _ellipsoid(grid, (0.05 * extent[0] + j(4), 0.0 + j(3), -0.1 * extent[2] + j(3)),
                               (0.3 * extent[0], 0.09 * extent[1], 0.1 * extent[2])),
        "bone": _ellipsoid(grid, (0, 0.45 * extent[1], 0), (0.08 * extent[0], 0.08 * extent[1], 10 * extent[2])),
    }
    organs["liver"] &= ~organs["lung"]
    organs["spleen"] &= ~organs["lung"]
    image = np.full(shape, t["air"], np.float32)
    image[body] = t["fat"]
    image[inner] = t["body"]
    for name in ("lung", "liver", "spleen", "kidney", "pancreas", "bone"):
        organs[name] &= inner
        image[organs[name]] = t[name]
    return image, organs


def _body_mr(rng, grid, size_mm, region: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    t = TISSUE["MR"]
    shape = grid[0].shape
    extent = [n / 2 for n in size_mm]
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    image = np.full(shape, t["air"], np.float32)
    if region == "brain":
        head = _ellipsoid(grid, (0, 0, 0), (0.8 * extent[0], 0.9 * extent[1], 0.8 * extent[2]))
        brain = _ellipsoid(grid, (0, 0, 0), (0.7 * extent[0], 0.8 * extent[1], 0.7 * extent[2]))
        ventricles = _ellipsoid(grid, (j(3), j(3), 0.1 * extent[2]), (0.12 * extent[0], 0.25 * extent[1], 0.12 * extent[2]))
        image[head] = t["skull"]
        image[brain] = t["brain"]
        image[brain & ventricles] = t["csf"]
        return image, {"brain": brain & ~ventricles}
    image, organs = _body_ct(rng, grid, size_mm)
    mr = np.full(shape, t["air"], np.float32)
    body = image > -500
    mr[body] = t["body"]
    mr[image == TISSUE["CT"]["fat"]] = t["fat"]
    for name, mask in organs.items():
        mr[mask] = t[name]
    return mr, organs


def _lesion_mask(rng, grid, organ: np.ndarray, category: Category, spacing: float) -> np.ndarray:
    core = ndimage.binary_erosion(organ, iterations=2) if organ.sum() > 500 else organ
    candidates = np.argwhere(core)
    if len(candidates) == 0:
        return np.zeros(organ.shape, bool)
    center_idx = candidates[rng.integers(len(candidates))]
    center = [g[tuple(center_idx)] for g in grid]
    radius = rng.uniform(*category.radius_mm)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center)))
    if category.shape == "sphere":
        mask = dist <= radius
    else:
        rough = 0.25 if category.shape in ("lobulated", "rim") else 0.45
        sigma = 3.0 if category.shape == "lobulated" else 1.5
        field = _smooth_noise(rng, organ.shape, sigma)
        mask = dist <= radius * (1.0 + rough * np.clip(field, -2, 2))
    # keep the lesion mostly inside its organ, as real tumours are
    mask &= ndimage.binary_dilation(organ, iterations=max(int(3 / spacing), 1))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def make_case(rng: np.random.Generator, category: Category | None, shape=(64, 64, 48),
              spacing: float = 3.0, contrast: float = 1.0, return_anatomy: bool = False):
    """One volume, its lesion mask (empty for a healthy case) and its modality.

    `contrast` scales the category's intensity change (training augmentation; 1 for evaluation).
    `return_anatomy` adds a fourth item: {"organs": {name: mask}, "tissue": the noise-free image
    before any lesion (each tissue has its own TISSUE value), "region"} for the training corpus."""
    modality = category.modality if category else ("CT" if rng.random() < 0.6 else "MR")
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * spacing for n in shape], indexing="ij")
    grid_shape = [n * spacing for n in shape]
    region = "brain" if category and category.organ == "brain" else ("brain" if category is None and modality == "MR" and rng.random() < 0.5 else "abdomen")
    if modality == "CT":
        image, organs = _body_ct(rng, grid, grid_shape)
    else:
        image, organs = _body_mr(rng, grid, grid_shape, region)
    label = np.zeros(shape, bool)
    anatomy = {"organs": organs, "tissue": image.copy(), "region": region} if return_anatomy else None
    if category:
        category = replace(category, delta=category.delta * contrast)
        label = _lesion_mask(rng, grid, organs[category.organ], category, spacing)
        if category.shape == "rim":  # enhancing rim, necrotic core
            core = ndimage.binary_erosion(label, iterations=2)
            image[label] += category.delta * TISSUE["MR"]["brain"]
            image[core] -= 1.2 * category.delta * TISSUE["MR"]["brain"]
        elif modality == "MR":
            image[label] += category.delta * TISSUE["MR"][category.organ]
        else:
            image[label] += category.delta
    texture = _smooth_noise(rng, shape, 1.0)
    if modality == "CT":
        image = image + 12.0 * texture + rng.normal(0, 10, shape).astype(np.float32)
        image = np.clip(image, -1024, 3000)
    else:
        bias = 1.0 + 0.15 * _smooth_noise(rng, shape, 12.0)  # MR bias field
        image = (image * bias + 0.03 * texture + rng.normal(0, 0.02, shape)) * 1000.0
        image = np.clip(image, 0, None)
    if return_anatomy:
        return image.astype(np.float32), label.astype(np.uint8), modality, anatomy
    return image.astype(np.float32), label.astype(np.uint8), modality


def write_dataset(out: str | Path, n: int, seed: int = 0, categories: list[str] | None = None,
                  split: str = "test", shape=(64, 64, 48), spacing: float = 3.0,
                  healthy_fraction: float = 0.0, progress=None) -> Path:
    """MSD layout: dataset.json + images<Ts|Tr>/ + labels<Ts|Tr>/ with modality and prompt per case."""
    import nibabel as nib

    names = categories or list(CATEGORIES)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
    if n < 1:
        raise ValueError("--n must be at least 1")
    out = Path(out)
    suffix = "Ts" if split == "test" else "Tr"
    (out / f"images{suffix}").mkdir(parents=True, exist_ok=True)
    (out / f"labels{suffix}").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        healthy = rng.random() < healthy_fraction
        category = None if healthy else CATEGORIES[names[i % len(names)]]
        image, label, modality = make_case(rng, category, shape, spacing)
        affine = np.diag([spacing, spacing, spacing, 1.0])
        affine[:3, 3] = -np.asarray(shape) * spacing / 2
        case = f"case_{i:03d}"
        nib.save(nib.Nifti1Image(image, affine), str(out / f"images{suffix}" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(out / f"labels{suffix}" / f"{case}.nii.gz"))
        entries.append({"image": f"./images{suffix}/{case}.nii.gz", "label": f"./labels{suffix}/{case}.nii.gz",
                        "modality": modality, "prompt": category.prompt if category else "healthy"})
        if progress:
            progress()
    manifest = {
        "name": "diffugts-phantom", "description": f"synthetic lesions, seed {seed}",
        "labels": {"0": "background", "1": "lesion"}, "tensorImageSize": "3D",
        "numTest" if split == "test" else "numTraining": n,
        split: entries,
    }
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return out
