"""SOS-Net: one small binary 3D U-Net per small organ, run on an ROI around the SOL-located centre.

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

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from organseg.errors import ConfigError

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


class SOSNetBank(nn.ModuleList):
    """One independent ``SOSNet`` per small organ (upstream: 3 branches for chiasm, ON_L, ON_R, in
    the card's small-organ order). No weights are shared, so a loss on one organ's output
    touches only that organ's network. ``bank[k]`` is organ k's network."""

    def __init__(
        self, num_small_organs: int, in_channels: int, base_channels: int = 16, downsamplings: int = 1
    ):
        if num_small_organs < 1:
            raise ConfigError(f"num_small_organs must be >= 1, got {num_small_organs}")
        super().__init__([SOSNet(in_channels, base_channels, downsamplings) for _ in range(num_small_organs)])

    def forward(self, rois: torch.Tensor, organ_index: int) -> torch.Tensor:
        """rois [B, in_channels, *roi] of organ ``organ_index`` -> logits [B, 1, *roi]."""
        return self[organ_index](rois)
