"""Building blocks shared by the FocusNetV2 networks (S-Net, SOS-Net): SE, residual SE block, DenseASPP.

Axis convention: tensors are [B, C, X, Y, Z] with z the coarse slice axis, so an "in-plane only"
kernel is (3, 3, 1) and an in-plane dilation r is (r, r, 1).

Normalisation is InstanceNorm (affine) + LeakyReLU by default rather than upstream's BatchNorm + ReLU:
upstream trains with batch size 1, where BatchNorm's running statistics are noisy and differ between
train and eval; InstanceNorm behaves the same in both and is the nnU-Net choice for 3D CT patches.
``norm="batch"`` restores upstream's layer type; ``norm=None`` (identity) exists for tests that measure
receptive fields (InstanceNorm makes every output depend on every input through the mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from organseg.errors import ConfigError

Triple = tuple[int, int, int]


def as_triple(value: int | Sequence[int]) -> Triple:
    """An int or a 3-sequence as an (x, y, z) tuple."""
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ConfigError(f"expected an int or 3 values (x, y, z), got {value}")
    return value  # type: ignore[return-value]


def same_padding(kernel_size: Triple, dilation: Triple) -> Triple:
    """Padding that keeps the spatial size for stride 1 (odd kernels)."""
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))  # type: ignore[return-value]


def make_norm(norm: str | None, channels: int) -> nn.Module:
    """``instance`` (affine InstanceNorm3d), ``batch`` (BatchNorm3d) or None (identity)."""
    if norm is None or norm == "none":
        return nn.Identity()
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    raise ConfigError(f"unknown norm {norm!r} (instance, batch, none)")


def norm_act(norm: str | None, channels: int, negative_slope: float = 0.01) -> nn.Sequential:
    """Norm then LeakyReLU (not in place: with ``norm=None`` the input may be a residual shortcut)."""
    return nn.Sequential(make_norm(norm, channels), nn.LeakyReLU(negative_slope))


class SEBlock3d(nn.Module):
    """Squeeze-and-excitation: global average pool -> 1x1x1 (C->C/r) -> ReLU -> 1x1x1 (C/r->C) ->
    sigmoid, used to rescale channels. ``reduction`` defaults to 2 as upstream (the usual 16 would
    leave 1-4 hidden units at these widths)."""

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv3d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ResidualSEBlock3d(nn.Module):
    """Pre-activation residual block with SE, as upstream S-Net:
    ``y = SE(conv2(act(norm(conv1(act(norm(x))))))) + shortcut(x)``, no activation after the add.

    The shortcut is the identity, or a 1x1x1 conv on ``act(norm(x))`` when the channel count changes
    (pre-activation ResNet v2 shares that first norm/act). ``dilation`` applies to the second conv
    only (upstream). Convs have no bias (each is followed by a norm or by SE + add).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        dilation: int | Sequence[int] = 1,
        norm: str | None = "instance",
        se_reduction: int = 2,
        negative_slope: float = 0.01,
    ):
        super().__init__()
        k, d = as_triple(kernel_size), as_triple(dilation)
        self.pre = norm_act(norm, in_channels, negative_slope)
        self.conv1 = nn.Conv3d(in_channels, out_channels, k, padding=same_padding(k, (1, 1, 1)), bias=False)
        self.mid = norm_act(norm, out_channels, negative_slope)
        self.conv2 = nn.Conv3d(
            out_channels, out_channels, k, padding=same_padding(k, d), dilation=d, bias=False
        )
        self.se = SEBlock3d(out_channels, se_reduction)
        self.project = (
            nn.Conv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        h = self.se(self.conv2(self.mid(self.conv1(a))))
        return h + (x if self.project is None else self.project(a))


class DenseASPP3d(nn.Module):
    """Densely connected atrous spatial pyramid pooling (Yang et al., CVPR 2018), in 3D.

    Unit i: ``norm-act-conv1x1x1(-> bottleneck) -> norm-act-conv3x3x3(dilation rates[i], -> growth)``
    applied to the concatenation of the input and all previous units' outputs, so the receptive field
    of the last unit is the SUM of all branches' (1 + 2 * rate) extents. The input and all unit outputs
    are concatenated (upstream stops there) and fused by a 1x1x1 conv to ``out_channels``.

    ``rates``: ints (in-plane rate; z rate from ``z_rates``, default 1 for every unit as upstream,
    because z is the coarse axis) or explicit (x, y, z) triples. Upstream uses in-plane (3, 6, 12, 18)
    on a 48x48 in-plane bottleneck (192 mm patches); for smaller bottlenecks (a 96 mm patch gives 24
    voxels) taps beyond the map only read padding, so scale the rates with the bottleneck size.
    ``growth`` defaults to in_channels // 2 and ``bottleneck`` to in_channels (upstream 64 -> 64, 32).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int | Sequence[int]] = (1, 2, 3, 5),
        z_rates: Sequence[int] | None = None,
        growth: int | None = None,
        bottleneck: int | None = None,
        kernel_size: int | Sequence[int] = 3,
        norm: str | None = "instance",
        negative_slope: float = 0.01,
    ):
        super().__init__()
        if len(rates) == 0:
            raise ConfigError("DenseASPP3d needs at least one dilation rate")
        if z_rates is not None and len(z_rates) != len(rates):
            raise ConfigError(f"z_rates ({len(z_rates)}) must have one entry per rate ({len(rates)})")
        growth = growth or max(in_channels // 2, 1)
        bottleneck = bottleneck or in_channels
        k = as_triple(kernel_size)
        self.dilations: list[Triple] = []
        for i, r in enumerate(rates):
            if isinstance(r, int):
                self.dilations.append((r, r, 1 if z_rates is None else int(z_rates[i])))
            else:
                if z_rates is not None:
                    raise ConfigError(
                        "give z_rates only with int (in-plane) rates, not with (x, y, z) triples"
                    )
                self.dilations.append(as_triple(r))
        self.units = nn.ModuleList()
        channels = in_channels
        for d in self.dilations:
            self.units.append(
                nn.Sequential(
                    norm_act(norm, channels, negative_slope),
                    nn.Conv3d(channels, bottleneck, 1),
                    norm_act(norm, bottleneck, negative_slope),
                    nn.Conv3d(bottleneck, growth, k, padding=same_padding(k, d), dilation=d),
                )
            )
            channels += growth
        self.concat_channels = channels
        self.out_channels = out_channels
        self.fuse = nn.Conv3d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for unit in self.units:
            feats.append(unit(torch.cat(feats, dim=1)))
        return self.fuse(torch.cat(feats, dim=1))
