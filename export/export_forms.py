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
        for form in (layout_free_group_norms, padded_single_output_convs, transposed_upsamplings,
                     coarse_single_channel_upsamplers):
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


def transposed_as_parities(conv: torch.nn.ConvTranspose3d) -> torch.Tensor:
    """The kernel of a stride-2 transposed convolution (kernel 3, padding 1, output padding 1) to
    one channel, as a 2x2x2 convolution of the coarse map (padded by one at the end) with 8
    outputs, one per parity of the fine voxel (channel 4 r0 + 2 r1 + r2). Per axis, fine voxel
    2i + r gets tap 1 from coarse voxel i if r is even; tap 2 from i and tap 0 from i + 1 if odd."""
    select = torch.zeros(2, 2, 3)  # (parity, coarse offset, tap)
    select[0, 0, 1] = select[1, 0, 2] = select[1, 1, 0] = 1.0
    return torch.einsum("ioxyz,pax,qby,rcz->pqroiabc", conv.weight, select, select, select).reshape(
        8, conv.in_channels, 2, 2, 2)


def conv_on_parities(conv: torch.nn.Conv3d) -> torch.Tensor:
    """The kernel of a 3x3x3 one-channel convolution (padding 1) of the fine map, as a convolution
    of its 8 parity channels (padding 1): fine offset d from parity r reads parity (r + d) % 2 at
    coarse offset (r + d) // 2. Zero padding of the fine map is zero padding of the coarse one."""
    select = torch.zeros(2, 2, 3, 3)  # (parity, parity read, coarse offset + 1, fine offset + 1)
    for parity in (0, 1):
        for d in (-1, 0, 1):
            select[parity, (parity + d) % 2, (parity + d) // 2 + 1, d + 1] = 1.0
    return torch.einsum("xyz,paux,qbvy,rcwz->pqrabcuvw", conv.weight[0, 0], select, select, select).reshape(
        8, 8, 3, 3, 3)


def parities_to_fine(parities: torch.Tensor) -> torch.Tensor:
    """(B, 8, X, Y, Z) parity channels -> (B, 1, 2X, 2Y, 2Z): a 3D depth-to-space."""
    b, _, x, y, z = parities.shape
    return parities.reshape(b, 2, 2, 2, x, y, z).permute(0, 4, 1, 5, 2, 6, 3).reshape(b, 1, 2 * x, 2 * y, 2 * z)


_PARAMETER_FREE = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.ELU, torch.nn.Tanh,
                   torch.nn.Sigmoid)


def _pointwise_on_parities(layers) -> list | None:
    """One-channel norm/dropout/activation layers (eval mode) as functions of all 8 parity
    channels, their constants made here, not traced; None where a layer is not one of those."""
    functions = []
    for layer in layers:
        if isinstance(layer, torch.nn.BatchNorm3d):
            if layer.num_features != 1 or layer.training or not layer.track_running_stats or not layer.affine:
                return None
            scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            shift = layer.bias - layer.running_mean * scale
            functions.append(partial(torch.addcmul, shift.expand(8).reshape(8, 1, 1, 1).clone(),
                                     tensor2=scale.expand(8).reshape(8, 1, 1, 1).clone()))
        elif isinstance(layer, torch.nn.PReLU):
            if layer.num_parameters != 1:
                return None
            functions.append(partial(F.prelu, weight=layer.weight.detach().clone()))
        elif isinstance(layer, _PARAMETER_FREE):
            functions.append(layer)
        elif not isinstance(layer, (torch.nn.Dropout, torch.nn.Identity)):
            return None
    return functions


def _adn(unit) -> list:
    return list(unit.adn.children()) if hasattr(unit, "adn") else []


def upsampler_on_parities(module: torch.nn.Module):
    """Where `module` is MONAI UNet's top up-layer in eval mode (a transposed convolution to one
    channel, its norm and activation, then a residual 3x3x3 one-channel convolution), the same
    function computed on the coarse grid's 8 parity channels and made fine once at the end; else
    None. OpenVINO's CPU kernels block 8 output channels, and at one channel the fine-grid layers
    took 110 of the 8-mirror head's 290 ms on this CPU (the padded convolution above still wasted
    7 of every 8 outputs). The kernels are made here, once: a graph that built them would carry
    the einsums as nodes."""
    from monai.networks.blocks import Convolution, ResidualUnit

    children = list(module.children()) if type(module) is torch.nn.Sequential else []
    if len(children) != 2 or not isinstance(children[0], Convolution) or not isinstance(children[1], ResidualUnit):
        return None
    up, refine = children
    if type(up.conv) is not torch.nn.ConvTranspose3d or up.conv.out_channels != 1 or up.conv.groups != 1 or (
            up.conv.kernel_size, up.conv.stride, up.conv.padding, up.conv.output_padding, up.conv.dilation) != (
            (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1)):
        return None
    if len(refine.conv) != 1 or type(refine.residual) is not torch.nn.Identity:
        return None
    unit = refine.conv.unit0
    inner = unit.conv
    if type(inner) is not torch.nn.Conv3d or inner.in_channels != 1 or inner.out_channels != 1 or (
            inner.kernel_size, inner.stride, inner.padding, inner.dilation) != ((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)):
        return None
    with torch.no_grad():
        up_layers, refine_layers = _pointwise_on_parities(_adn(up)), _pointwise_on_parities(_adn(unit))
        if up_layers is None or refine_layers is None:
            return None
        up_kernel, refine_kernel = transposed_as_parities(up.conv), conv_on_parities(inner)
        up_bias = None if up.conv.bias is None else up.conv.bias.expand(8).clone()
        refine_bias = None if inner.bias is None else inner.bias.expand(8).clone()

    def forward(x: torch.Tensor) -> torch.Tensor:
        parities = F.conv3d(F.pad(x, (0, 1, 0, 1, 0, 1)), up_kernel, up_bias)
        for layer in up_layers:
            parities = layer(parities)
        refined = F.conv3d(parities, refine_kernel, refine_bias, padding=1)
        for layer in refine_layers:
            refined = layer(refined)
        return parities_to_fine(parities + refined)
    return forward


def coarse_single_channel_upsamplers(module: torch.nn.Module):
    """Export MONAI UNets' one-channel top up-layers (the residual head's) as `upsampler_on_parities`."""
    return forwards_replaced([(m, forward) for m in module.modules()
                              if (forward := upsampler_on_parities(m)) is not None])
