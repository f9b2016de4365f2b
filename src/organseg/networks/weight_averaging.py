"""Temporal weight averaging (mean-teacher / MMT "mean-net") on top of torch's ``AveragedModel``.

After the t-th update of the live network θ (t = 0, 1, ... counts earlier updates, kept in
``AveragedModel.n_averaged`` so it survives checkpoints), every averaged parameter θ' becomes

    θ' <- d_t θ' + (1 - d_t) θ,   d_t = min(1 - 1/(t + 1), decay)

(MMT's warm-up: d_0 = 0 copies the net, d_1 = 1/2, ... until ``decay``; early averages are not
dominated by the random initialisation). ``AveragedModel`` itself copies on the first update
(t = 0), which is exactly d_0 = 0, and calls ``multi_avg_fn`` for t >= 1.

Buffer rule (BatchNorm/InstanceNorm running statistics, ``num_batches_tracked``): buffers are NOT
averaged; they are copied from the live network at every update (``AveragedModel(use_buffers=False)``).
Running statistics are already a moving average over batches (BN momentum), an integer counter cannot
be interpolated, and copying keeps the averaged net's normalisation in step with the data the live
net saw. The default DynUNet uses InstanceNorm without running statistics, so it has no buffers and
the rule is moot there; with BatchNorm under DDP use SyncBatchNorm so the copied statistics agree
across ranks. (``torch.optim.swa_utils.update_bn`` can recompute statistics for the averaged
weights if one ever wants that instead.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from organseg.errors import ConfigError


def warmup_decay(num_averaged: int | torch.Tensor, decay: float) -> float:
    """``min(1 - 1/(t + 1), decay)`` for ``t = num_averaged`` earlier updates."""
    t = int(num_averaged)
    return min(1.0 - 1.0 / (t + 1), float(decay))


def ema_warmup_multi_avg_fn(decay: float):
    """``multi_avg_fn`` for ``AveragedModel``: in-place ``lerp`` of every averaged tensor towards the
    live one with weight ``1 - d_t`` (see module doc)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = 1.0 - warmup_decay(num_averaged, decay)
        with torch.no_grad():
            for avg, cur in zip(averaged, current):
                avg.lerp_(cur, weight)

    return update


def weight_averaged(net: nn.Module, decay: float = 0.999) -> AveragedModel:
    """A frozen weight-averaged copy of ``net`` (no parameter requires grad; always in eval mode
    once the owner keeps it so). Update it with ``.update_parameters(net)`` after each optimiser step."""
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {decay}")
    averaged = AveragedModel(net, multi_avg_fn=ema_warmup_multi_avg_fn(decay), use_buffers=False)
    averaged.requires_grad_(False)
    return averaged
