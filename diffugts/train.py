"""Training recipes for the `demo` preset, on CPU, from data generated or installed here.

backbone: the MAISI-architecture VAE (L1 of the posterior mean's decoding + KL, on random crops)
          then the diffusion UNet
          (epsilon prediction, DDIM's scaled-linear schedule) on healthy CT- and MR-like volumes.
heads:    with backbone and text encoder frozen, the AOVA adapters / projections / temperature
          on seen lesion categories, then the residual head on the frozen loop's own outputs.
Checkpoints in --work make every phase resumable; seeds are fixed.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import WEIGHTS_DIR, get_preset
from .executors.torch_executor import TorchExecutor
from .models import build_models
from .models.backbone import encode_with_taps
from .models.residual import VIEW_GROUPS
from .models.weights import one_member_only, load_weights, save_weights
from .pipeline import LoopOptions, Timings, inpainting_mask, segment_patch
from .prompts import build_prompt_set
from .schedulers import scaled_linear_alphas_cumprod
from .tokenizer import tokenize
from .training_data import SEEN, UNSEEN, Case, make_cases  # noqa: F401 - re-exported



def _progress(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[loss]}"))
    return progress, progress.add_task(description, total=total, loss="")


class Checkpoint:
    """Resumable state of one training phase, random generators included: a resumed run draws
    the same crops and noise as an uninterrupted one."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, modules: dict, optimizer, rng: np.random.Generator) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "numpy_rng" in state:  # checkpoints written before it was kept lack it
            rng.bit_generator.state = state["numpy_rng"]
        return int(state["step"])

    def save(self, modules: dict, optimizer, step: int, rng: np.random.Generator) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({"modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                    "step": step, "torch_rng": torch.get_rng_state(),
                    "numpy_rng": rng.bit_generator.state}, tmp)
        tmp.replace(self.path)


def run_phase(name: str, work: Path, modules: dict, params, steps: int, lr: float, loss_fn,
              rng: np.random.Generator, warmup: int = 0, every: int = 100, amp: str | None = None) -> dict:
    """A generic resumable loop: `loss_fn(step)` returns a scalar loss; `rng` is the generator
    it draws from (checkpointed with the weights); lr warms up linearly, then decays by cosine.
    Resuming with more `steps` than a checkpoint holds continues it (training accumulates across runs).
    `amp`: the device type to autocast to bfloat16 on (no loss scaling needed), or None for fp32."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    checkpoint = Checkpoint(work / f"{name}.pt")
    start = checkpoint.load(modules, optimizer, rng)

    def schedule(s):  # linear warmup, then cosine decay
        warm = min(1.0, (s + 1) / warmup) if warmup else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * s / steps))

    progress, task = _progress(steps, name)
    losses, began, skipped = [], time.time(), 0
    with progress:
        progress.update(task, completed=start)
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * schedule(step)
            with torch.autocast(amp or "cpu", dtype=torch.bfloat16, enabled=amp is not None):
                loss = loss_fn(step)
            optimizer.zero_grad()
            loss.backward()
            # a step whose gradients are not finite is skipped, as AMP's loss scaler does: one such
            # step would otherwise turn every weight into NaN (seen with bfloat16 autocast on a
            # CPU with native bfloat16, in the backward of a 4^3 latent crop)
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
                optimizer.step()
            else:
                skipped += 1
            losses.append(float(loss.detach()))
            progress.update(task, advance=1, loss=f"loss {np.mean(losses[-20:]):.4f}")
            if (step + 1) % every == 0 or step + 1 == steps:
                checkpoint.save(modules, optimizer, step + 1, rng)
    finite = [x for x in losses[-50:] if math.isfinite(x)]
    return {"steps": steps, "resumed_at": start, "final_loss": float(np.mean(finite)) if finite else None,
            "skipped_steps": skipped, "seconds": time.time() - began}


def _crop(batch: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    starts = [int(rng.integers(0, (n - size) // 4 + 1)) * 4 for n in batch.shape[2:]]
    return batch[:, :, starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size]


@dataclass
class Sources:
    """Where training volumes come from, besides the phantoms: the real-anatomy corpus
    (`diffugts corpus`) and a user's MSD-layout dataset."""

    corpus: Path | None = None
    dataset: Path | None = None
    anatomy_volumes: int = 96  # randomized corpus patches (backbone) / lesion cases (heads)
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast on the device
    modalities: str = "corpus"  # heads: anatomy volumes drawn as the corpus holds them, or per modality
    kinds: tuple[str, ...] | None = None  # heads: lesion kinds drawn into the anatomy (default: the seen brain kinds)
    dataset_prompt: str | None = None  # heads: the target of `dataset` entries without their own (a Decathlon task)

    @property
    def autocast(self) -> str | None:
        return torch.device(self.device).type if self.amp else None


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch has no CUDA device (the CPU wheel, or no GPU here)")
    return device


def _stack(cases) -> torch.Tensor:
    return torch.from_numpy(np.stack([c.image for c in cases])[:, None])


def backbone_volumes(preset, n_phantoms: int, seed: int, sources: Sources) -> tuple[torch.Tensor, dict]:
    """Healthy training patches and the held-out sets their reconstruction is measured on."""
    from .training_data import anatomy_cases, anatomy_on_model_grid, dataset_cases

    train = make_cases(preset, n_phantoms, seed) if n_phantoms else []
    held_out = {"phantoms": _stack(make_cases(preset, 8, seed + 1000))}
    if sources.corpus:
        anatomies = anatomy_on_model_grid(sources.corpus, preset)
        progress, task = _progress(sources.anatomy_volumes + 8, "randomized anatomy")
        with progress:
            tick = lambda: progress.update(task, advance=1)  # noqa: E731
            train += anatomy_cases(anatomies, preset, sources.anatomy_volumes, seed, progress=tick)
            held_out["anatomy"] = _stack(anatomy_cases(anatomies, preset, 8, seed + 1000, progress=tick))
    if sources.dataset:
        train += dataset_cases(sources.dataset, preset, need_labels=False, rng=np.random.default_rng(seed))
    if not train:
        raise ValueError("no training volumes: give phantoms (--volumes), --corpus or --dataset")
    return _stack(train), held_out


def save_volumes(path: Path, volumes: torch.Tensor, held_out: dict) -> Path:
    """The prepared training volumes and held-out sets in one compressed file (float16: images in
    [0, 1], steps of at most 2^-11), written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"train": volumes} | {f"held_out.{name}": held for name, held in held_out.items()}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **{k: v.numpy().astype(np.float16) for k, v in arrays.items()})
    tmp.replace(path)
    return path


def load_volumes(path: Path, preset) -> tuple[torch.Tensor, dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--from-volumes {path}: no such file (write one with --save-volumes)")
    try:
        with np.load(path) as data:
            arrays = {k: torch.from_numpy(data[k].astype(np.float32)) for k in data.files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile):  # not an .npz (a bare .npy: TypeError)
        arrays = {}
    if "train" not in arrays:
        raise ValueError(f"--from-volumes {path}: not a file written by --save-volumes (no 'train' array)")
    patch = (preset.patch,) * 3
    for name, array in arrays.items():
        if array.ndim != 5 or tuple(array.shape[1:]) != (1, *patch):
            raise ValueError(f"--from-volumes {path}: {name} has shape {tuple(array.shape)}, the {preset.name} "
                             f"preset trains on (N, 1, {', '.join(map(str, patch))})")
    held_out = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("held_out.")}
    return arrays["train"], held_out


def train_backbone(preset_name: str = "demo", work: Path = Path("train_work"), seed: int = 0,
                   vae_steps: int = 1500, unet_steps: int = 2500, n_volumes: int = 64,
                   sources: Sources = Sources(), init: Path | None = None,
                   from_volumes: Path | None = None, save_to: Path | None = None,
                   vae_batch: int = 2, unet_batch: int = 4) -> dict:
    """`init`: start from these weights (e.g. the shipped ones) where no checkpoint exists yet.
    `save_to`: prepare the volumes, write them there and stop (prepare on a CPU machine, train on a
    GPU one); `from_volumes`: train on such a file instead of preparing. `vae_batch`, `unet_batch`:
    crops per step (a GPU runs 16 as fast as 2: small batches leave it waiting on launches)."""
    if vae_batch < 1 or unet_batch < 1:
        raise ValueError(f"--vae-batch {vae_batch} / --unet-batch {unet_batch}: each must be at least 1")
    preset = get_preset(preset_name)
    device = _device(sources.device)

    def volumes_and_held_out():
        if from_volumes:
            return load_volumes(from_volumes, preset)
        return backbone_volumes(preset, n_volumes, seed, sources)

    if save_to:  # data only: no networks (nor the text encoder under them) are built
        volumes, held_out = volumes_and_held_out()
        return {"volumes": str(save_volumes(save_to, volumes, held_out)), "training_volumes": len(volumes),
                "held_out": {name: len(held) for name, held in held_out.items()}}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    models = build_models(preset, seed)
    if init:  # before the volumes: a bad --init fails before minutes of preparation
        load_weights(models, init)
    volumes, held_out = volumes_and_held_out()
    work.mkdir(parents=True, exist_ok=True)
    vae = models.vae.train()

    def vae_loss(step):
        batch = _crop(volumes[torch.from_numpy(rng.integers(0, len(volumes), vae_batch))], preset.patch // 2, rng).to(device)
        # decode the posterior mean, as inference does: decoding a sample (sigma ~1 against a
        # latent std ~3) cost ~2.5 dB of held-out PSNR at the same steps
        mu, sigma = vae.encode(batch)
        kl = 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2 + 1e-8) - 1).mean()
        return F.l1_loss(vae.decode(mu).float(), batch) + 1e-4 * kl.float()

    vae.to(device)
    report = {"vae": run_phase("vae", work, {"vae": vae}, list(vae.parameters()), vae_steps, 1e-3, vae_loss,
                               rng, warmup=50, amp=sources.autocast)}
    vae.eval().cpu()
    with torch.no_grad():
        latents = torch.cat([vae.encode(volumes[i:i + 4])[0] for i in range(0, len(volumes), 4)])
        report["reconstruction"] = {}
        for name, held in held_out.items():
            recon = torch.cat([vae.decode(vae.encode(held[i:i + 2])[0]) for i in range(0, len(held), 2)])
            report["reconstruction"][name] = reconstruction_quality(recon.clamp(0, 1).numpy(), held.numpy())
    scale = float(1.0 / latents.std())
    report["scale_factor"] = scale
    report["training_volumes"] = len(volumes)
    latents = latents * scale
    acp = torch.from_numpy(scaled_linear_alphas_cumprod(preset.num_train_timesteps))
    unet = models.unet.train()

    def unet_loss(step):
        x0 = latents[torch.from_numpy(rng.integers(0, len(latents), unet_batch))]
        if step % 2:  # cropped latents, as the inpainting loop sends them
            x0 = _crop(x0, int(rng.choice([8, 12])) if preset.latent_patch >= 12 else preset.unet_multiple, rng)
        t = torch.from_numpy(rng.integers(0, preset.num_train_timesteps, len(x0)))
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy.to(device), t.float().to(device))
        return F.mse_loss(prediction.float(), noise.to(device))

    unet.to(device)
    report["unet"] = run_phase("unet", work, {"unet": unet}, list(unet.parameters()), unet_steps, 1e-3, unet_loss,
                               rng, amp=sources.autocast)
    models.eval().cpu()
    save_weights(models, work / "backbone.safetensors", parts=("vae", "unet"),
                 metadata={"scale_factor": scale})
    (work / "backbone.json").write_text(json.dumps(report, indent=2))
    return report


def reconstruction_quality(recon: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR (data range 1) and SSIM (MONAI's, 3D) of the VAE on held-out healthy volumes."""
    from monai.metrics import SSIMMetric

    mse = ((recon - truth) ** 2).reshape(len(truth), -1).mean(1)
    psnr = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))
    ssim = float(SSIMMetric(spatial_dims=3, data_range=1.0)(torch.from_numpy(recon), torch.from_numpy(truth)).mean())
    return {"psnr_db": psnr, "ssim": ssim, "volumes": len(truth)}


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, batch_dice: bool = False) -> torch.Tensor:
    """Per volume, or over the whole batch (crops without lesion then do not count as misses)."""
    dims = (0, 1, 2, 3, 4) if batch_dice else (1, 2, 3, 4)
    inter = (prob * target).sum(dims)
    return (1 - (2 * inter + 1) / (prob.sum(dims) + target.sum(dims) + 1)).mean()


def lesion_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice per crop, over the crops that hold lesion: each lesion weighs the same whatever its
    size. A batch Dice lets a 60 mm lesion drown out a 10 mm one in the same batch (the idea of blob
    loss, Kofler et al. 2023, with one lesion per crop); crops without lesion are left to the BCE."""
    holds = target.flatten(1).amax(1) > 0
    if not holds.any():
        return prob.sum() * 0.0
    return soft_dice_loss(prob[holds], target[holds])


HEAD_DICE = {"batch": lambda prob, target: soft_dice_loss(prob, target, batch_dice=True),
             "lesion": lesion_dice_loss}


HEAD_SAMPLING = ("uniform", "size")


def case_weights(labels: list, sampling: str) -> np.ndarray:
    """How often the head's crops come from each case. "size": in proportion to 1/sqrt(lesion voxels)
    (cases without lesion at the median weight), so small lesions, which a batch of large ones
    drowns out, are drawn more often: with the demo's cases, lesions under 100 voxels (16% of
    cases) get 41% of the draws instead of 16%."""
    if sampling == "uniform":
        return np.full(len(labels), 1.0 / len(labels))
    voxels = np.array([float((label > 0.5).sum()) for label in labels])
    weights = np.where(voxels > 0, np.maximum(voxels, 1.0) ** -0.5, 0.0)
    weights[voxels == 0] = np.median(weights[voxels > 0]) if (voxels > 0).any() else 1.0
    return weights / weights.sum()


def drop_view_groups(views: torch.Tensor, groups: dict, p: float, rng: np.random.Generator) -> torch.Tensor:
    """Zero each optional group of input channels (residuals; maps) per sample with probability p.

    On seen categories the AOVA map fires and the inpainting leaves a residual on nearly every
    lesion; on unseen ones often neither happens. Without this the head learns to need them."""
    keep = torch.ones(views.shape[:2] + (1, 1, 1))
    for sample in range(views.shape[0]):
        for channels in groups.values():
            if rng.random() < p:
                keep[sample, list(channels)] = 0.0
    return views * keep


def lesion_crop(volume: torch.Tensor, label: torch.Tensor, size: int, rng: np.random.Generator,
                foreground: float = 0.67) -> tuple[torch.Tensor, torch.Tensor]:
    """A cube of `size` around a random lesion voxel (jittered) with probability `foreground`,
    else anywhere (nnU-Net's oversampling)."""
    shape = volume.shape[2:]
    lesion = np.argwhere(label[0, 0].numpy() > 0.5)
    if len(lesion) and rng.random() < foreground:
        centre = lesion[rng.integers(len(lesion))] + rng.integers(-size // 4, size // 4 + 1, 3)
    else:
        centre = np.array([rng.integers(0, n) for n in shape])
    start = [int(np.clip(c - size // 2, 0, n - size)) for c, n in zip(centre, shape)]
    region = (slice(None), slice(None)) + tuple(slice(s, s + size) for s in start)
    return volume[region], label[region]


def mirror_crop(views: torch.Tensor, label: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a crop's views and label together along each spatial axis with probability 1/2
    (nnU-Net's mirroring): every view is local, so a mirrored lesion is as real as the original,
    and the head sees eight orientations of the few lesion shapes one sitting draws."""
    from monai.transforms import Flip

    axes = [axis for axis in range(3) if rng.random() < 0.5]
    if not axes:
        return views, label
    flip = Flip(spatial_axis=axes)  # channel-first: spatial axes after the channel
    return flip(views[0]).as_tensor()[None], flip(label[0]).as_tensor()[None]


class Recorder:
    """A torch executor that keeps the residual head's inputs of every `score` call (head training data)."""

    def __init__(self, executor: TorchExecutor):
        self.inner, self.preset, self.records = executor, executor.preset, []

    def encode(self, image, prompts):
        return self.inner.encode(image, prompts)

    def unet(self, latent, timestep, attention=True):
        return self.inner.unet(latent, timestep, attention)

    def decode(self, latent):
        return self.inner.decode(latent)

    def score(self, image, healthy, anomaly, encoded, prompts):
        self.records.append(self.inner.head_inputs(image, healthy, anomaly, encoded, prompts))
        return self.inner.score(image, healthy, anomaly, encoded, prompts)


def _networks_digest(models, seed: int) -> str:
    """What every case's loop outputs depend on besides the case: the seed and the loop's networks."""
    import hashlib

    digest = hashlib.sha256(str(seed).encode())
    for part in ("vae", "unet", "aova", "projection", "text_encoder"):
        for value in getattr(models, part).state_dict().values():
            digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _case_digest(case) -> str:
    import hashlib

    digest = hashlib.sha256(str((case.prompt, case.modality)).encode())
    digest.update(np.ascontiguousarray(case.image).tobytes())
    digest.update(np.ascontiguousarray(case.label).tobytes())
    return digest.hexdigest()


def _cached_prefix(cache: Path, networks: str, digests: list[str]) -> list[torch.Tensor]:
    """The cached views of the longest run of leading cases that the cache holds unchanged. Case i
    runs the loop with seed + i, so a case is reusable only at its own position: a longer draw of
    the same cases (one random stream) reuses all of a shorter run's outputs."""
    if not cache.exists():
        return []
    kept = torch.load(cache, map_location="cpu", weights_only=True)
    if kept.get("networks") != networks:  # other networks or seed, or a cache of the old format
        return []
    same = 0
    for old, new in zip(kept["cases"], digests):
        if old != new:
            break
        same += 1
    return kept["views"][:same]


def loop_outputs(models, cases, prompt_sets, seed: int, cache: Path) -> list[torch.Tensor]:
    """The residual head's input views for every case, from the frozen loop (CPU, torch executor).

    Every other case also inpaints its (dilated) lesion: the head sees lesions that the inpainting
    removed as well as lesions the map missed. The views are kept in `cache` (float16) under digests
    of the networks and of each case: a resumed or retuned head phase does not recompute them (they
    are most of a heads run on CPU), and a run on more cases computes only the cases it adds."""
    preset = models.preset
    networks, digests = _networks_digest(models, seed), [_case_digest(c) for c in cases]
    views = _cached_prefix(cache, networks, digests)  # float16, as they are stored
    reused = len(views)
    if reused == len(cases):
        return [v.float() for v in views]
    recorder = Recorder(TorchExecutor(models))
    label = f"loop outputs ({reused} cached)" if reused else "loop outputs"
    progress, task = _progress(len(cases) - reused, label)
    with torch.no_grad(), progress:
        for i in range(reused, len(cases)):
            case = cases[i]
            lesion = inpainting_mask(case.label, preset.latent_factor, 0.5, preset.mask_dilation) if i % 2 else None
            segment_patch(recorder, case.image, prompt_sets[i], LoopOptions(seed=seed + i, inpaint_also=lesion),
                          np.random.default_rng(seed + i), Timings())
            # the head's input channels; its six raw inputs are not kept (~6 MB each)
            views.append(models.head.views(*recorder.records.pop()).half())
            progress.update(task, advance=1)
    tmp = cache.with_suffix(".tmp")
    labels = [torch.from_numpy(c.label.astype(np.uint8)) for c in cases]  # for whoever studies the head apart
    torch.save({"networks": networks, "cases": digests, "views": views, "labels": labels,
                "prompts": [c.prompt for c in cases]}, tmp)
    tmp.replace(cache)
    return [v.float() for v in views]  # as a cached run reads them: resumed runs train on the same values


def head_cases(preset, n_phantoms: int, seed: int, sources: Sources, contrast=(0.35, 1.0),
               synth_labels: str = "parcels") -> list:
    """Seen-category lesions: phantoms, real anatomy with seen lesion kinds, and a user's labelled data."""
    from .lesions import BODY_SEEN_KINDS, KINDS, LATER_SEEN_KINDS, SEEN_KINDS
    from .training_data import anatomy_cases, anatomy_on_model_grid, dataset_cases

    trainable = SEEN_KINDS + LATER_SEEN_KINDS + BODY_SEEN_KINDS
    refused = [k for k in sources.kinds or () if k not in trainable]
    if refused:  # the unseen kinds are for evaluation only
        raise ValueError(f"--anatomy-kinds: {', '.join(refused)} "
                         f"{'is an unseen kind (evaluation only)' if all(k in KINDS for k in refused) else 'unknown'}; "
                         f"seen kinds: {', '.join(trainable)}")

    # lesion contrast augmented down to 0.35x the category's own: seen lesions are otherwise all
    # conspicuous, and a head trained on them only misses subtler lesions of other categories
    cases = make_cases(preset, n_phantoms, seed + 1, list(SEEN), healthy_fraction=0.15, contrast=contrast) \
        if n_phantoms else []
    if sources.corpus:
        anatomies = anatomy_on_model_grid(sources.corpus, preset)
        progress, task = _progress(sources.anatomy_volumes, "anatomy lesions")
        with progress:
            cases += anatomy_cases(anatomies, preset, sources.anatomy_volumes, seed + 2,
                                   list(sources.kinds or SEEN_KINDS),
                                   healthy_fraction=0.1, progress=lambda: progress.update(task, advance=1),
                                   synth_labels=synth_labels, modalities=sources.modalities)
    if sources.dataset:
        cases += dataset_cases(sources.dataset, preset, need_labels=True, rng=np.random.default_rng(seed + 3),
                               prompt=sources.dataset_prompt)
    if not cases:
        raise ValueError("no training cases: give phantoms (--cases), --corpus or --dataset")
    return cases


def train_heads(preset_name: str = "demo", work: Path = Path("train_work"), seed: int = 0,
                aova_steps: int = 1000, head_steps: int = 6000, n_cases: int = 136,
                backbone: Path | None = None, contrast: tuple[float, float] = (0.35, 1.0),
                sources: Sources = Sources(), head_dice: str = "batch", head_levels: int | None = None,
                head_crop: int | None = None, head_synth: str = "parcels", head_sampling: str = "uniform") -> dict:
    if head_dice not in HEAD_DICE:
        raise ValueError(f"unknown head Dice {head_dice!r}: {', '.join(HEAD_DICE)}")
    if head_sampling not in HEAD_SAMPLING:
        raise ValueError(f"unknown head sampling {head_sampling!r}: {', '.join(HEAD_SAMPLING)}")
    from .augment import SYNTH_LABELS

    if head_synth not in SYNTH_LABELS:
        raise ValueError(f"unknown head synth labels {head_synth!r}: {', '.join(SYNTH_LABELS)}")
    preset = get_preset(preset_name)
    device = _device(sources.device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    models = build_models(preset, seed)
    load_weights(models, backbone or work / "backbone.safetensors")
    members = one_member_only(models)  # an ensemble's heads are trained apart, then joined
    _fresh_head_of_depth(models, head_levels)
    preset = models.preset
    # checked on the head as loaded (a file may hold a deeper one), before anything is written
    head_crop = head_crop or min(32, preset.patch)
    halvings = models.head.levels - 1  # the head's UNet halves a crop this often
    if not 8 <= head_crop <= preset.patch or head_crop % 2**halvings:
        raise ValueError(f"head crop {head_crop} must lie within 8..{preset.patch} (the {preset.name} patch) "
                         f"and be a multiple of {2**halvings} (a {models.head.levels}-level head)")
    work.mkdir(parents=True, exist_ok=True)  # a first run may start from weights elsewhere (--backbone)
    cases = head_cases(preset, n_cases, seed, sources, contrast, head_synth)
    images = torch.from_numpy(np.stack([c.image for c in cases])[:, None])
    labels = torch.from_numpy(np.stack([c.label for c in cases])[:, None])
    taps: dict[int, list[torch.Tensor]] = {}  # per case, on its first AOVA step: none when that phase is done

    def taps_of(i: int) -> list[torch.Tensor]:
        if i not in taps:
            with torch.no_grad():
                taps[i] = encode_with_taps(models.vae, images[i:i + 1])[1]
        return taps[i]

    with torch.no_grad():
        prompt_sets = [build_prompt_set(c.prompt, c.modality) for c in cases]
        texts = sorted({t for p in prompt_sets for t in p.texts})
        ids, mask = tokenize(texts)
        sentence = dict(zip(texts, models.text_encoder(torch.from_numpy(ids), torch.from_numpy(mask))))
    aova, projection = models.aova.train(), models.projection.train()

    def aova_loss(step):
        i = int(rng.integers(len(cases)))
        prompts = prompt_sets[i]
        emb = projection(torch.stack([sentence[t] for t in prompts.texts]).to(device))[None]
        abnormal = torch.from_numpy(prompts.abnormal_mask)[None].to(device)
        projected = aova.project([tap.to(device) for tap in taps_of(i)])
        loss = 0.0
        for level, p in enumerate(projected):  # supervise every scale at its own resolution
            log_abnormal, log_normal = aova.log_masses(p, emb, abnormal)  # no dead clamp gradients
            target = (F.avg_pool3d(labels[i:i + 1], 2**level) if level else labels[i:i + 1]).to(device)
            log_abnormal, log_normal = log_abnormal.float(), log_normal.float()
            weight = 1.0 + 9.0 * target  # lesions are small
            bce = -(weight * (target * log_abnormal + (1 - target) * log_normal)).mean()
            loss = loss + bce + soft_dice_loss(log_abnormal.exp(), target)
        return loss / len(projected)

    aova.to(device), projection.to(device)
    report = {"aova": run_phase("aova", work, {"aova": aova, "projection": projection},
                                list(aova.parameters()) + list(projection.parameters()), aova_steps, 3e-3, aova_loss,
                                rng, amp=sources.autocast)}
    report["training_cases"] = len(cases)
    if members > 1:
        report["head_started_from"] = f"the first of the file's {members} joined heads"
    models.eval().cpu()  # the loop outputs come from the torch executor, on the CPU
    views = loop_outputs(models, cases, prompt_sets, seed, work / "loop_outputs.pt")
    head = models.head.train().to(device)
    weights = case_weights(list(labels), head_sampling)

    def head_loss(step):
        # crops around lesions (two thirds of them) and anywhere: lesions are ~0.5% of a patch
        drawn = rng.integers(len(cases), size=4) if head_sampling == "uniform" else rng.choice(len(cases), 4, p=weights)
        batch = [mirror_crop(*lesion_crop(views[i], labels[i:i + 1], head_crop, rng), rng) for i in drawn]
        logits = head.net(drop_view_groups(torch.cat([v for v, _ in batch]), VIEW_GROUPS, 0.6, rng).to(device))
        target = torch.cat([t for _, t in batch]).to(device)
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(3.0, device=device)) + \
            HEAD_DICE[head_dice](torch.sigmoid(logits), target)

    report["head"] = run_phase("head", work, {"head": head}, list(head.parameters()), head_steps, 2e-3, head_loss,
                               rng, amp=sources.autocast)
    models.eval().cpu()
    report["seen_categories"], report["unseen_categories"] = list(SEEN), list(UNSEEN)
    save_weights(models, work / "demo.safetensors", half=True, metadata={"scale_factor": preset.scale_factor})
    (work / "heads.json").write_text(json.dumps(report, indent=2))
    return report


def install_weights(work: Path, name: str = "demo.safetensors") -> Path:
    target = WEIGHTS_DIR / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((work / name).read_bytes())
    return target


def _fresh_head_of_depth(models, levels: int | None) -> None:
    """A head of another depth than the loaded one starts from random weights (nothing to carry over)."""
    if levels is not None:
        models.rebuild_head(head_levels=levels)


def weights_from_checkpoints(preset_name: str, work: Path, backbone: Path | None = None,
                             head_levels: int | None = None) -> dict:
    """`work/demo.safetensors` from the last checkpoints of an unfinished `train heads` run: a phase
    stopped early (Ctrl-C, the end of a sitting) still gives usable weights, and the run can resume
    later from the same checkpoints. Says which step each phase had reached. A phase with no
    checkpoint (a fine-tune with `--aova-steps 0`) keeps what the backbone file holds for it."""
    phases = [(phase, parts) for phase, parts in (("aova", ("aova", "projection")), ("head", ("head",)))
              if (work / f"{phase}.pt").exists()]
    if not phases:
        raise ValueError(f"{work}: no checkpoint (aova.pt, head.pt); run `diffugts train heads` first")
    preset = get_preset(preset_name)
    models = build_models(preset, 0)
    load_weights(models, backbone or work / "backbone.safetensors")
    one_member_only(models)  # what `train heads` trained from such a file
    _fresh_head_of_depth(models, head_levels)
    steps = {}
    for phase, parts in phases:
        state = torch.load(work / f"{phase}.pt", map_location="cpu", weights_only=False)
        for part in parts:
            getattr(models, part).load_state_dict(state["modules"][part])
        steps[phase] = int(state["step"])
    models.eval()
    save_weights(models, work / "demo.safetensors", half=True, metadata={"scale_factor": models.preset.scale_factor})
    return {"checkpoint_steps": steps, "weights": str(work / "demo.safetensors")}
