"""Plain-language notes on a run that the mask alone does not show (`Segmentation.notices`).

A notice that asks the reader to doubt the mask starts with `CAUTION`; the rest say what the loop
did (restricted the maps, dropped components). The organ restriction and the component rules
write their own (`organ_regions.restriction_notice`, `component_rules.ComponentRule.notices`)."""

from __future__ import annotations

# the DICOM receiver logs these as warnings and the rest as information; the prefix survives the
# wire, where notices travel as plain strings
CAUTION = "caution: "


def is_caution(notice: str) -> bool:
    return notice.startswith(CAUTION)


def loop_notices(target: str, flagged_shares: list[float], max_fraction: float) -> tuple[str, ...]:
    """Windows where the map flagged too much to inpaint (`Preset.inpaint_max_fraction`).
    A prompt the model was not trained on can lift the map over the whole scan (model card, "A map
    that flags everything"); the mask there rests on the scan alone."""
    gated = [s for s in flagged_shares if s > max_fraction]
    if not gated:
        return ()
    return (f"{CAUTION}the anomaly map for {target!r} flagged more than {max_fraction:.0%} of {len(gated)} of "
            f"{len(flagged_shares)} windows (up to {max(gated):.0%}), so nothing was inpainted there "
            "and the head read the scan alone: a prompt unlike the trained ones can raise the map over "
            "the whole scan; read this mask with care",)


def empty_mask_notice(target: str, peak: float, threshold: float, min_component_mm3: float) -> tuple[str, ...]:
    """Why a mask came back empty: nothing reached the threshold, or all that did was dropped
    (too small, air on CT, mostly outside the organ). Either way it is not proof of health."""
    why = (f"nothing reached the threshold {threshold:g} (highest {peak:.2f})" if peak <= threshold else
           f"what reached the threshold {threshold:g} was dropped (under {min_component_mm3:g} mm^3, air "
           "on CT, or mostly outside the organ)")
    return (f"{CAUTION}the mask for {target!r} is empty: {why}; an empty mask is not proof that no lesion is there",)
