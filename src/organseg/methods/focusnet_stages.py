"""FocusNetV2 training (Gao et al., MedIA 2021): one LightningModule per training stage of the paper.

Every stage holds ``self.focusnet = FocusNetV2(...)`` (same parameter names in every checkpoint), so a
stage loads the previous stage's container with ``init_from`` and trains its own part:

1. ``SNetStage``      trains ``focusnet.snet`` (weighted focal + Dice, as UNetBaseline);
2. ``SOLStage``       S-Net frozen; trains ``focusnet.sol`` (heatmap MSE against ``batch["heatmap"]``);
3. ``SOSStage``       S-Net + SOL frozen; trains ``focusnet.sos`` on ROIs around the TRUE centres
                      (+ random jitter) with binary focal + Dice; validates locate-zoom-paste;
4. ``ShapeAEStage``   pre-trains ``focusnet.shape_ae`` on true small-organ ROI masks (reconstruction);
5. ``JointStage``     fine-tunes S-Net + SOL + SOS with their losses + shape/adversarial terms, and
                      the AE + discriminator adversarially (manual optimisation, two optimisers).

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
- **Shape AE**: one AE shared by all small organs (upstream), each organ at its own ROI size (the AE
  is fully convolutional), the same sizes the joint stage feeds it.
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
from organseg.inference.locate_zoom_paste import check_small_organs_from, predict_focusnet
from organseg.losses import FocalDiceLoss
from organseg.losses.heatmap import HeatmapMSELoss
from organseg.losses.shape import adversarial_losses, discriminator_logits, reconstruction_loss, shape_loss
from organseg.methods.base import SegmentationModuleBase, log_loss_terms
from organseg.methods.checkpoints import CHECKPOINT_KEY, read_checkpoint
from organseg.methods.unet_baseline import adamw_poly, initial_class_weights, resolve_class_weights
from organseg.networks.focusnetv2 import FocusNetArchitecture
from organseg.spatial.heatmaps import decode_centres
from organseg.spatial.roi import crop_rois

# the H&N card's small organs (data_modules/cards/hn_phantom.yaml), the default when none are given
DEFAULT_SMALL_ORGANS = ["lens_l", "lens_r", "optic_nerve_l", "optic_nerve_r", "chiasm", "pituitary"]
PARTS = ("snet", "sol", "sos", "shape_ae", "disc")
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
            locate: SOL, SOS, joint).
        lr / weight_decay / max_epochs_for_schedule: AdamW + poly decay of the trained part.
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
        loc_threshold: float = 0.3,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        max_epochs_for_schedule: int | None = None,
        **kwargs,
    ):
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
        if theirs is None or theirs == mine:
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
        return adamw_poly(
            self,
            self.trainable_parameters(),
            self.hparams.lr,
            self.hparams.weight_decay,
            self.hparams.max_epochs_for_schedule,
        )

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
    """Stage 1: S-Net with weighted focal + Dice (UNetBaseline's loss and class-weight modes).

    Args (besides ``FocusNetStageBase``'s): class_weights, focal_gamma, focal_weight, dice_weight as
    in ``UNetBaseline`` (upstream: FL + 0.2 DL). ``init_from`` is optional: an ``SNetStage``
    checkpoint to continue from.
    """

    trainable = ("snet",)
    init_parts = ("snet",)
    init_kinds = ("SNetStage",)
    log_localisation = False

    def __init__(
        self,
        *,
        class_weights: str | list[float] = "inverse_sqrt_frequency",
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        lr: float = 2e-3,
        **kwargs,
    ):
        super().__init__(lr=lr, **kwargs)
        self.loss_fn = FocalDiceLoss(
            self.num_classes,
            initial_class_weights(class_weights, self.num_classes),
            gamma=focal_gamma,
            focal_weight=focal_weight,
            dice_weight=dice_weight,
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        resolve_class_weights(self, self.loss_fn, self.hparams.class_weights, stage)

    def predict_case(self, image: torch.Tensor, progress: bool = False) -> torch.Tensor:
        return SegmentationModuleBase.predict_case(self, image, progress)  # S-Net only

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
        self, *, heatmap_alpha: float = 0.0, lr: float = 4e-4, hd95_every_n_epochs: int = 0, **kwargs
    ):
        super().__init__(lr=lr, hd95_every_n_epochs=hd95_every_n_epochs, **kwargs)
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
    """Stage 3: one binary SOS-Net per small organ on ROIs of concat(S-Net features, SOL heatmap, CT)
    around the TRUE centres plus uniform integer jitter (``jitter_voxels`` per axis), so it tolerates
    SOL's localisation error; binary focal (``focal_gamma``) + Dice, averaged over organs present.

    Args: ``init_from`` a ``SOLStage`` checkpoint (required); ``small_organs_from`` ``"sos"`` (small
    organs only from the SOS-Nets, upstream) or ``"snet_and_sos"`` (S-Net's small-organ labels kept
    outside the ROIs), see ``organseg.inference.locate_zoom_paste``.
    """

    trainable = ("sos",)
    init_parts = ("snet", "sol")
    init_kinds = ("SOLStage", "SOSStage")

    def __init__(
        self,
        *,
        jitter_voxels: list[int] = (3, 3, 1),
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        small_organs_from: str = "sos",
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        hd95_every_n_epochs: int = 0,
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, hd95_every_n_epochs=hd95_every_n_epochs, **kwargs)
        self.small_organs_from = check_small_organs_from(small_organs_from)
        self.jitter_voxels = [int(j) for j in jitter_voxels]
        self.sos_focal = FocalLoss(gamma=focal_gamma)  # sigmoid, binary
        self.sos_dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def sos_outputs(
        self, batch: dict, features: torch.Tensor, heatmaps: torch.Tensor, jitter: Sequence[int]
    ) -> list[dict]:
        """``gt_rois`` plus each organ's SOS ``logits`` [N,1,*roi_k] at the same boxes."""
        rois = self.gt_rois(batch, jitter)
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
        terms = self.sos_loss(self.sos_outputs(batch, features, heatmaps, self.jitter_voxels))
        self._log_terms(terms, batch["image"].shape[0])
        return terms["loss"]

    @torch.no_grad()
    def predict_case(self, image: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Locate-zoom-paste over whole cases with the bounded-memory pipeline
        (``organseg.inference.locate_zoom_paste.predict_focusnet``): S-Net labels, SOL centres, SOS masks
        pasted."""
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
                small_organs_from=self.small_organs_from,
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
    """Stage 5: fine-tune S-Net + SOL + SOS with their losses plus the shape constraint, and the
    shape AE + discriminator adversarially (manual optimisation).

    Per step: (G) ``seg_weight * FocalDice(S-Net) + heatmap_weight * MSE(SOL) + SOS focal+Dice +
    shape_weight * shape_loss(AE codes of sigmoid(SOS) vs true masks) + adv_weight * loss_adv``, AE and
    discriminator called frozen (no parameter gradient); (D) ``loss_disc`` (true ROI masks vs detached
    SOS probabilities) ``+ recon_weight * reconstruction`` of the true masks, on AE + discriminator.
    SOS inputs are detached from S-Net/SOL (``detach_sos_inputs``, upstream), so each part learns
    from its own loss; False lets the SOS/shape terms reach S-Net features too.

    Args: ``init_from`` a ``SOSStage`` checkpoint, ``shape_from`` a ``ShapeAEStage`` checkpoint
    (both required for a real run). lr (segmenter, AdamW) / lr_disc (Adam), no schedule (upstream:
    ``max_epochs_for_schedule`` must stay unset). ``SOSStage``'s arguments (``jitter_voxels``,
    ``focal_gamma``/``focal_weight``/``dice_weight``, also of the S-Net loss here, ``small_organs_from``)
    and class_weights as in ``SNetStage``.
    """

    trainable = PARTS
    init_parts = ("snet", "sol", "sos")
    init_kinds = ("SOSStage", "JointStage")

    def __init__(
        self,
        *,
        shape_from: str | None = None,
        class_weights: str | list[float] = "inverse_sqrt_frequency",
        seg_weight: float = 1.0,
        heatmap_weight: float = 2.0,
        heatmap_alpha: float = 0.0,
        shape_weight: float = 1.0,
        shape_kind: str = "code_l2",
        adv_weight: float = 0.01,
        recon_weight: float = 1.0,
        detach_sos_inputs: bool = True,
        lr: float = 1e-4,
        lr_disc: float = 2e-4,
        **kwargs,
    ):
        if kwargs.get("max_epochs_for_schedule") is not None:
            raise ConfigError(
                "JointStage has no learning-rate schedule (upstream): leave max_epochs_for_schedule unset"
            )
        super().__init__(lr=lr, **kwargs)
        self.automatic_optimization = False
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

    def setup(self, stage: str) -> None:
        super().setup(stage)
        resolve_class_weights(self, self.loss_fn, self.hparams.class_weights, stage)

    def load_init(self) -> None:
        super().load_init()
        if self.shape_from:
            self.load_parts(self.shape_from, ("shape_ae", "disc"), ("ShapeAEStage", "JointStage"))

    def configure_optimizers(self):
        hp = self.hparams
        seg = [p for n in ("snet", "sol", "sos") for p in getattr(self.focusnet, n).parameters()]
        shape = [*self.focusnet.shape_ae.parameters(), *self.focusnet.disc.parameters()]
        return (
            torch.optim.AdamW(seg, lr=hp.lr, weight_decay=hp.weight_decay),
            torch.optim.Adam(shape, lr=hp.lr_disc, weight_decay=hp.weight_decay),
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        image = batch["image"]
        if "heatmap" not in batch:
            raise ConfigError("JointStage needs heatmap targets: use a data config with heatmap_sigma_mm")
        logits, features, heatmaps = self.focusnet.snet_sol(image)
        seg = self.loss_fn(logits, batch["label"])
        loss_heat = self.heatmap_loss(heatmaps, batch["heatmap"])
        f, h = (features.detach(), heatmaps.detach()) if hp.detach_sos_inputs else (features, heatmaps)
        rois = self.sos_outputs(batch, f, h, self.jitter_voxels)
        sos = self.sos_loss(rois)
        ae, disc = self.focusnet.shape_ae, self.focusnet.disc
        zero = image.new_zeros(())
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
        loss_g = (
            hp.seg_weight * seg["loss"]
            + hp.heatmap_weight * loss_heat
            + sos["loss"]
            + hp.shape_weight * loss_shape
            + hp.adv_weight * loss_adv
        )
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

        # discriminator step: AE + head on true masks vs detached SOS probabilities
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
        loss_d = loss_disc + hp.recon_weight * loss_recon
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

        self._log_terms(
            {
                "loss": loss_g.detach(),
                "loss_seg": seg["loss"].detach(),
                "loss_focal": seg["loss_focal"].detach(),
                "loss_dice": seg["loss_dice"].detach(),
                "loss_heatmap": loss_heat.detach(),
                "loss_sos": sos["loss"].detach(),
                "loss_shape": loss_shape.detach(),
                "loss_adv": loss_adv.detach(),
                "loss_disc": loss_disc.detach(),
                "loss_recon": loss_recon.detach(),
            },
            image.shape[0],
        )
        return loss_g.detach()


# ==================================================================== helpers
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
