"""Presets as plain data: network sizes and loop settings, nothing that needs torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

RANKS = ("size", "mean probability")  # how a top-k orders the components (`postprocess.kept_components`)


def check_rank(rank: str) -> str:
    if rank not in RANKS:
        raise ValueError(f"component rank {rank!r} is not one of {', '.join(RANKS)}")
    return rank

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Preset:
    name: str
    # image side
    patch: int  # cubic model patch in voxels (multiple of the latent factor 4)
    spacing: tuple[float, float, float]  # model voxel spacing in mm
    # MAISI VAE (AutoencoderKlMaisi)
    vae_channels: tuple[int, ...]
    vae_res_blocks: int
    vae_norm_groups: int
    latent_channels: int
    # MAISI UNet (DiffusionModelUNetMaisi)
    unet_channels: tuple[int, ...]
    unet_attention: tuple[bool, ...]
    unet_head_channels: tuple[int, ...]
    unet_norm_groups: int
    unet_res_blocks: int = 2
    unet_spacing_input: bool = False
    unet_region_inputs: bool = False
    unet_class_embeds: int | None = None
    unet_resblock_updown: bool = False
    unet_include_fc: bool = False
    scale_factor: float = 1.0  # latent scaling of the diffusion model
    # text + AOVA + residual head (ours)
    embed_dim: int = 32
    adapter_ratio: float = 0.2
    head_channels: int = 16
    head_levels: int = 3  # resolution levels of the residual head's UNet (channels double per level)
    # average the head's probability over the 8 mirrorings of its views (test-time augmentation,
    # as nnU-Net does; the head trains on mirrored crops): 8x the head's compute
    head_mirror_average: bool = False
    # residual heads trained apart and joined (`diffugts join-heads`): their probabilities are
    # averaged (with the mirrorings' when those are on); n x the head's compute
    head_members: int = 1
    # how many of the 8 mirrorings the head averages (identity, the three single flips, then pairs and
    # all three): an ensemble of two on 4 costs what one head on 8 does
    head_mirrors: int = 8
    # loop
    scheduler: str = "ddim"  # "ddim" (epsilon prediction) or "flow" (rectified flow, velocity)
    flow_velocity_sign: float = 1.0  # +1: v = noise - x0 (diffusers); -1: v = x0 - noise (MONAI RFlow)
    num_train_timesteps: int = 1000
    inference_steps: int = 10  # steps of the full schedule; strength picks the tail
    strength: float = 0.6
    probe_timestep: int = 100  # noise level of the attention-probe UNet pass (of num_train_timesteps)
    anomaly_threshold: float = 0.5  # theta: inpainting mask = dilated M > theta
    # a window whose map flags more than this share of its latent voxels at theta is not inpainted:
    # such a map localizes nothing (an unseen prompt can lift it over a whole organ), and a
    # pseudo-healthy image of most of the window is what the head then fires on. 1.0: never skip
    inpaint_max_fraction: float = 1.0
    mask_dilation: int = 1  # latent voxels
    crop_margin: int = 2  # latent voxels of context around the mask's bounding box
    affinity_steps: int = 2  # k in M <- normalize(A^k M)
    refine_weight: float = 0.5  # blend of the AOVA map with its attention-propagated version
    mask_threshold: float = 0.5  # on the residual head's probability
    map_threshold: float = 0.5  # on the AOVA map, when an ablation takes the mask from it
    min_component_mm3: float = 50.0
    top_k_components: int = 0  # 0: keep all; a target naming several lesions always keeps all
    # how top_k_components ranks: "size" or "mean probability" (the head's, over the component)
    top_k_rank: str = "size"
    # top-k where the maps were restricted to the target's organ (`organ_regions`), the components
    # then competing inside the right organ, as ZePT pairs the two; 0: top_k_components there too
    organ_top_k: int = 0
    # where top_k_components is not used (a target naming several lesions, outside a restricted
    # organ): keep the components whose mean probability is at least this share of the most
    # probable one's; 0: every component
    several_near_best: float = 0.0
    # on CT, a component whose median in the scan is below this many HU is dropped (no tumour is
    # aerated lung or air), unless the target names an air-containing finding; None: never
    min_component_hu: float | None = None
    window_overlap: float = 0.25
    weights: str | None = None  # safetensors file shipped with the package (relative to WEIGHTS_DIR)

    def __post_init__(self):
        # a deployed config with an unknown rank fails when the model loads, not on each request
        check_rank(self.top_k_rank)
        if not 0.0 <= self.several_near_best <= 1.0:
            raise ValueError(f"several_near_best is a share of the best component's mean probability, "
                             f"0 to 1, not {self.several_near_best}")

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_patch(self) -> int:
        return self.patch // self.latent_factor

    @property
    def unet_multiple(self) -> int:
        """Latent crops must be divisible by this (the UNet downsamples len(channels)-1 times)."""
        return 2 ** (len(self.unet_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preset":
        """From `to_dict`'s data; keys this version does not know (a repository exported by a newer
        one) are left out, so a client still reads the sizes it needs."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})

    def with_(self, **changes) -> "Preset":
        return replace(self, **changes)


PRESETS: dict[str, Preset] = {
    # random init, seconds on CPU: tests and CI
    "tiny": Preset(
        name="tiny", patch=32, spacing=(4.0, 4.0, 4.0),
        vae_channels=(8, 16, 16), vae_res_blocks=1, vae_norm_groups=4, latent_channels=4,
        unet_channels=(16, 32, 32), unet_attention=(False, True, True),
        unet_head_channels=(0, 8, 8), unet_norm_groups=8, unet_res_blocks=1,
        embed_dim=16, head_channels=8, inference_steps=4, crop_margin=1,
    ),
    # small trained weights shipped in diffugts/weights (issue 4)
    "demo": Preset(
        name="demo", patch=64, spacing=(3.0, 3.0, 3.0),
        vae_channels=(16, 32, 64), vae_res_blocks=1, vae_norm_groups=8, latent_channels=4,
        unet_channels=(32, 64, 64), unet_attention=(False, True, True),
        unet_head_channels=(0, 16, 16), unet_norm_groups=8, unet_res_blocks=1,
        embed_dim=32, head_channels=16, inference_steps=10,
        # seen sets (28 cases, `make calibrate`): pooled Dice 0.593 -> 0.613 with the thresholds
        # recalibrated for it
        head_mirror_average=True,
        # calibrated on seen categories only with the bundled weights: the map's threshold on the
        # aova+attention ablation's Dice (seen phantoms and seen-kind anatomy, seed 77: 0.05 of
        # 0.02-0.5 for the AOVA fine-tuned on anatomy, 2026-11-29); the inpainting theta and the
        # head's threshold jointly on the full pipeline's Dice over seen phantoms (seed 77) and
        # seen-kind lesions on real anatomy (`make calibrate`: theta 0.03-0.4 x head 0.3-0.95 x
        # min component 0-200 mm^3; Dice falls as more is inpainted below theta 0.15; with the
        # AOVA on anatomy, theta 0.25 reads 0.611, 0.4 0.610, 0.15 0.560; over 64 seen cases with
        # seed 78's 36 added: 0.4 0.519 (no inpainting), 0.25 0.515, 0.15 0.481: a tie, kept at 0.25).
        # The head fine-tuned on 48^3 crops (2026-11-29, model card): 0.560 at theta 0.25 / head 0.25
        # over those 64 cases (theta 0.4: 0.557, 0.15: 0.525; head 0.5: 0.539)
        mask_threshold=0.25, map_threshold=0.05, anomaly_threshold=0.25,
        # the seen sets' maps flag at most 7.9% of a window's latent voxels (256 cases); an unseen
        # prompt's map can flag 27-33% (model card, "A map that flags everything")
        inpaint_max_fraction=0.15,
        # drops 2-4 voxel specks at 3 mm; on the seen sets 0-200 mm^3 are within 0.001 of each other
        min_component_mm3=200.0,
        # ZePT's top-k per tumour inside the organ: one component (the largest) for a target that
        # names one lesion where the maps were restricted to its organ; a plural or metastases keeps
        # all (`component_rules.component_rule`). Everywhere (top_k_components=1) it lost on unseen body kinds
        # (benchmarks/prereg/one_component_unseen3045.txt); inside the organ: ..._in_organ_unseen3046.txt
        organ_top_k=1,
        # outside a restricted organ (the body), the one component of highest mean probability: the
        # largest there is most often a false positive (benchmarks/prereg/most_probable_component_body_3049.txt)
        top_k_components=1, top_k_rank="mean probability",
        # a target naming several lesions there: the components whose mean probability is at least 0.9
        # of the most probable one's (benchmarks/prereg/several_near_best_body_3050.txt)
        several_near_best=0.9,
        # -700 HU: the upper end of aerated lung (benchmarks/prereg/no_aerated_lung_components_3047.txt)
        min_component_hu=-700.0,
        weights="demo.safetensors",
    ),
    # the published MAISI sizes (rflow-ct UNet); weights from a user's local path
    "maisi": Preset(
        name="maisi", patch=128, spacing=(1.5, 1.5, 1.5),
        vae_channels=(64, 128, 256), vae_res_blocks=2, vae_norm_groups=32, latent_channels=4,
        unet_channels=(64, 128, 256, 512), unet_attention=(False, False, True, True),
        unet_head_channels=(0, 0, 32, 32), unet_norm_groups=32, unet_res_blocks=2,
        unet_spacing_input=True, unet_class_embeds=128, unet_resblock_updown=True,
        unet_include_fc=True, embed_dim=64, head_channels=32,
        scheduler="flow", flow_velocity_sign=-1.0, inference_steps=30, crop_margin=4,
    ),
}


def bundled_weights(preset: Preset) -> Path | None:
    """The safetensors file shipped with the package for this preset (None: it ships none)."""
    return WEIGHTS_DIR / preset.weights if preset.weights else None


def weights_file(preset: Preset, weights: str | Path | None = None) -> Path | None:
    """The weights a preset runs: a given file, else the bundled one; None for random init."""
    path = Path(weights) if weights else bundled_weights(preset)
    return path if path is not None and path.is_file() else None


def weights_sha256(preset: Preset, weights: str | Path | None = None) -> str | None:
    """SHA-256 of `weights_file`: the model identity in run records and DICOM SEGs."""
    from .io import sha256_file

    path = weights_file(preset, weights)
    return sha256_file(path) if path else None


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
