"""Synthetic CT phantoms: organseg's built-in data (no real data is downloaded).

* :mod:`.hn`: head and neck, 17 organs at risk (``HN_CLASSES``), nnU-Net or PDDCA layout;
* :mod:`.abdomen`: liver, spleen, kidneys, pancreas, stomach (``ABDOMEN_CLASSES``), with
  few-organ ``keep`` datasets drawn from disjoint random streams;
* :mod:`.common`: seeding, pose + elastic deformation, primitives and writers.

The ``organseg phantom`` subcommand is :mod:`organseg.cli.phantom`.
"""

from .abdomen import (
    ABDOMEN_CLASSES,
    ABDOMEN_DEFAULT_SHAPE,
    ABDOMEN_DEFAULT_SPACING,
    ABDOMEN_SMALL,
    abdomen_case_id,
    generate_abdomen_case,
    keep_stream,
    keep_tag,
    write_abdomen_dataset,
)
from .common import PhantomCase
from .hn import (
    HN_CLASSES,
    HN_DEFAULT_SHAPE,
    HN_DEFAULT_SPACING,
    HN_SMALL,
    PDDCA_NAMES,
    generate_hn_case,
    hn_case_id,
    write_hn_dataset,
)

__all__ = [
    "ABDOMEN_CLASSES",
    "ABDOMEN_DEFAULT_SHAPE",
    "ABDOMEN_DEFAULT_SPACING",
    "ABDOMEN_SMALL",
    "HN_CLASSES",
    "HN_DEFAULT_SHAPE",
    "HN_DEFAULT_SPACING",
    "HN_SMALL",
    "PDDCA_NAMES",
    "PhantomCase",
    "abdomen_case_id",
    "generate_abdomen_case",
    "generate_hn_case",
    "hn_case_id",
    "keep_stream",
    "keep_tag",
    "write_abdomen_dataset",
    "write_hn_dataset",
]
