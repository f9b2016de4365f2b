"""Co-training weight-averaged models (CoWAM; Huang et al., MICCAI 2020, arXiv 2008.07149).

One multi-organ network from few-organ datasets. Two networks F_a, F_b of the same architecture,
initialised from different seeds, train together; each keeps a temporal weight average E_a, E_b
(``organseg.networks.weight_averaging``: in-place warm-up EMA after every optimiser step, never any gradient,
buffers copied from the live net). Per network k (one forward each, logits reused by every term):

    L_k = supervised(F_k) + w(t) * soft_weight * L_soft(F_k <- E_peer)

- **supervised** (``supervision``): ``pseudo`` = weighted focal + Dice on ground truth merged with
  the fixed hard pseudo-labels of first-stage single-dataset models (``merge_pseudo_labels``; the
  batch must carry ``pseudo``), ``marginal`` = the merged-background focal + Dice of Shi et al. 2021,
  ``naive`` = focal + Dice on the label as given (unannotated organs = background; an ablation).
- **soft**: cross-entropy from the PEER's averaged model's softmax to this net's log-softmax, mean
  over the region mask M (``soft_region``): ``dilated_pseudo`` (the paper's, default) = the hard
  pseudo-label masks of the organs the sample's dataset does NOT annotate, dilated by a ball of
  ``mask_dilation_mm`` mm (voxels from the card's ``spacing``), intersected with the ground-truth
  background; ``unannotated`` (ours, the project's earlier default) = every voxel outside the
  annotated organs. Annotated voxels carry exactly zero loss and gradient (``organseg.losses.cotraining``).

Schedules follow the run's length T (``max_steps``; ``trainer.estimated_stepping_batches`` at fit start,
or ``max_steps_for_schedule``), so a short and a long run get the same shape:

- soft weight w(t) = ``soft_weight * exp(-5 (1 - min(t / R, 1))^2)``, R = ``soft_rampup * T``
  (``soft_rampup_steps`` = R given in steps instead: ours);
- averaged models: decay a = ``1 - 1 / max(1, ema_horizon * T)`` (horizon 1/(1-a) = ``ema_horizon * T``
  steps; ``ema_decay`` = a given directly instead: ours), applied with the warm-up
  d_t = ``min(1 - (eta + 1) / (t + eta + 1), a)``, eta = ``ema_warmup_eta`` (0 = MMT's uniform-mean warm-up).
- Optional input diversity (MMT): each net (and its averaged model) sees its own random intensity
  perturbation of the same batch (``view_contrast``, ``view_noise_std``); spatial transforms are not
  used here because the two views must stay voxel-aligned for the soft targets.

One AdamW (+ poly decay) over both nets. Validation runs BOTH averaged models on every case and logs
``val/wam_a/...`` and ``val/wam_b/...`` (per organ and mean); the better mean Dice becomes the
``selected`` model (a buffer, so checkpoints carry it) and its numbers are logged as ``val/dice/<organ>``
and ``val/dice_mean`` (the checkpoint monitor). ``forward``/``predict_case`` (test, ``organseg
evaluate``, predict) use the selected averaged model only: one forward pass for all organs.

DDP: the averaged models' parameters do not require grad, so DDP neither reduces nor expects gradients
for them; both nets get gradients every step, so plain ``ddp`` (find_unused_parameters=False) works.
The averages are updated on every rank from identical (all-reduced) weights, so they stay identical.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from organseg.errors import ConfigError
from organseg.losses import FocalDiceLoss
from organseg.losses.cotraining import SOFT_REGIONS, region_mask, sigmoid_rampup, soft_cross_entropy
from organseg.losses.partial_labels import MarginalFocalDiceLoss, merge_pseudo_labels
from organseg.methods.base import SegmentationModuleBase, log_loss_terms
from organseg.methods.checkpoints import CHECKPOINT_KEY
from organseg.methods.unet_baseline import (
    adamw_poly,
    initial_class_weights,
    resolve_class_weights,
    stride_product,
)
from organseg.networks import build_unet
from organseg.networks.weight_averaging import (
    decay_for_horizon,
    set_schedule,
    warmup_decay,
    weight_averaged,
)

SUPERVISION = ("pseudo", "marginal", "naive")
NETS = ("net_a", "net_b")
WAMS = ("wam_a", "wam_b")


def build_network(
    num_classes: int,
    filters: Sequence[int],
    strides: Sequence[Sequence[int]],
    network: dict | None = None,
    spacing: Sequence[float] | None = None,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
) -> nn.Module:
    """The default DynUNet (``build_unet``: kernels from ``kernel_sizes``, else from the data's ``spacing``
    by nnU-Net's rule), or ``network = {class_path, init_args}`` (e.g. ``organseg.networks.snet.SNet``)
    with ``num_classes`` (or ``out_channels``) filled in."""
    if network is None:
        return build_unet(1, num_classes, filters, strides, kernel_sizes=kernel_sizes, spacing=spacing)
    path = str(network.get("class_path", ""))
    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"model network.class_path {path!r}: cannot be imported") from None
    kwargs = dict(network.get("init_args") or {})
    params = inspect.signature(cls).parameters
    key = "num_classes" if "num_classes" in params else "out_channels"
    kwargs.setdefault(key, num_classes)
    return cls(**kwargs)


class CoTrainingWAM(SegmentationModuleBase):
    """Co-training of two networks with weight-averaged teachers (see module doc).

    Args:
        filters / strides: DynUNet levels (as ``UNetBaseline``); ``network`` replaces the DynUNet by
            any ``{class_path, init_args}`` network returning logits [B,C,*S].
        spacing / kernel_sizes: the DynUNet's kernels, as ``UNetBaseline`` (``spacing`` is linked from
            the card by the CLI; explicit ``kernel_sizes`` win; neither: 3x3x3).
        init_seeds: the two networks' initialisation seeds (must differ); null (default) derives them from
            the run's seed s (``seed_everything``, exported as ``PL_GLOBAL_SEED``): (2s, 2s+1), so every
            benchmark seed starts both networks elsewhere; seed 0 gives (0, 1) as before.
        supervision: ``pseudo`` | ``marginal`` | ``naive`` (see module doc).
        lr / weight_decay / max_epochs_for_schedule: AdamW + poly decay over both nets.
        max_steps_for_schedule: the run length T the schedules scale with; None (default): the trainer's
            (``estimated_stepping_batches``: ``max_steps``, else epochs x batches) at fit start.
        class_weights / focal_gamma / focal_weight / dice_weight: as ``UNetBaseline``.
        ema_horizon: the averaged models' horizon 1/(1 - decay) as a fraction of T (default 1/16: MMT's
            decay 0.999 over its 40 x 400 = 16,000 steps).
        ema_decay: ours: a fixed decay instead (overrides ``ema_horizon``; e.g. 0.999 as before).
        ema_warmup_eta: warm-up exponent eta of ``min(1 - (eta+1)/(t+eta+1), decay)``; default 3
            (polynomial-decay averaging: the random start is forgotten like t^-4); 0 = MMT's
            ``min(1 - 1/(t+1), decay)``, a uniform mean of every iterate for the first 1/(1-decay)
            steps (ours).
        soft_weight / soft_rampup: weight of the soft-label loss and its sigmoid ramp-up length as a
            fraction of T (0 = full weight from the start).
        soft_rampup_steps: ours: the ramp-up length in optimiser steps instead (overrides ``soft_rampup``).
        soft_region: ``dilated_pseudo`` (the paper's) | ``unannotated`` (ours), see module doc; both
            exclude annotated voxels; ``dilated_pseudo`` needs pseudo-labels in the batch.
        mask_dilation_mm: the ``dilated_pseudo`` ball's radius in mm (one, or x, y, z), converted to
            voxels with ``spacing``; default 5 mm (the paper gives no radius).
        mask_dilation: ours: the radius in voxels instead (a cube of half-width N, or x, y, z), as before.
        view_contrast / view_noise_std: per-network random intensity gain/shift in ``[-c, c]`` and
            Gaussian noise std (image units, [-1, 1] HU window); 0 = both nets see the same input.
    """

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[str] | None = None,
        patch_size: Sequence[int] = (96, 96, 32),
        filters: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[Sequence[int]] = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
        network: dict | None = None,
        init_seeds: Sequence[int] | None = None,
        supervision: Literal["pseudo", "marginal", "naive"] = "pseudo",
        lr: float = 2e-3,
        weight_decay: float = 1e-5,
        max_epochs_for_schedule: int | None = None,
        max_steps_for_schedule: int | None = None,
        class_weights: str | list[float] = "inverse_sqrt_frequency",
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        ema_horizon: float = 0.0625,
        ema_decay: float | None = None,
        ema_warmup_eta: float = 3.0,
        soft_weight: float = 0.5,
        soft_rampup: float = 0.5,
        soft_rampup_steps: int | None = None,
        soft_region: Literal["dilated_pseudo", "unannotated"] = "dilated_pseudo",
        mask_dilation_mm: float | list[float] = 5.0,
        mask_dilation: int | list[int] | None = None,
        view_contrast: float = 0.0,
        view_noise_std: float = 0.0,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 2,
        hd95_every_n_epochs: int = 1,
        spacing: Sequence[float] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__(num_classes, classes, patch_size, sw_overlap, sw_batch_size, hd95_every_n_epochs)
        self.save_hyperparameters()
        if supervision not in SUPERVISION:
            raise ConfigError(f"model supervision must be one of {list(SUPERVISION)}, got {supervision!r}")
        if init_seeds is None:
            run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            init_seeds = (2 * run_seed, 2 * run_seed + 1)
        seeds = [int(s) for s in init_seeds]
        if len(seeds) != 2 or seeds[0] == seeds[1]:
            raise ConfigError(f"model init_seeds must be two different seeds, got {list(init_seeds)}")
        if soft_weight < 0 or view_contrast < 0 or view_noise_std < 0:
            raise ConfigError("model soft_weight, view_contrast and view_noise_std must be >= 0")
        if soft_region not in SOFT_REGIONS:
            raise ConfigError(f"model soft_region must be one of {list(SOFT_REGIONS)}, got {soft_region!r}")
        if mask_dilation is not None and soft_region != "dilated_pseudo":
            raise ConfigError(
                "model mask_dilation needs soft_region=dilated_pseudo (it dilates the pseudo-labelled organs)"
            )
        if not ema_horizon > 0 or soft_rampup < 0 or ema_warmup_eta < 0:
            raise ConfigError("model ema_horizon must be > 0, soft_rampup and ema_warmup_eta >= 0")
        self.supervision = supervision
        # different initialisations, independent of the global seed (and identical on every DDP rank)
        for name, seed in zip(NETS, seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                setattr(
                    self, name, build_network(num_classes, filters, strides, network, spacing, kernel_sizes)
                )
        for name, net in zip(WAMS, (self.net_a, self.net_b)):
            setattr(self, name, weight_averaged(net, ema_decay, ema_warmup_eta))
        # the soft ramp-up length R and the averages' decay: fixed now when explicit (or T is given),
        # else at fit start from the trainer's run length (resolve_schedules)
        self.schedule_steps: int | None = None
        self.rampup_length: float | None = None
        self.resolve_schedules(max_steps_for_schedule)
        # which averaged model validation found better (0 = wam_a, 1 = wam_b); a buffer so every
        # checkpoint carries it and load_from_checkpoint restores it
        self.register_buffer("selected", torch.zeros((), dtype=torch.long))
        weights = initial_class_weights(class_weights, num_classes)
        loss_cls = MarginalFocalDiceLoss if supervision == "marginal" else FocalDiceLoss
        self.loss_fn = loss_cls(
            num_classes, weights, gamma=focal_gamma, focal_weight=focal_weight, dice_weight=dice_weight
        )
        self._wam_rows: dict[str, list[dict]] = {k: [] for k in WAMS}
        self._wam_dice: dict[str, float] = {}
        self._eval_index: int | None = None
        self.train()

    # ---------------------------------------------------------------- structure
    @property
    def averaged(self) -> tuple[nn.Module, nn.Module]:
        return self.wam_a, self.wam_b

    @property
    def patch_divisor(self) -> tuple[int, int, int] | None:
        """The DynUNet's total stride, or what a ``network`` given by class_path declares (``divisor``)."""
        if self.hparams.network is None:
            return stride_product(self.hparams.strides)
        divisor = getattr(self.net_a, "divisor", None)
        return tuple(int(d) for d in divisor) if divisor is not None else None

    @property
    def selected_name(self) -> str:
        return WAMS[int(self.selected)]

    def train(self, mode: bool = True):
        super().train(mode)
        for wam in self.averaged:
            wam.eval()  # teachers/deployed models: never dropout, BN on (copied) running statistics
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        pseudo = getattr(dm, "pseudo_labels", None)
        no_pseudo = pseudo is not None and all(p is None for p in pseudo)
        if stage == "fit" and self.supervision == "pseudo" and no_pseudo:
            raise ConfigError(
                "model supervision=pseudo but the data config has no pseudo_labels (files from "
                "`organseg pseudolabel`, e.g. data_modules/abdomen_fewlabel_pseudo.yaml); "
                "or use --model.init_args.supervision=marginal --model.init_args.soft_region=unannotated"
            )
        if stage == "fit" and self.hparams.soft_region == "dilated_pseudo" and no_pseudo:
            raise ConfigError(
                "model soft_region=dilated_pseudo but the data config has no pseudo_labels (the region "
                "dilates the pseudo-labelled organs); use --model.init_args.soft_region=unannotated"
            )
        focal_dice = self.loss_fn.inner if isinstance(self.loss_fn, MarginalFocalDiceLoss) else self.loss_fn
        resolve_class_weights(self, focal_dice, self.hparams.class_weights, stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the selected averaged model (the deployed one), or of the model being validated."""
        index = int(self.selected) if self._eval_index is None else self._eval_index
        return self.averaged[index](x)

    @contextmanager
    def _evaluating(self, index: int):
        self._eval_index = index
        try:
            yield
        finally:
            self._eval_index = None

    # ---------------------------------------------------------------- training
    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """A random intensity perturbation of the batch for one network (identity when disabled).
        Hand-written because it runs batched on the device after the DataModule's (torchio)
        augmentation, and must keep voxels aligned between the two views."""
        c, s = self.hparams.view_contrast, self.hparams.view_noise_std
        if not self.training or (c == 0 and s == 0):
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        gain = 1.0 + c * (2 * torch.rand(shape, device=x.device, dtype=x.dtype) - 1)
        shift = c * (2 * torch.rand(shape, device=x.device, dtype=x.dtype) - 1)
        return x * gain + shift + s * torch.randn_like(x)

    def supervised_target(self, batch: dict) -> torch.Tensor:
        """The hard target of the focal + Dice terms (``pseudo``: GT + pseudo-labels; else the label)."""
        if self.supervision == "pseudo":
            if "pseudo" not in batch:
                raise ConfigError(
                    "model supervision=pseudo: the batch has no 'pseudo' labels; use a data "
                    "config with data.init_args.pseudo_labels (`organseg pseudolabel`), or "
                    "supervision=marginal"
                )
            return merge_pseudo_labels(batch["label"], batch["labeled"], batch["pseudo"])
        return batch["label"]

    def supervised_loss(self, logits: torch.Tensor, target: torch.Tensor, labeled: torch.Tensor) -> dict:
        if self.supervision == "marginal":
            return self.loss_fn(logits, target, labeled)
        return self.loss_fn(logits, target)

    # ---------------------------------------------------------------- schedules (fractions of the run)
    def resolve_schedules(self, total_steps: int | None) -> None:
        """Fix the soft ramp-up length R and the averages' decay for a run of ``total_steps`` (T)
        optimiser steps (module doc): R = ``soft_rampup_steps`` if given, else ``soft_rampup * T``;
        decay = ``ema_decay`` if given, else ``1 - 1/max(1, ema_horizon * T)``. Unknown T leaves the
        fraction-based ones unset (an error if they are needed)."""
        hp = self.hparams
        total = int(total_steps) if total_steps is not None and total_steps > 0 else None
        self.schedule_steps = total
        if hp.soft_rampup_steps is not None:
            self.rampup_length = float(hp.soft_rampup_steps)
        else:
            self.rampup_length = None if total is None else hp.soft_rampup * total
        decay = hp.ema_decay
        if decay is None and total is not None:
            decay = decay_for_horizon(hp.ema_horizon * total)
        if decay is not None:
            for wam in self.averaged:
                set_schedule(wam, decay)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        total = self.hparams.max_steps_for_schedule
        if total is None:
            try:
                total = self.trainer.estimated_stepping_batches
            except Exception:  # noqa: BLE001 - Lightning raises several kinds when it cannot tell
                total = None
            if total is None or not math.isfinite(float(total)):
                total = None
        self.resolve_schedules(total)
        hp = self.hparams
        if self.schedule_steps is None and (hp.soft_rampup_steps is None or hp.ema_decay is None):
            raise ConfigError(
                "model: the soft ramp-up and weight-average schedules are fractions of the run's length, "
                "which is unknown; set trainer.max_steps (or max_epochs), model max_steps_for_schedule, "
                "or soft_rampup_steps and ema_decay"
            )

    @property
    def ema_decay_now(self) -> float:
        """The averaged models' decay d_t at their next update (warm-up included)."""
        ema = self.wam_a.ema
        return warmup_decay(self.wam_a.n_averaged, ema.decay, ema.eta) if ema.decay is not None else math.nan

    def soft_weight_at(self, step: int) -> float:
        """soft_weight x ramp-up at optimiser step ``step``."""
        if self.rampup_length is None:
            raise ConfigError(
                "model: the soft ramp-up length follows the run's max_steps, unknown outside a fit; "
                "give soft_rampup_steps or max_steps_for_schedule"
            )
        return self.hparams.soft_weight * sigmoid_rampup(step, self.rampup_length)

    def soft_weight_now(self) -> float:
        """soft_weight x ramp-up at the current optimiser step."""
        return self.soft_weight_at(self.global_step)

    def soft_region_mask(self, batch: dict) -> torch.Tensor:
        """bool [B,*S]: the voxels of the soft-label loss (``soft_region``; module doc)."""
        hp = self.hparams
        label, labeled = batch["label"], batch["labeled"].bool()
        if hp.soft_region == "unannotated":
            return region_mask(label, labeled)
        if "pseudo" not in batch:
            raise ConfigError(
                "model soft_region=dilated_pseudo: the batch has no 'pseudo' labels; use a data config "
                "with data.init_args.pseudo_labels (`organseg pseudolabel`), or soft_region=unannotated"
            )
        if hp.mask_dilation is not None:
            return region_mask(label, labeled, batch["pseudo"], hp.mask_dilation)
        if hp.spacing is None:
            raise ConfigError(
                "model mask_dilation_mm needs the voxel spacing (model spacing, which organseg fit links "
                "from the card's target_spacing), or give mask_dilation in voxels"
            )
        return region_mask(label, labeled, batch["pseudo"], radius_mm=hp.mask_dilation_mm, spacing=hp.spacing)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """All training terms for one batch; ``loss`` is the objective (sum over both nets)."""
        x, labeled = batch["image"], batch["labeled"].bool()
        target = self.supervised_target(batch)
        views = (self._view(x), self._view(x))
        logits = (self.net_a(views[0]), self.net_b(views[1]))  # one forward per network
        w = self.soft_weight_now()
        mask = self.soft_region_mask(batch)
        out: dict[str, torch.Tensor] = {
            "mask_fraction": mask.float().mean(),
            "soft_weight": torch.tensor(w, device=x.device),
            "ema_decay": torch.tensor(self.ema_decay_now, device=x.device),
        }
        teachers = (None, None)
        if self.hparams.soft_weight > 0:
            with torch.no_grad():
                teachers = tuple(torch.softmax(wam(v).float(), dim=1) for wam, v in zip(self.averaged, views))
        total = focal = dice = soft = 0.0
        for k, name in enumerate(NETS):
            terms = self.supervised_loss(logits[k], target, labeled)
            peer = teachers[1 - k]  # F_a <- E_b, F_b <- E_a
            s = soft_cross_entropy(logits[k], peer, mask) if peer is not None else logits[k].sum() * 0.0
            out[f"{name}/loss_focal"], out[f"{name}/loss_dice"] = terms["loss_focal"], terms["loss_dice"]
            out[f"{name}/loss_soft"] = s
            out[f"{name}/loss"] = terms["loss"] + w * s
            total, focal, dice, soft = (
                total + out[f"{name}/loss"],
                focal + terms["loss_focal"],
                dice + terms["loss_dice"],
                soft + s,
            )
        out.update(loss=total, loss_focal=focal, loss_dice=dice, loss_soft=soft)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.compute_losses(batch)
        bs = batch["image"].shape[0]
        log_loss_terms(self, terms, bs)
        return terms["loss"]

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_averages()  # after every optimiser step (not every batch under accumulation)

    @torch.no_grad()
    def update_averages(self) -> None:
        for wam, net in zip(self.averaged, (self.net_a, self.net_b)):
            wam.update_parameters(net)

    def configure_optimizers(self):
        params = [*self.net_a.parameters(), *self.net_b.parameters()]  # never the averaged models
        return adamw_poly(
            self, params, self.hparams.lr, self.hparams.weight_decay, self.hparams.max_epochs_for_schedule
        )

    # ---------------------------------------------------------------- validation: both averaged models
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        hd95 = self._with_hd95()
        first = int(self.selected)  # the currently selected model first (it feeds any W&B images)
        for index in (first, 1 - first):
            name = WAMS[index]
            with self._evaluating(index):
                self._wam_rows[name] += self._evaluate_batch(batch, with_hd95=hd95)

    def on_validation_epoch_end(self) -> None:
        local, self._wam_rows = self._wam_rows, {k: [] for k in WAMS}
        gathered = {}
        for name in WAMS:  # every rank gathers, in the same order
            self._rows = list(local[name])
            gathered[name] = self._gather_rows()
        if not gathered[WAMS[0]] or self.trainer.sanity_checking:
            self._rows = []
            return
        dice = {}
        for name in WAMS:
            summary = self._log_summary(f"val/{name}", gathered[name])
            dice[name] = _nan_if_none(next(s for s in summary if s["organ"] == "mean")["dice_mean"])
        self._wam_dice = dice
        a, b = dice[WAMS[0]], dice[WAMS[1]]
        if not (math.isnan(a) and math.isnan(b)):
            # ties and NaNs keep the current choice; identical on every rank (same gathered rows)
            cur = int(self.selected)
            other = 1 - cur
            mine, theirs = dice[WAMS[cur]], dice[WAMS[other]]
            if math.isnan(mine) or (not math.isnan(theirs) and theirs > mine):
                self.selected.fill_(other)
        self.log("val/selected", float(self.selected), sync_dist=False)
        self.print(
            f"epoch {self.current_epoch}: averaged models val/dice_mean wam_a {a:.3f}, wam_b {b:.3f}; "
            f"selected {self.selected_name}"
        )
        self._rows = list(local[self.selected_name])  # base logs val/dice/* of the selected model
        super().on_validation_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["cowam"] = {
            "selected": self.selected_name,
            "averaged_models": list(WAMS),
            "val_dice_mean": dict(self._wam_dice),
        }


def _nan_if_none(x) -> float:
    return math.nan if x is None else float(x)
