"""SOL-Net, the FocusNetV2 small-organ localiser: S-Net features -> one centre heatmap per small organ.

Its targets and their decoding to centres are in :mod:`organseg.spatial.heatmaps`. Tensors are
[B, C, X, Y, Z].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from organseg.errors import ConfigError
from organseg.networks.blocks import norm_act


class SOLNet(nn.Module):
    """Upstream's head: ``norm-act-conv3 (F->hidden) -> norm-act-conv3 (hidden->hidden) -> conv1x1x1
    (hidden->K)``, then a sigmoid (``output="sigmoid"``, default) or nothing (``"linear"``).

    Sigmoid as upstream: targets lie in [0, 1], so a bounded output makes the decode threshold (0.3;
    upstream 0.6) mean the same for every run, and background cannot go negative. The final bias starts
    at logit(``init_prob``) (default 0.1) instead of 0: with the default init every voxel starts at 0.5
    and the first epochs are spent pulling a 99.8 % background down, after which the saturated sigmoid
    learns the peaks slowly (a suspected cause of the poor SOL reproductions reported upstream).
    """

    def __init__(
        self,
        feature_channels: int,
        num_small_organs: int,
        hidden: int = 32,
        norm: str | None = "instance",
        output: str = "sigmoid",
        init_prob: float = 0.1,
    ):
        super().__init__()
        if output not in ("sigmoid", "linear"):
            raise ConfigError(f"SOLNet output must be 'sigmoid' or 'linear', got {output!r}")
        self.num_small_organs = num_small_organs
        self.output = output
        self.body = nn.Sequential(
            norm_act(norm, feature_channels),
            nn.Conv3d(feature_channels, hidden, 3, padding=1),
            norm_act(norm, hidden),
            nn.Conv3d(hidden, hidden, 3, padding=1),
        )
        self.out = nn.Conv3d(hidden, num_small_organs, 1)
        if output == "sigmoid":
            nn.init.constant_(self.out.bias, math.log(init_prob / (1.0 - init_prob)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, F, X, Y, Z] -> heatmaps [B, K, X, Y, Z]."""
        h = self.out(self.body(features))
        return torch.sigmoid(h) if self.output == "sigmoid" else h
