"""Temporal weight averaging (mean-teacher / MMT "mean-net") on top of torch's ``AveragedModel``.

After the t-th update of the live network θ (t = 0, 1, ... counts earlier updates, kept in
``AveragedModel.n_averaged`` so it survives checkpoints), every averaged parameter θ' becomes

    θ' <- d_t θ' + (1 - d_t) θ,   d_t = min(1 - (η + 1) / (t + η + 1), decay)

``d_0 = 0`` copies the net for every η. The warm-up exponent η (``warmup_eta``) sets how the
average forgets its start while the decay is still below ``decay``:

- η = 0 is MMT's warm-up ``min(1 - 1/(t+1), decay)`` (Ge et al. 2020): the average is the *uniform*
  mean of every iterate so far, so for the whole first ``1/(1 - decay)`` updates the first
  (near-random) iterates keep weight 1/(t+1).
- η > 0 is polynomial-decay averaging (Shamir & Zhang, ICML 2013): iterate s enters with weight
  growing like s^η, the window is about the last t/(η+1) updates, and the first iterate's weight
  falls like (η+1)! / t^(η+1) (η = 3: 0.001 after 10 updates, against MMT's 0.09).

``AveragedModel`` itself copies on the first update (t = 0), which is exactly d_0 = 0, and calls
``multi_avg_fn`` for t >= 1. The decay and η live on a :class:`EMASchedule` held by the averaged model
(``averaged.ema``) so that an owner can set them once the run's length is known (``set_schedule``).

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

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from organseg.errors import ConfigError


def warmup_decay(num_averaged: int | torch.Tensor, decay: float, eta: float = 0.0) -> float:
    """``min(1 - (η+1)/(t + η + 1), decay)`` for ``t = num_averaged`` earlier updates (η = 0: MMT's)."""
    t = int(num_averaged)
    return min(1.0 - (float(eta) + 1.0) / (t + float(eta) + 1.0), float(decay))


def decay_for_horizon(horizon_steps: float) -> float:
    """The decay whose averaging horizon ``1/(1 - decay)`` is ``horizon_steps`` optimiser steps
    (``1 - 1/max(1, horizon_steps)``; a horizon under one step copies the net)."""
    return 1.0 - 1.0 / max(1.0, float(horizon_steps))


def check_decay(decay: float) -> float:
    if not 0.0 <= float(decay) < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {decay}")
    return float(decay)


@dataclass
class EMASchedule:
    """The decay and warm-up exponent of one averaged model; ``decay`` None = not known yet."""

    decay: float | None
    eta: float = 0.0

    def weight(self, num_averaged) -> float:
        """``1 - d_t``: how far the average moves towards the live net at this update."""
        if self.decay is None:
            raise ConfigError(
                "weight average: its decay is not set yet (it follows the run's max_steps, known at fit "
                "start; give ema_decay explicitly to update it outside a fit)"
            )
        return 1.0 - warmup_decay(num_averaged, self.decay, self.eta)


def ema_warmup_multi_avg_fn(schedule: EMASchedule):
    """``multi_avg_fn`` for ``AveragedModel``: in-place ``lerp`` of every averaged tensor towards the
    live one with weight ``1 - d_t`` (see module doc)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = schedule.weight(num_averaged)
        with torch.no_grad():
            for avg, cur in zip(averaged, current):
                avg.lerp_(cur, weight)

    return update


def weight_averaged(net: nn.Module, decay: float | None = 0.999, warmup_eta: float = 0.0) -> AveragedModel:
    """A frozen weight-averaged copy of ``net`` (no parameter requires grad; always in eval mode
    once the owner keeps it so). Update it with ``.update_parameters(net)`` after each optimiser step.
    ``decay`` None: set later with :func:`set_schedule` (before the second update)."""
    if decay is not None:
        check_decay(decay)
    if warmup_eta < 0:
        raise ConfigError(f"ema_warmup_eta must be >= 0, got {warmup_eta}")
    schedule = EMASchedule(decay, float(warmup_eta))
    averaged = AveragedModel(net, multi_avg_fn=ema_warmup_multi_avg_fn(schedule), use_buffers=False)
    averaged.requires_grad_(False)
    averaged.ema = schedule
    return averaged


def set_schedule(averaged: AveragedModel, decay: float, warmup_eta: float | None = None) -> None:
    """Set the decay (and optionally η) of a model made by :func:`weight_averaged`."""
    averaged.ema.decay = check_decay(decay)
    if warmup_eta is not None:
        averaged.ema.eta = float(warmup_eta)
