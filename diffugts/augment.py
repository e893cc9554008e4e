"""Domain randomization of real anatomy on the model grid, composed from TorchIO's transforms.

spatial:   affine and elastic, applied alike to the image, its label map and its organ map
contrast:  SynthSeg-style, an image synthesized from the label map with a random intensity per label
intensity: bias field, gamma, noise, blur, anisotropic resolution, motion

All images are in the model's [0, 1] intensity range (MAISI scaling already applied). TorchIO draws
from torch's generator; `randomize` seeds a forked one from the caller's numpy generator, so a
draw is reproducible and leaves the training's own torch generator alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torchio as tio


@dataclass
class Anatomy:
    """One volume on the model grid: image in [0, 1], integer label map, organ map (0 = none)."""

    image: np.ndarray
    labels: np.ndarray
    organs: np.ndarray
    organ_names: dict[int, str]
    modality: str
    source: str = ""


def spatial(degrees: float = 10.0, scales: float = 0.12, displacement_mm: float = 9.0) -> tio.Compose:
    # MAISI-sized anatomy moves by a few mm and degrees between patients and scanners
    return tio.Compose([
        tio.RandomAffine(scales=scales, degrees=degrees, translation=6, default_pad_value=0.0, p=0.9),
        tio.RandomElasticDeformation(num_control_points=6, max_displacement=displacement_mm, p=0.6),
    ])


def synthesized_contrast(count: int) -> tio.Transform:
    """SynthSeg: a random mean and spread per label of a map holding labels 0..count-1; air (0)
    stays dark, as both CT and MR show it."""
    means = [(0.0, 0.06)] + [(0.05, 0.95)] * (count - 1)
    stds = [(0.0, 0.01)] + [(0.005, 0.05)] * (count - 1)
    return tio.RandomLabelsToImage(label_key="consecutive", used_labels=list(range(count)), mean=means, std=stds,
                                   image_key="image")


def _with_synthesized_contrast(subject: tio.Subject, labels: str = "parcels") -> tio.Subject:
    label_map = subject["labels"].data.numpy()
    if labels == "tissue":
        from .corpus import tissue_classes

        label_map = tissue_classes(label_map)
    # TorchIO indexes its ranges by label value: atlas ids (up to ~450) are renumbered 0..n-1 first
    values, consecutive = np.unique(label_map, return_inverse=True)
    subject.add_image(tio.LabelMap(tensor=torch.from_numpy(consecutive.reshape(subject["labels"].shape).astype(np.int16)),
                                   affine=subject["labels"].affine), "consecutive")
    subject = synthesized_contrast(len(values))(subject)
    subject.remove_image("consecutive")
    return subject


def intensity(ct: bool = False) -> tio.Compose:
    """Scanner effects, each with its own probability. Training applies all of them to every
    image (domain randomization); `ct=True` leaves out what a CT scanner does not do (a bias
    field, a gamma curve on HU), for evaluation images that should look like real CT."""
    contrast = [] if ct else [tio.RandomBiasField(coefficients=0.35, p=0.5),
                              tio.RandomGamma(log_gamma=(-0.35, 0.35), p=0.5)]
    return tio.Compose(contrast + [
        tio.RandomAnisotropy(downsampling=(1.5, 3.0), p=0.2),
        tio.RandomMotion(degrees=4, translation=4, num_transforms=2, p=0.15),
        tio.RandomBlur(std=(0.0, 1.5), p=0.3),
        tio.RandomNoise(std=(0.0, 0.005 if ct else 0.025), p=0.6),  # CT: up to ~10 HU, as scanners show
    ])


def _subject(anatomy: Anatomy, spacing: float) -> tio.Subject:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(anatomy.image[None].astype(np.float32)), affine=affine),
        labels=tio.LabelMap(tensor=torch.from_numpy(anatomy.labels[None].astype(np.int16)), affine=affine),
        organs=tio.LabelMap(tensor=torch.from_numpy(anatomy.organs[None].astype(np.int16)), affine=affine),
    )


@contextmanager
def _seeded(rng: np.random.Generator):
    with torch.random.fork_rng():
        torch.manual_seed(int(rng.integers(2**31)))
        yield


SYNTH_LABELS = ("parcels", "tissue")


def randomize_anatomy(anatomy: Anatomy, rng: np.random.Generator, spacing: float,
                      synth_probability: float = 0.5, synth_labels: str = "parcels") -> Anatomy:
    """Spatial deformation, then (with `synth_probability`) a SynthSeg contrast in place of the image.

    `synth_labels`: "parcels" gives every atlas region its own intensity (a patchwork of ~100
    regions a brain, many of a small lesion's size); "tissue" one intensity per tissue class (grey
    and white matter, CSF, bone, ...), the contrasts of other sequences without the patchwork."""
    if synth_labels not in SYNTH_LABELS:
        raise ValueError(f"unknown synth labels {synth_labels!r}: {', '.join(SYNTH_LABELS)}")
    synth = rng.random() < synth_probability
    with _seeded(rng):
        subject = spatial()(_subject(anatomy, spacing))
        if synth:
            subject = _with_synthesized_contrast(subject, synth_labels)
    return replace(anatomy, image=np.clip(subject["image"].data[0].numpy(), 0, 1).astype(np.float32),
                   labels=subject["labels"].data[0].numpy().astype(np.int16),
                   organs=subject["organs"].data[0].numpy().astype(np.uint8))


def scanner_effects(image: np.ndarray, rng: np.random.Generator, spacing: float, ct: bool = False,
                    top: float | None = 1.0) -> np.ndarray:
    """The intensity half: applied after a lesion is drawn, so the lesion carries the same artefacts.

    `top=None` for MR: a bias field lifts a bright brain over 1, and clipping it there would flatten
    it (and any lesion in it) to one value; an MR scanner's intensities have no ceiling, and the
    caller rescales MR to its 99.5th percentile next, as inference does."""
    tensor = tio.ScalarImage(tensor=torch.from_numpy(image[None].astype(np.float32)),
                             affine=np.diag([spacing, spacing, spacing, 1.0]))
    with _seeded(rng):
        out = intensity(ct)(tensor).data[0].numpy()
    return np.clip(out, 0.0, top).astype(np.float32)


def random_crop(anatomy: Anatomy, size: int, rng: np.random.Generator, organ_fraction: float = 0.8,
                organ: int | None = None) -> Anatomy:
    """A `size`^3 cube, centred near an organ voxel with probability `organ_fraction` (lesions go there);
    with `organ`, a voxel of that organ (a body holds several, and the cube may miss the one wanted)."""
    shape = np.array(anatomy.image.shape)
    pad = [(0, max(0, size - n)) for n in shape]
    if any(p for _, p in pad):
        anatomy = replace(anatomy, image=np.pad(anatomy.image, pad), labels=np.pad(anatomy.labels, pad),
                          organs=np.pad(anatomy.organs, pad))
        shape = np.array(anatomy.image.shape)
    inside = np.argwhere(anatomy.organs == organ if organ else anatomy.organs > 0)
    if len(inside) and rng.random() < organ_fraction:
        centre = inside[rng.integers(len(inside))] + rng.integers(-size // 6, size // 6 + 1, 3)
    else:
        centre = np.array([rng.integers(0, n) for n in shape])
    start = [int(np.clip(c - size // 2, 0, n - size)) for c, n in zip(centre, shape)]
    box = tuple(slice(s, s + size) for s in start)
    return replace(anatomy, image=anatomy.image[box], labels=anatomy.labels[box], organs=anatomy.organs[box])
