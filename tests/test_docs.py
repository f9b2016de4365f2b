"""The README's layout and docs/architecture.md name the package as it is: every module of src/organseg is
in the layout, and every module path either document names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src/organseg"


def layout_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Repository layout", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_lists_every_module():
    block = layout_block()
    folder = None
    listed: dict[str | None, set[str]] = {}
    for line in block.splitlines():
        head = re.match(r"  (\w+)/\s", line)
        if head:
            folder = head.group(1)
        elif re.match(r"  \S", line):
            folder = None
        listed.setdefault(folder, set()).update(re.findall(r"\b(\w+\.py)\b", line))
    modules = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    missing = [
        str(m) for m in modules if m.name not in listed.get(m.parent.name if m.parent.parts else None, set())
    ]
    assert missing == [], f"README's layout does not list {missing}"


def test_module_paths_named_in_the_docs_exist():
    named = set()
    for doc in (REPO / "README.md", REPO / "docs/architecture.md"):
        text = doc.read_text()
        named |= set(
            re.findall(
                r"(?<![\w/.])((?:cli|runtime|methods|inference|evaluation|data|cache|phantom|"
                r"networks|losses|io|spatial)/\w+\.py)",
                text,
            )
        )
    assert named, "the pattern found no module path at all"
    assert sorted(n for n in named if not (PACKAGE / n).is_file()) == []
