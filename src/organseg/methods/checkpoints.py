"""Reading organseg checkpoints: the raw dict (one-line errors for a missing or foreign file) and the
LightningModule that wrote it (its class is recorded in the checkpoint), for evaluate, predict, stage
chaining and the multi-model baseline alike."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch

from organseg.errors import CheckpointError, ConfigError
from organseg.io.card import DatasetCard

CHECKPOINT_KEY = "organseg"


def read_checkpoint(path) -> dict:
    """A Lightning checkpoint written by an organseg module, as a dict; any problem (missing, unreadable,
    not a Lightning checkpoint, written by another tool) is a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path}: not a Lightning checkpoint (no state_dict)")
    if CHECKPOINT_KEY not in ckpt:
        raise CheckpointError(
            f"checkpoint {path}: not an organseg checkpoint (no '{CHECKPOINT_KEY}' entry; "
            f"written by another tool?)"
        )
    return ckpt


def load_module(ckpt: str | Path, device: str = "cpu"):
    """The LightningModule a checkpoint was written by (its class is recorded in the checkpoint)."""
    path = Path(ckpt)
    raw = read_checkpoint(path)  # one-line CheckpointError for a missing/foreign file (printed by the CLI)
    module_path, _, cls_name = raw[CHECKPOINT_KEY]["module"].rpartition(".")
    cls = getattr(importlib.import_module(module_path), cls_name)
    model = cls.load_from_checkpoint(path, map_location=device, weights_only=False)
    return model.eval().to(device), raw[CHECKPOINT_KEY]


def check_device(device: str) -> torch.device:
    """``--device`` as a torch device, with one-line errors for a malformed name or a missing CUDA."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a torch device (e.g. cpu, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


def load_segmenter(ckpt: str | Path, device: str = "cpu", data: str | Path | None = None):
    """``(model, card, extra)``: a checkpoint's LightningModule ready to segment whole cases
    (``predict_case``), and the dataset card whose preprocessing and classes it expects: ``data`` if given,
    else the first card stored in the checkpoint. One-line errors for a wrong device, a module that cannot
    be loaded or cannot segment, a checkpoint without a card, and classes that differ from the card's."""
    check_device(device)
    try:
        model, extra = load_module(ckpt, device)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt}: its LightningModule cannot be loaded ({type(exc).__name__}: {exc})"
        ) from None
    if not callable(getattr(model, "predict_case", None)):
        raise CheckpointError(
            f"checkpoint {ckpt}: a {type(model).__name__} checkpoint cannot segment a "
            f"case (no predict_case); use a segmentation checkpoint"
        )
    cards = extra.get("cards") or []
    if data:
        card = DatasetCard.load(data)
    elif cards:
        card = DatasetCard.from_dict(
            {k: v for k, v in cards[0].items() if k != "source"}, source=cards[0].get("source", "")
        )
        first = (cards[0].get("target_spacing"), cards[0].get("hu_window"))
        if any((c.get("target_spacing"), c.get("hu_window")) != first for c in cards[1:]):
            warnings.warn(
                f"the checkpoint's {len(cards)} dataset cards preprocess differently; using "
                f"{card.name}'s target spacing and HU window (choose with --data)",
                stacklevel=2,
            )
    else:
        raise CheckpointError(f"checkpoint {ckpt}: carries no dataset card; pass --data <card.yaml>")
    if list(card.classes) != list(model.classes):
        raise CheckpointError(
            f"{card.source or card.name}: classes differ from the checkpoint's ({len(model.classes)} classes)"
        )
    return model, card, extra
