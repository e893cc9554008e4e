"""The wire contract of every stage: tensor names, dtypes and per-item shapes (no batch dim).

One table read by the exporter, the Triton config writer, the ONNX Runtime executor and the
gRPC client, so that a name is spelled once. -1 is a dynamic dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Preset
from .tokenizer import MAX_TOKENS as TOKENS


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton dtype name without TYPE_: FP32, INT64, BYTES, UINT8, FP64, BOOL
    dims: tuple[int, ...]
    optional: bool = False  # a request may leave it out (inputs added later: older clients still work)


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int = 8


ONNX_STAGES = ("text_encoder", "vae_encoder_aova", "unet", "vae_decoder", "residual_head")


def stage_specs(preset: Preset) -> dict[str, StageSpec]:
    p, lat, c, e = preset.patch, preset.latent_patch, preset.latent_channels, preset.embed_dim
    image = (1, p, p, p)
    latent = (c, lat, lat, lat)
    latent_box, image_box = (c, -1, -1, -1), (1, -1, -1, -1)  # the loop decodes its cropped box
    features = (e, lat, lat, lat)
    specs = [
        # the batch is the volume everywhere: a volume's prompt set rides along as a (Pc, ...) item
        StageSpec("text_tokenizer", (Tensor("prompts", "BYTES", (-1,)),),
                  (Tensor("input_ids", "INT64", (-1, TOKENS)), Tensor("attention_mask", "INT64", (-1, TOKENS)))),
        StageSpec("text_encoder",
                  (Tensor("input_ids", "INT64", (-1, TOKENS)), Tensor("attention_mask", "INT64", (-1, TOKENS))),
                  (Tensor("prompt_embeddings", "FP32", (-1, e)),)),
        StageSpec("vae_encoder_aova",
                  (Tensor("image", "FP32", image), Tensor("prompt_embeddings", "FP32", (-1, e)),
                   Tensor("abnormal", "FP32", (-1,))),
                  (Tensor("latent", "FP32", latent), Tensor("anomaly", "FP32", image),
                   Tensor("features", "FP32", features))),
        StageSpec("unet", (Tensor("latent", "FP32", (c, -1, -1, -1)), Tensor("timestep", "FP32", (1,))),
                  (Tensor("prediction", "FP32", (c, -1, -1, -1)), Tensor("attention", "FP32", (-1, -1)))),
        StageSpec("vae_decoder", (Tensor("latent", "FP32", latent_box),), (Tensor("healthy", "FP32", image_box),)),
        StageSpec("residual_head",
                  (Tensor("image", "FP32", image), Tensor("healthy", "FP32", image), Tensor("anomaly", "FP32", image),
                   Tensor("healthy_anomaly", "FP32", image), Tensor("features", "FP32", features),
                   Tensor("healthy_features", "FP32", features)),
                  (Tensor("logits", "FP32", image),)),
    ]
    return {s.name: s for s in specs}


def ensemble_specs(preset: Preset) -> dict[str, StageSpec]:
    stages = stage_specs(preset)
    enc, head = stages["vae_encoder_aova"], stages["residual_head"]
    prompt_embeddings, abnormal = enc.inputs[1], enc.inputs[2]
    return {
        "encode_aova": StageSpec(
            "encode_aova", (Tensor("prompts", "BYTES", (-1,)), enc.inputs[0], abnormal),
            enc.outputs + (prompt_embeddings,)),
        "score": StageSpec(
            "score", (head.inputs[0], head.inputs[1], head.inputs[2], head.inputs[4], prompt_embeddings, abnormal),
            head.outputs),
    }


PIPELINE = StageSpec(
    "diffugts_pipeline",
    (Tensor("volume", "FP32", (-1, -1, -1)), Tensor("affine", "FP64", (4, 4)), Tensor("prompt", "BYTES", (1,)),
     Tensor("modality", "BYTES", (1,)), Tensor("seed", "INT64", (1,)), Tensor("crop", "BOOL", (1,)),
     Tensor("organ", "BOOL", (1,), optional=True),  # restrict the maps to the target's organ (LoopOptions.organ)
     Tensor("all_components", "BOOL", (1,), optional=True)),  # keep every component (LoopOptions.all_components)
    (Tensor("mask", "UINT8", (-1, -1, -1)), Tensor("anomaly", "FP32", (-1, -1, -1)),
     Tensor("timings", "BYTES", (1,)), Tensor("notices", "BYTES", (1,))),  # timings, notices: JSON
    max_batch_size=0,
)


def output_shapes(preset: Preset, model: str, inputs: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of a model's outputs for given input arrays (sizes shared-memory regions)."""
    if model in ("encode_aova", "vae_encoder_aova"):
        b = inputs["image"].shape[0]
        lat, c, e = preset.latent_patch, preset.latent_channels, preset.embed_dim
        shapes = {"latent": (b, c, lat, lat, lat), "anomaly": inputs["image"].shape,
                  "features": (b, e, lat, lat, lat)}
        if model == "encode_aova":
            shapes["prompt_embeddings"] = (b, inputs["abnormal"].shape[1], e)
        return shapes
    if model == "unet":
        latent = inputs["latent"].shape
        level = preset.unet_attention.index(True)
        tokens = 1
        for n in latent[2:]:
            tokens *= n // 2**level
        return {"prediction": latent, "attention": (latent[0], tokens, tokens)}
    if model == "vae_decoder":
        b, _, *side = inputs["latent"].shape
        return {"healthy": (b, 1, *(n * preset.latent_factor for n in side))}
    if model in ("score", "residual_head"):
        return {"logits": inputs["image"].shape}
    raise KeyError(model)
