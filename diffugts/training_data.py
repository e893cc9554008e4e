"""Training and evaluation cases on the model grid, from three places:

- the real-anatomy corpus (`diffugts corpus`), domain-randomized, with lesions drawn into organs;
- the phantoms (`make_cases`);
- a user's own MSD-layout dataset (`train --dataset DIR`).

Every case is a `Case`: the model-grid image in [0, 1], its lesion label, prompt and modality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .io import Volume, read_volume
from .lesions import KINDS, draw_lesions, plural_prompt
from .phantom import CATEGORIES, make_case
from .preprocess import labels_to_model_grid, scale_intensity, to_model_grid

if TYPE_CHECKING:
    from .augment import Anatomy


# phantom categories the heads train on, and those kept for zero-shot evaluation
SEEN = ("kidney tumor", "liver tumor", "lung nodule", "brain tumor")
UNSEEN = ("liver cyst", "pancreas tumor", "spleen lesion", "liver metastasis")
MODALITY_DRAWS = ("corpus", "balanced")


@dataclass
class Case:
    image: np.ndarray  # model grid, [0, 1]
    label: np.ndarray  # model grid, {0, 1}
    prompt: str
    modality: str


def make_cases(preset, n: int, seed: int, categories=None, healthy_fraction: float = 0.0,
               contrast: tuple[float, float] = (1.0, 1.0)) -> list[Case]:
    """Phantoms on the preset's model grid (the same preprocessing inference applies); lesion
    contrast drawn from `contrast` times the category's own (augmentation)."""
    rng = np.random.default_rng(seed)
    spacing = preset.spacing[0]
    shape = (preset.patch, preset.patch, int(preset.patch * 0.75))
    cases = []
    for i in range(n):
        healthy = categories is None or rng.random() < healthy_fraction
        category = None if healthy else CATEGORIES[categories[i % len(categories)]]
        scale = rng.uniform(*contrast) if contrast != (1.0, 1.0) else 1.0
        image, label, modality = make_case(rng, category, shape, spacing, scale)
        affine = np.diag([spacing] * 3 + [1.0])
        model_image, grid = to_model_grid(Volume(image, affine), modality, preset.spacing, preset.patch)
        model_label, _ = to_model_grid(Volume(label.astype(np.float32) * 1000.0, affine), "CT",
                                       preset.spacing, preset.patch)
        prompt = category.prompt if category else str(rng.choice(SEEN))
        cases.append(Case(model_image, (model_label > 0.75).astype(np.float32), prompt, modality))
    return cases


def anatomy_on_model_grid(corpus_dir: str | Path, preset) -> list[Anatomy]:
    """Every corpus volume brought once onto the preset's grid (RAS, model spacing, MAISI intensity)."""
    # .augment (TorchIO, SimpleITK under it) loads where anatomy is randomized, not on import:
    # a GPU machine training from prepared volumes (`train backbone --from-volumes`) needs neither
    from .augment import Anatomy
    from .corpus import load_corpus

    anatomies = []
    for entry in load_corpus(corpus_dir):
        affine = entry["affine"]
        image, _ = to_model_grid(Volume(entry["image"], affine), entry["modality"], preset.spacing, preset.patch)
        labels = labels_to_model_grid(Volume(entry["labels"], affine), preset.spacing, preset.patch)
        organs = labels_to_model_grid(Volume(entry["organs"], affine), preset.spacing, preset.patch)
        names = {int(k): v for k, v in entry["organ_names"].items()}
        anatomies.append(Anatomy(image, labels, organs.astype(np.uint8), names, entry["modality"], entry["source"]))
    if not anatomies:
        raise ValueError(f"{corpus_dir}: the corpus holds no volumes; build it with `diffugts corpus --out DIR`")
    return anatomies


def _organ_id(anatomy: Anatomy, organ: str) -> int | None:
    return next((i for i, name in anatomy.organ_names.items() if name == organ), None)


def anatomy_cases(anatomies: list[Anatomy], preset, n: int, seed: int, kinds=None, healthy_fraction: float = 0.0,
                  synth_probability: float = 0.5, randomize: bool = True, realistic: bool = False,
                  progress=None, synth_labels: str = "parcels", modalities: str = "corpus",
                  lesions_per_case: int = 1) -> list[Case]:
    """`n` patches of real anatomy, randomized, each with one lesion of `kinds` (round robin) unless
    healthy; with `lesions_per_case` N > 1, 1 to N of them (uniformly), prompted in the plural. Anatomies without the kind's organ are passed over for that case. `realistic`: only
    the scanner effects the modality has (no bias field or gamma on CT), for evaluation.
    `modalities`: "corpus" draws among the usable volumes alike (the corpus's mix: one head CT
    against six brains on MR); "balanced" draws a modality first, then one of its volumes."""
    from .augment import randomize_anatomy, random_crop, scanner_effects

    if modalities not in MODALITY_DRAWS:
        raise ValueError(f"unknown modality draw {modalities!r}: {', '.join(MODALITY_DRAWS)}")
    if lesions_per_case < 1:
        raise ValueError(f"lesions per case must be at least 1, not {lesions_per_case}")
    rng = np.random.default_rng(seed)
    spacing = preset.spacing[0]
    cases = []
    for i in range(n):
        kind = None if kinds is None or rng.random() < healthy_fraction else KINDS[kinds[i % len(kinds)]]
        usable = [a for a in anatomies if kind is None or _organ_id(a, kind.organ) is not None]
        if not usable:
            raise ValueError(f"no corpus volume has the organ {kind.organ!r} that {kind.prompt!r} needs")
        if modalities == "balanced":
            present = sorted({a.modality for a in usable})
            modality = present[int(rng.integers(len(present)))]
            usable = [a for a in usable if a.modality == modality]
        anatomy = usable[int(rng.integers(len(usable)))]
        if randomize:
            anatomy = randomize_anatomy(anatomy, rng, spacing, synth_probability, synth_labels)
        organ = _organ_id(anatomy, kind.organ) if kind else None
        anatomy = random_crop(anatomy, preset.patch, rng, organ_fraction=1.0 if kind else 0.5, organ=organ)
        image, label = anatomy.image, np.zeros(anatomy.image.shape, np.uint8)
        # CT keeps the MAISI window's ceiling (1000 HU); MR has none until it is rescaled below
        top = None if anatomy.modality == "MR" else 1.0
        if kind is not None and (anatomy.organs == organ).sum() >= 8:
            # one lesion draws no count: the random stream of every set before several lesions
            count = 1 if lesions_per_case == 1 else int(rng.integers(1, lesions_per_case + 1))
            image, label = draw_lesions(image, anatomy.organs == organ, kind, spacing, rng, count, top=top)
        if randomize:
            image = scanner_effects(image, rng, spacing, ct=realistic and anatomy.modality == "CT", top=top)
        if anatomy.modality == "MR":  # as inference sees it: MR rescaled to its own 99.5th percentile
            image = scale_intensity(image, "MR")
        prompt = kind.prompt if kind is not None and label.any() else "brain tumor"
        if kind is not None and label.any() and lesions_per_case > 1:
            prompt = plural_prompt(prompt)
        cases.append(Case(image, label.astype(np.float32), prompt, anatomy.modality))
        if progress:
            progress()
    return cases


def write_cases(cases: list[Case], out: str | Path, spacing: float, description: str) -> Path:
    """An MSD test set of model-grid cases, written back in scanner units (CT: HU, MR: x1000) so that
    `diffugts evaluate` preprocesses them as it does any scan."""
    import nibabel as nib

    out = Path(out)
    (out / "imagesTs").mkdir(parents=True, exist_ok=True)
    (out / "labelsTs").mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    entries = []
    for i, case in enumerate(cases):
        scanner = case.image * 2000.0 - 1000.0 if case.modality == "CT" else case.image * 1000.0
        name = f"case_{i:03d}"
        nib.save(nib.Nifti1Image(scanner.astype(np.float32), affine), str(out / "imagesTs" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(case.label.astype(np.uint8), affine), str(out / "labelsTs" / f"{name}.nii.gz"))
        entries.append({"image": f"./imagesTs/{name}.nii.gz", "label": f"./labelsTs/{name}.nii.gz",
                        "modality": case.modality, "prompt": case.prompt})
    manifest = {"name": "diffugts-anatomy-lesions", "description": description, "tensorImageSize": "3D",
                "labels": {"0": "background", "1": "lesion"}, "numTest": len(entries), "test": entries}
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return out


def dataset_cases(dataset_dir: str | Path, preset, need_labels: bool, rng: np.random.Generator,
                  prompt: str | None = None) -> list[Case]:
    """A user's MSD dataset (`training` entries: image, optional label, modality, prompt; `prompt`
    for entries without one) as model-grid patches; a volume larger than the patch gives the patch
    around its lesion (or its centre)."""
    from .augment import Anatomy, random_crop
    from .evaluate import load_manifest
    from .label_classes import lesion_mask

    root = Path(dataset_dir)
    entries = load_manifest(root, "training", prompt) if need_labels else _image_entries(root)
    cases = []
    for entry in entries:
        volume = read_volume(root / entry["image"], channel=entry.get("channel"))
        modality = entry.get("modality") or _guess(volume)
        image, _ = to_model_grid(volume, modality, preset.spacing, preset.patch)
        label = np.zeros(image.shape, np.int16)
        if entry.get("label"):
            label = labels_to_model_grid(read_volume(root / entry["label"]), preset.spacing, preset.patch)
            if label.shape != image.shape:
                raise ValueError(f"{entry['label']}: label grid {label.shape} does not match its image {image.shape}")
            label = lesion_mask(label, entry.get("lesion_values")).astype(np.int16)  # the organ class is not the lesion
        anatomy = Anatomy(image, label, (label > 0).astype(np.uint8), {1: "lesion"}, modality)
        anatomy = random_crop(anatomy, preset.patch, rng, organ_fraction=1.0)
        cases.append(Case(anatomy.image, (anatomy.labels > 0).astype(np.float32), entry.get("prompt", "tumor"),
                          modality))
    return cases


def _image_entries(root: Path) -> list[dict]:
    manifest = root / "dataset.json"
    if not manifest.exists():
        raise ValueError(f"{root}: no dataset.json (Medical Segmentation Decathlon layout expected)")
    data = json.loads(manifest.read_text())
    entries = [e if isinstance(e, dict) else {"image": e} for e in data.get("training", []) + data.get("test", [])]
    if not entries:
        raise ValueError(f"{manifest}: no `training` or `test` entries")
    return entries


def _guess(volume: Volume) -> str:
    from .preprocess import guess_modality

    return guess_modality(volume.array)


MIN_EXTENT_MM = 60.0  # thinner along any axis is a patch, not a scan (pydicom-data's 12 mm brain; the body slabs: 60, 90)


def _extent_mm(mask: np.ndarray, spacing: float) -> np.ndarray:
    nonzero = np.argwhere(mask)
    return (nonzero.max(0) - nonzero.min(0) + 1) * spacing if len(nonzero) else np.zeros(3)


def write_anatomy_lesions(corpus_dir, out, preset, n: int, seed: int, kinds, progress=None,
                          lesions_per_case: int = 1) -> Path:
    """A deterministic evaluation set: real anatomy with scanner-like randomization (no synthesized
    contrasts: evaluation images look like scans) and one lesion of `kinds` each (1 to
    `lesions_per_case`, prompted in the plural, when that is above 1)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown lesion kinds {unknown}; known: {', '.join(KINDS)}")
    if n < 1:
        raise ValueError("--n must be at least 1")
    if lesions_per_case < 1:
        raise ValueError(f"--lesions-per-case must be at least 1, not {lesions_per_case}")
    # the phantoms in a corpus are for training, and so are patches (pydicom-data's 12 mm brain):
    # this set is real anatomy only
    anatomies = [a for a in anatomy_on_model_grid(corpus_dir, preset)
                 if a.source != "phantom" and _extent_mm(a.labels > 0, preset.spacing[0]).min() >= MIN_EXTENT_MM]
    cases = anatomy_cases(anatomies, preset, n, seed, list(kinds), synth_probability=0.0, realistic=True,
                          progress=progress, lesions_per_case=lesions_per_case)
    several = f", 1 to {lesions_per_case} lesions a case" if lesions_per_case > 1 else ""
    return write_cases(cases, out, preset.spacing[0], f"real anatomy, lesion kinds {', '.join(kinds)}{several}, seed {seed}")
