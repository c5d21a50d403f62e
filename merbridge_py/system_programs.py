"""The programs merbridge-py's test bed, tests, benchmark and demo run, and the Debian package of each.

scripts/system-programs.txt (beside the install script) is the list; scripts/install-system-deps.sh installs
every package it names. A fresh machine has only what that script installs, so a program used but not listed
passes on the machine of whoever installed it by hand and fails everywhere else: tests/test_system_programs.py
finds programs the code runs that the list lacks, and `require()` (called when a test bed comes up and when the
test session starts) names the package of every listed program that is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

LIST = Path(__file__).resolve().parent.parent / "scripts" / "system-programs.txt"
INSTALL_SCRIPT = LIST.parent / "install-system-deps.sh"


class MissingPrograms(RuntimeError):
    pass


def load(path: Path | None = None) -> dict[str, str]:
    """program -> Debian package. Empty where the list is not shipped (the agent's image runs none of these)."""
    path = LIST if path is None else path
    if not path.exists():
        return {}
    programs = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: expected 'program package [who runs it]', got {line!r}")
        programs[fields[0]] = fields[1]
    return programs


def missing(programs: dict[str, str] | None = None) -> dict[str, str]:
    """The listed programs that are not on PATH, with their packages."""
    programs = load() if programs is None else programs
    return {prog: pkg for prog, pkg in programs.items() if shutil.which(prog) is None}


def require(names: list[str] | None = None) -> None:
    """Raise MissingPrograms naming each missing program (all listed ones, or just `names`) and its package."""
    programs = load()
    if names is not None:
        programs = {n: programs[n] for n in names if n in programs}
    gone = missing(programs)
    if gone:
        what = ", ".join(f"{prog} (Debian package {pkg})" for prog, pkg in sorted(gone.items()))
        raise MissingPrograms(f"missing programs: {what}; run scripts/install-system-deps.sh (as root)")
