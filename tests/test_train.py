"""Training recipes, at toy sizes: what is frozen stays frozen, the heads learn from the loop."""

import torch

from diffugts import train
from diffugts.config import get_preset
from diffugts.models import build_models
from diffugts.models.weights import load_weights


def test_head_training_runs_on_the_loop_and_leaves_the_backbone_frozen(tmp_path):
    train.train_backbone("tiny", tmp_path, vae_steps=2, unet_steps=2, n_volumes=4)
    report = train.train_heads("tiny", tmp_path, aova_steps=2, head_steps=3, n_cases=4)
    assert report["head"]["steps"] == 3 and report["seen_categories"] == list(train.SEEN)

    backbone, trained, untrained = (build_models(get_preset("tiny")) for _ in range(3))
    load_weights(backbone, tmp_path / "backbone.safetensors")
    load_weights(trained, tmp_path / "demo.safetensors")  # fp16
    for name in ("vae", "unet"):
        for (key, a), b in zip(getattr(backbone, name).state_dict().items(), getattr(trained, name).state_dict().values()):
            torch.testing.assert_close(b, a.half().float(), msg=f"{name}.{key} changed")
    moved = [not torch.allclose(a, b, atol=1e-3) for a, b in
             zip(untrained.head.state_dict().values(), trained.head.state_dict().values())]
    assert any(moved)
