"""Which values of a label map are the lesion the prompt asks for.

Medical Segmentation Decathlon label maps often hold the organ beside the lesion (Task03 Liver:
1 liver, 2 cancer; Task07 Pancreas and Task08 Hepatic Vessel alike; KiTS: kidney, tumor, cyst;
Task01 Brain: edema, non-enhancing and enhancing tumour). A Dice against every non-zero voxel would
score a tumour mask against the whole liver. So the truth is the classes that `dataset.json`'s
`labels` names as findings: those that share a finding word with the prompt, else all of them but
an oedema halo ("renal mass" on KiTS: tumour and cyst; "glioma" on Task01: the tumour core). An entry's own `"label_values": [2]` overrides. Without
`labels`, or where no class names a finding, every non-zero voxel is the lesion, as before."""

from __future__ import annotations

import re

import numpy as np

from .prompts import spelt_out

# a finding, not an organ; each spelling and plural read as one word
FINDING_WORDS = {
    "tumor": "tumor", "tumour": "tumor", "tumors": "tumor", "tumours": "tumor",
    "cancer": "cancer", "cancers": "cancer", "carcinoma": "carcinoma", "carcinomas": "carcinoma",
    "adenocarcinoma": "carcinoma", "neoplasm": "neoplasm", "neoplasms": "neoplasm", "malignancy": "malignancy",
    "lesion": "lesion", "lesions": "lesion", "mass": "mass", "masses": "mass", "nodule": "nodule",
    "nodules": "nodule", "cyst": "cyst", "cysts": "cyst", "metastasis": "metastasis", "metastases": "metastasis",
    "metastatic": "metastasis", "edema": "edema", "oedema": "edema", "hemorrhage": "hemorrhage",
    "haemorrhage": "hemorrhage", "hematoma": "hemorrhage", "haematoma": "hemorrhage", "bleed": "hemorrhage",
    "abscess": "abscess", "necrosis": "necrosis", "necrotic": "necrosis", "infarct": "infarct", "polyp": "polyp",
    "polyps": "polyp",
}

HALO_WORDS = frozenset({"edema"})


def findings(text: str) -> set[str]:
    """The finding words of a class name or a prompt (abbreviations spelt out), one form each."""
    return {FINDING_WORDS[w] for w in re.findall(r"[a-z]+", spelt_out(text).lower()) if w in FINDING_WORDS}


def lesion_values(class_names, target: str, override=None) -> tuple[int, ...] | None:
    """The label values that are the target's lesion; None: every non-zero value.
    `class_names`: `dataset.json`'s `labels` ({"0": "background", "1": "liver", "2": "cancer"});
    `override`: an entry's `label_values`. Raises ValueError on a malformed one."""
    if override is not None:
        if (not isinstance(override, list) or not override
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in override)):
            raise ValueError(f"'label_values' must be a list of positive integers, not {override!r}")
        return tuple(sorted(set(override)))
    if class_names is None:
        return None
    if not isinstance(class_names, dict):
        raise ValueError(f"'labels' must map label values to names, not {type(class_names).__name__}")
    named = {}
    for value, name in class_names.items():
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"'labels' has a key {value!r} that is not an integer") from None
        words = findings(str(name))
        if number > 0 and words:
            named[number] = words
    if not named:
        return None
    asked = findings(target)
    matched = [v for v, words in named.items() if words & asked]
    # a halo around a tumour is not the tumour (our generator's labels leave it out too): only asked for
    lesions = [v for v, words in named.items() if words - HALO_WORDS]
    return tuple(sorted(matched or lesions or named))


def lesion_mask(label: np.ndarray, values: tuple[int, ...] | None) -> np.ndarray:
    """The truth: the voxels of `values` (every non-zero one when None)."""
    return label > 0 if values is None else np.isin(np.rint(label), values)
