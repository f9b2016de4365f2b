"""Shared fixtures: a small head-and-neck phantom, its card and its HDF5 cache, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
# small but complete anatomy: every organ, incl. lenses, survives at this spacing
SMALL_SHAPE, SMALL_SPACING = (128, 128, 32), (1.5, 1.5, 4.5)


@pytest.fixture(autouse=True)
def no_run_seed_from_an_earlier_test(monkeypatch):
    """An in-process fit's ``seed_everything`` exports PL_GLOBAL_SEED, which the patch stream and
    co-training's network seeds follow when unset in config: every test starts without one."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests: two OpenMP threads on 2 shared cores make
    these tiny convolutions ~50x slower. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch  # noqa: PLC0415  (conftest stays importable without torch's start-up cost)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_card(card_file: Path, **overrides) -> Path:
    card = yaml.safe_load((REPO / "data_modules/cards/hn_phantom.yaml").read_text())
    card.update(overrides)
    card_file.write_text(yaml.safe_dump(card, sort_keys=False))
    return card_file


@pytest.fixture(scope="session")
def hn_small(tmp_path_factory) -> dict:
    """5 phantom cases (3 train, 1 val, 1 test), preprocessed: {'card': path, 'cache': path, 'raw': path}."""
    from organseg.cache.build import build_cache
    from organseg.cli.main import main
    from organseg.io.card import DatasetCard

    root = tmp_path_factory.mktemp("hn_small")
    raw = root / "raw"
    assert (
        main(
            [
                "phantom",
                "hn",
                "--out",
                str(raw),
                "--cases",
                "5",
                "--seed",
                "0",
                "--quiet",
                "--shape",
                *map(str, SMALL_SHAPE),
                "--spacing",
                *map(str, SMALL_SPACING),
            ]
        )
        == 0
    )
    card = write_card(
        root / "card.yaml",
        name="hn_small",
        path=str(raw),
        cache=str(root / "cache.h5"),
        target_spacing=list(SMALL_SPACING),
        split={"val": 1, "test": 1, "seed": 0},
    )
    build_cache(DatasetCard.load(card), workers=1, progress=False)
    return {"card": card, "cache": root / "cache.h5", "raw": raw, "root": root}
