"""The errors a user can cause and fix: the lowest layer of organseg, importing nothing from it.

Raise an :class:`OrgansegError` subclass for a condition the user controls (a config or option value,
an input file or folder, a checkpoint, a dataset card, a cache, a command-line option) with a one-line
message that names the thing and the problem. Everything else (a broken invariant, a shape that no
config can produce, an error inside torch or a library) stays a plain exception and keeps its traceback.

The domain errors live beside the code that raises them and derive from the base here:
``io.card.CardError``, ``io.layouts.CaseError``, ``io.dicom.DicomError``, ``cache.reader.CacheError``,
``data.pseudo_labels.PseudoLabelError``.
"""

from __future__ import annotations

__all__ = ["OrgansegError", "ConfigError", "InputError", "CheckpointError", "OutputError", "UsageError"]


class OrgansegError(Exception):
    """An error the user caused and can fix; the ``organseg`` CLI prints its message as one line,
    ``organseg <command>: error: <message>``, and exits with status 2 (``ORGANSEG_DEBUG=1`` shows the
    traceback instead)."""


class ConfigError(OrgansegError, ValueError):
    """A config or option value that is out of range, unknown or inconsistent with another one."""


class InputError(OrgansegError, ValueError):
    """An input file or folder that is missing, unreadable or of the wrong kind."""


class CheckpointError(OrgansegError, ValueError):
    """A checkpoint that is missing, unreadable, foreign, or does not fit the model or data at hand."""


class OutputError(OrgansegError, OSError):
    """An output location that cannot be written or would overwrite something (``--out``, ``--overwrite``)."""

    @classmethod
    def from_os_error(cls, exc: OSError) -> OutputError:
        """The same error (errno, message, file names) as an OutputError."""
        if exc.errno is None:
            return cls(str(exc))
        return cls(exc.errno, exc.strerror, exc.filename, None, exc.filename2)


class UsageError(OrgansegError):
    """A command line that cannot be parsed (unknown option, option value of the wrong type)."""
