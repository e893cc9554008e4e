"""Which components of its thresholded map a target's mask keeps, read from the target's words.

- One lesion, one component: ZePT keeps the top-k components per tumour inside its organ. A
  target that names one lesion keeps the preset's top-k (`organ_top_k` where the maps were
  restricted to its organ, `top_k_components` elsewhere); one that names several (a plural,
  metastases, "multiple") keeps every component.
- No tumour is aerated lung or air: on CT a component whose median in the scan is below the
  preset's `min_component_hu` (demo: -700 HU, the upper end of aerated lung) is dropped, unless the
  target names an air-containing finding (a cyst, a cavity, emphysema, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import Preset
from .postprocess import ComponentCounts

SEVERAL_WORDS = frozenset({
    "multiple", "multifocal", "multicentric", "several", "bilateral", "tumors", "tumours", "lesions",
    "masses", "nodules", "cysts", "abscesses", "hemorrhages", "haemorrhages", "bleeds", "gliomas",
    "meningiomas", "carcinomas", "polyps", "foci",
})
AIR_WORDS = frozenset({
    "cyst", "cysts", "cystic", "cavity", "cavities", "cavitary", "cavitating", "bulla", "bullae", "bleb",
    "blebs", "emphysema", "pneumothorax", "pneumatocele", "pneumatosis", "air", "gas",
})


def _words(target: str) -> list[str]:
    return re.findall(r"[a-z]+", target.lower())


def names_several_lesions(target: str) -> bool:
    return any(w in SEVERAL_WORDS or w.startswith("metasta") for w in _words(target))


def names_air_finding(target: str) -> bool:
    return any(w in AIR_WORDS for w in _words(target))


def top_k_for(target: str, top_k: int) -> int:
    """The preset's top-k for a target that names one lesion; 0 (keep all) for one that names several."""
    return 0 if names_several_lesions(target) else top_k


@dataclass(frozen=True)
class ComponentRule:
    top_k: int = 0  # keep the largest k (0: all)
    min_median: float | None = None  # drop a component whose median in the scan is below this (None: none)

    def notices(self, counts: ComponentCounts) -> tuple[str, ...]:
        """What a reader of the mask should know about the components it dropped."""
        out = ()
        if self.min_median is not None and counts.too_light:
            out += (f"dropped {counts.too_light} component(s) of aerated lung or air (median below "
                    f"{self.min_median:g} HU): no tumour is that light; a target naming a cyst, cavity or air "
                    "keeps them",)
        if 0 < self.top_k < counts.found:
            kept = "the largest component" if self.top_k == 1 else f"the {self.top_k} largest components"
            out += (f"kept {kept} of {counts.found} found (one lesion per target); name the target in the "
                    "plural ('kidney tumours') or as metastases to keep them all",)
        return out


def component_rule(target: str, modality: str, preset: Preset, restricted: bool) -> ComponentRule:
    """The rule for a target (abbreviations spelt out), the scan's modality, and whether the maps
    were restricted to the target's organ."""
    top_k = top_k_for(target, (preset.organ_top_k if restricted else 0) or preset.top_k_components)
    light = preset.min_component_hu if modality == "CT" and not names_air_finding(target) else None
    return ComponentRule(top_k, light)
