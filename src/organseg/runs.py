"""Where a run's files live, and W&B's online/offline choice."""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb_mode() -> None:
    """Offline unless the user has W&B credentials (or set WANDB_MODE themselves)."""
    if "WANDB_MODE" not in os.environ and not wandb_credentials_present():
        os.environ["WANDB_MODE"] = "offline"


def run_checkpoint(run_folder: str | os.PathLike, which: str = "best") -> Path | None:
    """A finished run's checkpoint: ``best`` = the newest ``epoch*.ckpt`` (the ones ModelCheckpoint keeps
    by the validation monitor), else ``last.ckpt``; ``last`` = ``last.ckpt``; None when there is none."""
    folder = Path(run_folder) / "checkpoints"
    if which == "best":
        best = sorted(folder.glob("epoch*.ckpt"), key=lambda p: p.stat().st_mtime)
        if best:
            return best[-1]
    last = folder / "last.ckpt"
    return last if last.is_file() else None


def run_dir(trainer) -> Path:
    """The run's own folder, the one ModelCheckpoint writes ``checkpoints/`` into:
    ``<save_dir>/<logger name>/<version>`` (W&B: ``lightning_logs/<project>/<run id>``)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return Path(trainer.default_root_dir)
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version
