"""Where a test bed remembers itself between commands, and the processes it
started.

/run/merbridge-py-testbed/<name>.json holds the plan (nodes, pods, names of
everything created), the mode, and every process started (pid plus its start
time, so a recycled pid is never mistaken for ours). It is written before
anything is created, so `down` always knows what to look for.
/run/merbridge-py-testbed/<name>/ holds generated files: pods files, HAProxy
configs and stats sockets, readiness markers and logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_DIR = Path("/run/merbridge-py-testbed")


def state_file(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def workdir(name: str) -> Path:
    return STATE_DIR / name


def save(name: str, data: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = state_file(name).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, state_file(name))


def load(name: str) -> dict | None:
    try:
        return json.loads(state_file(name).read_text())
    except FileNotFoundError:
        return None


def names() -> list[str]:
    """Test beds with a state file."""
    if not STATE_DIR.is_dir():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json"))


@contextlib.contextmanager
def locked():
    """Serialise test beds coming up at the same time (slot choice, name check)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def used_slots() -> set[int]:
    return {data["slot"] for n in names() if (data := load(n)) and "slot" in data}


def forget(name: str) -> None:
    """Remove the state file and the work directory."""
    state_file(name).unlink(missing_ok=True)
    wd = workdir(name)
    if wd.is_dir():
        for p in sorted(wd.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        wd.rmdir()


# --- processes ------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks after boot), or
    None for a process that is gone or a zombie."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass
class ProcessRecord:
    pid: int
    start: int       # start_ticks() when we started it
    role: str        # "app", "sidecar", "agent"
    owner: str       # pod or node name

    @classmethod
    def of(cls, pid: int, role: str, owner: str) -> "ProcessRecord":
        """Record a child we just started (a child that already exited is a
        zombie until reaped: still recordable, and not alive())."""
        fields = _stat(pid)
        if fields is None:
            raise ProcessLookupError(f"{role} of {owner}: no process {pid}")
        return cls(pid, int(fields[19]), role, owner)

    def alive(self) -> bool:
        return start_ticks(self.pid) == self.start

    def to_json(self) -> dict:
        return asdict(self)


def signal_if_ours(rec: ProcessRecord, sig: int) -> bool:
    """Send `sig` to the recorded process if it is still the one we started."""
    if not rec.alive():
        return False
    try:
        os.kill(rec.pid, sig)
        return True
    except ProcessLookupError:
        return False


def terminate(records: list[ProcessRecord], timeout: float = 5.0, reap=None) -> None:
    """SIGTERM every recorded process that is still ours, wait up to
    `timeout`, SIGKILL what is left. `reap(pid)` collects exit statuses of
    our own children (no zombies left in a long-running caller)."""
    pending = [r for r in records if signal_if_ours(r, signal.SIGTERM)]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if reap:
            for r in pending:
                reap(r.pid)
        pending = [r for r in pending if r.alive()]
        if pending:
            time.sleep(0.02)
    for r in pending:
        signal_if_ours(r, signal.SIGKILL)
    for r in records:
        if reap:
            reap(r.pid, block=True)
