"""The reference 3D U-Net every method is compared against: MONAI's DynUNet (nnU-Net style)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet
from torch import nn

from organseg.errors import ConfigError


def build_unet(
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[Sequence[int]] = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    res_block: bool = True,
) -> nn.Module:
    """DynUNet with one level per ``filters`` entry. ``strides[0]`` is the stem (usually 1);
    anisotropic strides (e.g. (2, 2, 1)) keep the coarse slice axis from collapsing first.
    Kernel sizes default to 3 in-plane and 1 along z where that level's input is still anisotropic."""
    if len(filters) != len(strides):
        raise ConfigError(
            f"filters ({len(filters)}) and strides ({len(strides)}) must have one entry per level"
        )
    if kernel_sizes is None:
        kernel_sizes = [[3, 3, 3] for _ in strides]
    upsample = [list(s) for s in strides[1:]]
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[list(k) for k in kernel_sizes],
        strides=[list(s) for s in strides],
        upsample_kernel_size=upsample,
        filters=list(filters),
        res_block=res_block,
        norm_name=("INSTANCE", {"affine": True}),
        deep_supervision=False,
    )
