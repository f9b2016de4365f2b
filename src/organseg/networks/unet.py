"""The reference 3D U-Net every method is compared against: MONAI's DynUNet (nnU-Net style).

Kernel sizes follow nnU-Net v2's rule (``get_pool_and_conv_props`` in
``nnunetv2/experiment_planning/experiment_planners/network_topology.py``, which the default
``ExperimentPlanner`` calls): at each level a kernel is 1 along an axis whose spacing *at that level* is
at least twice the finest spacing there (``spacing / min(spacing) < 2`` gives 3), and once an axis has
become 3 it stays 3 at every coarser level; the bottleneck (last level) is always 3x3x3. For 1 x 1 x 3 mm
data and strides (1,1,1), (2,2,1), (2,2,2), (2,2,2) that is (3,3,1) at full resolution (3 mm / 1 mm) and
3x3x3 from the next level on (3 mm / 2 mm = 1.5). The same rule chooses nnU-Net's poolings (an axis is
pooled only while its spacing is under twice the finest), which ``nnunet_strides`` reproduces to check
a config's ``strides``.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks.dynunet_block import UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn

from organseg.errors import ConfigError

DEFAULT_STRIDES = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))
# nnU-Net v2's anisotropy factor for kernels and pooling (network_topology.py: ``... < 2``); not to be
# confused with its ANISO_THRESHOLD = 3 (nnunetv2/configuration.py), which picks separate-z resampling
NNUNET_SPACING_RATIO = 2.0


def kernel_sizes_for_spacing(spacing: Sequence[float], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """One (x, y, z) kernel per level for data at ``spacing`` (mm, x y z) and a U-Net with ``strides``
    (``strides[0]`` is the stem's), by nnU-Net v2's rule (module doc): level i sees spacing
    ``spacing * prod(strides[:i + 1])``; an axis gets 3 once that spacing is under twice the level's
    finest, 1 before; the last level is 3x3x3."""
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise ConfigError(f"spacing must be 3 positive values (x, y, z) in mm, got {list(spacing)}")
    current = [float(s) for s in spacing]
    kernel = [1, 1, 1]
    kernels = []
    for level, stride in enumerate(strides):
        current = [c * int(s) for c, s in zip(current, stride)]
        if level == len(strides) - 1:
            kernel = [3, 3, 3]  # nnU-Net: "we always use 3x3(x3) conv" in the bottleneck
        else:
            finest = min(current)
            kernel = [
                3 if k == 3 or c / finest < NNUNET_SPACING_RATIO else 1 for k, c in zip(kernel, current)
            ]
        kernels.append(list(kernel))
    return kernels


def nnunet_strides(spacing: Sequence[float], num_levels: int) -> list[list[int]]:
    """The strides nnU-Net v2 would plan for ``num_levels`` levels at ``spacing`` when the patch is large
    enough (its patch-size and ``max_numpool`` limits left out): the stem 1, then per level 2 along each
    axis whose spacing is under twice the finest, 1 along the others. Compare a config's ``strides``."""
    current = [float(s) for s in spacing]
    strides = [[1, 1, 1]]
    for _ in range(num_levels - 1):
        finest = min(current)
        stride = [2 if c / finest < NNUNET_SPACING_RATIO else 1 for c in current]
        current = [c * s for c, s in zip(current, stride)]
        strides.append(stride)
    return strides


class DynUNetNNUNetDecoder(DynUNet):
    """MONAI's DynUNet whose decoder blocks use nnU-Net's kernels: the block that works at level i's
    resolution (after the upsampling and the skip concatenation) gets level i's kernel, as
    ``dynamic_network_architectures``' ``UNetDecoder`` (``encoder.kernel_sizes[-(s + 1)]``). MONAI's own
    pairs it with level i + 1's (``kernel_size[1:][::-1]``), which would put a 3x3x3 block at full
    resolution after a (3, 3, 1) encoder level: the most expensive layer, with the kernel nnU-Net avoids
    there. With one kernel for all levels both are the same network (same parameter names and shapes)."""

    def get_upsamples(self):
        inp, out = self.filters[1:][::-1], self.filters[:-1][::-1]
        strides, kernel_size = self.strides[1:][::-1], self.kernel_size[:-1][::-1]
        return self.get_module_list(
            inp,
            out,
            kernel_size,
            strides,
            UnetUpBlock,
            self.upsample_kernel_size[::-1],
            trans_bias=self.trans_bias,
        )


def build_unet(
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[Sequence[int]] = DEFAULT_STRIDES,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    res_block: bool = True,
    spacing: Sequence[float] | None = None,
) -> nn.Module:
    """DynUNet with one level per ``filters`` entry. ``strides[0]`` is the stem (usually 1);
    anisotropic strides (e.g. (2, 2, 1)) keep the coarse slice axis from collapsing first.

    Kernel sizes: ``kernel_sizes`` when given (one (x, y, z) per level); otherwise derived from the data's
    voxel ``spacing`` (mm, x y z) by nnU-Net's rule (``kernel_sizes_for_spacing``: 1 along z while z is
    still at least twice the in-plane spacing); without either, 3x3x3 at every level (the behaviour before
    spacing was known, and what checkpoints written then were built with). Each decoder block uses the
    kernel of the level whose resolution it works at, as nnU-Net (``DynUNetNNUNetDecoder``)."""
    if len(filters) != len(strides):
        raise ConfigError(
            f"filters ({len(filters)}) and strides ({len(strides)}) must have one entry per level"
        )
    if kernel_sizes is None:
        if spacing is not None:
            kernel_sizes = kernel_sizes_for_spacing(spacing, strides)
        else:
            kernel_sizes = [[3, 3, 3] for _ in strides]
    if len(kernel_sizes) != len(strides):
        raise ConfigError(
            f"kernel_sizes ({len(kernel_sizes)}) and strides ({len(strides)}) must have one entry per level"
        )
    upsample = [list(s) for s in strides[1:]]
    return DynUNetNNUNetDecoder(
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
