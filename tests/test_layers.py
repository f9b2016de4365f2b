"""The house rules that a linter cannot see: no private names imported across modules, and the window grid
written out in ``inference.locate_zoom_paste`` (instead of MONAI's private helper) is MONAI's grid."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference

from organseg.inference.locate_zoom_paste import window_starts

REPO = Path(__file__).resolve().parents[1]


def private_imports(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [
                    f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif isinstance(node, ast.Import):
                found += [
                    f"{path.relative_to(REPO)}:{node.lineno}: import {a.name}"
                    for a in node.names
                    if any(p.startswith("_") for p in a.name.split("."))
                ]
    return found


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks"])
def test_no_private_names_are_imported(folder):
    assert private_imports(REPO / folder) == []


def test_private_import_scan_finds_one(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("from organseg.io.layouts import _read\nimport torch._dynamo\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert len(private_imports(tmp_path)) == 2


@pytest.mark.parametrize(
    "size,patch,overlap",
    [((40, 33, 9), (16, 16, 8), 0.5), ((16, 50, 20), (16, 12, 7), 0.25), ((23, 23, 23), (8, 9, 10), 0.6)],
)
def test_window_starts_are_monais_sliding_window_grid(size, patch, overlap):
    # each channel holds its axis' voxel index, so a window's first voxel tells where MONAI put it
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij"))
    seen = set()

    def record(window):
        seen.update(tuple(int(v) for v in w[:, 0, 0, 0]) for w in window)
        return window

    sliding_window_inference(grid[None], patch, 1, record, overlap=overlap, mode="constant")
    starts = window_starts(size, patch, overlap)
    assert [sorted({s[a] for s in seen}) for a in range(3)] == starts
