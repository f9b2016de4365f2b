"""Dataset cards: the one place a dataset's label space and preprocessing are declared.

A card is a YAML file (``data_modules/cards/<name>.yaml``)::

    name: hn_phantom
    layout: nnunet                 # nnunet (also MSD) | pddca | dicom_rt
    path: data/raw/hn_phantom      # relative paths resolve against the current directory
    cache: data/cache/hn_phantom.h5
    classes: [background, brainstem, ...]   # index -> organ name; index 0 is background
    labeled: all                   # or a list of organ names this dataset annotates
    small: [lens_l, ...]           # FocusNetV2 SOL/SOS targets
    target_spacing: [1.0, 1.0, 3.0]  # mm, (x, y, z) = torchio's axis order
    hu_window: [-160, 240]         # clip window; intensities are then scaled to [-1, 1]
    split: {val: 0.2, test: 0.2, seed: 0}   # deterministic case split (fractions or id lists)
    class_map: {BrainStem: brainstem}        # pddca: structure file stem -> class name; dicom_rt: TG-263
                                   # (or exact structure) name -> class name (optional, see io/tg263.py)
    rtstruct_conflict: newest      # dicom_rt: two RTSTRUCTs contour one organ differently: newest | error
    label_values: {1: liver}       # optional: raw label value -> class name (default: identity)

Axis convention everywhere in organseg: arrays are indexed (x, y, z), as torchio and nibabel do;
SimpleITK's (z, y, x) arrays are transposed once, in ``organseg.io``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from organseg.errors import OrgansegError
from organseg.io.yaml_files import read_yaml_mapping

LAYOUTS = ("nnunet", "msd", "pddca", "dicom_rt")


class CardError(OrgansegError, ValueError):
    """A dataset card is missing, malformed or inconsistent."""


@dataclass
class DatasetCard:
    name: str
    layout: str
    path: str
    cache: str
    classes: list[str]
    labeled: list[str]
    small: list[str] = field(default_factory=list)
    target_spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 3.0])
    hu_window: list[float] = field(default_factory=lambda: [-160.0, 240.0])
    split: dict[str, Any] = field(default_factory=lambda: {"val": 0.2, "test": 0.2, "seed": 0})
    class_map: dict[str, str] = field(default_factory=dict)
    label_values: dict[int, str] = field(default_factory=dict)
    rtstruct_conflict: str = "newest"
    source: str = ""  # the YAML file this card came from ("" when built in code)

    # ----------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | Path) -> DatasetCard:
        raw = read_yaml_mapping(
            path, CardError, missing="dataset card not found", not_mapping="a dataset card must be a mapping"
        )
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "") -> DatasetCard:
        where = source or "<card>"
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise CardError(
                f"{where}: unknown card key(s) {sorted(unknown)}; known: {sorted(known - {'source'})}"
            )
        for key in ("name", "layout", "path", "classes"):
            if key not in raw:
                raise CardError(f"{where}: missing required key '{key}'")
        raw = dict(raw)
        raw.setdefault("cache", f"data/cache/{raw['name']}.h5")
        if raw.get("labeled", "all") == "all":
            raw["labeled"] = list(raw["classes"][1:])
        raw["label_values"] = {int(k): v for k, v in (raw.get("label_values") or {}).items()}
        raw["source"] = source
        card = cls(**raw)
        card.validate(where)
        return card

    def validate(self, where: str = "") -> None:
        where = where or self.source or self.name
        if self.layout not in LAYOUTS:
            raise CardError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not self.classes or self.classes[0] != "background":
            raise CardError(f"{where}: classes[0] must be 'background'")
        if len(set(self.classes)) != len(self.classes):
            raise CardError(f"{where}: duplicate class names in classes")
        if len(self.classes) > 255:
            raise CardError(f"{where}: at most 255 classes fit a uint8 label map")
        for key in ("labeled", "small"):
            bad = [c for c in getattr(self, key) if c not in self.classes[1:]]
            if bad:
                raise CardError(f"{where}: {key} names unknown organ(s) {bad}")
        for v, name in self.label_values.items():
            if name not in self.classes:
                raise CardError(f"{where}: label_values maps {v} to unknown class {name!r}")
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise CardError(f"{where}: target_spacing must be three positive numbers (x, y, z mm)")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise CardError(f"{where}: hu_window must be [low, high] with low < high")
        if self.layout == "pddca" and not self.class_map:
            raise CardError(f"{where}: a pddca card needs class_map (structure file stem -> class name)")
        if self.rtstruct_conflict not in ("newest", "error"):
            raise CardError(
                f"{where}: rtstruct_conflict must be newest or error, got {self.rtstruct_conflict!r}"
            )
        if self.layout == "dicom_rt":
            from organseg.io.tg263 import StructureNames  # noqa: PLC0415 - only dicom_rt cards need the table

            for problem in StructureNames(self.classes, self.class_map).problems(self.labeled):
                raise CardError(f"{where}: {problem}")

    # ----------------------------------------------------------------- derived facts
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, organ: str) -> int:
        return self.classes.index(organ)

    @property
    def labeled_mask(self) -> list[bool]:
        """``labeled[C]``: True for background and every annotated organ."""
        return [i == 0 or c in self.labeled for i, c in enumerate(self.classes)]

    @property
    def small_indices(self) -> list[int]:
        return [self.index(c) for c in self.small]

    def raw_to_class(self) -> dict[int, int]:
        """Raw label value -> class index (identity unless ``label_values`` remaps)."""
        if self.label_values:
            return {0: 0, **{v: self.index(n) for v, n in self.label_values.items()}}
        return {i: i for i in range(self.num_classes)}

    def preprocessing_params(self) -> dict:
        """Everything that changes the cache contents (part of its fingerprint)."""
        params = {
            "classes": self.classes,
            "target_spacing": list(map(float, self.target_spacing)),
            "hu_window": list(map(float, self.hu_window)),
            "layout": self.layout,
            "class_map": self.class_map,
            "label_values": {str(k): v for k, v in self.label_values.items()},
        }
        if self.layout == "dicom_rt":  # only here, so other layouts' caches keep their fingerprints
            from organseg.io.tg263 import table_digest  # noqa: PLC0415 - only dicom_rt cards need the table

            params.update(rtstruct_conflict=self.rtstruct_conflict, tg263_table=table_digest())
        return params

    def split_cases(self, case_ids: list[str]) -> dict[str, list[str]]:
        """Deterministic train/val/test split; fractions or explicit id lists."""
        ids = sorted(case_ids)
        spec = dict(self.split or {})
        seed = int(spec.pop("seed", 0))
        out: dict[str, list[str]] = {}
        explicit = {k: list(v) for k, v in spec.items() if isinstance(v, (list, tuple))}
        for k, v in explicit.items():
            missing = sorted(set(v) - set(ids))
            if missing:
                raise CardError(
                    f"{self.source or self.name}: split '{k}' names unknown case(s) {missing[:5]}"
                )
        rest = [c for c in ids if not any(c in v for v in explicit.values())]
        random.Random(seed).shuffle(rest)
        for k, v in spec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                n = int(round(float(v) * len(ids))) if v < 1 else int(v)
                n = max(1, n) if v > 0 and len(rest) > 1 else n
                out[k], rest = sorted(rest[:n]), rest[n:]
        out.update({k: sorted(v) for k, v in explicit.items()})
        out["train"] = sorted(rest) if "train" not in explicit else out["train"]
        for k in ("train", "val", "test"):
            out.setdefault(k, [])
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label_values"] = {int(k): v for k, v in self.label_values.items()}
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.preprocessing_params(), sort_keys=True).encode()).hexdigest()[
            :16
        ]
