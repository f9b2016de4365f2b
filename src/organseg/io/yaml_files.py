"""Reading the user's YAML files (dataset cards, sweep configs) with one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from organseg.errors import InputError


def read_yaml_mapping(
    path: str | Path,
    error: type[Exception] = InputError,
    prefix: str = "",
    missing: str = "file not found",
    not_mapping: str = "expected a mapping",
) -> dict:
    """The YAML mapping in ``path``; a missing file, invalid YAML or a non-mapping raises
    ``error(f"{prefix}{path}: <problem>")``, one line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{prefix}{path}: {missing}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{prefix}{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{prefix}{path}: {not_mapping}")
    return data
