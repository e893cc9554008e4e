"""`train backbone` on a lent GPU, its steps sized to the lease (run by backbone_lease.sh there).

Probes 40 steps of each phase, then trains from the bundled weights on volumes prepared here
(`diffugts train backbone --corpus ... --save-volumes FILE`) for the steps that fit BUDGET seconds,
VAE_SHARE of them on the VAE. Everything runs through diffugts.train.train_backbone.
Usage: python backbone_lease.py VOLUMES BUDGET_S [DEVICE [VAE_BATCH UNET_BATCH]]; writes $OUT/work.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffugts.models.pipeline_models as pipeline_models
from diffugts.train import Sources, train_backbone

# the backbone never reads text, and MiniLM's weights (90 MB) do not fit what travels to the device
pipeline_models.SentenceEncoder = torch.nn.Identity

OUT = Path(os.environ.get("OUT", "/tmp/out"))
VOLUMES, BUDGET = Path(sys.argv[1]), float(sys.argv[2])
DEVICE = sys.argv[3] if len(sys.argv) > 3 else "cuda"
BATCH = dict(vae_batch=int(sys.argv[4]), unet_batch=int(sys.argv[5])) if len(sys.argv) > 5 else {}
VAE_SHARE = 0.6
INIT = Path("diffugts/weights/demo.safetensors")
began = time.time()
sources = Sources(device=DEVICE, amp=True)
env = {"torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
print(json.dumps(env), flush=True)

probe = train_backbone("demo", Path(tempfile.mkdtemp()), 0, 40, 40, 0, sources, INIT, from_volumes=VOLUMES, **BATCH)
rates = {phase: probe[phase]["seconds"] / probe[phase]["steps"] for phase in ("vae", "unet")}
overhead = time.time() - began - probe["vae"]["seconds"] - probe["unet"]["seconds"]
print(json.dumps({"probe": probe, "seconds_per_step": rates, "overhead_s": overhead}), flush=True)

left = BUDGET - (time.time() - began) - overhead - 15
vae_steps = int(min(40000, max(100, VAE_SHARE * left / rates["vae"])) // 100 * 100)
unet_steps = int(min(60000, max(100, (1 - VAE_SHARE) * left / rates["unet"])) // 100 * 100)
print(json.dumps({"vae_steps": vae_steps, "unet_steps": unet_steps, "left_s": left}), flush=True)
report = train_backbone("demo", OUT / "work", 0, vae_steps, unet_steps, 0, sources, INIT, from_volumes=VOLUMES, **BATCH)
report |= {"batch": BATCH, "env": env, "probe_seconds_per_step": rates, "wall_s": time.time() - began}
(OUT / "work" / "backbone.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report), flush=True)
