"""Read the id maps of the user namespace that owns a pod's network namespace
(policy/userns.py decides from them).

The owner is what Istio's owner match interprets uids in, so it is asked of
the network namespace itself (ioctl NS_GET_USERNS), not of whichever process
happens to be in it: a process that only joined the network namespace (an
`ip netns exec` from the host) keeps the host's user namespace. The maps are
then read from a process of the pod's that lives in the owner: its
/proc/PID/uid_map shows outside ids as the agent's namespace sees them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable

from merbridge_py.policy.userns import UsernsMaps

NS_GET_USERNS = 0xB701     # _IO(0xb7, 0x1), linux/nsfs.h (Linux >= 4.9)


class UsernsReadError(OSError):
    """The owner's maps could not be read (no process of the pod lives in it,
    or it vanished while we looked); the pod is retried."""


def owner_inode(netns_path: str) -> int:
    """Inode of the user namespace that owns the network namespace at `netns_path`."""
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        userns_fd = fcntl.ioctl(fd, NS_GET_USERNS)
    finally:
        os.close(fd)
    try:
        return os.fstat(userns_fd).st_ino
    finally:
        os.close(userns_fd)


def _user_ns_inode(proc: str) -> int | None:
    try:
        return os.stat(f"{proc}/ns/user").st_ino
    except OSError:
        return None


def pids_in_netns(netns_path: str, proc_root: str = "/proc") -> list[int]:
    """Processes in the network namespace at `netns_path` (a one-off scan, for
    inspect-pod; the agent's namespace index already knows them)."""
    target = os.stat(netns_path).st_ino
    found = []
    for entry in os.scandir(proc_root):
        if entry.name.isdigit():
            try:
                if os.stat(f"{entry.path}/ns/net").st_ino == target:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def read_maps(netns_path: str, pids: Iterable[int], proc_root: str = "/proc") -> UsernsMaps | None:
    """The maps of the pod's user namespace, or None when the agent's own user
    namespace owns the network namespace (ids as written: every pod that is
    not user-namespaced). `pids` are the processes found in the network
    namespace. Raises UsernsReadError."""
    try:
        owner = owner_inode(netns_path)
    except OSError as e:
        raise UsernsReadError(e.errno, f"asking {netns_path} for its user namespace failed: {e.strerror or e}") \
            from None
    if owner == _user_ns_inode("/proc/self"):
        return None
    for pid in pids:
        proc = f"{proc_root}/{pid}"
        if _user_ns_inode(proc) != owner:
            continue
        try:
            with open(f"{proc}/uid_map") as f:
                uid_map = f.read()
            with open(f"{proc}/gid_map") as f:
                gid_map = f.read()
        except OSError:
            continue        # exited: try the next one
        if _user_ns_inode(proc) == owner:    # still the same process (pids are reused)
            return UsernsMaps(uid_map, gid_map, f"user namespace {owner}, maps of pid {pid}")
    raise UsernsReadError(f"no process of the pod lives in its user namespace {owner} (its network namespace "
                          f"{netns_path}'s owner), so its uid/gid maps cannot be read")
