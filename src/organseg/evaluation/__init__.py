"""Evaluation: per-organ Dice / HD95 / ASSD (MONAI), reports and contour overlays.

``organseg.cli.evaluate`` (the ``organseg evaluate`` entry point) builds on this API::

    rows = case_metrics(pred, label, spacing, classes, labeled, case_id="case_001")
    paths = write_report(all_rows, out_dir, title="...", extra={"checkpoint": ...})
    print(format_table(summarize(all_rows)))
    save_overlays(image, label, pred, classes, out_dir / "overlays" / "case_001.png", spacing=spacing)
"""

from .metrics import (
    EMPTY_MASK_POLICY,
    HD95_DEFINITION,
    STATUS_ABSENT,
    STATUS_FALSE_POSITIVE,
    STATUS_MISSED,
    STATUS_OK,
    binary_metrics,
    case_metrics,
    image_diagonal_mm,
    summarize,
)
from .overlays import save_overlays
from .report import format_table, write_report

__all__ = [
    "EMPTY_MASK_POLICY",
    "HD95_DEFINITION",
    "STATUS_ABSENT",
    "STATUS_FALSE_POSITIVE",
    "STATUS_MISSED",
    "STATUS_OK",
    "binary_metrics",
    "case_metrics",
    "format_table",
    "image_diagonal_mm",
    "save_overlays",
    "summarize",
    "write_report",
]
