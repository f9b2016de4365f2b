"""Hard pseudo-labels of a few-organ dataset from first-stage single-dataset models (experts): the
self-training base of co-training WAM.

Each expert contributes only the organs its own training cards annotate, restricted to those the
pseudo-labelled card does *not* annotate; overlaps go to the more confident expert
(:class:`organseg.methods.cowam_baselines.MultiModel`). The file format is
:mod:`organseg.data.pseudo_labels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from organseg.cache.build import build_cache
from organseg.cache.reader import CacheReader
from organseg.data.pseudo_labels import (
    PseudoLabelError,
    PseudoLabelReader,
    file_sha256,
    pseudo_fingerprint,
    write_pseudo_file,
)
from organseg.methods.cowam_baselines import MultiModel


def write_pseudo_labels(
    card,
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Run the experts on every cached case of ``card`` and write ``out`` atomically.

    A no-op (returns ``out``) when ``out`` exists with the same fingerprint, unless ``force``.
    """
    out = Path(out)
    build_cache(card, progress=False)  # a no-op when up to date
    reader = CacheReader(card.cache)
    if list(reader.classes) != list(card.classes):
        raise PseudoLabelError(f"{card.source or card.name}: classes differ from its cache {card.cache}")
    # experts restricted to the organs this dataset does NOT annotate (its ground truth covers the rest)
    own = set(card.labeled)
    model = MultiModel.from_checkpoints(checkpoints, classes=card.classes, exclude_organs=own, device=device)
    if not model.expert_checkpoints:
        raise PseudoLabelError(
            f"{card.source or card.name}: the checkpoints annotate no organ that this dataset "
            f"lacks ({sorted(own)} are its own); nothing to pseudo-label"
        )
    entries = [
        {"path": str(Path(p).resolve()), "sha256": file_sha256(p), "organs": organs}
        for p, organs in zip(model.expert_checkpoints, model.expert_organ_names)
    ]
    fp = pseudo_fingerprint(reader.fingerprint, entries, card.classes)
    if out.is_file() and not force:
        try:
            old = PseudoLabelReader(out, check_checkpoints=False)
        except PseudoLabelError:
            old = None
        if old is not None and old.fingerprint == fp and set(reader.case_ids) <= set(old.case_ids):
            print(f"{out}: pseudo-labels up to date ({len(old.case_ids)} cases)")
            return out
    ids = list(reader.case_ids)
    it = ids
    if progress:
        it = track(ids, description=f"pseudo-labelling {card.name}")

    def labels():
        for cid in it:
            image, _ = reader.read_case(cid)
            with torch.no_grad():
                pred = model.predict_case(torch.from_numpy(image)[None, None].to(device))[0]
            yield cid, pred.cpu().numpy().astype(np.uint8)

    write_pseudo_file(
        out,
        labels(),
        fingerprint=fp,
        cache=card.cache,
        cache_fingerprint=reader.fingerprint,
        classes=card.classes,
        checkpoints=entries,
        card_name=card.name,
    )
    print(
        f"wrote {out}: pseudo-labels of {len(ids)} cases for organs "
        f"{sorted({o for e in entries for o in e['organs']})}"
    )
    return out
