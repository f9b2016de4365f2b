"""``organseg fit|validate|test``: Lightning's LightningCLI, configured for this project.

- model and data in subclass mode (``class_path``/``init_args``), configs composed with repeated
  ``-c experiments/... -c data_modules/...`` (later files win), OmegaConf interpolation on;
- the label space (``num_classes``, ``classes``) and the patch size flow from the DataModule to
  the model (links, not copies that can disagree);
- W&B logger by default (offline without credentials, files under ``lightning_logs/``), a
  best-Dice + last checkpoint, and the resolved config saved in each run's own folder.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import yaml
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from organseg.data.datamodule import CTDataModule, check_arguments
from organseg.errors import CheckpointError, ConfigError, UsageError
from organseg.methods.base import SegmentationModuleBase
from organseg.methods.checkpoints import CHECKPOINT_KEY, read_checkpoint
from organseg.runs import configure_wandb_mode, run_dir
from organseg.runtime import slurm
from organseg.runtime.callbacks import RemoveFailedRun, ValidationImages
from organseg.runtime.threads import Threads


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config into the run's own folder (never a shared ``./config.yaml``
    that the next run would clash with), puts it into the checkpoint and the W&B run config."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        if hasattr(pl_module, "run_config"):
            pl_module.run_config = text
        if not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        stage = getattr(stage, "value", stage)
        (folder / f"config_{stage}.yaml").write_text(text)  # one per stage; a requeued job overwrites its own
        logger = trainer.logger
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update({"cli": yaml.safe_load(text)}, allow_val_change=True)


def condense_parser_error(message: str) -> str:
    """jsonargparse's multi-line error (a Union of subtypes, each with its own complaint) as one line:
    the key, then what is wrong, without the lines about the ``None`` alternative."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return message
    skip = ("Does not validate against any", "Subtypes:", "Errors:", "Given value type:")
    details = [ln.lstrip("- ") for ln in lines[1:] if not ln.startswith(skip) and "NoneType" not in ln]
    given = [ln for ln in details if ln.startswith("Given value:")]
    details = [ln for ln in details if not ln.startswith("Given value:")]
    text = " ".join([lines[0].rstrip(":") + (":" if details else "")] + [d for d in details])
    if given and len(given[0]) < 120 and "NestedArg(" not in given[0]:
        text += f" ({given[0][0].lower()}{given[0][1:]})"
    return text


# Lightning's own names for a checkpoint it finds itself (``trainer.fit(ckpt_path="last")`` etc.)
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc")


def check_ckpt_path(ckpt_path) -> dict | None:
    """``--ckpt_path``: a readable organseg checkpoint, returned (``read_checkpoint``'s one-line
    CheckpointError naming the file otherwise), or one of Lightning's own names (``last``, ``best``,
    ``hpc``, ``registry:...``), which Lightning resolves itself (None)."""
    name = str(ckpt_path)
    if ckpt_path is None or name in LIGHTNING_CKPT_NAMES or name.split(":", 1)[0].lower() == "registry":
        return None
    try:
        return read_checkpoint(ckpt_path)
    except CheckpointError as exc:
        raise CheckpointError(f"ckpt_path: {exc}") from None


def checkpoint_class_path(ckpt: dict) -> str | None:
    """The LightningModule class a checkpoint's module is rebuilt as: LightningCLI replaces the config's
    ``model.class_path`` with the ``_class_path`` among the checkpoint's hyper-parameters (written when
    the CLI built the module); a module built in Python has only organseg's own record of its class."""
    hparams = ckpt.get("hyper_parameters") or {}
    recorded = hparams.get("_class_path") or (ckpt.get(CHECKPOINT_KEY) or {}).get("module")
    return str(recorded) if recorded else None


def check_model_class(config, ckpt: dict, ckpt_path) -> str | None:
    """With ``--ckpt_path``, the class the run will use: the checkpoint's (LightningCLI takes it from
    there, whatever the config says). A config whose ``model.class_path`` names another class is a
    one-line CheckpointError naming both: an S-Net checkpoint given with the U-Net config would otherwise
    run as SNetStage without a word. Returns the checkpoint's class path (None when it records none)."""
    theirs = checkpoint_class_path(ckpt)
    ours = (config.get("model") or {}).get("class_path")
    if theirs is None or not ours:
        return theirs
    same = ours == theirs
    if not same:
        ours_cls, theirs_cls = _class_of({"class_path": ours}), _class_of({"class_path": theirs})
        same = ours_cls is not None and ours_cls is theirs_cls
    if not same:
        raise CheckpointError(
            f"ckpt_path: checkpoint {ckpt_path} holds a {theirs.rpartition('.')[2]} ({theirs}), but "
            f"model.class_path is {ours}; give the config of the model that wrote the checkpoint"
        )
    return theirs


def drop_unknown_ckpt_hparams(config) -> None:
    """With --ckpt_path Lightning re-reads the checkpoint's hyper_parameters as model arguments; they
    hold every applied link, also those the model class lacks (small_organs/spacing are FocusNetV2's),
    which would then be unexpected keyword arguments: drop those."""
    model = config.get("model")
    extra = model.get("dict_kwargs") if model is not None else None
    if extra and model.get("class_path"):
        module, _, name = model.class_path.rpartition(".")
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        for key in [k for k in extra if k not in params]:
            del extra[key]


def check_config(subcommand: str, config) -> None:
    """The paths and sizes of a parsed ``fit|validate|test`` config, before anything is instantiated, built
    or read, each problem one line naming its config key: the CTDataModule arguments
    (``data/datamodule.py check_arguments``; pseudo-label files for ``fit`` only, the only one reading
    them), the checkpoints a model loads (``model.init_args.checkpoints``, at construction) and, for
    ``fit``, those a FocusNetV2 stage loads at fit start (``init_from``, ``shape_from``)."""
    data = config.get("data")
    data_class = _class_of(data)
    if data_class is not None and issubclass(data_class, CTDataModule) and data.get("init_args") is not None:
        check_arguments(data.init_args.as_dict(), where="data.init_args.", training=subcommand == "fit")
    args = (config.get("model") or {}).get("init_args") or {}
    keys = ["init_from", "shape_from"] if subcommand == "fit" else []
    paths = [(k, args.get(k)) for k in keys] + [("checkpoints", p) for p in args.get("checkpoints") or ()]
    for key, path in paths:
        if path is not None and not Path(path).is_file():
            raise CheckpointError(f"model.init_args.{key}: checkpoint {path}: file not found")


def _class_of(node):
    """The class a ``class_path`` config node names, or None (no node, or not importable: left to
    jsonargparse, which reports it)."""
    path = node.get("class_path") if node is not None else None
    module, _, name = str(path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def check_patch_divisor(model, datamodule) -> None:
    """The patch size (the data's, linked to the model) is a multiple of what the model's network
    needs (``patch_divisor``: its total downsampling), or a one-line ConfigError suggesting one."""
    divisor = getattr(model, "patch_divisor", None)
    size = getattr(model, "patch_size", None)
    if not divisor or size is None or not any(p % d for p, d in zip(size, divisor)):
        return
    key = "data.init_args.patch_size" if hasattr(datamodule, "patch_size") else "model.init_args.patch_size"
    nearest = [max(d, round(p / d) * d) for p, d in zip(size, divisor)]
    raise ConfigError(
        f"{key}: {list(size)} must be a multiple of {list(divisor)} per axis for {type(model).__name__} "
        f"(its network downsamples that much), e.g. {nearest}"
    )


def frozen_eval_modules_only(model) -> bool:
    """True when every module of ``model`` in eval mode sits in a frozen part: the outermost eval-mode
    module above it has parameters and none of them trains (FocusNetV2's frozen parts, CoWAM's averaged
    models). A module in eval mode inside a part that trains (a stray ``.eval()``) makes it False."""
    names = [name for name, module in model.named_modules() if not module.training]
    roots = [n for n in names if not any(n.startswith(f"{r}.") for r in names if r != n and r)]
    for name in roots:
        params = list(model.get_submodule(name).parameters())
        if not params or any(p.requires_grad for p in params):
            return False
    return True


class OrgansegCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # A config typo or unparsable value is a one-line error (exit 2), not usage + a nested report.
        def raise_instead_of_exit(p) -> None:
            p.exit_on_error = False
            sub = getattr(p, "_subcommands_action", None)
            for child in sub.choices.values() if sub is not None else ():
                raise_instead_of_exit(child)

        raise_instead_of_exit(parser)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            command = args[0] if args else "fit"
            raise UsageError(f"{condense_parser_error(str(exc))} (see `organseg {command} --help`)") from None
        # Every path and size, right here: before anything is seeded, built or read (LightningCLI
        # torch.loads an existing ckpt_path next, a traceback for a foreign file; a missing one would only
        # fail once the caches are built and the loaders started)
        sub = self.config.get("subcommand")
        if sub:
            ckpt_path = self.config[sub].get("ckpt_path")
            ckpt = check_ckpt_path(ckpt_path)
            if ckpt is not None:
                used = check_model_class(self.config[sub], ckpt, ckpt_path)
                if used and rank_zero_only.rank == 0:  # say which class runs: the checkpoint's
                    print(f"organseg: model {used} (the class recorded in {ckpt_path})", flush=True)
            check_config(sub, self.config[sub])

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(
            ValidationImages, "val_images"
        )  # W&B contour images; n_slices: 0 = off
        parser.add_lightning_class_args(Threads, "threads")  # trainer/loader-worker thread counts
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/dice_mean",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-dice{val/dice_mean:.3f}",
                "checkpoint.auto_insert_metric_name": False,
                # save when validation ends (the monitor is a validation metric), never at a training
                # epoch's end: a run that stops before its first validation then keeps last.ckpt
                # without Lightning warning that the monitored key is missing
                "checkpoint.save_on_train_epoch_end": False,
            }
        )
        for name in ("num_classes", "classes", "patch_size"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        # FocusNetV2 stages also take the small organs (SOL/SOS order) and the voxel size (ROIs in mm);
        # in subclass mode a link only applies to models that have the parameter
        parser.link_arguments("data.small_organs", "model.init_args.small_organs", apply_on="instantiate")
        parser.link_arguments("data.target_spacing", "model.init_args.spacing", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # Whole-case validation gives ranks different numbers of steps (each case once, DDP-wide).
        # Lightning routes validation_step through DDP's forward, which broadcasts buffers (a
        # collective) when the model has any: ranks with fewer cases would then hang. With plain
        # `ddp`, buffers are therefore not broadcast (InstanceNorm nets have no running stats; use
        # SyncBatchNorm for BatchNorm). A strategy given as a class_path is used exactly as written.
        if config.get("strategy") == "ddp":
            config = {**config, "strategy": DDPStrategy(broadcast_buffers=False)}
        config, callbacks = slurm.trainer_setup(
            config, callbacks
        )  # SLURM: checkpoint + requeue on pre-emption
        # a run that fails before its first step removes its run folder (and offline W&B run)
        return super()._instantiate_trainer(config, [*callbacks, RemoveFailedRun()])

    def _arm_failed_run_cleanup(self, fitting: bool) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, RemoveFailedRun):
                callback.arm(self.trainer, fitting)

    def before_validate(self) -> None:
        self._arm_failed_run_cleanup(fitting=False)

    def before_test(self) -> None:
        self._arm_failed_run_cleanup(fitting=False)

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        drop_unknown_ckpt_hparams(config)
        if self.subcommand == "fit":  # SLURM: a run id and root folder that survive a requeue
            slurm.apply_job_defaults(config)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # model and data are built (cheap, nothing read yet): check they fit before the Trainer starts up
        check_patch_divisor(self.model, self.datamodule)
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand == "fit" and frozen_eval_modules_only(self.model):
            # Lightning warns about any module in eval mode when training starts. Here they are all
            # frozen on purpose (FocusNetV2's parts the stage does not train, CoWAM's weight-averaged
            # models; see their train()), so the warning would only alarm; a module in eval mode with
            # trainable parameters still gets it (frozen_eval_modules_only is False then).
            warnings.filterwarnings(
                "ignore",
                message=r"Found \d+ module\(s\) in eval mode at the start of training",
                category=PossibleUserWarning,
                module=r"lightning\.pytorch\.loops\.fit_loop",
            )

    def before_fit(self) -> None:
        self._arm_failed_run_cleanup(fitting=True)
        # a requeued SLURM job continues from its HPC checkpoint or last.ckpt
        cfg = self.config_init["fit"]
        cfg["ckpt_path"] = slurm.fit_ckpt_path(self.trainer, cfg.get("ckpt_path"), run_dir(self.trainer))


def quiet_intended_warnings() -> None:
    """Warnings every fit would print although nothing is wrong, each filtered by its message and the
    module that raises it (the eval-mode one is decided per model: ``after_instantiate_classes``)."""
    # our IterableDatasets split batches per worker themselves (organseg.data.datasets), so
    # Lightning's generic warning about __len__ with several workers does not apply
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
    # Lightning's own pytree helper (2.6.x) still constructs torch's deprecated LeafSpec
    # (Lightning-AI/pytorch-lightning#21326): nothing of ours uses it, and nothing changes for us
    # when Lightning moves to torch's replacement
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    if "SLURM_JOB_ID" not in os.environ:
        # Lightning suggests `srun` wherever the command exists, also outside any SLURM job (a login node,
        # a workstation with the SLURM client): nothing to launch with srun there. Inside an allocation
        # the hint stays, since a multi-task job started without srun hangs.
        warnings.filterwarnings(
            "ignore",
            message=r"The `srun` command is available on your system but is not used",
            category=PossibleUserWarning,
            module=r"lightning\.fabric\.plugins\.environments\.slurm",
        )


class _DropLitLoggerTip(logging.Filter):
    """Lightning (2.6) logs an advertisement for its hosted LitLogger at the start of every fit that
    does not use it; organseg logs to W&B (offline by default) on purpose, so the line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning_tips() -> None:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
        logger.addFilter(_DropLitLoggerTip())


def run_lightning_cli(argv: list[str]) -> OrgansegCLI:
    quiet_lightning_tips()
    with warnings.catch_warnings():  # the filters below last for this run only (main() may run several)
        quiet_intended_warnings()
        return _run_lightning_cli(argv)


def _run_lightning_cli(argv: list[str]) -> OrgansegCLI:
    configure_wandb_mode()
    Path("lightning_logs").mkdir(exist_ok=True)
    trainer_defaults = {
        "default_root_dir": "lightning_logs",
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            # resume="allow": the CLI would otherwise pass resume=None over WandbLogger's own "allow"
            "init_args": {"save_dir": "lightning_logs", "project": "organseg", "resume": "allow"},
        },
        "log_every_n_steps": 10,
    }
    return OrgansegCLI(
        SegmentationModuleBase,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if argv == sys.argv[1:] else argv,
        trainer_defaults=trainer_defaults,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        parser_kwargs={"parser_mode": "omegaconf"},
        seed_everything_default=0,
        auto_configure_optimizers=False,
    )
