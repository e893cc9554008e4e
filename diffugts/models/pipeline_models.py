"""All DiffuGTS networks of a preset, and the tensor-only stage modules that torch runs and
`diffugts export` turns into ONNX graphs."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Preset
from .aova import AOVAHead
from .backbone import build_unet, build_vae, encode_with_taps, finest_attention
from .residual import ResidualHead
from .text import PromptProjection, SentenceEncoder

TRAINABLE = ("projection", "aova", "head")  # adapters, projections, temperature, residual head
FROZEN = ("vae", "unet")  # the text encoder is frozen and never saved: it ships in its package


class DiffuGTSModels(nn.Module):
    def __init__(self, preset: Preset, text_encoder: SentenceEncoder | None = None):
        super().__init__()
        self.preset = preset
        self.vae = build_vae(preset)
        self.unet = build_unet(preset)
        self.projection = PromptProjection(preset.embed_dim)
        self.aova = AOVAHead(preset.vae_channels, preset.embed_dim, preset.adapter_ratio)
        self.head = build_head(preset)
        self.text_encoder = text_encoder or SentenceEncoder()

    def rebuild_head(self, **shape) -> None:
        """A fresh head of another shape (`head_channels`, `head_levels`, `head_members`,
        `head_mirrors`), the preset saying so, on the old head's device and in its mode; a head of
        that shape already is left as it is."""
        if all(getattr(self.preset, name) == value for name, value in shape.items()):
            return
        old = self.head
        self.preset = self.preset.with_(**shape)
        self.head = build_head(self.preset).to(next(old.parameters()).device).train(old.training)

    def stages(self) -> dict[str, nn.Module]:
        return {
            "text_encoder": TextStage(self.text_encoder, self.projection),
            "vae_encoder_aova": EncodeStage(self.vae, self.aova, self.preset),
            "unet": UNetStage(self.unet, self.preset),
            "vae_decoder": DecodeStage(self.vae),
            "residual_head": ScoreStage(self.head),
        }


def build_head(preset: Preset) -> ResidualHead:
    return ResidualHead(preset.head_channels, mirror_average=preset.head_mirror_average, levels=preset.head_levels,
                        members=preset.head_members, mirrors=preset.head_mirrors)


def build_models(preset: Preset, seed: int = 0) -> DiffuGTSModels:
    torch.manual_seed(seed)
    models = DiffuGTSModels(preset).eval()
    # MONAI zero-initializes the UNet's residual and output convolutions, so an untrained UNet
    # predicts exactly 0; small random weights make untrained presets exercise every path.
    with torch.no_grad():
        for module in models.unet.modules():
            if isinstance(module, nn.Conv3d) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.02)
    return models


class TextStage(nn.Module):
    """(input_ids, attention_mask) (B, Pc, L) -> unit prompt embeddings (B, Pc, E)."""

    def __init__(self, encoder: SentenceEncoder, projection: PromptProjection):
        super().__init__()
        self.encoder, self.projection = encoder, projection

    def forward(self, input_ids, attention_mask):
        batch, prompts, tokens = input_ids.shape
        flat = self.encoder(input_ids.reshape(-1, tokens), attention_mask.reshape(-1, tokens))
        return self.projection(flat).reshape(batch, prompts, -1)


class EncodeStage(nn.Module):
    """(image (B,1,P,P,P), prompt_embeddings (B,Pc,E), abnormal (B,Pc)) -> (latent, anomaly, features)."""

    def __init__(self, vae, aova: AOVAHead, preset: Preset):
        super().__init__()
        self.vae, self.aova, self.latent_factor = vae, aova, preset.latent_factor

    def forward(self, image, prompt_embeddings, abnormal):
        latent, taps = encode_with_taps(self.vae, image)
        anomaly, features = self.aova(taps, prompt_embeddings, abnormal)
        return latent, anomaly, features


class UNetStage(nn.Module):
    """(latent, timestep) -> (prediction, attention): the MAISI UNet with its attention hook.

    Spacing / modality conditioning of MAISI checkpoints is fixed by the preset."""

    def __init__(self, unet, preset: Preset):
        super().__init__()
        self.unet = unet
        self.register_buffer("spacing", torch.tensor([preset.spacing], dtype=torch.float32) * 100.0)
        self.use_spacing = preset.unet_spacing_input
        self.use_class = preset.unet_class_embeds is not None
        self.use_regions = preset.unet_region_inputs

    def forward(self, latent, timestep):
        batch = latent.shape[0]
        kwargs = {}
        if self.use_spacing:
            kwargs["spacing_tensor"] = self.spacing.expand(batch, 3)
        if self.use_class:  # MAISI's modality label: 1 = CT
            kwargs["class_labels"] = torch.ones(batch, dtype=torch.long)
        if self.use_regions:  # whole-body region one-hot (chest..pelvis)
            region = torch.tensor([[0, 1, 1, 0]], dtype=torch.float32).expand(batch, 4)
            kwargs["top_region_index_tensor"] = region
            kwargs["bottom_region_index_tensor"] = region
        prediction = self.unet(latent, timestep.reshape(-1).expand(batch), **kwargs)
        return prediction, finest_attention(self.unet)


class DecodeStage(nn.Module):
    """latent -> image in [0, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent).clamp(0.0, 1.0)


class ScoreStage(nn.Module):
    """Residual head: (image, healthy, anomaly, healthy_anomaly, features, healthy_features) -> logits."""

    def __init__(self, head: ResidualHead):
        super().__init__()
        self.head = head

    def forward(self, image, healthy, anomaly, healthy_anomaly, features, healthy_features):
        return self.head(image, healthy, anomaly, healthy_anomaly, features, healthy_features)
