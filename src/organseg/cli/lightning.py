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
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy

from organseg.errors import UsageError
from organseg.methods.base import SegmentationModuleBase
from organseg.runs import configure_wandb_mode, run_dir
from organseg.runtime import slurm
from organseg.runtime.callbacks import ValidationImages


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

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(
            ValidationImages, "val_images"
        )  # W&B contour images; n_slices: 0 = off
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/dice_mean",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-dice{val/dice_mean:.3f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        for name in ("num_classes", "classes", "patch_size"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        # FocusNetV2 stages also take the small organs (SOL/SOS order) and the voxel size (ROIs in mm);
        # in subclass mode a link only applies to models that have the parameter
        parser.link_arguments("data.small_organs", "model.init_args.small_organs", apply_on="instantiate")
        parser.link_arguments("data.target_spacing", "model.init_args.spacing", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # With --ckpt_path Lightning re-reads the checkpoint's hyper_parameters as model arguments; they
        # hold every applied link, also those the model class lacks (small_organs/spacing are FocusNetV2's),
        # which would then be unexpected keyword arguments: drop those.
        super()._parse_ckpt_path()

        sub = self.config.get("subcommand")
        model = self.config[sub].get("model") if sub else None
        extra = model.get("dict_kwargs") if model is not None else None
        if extra and model.get("class_path"):
            module, _, name = model.class_path.rpartition(".")
            params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
            for key in [k for k in extra if k not in params]:
                del extra[key]

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
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":  # SLURM: a run id and root folder that survive a requeue
            slurm.apply_job_defaults(self.config["fit"])

    def before_fit(self) -> None:
        # a requeued SLURM job continues from its HPC checkpoint or last.ckpt
        cfg = self.config_init["fit"]
        cfg["ckpt_path"] = slurm.fit_ckpt_path(self.trainer, cfg.get("ckpt_path"), run_dir(self.trainer))


def run_lightning_cli(argv: list[str]) -> OrgansegCLI:
    configure_wandb_mode()
    # our IterableDatasets split batches per worker themselves (organseg.data.datasets), so
    # Lightning's generic warning about __len__ with several workers does not apply
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
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
