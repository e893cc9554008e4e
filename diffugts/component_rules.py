"""Which components of its thresholded map a target's mask keeps, read from the target's words.

- One lesion, one component: ZePT keeps the top-k components per tumour inside its organ. A
  target that names one lesion keeps the preset's top-k (`organ_top_k`, the largest, where the
  maps were restricted to its organ; `top_k_components` elsewhere, ranked by `top_k_rank`: in an
  unrestricted abdomen the largest component is most often a false positive, the most probable
  one less often); one that names several (a plural, metastases, "multiple") keeps every component,
  or outside a restricted organ those whose mean probability is near the most probable one's
  (`several_near_best`): there most components are false positives of lower probability.
- No tumour is aerated lung or air: on CT a component whose median in the scan is below the
  preset's `min_component_hu` (demo: -700 HU, the upper end of aerated lung) is dropped, unless the
  target names an air-containing finding (a cavity, emphysema, ground glass, a cyst in the lungs, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import Preset, check_rank
from .organ_regions import target_organ
from .postprocess import ComponentCounts

SEVERAL_WORDS = frozenset({
    "multiple", "multifocal", "multicentric", "several", "bilateral", "both", "numerous", "innumerable",
    "scattered", "diffuse", "disseminated", "tumors", "tumours", "lesions", "masses", "nodules", "cysts",
    "abscesses", "hemorrhages", "haemorrhages", "hematomas", "haematomas", "bleeds", "microbleeds",
    "infarcts", "emboli", "opacities", "plaques", "cancers", "neoplasms", "gliomas", "meningiomas",
    "lymphomas", "carcinomas", "polyps", "foci",
})
ONE_WORDS = frozenset({"solitary", "single", "one"})  # "solitary brain metastasis"
# air-containing findings: on CT their components may well be lighter than aerated lung
AIR_WORDS = frozenset({
    "cavity", "cavities", "cavitary", "cavitating", "cavitation", "cavitated", "bulla", "bullae", "bullous",
    "bleb", "blebs", "emphysema", "emphysematous", "pneumothorax", "pneumothoraces", "pneumatocele",
    "pneumatoceles", "pneumatosis", "pneumoperitoneum", "pneumomediastinum", "air", "gas", "glass",
    "subsolid", "ggo", "ggn",  # ground glass: lighter than soft tissue, near aerated lung
})
CYST_WORDS = frozenset({"cyst", "cysts", "cystic"})  # air in the lungs; fluid (far above the floor) elsewhere


def _words(target: str) -> list[str]:
    return re.findall(r"[a-z]+", target.lower())


def names_several_lesions(target: str) -> bool:
    words = _words(target)
    return not ONE_WORDS & set(words) and any(w in SEVERAL_WORDS or w.startswith("metasta") for w in words)


def names_air_finding(target: str) -> bool:
    words = set(_words(target))
    return bool(words & AIR_WORDS) or bool(words & CYST_WORDS) and target_organ(target) == "lung"


@dataclass(frozen=True)
class ComponentRule:
    top_k: int = 0  # keep the k first by `rank` (0: all)
    min_median: float | None = None  # drop a component whose median in the scan is below this (None: none)
    target: str = "the target"  # for the notices
    rank: str = "size"  # or "mean probability" (`config.RANKS`)
    near_best: float = 0.0  # keep those whose mean probability is at least this share of the best one's

    def __post_init__(self):
        check_rank(self.rank)

    def notices(self, counts: ComponentCounts) -> tuple[str, ...]:
        """What a reader of the mask should know about the components it dropped."""
        out = ()
        if self.min_median is not None and counts.too_light:
            out += (f"dropped {counts.too_light} component(s) of aerated lung or air (median below "
                    f"{self.min_median:g} HU): a tumour rarely is that light; a target naming a cavity, "
                    "ground glass or air keeps them",)
        if 0 < self.top_k < counts.found:
            first = {"size": "largest", "mean probability": "most probable"}[self.rank]
            kept = f"the {first} component" if self.top_k == 1 else f"the {self.top_k} {first} components"
            out += (f"kept {kept} of {counts.found} found (one lesion per target); ask for 'multiple "
                    f"{self.target}' or --all-components to keep them all",)
        if self.near_best > 0 and counts.kept < counts.found:
            out += (f"kept {counts.kept} of {counts.found} components found: those whose mean probability is at "
                    f"least {self.near_best:.0%} of the most probable one's; --all-components keeps them all",)
        return out


def component_rule(target: str, modality: str, preset: Preset, restricted: bool,
                   keep_all: bool = False) -> ComponentRule:
    """The rule for a target (abbreviations spelt out), the scan's modality, and whether the maps
    were restricted to the target's organ; `keep_all` (the loop's `all_components`) keeps every
    component past the floors."""
    in_organ = restricted and preset.organ_top_k > 0
    several = names_several_lesions(target)
    top_k = 0 if keep_all or several else preset.organ_top_k if in_organ else preset.top_k_components
    light = preset.min_component_hu if modality == "CT" and not names_air_finding(target) else None
    near_best = preset.several_near_best if several and not restricted and not keep_all else 0.0
    return ComponentRule(top_k, light, target, "size" if in_organ else preset.top_k_rank, near_best)
