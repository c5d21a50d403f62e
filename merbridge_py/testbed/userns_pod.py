"""Pods in their own user namespace (Kubernetes' `hostUsers: false`): a
holder process (the pod's pause) unshares a user and a network namespace, so
the network namespace is owned by the user namespace, as a container runtime
makes it; the parent writes the 65536-id maps starting at 100000 (what the
kubelet allots), as a runtime does. util-linux's `unshare --map-users`
changed its argument order between 2.38 and 2.39, hence a few lines of Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HOST_ID_BASE = 100000
ID_COUNT = 65536

# unshare(CLONE_NEWUSER | CLONE_NEWNET), say so, wait for the maps, become
# root inside (host uid HOST_ID_BASE) and pause.
_HOLDER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x40000000) != 0:
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
sys.stdout.write("unshared\n"); sys.stdout.flush()
if sys.stdin.readline().strip() != "mapped":
    sys.exit("parent did not map our ids")
os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
os.execvp("sleep", ["sleep", "infinity"])
"""


def start_holder(host_base: int = HOST_ID_BASE, count: int = ID_COUNT, cgroup: Path | None = None,
                 **popen) -> subprocess.Popen:
    """A process owning a new user namespace (ids 0..count-1 inside = host_base.. outside)
    and a network namespace that namespace owns; joined to `cgroup` first."""
    procs_file = str(Path(cgroup, "cgroup.procs")) if cgroup else None

    def join_cgroup():
        if procs_file:
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=join_cgroup if procs_file else None, **popen)
    try:
        if proc.stdout.readline().strip() != "unshared":
            raise RuntimeError(f"user namespace holder failed (exit {proc.wait(5)})")
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{proc.pid}/{name}").write_text(f"0 {host_base} {count}\n")
        proc.stdin.write("mapped\n")
        proc.stdin.flush()
        proc.stdin.close()
        proc.stdout.close()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
