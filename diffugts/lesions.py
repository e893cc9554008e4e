"""Lesions drawn into real anatomy on the model grid (intensities in [0, 1]).

A lesion kind is plain data: size, shape irregularity, polarity and contrast against its organ,
and the parts real tumours show: a necrotic core, an enhancing rim, an oedema halo, mass effect
(the organ pushed aside), and its own texture. Kinds are split into seen (training) and unseen
(evaluation only) by kind and organ; the unseen ones also use generator settings (sizes,
contrasts, rim/halo combinations) that no seen kind uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class LesionKind:
    prompt: str
    organ: str
    diameter_mm: tuple[float, float]  # 5-60 mm overall
    contrast: tuple[float, float]  # |solid part - organ| in model units ([0, 1] of the MAISI scaling)
    polarity: tuple[int, ...] = (-1, 1)  # allowed signs of the solid part's contrast
    irregularity: float = 0.3  # radial modulation of the boundary by smooth noise
    necrotic_core: float = 0.0  # probability of a dark fluid core
    rim: float = 0.0  # probability of an enhancing rim
    oedema: float = 0.0  # probability of a halo (not part of the label)
    mass_effect_mm: tuple[float, float] = (0.0, 0.0)
    texture: float = 0.2  # std of the lesion's own texture, relative to its contrast


KINDS: dict[str, LesionKind] = {k.prompt: k for k in (
    # seen on real anatomy: primary brain tumours and cysts, both polarities, 10-60 mm
    LesionKind("brain tumor", "brain", (14, 60), (0.06, 0.3), irregularity=0.45, necrotic_core=0.5, rim=0.5,
               oedema=0.6, mass_effect_mm=(1, 5), texture=0.35),
    LesionKind("glioma", "brain", (12, 50), (0.04, 0.2), irregularity=0.6, oedema=0.4, mass_effect_mm=(0, 3),
               texture=0.4),
    LesionKind("brain cyst", "brain", (8, 30), (0.08, 0.35), polarity=(-1,), irregularity=0.05, texture=0.05),
    # seen since 2026-12-01: the one bright lesion of homogeneous look (hyperdense on CT, enhancing on
    # MR), which no kind above has (their bright variants are textured); not in SEEN_KINDS, whose
    # cases the calibration and the shipped heads' recipes draw round robin
    LesionKind("meningioma", "brain", (15, 50), (0.15, 0.4), polarity=(1,), irregularity=0.05,
               mass_effect_mm=(1, 4), texture=0.05),
    # unseen: other kinds in the brain, with settings no seen kind has
    LesionKind("brain metastasis", "brain", (8, 26), (0.1, 0.35), polarity=(1,), irregularity=0.15, rim=0.35,
               oedema=0.8, mass_effect_mm=(0, 2), texture=0.15),
    LesionKind("intracranial hemorrhage", "brain", (10, 45), (0.03, 0.12), polarity=(1,), irregularity=0.35,
               mass_effect_mm=(2, 6), texture=0.1),
    LesionKind("brain abscess", "brain", (10, 35), (0.1, 0.3), polarity=(-1,), irregularity=0.1, necrotic_core=1.0,
               rim=1.0, oedema=0.9, mass_effect_mm=(1, 3), texture=0.1),
    # seen in real body anatomy (the corpus's TotalSegmentator CT and MR): the phantoms' seen
    # categories, drawn into real organs
    LesionKind("kidney tumor", "kidney", (15, 60), (0.03, 0.2), irregularity=0.3, necrotic_core=0.3,
               mass_effect_mm=(0, 3), texture=0.3),
    LesionKind("liver tumor", "liver", (10, 60), (0.03, 0.2), irregularity=0.4, necrotic_core=0.3, rim=0.3,
               mass_effect_mm=(0, 2), texture=0.3),
    LesionKind("lung nodule", "lung", (5, 30), (0.15, 0.45), polarity=(1,), irregularity=0.35, texture=0.15),
    # unseen in real body anatomy: the phantoms' unseen categories, with settings no seen kind has
    LesionKind("pancreas tumor", "pancreas", (8, 30), (0.02, 0.08), polarity=(-1,), irregularity=0.5,
               mass_effect_mm=(0, 1), texture=0.2),
    LesionKind("spleen lesion", "spleen", (8, 35), (0.05, 0.25), polarity=(-1,), irregularity=0.1, texture=0.05),
    LesionKind("liver metastasis", "liver", (6, 25), (0.08, 0.3), polarity=(1,), irregularity=0.15, rim=0.7,
               texture=0.15),
)}
SEEN_KINDS = ("brain tumor", "glioma", "brain cyst")
LATER_SEEN_KINDS = ("meningioma",)  # trainable (`train heads --anatomy-kinds`), never a default
UNSEEN_KINDS = ("brain metastasis", "intracranial hemorrhage", "brain abscess")
BODY_SEEN_KINDS = ("kidney tumor", "liver tumor", "lung nodule")
BODY_UNSEEN_KINDS = ("pancreas tumor", "spleen lesion", "liver metastasis")


# the plural a user types for a set of several lesions of a kind ("liver tumors"); a metastasis is
# already read as several (`component_rules.names_several_lesions`)
IRREGULAR_PLURALS = {"metastasis": "metastases", "abscess": "abscesses", "mass": "masses"}
SEPARATION_MM = 5.0  # tissue kept between two lesions of one case, so each stays a lesion of its own


def plural_prompt(prompt: str) -> str:
    """'liver tumor' -> 'liver tumors', 'liver metastasis' -> 'liver metastases'."""
    *head, last = prompt.split()
    return " ".join(head + [IRREGULAR_PLURALS.get(last, last if last.endswith("s") else last + "s")])


def draw_lesions(image: np.ndarray, organ: np.ndarray, kind: LesionKind, spacing: float, rng: np.random.Generator,
                 count: int, top: float | None = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`count` lesions of `kind` inside `organ`, apart from each other by `SEPARATION_MM` (as many as
    fit): the new image and their joint label. Each later lesion's mass effect moves the earlier labels."""
    label = np.zeros(image.shape, np.uint8)
    for _ in range(count):
        # a lesion may reach 2 voxels past its organ (`draw_lesion`): the gap is kept beyond that
        apart = SEPARATION_MM + 2 * spacing
        room = organ & ~(ndimage.distance_transform_edt(label == 0) * spacing <= apart) if label.any() else organ
        if room.sum() < 8:
            break
        image, lesion, moved = draw_lesion(image, room, kind, spacing, rng, extra=[label], top=top)
        label = np.maximum(moved[0], lesion)
    return image, label


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _mass_effect(arrays: list[np.ndarray], orders: list[int], centre, radius: float, push: float):
    """Push tissue away from `centre`: each voxel samples from closer to the centre, most at the
    lesion's edge and fading over two radii beyond it (a local, smooth deformation)."""
    grid = np.indices(arrays[0].shape, dtype=np.float32)
    offset = grid - np.asarray(centre, np.float32).reshape(3, 1, 1, 1)
    dist = np.sqrt((offset**2).sum(0)) + 1e-3
    falloff = np.clip(dist / radius, 0, 1) * np.exp(-np.clip(dist - radius, 0, None) / (2 * radius))
    source = grid - push * falloff * offset / dist
    return [ndimage.map_coordinates(a, source, order=o, mode="nearest").astype(a.dtype) for a, o in zip(arrays, orders)]


def draw_lesion(image: np.ndarray, organ: np.ndarray, kind: LesionKind, spacing: float,
                rng: np.random.Generator, extra: list[np.ndarray] = (),
                top: float | None = 1.0) -> tuple[np.ndarray, np.ndarray, list]:
    """Draw one lesion of `kind` inside `organ` (bool). Returns the new image, the lesion label,
    and `extra` maps (label / organ maps) moved by the same mass effect. The image is clipped to
    [0, top]; `top=None` leaves a bright lesion over 1 (MR, rescaled by the caller)."""
    if not organ.any():
        raise ValueError(f"no room for a {kind.prompt!r}: the organ {kind.organ!r} is empty in this volume")
    radius = rng.uniform(*kind.diameter_mm) / 2 / spacing  # voxels
    depth = ndimage.distance_transform_edt(organ)
    # the centre lies at least ~0.6 radii inside the organ (where the organ is that thick)
    candidates = np.argwhere(depth >= min(0.6 * radius + 1, depth.max()))
    centre = candidates[rng.integers(len(candidates))]
    axes = rng.uniform(0.75, 1.3, 3)
    grid = np.indices(image.shape, dtype=np.float32)
    dist = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)))
    push = rng.uniform(*kind.mass_effect_mm) / spacing
    extra = list(extra)
    if push > 0.2:
        image, organ_f, *extra = _mass_effect([image, organ.astype(np.float32)] + extra,
                                              [1, 0] + [0] * len(extra), centre, radius, push)
        organ = organ_f > 0.5
    boundary = radius * (1 + kind.irregularity * np.clip(_smooth_noise(rng, image.shape, max(radius / 2, 1.0)),
                                                          -1.5, 1.5))
    lesion = dist <= np.maximum(boundary, 0.6)
    lesion &= ndimage.binary_dilation(organ, iterations=2)  # mostly inside its organ
    labels, n = ndimage.label(lesion)
    if n == 0:
        lesion[tuple(centre)] = True
    elif n > 1:
        lesion = labels == 1 + int(np.argmax(ndimage.sum(lesion, labels, range(1, n + 1))))

    organ_level = float(np.median(image[organ])) if organ.any() else float(image[lesion].mean())
    sign = float(rng.choice(kind.polarity))
    contrast = rng.uniform(*kind.contrast)
    texture = kind.texture * contrast * _smooth_noise(rng, image.shape, 1.0)
    target = np.full(image.shape, organ_level + sign * contrast, np.float32) + texture
    if rng.random() < kind.rim:  # enhancing rim: brighter than the solid part
        shell = lesion & ~ndimage.binary_erosion(lesion, iterations=1)
        target[shell] = organ_level + rng.uniform(1.0, 2.0) * contrast
    if rng.random() < kind.necrotic_core:  # fluid core: dark
        core = ndimage.binary_erosion(lesion, iterations=max(1, int(radius * 0.35)))
        target[core] = organ_level - rng.uniform(0.8, 1.6) * contrast + 0.3 * texture[core]
    out = image.copy()
    if rng.random() < kind.oedema:  # halo: a milder, fading change around the lesion, not labelled
        reach = radius * rng.uniform(0.4, 1.0) + 1
        outside = ndimage.distance_transform_edt(~lesion)
        fade = np.clip(1 - outside / reach, 0, 1) * (1 + 0.3 * _smooth_noise(rng, image.shape, 2.0))
        fade = np.clip(fade, 0, 1) * organ * ~lesion
        out += float(rng.choice([-1, 1])) * rng.uniform(0.2, 0.5) * contrast * fade.astype(np.float32)
    # partial volume at the edge: a softened mask blends the lesion into its surroundings
    weight = np.clip(ndimage.gaussian_filter(lesion.astype(np.float32), 0.6) * 1.5, 0, 1)
    out = (1 - weight) * out + weight * target
    return np.clip(out, 0, top).astype(np.float32), lesion.astype(np.uint8), extra
