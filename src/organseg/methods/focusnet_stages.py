"""FocusNetV2 training (Gao et al., MedIA 2021): one LightningModule per training stage of the paper.

Every stage holds ``self.focusnet = FocusNetV2(...)`` (same parameter names in every checkpoint), so a
stage loads the previous stage's container with ``init_from`` and trains its own part:

1. ``SNetStage``      trains ``focusnet.snet`` (upstream: focal with fixed alphas + 0.2 x adaptive Tversky);
2. ``SOLStage``       S-Net frozen; trains ``focusnet.sol`` (heatmap MSE against ``batch["heatmap"]``);
3. ``SOSStage``       S-Net + SOL frozen; trains ``focusnet.sos`` on ROIs at the SOL-predicted centres
                      of every patch, negatives included (upstream), with binary focal + 0.5 x binary
                      Tversky; validates locate-zoom-paste (upstream trains SOS only in its stage 5:
                      this stage is a warm-up without the shape constraint);
4. ``ShapeAEStage``   pre-trains ``focusnet.shape_ae`` on true small-organ ROI masks (reconstruction);
5. ``JointStage``     upstream's ``adv_train.py``: trains only the SOS-Nets (generator) against the shape
                      autoencoder (discriminator), manual optimisation, two optimisers.

**Upstream by default, ours as named options** (issue 13; the first value is upstream's, each documented
in the stage YAML and the README): ``sos_centres: predicted | true_jittered``, ``sos_loss: upstream |
focal_dice``, ``merge: upstream | replace_in_roi | runner_up`` (stages 3, 5), ``joint_trainable: sos |
all`` and ``shape_loss: upstream | code_l2_bce`` (stage 5).

Conventions and choices:

- **Frozen** parts get ``requires_grad=False``, are kept out of the optimiser and stay in eval mode
  across ``train()`` calls (``train()`` is overridden; upstream left frozen BN in train mode). Parts
  a stage does not use (e.g. the AE in stages 1-3) are frozen too, so no parameter of the DDP-wrapped
  module is "unused" and plain ``ddp`` works for stages 1-4.
- **One architecture** (``architecture``, a ``networks.focusnetv2.FocusNetArchitecture``: widths and
  ``roi_mm``) is given once, in ``experiments/focusnetv2/architecture.yaml``: every stage config says
  ``architecture: architecture.yaml`` (jsonargparse loads a config file given as the value of a
  dataclass-typed argument, relative to the config that names it), so a width changed there reaches all
  five stages; ``--model.init_args.architecture.base_channels=24`` (or ``=other.yaml``) overrides it for
  one run. Every stage checkpoint stores it (``hparams["architecture"]``; with the data's
  ``small_organs`` and ``spacing`` as ``checkpoint["organseg"]["architecture"]``), and a stage whose
  record differs from the checkpoint it loads stops with one line naming both (``CheckpointError``).
- **Arguments**: ``FocusNetStageBase`` declares the shared ones once (``SegmentationModuleBase``'s
  ``num_classes``, ``classes``, ``patch_size``, ``sw_*``, ``hd95_every_n_epochs`` through ``**kwargs``);
  each stage declares only its own, keyword-only, plus its own defaults of ``lr``/``weight_decay``/
  ``hd95_every_n_epochs``, and forwards the rest by keyword (jsonargparse follows ``**kwargs`` into
  ``super().__init__``, so ``organseg fit --print_config`` lists them all).
- **init_from** is loaded at ``setup("fit")`` (before a ``--ckpt_path`` resume restores, and never when
  a finished checkpoint is loaded for evaluation, so the earlier file need not exist then);
  ``load_init()`` does it by hand. A missing file, a checkpoint of another stage, another architecture
  or mismatching shapes raise a one-line ``CheckpointError`` naming the file.
- **Small organs** (``small_organs``, card order = heatmap channel order): default None = the H&N
  card's small organs that are in ``classes``; link ``data.small_organs`` for other cards.
  ``setup`` checks they equal the DataModule's (heatmap channels would be misassigned otherwise).
- **ROI sizes**: the architecture's ``roi_mm`` (one [x, y, z] for all small organs or {organ: [x, y, z]})
  is converted with ``roi_size_voxels(roi_mm, spacing)``; ``spacing`` is the card's ``target_spacing``
  (default [1, 1, 3]; ``setup`` warns when the card differs).
- **Validation** (every stage logs ``val/dice_mean`` for the default checkpoint monitor): S-Net and
  SOL run together by Gaussian-blended sliding window over the case (logits + heatmaps, the patch
  size as window), centres are decoded from the blended heatmaps. Stages 2+ also log
  ``val/loc_error_mm/<organ>``, ``val/loc_found/<organ>`` and ``val/loc_error_mm_mean``. Stage 3+
  ``predict_case`` is locate-zoom-paste through the memory-bounded pipeline
  ``organseg.inference.predict_focusnet`` (one implementation for validation, evaluate and benchmarks).
- **Shape AE**: one AE shared by all small organs (upstream); upstream's (``shape_ae: upstream``) takes
  one ROI size for all, ours (``spatial``) each organ at its own ROI size (fully convolutional); the
  same sizes the joint stage feeds it.
- **Joint stage under DDP**: the segmenter step calls the AE/discriminator through
  ``losses.shape.call_frozen`` (no AE parameter in that graph) and the discriminator step sees only
  detached predictions, so each backward touches a disjoint parameter set: use
  ``trainer.strategy: ddp_find_unused_parameters_true`` (see experiments/focusnetv2/joint.yaml).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss, FocalLoss

from organseg.errors import CheckpointError, ConfigError
from organseg.inference.locate_zoom_paste import check_merge, merge_from_small_organs_from, predict_focusnet
from organseg.losses import FocalDiceLoss
from organseg.losses.heatmap import HeatmapMSELoss
from organseg.losses.segmentation import (
    UpstreamFocalTverskyLoss,
    binary_adaptive_tversky_loss,
    binary_focal_loss,
    upstream_class_alphas,
)
from organseg.losses.shape import (
    adversarial_losses,
    discriminator_logits,
    reconstruction_loss,
    shape_loss,
    upstream_discriminator_loss,
    upstream_generator_shape_loss,
)
from organseg.methods.base import SegmentationModuleBase, log_loss_terms
from organseg.methods.checkpoints import CHECKPOINT_KEY, read_checkpoint
from organseg.methods.unet_baseline import (
    adamw_poly,
    initial_class_weights,
    resolve_class_weights,
    warmup_step_decay,
)
from organseg.networks.focusnetv2 import FocusNetArchitecture, with_legacy_defaults
from organseg.spatial.heatmaps import decode_centres
from organseg.spatial.roi import crop_rois, roi_box

# the H&N card's small organs (data_modules/cards/hn_phantom.yaml), the default when none are given
DEFAULT_SMALL_ORGANS = ["lens_l", "lens_r", "optic_nerve_l", "optic_nerve_r", "chiasm", "pituitary"]
PARTS = ("snet", "sol", "sos", "shape_ae", "disc")
# the choices of each upstream-vs-ours option; the first is upstream's and the default
SOS_CENTRES = ("predicted", "true_jittered")
SOS_LOSSES = ("upstream", "focal_dice")
JOINT_TRAINABLE = ("sos", "all")
SHAPE_LOSSES = ("upstream", "code_l2_bce")
SNET_LOSSES = ("upstream", "focal_dice")
LR_SCHEDULES = ("step_budget", "constant", "poly_epochs")
UPSTREAM_SOS_DICE_WEIGHT = 0.5  # upstream's SOS loss: binary focal + 0.5 x binary (adaptive Tversky) Dice
DEFAULT_ARCHITECTURE = FocusNetArchitecture()  # = experiments/focusnetv2/architecture.yaml


class FocusNetStageBase(SegmentationModuleBase):
    """Shared plumbing of the stages: the container, freezing, ``init_from`` loading, S-Net+SOL
    sliding-window validation with localisation metrics.

    Args:
        architecture: widths and ``roi_mm``, the same in all five stages (given once:
            ``architecture: architecture.yaml`` in every experiments/focusnetv2 stage config).
        small_organs: small-organ names in the card's ``small`` order (default: see module doc; the
            CLI links ``data.small_organs``).
        spacing: the cache's voxel spacing (the card's ``target_spacing``, linked by the CLI), for
            ``roi_mm`` -> voxels.
        init_from: checkpoint of the previous stage, or of this stage (see each stage).
        loc_threshold: heatmap peak needed to accept a located centre (``decode_centres``; stages that
            locate: SOL, SOS, joint); upstream's 0.6 (experiments/focusnetv2/sol.yaml says why its 0.3).
        lr / weight_decay: AdamW of the trained part.
        lr_schedule: ``"step_budget"``: upstream's shape over the run's optimiser steps (the trainer's
            ``max_steps``, or its epochs x batches): exponential warm-up over ``warmup_fraction`` of them,
            then x ``lr_decay_gamma`` at each fraction in ``lr_decay_at`` (``warmup_step_decay``; S-Net:
            warm-up 5/600, x0.1 at 1/3 and 2/3; SOL: x0.25 at 1/3 and 2/3); ``"constant"`` (upstream's
            SOS and autoencoder); ``"poly_epochs"`` (ours before issue 13: nnU-Net's poly decay per epoch
            over ``max_epochs_for_schedule`` or the trainer's ``max_epochs``, nearly constant under a step
            budget with a large ``max_epochs``).
        **kwargs: ``SegmentationModuleBase``'s (``num_classes``, ``classes``, ``patch_size``,
            ``sw_overlap``, ``sw_batch_size``, ``hd95_every_n_epochs``).
    """

    trainable: tuple[str, ...] = ()
    init_parts: tuple[str, ...] = ()  # container parts loaded from ``init_from``
    init_kinds: tuple[str, ...] = ()  # stage class names accepted as ``init_from``
    log_localisation = True

    def __init__(
        self,
        *,
        architecture: FocusNetArchitecture = DEFAULT_ARCHITECTURE,
        small_organs: list[str] | None = None,
        spacing: list[float] = (1.0, 1.0, 3.0),
        init_from: str | None = None,
        loc_threshold: float = 0.6,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        max_epochs_for_schedule: int | None = None,
        lr_schedule: str = "constant",
        warmup_fraction: float = 0.0,
        lr_decay_at: list[float] = (),
        lr_decay_gamma: float = 1.0,
        **kwargs,
    ):
        _check_choice("lr_schedule", lr_schedule, LR_SCHEDULES, upstream_first=False)
        super().__init__(**kwargs)
        # one call for the whole stage: Lightning collects the arguments of every __init__ up the chain
        self.save_hyperparameters()
        self.architecture = FocusNetArchitecture.of(architecture)
        self.hparams["architecture"] = self.architecture.as_dict()  # plain values in checkpoints and logs
        if small_organs is None:
            small_organs = [o for o in DEFAULT_SMALL_ORGANS if o in self.classes]
        unknown = [o for o in small_organs if o not in self.classes]
        if unknown or not small_organs:
            raise ConfigError(
                f"small_organs {list(small_organs)}: unknown {unknown} or empty (classes: {self.classes})"
            )
        self.small_organs = list(small_organs)
        self.small_classes = [self.classes.index(o) for o in self.small_organs]
        self.spacing = [float(s) for s in spacing]
        self.focusnet = self.architecture.build(self.classes, self.small_organs, self.spacing)
        self.roi_sizes = self.focusnet.roi_sizes
        self.init_from = init_from
        self.loc_threshold = loc_threshold
        self._init_loaded = False
        self._loc_rows: list[dict] = []
        self._last_centres: tuple[torch.Tensor, torch.Tensor] | None = None
        for name in PARTS:
            if name not in self.trainable:
                getattr(self.focusnet, name).requires_grad_(False)
        self.train()

    @property
    def patch_divisor(self) -> tuple[int, int, int]:
        """S-Net's (``networks/snet.py`` ``divisor``): every stage slides S-Net over the case."""
        return tuple(int(d) for d in self.focusnet.snet.divisor)

    # ---------------------------------------------------------------- freezing
    @property
    def frozen_parts(self) -> list[str]:
        return [p for p in PARTS if p not in self.trainable]

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_parts:
            getattr(self.focusnet, name).eval()  # frozen norms/statistics never drift
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.trainable for p in getattr(self.focusnet, name).parameters()]

    # ---------------------------------------------------------------- loading earlier stages
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self._trainer, "datamodule", None)
        if stage == "fit" and dm is not None and hasattr(dm, "small_organs"):
            if list(dm.small_organs) != self.small_organs:
                raise ConfigError(
                    f"model small_organs {self.small_organs} differ from the data's "
                    f"{list(dm.small_organs)} (heatmap channel order); set/link model "
                    f"small_organs"
                )
            card_spacing = [list(c.target_spacing) for c in getattr(dm, "cards", []) if c.target_spacing]
            if card_spacing and any([float(v) for v in s] != self.spacing for s in card_spacing):
                warnings.warn(
                    f"model spacing {self.spacing} differs from the card target_spacing "
                    f"{card_spacing[0]}: roi_mm is converted with the model's; set model.init_args.spacing",
                    stacklevel=2,
                )
        if stage == "fit" and not self._init_loaded:
            self.load_init()

    def load_init(self) -> None:
        """Load this stage's ``init_from`` (and stage-specific extras); idempotent per module."""
        if self.init_from:
            self.load_parts(self.init_from, self.init_parts, self.init_kinds)
        self._init_loaded = True

    @property
    def architecture_record(self) -> dict:
        """What this stage's container is built from (stored in its checkpoints, compared on loading)."""
        return self.architecture.record(self.small_organs, self.spacing)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["architecture"] = self.architecture_record

    def check_architecture(self, path: str | Path, ckpt: dict) -> None:
        """A one-line CheckpointError naming both values when the checkpoint at ``path`` was written with
        another architecture (checkpoints without a record are left to the shape check)."""
        theirs = (ckpt.get(CHECKPOINT_KEY) or {}).get("architecture")
        mine = self.architecture_record
        if theirs is None:
            return
        theirs = with_legacy_defaults(theirs)
        if theirs == mine:
            return
        keys = [*mine, *(k for k in theirs if k not in mine)]
        diff = "; ".join(
            f"{k} {_flow(theirs.get(k))} vs {_flow(mine.get(k))}"
            for k in keys
            if theirs.get(k) != mine.get(k)
        )
        raise CheckpointError(
            f"checkpoint {path}: architecture {_flow(theirs)} differs from this stage's "
            f"{_flow(mine)} ({diff})"
        )

    def load_parts(self, path: str | Path, parts: Sequence[str], kinds: Sequence[str]) -> None:
        """Copy container ``parts`` from a stage checkpoint at ``path`` whose module class name is one
        of ``kinds`` and whose architecture is this stage's; any problem is a one-line CheckpointError
        naming the file."""
        ckpt = read_checkpoint(path)
        module = str((ckpt.get(CHECKPOINT_KEY) or {}).get("module", ""))
        kind = module.rsplit(".", 1)[-1]
        if kind not in kinds:
            raise CheckpointError(
                f"checkpoint {path}: written by {module or 'an unknown module'}, "
                f"expected one of {list(kinds)}"
            )
        self.check_architecture(path, ckpt)
        classes = (ckpt.get(CHECKPOINT_KEY) or {}).get("classes")
        if classes is not None and list(classes) != list(self.classes):
            # same count, other order: the shapes match, but S-Net's output channels would mean other organs
            raise CheckpointError(
                f"checkpoint {path}: classes {list(classes)} differ from this stage's {list(self.classes)}"
            )
        state = {k[len("focusnet.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("focusnet.")}
        own = self.focusnet.state_dict()
        wanted = {k: v for k, v in own.items() if k.split(".", 1)[0] in parts}
        missing = sorted(k for k in wanted if k not in state)
        if missing:
            raise CheckpointError(
                f"checkpoint {path}: lacks {len(missing)} focusnet parameters of "
                f"{list(parts)} (e.g. {missing[0]})"
            )
        bad = sorted(k for k in wanted if tuple(state[k].shape) != tuple(wanted[k].shape))
        if bad:
            raise CheckpointError(
                f"checkpoint {path}: shape of {bad[0]} is {tuple(state[bad[0]].shape)}, "
                f"this model has {tuple(wanted[bad[0]].shape)} "
                f"(different widths/classes/small organs?)"
            )
        with torch.no_grad():
            for k in wanted:
                own[k].copy_(state[k].to(own[k].dtype))

    # ---------------------------------------------------------------- helpers
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S-Net logits (so the base class's sliding-window validation works unchanged)."""
        return self.focusnet.snet(x)

    def true_centres(self, heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(centres [B,K,3], found [B,K]) decoded from the target heatmaps (threshold 0.5)."""
        return decode_centres(heatmap, threshold=0.5)

    def jittered(self, centres: torch.Tensor, jitter: Sequence[int]) -> torch.Tensor:
        """centres [N,3] + a uniform integer offset in [-j, j] per axis."""
        if not any(jitter):
            return centres
        off = torch.stack([torch.randint(-int(j), int(j) + 1, (centres.shape[0],)) for j in jitter], dim=1)
        return centres + off.to(centres)

    def _log_terms(self, terms: dict[str, torch.Tensor], bs: int) -> None:
        log_loss_terms(self, terms, bs)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.lr_schedule == "poly_epochs":
            return adamw_poly(
                self, self.trainable_parameters(), hp.lr, hp.weight_decay, hp.max_epochs_for_schedule
            )
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.total_steps() if hp.lr_schedule == "step_budget" else None
        if not total:
            if hp.lr_schedule == "step_budget" and getattr(self, "_trainer", None) is not None:
                warnings.warn(
                    "lr_schedule step_budget: the run has no step or epoch limit; constant lr", stacklevel=2
                )
            return opt
        factor = warmup_step_decay(
            total,
            round(hp.warmup_fraction * total),
            [round(f * total) for f in hp.lr_decay_at],
            hp.lr_decay_gamma,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def total_steps(self) -> int | None:
        """The run's optimiser steps (``max_steps``, or epochs x batches), None when unbounded or unknown."""
        trainer = getattr(self, "_trainer", None)
        total = getattr(trainer, "estimated_stepping_batches", None) if trainer is not None else None
        if total is None or not math.isfinite(float(total)) or total <= 0:
            return None
        return int(total)

    # ---------------------------------------------------------------- whole-case inference
    @torch.no_grad()
    def snet_sol_case(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sliding-window (patch size, Gaussian blending) S-Net logits [B,C,*S] and SOL heatmaps [B,K,*S]."""

        def predictor(x):
            logits, _, heat = self.focusnet.snet_sol(x)
            return logits, heat

        logits, heat = sliding_window_inference(
            image,
            roi_size=self.patch_size,
            sw_batch_size=self.sw_batch_size,
            predictor=predictor,
            overlap=self.sw_overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(image.min()),
        )
        return logits, heat

    def predict_case(self, image: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """S-Net labels [B,*S] (uint8); the decoded SOL centres are kept for the localisation metrics."""
        logits, heat = self.snet_sol_case(image)
        self._last_centres = decode_centres(heat, threshold=self.loc_threshold)
        return logits.argmax(1).to(torch.uint8)

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.log_localisation and self._last_centres is not None and "centres" in batch:
            self._loc_rows += self.localisation_rows(*self._last_centres, batch)

    def localisation_rows(self, centres: torch.Tensor, found: torch.Tensor, batch: dict) -> list[dict]:
        """Per case and small organ: found, present and the centre error in mm (NaN if either is missing).
        ``centres`` [B,K,3] / ``found`` [B,K] are the SOL centres decoded at prediction time."""
        rows = []
        for b in range(centres.shape[0]):
            spacing = torch.as_tensor(batch["spacing"][b], dtype=torch.float64)
            for k, (organ, cls) in enumerate(zip(self.small_organs, self.small_classes)):
                true = batch["centres"][b, cls].double().cpu()
                present = bool(torch.isfinite(true).all())
                ok = bool(found[b, k])
                err = (
                    float(((centres[b, k].double().cpu() - true) * spacing).norm())
                    if present and ok
                    else math.nan
                )
                rows.append({"organ": organ, "present": present, "found": ok, "error_mm": err})
        return rows

    def epoch_rows(self, attr: str) -> list[dict]:
        """The epoch's rows kept in ``self.<attr>``, from every rank (a collective: call it on all), and
        cleared; none while sanity checking."""
        rows = _gather(getattr(self, attr))
        setattr(self, attr, [])
        return [] if self.trainer.sanity_checking else rows

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        rows = self.epoch_rows("_loc_rows")
        if not rows:
            return
        errors = []
        for organ in self.small_organs:
            mine = [r for r in rows if r["organ"] == organ and r["present"]]
            if not mine:
                continue
            errs = [r["error_mm"] for r in mine if not math.isnan(r["error_mm"])]
            err = sum(errs) / len(errs) if errs else math.nan
            errors.append(err)
            self.log(f"val/loc_error_mm/{organ}", err, sync_dist=False)
            self.log(f"val/loc_found/{organ}", sum(r["found"] for r in mine) / len(mine), sync_dist=False)
        finite = [e for e in errors if not math.isnan(e)]
        # a never-found organ counts as a large error so the mean cannot improve by losing organs
        if errors:
            self.log(
                "val/loc_error_mm_mean",
                sum(finite + [1000.0] * (len(errors) - len(finite))) / len(errors),
                sync_dist=False,
            )


# ==================================================================== stage 1
class SNetStage(FocusNetStageBase):
    """Stage 1: S-Net on all organs.

    Args (besides ``FocusNetStageBase``'s; the first value of each choice is upstream's, the default):
        snet_loss: ``"upstream"``: ``FL + tversky_weight x DL`` (upstream ``train_backbone.py``: softmax focal
            loss with fixed alphas + 0.2 x adaptive Tversky, ``UpstreamFocalTverskyLoss``).
            ``"focal_dice"`` (ours, before issue 13): ``focal_weight`` x MONAI focal + ``dice_weight`` x
            MONAI Dice (``FocalDiceLoss``, as ``UNetBaseline``).
        class_weights: the focal alphas. ``"upstream"``: background 0.5, each small organ 8, every other
            organ 1 (``upstream_class_alphas``); a list (one per class); or ours, a mode computed from the
            training cache's voxel counts at fit start (``inverse_sqrt_frequency`` -- the default before
            issue 13 --, ``inverse_frequency``, ``uniform``), normalised to mean 1.
        focal_gamma: the focal exponent (upstream 2).
        init_from: optional, an ``SNetStage`` checkpoint to continue from.
    """

    trainable = ("snet",)
    init_parts = ("snet",)
    init_kinds = ("SNetStage",)
    log_localisation = False

    def __init__(
        self,
        *,
        snet_loss: str = "upstream",
        class_weights: str | list[float] = "upstream",
        focal_gamma: float = 2.0,
        tversky_weight: float = 0.2,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        lr: float = 2e-3,
        lr_schedule: str = "step_budget",
        warmup_fraction: float = 5 / 600,
        lr_decay_at: list[float] = (1 / 3, 2 / 3),
        lr_decay_gamma: float = 0.1,
        **kwargs,
    ):
        _check_choice("snet_loss", snet_loss, SNET_LOSSES)
        super().__init__(
            lr=lr,
            lr_schedule=lr_schedule,
            warmup_fraction=warmup_fraction,
            lr_decay_at=lr_decay_at,
            lr_decay_gamma=lr_decay_gamma,
            **kwargs,
        )
        if class_weights == "upstream":
            weights = upstream_class_alphas(self.num_classes, self.small_classes)
        else:
            weights = initial_class_weights(class_weights, self.num_classes)
        if snet_loss == "upstream":
            self.loss_fn = UpstreamFocalTverskyLoss(
                self.num_classes, weights, gamma=focal_gamma, tversky_weight=tversky_weight
            )
        else:
            self.loss_fn = FocalDiceLoss(
                self.num_classes,
                weights,
                gamma=focal_gamma,
                focal_weight=focal_weight,
                dice_weight=dice_weight,
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.class_weights != "upstream":
            resolve_class_weights(self, self.loss_fn, self.hparams.class_weights, stage)

    def predict_case(
        self, image: torch.Tensor, progress: bool = False, window_transform=None
    ) -> torch.Tensor:
        return SegmentationModuleBase.predict_case(self, image, progress, window_transform)  # S-Net only

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_fn(self.focusnet.snet(batch["image"]), batch["label"])
        self._log_terms(terms, batch["image"].shape[0])
        return terms["loss"]


# ==================================================================== stage 2
class SOLStage(FocusNetStageBase):
    """Stage 2: SOL-Net heatmap regression on frozen S-Net features.

    Args: ``init_from`` a ``SNetStage`` checkpoint (required); ``heatmap_alpha`` the
    ``HeatmapMSELoss`` target weighting (0 = plain MSE, upstream). Needs a data config with
    ``heatmap_sigma_mm`` (``data_modules/hn_phantom_focusnet.yaml``).
    """

    trainable = ("sol",)
    uses_heatmap_targets = True
    init_parts = ("snet",)
    init_kinds = ("SNetStage", "SOLStage")

    def __init__(
        self,
        *,
        heatmap_alpha: float = 0.0,
        lr: float = 4e-4,
        lr_schedule: str = "step_budget",
        lr_decay_at: list[float] = (1 / 3, 2 / 3),
        lr_decay_gamma: float = 0.25,
        hd95_every_n_epochs: int = 0,
        **kwargs,
    ):
        super().__init__(
            lr=lr,
            lr_schedule=lr_schedule,
            lr_decay_at=lr_decay_at,
            lr_decay_gamma=lr_decay_gamma,
            hd95_every_n_epochs=hd95_every_n_epochs,
            **kwargs,
        )
        self.heatmap_loss = HeatmapMSELoss(heatmap_alpha)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "heatmap" not in batch:
            raise ConfigError(
                "SOLStage needs heatmap targets: use a data config with heatmap_sigma_mm "
                "(data_modules/hn_phantom_focusnet.yaml)"
            )
        with torch.no_grad():
            _, features = self.focusnet.snet.forward_features(batch["image"])
        loss = self.heatmap_loss(self.focusnet.sol(features), batch["heatmap"])
        self._log_terms({"loss_heatmap": loss, "loss": loss}, batch["image"].shape[0])
        return loss


# ==================================================================== stage 3
class _ROIMixin:
    """Ground-truth ROIs around the true (target-heatmap) centres, shared by stages 3-5."""

    uses_heatmap_targets = True

    def gt_rois(self, batch: dict, jitter: Sequence[int]) -> list[dict]:
        """Per small organ found in some sample of the batch: ``{"k", "index" [N] (batch rows),
        "centres" [N,3] (jittered), "target" [N,1,*roi_k] float (crop of label == class)}``."""
        if "heatmap" not in batch:
            raise ConfigError(
                f"{type(self).__name__} needs heatmap targets: use a data config with "
                "heatmap_sigma_mm (data_modules/hn_phantom_focusnet.yaml)"
            )
        centres, found = self.true_centres(batch["heatmap"])
        out = []
        for k, cls in enumerate(self.small_classes):
            index = found[:, k].nonzero().flatten()
            if index.numel() == 0:
                continue
            c = self.jittered(centres[index, k].cpu(), jitter)
            mask = (batch["label"][index] == cls).float()[:, None]
            out.append(
                {"k": k, "index": index, "centres": c, "target": crop_rois(mask, c, self.roi_sizes[k])}
            )
        return out


class SOSStage(_ROIMixin, FocusNetStageBase):
    """Stage 3: one binary SOS-Net per small organ on ROIs of the CT (the architecture's ``sos_branch:
    upstream``) or of concat(S-Net features, SOL heatmap, CT) (``unet``, ours), S-Net and SOL frozen.

    Args (each default is upstream's; the other value is ours, kept as an option):
        init_from: a ``SOLStage`` checkpoint (required).
        sos_centres: where the training ROIs are cropped. ``"predicted"`` (upstream): at the SOL argmax of
            every organ in every training patch, the box shifted inside the patch (upstream's clamp),
            whether the organ is there or not, so SOS also learns negatives (all-zero ROIs), as it meets
            them at test time. ``"true_jittered"`` (ours): at the true centre plus a uniform integer
            offset in [-j, j] per axis (``jitter_voxels``), only where the organ is in the patch.
        sos_loss: ``"upstream"``: binary focal (alpha 0.5, ``focal_gamma``) + 0.5 x adaptive binary
            Tversky (upstream's ``BinaryFocalLoss`` with its negative-term typo fixed, and
            ``BinaryDiceLoss``), voxels of all organs and samples pooled. ``"focal_dice"`` (ours):
            ``focal_weight`` x MONAI focal + ``dice_weight`` x MONAI Dice (batch-pooled), mean over organs.
        merge: how the SOS masks enter S-Net's label map at prediction time: ``"upstream"`` |
            ``"replace_in_roi"`` | ``"runner_up"`` (``organseg.inference.locate_zoom_paste``).
        small_organs_from: the pre-issue-13 name of ``merge`` (``"sos"`` = ``runner_up``,
            ``"snet_and_sos"`` = ``replace_in_roi``), still read from older checkpoints; ``merge`` wins.
    """

    trainable = ("sos",)
    init_parts = ("snet", "sol")
    init_kinds = ("SOLStage", "SOSStage")

    def __init__(
        self,
        *,
        sos_centres: str = "predicted",
        sos_loss: str = "upstream",
        merge: str = "upstream",
        small_organs_from: str | None = None,
        jitter_voxels: list[int] = (3, 3, 1),
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        hd95_every_n_epochs: int = 0,
        **kwargs,
    ):
        _check_choice("sos_centres", sos_centres, SOS_CENTRES)
        _check_choice("sos_loss", sos_loss, SOS_LOSSES)
        if small_organs_from is not None and merge == "upstream":
            merge = merge_from_small_organs_from(small_organs_from)  # an older checkpoint's merge rule
        super().__init__(lr=lr, weight_decay=weight_decay, hd95_every_n_epochs=hd95_every_n_epochs, **kwargs)
        self.merge = check_merge(merge)
        self.hparams["merge"] = self.merge
        self.sos_centres = sos_centres
        self.sos_loss_kind = sos_loss
        self.jitter_voxels = [int(j) for j in jitter_voxels]
        self.sos_focal = FocalLoss(gamma=focal_gamma)  # sigmoid, binary
        self.sos_dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    @property
    def uses_heatmap_targets(self) -> bool:
        """Only true-centred ROIs read ``batch["heatmap"]`` (predicted centres come from SOL itself)."""
        return self.sos_centres == "true_jittered"

    def predicted_rois(self, batch: dict, heatmaps: torch.Tensor) -> list[dict]:
        """Upstream's training ROIs: per small organ, one per sample, centred at the argmax of that
        organ's SOL heatmap in the patch, the box shifted to lie inside the patch; ``target`` is the crop
        of ``label == class``, all zero where the organ is not in the ROI (a negative). Same keys as
        ``gt_rois``; ``present`` [N] says which targets hold organ voxels."""
        n, dims = heatmaps.shape[0], tuple(int(d) for d in heatmaps.shape[-3:])
        out = []
        for k, cls in enumerate(self.small_classes):
            size = self.roi_sizes[k]
            flat = heatmaps[:, k].detach().reshape(n, -1).argmax(dim=1).cpu()
            peaks = torch.stack(torch.unravel_index(flat, dims), dim=1).tolist()
            starts = [roi_box(p, size, fit_within=dims)[0] for p in peaks]
            # the box centre whose roi_box (without fit_within) is that shifted box
            centres = torch.tensor(
                [[s + z // 2 for s, z in zip(st, size)] for st in starts], dtype=torch.float32
            )
            mask = (batch["label"] == cls).float()[:, None]
            target = crop_rois(mask, centres, size)
            out.append(
                {
                    "k": k,
                    "index": torch.arange(n, device=heatmaps.device),
                    "centres": centres,
                    "target": target,
                    "present": target.flatten(1).amax(dim=1) > 0,
                }
            )
        return out

    def training_rois(self, batch: dict, heatmaps: torch.Tensor) -> list[dict]:
        """The ROIs SOS trains on (``sos_centres``)."""
        if self.sos_centres == "predicted":
            return self.predicted_rois(batch, heatmaps)
        return self.gt_rois(batch, self.jitter_voxels)

    def sos_outputs(self, batch: dict, features: torch.Tensor, heatmaps: torch.Tensor) -> list[dict]:
        """``training_rois`` plus each organ's SOS ``logits`` [N,1,*roi_k] at the same boxes."""
        rois = self.training_rois(batch, heatmaps)
        for r in rois:
            i = r["index"]
            r["logits"], _ = self.focusnet.sos_logits(
                features[i], heatmaps[i], batch["image"][i], r["centres"], r["k"]
            )
        return rois

    def sos_loss(self, rois: list[dict]) -> dict[str, torch.Tensor]:
        if not rois:  # no small organ in this batch: a zero loss that still touches SOS (DDP-safe)
            zero = sum(p.sum() for p in self.focusnet.sos.parameters()) * 0.0
            return {"loss": zero, "loss_focal": zero.detach(), "loss_dice": zero.detach()}
        if self.sos_loss_kind == "upstream":
            logits, targets = [r["logits"] for r in rois], [r["target"] for r in rois]
            focal = binary_focal_loss(logits, targets, alpha=0.5, gamma=self.hparams.focal_gamma)
            dice = binary_adaptive_tversky_loss(logits, targets)
            return {"loss": focal + UPSTREAM_SOS_DICE_WEIGHT * dice, "loss_focal": focal, "loss_dice": dice}
        focal = torch.stack([self.sos_focal(r["logits"], r["target"]) for r in rois]).mean()
        dice = torch.stack([self.sos_dice(r["logits"], r["target"]) for r in rois]).mean()
        return {
            "loss": self.hparams.focal_weight * focal + self.hparams.dice_weight * dice,
            "loss_focal": focal,
            "loss_dice": dice,
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            _, features, heatmaps = self.focusnet.snet_sol(batch["image"])
        terms = self.sos_loss(self.sos_outputs(batch, features, heatmaps))
        self._log_terms(terms, batch["image"].shape[0])
        return terms["loss"]

    @torch.no_grad()
    def predict_case(self, image: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Locate-zoom-paste over whole cases with the bounded-memory pipeline
        (``organseg.inference.locate_zoom_paste.predict_focusnet``): S-Net labels, SOL centres, SOS masks
        merged by ``merge``."""
        labels, centres, found = [], [], []
        for b in range(image.shape[0]):
            out = predict_focusnet(
                self.focusnet,
                image[b : b + 1],
                self.patch_size,
                overlap=self.sw_overlap,
                threshold=self.loc_threshold,
                device=image.device,
                progress=progress,
                sw_batch_size=self.sw_batch_size,
                merge=self.merge,
            )
            labels.append(out["labels"])
            centres.append(torch.as_tensor(out["centres"]))
            found.append(torch.as_tensor(out["found"]))
        self._last_centres = (torch.stack(centres), torch.stack(found))
        return torch.stack(labels).to(image.device)


# ==================================================================== stage 4
class ShapeAEStage(_ROIMixin, FocusNetStageBase):
    """Stage 4: the shape autoencoder learns true small-organ ROI masks (BCE reconstruction). One AE
    shared by the organs, each at its own ROI size (the joint stage feeds it the same sizes); masks
    are cropped around the true centres with ``jitter_voxels`` jitter. Validation logs
    ``val/recon_dice`` (+ ``/<organ>``) on the whole validation cases' true ROIs; ``predict_case`` is
    S-Net's.

    Args: ``init_from`` a ``SOSStage`` checkpoint (optional: without it S-Net/SOL/SOS stay random,
    so its checkpoint only serves as ``shape_from``).
    """

    trainable = ("shape_ae",)
    init_parts = ("snet", "sol", "sos")
    init_kinds = ("SOSStage", "ShapeAEStage")
    log_localisation = False

    def __init__(
        self,
        *,
        jitter_voxels: list[int] = (3, 3, 1),
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        hd95_every_n_epochs: int = 0,
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, hd95_every_n_epochs=hd95_every_n_epochs, **kwargs)
        self.jitter_voxels = [int(j) for j in jitter_voxels]
        self._recon_rows: list[dict] = []

    def predict_case(self, image: torch.Tensor, progress: bool = False) -> torch.Tensor:
        return SegmentationModuleBase.predict_case(self, image, progress)  # S-Net only

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rois = self.gt_rois(batch, self.jitter_voxels)
        if rois:
            loss = torch.stack(
                [reconstruction_loss(self.focusnet.shape_ae, r["target"]) for r in rois]
            ).mean()
        else:
            loss = sum(p.sum() for p in self.focusnet.shape_ae.parameters()) * 0.0
        self._log_terms({"loss_recon": loss, "loss": loss}, batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        with torch.no_grad():
            for b in range(batch["image"].shape[0]):
                for k, (organ, cls) in enumerate(zip(self.small_organs, self.small_classes)):
                    c = batch["centres"][b, cls]
                    if not bool(torch.isfinite(c).all()):
                        continue
                    mask = crop_rois(
                        (batch["label"][b : b + 1] == cls).float()[:, None], c[None].cpu(), self.roi_sizes[k]
                    )
                    recon, _ = self.focusnet.shape_ae(mask)
                    pred = torch.sigmoid(recon) > 0.5
                    truth = mask > 0.5
                    denom = float(pred.sum() + truth.sum())
                    dice = 2.0 * float((pred & truth).sum()) / denom if denom else 1.0
                    self._recon_rows.append({"organ": organ, "dice": dice})

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        rows = self.epoch_rows("_recon_rows")
        if not rows:
            return
        per = []
        for organ in self.small_organs:
            d = [r["dice"] for r in rows if r["organ"] == organ]
            if d:
                per.append(sum(d) / len(d))
                self.log(f"val/recon_dice/{organ}", per[-1], sync_dist=False)
        self.log("val/recon_dice", sum(per) / len(per) if per else math.nan, sync_dist=False)


# ==================================================================== stage 5
class JointStage(SOSStage):
    """Stage 5: the adversarial shape constraint (manual optimisation, two optimisers). Defaults are
    upstream's (``adv_train.py``); each other value is ours, kept as an option.

    - ``joint_trainable``: ``"sos"`` (upstream) trains only the SOS-Nets (generator, Adam) against the
      shape autoencoder (discriminator, Adam); S-Net and SOL stay frozen in eval mode and run without a
      graph. ``"all"`` (ours, the behaviour before issue 13) fine-tunes S-Net + SOL + SOS (AdamW) with
      ``seg_weight * FocalDice(S-Net) + heatmap_weight * MSE(SOL)`` added to the generator's loss
      (``class_weights``, ``focal_gamma``/``focal_weight``/``dice_weight``, ``heatmap_alpha``,
      ``detach_sos_inputs`` apply only there).
    - ``shape_loss``: ``"upstream"``: the AE is the discriminator. Per step, first the D step
      (``losses.shape.upstream_discriminator_loss``: 0.999 x reconstruction of sigmoid(pred) and of the
      true mask - 0.001 x (code + 0.2 x each decoder feature-map distance), AE only), then the G step:
      the SOS loss (``sos_loss``, upstream binary focal + 0.5 x binary Tversky) +
      ``upstream_generator_shape_loss`` (5 x MSE(codes) + MSE(f1) + MSE(f2) + MSE(sigmoid(pred), true));
      no real/fake term. ``"code_l2_bce"`` (ours, before issue 13): G = SOS loss + ``shape_weight`` x
      ``shape_loss(kind=shape_kind)`` + ``adv_weight`` x BCE real/fake (``ShapeDiscriminator`` head),
      then D = BCE real/fake on true vs detached predicted masks + ``recon_weight`` x BCE reconstruction
      (AE + head).
    - ``sos_centres`` / ``sos_loss`` / ``merge`` as in ``SOSStage`` (upstream: predicted centres, negatives
      included).

    Args: ``init_from`` a ``SOSStage`` checkpoint, ``shape_from`` a ``ShapeAEStage`` checkpoint (both
    required for a real run). ``lr`` (generator) / ``lr_disc`` (autoencoder) / ``weight_decay``: upstream's
    2e-4 / 2e-4 / 1e-4; no schedule (``max_epochs_for_schedule`` must stay unset).
    """

    init_parts = ("snet", "sol", "sos")
    init_kinds = ("SOSStage", "JointStage")

    def __init__(
        self,
        *,
        shape_from: str | None = None,
        joint_trainable: str = "sos",
        shape_loss: str = "upstream",
        class_weights: str | list[float] = "inverse_sqrt_frequency",
        seg_weight: float = 1.0,
        heatmap_weight: float = 2.0,
        heatmap_alpha: float = 0.0,
        shape_weight: float = 1.0,
        shape_kind: str = "code_l2",
        adv_weight: float = 0.01,
        recon_weight: float = 1.0,
        detach_sos_inputs: bool = True,
        lr: float = 2e-4,
        lr_disc: float = 2e-4,
        **kwargs,
    ):
        if (
            kwargs.get("max_epochs_for_schedule") is not None
            or kwargs.get("lr_schedule", "constant") != "constant"
        ):
            raise ConfigError(
                "JointStage has no learning-rate schedule (upstream): leave max_epochs_for_schedule and "
                "lr_schedule unset"
            )
        _check_choice("joint_trainable", joint_trainable, JOINT_TRAINABLE)
        _check_choice("shape_loss", shape_loss, SHAPE_LOSSES)
        super().__init__(lr=lr, **kwargs)
        self.automatic_optimization = False
        self.joint_trainable = joint_trainable
        self.shape_loss_kind = shape_loss
        # the parts this stage updates (the rest is frozen and kept in eval mode by ``train()``)
        gen = ("sos",) if joint_trainable == "sos" else ("snet", "sol", "sos")
        self.generator_parts = gen
        self.shape_parts = ("shape_ae",) if shape_loss == "upstream" else ("shape_ae", "disc")
        self.trainable = (*gen, *self.shape_parts)
        for name in PARTS:
            getattr(self.focusnet, name).requires_grad_(name in self.trainable)
        self.train()
        self.shape_from = shape_from
        hp = self.hparams  # SOSStage's focal_gamma / focal_weight / dice_weight also weight the S-Net loss
        self.loss_fn = FocalDiceLoss(
            self.num_classes,
            initial_class_weights(class_weights, self.num_classes),
            gamma=hp.focal_gamma,
            focal_weight=hp.focal_weight,
            dice_weight=hp.dice_weight,
        )
        self.heatmap_loss = HeatmapMSELoss(heatmap_alpha)

    @property
    def uses_heatmap_targets(self) -> bool:
        return self.joint_trainable == "all" or self.sos_centres == "true_jittered"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.joint_trainable == "all":
            resolve_class_weights(self, self.loss_fn, self.hparams.class_weights, stage)

    def load_init(self) -> None:
        super().load_init()
        if self.shape_from:
            self.load_parts(self.shape_from, ("shape_ae", "disc"), ("ShapeAEStage", "JointStage"))

    def configure_optimizers(self):
        hp = self.hparams
        gen = [p for n in self.generator_parts for p in getattr(self.focusnet, n).parameters()]
        shape = [p for n in self.shape_parts for p in getattr(self.focusnet, n).parameters()]
        # upstream: Adam (L2 weight decay) for both; ours (joint_trainable=all): AdamW for the segmenter
        opt_g = torch.optim.Adam if self.joint_trainable == "sos" else torch.optim.AdamW
        return (
            opt_g(gen, lr=hp.lr, weight_decay=hp.weight_decay),
            torch.optim.Adam(shape, lr=hp.lr_disc, weight_decay=hp.weight_decay),
        )

    def _step(self, opt, loss: torch.Tensor) -> None:
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        image = batch["image"]
        terms: dict[str, torch.Tensor] = {}
        extra = image.new_zeros(())  # S-Net + SOL terms of the generator's loss (joint_trainable=all)
        if self.joint_trainable == "all":
            if "heatmap" not in batch:
                raise ConfigError("JointStage needs heatmap targets: use a data config with heatmap_sigma_mm")
            logits, features, heatmaps = self.focusnet.snet_sol(image)
            seg = self.loss_fn(logits, batch["label"])
            loss_heat = self.heatmap_loss(heatmaps, batch["heatmap"])
            extra = hp.seg_weight * seg["loss"] + hp.heatmap_weight * loss_heat
            terms.update(
                loss_seg=seg["loss"],
                loss_focal=seg["loss_focal"],
                loss_dice=seg["loss_dice"],
                loss_heatmap=loss_heat,
            )
            f, h = (features.detach(), heatmaps.detach()) if hp.detach_sos_inputs else (features, heatmaps)
        else:
            with torch.no_grad():  # frozen (eval mode): no graph through S-Net and SOL
                _, f, h = self.focusnet.snet_sol(image)
        rois = self.sos_outputs(batch, f, h)
        if self.shape_loss_kind == "upstream":
            loss_g = self._upstream_steps(rois, opt_g, opt_d, extra, terms)
        else:
            loss_g = self._code_l2_bce_steps(rois, opt_g, opt_d, extra, terms)
        self._log_terms({k: v.detach() for k, v in terms.items()}, image.shape[0])
        return loss_g.detach()

    def _upstream_steps(self, rois, opt_g, opt_d, extra, terms) -> torch.Tensor:
        """Upstream's order: D step (AE), then G step (generator parts)."""
        ae = self.focusnet.shape_ae
        logits, targets = [r["logits"] for r in rois], [r["target"] for r in rois]
        if rois:
            d = upstream_discriminator_loss(ae, logits, targets)
        else:  # nothing to compare: a zero loss over the AE keeps both steps uniform
            zero = sum(p.sum() for p in ae.parameters()) * 0.0
            d = {"loss": zero, "loss_recon": zero, "loss_push": zero}
        self._step(opt_d, d["loss"])
        sos = self.sos_loss(rois)
        shape = upstream_generator_shape_loss(ae, logits, targets)["loss"] if rois else extra.new_zeros(())
        loss_g = extra + sos["loss"] + shape
        self._step(opt_g, loss_g)
        terms.update(
            loss=loss_g,
            loss_sos=sos["loss"],
            loss_shape=shape,
            loss_disc=d["loss"],
            loss_recon=d["loss_recon"],
            loss_push=d["loss_push"],
        )
        return loss_g

    def _code_l2_bce_steps(self, rois, opt_g, opt_d, extra, terms) -> torch.Tensor:
        """Ours (before issue 13): G step (code distance + BCE real/fake), then D step (head + recon)."""
        hp = self.hparams
        ae, disc = self.focusnet.shape_ae, self.focusnet.disc
        sos = self.sos_loss(rois)
        zero = extra.new_zeros(())
        if rois:
            probs = [torch.sigmoid(r["logits"]) for r in rois]
            loss_shape = torch.stack(
                [shape_loss(ae, p, r["target"], kind=hp.shape_kind) for p, r in zip(probs, rois)]
            ).mean()
            loss_adv = torch.stack(
                [
                    adversarial_losses(None, discriminator_logits(ae, disc, p, frozen=True))["loss_adv"]
                    for p in probs
                ]
            ).mean()
        else:
            probs, loss_shape, loss_adv = [], zero, zero
        loss_g = extra + sos["loss"] + hp.shape_weight * loss_shape + hp.adv_weight * loss_adv
        self._step(opt_g, loss_g)
        if rois:
            loss_disc = torch.stack(
                [
                    adversarial_losses(
                        discriminator_logits(ae, disc, r["target"]),
                        discriminator_logits(ae, disc, p.detach()),
                    )["loss_disc"]
                    for p, r in zip(probs, rois)
                ]
            ).mean()
            loss_recon = torch.stack([reconstruction_loss(ae, r["target"]) for r in rois]).mean()
        else:  # nothing to compare: a zero loss over the shape parameters keeps both steps uniform
            loss_disc = sum(p.sum() for p in [*ae.parameters(), *disc.parameters()]) * 0.0
            loss_recon = zero
        self._step(opt_d, loss_disc + hp.recon_weight * loss_recon)
        terms.update(
            loss=loss_g,
            loss_sos=sos["loss"],
            loss_shape=loss_shape,
            loss_adv=loss_adv,
            loss_disc=loss_disc,
            loss_recon=loss_recon,
        )
        return loss_g


# ==================================================================== helpers
def _check_choice(name: str, value: str, choices: Sequence[str], upstream_first: bool = True) -> None:
    if value not in choices:
        note = " (the first is upstream's)" if upstream_first else ""
        raise ConfigError(f"{name} must be one of {list(choices)}{note}, got {value!r}")


def _flow(value) -> str:
    """``value`` on one line, in YAML flow style (as it would be written in architecture.yaml)."""
    if not isinstance(value, (dict, list)):
        return "(none)" if value is None else str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()


def _gather(rows: list[dict]) -> list[dict]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)  # every rank calls it
        rows = [r for part in gathered for r in part]
    return rows


__all__ = [
    "FocusNetStageBase",
    "SNetStage",
    "SOLStage",
    "SOSStage",
    "ShapeAEStage",
    "JointStage",
    "DEFAULT_SMALL_ORGANS",
    "DEFAULT_ARCHITECTURE",
]
