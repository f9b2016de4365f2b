"""FocusNetV2 as one container, so every stage's checkpoint has the same parameter names.

Stage 1 trains ``snet``; stage 2 ``sol`` (S-Net frozen); stage 3 ``sos`` (both frozen); stage 4
pre-trains ``shape_ae`` (+ ``disc``); stage 5 fine-tunes all with the shape constraint. A later stage
loads the earlier stage's container state and trains its part; inference uses all of it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from organseg.inference.roi import crop_rois
from organseg.models.shape import ShapeAutoencoder, ShapeDiscriminator
from organseg.models.snet import SNet
from organseg.models.sol import SOLNet
from organseg.models.sos import SOSNetBank, sos_inputs


class FocusNetV2(nn.Module):
    """S-Net (all organs) + SOL-Net (small-organ heatmaps) + one SOS-Net per small organ + shape AE.

    Args:
        num_classes: classes incl. background (S-Net's outputs).
        small_classes: class indices of the small organs, in the card's ``small`` order (K of them).
        roi_sizes: per small organ, the SOS ROI in voxels (x, y, z) (x, y divisible by 2).
    """

    def __init__(self, num_classes: int, small_classes: Sequence[int], roi_sizes: Sequence[Sequence[int]],
                 base_channels: int = 16, aspp_rates: Sequence[int] = (1, 2, 3, 5), sol_hidden: int = 32,
                 sos_base: int = 16, ae_code_channels: int = 32, ae_base: int = 16):
        super().__init__()
        if len(small_classes) != len(roi_sizes):
            raise ValueError(f"{len(small_classes)} small organs but {len(roi_sizes)} ROI sizes")
        self.num_classes = num_classes
        self.small_classes = [int(c) for c in small_classes]
        self.roi_sizes = [tuple(int(v) for v in r) for r in roi_sizes]
        self.snet = SNet(1, num_classes=num_classes, base_channels=base_channels, aspp_rates=tuple(aspp_rates))
        k = len(self.small_classes)
        self.sol = SOLNet(self.snet.feature_channels, k, hidden=sol_hidden)
        self.sos = SOSNetBank(k, in_channels=self.snet.feature_channels + 2, base_channels=sos_base)
        self.shape_ae = ShapeAutoencoder(1, ae_code_channels, ae_base)
        self.disc = ShapeDiscriminator(ae_code_channels)

    @property
    def num_small(self) -> int:
        return len(self.small_classes)

    def snet_sol(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image [B,1,*S] -> (S-Net logits [B,C,*S], features [B,F,*S], SOL heatmaps [B,K,*S])."""
        logits, features = self.snet.forward_features(image)
        return logits, features, self.sol(features)

    def sos_logits(self, features: torch.Tensor, heatmaps: torch.Tensor, image: torch.Tensor,
                   centres: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Organ k's SOS-Net on ROIs around ``centres`` [B,3] (voxels, finite) cropped from
        concat(features, heatmap k, CT) -> (logits [B,1,*roi_k], ROI starts [B,3])."""
        x = sos_inputs(features, heatmaps[:, k:k + 1], image)
        rois, starts = crop_rois(x, centres, self.roi_sizes[k], return_starts=True)
        # CT pads with its air value, not 0 (0 is soft tissue after normalisation)
        if image.numel():
            outside = crop_rois(torch.ones_like(image[:, :1]), centres, self.roi_sizes[k]) == 0
            rois[:, -1:] = torch.where(outside, image.min().detach(), rois[:, -1:])
        return self.sos(rois, k), starts
