"""S-Net, the FocusNetV2 main segmentation network: a residual-SE 3D U-Net with only two downsamplings
and DenseASPP at the bottleneck, so small organs (1-3 slices thick) survive while the receptive field
stays large. Follows upstream, the authors' released code ``yhygao/focusnet-v2`` (its S-Net model),
with our axis order [B, C, X, Y, Z] (upstream is D, H, W = z, y, x).

Layout for base width b (upstream b = 32; widths b, 1.5b, 2b); kernels are upstream's
(``model/model.py`` ``s_net`` and ``model/net.py`` at commit 476db0f: ``inconv`` lines 252-258 is the only
(1,3,3) = our (3,3,1); ``conv_block``/``SEBasicBlock`` default ``kernel_size=3``, lines 183 and 274;
``literal1``/``literal2`` are ``nn.Conv3d(c, c, 3, padding=1)``, model.py lines 48 and 52; ``up_block``'s
block is a 3x3x3 ``conv_block``, net.py line 289):
    stem      conv (3,3,1) -> LeakyReLU -> SE block (3,3,1), SE r=4            -> o1  [b,   X,   Y,   Z]
    enc1      maxpool (2,2,1) -> 2 SE blocks 3x3x3                             -> o2  [1.5b, X/2, Y/2, Z]
    enc2      maxpool (2,2,2) -> 2 SE blocks -> 2 SE blocks dilated (2,2,1) -> bottleneck [2b, X/4, Y/4, Z/2]
    aspp      DenseASPP (growth b, bottleneck 2b), fused 1x1x1 to 4b
    dec1      upsample to o2 size; cat [skip2 = conv 3x3x3(o2), up] -> SE block 3x3x3 -> 1.5b
    dec2      upsample to o1 size; cat [skip1 = conv 3x3x3(o1), up] -> SE block 3x3x3 -> b = features (F=b)
    head      norm-act-conv1x1x1 -> num_classes logits
With ``anisotropic=False`` both poolings are (2,2,2) and the full-resolution stem kernels are 3x3x3.

``full_res_kernels="inplane"`` (ours, not upstream's; ``FocusNetArchitecture.snet_full_res_kernels``) makes
every conv at full resolution in-plane, (3,3,1): the stem (as upstream), ``skip1`` and both convs of
``dec2``. That is nnU-Net's rule (``networks.unet``) for the data S-Net is built for, z 2-4x the in-plane
spacing (upstream's 1 x 1 x 2.5 mm, the H&N cards' 1 x 1 x 3): kernel 1 along z at full resolution, and
from o2 on (in-plane halved) z under 2x, so 3x3x3 there, as kept.
``dec2`` at full resolution is the network's most expensive layer; (3,3,1) costs a third of its
multiply-adds (``benchmarks/step_speed.py``). It needs ``anisotropic=True``. It is a fixed choice, not
derived from the spacing: at 2 x 2 x 3 mm (the demo's cards) nnU-Net's rule would keep 3x3x3 there.
Until issue 11 ``skip1`` was (3,3,1) whenever ``anisotropic`` (unlike upstream's ``literal2``, with no
option naming it); S-Net checkpoints written then have that shape and no longer load.

Choices where upstream gives none or we differ (all reasoned, none verified against the paper):
- InstanceNorm + LeakyReLU instead of BatchNorm + ReLU (see ``blocks``; batch size 1 upstream).
- DenseASPP rates default to in-plane (1, 2, 3, 5), z rate 1: upstream's (3, 6, 12, 18) is sized for a
  48x48 in-plane bottleneck (192 mm patches); our default 96x96 patch gives 24x24, where a rate of 18
  reads mostly padding. (1, 2, 3, 5) has no common factor (no gridding) and its summed receptive field
  (23 bottleneck voxels, ~92 mm at 1 mm spacing) covers such a patch. Pass upstream's for 192 patches.
- A 1x1x1 fusion after the DenseASPP concatenation (upstream feeds the 6b-channel concat directly).
- Trilinear upsampling with align_corners=False (the geometrically aligned inverse of stride-2
  pooling; upstream used True) to the skip's exact size.
- The head gets a norm-act before its 1x1x1 conv (pre-activation convention; upstream's block output
  goes straight into the conv). ``features`` are the block output before that norm-act, as upstream's
  ``feature_map``; SOL-Net starts with its own norm-act.
- Input sizes must be divisible by ``divisor`` ((4, 4, 2), or (4, 4, 4) isotropic): a ValueError, not
  padding. Padding inside the net would silently change what a patch sees at its border and force
  cropping of every output (logits and features); patch sizes come from configs and sliding-window
  inference pads to the patch size anyway, so a wrong size is a config error best reported early.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from organseg.errors import ConfigError
from organseg.networks.blocks import DenseASPP3d, ResidualSEBlock3d, norm_act

# kernel shapes at full resolution (skip1, dec2): upstream's 3x3x3, or in-plane (3, 3, 1) (ours)
FULL_RES_KERNELS = ("upstream", "inplane")


class SNet(nn.Module):
    """S-Net: ``forward(x)`` -> logits [B, num_classes, X, Y, Z]; ``forward_features(x)`` -> (logits,
    features [B, feature_channels, X, Y, Z]); ``feature_maps(x)`` -> dict with also the full-resolution
    encoder skip ``skip`` [B, skip_channels, X, Y, Z] (upstream's o1, used by SOS-Net) and the encoder
    ``bottleneck`` [B, 2b, X/4, Y/4, Z/2]."""

    def __init__(
        self,
        in_channels: int = 1,
        *,
        num_classes: int,
        base_channels: int = 16,
        aspp_rates: Sequence[int | Sequence[int]] = (1, 2, 3, 5),
        aspp_z_rates: Sequence[int] | None = None,
        anisotropic: bool = True,
        norm: str | None = "instance",
        se_reduction: int = 2,
        aspp_channels: int | None = None,
        full_res_kernels: str = "upstream",
    ):
        super().__init__()
        if full_res_kernels not in FULL_RES_KERNELS:
            raise ConfigError(
                f"S-Net full_res_kernels must be one of {list(FULL_RES_KERNELS)}, got {full_res_kernels!r}"
            )
        if full_res_kernels == "inplane" and not anisotropic:
            raise ConfigError("S-Net full_res_kernels='inplane' needs anisotropic=True (z the coarse axis)")
        b = base_channels
        c1, c2, c3 = b, (3 * b) // 2, 2 * b
        self.num_classes = num_classes
        self.anisotropic = anisotropic
        self.feature_channels = c1
        self.skip_channels = c1
        pool1 = (2, 2, 1) if anisotropic else (2, 2, 2)
        self.divisor = (4, 4, 2) if anisotropic else (4, 4, 4)
        self.full_res_kernels = full_res_kernels
        k_full = (3, 3, 1) if anisotropic else (3, 3, 3)  # the stem's (upstream inconv: (1,3,3) in D,H,W)
        # skip1 and dec2: 3x3x3 as upstream (literal2, up2), or in-plane with full_res_kernels="inplane"
        k_dec = (3, 3, 1) if full_res_kernels == "inplane" else (3, 3, 3)
        if aspp_z_rates is None and not anisotropic:
            aspp_z_rates = [r for r in aspp_rates] if all(isinstance(r, int) for r in aspp_rates) else None
        aspp_out = aspp_channels or 4 * b

        def block(cin: int, cout: int, k=3, d=1, r=se_reduction) -> ResidualSEBlock3d:
            return ResidualSEBlock3d(cin, cout, kernel_size=k, dilation=d, norm=norm, se_reduction=r)

        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, c1, k_full, padding=tuple(k // 2 for k in k_full)),
            nn.LeakyReLU(0.01),
            block(c1, c1, k_full, r=2 * se_reduction),
        )
        self.enc1 = nn.Sequential(nn.MaxPool3d(pool1), block(c1, c2), block(c2, c2))
        self.enc2 = nn.Sequential(
            nn.MaxPool3d(2),
            block(c2, c3),
            block(c3, c3),
            block(c3, c3, d=(2, 2, 1) if anisotropic else 2),
            block(c3, c3, d=(2, 2, 1) if anisotropic else 2),
        )
        self.aspp = DenseASPP3d(
            c3, aspp_out, rates=aspp_rates, z_rates=aspp_z_rates, growth=b, bottleneck=c3, norm=norm
        )
        self.skip2 = nn.Conv3d(c2, c2, 3, padding=1)
        self.dec1 = block(c2 + aspp_out, c2)
        self.skip1 = nn.Conv3d(c1, c1, k_dec, padding=tuple(k // 2 for k in k_dec))
        self.dec2 = block(c1 + c2, c1, k_dec)
        self.head = nn.Sequential(norm_act(norm, c1), nn.Conv3d(c1, num_classes, 1))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line ValueError unless x is [B, C, X, Y, Z] with sizes divisible by ``divisor``."""
        if x.dim() != 5:
            raise ValueError(f"SNet expects [B, C, X, Y, Z], got shape {tuple(x.shape)}")
        if any(s % d for s, d in zip(x.shape[2:], self.divisor)):
            raise ConfigError(
                f"SNet input spatial size {tuple(x.shape[2:])} must be divisible by {self.divisor}"
            )

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All maps later stages may use: ``logits``, ``features``, ``skip`` (o1), ``bottleneck``."""
        self.check_input(x)
        o1 = self.stem(x)
        o2 = self.enc1(o1)
        bottleneck = self.enc2(o2)
        h = self.aspp(bottleneck)
        h = F.interpolate(h, size=o2.shape[2:], mode="trilinear", align_corners=False)
        h = self.dec1(torch.cat([self.skip2(o2), h], dim=1))
        h = F.interpolate(h, size=o1.shape[2:], mode="trilinear", align_corners=False)
        features = self.dec2(torch.cat([self.skip1(o1), h], dim=1))
        return {"logits": self.head(features), "features": features, "skip": o1, "bottleneck": bottleneck}

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, num_classes, X, Y, Z], features [B, feature_channels, X, Y, Z])."""
        maps = self.feature_maps(x)
        return maps["logits"], maps["features"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)["logits"]
