"""Torch models: stage shapes and semantics, text encoder reference, weight loaders."""

import numpy as np
import pytest
import torch

from diffugts.config import get_preset
from diffugts.io import InputError
from diffugts.models.backbone import build_unet, build_vae, encode_with_taps
from diffugts.models.weights import load_maisi_checkpoints, load_weights, save_weights

TINY = get_preset("tiny")


def test_stage_shapes(tiny_models):
    stages = tiny_models.stages()
    image = torch.rand(1, 1, TINY.patch, TINY.patch, TINY.patch)
    prompts = torch.nn.functional.normalize(torch.randn(1, 6, TINY.embed_dim), dim=-1)
    abnormal = torch.tensor([[0, 0, 0, 1, 1, 1.0]])
    with torch.inference_mode():
        latent, anomaly, features = stages["vae_encoder_aova"](image, prompts, abnormal)
        lat = TINY.latent_patch
        assert latent.shape == (1, TINY.latent_channels, lat, lat, lat)
        assert anomaly.shape == image.shape and float(anomaly.min()) >= 0 and float(anomaly.max()) <= 1
        assert features.shape == (1, TINY.embed_dim, lat, lat, lat)
        torch.testing.assert_close(features.norm(dim=1), torch.ones(1, lat, lat, lat))
        _, all_abnormal, _ = stages["vae_encoder_aova"](image, prompts, torch.ones(1, 6))
        torch.testing.assert_close(all_abnormal, torch.ones_like(all_abnormal))

        prediction, attention = stages["unet"](latent, torch.tensor([100.0]))
        assert prediction.shape == latent.shape
        tokens = (lat // 2) ** 3  # the finest attention level of the tiny UNet is one downsampling deep
        assert attention.shape == (1, tokens, tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones(1, tokens))

        healthy = stages["vae_decoder"](latent)
        assert healthy.shape == image.shape
        logits = stages["residual_head"](image, healthy, anomaly, anomaly, features, features)
        assert logits.shape == image.shape


def test_taps_walk_the_encoder_like_monai(tiny_models):
    image = torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        latent, taps = encode_with_taps(tiny_models.vae, image)
        z_mu, _ = tiny_models.vae.encode(image)
    torch.testing.assert_close(latent, z_mu)
    assert [t.shape[1:] for t in taps] == [(8, 32, 32, 32), (16, 16, 16, 16), (16, 8, 8, 8)]


def test_text_encoder_matches_sentence_transformers(tiny_models):
    from sentence_transformers import SentenceTransformer

    from diffugts.models.text import minilm_dir
    from diffugts.tokenizer import tokenize

    texts = ["a CT scan of healthy kidney", "kidney tumor", "an abnormal lesion in the liver on MR"]
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    ids, mask = tokenize(texts)
    with torch.inference_mode():
        ours = tiny_models.text_encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert (ours[1] @ ours[0]) > (ours[1] @ ours[2]) - 1.0  # sanity: finite similarities


def test_safetensors_round_trip(tiny_models, tmp_path):
    from diffugts.models import build_models

    path = tmp_path / "w.safetensors"
    save_weights(tiny_models, path)
    other = build_models(TINY, seed=123)
    assert not torch.equal(next(other.head.parameters()), next(tiny_models.head.parameters()))
    load_weights(other, path)
    for part in ("vae", "unet", "aova", "head", "projection"):
        for (k, a), b in zip(getattr(tiny_models, part).state_dict().items(),
                             getattr(other, part).state_dict().values()):
            assert torch.equal(a, b), k


def test_a_file_holding_a_deeper_head_loads_under_the_named_preset(tiny_models, tmp_path):
    """A head trained at another depth (`train heads --head-levels`) rebuilds the head on load,
    with the preset saying its depth; the shipped files, saved before the field, are 3 levels."""
    from diffugts.models import build_models
    from diffugts.models.pipeline_models import build_head
    from diffugts.train import _fresh_head_of_depth

    deep = build_models(TINY, seed=5)
    _fresh_head_of_depth(deep, 4)
    assert deep.preset.head_levels == 4 and deep.head.levels == 4
    path = tmp_path / "deep.safetensors"
    save_weights(deep, path)
    models = build_models(TINY, seed=6)
    assert models.head.levels == 3
    load_weights(models, path)
    assert models.preset.head_levels == 4 and not models.head.training
    views = torch.rand(1, 6, 32, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(models.head.net(views), deep.eval().head.net(views))
    assert sum(p.numel() for p in models.head.parameters()) > sum(p.numel() for p in build_head(TINY).parameters())

    shallow = tmp_path / "shallow.safetensors"
    save_weights(tiny_models, shallow)
    load_weights(models, shallow)  # back to the default depth
    assert models.preset.head_levels == 3 and models.head.levels == 3
    with pytest.raises(ValueError, match="at least 2 levels"):
        build_head(TINY.with_(head_levels=1))


def test_missing_and_mismatched_weights_are_clear(tiny_models, tmp_path):
    with pytest.raises(InputError, match="weights file not found"):
        load_weights(tiny_models, tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_weights(tiny_models, bad)
    demo_like = build_vae(get_preset("demo"))
    path = tmp_path / "vae.pt"
    torch.save(demo_like.state_dict(), path)
    with pytest.raises(InputError, match="shape mismatches"):
        load_maisi_checkpoints(tiny_models, autoencoder=path)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.slow
def test_maisi_sized_checkpoints_load_through_our_loader(tmp_path):
    """MAISI-sized networks saved as MONAI's bundle does, reloaded into the maisi preset."""
    from diffugts.models import build_models

    preset = get_preset("maisi")
    torch.manual_seed(1)
    vae, unet = build_vae(preset), build_unet(preset)
    assert 20e6 < n_params(vae) < 22e6  # ~21M
    assert 150e6 < n_params(unet) < 200e6
    torch.save(vae.state_dict(), tmp_path / "autoencoder_v1.pt")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.0123),
                "num_train_timesteps": 1000}, tmp_path / "diff_unet_3d_rflow-ct.pt")
    del vae
    models = build_models(preset, seed=2)
    scale = load_maisi_checkpoints(models, tmp_path / "autoencoder_v1.pt", tmp_path / "diff_unet_3d_rflow-ct.pt")
    assert scale == pytest.approx(1.0123)
    for name, value in unet.state_dict().items():
        assert torch.equal(models.unet.state_dict()[name], value), name
    with pytest.raises(InputError, match="MAISI diffusion UNet"):
        load_maisi_checkpoints(models, unet=tmp_path / "autoencoder_v1.pt")


def test_bundled_demo_weights():
    from safetensors import safe_open

    from diffugts.models import build_models
    from diffugts.config import bundled_weights

    preset = get_preset("demo")
    path = bundled_weights(preset)
    assert path.stat().st_size <= 40 * 1024**2
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert float(f.metadata()["scale_factor"]) > 0
        groups = {k.split(".")[0] for k in f.keys()}
    assert groups == {"vae", "unet", "aova", "projection", "head"}
    models = build_models(preset)
    metadata = load_weights(models, path)
    assert models.preset.scale_factor == pytest.approx(float(metadata["scale_factor"]))
    assert models.preset.scale_factor != 1.0


def test_residual_head_local_contrast_is_a_gaussian_high_pass():
    from scipy import ndimage

    from diffugts.models.residual import ResidualHead

    head = ResidualHead(channels=4, blur_sigma=2.0)
    image = torch.rand(1, 1, 20, 18, 16)
    ones = torch.ones(1, 1, 20, 18, 16)
    features = torch.nn.functional.normalize(torch.rand(1, 8, 5, 5, 4), dim=1)
    views = head.views(image, image, 0.1 * ones, 0.1 * ones, features, features)
    reference = image[0, 0].numpy() - ndimage.gaussian_filter(image[0, 0].numpy(), 2.0, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(views[0, 1].numpy(), 20.0 * reference, atol=1e-4)
    # nothing inpainted: the residual views are zero, the map's views are the map (x10) and zero
    assert float(views[0, 2].abs().max()) == 0.0 and float(views[0, 5].abs().max()) < 1e-5
    np.testing.assert_allclose(views[0, 3].numpy(), 1.0, atol=1e-6)
    assert float(views[0, 4].abs().max()) == 0.0


def test_aova_adapter_is_its_linear_layers_applied_per_voxel():
    from diffugts.models.aova import FeatureAdapter

    torch.manual_seed(0)
    adapter = FeatureAdapter(12, ratio=0.3).eval()
    features = torch.randn(2, 12, 5, 4, 3) * 7.0
    with torch.no_grad():  # the channels-last formula the 1x1x1 convolutions replace
        x = torch.nn.functional.instance_norm(features).permute(0, 2, 3, 4, 1)
        reference = (0.3 * adapter.transform(x) + 0.7 * x).permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(adapter(features), reference, rtol=1e-5, atol=1e-5)
    assert set(adapter.state_dict()) == {"transform.0.weight", "transform.0.bias", "transform.2.weight",
                                         "transform.2.bias"}  # bundled weights keep loading


def test_mirror_averaged_head_is_the_mean_over_eight_mirrorings_and_exports(tmp_path):
    """Test-time mirroring: the mean probability of the net over the 8 flips of its views (each
    flipped back), so a mirrored scan gets the mirrored mask; the graph agrees in both engines,
    batch 2 included (the 8 mirrorings ride in the batch axis)."""
    import itertools

    from diffugts.export.onnx_export import export_stage
    from diffugts.models import build_models
    from diffugts.models.pipeline_models import ScoreStage

    preset = get_preset("tiny").with_(head_mirror_average=True)
    models = build_models(preset, seed=3)
    head = models.head.eval()
    torch.manual_seed(0)
    inputs = [torch.rand(2, 1, 16, 16, 16) for _ in range(4)] + [torch.nn.functional.normalize(
        torch.randn(2, preset.embed_dim, 4, 4, 4), dim=1) for _ in range(2)]
    with torch.no_grad():
        views = head.views(*inputs)
        axes_sets = [a for k in range(4) for a in itertools.combinations((2, 3, 4), k)]
        reference = torch.stack([torch.sigmoid(head.net(views.flip(a)).flip(a)) if a else torch.sigmoid(head.net(views))
                                 for a in axes_sets]).mean(0)
        averaged = torch.sigmoid(head(*inputs))
        torch.testing.assert_close(averaged, reference, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(averaged, torch.sigmoid(head.net(views)), atol=1e-3)  # not the plain head
        flipped = torch.sigmoid(head(*[x.flip(3) for x in inputs]))
        torch.testing.assert_close(flipped, averaged.flip(3), rtol=1e-4, atol=1e-5)
    report = export_stage(preset, "residual_head", ScoreStage(head), tmp_path / "head.onnx",
                          engines=("onnxruntime", "openvino"))
    assert all(isinstance(errors, dict) and errors for errors in report.values()), report
    # the bench counts its FLOPs: 8 times the plain head's network at the same shapes (the views
    # and the averaging add no convolutions to speak of)
    from diffugts.benchmarks.flops import graph_flops
    from diffugts.export.onnx_export import example_inputs

    shapes = {k: v.shape for k, v in example_inputs(preset, "residual_head").items()}
    head.mirror_average = False
    export_stage(preset, "residual_head", ScoreStage(head), tmp_path / "plain.onnx")
    mirrored, plain = graph_flops(str(tmp_path / "head.onnx"), shapes), graph_flops(str(tmp_path / "plain.onnx"), shapes)
    assert 7.0 < mirrored / plain < 8.0, (mirrored, plain)


def test_mirror_average_keeps_its_digits_where_the_head_is_sure(tmp_path):
    """Far from any lesion a trained head's logits reach -20 and below: the averaged logit must
    follow them there too, in torch and in the exported graph (a clamped probability gave -13.8,
    and engines' sigmoids disagreed by more than the export's tolerance)."""
    import itertools

    import onnxruntime as ort

    from diffugts.models.residual import averaged_logits

    ramp = torch.linspace(-2.0, 2.0, 4)  # along the last axis: the mirrorings that flip it disagree

    class Sure(torch.nn.Module):
        def forward(self, views):
            return averaged_logits([lambda v: 60.0 * v - 40.0 + ramp], views)  # logits in [-42, 22]

    views = torch.rand(2, 1, 6, 5, 4)
    axes_sets = [a for k in range(4) for a in itertools.combinations((2, 3, 4), k)]
    # the net is pointwise plus the ramp, so flipping its input and its output back flips the ramp alone
    logits = [(60.0 * views - 40.0 + (ramp.flip(0) if 4 in a else ramp)).double() for a in axes_sets]
    p = torch.stack([torch.sigmoid(x) for x in logits]).mean(0)
    reference = (torch.log(p) - torch.log1p(-p)).float()
    got = Sure()(views)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)
    assert float(got.min()) < -35.0  # not clamped
    torch.onnx.export(Sure(), (views,), str(tmp_path / "sure.onnx"), dynamo=False, input_names=["views"],
                      output_names=["logits"], dynamic_axes={"views": {0: "b"}})
    (served,) = ort.InferenceSession(str(tmp_path / "sure.onnx")).run(None, {"views": views.numpy()})
    np.testing.assert_allclose(served, reference.numpy(), rtol=0, atol=1e-4)


def test_split_heads_gives_back_each_member_and_join_heads_rebuilds_the_file(tmp_path, capsys):
    """`diffugts split-heads`: each member of an ensemble as a one-member file beside the same
    networks; joining the parts again gives the ensemble's tensors exactly. A one-member file and a
    missing member are refused."""
    from safetensors.torch import load_file

    from diffugts.cli import main
    from diffugts.models import build_models
    from diffugts.models.weights import one_member_only, join_heads, split_heads

    preset = get_preset("tiny")
    files = []
    for seed in (4, 5):
        models = build_models(preset, seed=3)
        models.head.net.load_state_dict(build_models(preset, seed=seed).head.net.state_dict())
        files.append(tmp_path / f"head{seed}.safetensors")
        save_weights(models, files[-1], half=True)
    join_heads(files, tmp_path / "pair.safetensors", "tiny", mirrors=4)
    assert main(["split-heads", str(tmp_path / "pair.safetensors"), "--out", str(tmp_path / "parts"),
                 "--preset", "tiny"]) == 0
    assert '"members": 2' in capsys.readouterr().out
    for member, original in enumerate(files, 1):
        part, want = load_file(tmp_path / "parts" / f"member{member}.safetensors"), load_file(original)
        assert part.keys() == want.keys() and all(torch.equal(part[k], want[k]) for k in want), member
    join_heads([tmp_path / "parts" / "member1.safetensors", tmp_path / "parts" / "member2.safetensors"],
               tmp_path / "again.safetensors", "tiny", mirrors=4)
    again, pair = load_file(tmp_path / "again.safetensors"), load_file(tmp_path / "pair.safetensors")
    assert again.keys() == pair.keys() and all(torch.equal(again[k], pair[k]) for k in pair)

    assert main(["split-heads", str(files[0]), "--out", str(tmp_path / "none"), "--preset", "tiny"]) == 2
    assert "its head has one member: nothing to split" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    one = build_models(preset, seed=3)
    with pytest.raises(ValueError, match="the head has 1 member"):
        one_member_only(one, 2)


def test_joined_heads_average_their_probabilities_and_refuse_another_loop(tmp_path):
    """`diffugts join-heads`: the joined file's head is the mean probability of the files' heads
    (over their mirrorings too), loads under the named preset, exports; files whose heads were fed
    by other networks are refused, before anything is written."""
    import onnx

    from diffugts.export.onnx_export import export_stage
    from diffugts.models import build_models
    from diffugts.models.pipeline_models import ScoreStage
    from diffugts.models.weights import join_heads

    preset = get_preset("tiny").with_(head_mirror_average=True)
    base = build_models(preset, seed=3)
    files = []
    for seed in (4, 5):
        other = build_models(preset, seed=3)
        other.head.net.load_state_dict(build_models(preset, seed=seed).head.net.state_dict())
        files.append(tmp_path / f"head{seed}.safetensors")
        save_weights(other, files[-1], half=True)  # as the joined file is written: the same values
    save_weights(base, tmp_path / "base.safetensors", half=True)
    report = join_heads([tmp_path / "base.safetensors", *files], tmp_path / "joined.safetensors", "tiny")
    assert report["members"] == 3
    joined = build_models(get_preset("tiny"), seed=9)
    load_weights(joined, tmp_path / "joined.safetensors")
    assert joined.preset.head_members == 3 and len(joined.head.more_nets) == 2 and not joined.head.training
    singles = [build_models(get_preset("tiny"), seed=9) for _ in range(3)]
    for single, path in zip(singles, [tmp_path / "base.safetensors", *files]):
        load_weights(single, path)
        single.head.mirror_average = True
    torch.manual_seed(0)
    inputs = [torch.rand(1, 1, 16, 16, 16) for _ in range(4)] + [torch.nn.functional.normalize(
        torch.randn(1, preset.embed_dim, 4, 4, 4), dim=1) for _ in range(2)]
    joined.head.mirror_average = True
    with torch.no_grad():
        reference = torch.stack([torch.sigmoid(s.head(*inputs)) for s in singles]).mean(0)
        averaged = torch.sigmoid(joined.head(*inputs))
        torch.testing.assert_close(averaged, reference, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(averaged, torch.sigmoid(singles[0].head(*inputs)), atol=1e-3)
        joined.head.mirror_average = False  # members alone, no mirrorings
        views = joined.head.views(*inputs)
        plain = torch.stack([torch.sigmoid(n(views)) for n in (joined.head.net, *joined.head.more_nets)]).mean(0)
        torch.testing.assert_close(torch.sigmoid(joined.head(*inputs)), plain, rtol=1e-4, atol=1e-5)
    # the graph holds every member (ONNX Runtime's parity against torch is checked inside export_stage)
    joined.head.mirror_average = True
    errors = export_stage(joined.preset, "residual_head", ScoreStage(joined.head.eval()), tmp_path / "joined.onnx")
    export_stage(singles[0].preset, "residual_head", ScoreStage(singles[0].head.eval()), tmp_path / "single.onnx")
    assert errors and all(np.isfinite(e) for e in errors.values())
    convs = [sum(n.op_type == "Conv" for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
             for name in ("joined", "single")]
    assert convs[0] == 3 * convs[1] - 2 * 3, convs  # three UNets; the blur's three convolutions once

    # two members on 4 mirrorings each: the identity and the three single flips
    report = join_heads([tmp_path / "base.safetensors", files[0]], tmp_path / "pair.safetensors", "tiny", mirrors=4)
    assert report == {**report, "members": 2, "mirrors": 4}
    pair = build_models(get_preset("tiny"), seed=9)
    load_weights(pair, tmp_path / "pair.safetensors")
    pair.head.mirror_average = True
    assert pair.preset.head_mirrors == 4
    with torch.no_grad():
        views = pair.head.views(*inputs)
        reference = torch.stack([torch.sigmoid(n(views.flip(a)).flip(a)) if a else torch.sigmoid(n(views))
                                 for n in (singles[0].head.net, singles[1].head.net)
                                 for a in ((), (2,), (3,), (4,))]).mean(0)
        torch.testing.assert_close(torch.sigmoid(pair.head(*inputs)), reference, rtol=1e-4, atol=1e-5)
    for wrong in (0, 9):
        with pytest.raises(ValueError, match=f"1 to 8 mirrorings, got {wrong}"):
            join_heads([tmp_path / "base.safetensors", files[0]], tmp_path / "no.safetensors", "tiny", mirrors=wrong)

    foreign = build_models(preset, seed=3)
    with torch.no_grad():
        next(foreign.aova.parameters()).add_(0.1)
    save_weights(foreign, tmp_path / "foreign.safetensors", half=True)
    with pytest.raises(InputError, match="its aova differs from .*base.safetensors's"):
        join_heads([tmp_path / "base.safetensors", tmp_path / "foreign.safetensors"], tmp_path / "no.safetensors",
                   "tiny")
    assert not (tmp_path / "no.safetensors").exists()
