"""The frozen MAISI backbone, configured from a preset (MONAI's classes, not subclassed).

`encode_with_taps` walks the encoder's blocks to expose one feature map per scale; the UNet's
self-attention blocks are switched to keep their attention matrix so a stage can return it.
"""

from __future__ import annotations

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiDownsample
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.blocks.selfattention import SABlock

from ..config import Preset


def build_vae(preset: Preset) -> AutoencoderKlMaisi:
    levels = len(preset.vae_channels)
    return AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1,
        num_channels=list(preset.vae_channels), num_res_blocks=[preset.vae_res_blocks] * levels,
        attention_levels=[False] * levels, latent_channels=preset.latent_channels,
        norm_num_groups=preset.vae_norm_groups, norm_eps=1e-6,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        use_checkpointing=False, use_convtranspose=False,
        num_splits=1, dim_split=1, norm_float16=False, print_info=False, save_mem=False,
    )


def build_unet(preset: Preset) -> DiffusionModelUNetMaisi:
    unet = DiffusionModelUNetMaisi(
        spatial_dims=3, in_channels=preset.latent_channels, out_channels=preset.latent_channels,
        num_channels=list(preset.unet_channels), attention_levels=list(preset.unet_attention),
        num_head_channels=list(preset.unet_head_channels), num_res_blocks=preset.unet_res_blocks,
        norm_num_groups=preset.unet_norm_groups, norm_eps=1e-6,
        resblock_updown=preset.unet_resblock_updown, num_class_embeds=preset.unet_class_embeds,
        include_fc=preset.unet_include_fc, use_flash_attention=False,
        include_top_region_index_input=preset.unet_region_inputs,
        include_bottom_region_index_input=preset.unet_region_inputs,
        include_spacing_input=preset.unet_spacing_input,
    )
    for block in attention_blocks(unet):
        block.save_attn = True  # keeps att_mat (B, heads, N, N) after each forward
    return unet


def attention_blocks(unet: torch.nn.Module) -> list[SABlock]:
    return [m for m in unet.modules() if isinstance(m, SABlock)]


def finest_attention(unet: torch.nn.Module) -> torch.Tensor:
    """Mean over heads and over blocks of the attention at the most tokens: (B, N, N)."""
    mats = [b.att_mat for b in attention_blocks(unet) if b.att_mat.numel()]
    tokens = max(m.shape[-1] for m in mats)
    return torch.stack([m.mean(1) for m in mats if m.shape[-1] == tokens]).mean(0)


def encode_with_taps(vae: AutoencoderKlMaisi, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Latent mean and one tap per scale: before each downsampling, and the deepest features."""
    blocks = list(vae.encoder.blocks)
    taps, h = [], image
    for block in blocks[:-2]:  # the last two are the output norm and convolution
        if isinstance(block, MaisiDownsample):
            taps.append(h)
        h = block(h)
    taps.append(h)
    for block in blocks[-2:]:
        h = block(h)
    return vae.quant_conv_mu(h), taps
