"""Open-vocabulary prompt sets: normal anatomy prompts plus abnormal prompts from the target."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

NORMAL_TEMPLATES = (
    "a {modality} scan of healthy {organ}",
    "normal {organ} tissue on {modality}",
    "a {modality} image of unremarkable {organ} anatomy",
)
ABNORMAL_TEMPLATES = (
    "a {modality} scan showing {target}",
    "{target}",
    "an abnormal lesion in the {organ} on {modality}",
)
LESION_WORDS = (
    "tumor", "tumour", "tumors", "lesion", "lesions", "cancer", "carcinoma", "mass", "masses",
    "nodule", "nodules", "cyst", "cysts", "metastasis", "metastases", "neoplasm", "malignancy",
)
MAX_PROMPT_CHARS = 200
# Organs a target may name, with their plurals and adjectives: the normal prompts describe the
# organ ("healthy brain"), not the finding ("healthy brain abscess" was what the old parse gave).
ORGAN_WORDS = {
    **{organ: organ for organ in (
        "brain", "liver", "kidney", "lung", "pancreas", "spleen", "bone", "breast", "prostate", "colon",
        "rectum", "bladder", "stomach", "thyroid", "adrenal", "gallbladder", "esophagus", "oesophagus",
        "bowel", "heart", "uterus", "ovary", "cervix", "skin", "muscle", "spine", "head", "neck")},
    "kidneys": "kidney", "lungs": "lung", "bones": "bone", "breasts": "breast", "ovaries": "ovary",
    "intracranial": "brain", "cerebral": "brain", "cranial": "brain", "hepatic": "liver",
    "renal": "kidney", "pulmonary": "lung", "pancreatic": "pancreas", "splenic": "spleen",
    "osseous": "bone", "prostatic": "prostate", "colonic": "colon", "rectal": "rectum", "gastric": "stomach",
    "vesical": "bladder", "thyroidal": "thyroid", "esophageal": "esophagus", "oesophageal": "oesophagus",
    "mammary": "breast", "cardiac": "heart", "uterine": "uterus", "ovarian": "ovary", "spinal": "spine",
}


def normalize_target(target: str) -> str:
    if not isinstance(target, str) or not target.strip():
        raise ValueError("the prompt is empty: give an open-vocabulary target such as 'kidney tumor'")
    text = " ".join(target.strip().split())
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    if not re.search(r"[A-Za-z]", text):
        raise ValueError(f"the prompt {target!r} has no words")
    return text


def organ_of(target: str) -> str:
    """The organ the target names: 'kidney tumor' -> 'kidney', 'brain abscess' -> 'brain', 'renal
    mass' -> 'kidney'. A target naming no organ keeps its words other than lesion words ('glioma'
    -> 'glioma', as the shipped weights were trained), or 'tissue' when only lesion words are given."""
    words = re.findall(r"[A-Za-z]+", target.lower())
    organs = [ORGAN_WORDS[w] for w in words if w in ORGAN_WORDS]
    if organs:
        return organs[0]
    return " ".join(w for w in words if w not in LESION_WORDS) or "tissue"


@dataclass(frozen=True)
class PromptSet:
    texts: tuple[str, ...]
    abnormal: tuple[bool, ...]  # True for the prompts whose softmax mass is the anomaly probability

    @property
    def abnormal_mask(self) -> np.ndarray:
        return np.asarray(self.abnormal, dtype=np.float32)


def build_prompt_set(target: str, modality: str = "CT") -> PromptSet:
    target = normalize_target(target)
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    fields = {"modality": modality, "organ": organ_of(target), "target": target.lower()}
    normal = [t.format(**fields) for t in NORMAL_TEMPLATES]
    abnormal = [t.format(**fields) for t in ABNORMAL_TEMPLATES]
    return PromptSet(tuple(normal + abnormal), (False,) * len(normal) + (True,) * len(abnormal))
