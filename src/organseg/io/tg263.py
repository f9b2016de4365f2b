"""Clinical structure names -> AAPM TG-263 standard names -> a dataset card's classes.

Planning-system exports name structures the way people type them ("Parotid_L", "L Parotid",
"PAROTID LT", "Lt_Parotid", "parotid left"). :func:`standard_name` takes such a name to its TG-263
standard name (``Parotid_L``) through the synonym table ``tg263_structures.yaml`` (data, in this package)
and a few normalisation rules (camel case, case, separators, side markers; see the table's header).
:func:`non_organ_reason` recognises structures that are derived or not organs (PRV, PTV/CTV/GTV/ITV,
``z_``/``_``/``opt`` helpers, rings, couch, external/body, partial ``~`` structures, and DICOM
RT ROI interpreted types such as EXTERNAL or PTV): they are never taken as organs, whatever their name.
:class:`StructureNames` applies both for one card: its ``class_map`` (a TG-263 name or an exact structure
name -> class) first, then each class's own name read as a TG-263 name (``parotid_l`` and ``Parotid_L``
both mean TG-263 ``Parotid_L``).

No library maintains TG-263 synonym lists (the AAPM publishes a spreadsheet of standard names only), so
the table and these rules are ours; they are data plus ~100 lines, each rule tested.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

TABLE = Path(__file__).with_name("tg263_structures.yaml")

#: side markers (a separate word or camel-case part) -> TG-263's side suffix
SIDES = {
    "l": "L",
    "lt": "L",
    "left": "L",
    "lft": "L",
    "sin": "L",
    "r": "R",
    "rt": "R",
    "right": "R",
    "rgt": "R",
    "dx": "R",
}
_GLUED_SIDES = (("left", "L"), ("right", "R"), ("lt", "L"), ("rt", "R"), ("l", "L"), ("r", "R"))

#: DICOM RT ROI Interpreted Types (3006,00A4) that are never an organ
NON_ORGAN_TYPES = {
    "EXTERNAL",
    "PTV",
    "CTV",
    "GTV",
    "TREATED_VOLUME",
    "IRRAD_VOLUME",
    "SUPPORT",
    "FIXATION",
    "BOLUS",
    "MARKER",
    "REGISTRATION",
    "ISOCENTER",
    "CONTROL",
    "DOSE_REGION",
    "CONTRAST_AGENT",
    "BRACHY_CHANNEL",
    "BRACHY_ACCESSORY",
    "BRACHY_SRC_APP",
    "BRACHY_CHNL_SHLD",
}
_BODY = {"external", "body", "skin", "outline", "ext", "bodyoutline", "patient", "bodycontour"}
_NOT_ORGAN = {
    "bolus",
    "marker",
    "markers",
    "iso",
    "isocenter",
    "isocentre",
    "bb",
    "wire",
    "artifact",
    "artefact",
    "dose",
    "hotspot",
    "coldspot",
    "avoid",
    "avoidance",
    "dummy",
    "help",
    "helper",
}


def words(name: str) -> list[str]:
    """Lower-case words of a structure name: camel case split ("OpticNrv" -> optic, nrv; "LParotid" ->
    l, parotid), every run of characters other than letters and digits a break."""
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(name))
    s = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", " ", s)
    return [w for w in re.split(r"[^a-z0-9]+", s.lower()) if w]


def _plain_words(name: str) -> list[str]:
    """Lower-case words split at separators only ("GTVp" stays one word)."""
    return [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w]


def _keys(ws: list[str]) -> tuple[str, str]:
    return "".join(ws), "".join(sorted(ws))


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, tuple[str, bool]]:
    """Normalised variant -> (TG-263 base name, sided); a variant claimed by two names is a table bug."""
    raw = yaml.safe_load(TABLE.read_text())
    index: dict[str, tuple[str, bool]] = {}
    for base, spec in raw.items():
        spec = spec or {}
        sided = bool(spec.get("sided", False))
        for variant in [base, *(spec.get("synonyms") or [])]:
            if not isinstance(variant, str):  # YAML 1.1 reads an unquoted on/off/yes/no as a bool
                raise RuntimeError(f"{TABLE}: variant {variant!r} of {base} is not a string (quote it)")
            ws = words(variant)
            if set(ws) & set(SIDES):
                raise RuntimeError(f"{TABLE}: variant {variant!r} of {base} holds a side marker")
            for key in _keys(ws):
                other = index.setdefault(key, (base, sided))
                if other[0] != base:
                    raise RuntimeError(f"{TABLE}: variant {variant!r} of {base} also means {other[0]}")
    return index


def table_digest() -> str:
    """A digest of the synonym table (part of a dicom_rt cache's fingerprint: a new table rebuilds)."""
    return hashlib.sha256(TABLE.read_bytes()).hexdigest()[:16]


def standard_names() -> list[str]:
    """Every TG-263 name the table knows (sided ones as ``_L`` and ``_R``)."""
    out = set()
    for base, sided in _table().values():
        out.update([f"{base}_L", f"{base}_R"] if sided else [base])
    return sorted(out)


def standard_name(name: str) -> str | None:
    """The TG-263 standard name that ``name`` means, or None when the table does not know it (or a sided
    organ has no side, or two different sides)."""
    ws = words(name)
    sides = {SIDES[w] for w in ws if w in SIDES}
    rest = [w for w in ws if w not in SIDES]
    if len(sides) > 1 or not rest:
        return None
    side = next(iter(sides), None)
    found = _lookup(rest, side)
    known = any(key in _table() for key in _keys(rest))  # "Cochlear" is not "Cochlea" + R
    if (
        found is None and side is None and not known
    ):  # a side glued to the first or last word: "parotidl", "ltparotid"
        for suffix, s in _GLUED_SIDES:
            if rest[-1].endswith(suffix) and len(rest[-1]) > len(suffix):
                found = found or _lookup([*rest[:-1], rest[-1][: -len(suffix)]], s, need_sided=True)
            if rest[0].startswith(suffix) and len(rest[0]) > len(suffix):
                found = found or _lookup([rest[0][len(suffix) :], *rest[1:]], s, need_sided=True)
    return found


def _lookup(ws: list[str], side: str | None, need_sided: bool = False) -> str | None:
    table = _table()
    for key in _keys(ws):
        if key in table:
            base, sided = table[key]
            if sided != (side is not None) or (need_sided and not sided):
                return None
            return f"{base}_{side}" if sided else base
    return None


def non_organ_reason(name: str, interpreted_type: str = "") -> str | None:
    """Why structure ``name`` is derived or not an organ, or None (it may be one)."""
    kind = str(interpreted_type or "").strip().upper()
    if kind in NON_ORGAN_TYPES:
        return f"RT ROI interpreted type {kind}"
    raw = str(name).strip()
    plain, camel = _plain_words(raw), words(raw)
    every = set(plain) | set(camel)
    if "~" in raw:
        return "partial structure (TG-263 '~')"
    if re.match(r"^(_|zz|z[_\-\s.])", raw, re.IGNORECASE):
        return "helper structure ('z_'/'_' prefix)"
    if "prv" in "".join(plain):
        return "planning organ-at-risk volume (PRV)"
    if any(re.match(r"^(ptv|ctv|gtv|itv)", w) for w in every):
        return "target volume (PTV/CTV/GTV/ITV)"
    if any(w == "opt" or (w.startswith("opt") and not w.startswith("optic")) for w in every):
        return "optimisation helper ('opt')"
    if any(w.startswith("ring") or w.endswith("ring") for w in every):
        return "ring structure"
    if any("couch" in w or w == "table" for w in every):
        return "couch/table"
    if every & _BODY:
        return "external/body outline"
    if re.search(r"\+\s*\d|\d\s*mm\b", raw.lower()):
        return "expanded structure (+N mm)"
    hit = sorted(every & _NOT_ORGAN)
    if hit:
        return f"not an organ ({hit[0]})"
    return None


@dataclass(frozen=True)
class NameMatch:
    """What one structure name is for a card: ``status`` "class" (``cls`` set), "ignored" or "unmatched"."""

    raw: str
    status: str
    cls: str | None = None
    standard: str | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.status == "class":
            via = f"TG-263 {self.standard}" if self.standard else "class_map"
            return f"{self.cls} ({via})"
        if self.status == "ignored":
            return f"ignored: {self.reason}"
        return "unmatched" + (f" ({self.reason})" if self.reason else "")


def _exact(name: str) -> str:
    return " ".join(str(name).lower().split())


class StructureNames:
    """A card's structure-name matcher (see module doc). ``class_map`` keys are TG-263 names or exact
    structure names (case and repeated spaces aside); values are the card's class names."""

    def __init__(self, classes: list[str], class_map: dict[str, str] | None = None):
        self.classes = list(classes)
        self.class_map = dict(class_map or {})
        self.exact = {_exact(k): v for k, v in self.class_map.items()}
        self.by_standard: dict[str, str] = {}
        self.clashes: list[str] = []
        for key, cls in self.class_map.items():
            std = standard_name(key)
            if std is not None:
                self.by_standard[std] = cls
        mapped = set(self.class_map.values())
        for cls in self.classes[1:]:
            if cls in mapped:
                continue
            std = standard_name(cls)
            if std is None:
                continue
            if std in self.by_standard and self.by_standard[std] != cls:
                self.clashes.append(f"classes {self.by_standard[std]} and {cls} are both TG-263 {std}")
                continue
            self.by_standard[std] = cls

    def problems(self, labeled: list[str]) -> list[str]:
        """Card mistakes: class_map values that are not classes, labeled classes no structure name can
        reach (neither a TG-263 name nor a class_map value), two classes meaning one TG-263 name."""
        out = list(self.clashes)
        bad = sorted({v for v in self.class_map.values() if v not in self.classes[1:]})
        if bad:
            out.append(f"class_map maps to unknown class(es) {bad}")
        reachable = set(self.by_standard.values()) | set(self.class_map.values())
        lost = [c for c in labeled if c not in reachable]
        if lost:
            out.append(
                f"class(es) {lost} are not TG-263 names the synonym table knows; name them in class_map "
                f"(TG-263 name or structure name -> class)"
            )
        return out

    def match(self, name: str, interpreted_type: str = "") -> NameMatch:
        raw = str(name)
        cls = self.exact.get(_exact(raw))
        if cls is not None:  # the user's own word wins over every rule
            return NameMatch(raw, "class", cls, standard_name(raw))
        reason = non_organ_reason(raw, interpreted_type)
        if reason:
            return NameMatch(raw, "ignored", reason=reason)
        std = standard_name(raw)
        if std is None:
            return NameMatch(raw, "unmatched")
        cls = self.by_standard.get(std)
        if cls is None:
            return NameMatch(
                raw, "ignored", standard=std, reason=f"TG-263 {std} is not one of the card's classes"
            )
        return NameMatch(raw, "class", cls, std)
