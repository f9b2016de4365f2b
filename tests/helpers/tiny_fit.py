"""`organseg fit` arguments for a tiny in-process run on the ``hn_small`` phantom cache: a real config stack
(a method's experiment YAML + a data YAML) with one overlay that shrinks it to a few steps on the CPU, no
logger, no validation, no loader workers. Used by the tests that drive `organseg fit` through
``organseg.cli.main.main`` (error reporting, thread settings)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
UNET = ("experiments/baseline/unet.yaml", "data_modules/hn_phantom.yaml")
SNET = ("experiments/focusnetv2/snet.yaml", "data_modules/hn_phantom_focusnet.yaml")
#: a U-Net small enough for one CPU step in a second
TINY_UNET = {"filters": [4, 8, 8], "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]]}
#: a FocusNetV2 architecture small enough for the same
TINY_FOCUSNET = {
    "architecture": {"base_channels": 4, "sol_hidden": 4, "sos_base": 4, "ae_code_channels": 4, "ae_base": 4}
}


#: in ``trainer=``: leave this key out of the overlay (keep the config stack's value, e.g. its W&B logger)
KEEP = "<keep the stack's value>"


def write_tiny_overlay(
    card: str | Path,
    folder: Path,
    *,
    model: dict | None = None,
    trainer: dict | None = None,
    data: dict | None = None,
) -> Path:
    """``folder/tiny.yaml``: a few CPU steps, no logger, no validation, no loader workers, the tiny U-Net;
    ``model``/``trainer``/``data`` update its ``model.init_args``, ``trainer`` and ``data.init_args``
    (a trainer key set to ``KEEP`` is left out)."""
    trainer_cfg = {
        "max_steps": 1,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **(trainer or {}),
    }
    cfg = {
        "trainer": {k: v for k, v in trainer_cfg.items() if v != KEEP},
        "model": {"init_args": dict(TINY_UNET if model is None else model)},
        "data": {
            "init_args": {
                "cards": [str(card)],
                "patch_size": [48, 48, 16],
                "batch_size": 1,
                "patches_per_epoch": 2,
                "num_workers": 0,
                "augmentation": None,
                **(data or {}),
            }
        },
    }
    overlay = folder / "tiny.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    return overlay


def tiny_fit_args(
    card: str | Path,
    folder: Path,
    stack: tuple[str, str] = UNET,
    *,
    model: dict | None = None,
    trainer: dict | None = None,
    data: dict | None = None,
) -> list[str]:
    """``["fit", "-c", <stack>..., "-c", <overlay>]`` with ``write_tiny_overlay``'s overlay."""
    overlay = write_tiny_overlay(card, folder, model=model, trainer=trainer, data=data)
    return ["fit", *(arg for config in [*(REPO / c for c in stack), overlay] for arg in ("-c", str(config)))]
