"""Weights: our safetensors files, and the published MAISI checkpoints from a user's local path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Preset, get_preset
from ..io import InputError
from .pipeline_models import FROZEN, TRAINABLE, DiffuGTSModels


# batch norm's step counter: training state, not a weight (files leave it out)
COUNTER = "num_batches_tracked"


def _load_into(module: torch.nn.Module, state: dict, path, what: str) -> None:
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(COUNTER))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            detail.append(f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} "
                          f"vs model {tuple(own[k].shape)})")
        raise InputError(path, f"does not match the {what} of this preset: " + "; ".join(detail))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def save_weights(models: DiffuGTSModels, path: str | Path, parts=TRAINABLE + FROZEN,
                 half: bool = False, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for part in parts:
        for key, value in getattr(models, part).state_dict().items():
            if key.endswith(COUNTER):
                continue
            value = value.detach().contiguous()
            if half and value.is_floating_point():
                value = value.half()
            tensors[f"{part}.{key}"] = value
    meta = {"preset": json.dumps(models.preset.to_dict()), **(metadata or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})


def _adopt_head_shape(models: DiffuGTSModels, metadata: dict) -> None:
    """Rebuild the head in the shape the file's preset gives it, so that a file holding a head of
    another depth (a trial) or an ensemble of heads loads under the named preset. Files older than
    `head_levels` / `head_members` hold the fields' defaults."""
    try:
        saved = json.loads(metadata.get("preset", "{}"))
    except json.JSONDecodeError:
        saved = {}
    models.rebuild_head(head_channels=int(saved.get("head_channels", models.preset.head_channels)),
                        head_levels=int(saved.get("head_levels", Preset.head_levels)),
                        head_members=int(saved.get("head_members", Preset.head_members)),
                        head_mirrors=int(saved.get("head_mirrors", Preset.head_mirrors)))


def load_weights(models: DiffuGTSModels, path: str | Path) -> dict:
    """Load a diffugts safetensors file; the backbone's latent `scale_factor` rides in its metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:
        raise InputError(path, f"not a readable safetensors file ({type(exc).__name__})") from None
    if any(k.startswith("head.") for k in state):
        _adopt_head_shape(models, metadata)
    parts = sorted({k.split(".", 1)[0] for k in state})
    unknown = [p for p in parts if p not in TRAINABLE + FROZEN]
    if unknown:
        raise InputError(path, f"unknown weight groups {unknown}")
    for part in parts:
        prefix = part + "."
        _load_into(getattr(models, part), {k[len(prefix):]: v for k, v in state.items()
                                           if k.startswith(prefix)}, path, part)
    if "scale_factor" in metadata:
        models.preset = models.preset.with_(scale_factor=float(metadata["scale_factor"]))
    return metadata


def one_member_only(models: DiffuGTSModels, member: int = 1) -> int:
    """Reduce an ensemble head to one member (default the first: what training fits); returns how
    many it had."""
    members = models.head.members
    if not 1 <= member <= members:
        raise ValueError(f"the head has {members} member(s): no member {member}")
    if members > 1:
        kept = (models.head.net, *models.head.more_nets)[member - 1]
        # the mirrorings go back to the named preset's: a joined file may have traded them for members
        models.rebuild_head(head_members=1, head_mirrors=get_preset(models.preset.name).head_mirrors)
        models.head.net.load_state_dict(kept.state_dict())
    return members


def split_heads(path: str | Path, out_dir: str | Path, preset_name: str = "demo") -> dict:
    """Each member of an ensemble file as a one-member file beside the same networks
    (`member1.safetensors`, ...): the inverse of `join_heads`, so that one member can be trained on
    (`train heads --backbone out_dir/member2.safetensors`) and joined again."""
    import copy

    from . import build_models

    ensemble = build_models(get_preset(preset_name), 0)
    metadata = load_weights(ensemble, path)
    if ensemble.head.members < 2:
        raise InputError(path, "its head has one member: nothing to split")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for member in range(1, ensemble.head.members + 1):
        models = copy.deepcopy(ensemble)  # the file read once; each member cut from a copy
        one_member_only(models, member)
        models.eval()
        written.append(str(out_dir / f"member{member}.safetensors"))
        save_weights(models, written[-1], half=True, metadata={k: v for k, v in metadata.items() if k != "preset"})
    return {"members": len(written), "from": str(path), "weights": written}


def join_heads(paths, out: str | Path, preset_name: str = "demo", mirrors: int | None = None) -> dict:
    """One weights file whose head averages the heads of `paths` (files that may be ensembles
    already), each over `mirrors` of the 8 mirrorings (default: as the first file's head does).
    Everything but the head must be the same in every file: the heads' inputs come from that
    loop, and an ensemble of heads trained on another loop's outputs would be meaningless."""
    from . import build_models

    if len(paths) < 2:
        raise ValueError("join-heads needs two weights files or more")
    loaded, metadata = [], []
    for path in paths:
        models = build_models(get_preset(preset_name), 0)
        metadata.append(load_weights(models, path))
        loaded.append(models)
    first = loaded[0]
    for path, models in zip(paths[1:], loaded[1:]):
        for part in (p for p in TRAINABLE + FROZEN if p != "head"):
            mine, theirs = getattr(first, part).state_dict(), getattr(models, part).state_dict()
            if any(not torch.equal(mine[k], theirs[k]) for k in mine):
                raise InputError(path, f"its {part} differs from {paths[0]}'s: the heads of one ensemble "
                                       "must share the networks that feed them")
        if (models.preset.head_channels, models.preset.head_levels) != (first.preset.head_channels,
                                                                        first.preset.head_levels):
            raise InputError(path, f"its head ({models.preset.head_channels} channels, {models.preset.head_levels} "
                                   f"levels) is not shaped as {paths[0]}'s")
    nets = [net for models in loaded for net in (models.head.net, *models.head.more_nets)]
    first.rebuild_head(head_members=len(nets), head_mirrors=first.preset.head_mirrors if mirrors is None else mirrors)
    for target, source in zip((first.head.net, *first.head.more_nets), nets):
        target.load_state_dict(source.state_dict())
    first.eval()
    save_weights(first, out, half=True, metadata={k: v for k, v in metadata[0].items() if k != "preset"})
    return {"members": len(nets), "mirrors": first.preset.head_mirrors, "from": [str(p) for p in paths],
            "weights": str(out)}


def _torch_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"not a readable torch checkpoint ({type(exc).__name__})") from None


def load_maisi_checkpoints(models: DiffuGTSModels, autoencoder: str | Path | None = None,
                           unet: str | Path | None = None) -> float | None:
    """Load MAISI's `autoencoder_v1.pt` and `diff_unet_3d_*.pt`; returns the UNet's scale_factor."""
    scale = None
    if autoencoder:
        state = _torch_checkpoint(Path(autoencoder))
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        _load_into(models.vae, state, autoencoder, "MAISI autoencoder")
    if unet:
        ckpt = _torch_checkpoint(Path(unet))
        state = ckpt.get("unet_state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        _load_into(models.unet, state, unet, "MAISI diffusion UNet")
        if isinstance(ckpt, dict) and "scale_factor" in ckpt:
            scale = float(torch.as_tensor(ckpt["scale_factor"]))
    return scale
