"""The ``organseg`` command.

``fit | validate | test`` are Lightning's LightningCLI (see ``organseg.cli.lightning``);
the data, evaluation and inference tools (``phantom``, ``preprocess``, ``evaluate``, ``predict``) are
plain argparse subcommands registered by their own modules. ``predict`` is a tool, not LightningCLI's
``predict``: it reads raw NIfTI/NRRD/MHA/DICOM (not a cache), needs only ``--ckpt``, and writes label
maps in each input's original geometry (+ DICOM RTSTRUCT), which a Trainer predict loop does not do.

Errors: an :class:`organseg.errors.OrgansegError` (the user's to fix) is printed as one line,
``organseg <command>: error: <message>``, exit status 2; every other exception is a bug and keeps its
traceback. ``ORGANSEG_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from organseg.errors import OrgansegError
from organseg.runtime.openmp import prefer_passive_waits

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

# module path -> one-line help; each module defines ``register(subparsers)``
TOOL_SUBCOMMANDS = {
    "phantom": "organseg.cli.phantom",
    "preprocess": "organseg.cli.preprocess",
    "evaluate": "organseg.cli.evaluate",
    "predict": "organseg.cli.predict",
    "pseudolabel": "organseg.cli.pseudolabel",
    "sweep": "organseg.cli.sweep",
    "bench": "organseg.cli.bench",
}


def _tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="organseg",
        description="Organ-at-risk segmentation experiments (FocusNetV2, co-training WAM) on Lightning.",
        epilog="Lightning subcommands: organseg {fit,validate,test} -c experiments/... -c data_modules/... "
        "(see `organseg fit --help`).",
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="{fit,validate,test,phantom,preprocess,evaluate,predict,pseudolabel,sweep,bench}",
    )
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(
            name, help=f"Lightning {name} (LightningCLI; run `organseg {name} --help`)", add_help=False
        )
    for module in TOOL_SUBCOMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def user_error(exc: BaseException) -> OrgansegError | None:
    """The :class:`OrgansegError` behind ``exc``: ``exc`` itself or one along its chain of causes and
    contexts (jsonargparse wraps an error raised while it instantiates the model or data in its own
    ValueError/TypeError); None when there is none, i.e. ``exc`` is a bug."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OrgansegError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _report(command: str, exc: Exception) -> bool:
    """Print a user error (bad card, path, checkpoint, option value, ...) as one line on stderr and return
    True; False for anything else, or for any error under ORGANSEG_DEBUG=1: the caller re-raises it, so a
    bug keeps its traceback."""
    cause = user_error(exc)
    if cause is None or os.environ.get("ORGANSEG_DEBUG"):
        return False
    message = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    print(f"organseg {command}: error: {message}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prefer_passive_waits()  # before anything loads torch's OpenMP (runtime/openmp.py)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        # lazy: Lightning and torch load only for fit/validate/test, so the tool commands start fast
        from organseg.cli.lightning import run_lightning_cli  # noqa: PLC0415

        try:
            run_lightning_cli(argv)
        except Exception as exc:
            if not _report(argv[0], exc):
                raise
            return 2
        return 0
    parser = _tool_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if not _report(args.command, exc):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
