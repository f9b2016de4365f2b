"""dicom3tools' validators for the tests: ``dciodvfy`` (one object against its IOD: required modules and
attributes, VRs, values) and ``dcentvfy`` (patient/study/series attributes consistent across files).

Debian's ``dicom3tools`` package, installed with apt-get when the tools are missing (as root, like the
SLURM packages in slurm_cluster.py). Both print ``Error - ...``, ``Warning - ...`` (and ``Abort - ...``
when they cannot read a file) on stderr; :func:`dciodvfy` and :func:`dcentvfy` return those lines sorted
by kind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "dicom3tools"
TOOLS = ("dciodvfy", "dcentvfy")


class Dicom3toolsUnavailable(RuntimeError):
    """dicom3tools is not installed and cannot be installed here (the tests skip with this message)."""


def ensure_installed() -> None:
    """Install Debian's dicom3tools unless its validators are already on PATH."""
    if all(shutil.which(t) for t in TOOLS):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise Dicom3toolsUnavailable(
            f"the DICOM validator tests need {' and '.join(TOOLS)} (Debian package {PACKAGE}): "
            "not on PATH and apt-get is not available to install them"
        )
    if os.geteuid() != 0:
        raise Dicom3toolsUnavailable(
            f"the DICOM validator tests need {' and '.join(TOOLS)}: not on PATH and installing them "
            f"needs root: apt-get install -y {PACKAGE}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "--no-install-recommends", PACKAGE]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise Dicom3toolsUnavailable(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        raise Dicom3toolsUnavailable(f"installed {PACKAGE} but still missing: {', '.join(missing)}")


@dataclass
class Report:
    """What a dicom3tools validator said: its other lines (e.g. dciodvfy's IOD name), and the messages."""

    info: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.info + self.errors + self.warnings)


def _run(tool: str, files: list[Path]) -> Report:
    proc = subprocess.run([tool, *map(str, files)], capture_output=True, text=True, timeout=120)
    report = Report()
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith(("Error", "Abort")):  # Abort: the file could not be read at all
            report.errors.append(line)
        elif line.startswith("Warning"):
            report.warnings.append(line)
        elif line.strip():
            report.info.append(line)
    return report


def dciodvfy(path: Path) -> Report:
    """Validate one DICOM file against its IOD; ``info`` names the IOD recognised (e.g. RTStructureSet)."""
    return _run("dciodvfy", [path])


def dcentvfy(files: list[Path]) -> Report:
    """Check that the files agree on every attribute of each patient, study and series they share."""
    return _run("dcentvfy", files)
