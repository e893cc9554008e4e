"""Pixel- and feature-level residual head: (x, x_h, |x - x_h|, M, M_h, feature distance) -> logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_INPUTS = 6
# channels of `ResidualHead.views` that training drops at random (the image's views always stay)
VIEW_GROUPS = {"residual": (2, 5), "map": (3, 4)}


class ResidualHead(nn.Module):
    """A small MONAI UNet (three levels by default) on fixed, scaled views of the six inputs.

    The lesions it must find differ from their surroundings by ~0.02 in MAISI's intensity range
    (45 HU of CT) against 0.5 between air and tissue, so the inputs are put on a common scale
    before the first convolution: the image centred, its local contrast (image minus a Gaussian
    blur), the residuals and maps scaled up. Batch norm, not instance norm: the head is trained on
    crops around lesions and runs on whole patches, and per-crop statistics would differ."""

    def __init__(self, channels: int, blur_sigma: float = 2.0, mirror_average: bool = False, levels: int = 3,
                 members: int = 1, mirrors: int = 8):
        super().__init__()
        if levels < 2:
            raise ValueError(f"the residual head needs at least 2 levels, got {levels}")
        if members < 1:
            raise ValueError(f"the residual head needs at least 1 member, got {members}")
        if not 1 <= mirrors <= len(MIRRORS):
            raise ValueError(f"the residual head averages 1 to {len(MIRRORS)} mirrorings, got {mirrors}")
        self.mirror_average, self.levels, self.members = mirror_average, levels, members
        self.mirrors = MIRRORS[:mirrors]
        from monai.networks.layers.convutils import gaussian_1d
        from monai.networks.nets import UNet

        kernel = gaussian_1d(blur_sigma, truncated=3.0, approx="sampled", normalize=True).float()
        self.register_buffer("blur_kernel", kernel, persistent=False)

        def unet():
            return UNet(spatial_dims=3, in_channels=RESIDUAL_INPUTS, out_channels=1,
                        channels=tuple(channels * 2**level for level in range(levels)),
                        strides=(2,) * (levels - 1), num_res_units=1, norm="batch")

        self.net = unet()  # the one training fits
        # an ensemble's other members (trained apart, joined after): at inference their probabilities
        # are averaged with `net`'s. Empty for a single head, whose weights keep their names
        self.more_nets = nn.ModuleList(unet() for _ in range(members - 1))

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian with edge padding, one 1D convolution per axis. Equal to MONAI's
        `separable_filtering(x, [kernel] * 3, mode="replicate")`, which the ONNX exporter rejects
        ("convolution for kernel of unknown shape"): here the kernel shapes are Python constants."""
        radius = self.blur_kernel.numel() // 2
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = -1
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            x = F.conv3d(F.pad(x, pad, mode="replicate"), self.blur_kernel.view(shape))
        return x

    def views(self, image, healthy, anomaly, healthy_anomaly, features, healthy_features) -> torch.Tensor:
        """The network's input channels (training crops these, so it computes them once)."""
        # feature residual: cosine distance of the projected features, at latent resolution
        distance = 1.0 - (features * healthy_features).sum(1, keepdim=True)
        distance = F.interpolate(distance, size=image.shape[2:], mode="trilinear", align_corners=False)
        return torch.cat([image - 0.5, 20.0 * (image - self.blur(image)), 20.0 * (image - healthy).abs(),
                          10.0 * anomaly, 10.0 * (anomaly - healthy_anomaly).clamp(min=0), 10.0 * distance], dim=1)

    def forward(self, image, healthy, anomaly, healthy_anomaly, features, healthy_features):
        views = self.views(image, healthy, anomaly, healthy_anomaly, features, healthy_features)
        if self.training or not (self.mirror_average or self.more_nets):
            return self.net(views)
        return averaged_logits([self.net, *self.more_nets], views, self.mirrors if self.mirror_average else ((),))


# every subset of the three spatial axes: the 8 mirrorings of a volume
MIRRORS = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    """log(mean(exp(x))) over axis 0, shifted by the maximum so nothing overflows or underflows
    (written out: each engine runs the same Max/Exp/Sum/Log ops)."""
    peak = x.amax(0)
    return peak + torch.log((x - peak).exp().mean(0))


def averaged_logits(nets, views: torch.Tensor, mirrors=MIRRORS) -> torch.Tensor:
    """Every net on the `mirrors` of `views` (one batch a net), each output mirrored back; the
    logit of the mean probability over nets and mirrorings alike (the pipeline takes the sigmoid,
    as of a plain head's logits)."""
    batch = torch.cat([views.flip(axes) if axes else views for axes in mirrors])
    back = []
    for net in nets:
        logits = net(batch)
        # (mirror, batch, ...): the batch stays dynamic in a graph. Not `unflatten`, whose exported
        # shape arithmetic (a Slice of the shape at computed bounds) stops ONNX Runtime's symbolic
        # shape inference, and with it the bench's FLOP count
        chunks = logits.reshape((len(mirrors), -1) + tuple(logits.shape[1:]))
        back += [chunks[i].flip(axes) if axes else chunks[i] for i, axes in enumerate(mirrors)]
    back = torch.stack(back)
    # logit(mean p) = log mean sigmoid(l) - log mean sigmoid(-l), in log space: where the head is
    # sure (|logit| > 10) a probability's complement keeps too few digits, and engines' sigmoids
    # differ there by more than the export's parity tolerance (logit(p) with p clamped did)
    return _log_mean_exp(-F.softplus(-back)) - _log_mean_exp(-F.softplus(back))
