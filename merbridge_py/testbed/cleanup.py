"""Finding and removing test beds by name, with or without their state file.

Removal order matters: agents first (on SIGTERM they detach their programs
and remove their pins), then every other process (the recorded ones, and
whatever else lives in the bed's cgroups), then namespaces, cgroups,
leftover pins, state.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import sandbox
from . import dns, state, topology
from .state import ProcessRecord

AGENT_STOP_TIMEOUT = 15.0      # the agent detaches and unpins on SIGTERM
BPFFS = Path("/sys/fs/bpf")


def leftovers(name: str) -> list[str]:
    """Resources of test bed `name` that exist right now."""
    found = []
    if state.state_file(name).exists():
        found.append(str(state.state_file(name)))
    found += topology.owned_netns(name)
    if topology.cgroup_dir(name).exists():
        found.append(str(topology.cgroup_dir(name)))
    found += [str(p) for p in _bpffs_dirs(name)]
    return found


def _bpffs_dirs(name: str) -> list[Path]:
    try:
        return sorted(BPFFS.glob(f"{topology.prefix(name)}*"))
    except OSError:
        return []


def _remove_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink(missing_ok=True)
    path.rmdir()


def teardown(name: str, reap=None) -> None:
    """Remove test bed `name` and everything it created; a no-op for a name
    with nothing left. `reap(pid, block=False)` collects exit statuses of the
    caller's own children."""
    topology.check_name(name)
    data = state.load(name) or {}
    records = [ProcessRecord(**p) for p in data.get("processes", [])]
    state.terminate([r for r in records if r.role == "agent"], timeout=AGENT_STOP_TIMEOUT, reap=reap)
    state.terminate([r for r in records if r.role != "agent"], timeout=5.0, reap=reap)
    cg = topology.cgroup_dir(name)
    if cg.exists():
        sandbox.cgroup_remove(cg)
    topology.remove_network(name)
    dns.remove_resolv_confs(topology.prefix(name))
    for d in _bpffs_dirs(name):
        _remove_tree(d)
    state.forget(name)


def all_names() -> list[str]:
    """Test beds with a state file, plus any whose resources outlived it
    (recognised by the shapes only the test bed creates: netns
    mbp-<name>-fabric|nodeN|pod-*, cgroup mbp-<name>/nodeN, bpffs mbp-<name>-nodeN)."""
    names = set(state.names())
    shape = re.compile(rf"^{sandbox.OWNED_PREFIX}([a-z][a-z0-9]*)-(fabric|node\d+|pod-[a-z][a-z0-9-]*)$")
    for ns in sandbox.netns_list():
        m = shape.match(ns)
        if m:
            names.add(m.group(1))
    root = sandbox.cgroup2_root()
    for d in root.glob(f"{sandbox.OWNED_PREFIX}*/node[0-9]*"):
        m = re.match(rf"^{sandbox.OWNED_PREFIX}([a-z][a-z0-9]*)$", d.parent.name)
        if m and d.is_dir():
            names.add(m.group(1))
    for d in BPFFS.glob(f"{sandbox.OWNED_PREFIX}*-node[0-9]*"):
        m = re.match(rf"^{sandbox.OWNED_PREFIX}([a-z][a-z0-9]*)-node\d+$", d.name)
        if m:
            names.add(m.group(1))
    return sorted(n for n in names if topology.NAME_RE.match(n))
