"""Exact rewrites of torch modules for export: the same functions, in forms the CPU runtimes run
faster. Each is applied only while a stage is traced (`export_forms`); the export's parity check
compares the graph with the modules as they are.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F


@contextmanager
def forwards_replaced(replacements: list[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Give each module a replacement `forward` for the duration of the context."""
    for module, forward in replacements:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in replacements:
            del module.forward


@contextmanager
def export_forms(module: torch.nn.Module) -> Iterator[None]:
    """Every rewrite below, on every submodule it applies to."""
    with ExitStack() as stack:
        for form in (layout_free_group_norms, padded_single_output_convs, transposed_upsamplings):
            stack.enter_context(form(module))
        yield


def group_norm_from_moments(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`nn.GroupNorm` as per-channel spatial means, averaged within groups on the small (B, C)
    tensor, then one per-channel scale and shift. The same function (two passes, as stable as
    torch's), traced without reshaping the feature map into groups: the reshape forces OpenVINO
    to reorder every map out of its channels-blocked layout and back (~30% of the demo encoder)."""
    b, c = x.shape[:2]
    groups, spatial = norm.num_groups, tuple(range(2, x.dim()))
    per_channel = (b, c) + (1,) * len(spatial)

    def group_mean(moment):  # (B, C, 1, ...) -> each channel's group average
        grouped = moment.reshape(b, groups, c // groups).mean(2, keepdim=True)
        return grouped.expand(b, groups, c // groups).reshape(per_channel)

    centred = x - group_mean(x.mean(dim=spatial, keepdim=True))
    scale = torch.rsqrt(group_mean((centred * centred).mean(dim=spatial, keepdim=True)) + norm.eps)
    if norm.affine:
        return centred * (scale * norm.weight.reshape(per_channel[1:])) + norm.bias.reshape(per_channel[1:])
    return centred * scale


def layout_free_group_norms(module: torch.nn.Module):
    """Export every 3D group norm as `group_norm_from_moments`.

    This includes MONAI's `MaisiGroupNorm3D`, which normalizes one group at a time to spare GPU
    memory on 512^3 volumes and would trace to a chain of small reductions per group. The parity
    check runs against the modules as they are, outside this context."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    swapped = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)
               and not (isinstance(m, MaisiGroupNorm3D) and m.norm_float16)]
    return forwards_replaced([(m, partial(group_norm_from_moments, m)) for m in swapped])


def _conv_with_padded_outputs(conv: torch.nn.Conv3d, width: int, x: torch.Tensor) -> torch.Tensor:
    weight = torch.cat([conv.weight, conv.weight.new_zeros((width - 1,) + conv.weight.shape[1:])])
    bias = None if conv.bias is None else torch.cat([conv.bias, conv.bias.new_zeros(width - 1)])
    return conv._conv_forward(x, weight, bias)[:, :1]


def padded_single_output_convs(module: torch.nn.Module, width: int = 8):
    """Export 3D convolutions with one output channel as `width` outputs (zero filters), of
    which the first is kept. OpenVINO's CPU plugin has no blocked kernel for a single output
    channel: the residual head's last 1->1 convolution took 90 ms at 64^3 (14 MFLOP), 3 ms padded."""
    swapped = [m for m in module.modules() if type(m) is torch.nn.Conv3d and m.out_channels == 1]
    return forwards_replaced([(m, partial(_conv_with_padded_outputs, m, width)) for m in swapped])


# per axis, the 4 taps of a stride-2 transposed convolution from the 3 of a convolution that
# follows a nearest x2 upsampling: even outputs see (w-1) x[m-1] + (w0 + w+1) x[m], odd ones
# (w-1 + w0) x[m] + (w+1) x[m+1]; zero padding at either resolution is the same zeros
_UPSAMPLED_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsampled_conv_as_transposed(conv: torch.nn.Conv3d, x: torch.Tensor, emb=None) -> torch.Tensor:
    """Nearest x2 upsampling, then a 3x3x3 convolution (padding 1), as one transposed convolution
    on the coarse map: the same function with 27/8 fewer multiply-adds and no upsampled copy."""
    taps = torch.tensor(_UPSAMPLED_TAPS, dtype=conv.weight.dtype)
    kernel = torch.einsum("oiabc,xa,yb,zc->ioxyz", conv.weight, taps, taps, taps)
    return F.conv_transpose3d(x, kernel, conv.bias, stride=2, padding=1)


def _nearest_upsampling_conv(module: torch.nn.Module) -> torch.nn.Conv3d | None:
    """The convolution of a MONAI `Upsample` that is exactly nearest x2 -> 3x3x3 conv, else None."""
    children = list(module.children()) if isinstance(module, torch.nn.Sequential) else []
    if len(children) != 2 or not isinstance(children[0], torch.nn.Upsample):
        return None
    up, conv = children[0], getattr(children[1], "conv", children[1])
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 3
    if up.mode != "nearest" or tuple(float(f) for f in scale) != (2.0, 2.0, 2.0) or type(conv) is not torch.nn.Conv3d:
        return None
    plain = conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) and conv.stride == (1, 1, 1)
    return conv if plain and conv.dilation == (1, 1, 1) and conv.groups == 1 else None


def transposed_upsamplings(module: torch.nn.Module):
    """Export every nearest-x2-then-convolution block (the UNet's upsamplers) as
    `upsampled_conv_as_transposed`: 11% of the demo UNet's time in OpenVINO on this CPU."""
    return forwards_replaced([(m, partial(upsampled_conv_as_transposed, conv)) for m in module.modules()
                              if (conv := _nearest_upsampling_conv(m)) is not None])
