"""Primitives for simulated nodes and pods: network namespaces, child cgroups,
processes inside both. Used by the test bed and the tests; never touches the
root network namespace's configuration or the root cgroup's attachments.

Everything created here is named with OWNED_PREFIX so that a sweep can find
leftovers of a crashed run without touching anything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OWNED_PREFIX = "mbp-"


class SandboxError(RuntimeError):
    pass


# Enter a network namespace owned by another user namespace (a pod with
# hostUsers: false) the way the pod's own processes live there: in its owner
# user namespace first (Istio's owner match and iptables' owner checks need
# the writer in the namespace's owner), as root inside, then in the network
# namespace. `ip netns exec` would keep the host's user namespace.
_ENTER_USERNS = r"""
import ctypes, fcntl, os, sys
libc = ctypes.CDLL(None, use_errno=True)
net = os.open(sys.argv[1], os.O_RDONLY)
user = fcntl.ioctl(net, 0xB701)    # NS_GET_USERNS
for fd, flag, what in ((user, 0x10000000, "user"), (net, 0x40000000, "network")):
    if libc.setns(fd, flag) != 0:
        raise OSError(ctypes.get_errno(), "setns into the pod's %s namespace" % what)
    os.close(fd)
os.setgroups([]); os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _enter(netns: str) -> list[str]:
    """The command prefix that runs a program inside network namespace `netns`."""
    from .userns import owner_inode
    path = f"/run/netns/{netns}"
    try:
        foreign = owner_inode(path) != os.stat("/proc/self/ns/user").st_ino
    except OSError:
        foreign = False     # let `ip netns exec` report the missing namespace
    return [sys.executable, "-c", _ENTER_USERNS, path] if foreign else ["ip", "netns", "exec", netns]


def sh(*argv: str, check: bool = True, netns: str | None = None, input: str | None = None) -> str:
    """Run a command (inside `netns` if given) and return its stdout."""
    cmd = (_enter(netns) if netns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise SandboxError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup on unified hosts, often
    /sys/fs/cgroup/unified on hybrid ones."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    raise SandboxError("no cgroup v2 mount found in /proc/self/mountinfo; mount one with: "
                       "mount -t cgroup2 none /sys/fs/cgroup/unified")


# --- network namespaces -----------------------------------------------------

def netns_add(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "link", "set", "lo", "up", netns=name)


def netns_bind(name: str, source: str) -> None:
    """Name an existing network namespace (`source`: /proc/PID/ns/net) as
    `ip netns add` names new ones, so `ip netns` and `netns=` work with it."""
    Path("/run/netns").mkdir(parents=True, exist_ok=True)
    target = Path("/run/netns", name)
    target.touch(exist_ok=False)
    try:
        sh("mount", "--bind", source, str(target))
    except SandboxError:
        target.unlink()
        raise


def netns_delete(name: str) -> None:
    if Path("/run/netns", name).exists():
        sh("ip", "netns", "delete", name, check=False)


def netns_list(prefix: str = OWNED_PREFIX) -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix)) if d.is_dir() else []


def netns_pids(name: str) -> list[int]:
    out = sh("ip", "netns", "pids", name, check=False)
    return [int(x) for x in out.split()]


# --- cgroups ------------------------------------------------------------------

def cgroup_create(path: Path) -> Path:
    root = cgroup2_root()
    path = Path(path)
    if path == root or root not in path.parents:
        raise SandboxError(f"refusing cgroup {path}: must be a child of the cgroup v2 root {root}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cgroup_remove(path: Path, timeout: float = 5.0) -> None:
    """Remove a cgroup tree we created. Processes still inside are ours (we
    placed them there): they get SIGTERM, then SIGKILL."""
    path = Path(path)
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _cgroup_rmdir(child, timeout)
    _cgroup_rmdir(path, timeout)


def _cgroup_rmdir(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SandboxError(f"cannot remove cgroup {path}: still busy")
            for pid in cgroup_pids(path):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            sig = signal.SIGKILL if time.monotonic() > deadline - timeout / 2 else sig
            time.sleep(0.05)


def cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in Path(path, "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


# --- processes ------------------------------------------------------------------

def spawn(argv: list[str], netns: str | None = None, cgroup: Path | None = None,
          uid: int | None = None, gid: int | None = None, **popen) -> subprocess.Popen:
    """Start a process inside `netns` and `cgroup` (joined before exec, so even
    its first socket is seen by programs attached there), optionally as uid/gid.

    The cgroup is joined while still root; entering the namespace needs root
    too, so the uid/gid drop happens last, through setpriv."""
    cmd = list(argv)
    if uid is not None:
        g = gid if gid is not None else uid
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={g}", "--clear-groups", "--"] + cmd
    if netns:
        cmd = _enter(netns) + cmd
    procs_file = str(Path(cgroup, "cgroup.procs")) if cgroup else None

    def join_cgroup():
        if procs_file:
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

    return subprocess.Popen(cmd, preexec_fn=join_cgroup if procs_file else None, **popen)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a process we started, by its pid: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
