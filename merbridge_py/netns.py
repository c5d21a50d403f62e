"""Find a pod's network namespace from its IP, the way it works both for
Kubernetes pods (every pod has at least its pause process) and for namespaces
made with `ip netns add` (bind-mounted under /run/netns).

For each distinct namespace we enter it from a short-lived thread (setns only
moves the calling thread), read its IPv4 addresses with psutil and its
cookie with SO_NETNS_COOKIE: the same 64-bit value bpf_get_netns_cookie()
returns in the kernel, which is how the eBPF programs know which pod they run in.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PROC_ROOT_ENV = "MERBRIDGE_PROC_ROOT"
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux >= 5.14

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Netns:
    inode: int
    path: str               # something setns() accepts: /proc/PID/ns/net or /run/netns/NAME
    cookie: int
    ipv4: set[str] = field(default_factory=set)


def netns_cookie_of_current_thread() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _ipv4_addresses() -> set[str]:
    # psutil (getifaddrs: a netlink socket opened by this thread, so in its
    # namespace) rather than pyroute2, which cost the agent ~18 MB of RSS and
    # ~15 ms per namespace (benchmarks/agent_footprint.py).
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}


def inspect(path: str) -> Netns:
    """Cookie and IPv4 addresses of the namespace at `path`."""
    result: dict = {}

    def enter_and_read():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({path})")
            finally:
                os.close(fd)
            result["cookie"] = netns_cookie_of_current_thread()
            result["ipv4"] = _ipv4_addresses()
        except BaseException as e:  # reported to the caller's thread
            result["error"] = e

    t = threading.Thread(target=enter_and_read, name="netns-inspect")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return Netns(inode=os.stat(path).st_ino, path=path, cookie=result["cookie"], ipv4=result["ipv4"])


class NetnsIndex:
    """Pod IP -> network namespace, over every namespace on the host except
    our own (the host's: pods never live there).

    Pod IPs are unique on a node; should an IP still show up in several
    namespaces (simulated nodes sharing a host, a leftover namespace), the
    ones holding a process inside `cgroup` (the agent's --cgroup, where every
    pod's processes live) are the pod's."""

    def __init__(self, proc_root: str | None = None, bind_dirs: tuple[str, ...] = ("/run/netns",),
                 cgroup: Path | None = None):
        # In the DaemonSet the host's /proc is mounted at /host/proc (no hostPID).
        self.proc_root = proc_root or os.environ.get(PROC_ROOT_ENV, "/proc")
        self.bind_dirs = bind_dirs
        self.cgroup_rel = _cgroup_relative(cgroup) if cgroup else None
        self._by_inode: dict[int, Netns] = {}
        self._pids: dict[int, list[int]] = {}

    def _namespace_paths(self) -> dict[int, str]:
        own = os.stat("/proc/self/ns/net").st_ino   # our own namespace, seen through our /proc
        self._pids = {}
        paths: dict[int, str] = {}
        for d in self.bind_dirs:
            if os.path.isdir(d):
                for entry in os.scandir(d):
                    try:
                        paths.setdefault(os.stat(entry.path).st_ino, entry.path)
                    except OSError:
                        pass
        psutil.PROCFS_PATH = self.proc_root
        for pid in psutil.pids():
            p = f"{self.proc_root}/{pid}/ns/net"
            try:
                inode = os.stat(p).st_ino
            except OSError:
                continue  # process gone, or a kernel thread
            paths.setdefault(inode, p)
            self._pids.setdefault(inode, []).append(pid)
        paths.pop(own, None)
        return paths

    def refresh(self, reread: bool = True) -> None:
        """Rescan: new namespaces are inspected and gone ones forgotten; with
        `reread`, the addresses of known ones are read again too (an IP can be
        assigned after the namespace appears). Without it a rescan costs one
        setns per new namespace, not one per namespace on the node."""
        found: dict[int, Netns] = {}
        for inode, path in self._namespace_paths().items():
            known = self._by_inode.get(inode)
            if known is not None and known.path == path and not reread:
                found[inode] = known
                continue
            try:
                found[inode] = inspect(path)
            except Exception:  # noqa: BLE001 - vanished while we looked, or unreadable: skip this one
                continue
        self._by_inode = found

    def lookup(self, ip: str) -> Netns | None:
        matches = self.owners(ip)
        return matches[0] if len(matches) == 1 else None

    def owners(self, ip: str) -> list[Netns]:
        matches = [ns for ns in self._by_inode.values() if ip in ns.ipv4]
        if len(matches) > 1 and self.cgroup_rel is not None:
            matches = [ns for ns in matches if self._has_process_in_cgroup(ns.inode)] or matches
        return matches

    def user_namespace_maps(self, ns: Netns):
        """The uid/gid maps of the user namespace owning `ns` (read from one
        of the processes found in it), or None when the agent's own user
        namespace owns it. Raises userns.UsernsReadError."""
        from .userns import read_maps
        pids = list(self._pids.get(ns.inode, ()))
        if ns.path.startswith(f"{self.proc_root}/") and ns.path.endswith("/ns/net"):
            pid = ns.path[len(self.proc_root) + 1:-len("/ns/net")]
            if pid.isdigit() and int(pid) not in pids:
                pids.insert(0, int(pid))
        # ns.path may name a process that has exited since the scan (the pod's
        # first process need not be its pause): any path that still reaches
        # the same namespace will do, so an ordinary pod is never refused for it.
        current = self._by_inode.get(ns.inode, ns).path
        for path in dict.fromkeys([ns.path, current, *(f"{self.proc_root}/{pid}/ns/net" for pid in pids)]):
            try:
                if os.stat(path).st_ino == ns.inode:
                    return read_maps(path, pids, self.proc_root)
            except OSError:
                continue
        return read_maps(ns.path, pids, self.proc_root)   # none left: its error says which path failed

    def _has_process_in_cgroup(self, inode: int) -> bool:
        for pid in self._pids.get(inode, ()):
            try:
                with open(f"{self.proc_root}/{pid}/cgroup") as f:
                    for line in f:
                        if line.startswith("0::"):
                            path = line[3:].strip()
                            if path == self.cgroup_rel or path.startswith(self.cgroup_rel.rstrip("/") + "/"):
                                return True
            except OSError:
                continue
        return False


def _cgroup_relative(cgroup: Path) -> str:
    """/sys/fs/cgroup/unified/a/b -> /a/b, as /proc/PID/cgroup names it."""
    from .sandbox import cgroup2_root
    return "/" + str(Path(cgroup).resolve().relative_to(cgroup2_root())).lstrip(".").strip("/")
