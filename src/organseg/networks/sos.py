"""SOS-Net: one binary network per small organ, run on an ROI around the SOL-located centre.

Two branches (``FocusNetArchitecture.sos_branch``): ``"upstream"`` (the default), upstream's S-Net-like
branch on the CT crop alone (``UpstreamSOSBranch``); ``"unet"`` (ours, before issue 13), the small U-Net
below on the [features, heatmap, CT] crop (``SOSNet``).

Input channel order (``sos_inputs``): ``[S-Net features (F), this organ's SOL heatmap (1), raw CT (1)]``,
so ``in_channels = F + 2``. Upstream's code builds that 66-channel concatenation but then uses only
the CT channel; the FocusNetV2 paper describes the concatenation (FocusNet's abstract: pooled features), and
"adding the raw CT helps" only makes sense on top of features, so the concatenation is the
default here. CT is last on purpose: the CT-only upstream variant is ``in_channels=1`` fed
``rois[:, -1:]``.

The network is much smaller than upstream's 1.6 M-parameter branch (S-Net-like with DenseASPP):
the ROI is only ~64x64x8 voxels, the features already carry S-Net's context, and a compact net
is quicker to train from scratch in stage 3 (upstream also starts SOS from random weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from organseg.errors import ConfigError
from organseg.networks.blocks import DenseASPP3d, ResidualSEBlock3d

NORM = ("INSTANCE", {"affine": True})  # batch statistics are meaningless for 1-3 ROIs per step


def sos_inputs(features: torch.Tensor, heatmap: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[features [B,F,*S], heatmap [B,1,*S] (one organ), image [B,1,*S]]`` along channels
    (the SOS-Net channel order). Crop the result with ``inference.roi.crop_rois``; pad with 0 for
    features/heatmap, but note the CT channel's own background value (crop it separately if the
    distinction matters)."""
    if heatmap.shape[1] != 1 or image.shape[1] != 1:
        raise ValueError(
            f"heatmap and image need 1 channel each, got {heatmap.shape[1]} and {image.shape[1]}"
        )
    return torch.cat([features, heatmap, image], dim=1)


class SOSNet(nn.Module):
    """Residual 3D U-Net for one organ: ``[B, in_channels, X, Y, Z]`` ROI -> ``[B, 1, X, Y, Z]`` logit.

    ``downsamplings`` in-plane-only (2, 2, 1) levels (default 1; 0 = no pooling at all): the ROI
    holds only ~8 slices of ~3 mm and the organ 1-3 of them, so z is never strided (the paper's
    point about downsampling destroying small organs). X and Y must be divisible by
    ``2 ** downsamplings`` (``roi_size_voxels`` returns even sizes). Each level is a MONAI
    residual block (conv-norm-act x2 + shortcut) with instance norm; channels double per level.
    """

    def __init__(self, in_channels: int, base_channels: int = 16, downsamplings: int = 1):
        super().__init__()
        if downsamplings < 0:
            raise ConfigError(f"downsamplings must be >= 0, got {downsamplings}")
        self.in_channels = in_channels
        self.downsamplings = downsamplings
        chans = [base_channels * 2**i for i in range(downsamplings + 1)]
        self.stem = UnetResBlock(3, in_channels, chans[0], kernel_size=3, stride=1, norm_name=NORM)
        self.down = nn.ModuleList(
            nn.Sequential(
                UnetResBlock(3, chans[i], chans[i + 1], kernel_size=3, stride=(2, 2, 1), norm_name=NORM),
                UnetResBlock(3, chans[i + 1], chans[i + 1], kernel_size=3, stride=1, norm_name=NORM),
            )
            for i in range(downsamplings)
        )
        self.up = nn.ModuleList(
            UnetUpBlock(
                3,
                chans[i + 1],
                chans[i],
                kernel_size=3,
                stride=1,
                upsample_kernel_size=(2, 2, 1),
                norm_name=NORM,
            )
            for i in reversed(range(downsamplings))
        )
        self.head = UnetOutBlock(3, chans[0], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, X, Y, Z] -> logits [B, 1, X, Y, Z]."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SOSNet expects {self.in_channels} channels, got {x.shape[1]}")
        f = 2**self.downsamplings
        if x.shape[-3] % f or x.shape[-2] % f:
            raise ConfigError(f"ROI in-plane size {tuple(x.shape[-3:-1])} must be divisible by {f}")
        skips = [self.stem(x)]
        for level in self.down:
            skips.append(level(skips[-1]))
        y = skips.pop()
        for up in self.up:
            y = up(y, skips.pop())
        return self.head(y)


class UpstreamSOSBranch(nn.Module):
    """Upstream's SOS branch (``model/net.py`` ``SOS_branch``): an S-Net-like residual-SE network with two
    poolings and DenseASPP on the CT crop alone, ``[B, 1, X, Y, Z]`` -> ``[B, 1, X, Y, Z]`` logit.

    Widths for ``base`` b (upstream b = 32; ``FocusNetArchitecture.sos_base``): stem conv (3,3,1) to 3b/4 +
    SE block (3,3,1); 2 SE blocks to b (o1); maxpool (2,2,1), 2 SE blocks to 3b/2 (o2); maxpool (2,2,2),
    2 SE blocks to 2b; DenseASPP in-plane rates (3, 5, 7, 9), growth b, bottleneck 2b (upstream 64 + 4 x 32
    = 192 channels); decoder as S-Net's (up to o2, cat conv3(o2) -> SE block 3b/2; up to o1, cat conv3(o1)
    -> SE block b); 1x1x1 conv to one logit. No dilated stage (upstream has none here). The project's
    blocks (``networks.blocks``: InstanceNorm + LeakyReLU, a 1x1x1 fusion after the DenseASPP concat, as
    S-Net) replace upstream's BatchNorm + ReLU. X and Y must be divisible by 4 and Z by 2."""

    divisor = (4, 4, 2)

    def __init__(
        self, base: int = 32, aspp_rates: Sequence[int] = (3, 5, 7, 9), norm: str | None = "instance"
    ):
        super().__init__()
        c0, c1, c2, c3 = max((3 * base) // 4, 1), base, (3 * base) // 2, 2 * base
        self.in_channels = 1

        def block(cin: int, cout: int, k=3, r: int = 2) -> ResidualSEBlock3d:
            return ResidualSEBlock3d(cin, cout, kernel_size=k, norm=norm, se_reduction=r)

        self.stem = nn.Sequential(
            nn.Conv3d(1, c0, (3, 3, 1), padding=(1, 1, 0)), block(c0, c0, (3, 3, 1), r=4)
        )
        self.enc0 = nn.Sequential(block(c0, c1), block(c1, c1))
        self.enc1 = nn.Sequential(nn.MaxPool3d((2, 2, 1)), block(c1, c2), block(c2, c2))
        self.enc2 = nn.Sequential(nn.MaxPool3d(2), block(c2, c3), block(c3, c3))
        self.aspp = DenseASPP3d(
            c3, c3 + 4 * base, rates=tuple(aspp_rates), growth=base, bottleneck=c3, norm=norm
        )
        self.skip2 = nn.Conv3d(c2, c2, 3, padding=1)
        self.dec1 = block(c2 + self.aspp.out_channels, c2)
        self.skip1 = nn.Conv3d(c1, c1, 3, padding=1)
        self.dec2 = block(c1 + c2, c1)
        self.head = nn.Conv3d(c1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, X, Y, Z] (only the last channel, the CT, is read, as upstream) -> logits [B, 1, *S]."""
        if any(s % d for s, d in zip(x.shape[2:], self.divisor)):
            raise ConfigError(
                f"upstream SOS branch: ROI size {tuple(x.shape[2:])} must be divisible by {self.divisor}"
            )
        o1 = self.enc0(self.stem(x[:, -1:]))
        o2 = self.enc1(o1)
        h = self.aspp(self.enc2(o2))
        h = F.interpolate(h, size=o2.shape[2:], mode="trilinear", align_corners=False)
        h = self.dec1(torch.cat([self.skip2(o2), h], dim=1))
        h = F.interpolate(h, size=o1.shape[2:], mode="trilinear", align_corners=False)
        return self.head(self.dec2(torch.cat([self.skip1(o1), h], dim=1)))


SOS_BRANCHES = ("upstream", "unet")


class SOSNetBank(nn.ModuleList):
    """One independent SOS network per small organ (upstream: 3 branches for chiasm, ON_L, ON_R, in
    the card's small-organ order). No weights are shared, so a loss on one organ's output
    touches only that organ's network. ``bank[k]`` is organ k's network.

    ``branch``: ``"upstream"`` (``UpstreamSOSBranch`` on the CT crop; ``in_channels`` unused) or ``"unet"``
    (ours, ``SOSNet`` on the ``in_channels`` [features, heatmap, CT] crop)."""

    def __init__(
        self,
        num_small_organs: int,
        in_channels: int,
        base_channels: int = 16,
        downsamplings: int = 1,
        branch: str = "unet",
    ):
        if num_small_organs < 1:
            raise ConfigError(f"num_small_organs must be >= 1, got {num_small_organs}")
        if branch not in SOS_BRANCHES:
            raise ConfigError(f"sos_branch must be one of {list(SOS_BRANCHES)}, got {branch!r}")
        if branch == "upstream":
            nets = [UpstreamSOSBranch(base_channels) for _ in range(num_small_organs)]
        else:
            nets = [SOSNet(in_channels, base_channels, downsamplings) for _ in range(num_small_organs)]
        super().__init__(nets)
        self.branch = branch

    def forward(self, rois: torch.Tensor, organ_index: int) -> torch.Tensor:
        """rois [B, in_channels, *roi] of organ ``organ_index`` -> logits [B, 1, *roi]."""
        return self[organ_index](rois)
