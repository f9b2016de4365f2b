"""The ``organseg`` command.

``fit | validate | test`` are Lightning's LightningCLI (see ``organseg.lightning_cli``);
the data, evaluation and inference tools (``phantom``, ``preprocess``, ``evaluate``, ``predict``) are
plain argparse subcommands registered by their own modules. ``predict`` is a tool, not LightningCLI's
``predict``: it reads raw NIfTI/NRRD/MHA/DICOM (not a cache), needs only ``--ckpt``, and writes label
maps in each input's original geometry (+ DICOM RTSTRUCT), which a Trainer predict loop does not do.
"""
from __future__ import annotations

import argparse
import os
import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

# module path -> one-line help; each module defines ``register(subparsers)``
TOOL_SUBCOMMANDS = {
    "phantom": "organseg.phantom.command",
    "preprocess": "organseg.cache.command",
    "evaluate": "organseg.evaluation.command",
    "predict": "organseg.inference.predict_command",
    "pseudolabel": "organseg.data.pseudo_labels",
    "sweep": "organseg.sweep",
}


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def _tool_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="organseg",
        description="Organ-at-risk segmentation experiments (FocusNetV2, co-training WAM) on Lightning.",
        epilog="Lightning subcommands: organseg {fit,validate,test} -c experiments/... -c data_modules/... "
               "(see `organseg fit --help`).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,phantom,preprocess,evaluate,predict,pseudolabel,sweep}")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"Lightning {name} (LightningCLI; run `organseg {name} --help`)", add_help=False)
    for name, module in TOOL_SUBCOMMANDS.items():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from organseg.lightning_cli import run_lightning_cli

        from organseg.lightning_cli import user_error_in

        try:
            run_lightning_cli(argv)
        except UserError as exc:
            print(f"organseg {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            # a bad card, path, checkpoint or option value met while building or running: one line, exit 2
            # (ORGANSEG_DEBUG=1 shows the traceback); anything else is a bug and keeps its traceback
            cause = user_error_in(exc)
            if cause is None or os.environ.get("ORGANSEG_DEBUG"):
                raise
            print(f"organseg {argv[0]}: error: {cause}", file=sys.stderr)
            return 2
        return 0
    parser = _tool_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, OSError) as exc:
        # one line, naming the file and the problem (the raising code puts both in the message)
        print(f"organseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
