"""Training recipes, at toy sizes: what is frozen stays frozen, the heads learn from the loop."""

import torch

from diffugts import train
from diffugts.config import get_preset
from diffugts.models import build_models
from diffugts.models.weights import load_weights, save_weights


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


def test_a_head_of_another_depth_trains_from_scratch_and_snapshots(tmp_path):
    train.train_backbone("tiny", tmp_path, vae_steps=1, unet_steps=1, n_volumes=2)
    report = train.train_heads("tiny", tmp_path, aova_steps=1, head_steps=2, n_cases=2, head_levels=4)
    assert report["head"]["resumed_at"] == 0
    trained = build_models(get_preset("tiny"))
    load_weights(trained, tmp_path / "demo.safetensors")
    assert trained.preset.head_levels == 4 and trained.head.levels == 4
    # the snapshot of the same checkpoints needs the depth said again, and gives the same head
    (tmp_path / "demo.safetensors").unlink()
    train.weights_from_checkpoints("tiny", tmp_path, head_levels=4)
    again = build_models(get_preset("tiny"))
    load_weights(again, tmp_path / "demo.safetensors")
    for (key, a), b in zip(trained.head.state_dict().items(), again.head.state_dict().values()):
        assert torch.equal(a, b), key


def test_view_dropout_zeros_whole_groups_and_never_the_image():
    import numpy as np

    from diffugts.models.residual import VIEW_GROUPS

    views = torch.rand(3, 6, 4, 4, 4) + 1.0
    dropped = train.drop_view_groups(views, VIEW_GROUPS, 1.0, np.random.default_rng(0))
    for channels in VIEW_GROUPS.values():
        assert float(dropped[:, list(channels)].abs().max()) == 0.0
    torch.testing.assert_close(dropped[:, :2], views[:, :2])
    torch.testing.assert_close(train.drop_view_groups(views, VIEW_GROUPS, 0.0, np.random.default_rng(0)), views)


def test_lesion_crops_hold_the_lesion_when_asked():
    import numpy as np

    volume = torch.rand(1, 6, 24, 24, 24)
    label = torch.zeros(1, 1, 24, 24, 24)
    label[..., 18:21, 2:5, 10:12] = 1.0
    rng = np.random.default_rng(0)
    for _ in range(10):
        crop, target = train.lesion_crop(volume, label, 12, rng, foreground=1.0)
        assert crop.shape == (1, 6, 12, 12, 12) and target.shape == (1, 1, 12, 12, 12)
        assert float(target.sum()) > 0


def test_mirrored_crops_keep_views_and_label_aligned_and_visit_every_orientation():
    import numpy as np

    views = torch.rand(1, 6, 5, 6, 7)
    label = (views[:, :1] > 0.7).float()  # a label that is a function of the views, voxel by voxel
    rng, seen = np.random.default_rng(0), set()
    for _ in range(64):
        mirrored, target = train.mirror_crop(views, label, rng)
        assert mirrored.shape == views.shape and target.shape == label.shape
        torch.testing.assert_close(target, (mirrored[:, :1] > 0.7).float())
        seen.add(tuple(int(torch.equal(mirrored, views.flip(dims))) for dims in ([2], [3], [4], [2, 3, 4])))
    # each single-axis flip, all three together and the original all occur
    assert {(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 0, 0)} <= seen


def test_a_resumed_phase_ends_where_an_uninterrupted_one_does(tmp_path):
    """The numpy generator the loss draws from is checkpointed with the weights and the torch generator."""
    import numpy as np

    def run(work, stop_at=None):
        torch.manual_seed(0)
        module, rng = torch.nn.Linear(3, 2), np.random.default_rng(0)

        def loss(step):
            if step == stop_at:
                raise KeyboardInterrupt
            x = torch.from_numpy(rng.normal(size=(4, 3))).float() + torch.randn(4, 3)
            return module(x).pow(2).mean()

        train.run_phase("toy", work, {"toy": module}, list(module.parameters()), 6, 0.1, loss, rng,
                        warmup=2, every=1)
        return module

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = run(tmp_path / "a")
    try:
        run(tmp_path / "b", stop_at=3)
    except KeyboardInterrupt:
        pass
    resumed = run(tmp_path / "b")
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_lesion_dice_weighs_a_small_lesion_as_much_as_a_large_one():
    """A crop whose 8-voxel lesion is missed costs ~1 per lesion crop, where the batch Dice hardly moves."""
    target = torch.zeros(3, 1, 8, 8, 8)
    target[0, 0, :6, :6, :6] = 1.0  # large lesion, found
    target[1, 0, :2, :2, :2] = 1.0  # small lesion, missed
    prob = target.clone()
    prob[1] = 0.0
    prob[2, 0, 4, 4, 4] = 0.9  # a crop with no lesion: left to the BCE
    lesion, batch = train.lesion_dice_loss(prob, target), train.soft_dice_loss(prob, target, batch_dice=True)
    expected = (0.0 + (1 - 1 / 9)) / 2  # per lesion crop: 1 - (2*inter + 1) / (sum p + sum t + 1)
    assert abs(float(lesion) - expected) < 1e-3
    assert float(batch) < 0.05
    assert float(train.lesion_dice_loss(prob[2:], target[2:])) == 0.0


def test_size_sampling_draws_small_lesions_more_often_and_uniform_is_uniform():
    import numpy as np

    labels = [torch.zeros(1, 8, 8, 8) for _ in range(4)]
    labels[0][0, :1, :1, :4] = 1.0  # 4 voxels
    labels[1][0, :4, :4, :4] = 1.0  # 64 voxels
    labels[2][0, :8, :8, :4] = 1.0  # 256 voxels; labels[3]: no lesion
    size = train.case_weights(labels, "size")
    np.testing.assert_allclose(size.sum(), 1.0)
    # 1/sqrt(voxels): 1/2, 1/8, 1/16; the healthy case at their median, 1/8
    np.testing.assert_allclose(size, np.array([1 / 2, 1 / 8, 1 / 16, 1 / 8]) / (1 / 2 + 1 / 8 + 1 / 16 + 1 / 8))
    np.testing.assert_allclose(train.case_weights(labels, "uniform"), np.full(4, 0.25))


def test_an_unknown_head_dice_or_a_crop_larger_than_the_patch_is_refused_before_any_work(tmp_path):
    import pytest

    from diffugts.models.weights import save_weights

    with pytest.raises(ValueError, match="unknown head Dice 'pixel'"):
        train.train_heads("tiny", tmp_path, head_dice="pixel")
    with pytest.raises(ValueError, match="unknown head sampling 'voxel'"):
        train.train_heads("tiny", tmp_path, head_sampling="voxel")
    assert not any(tmp_path.iterdir())
    # the crop is checked against the head as loaded: a file may hold a deeper head than the preset's
    weights = tmp_path / "weights"
    shallow, deep = build_models(get_preset("tiny")), build_models(get_preset("tiny"))
    deep.rebuild_head(head_levels=4)
    save_weights(shallow, weights / "shallow.safetensors")
    save_weights(deep, weights / "deep.safetensors")
    work = tmp_path / "work"
    with pytest.raises(ValueError, match="head crop 64 must lie within 8..32"):
        train.train_heads("tiny", work, head_crop=64, backbone=weights / "shallow.safetensors")
    with pytest.raises(ValueError, match="head crop 30 .* multiple of 4"):
        train.train_heads("tiny", work, head_crop=30, backbone=weights / "shallow.safetensors")
    # 12 suits the preset's 3 levels; the file's 4-level head halves a crop three times
    with pytest.raises(ValueError, match=r"head crop 12 .* multiple of 8 \(a 4-level head\)"):
        train.train_heads("tiny", work, head_crop=12, backbone=weights / "deep.safetensors")
    assert not work.exists()


def test_a_step_with_gradients_that_are_not_finite_is_skipped_and_counted(tmp_path):
    import math

    import numpy as np

    weight = torch.nn.Parameter(torch.ones(3))

    def loss_fn(step):
        loss = ((weight - 2.0) ** 2).sum()
        if step == 1:  # a finite loss whose gradient is NaN (sqrt'(0) times 0), as a bfloat16 backward gave
            loss = loss + 0.0 * torch.sqrt((weight - weight.detach()).sum())
        return loss

    report = train.run_phase("toy", tmp_path, {"w": torch.nn.Linear(1, 1)}, [weight], 4, 0.1, loss_fn,
                             np.random.default_rng(0))
    assert report["skipped_steps"] == 1 and math.isfinite(report["final_loss"])
    assert torch.isfinite(weight).all() and float(weight.mean()) > 1.0  # stepped towards 2 on the other steps


def test_heads_train_from_the_first_member_of_a_joined_file(tmp_path):
    """A joined file (`diffugts join-heads`) as `--backbone`: training fits one head, started from
    the ensemble's first member, and says so; the result is a single head again."""
    from diffugts.models.weights import join_heads

    train.train_backbone("tiny", tmp_path, vae_steps=1, unet_steps=1, n_volumes=2)
    first = build_models(get_preset("tiny"))
    load_weights(first, tmp_path / "backbone.safetensors")
    second = build_models(get_preset("tiny"))
    load_weights(second, tmp_path / "backbone.safetensors")
    second.head.net.load_state_dict(build_models(get_preset("tiny"), seed=7).head.net.state_dict())
    save_weights(first, tmp_path / "a.safetensors")
    save_weights(second, tmp_path / "b.safetensors")
    join_heads([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "joined.safetensors", "tiny")
    report = train.train_heads("tiny", tmp_path / "run", aova_steps=0, head_steps=0, n_cases=2,
                               backbone=tmp_path / "joined.safetensors")
    assert report["head_started_from"] == "the first of the file's 2 joined heads"
    trained = build_models(get_preset("tiny"))
    load_weights(trained, tmp_path / "run" / "demo.safetensors")
    assert trained.preset.head_members == 1 and len(trained.head.more_nets) == 0
    weights = [(key, a, b) for (key, a), b in zip(first.head.state_dict().items(), trained.head.state_dict().values())
               if a.is_floating_point()]
    for key, a, b in weights:
        torch.testing.assert_close(b, a.half().float(), msg=key)  # no steps: the first member, as saved
    assert not torch.allclose(weights[0][2], second.head.state_dict()[weights[0][0]].half().float())


def test_volumes_prepared_on_one_machine_train_on_another(tmp_path):
    """`--save-volumes` writes what `backbone_volumes` prepares (float16) and stops; `--from-volumes`
    trains on it, at the batch sizes asked for."""
    import numpy as np

    from diffugts.cli import main

    prepared = tmp_path / "prepared.npz"
    assert main(["train", "backbone", "--preset", "tiny", "--work", str(tmp_path / "cpu"), "--volumes", "3",
                 "--save-volumes", str(prepared)]) == 0
    assert prepared.is_file() and not (tmp_path / "cpu" / "vae.pt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    preset = get_preset("tiny")
    volumes, held_out = train.load_volumes(prepared, preset)
    reference, reference_held = train.backbone_volumes(preset, 3, 0, train.Sources())
    torch.testing.assert_close(volumes, reference, atol=2**-11, rtol=0)
    assert held_out.keys() == reference_held.keys() == {"phantoms"}

    batches = []
    crop = train._crop
    train._crop = lambda batch, size, rng: batches.append(len(batch)) or crop(batch, size, rng)
    try:
        report = train.train_backbone("tiny", tmp_path / "gpu", vae_steps=2, unet_steps=2, from_volumes=prepared,
                                      vae_batch=3, unet_batch=5)
    finally:
        train._crop = crop
    assert batches == [3, 3, 5]  # two VAE steps; the UNet crops its odd steps only
    assert report["training_volumes"] == 3 and set(report["reconstruction"]) == {"phantoms"}
    assert (tmp_path / "gpu" / "backbone.safetensors").is_file()
    assert np.isfinite(report["unet"]["final_loss"])


def test_a_volumes_file_that_is_missing_or_not_for_this_preset_is_refused(tmp_path):
    import numpy as np
    import pytest

    preset = get_preset("tiny")
    with pytest.raises(ValueError, match="no such file"):
        train.load_volumes(tmp_path / "missing.npz", preset)
    np.savez_compressed(tmp_path / "other.npz", images=np.zeros((1, 1, 32, 32, 32), np.float16))
    (tmp_path / "text.npz").write_text("volumes")
    for name in ("other.npz", "text.npz"):
        with pytest.raises(ValueError, match="not a file written by --save-volumes"):
            train.load_volumes(tmp_path / name, preset)
    with pytest.raises(ValueError, match="each must be at least 1"):
        train.train_backbone("tiny", tmp_path, vae_steps=1, unet_steps=1, n_volumes=1, unet_batch=0)
    train.save_volumes(tmp_path / "demo.npz", torch.zeros(2, 1, 64, 64, 64), {})
    with pytest.raises(ValueError, match=r"train has shape \(2, 1, 64, 64, 64\), the tiny preset trains on"):
        train.load_volumes(tmp_path / "demo.npz", preset)


def test_training_from_prepared_volumes_needs_neither_torchio_nor_simpleitk():
    """A GPU machine gets the volumes prepared elsewhere; the corpus's libraries need not be there."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class Missing:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torchio', 'SimpleITK'):\n"
            "            raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Missing())\n"
            "from diffugts.train import train_backbone, load_volumes\n"
            "print(sorted(m for m in ('torchio', 'SimpleITK') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
