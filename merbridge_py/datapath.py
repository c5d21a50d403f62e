"""The kernel half, driven from user space: compile the eBPF programs with bcc,
attach them to a cgroup v2 directory, pin their maps and programs under bpffs,
write per-pod state, read counters, and take everything down again.
"""

from __future__ import annotations

import ctypes as ct
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from . import kheaders, layout
from .mesh import MeshProfile

log = logging.getLogger("merbridge_py.datapath")

EBPF_DIR_ENV = "MERBRIDGE_EBPF_DIR"
HEADER = "merbridge.h"
BPF_F_ALLOW_MULTI = 2  # share the cgroup with other eBPF tools (Cilium, ...)

SPLICE_POLICIES = {p.name.lower(): p for p in layout.SplicePolicy}
# Adaptive splicing (ebpf/sockops.bpf.c): this many connections in a row from
# a pod to a destination on one leg, each shorter than this, and that pod's new
# ones to it are not spliced on that leg.
SHORT_CONNECTION_NS = 5_000_000
SHORT_STREAK = 4
SHORT_MEMORY_NS = 1_000_000_000   # ...while the last short one closed less than this ago
# Bulk detection (ebpf/sk_msg.bpf.c): a spliced socket sending more than this
# many bytes within the window goes through TCP from then on, so a fast writer
# is held back by TCP flow control instead of filling kernel memory. High on
# purpose: request/response traffic stays spliced, and the kernel's tcp_bpf
# recvmsg can wake a *blocking* reader of a socket that sends through TCP with
# EAGAIN (README, "Kernel limitations"), so as few sockets as possible switch.
BULK_BYTES = 64 << 20
BULK_WINDOW_NS = 1_000_000_000


@dataclass(frozen=True)
class Hook:
    """One program: its source file, function, and where it attaches."""

    source: str
    function: str
    prog_type: str      # name in bcc's BPFProgType
    attach_type: str    # name in bcc's BPFAttachType
    on_cgroup: bool     # False: attaches to the sockhash


CONNECT_HOOK = "sock4_connect"
HOOKS = (
    Hook("connect.bpf.c", CONNECT_HOOK, "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT", True),
    Hook("sockops.bpf.c", "sockops", "SOCK_OPS", "CGROUP_SOCK_OPS", True),
    Hook("sk_msg.bpf.c", "sk_msg_splice", "SK_MSG", "SK_MSG_VERDICT", False),
    Hook("getsockopt.bpf.c", "sockopt_original_dst", "CGROUP_SOCKOPT", "CGROUP_GETSOCKOPT", True),
)


class DatapathError(RuntimeError):
    pass


def ebpf_dir() -> Path:
    env = os.environ.get(EBPF_DIR_ENV)
    d = Path(env) if env else Path(__file__).resolve().parent.parent / "ebpf"
    if not (d / HEADER).is_file():
        raise DatapathError(f"eBPF sources not found in {d}; set {EBPF_DIR_ENV} to the repository's ebpf/ directory")
    return d


def layout_version(directory: Path | None = None) -> str:
    """Names the maps directory: agents with the same shared header share maps."""
    return hashlib.sha256((directory or ebpf_dir()).joinpath(HEADER).read_bytes()).hexdigest()[:12]


def program_text(directory: Path | None = None) -> str:
    """The exact C text compiled: the shared header, then one file per hook.
    bcc only takes programs and map rewrites from its main file, so the files
    are joined here; #line markers keep compiler errors pointing at them."""
    d = directory or ebpf_dir()
    parts = []
    for name in (HEADER,) + tuple(h.source for h in HOOKS):
        body = (d / name).read_text()
        body = re.sub(r'^#include "merbridge\.h"\s*$', "", body, flags=re.M)
        body = body.replace("#pragma once", "")
        parts.append(f'#line 1 "{d / name}"\n{body}')
    return "\n".join(parts)


# --- small pieces of the bpf(2) API bcc does not wrap -----------------------------

def _lib():
    from bcc import libbcc
    lib = libbcc.lib
    if not getattr(lib, "_merbridge_typed", False):
        # libbcc exports these (from its libbpf) but bcc's Python side does not declare them
        lib.bpf_obj_pin.argtypes, lib.bpf_obj_pin.restype = [ct.c_int, ct.c_char_p], ct.c_int
        lib.bpf_obj_get.argtypes, lib.bpf_obj_get.restype = [ct.c_char_p], ct.c_int
        lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
        lib._merbridge_typed = True
    return lib


def obj_pin(fd: int, path: Path) -> None:
    rc = _lib().bpf_obj_pin(fd, str(path).encode())
    if rc != 0:  # libbpf returns -errno
        raise DatapathError(f"cannot pin {path}: {os.strerror(-rc) if rc < 0 else 'bpf_obj_pin failed'}")


def obj_get(path: Path) -> int:
    fd = _lib().bpf_obj_get(str(path).encode())
    if fd < 0:
        raise DatapathError(f"cannot open pinned object {path}")
    return fd


def ensure_bpffs(directory: Path) -> None:
    """Make sure `directory` lives on a bpffs, mounting one at /sys/fs/bpf if
    that is not a bpffs yet (fresh machines often have none)."""
    mounts = _mounts()
    target = directory.resolve() if directory.exists() else directory
    fs = _fs_type_of(target, mounts)
    if fs == "bpf":
        directory.mkdir(parents=True, exist_ok=True)
        return
    sys_bpf = Path("/sys/fs/bpf")
    if sys_bpf in (target, *target.parents) and _fs_type_of(sys_bpf, mounts) != "bpf":
        rc = os.system("mount -t bpf bpf /sys/fs/bpf")
        if rc != 0:
            raise DatapathError("/sys/fs/bpf is not a bpffs and mounting one failed; run: mount -t bpf bpf /sys/fs/bpf")
        directory.mkdir(parents=True, exist_ok=True)
        return
    raise DatapathError(f"--bpffs {directory} is not on a bpf filesystem; use a directory under /sys/fs/bpf")


def _mounts() -> list[tuple[Path, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            out.append((Path(left.split()[4]), right.split()[0]))
    return out


def _fs_type_of(path: Path, mounts: list[tuple[Path, str]]) -> str | None:
    best, fs = None, None
    for mnt, fstype in mounts:
        if mnt == path or mnt in path.parents:
            if best is None or len(mnt.parts) >= len(best.parts):
                best, fs = mnt, fstype
    return fs


def open_cgroup(path: Path) -> int:
    root = None
    for mnt, fstype in _mounts():
        if fstype == "cgroup2":
            root = mnt
            break
    path = Path(path)
    if root is None:
        raise DatapathError("no cgroup v2 mount on this host; the datapath needs cgroup v2 "
                            "(mount -t cgroup2 none /sys/fs/cgroup/unified)")
    if not path.is_dir():
        raise DatapathError(f"cgroup {path} does not exist; pass --cgroup a cgroup v2 directory "
                            f"(cgroup v2 is mounted at {root})")
    if path.resolve() != root and root not in path.resolve().parents:
        raise DatapathError(f"cgroup {path} is not under the cgroup v2 mount {root}; pass a directory below it")
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


MODES = ("ebpf", "iptables")


class Datapath:
    """Programs, maps and pins of one agent. Use as: load(); attach(); ...; detach().

    Modes: in "ebpf" every hook runs. In "iptables" the connect hook is
    detached and nothing new is spliced, so every new connection takes
    Istio's own rules; the other hooks stay, because connections opened
    before the switch still need them (their spliced sockets, the proxy's
    SO_ORIGINAL_DST answer, the clean-up of their entries when they close).
    """

    def __init__(self, mesh: MeshProfile, cgroup: Path, bpffs_dir: Path, splice: str = "adaptive",
                 rewrite_inbound_port: bool = False, max_connections: int | None = None):
        if splice not in SPLICE_POLICIES:
            raise DatapathError(f"unknown splice policy {splice!r}; expected one of {', '.join(SPLICE_POLICIES)}")
        self.mesh = mesh
        self.cgroup = Path(cgroup)
        self.bpffs_dir = Path(bpffs_dir)
        self.splice = splice
        self.rewrite_inbound_port = rewrite_inbound_port
        self.max_connections = max_connections   # size of the per-connection maps (None: the header's)
        self.mode = "ebpf"
        self.bpf = None
        self._fns: dict[str, object] = {}
        self._cgroup_fd: int | None = None
        self._sockhash_fd: int | None = None
        self.attached = False
        self._pinned = False   # the program pins under bpffs_dir are ours (not a predecessor's)
        self._pins_complete = False
        self.maps_dir = self.bpffs_dir / f"maps-{layout_version()}"
        self.adopted_maps = False     # the maps were a predecessor's, taken over
        self._created_maps_dir = False

    # --- lifecycle ----------------------------------------------------------------

    def load(self) -> None:
        headers = kheaders.find()
        headers.apply()
        log.info("compiling eBPF programs against kernel headers: %s", headers.description)
        from bcc import BPF, BPFAttachType, BPFProgType
        # bcc creates the maps pinned under maps_dir, or reuses those it finds there.
        ensure_bpffs(self.bpffs_dir)
        self.adopted_maps = self.maps_dir.is_dir() and any(self.maps_dir.iterdir())
        self._created_maps_dir = not self.maps_dir.exists()
        self.maps_dir.mkdir(parents=True, exist_ok=True)
        if self.adopted_maps:
            log.info("taking over the maps a previous agent left in %s", self.maps_dir)
        try:
            self.bpf = BPF(text=program_text().encode(),
                           cflags=self.mesh.cflags() + [f'-DMB_MAPS_DIR="{self.maps_dir}"']
                           + ([f"-DMAX_CONNECTIONS={int(self.max_connections)}"] if self.max_connections else []))
            for hook in HOOKS:
                self._fns[hook.function] = self.bpf.load_func(
                    hook.function.encode(), getattr(BPFProgType, hook.prog_type),
                    attach_type=getattr(BPFAttachType, hook.attach_type))
        except Exception as e:  # bcc raises a bare Exception after printing clang's or the verifier's errors
            self._forget_fresh_maps()
            raise DatapathError(f"compiling or loading the eBPF programs failed: {e}") from e
        self._sockhash_fd = _lib().bpf_table_fd(self.bpf.module, b"sock_pairs")
        self._write_config()

    def attach(self) -> None:
        """Attach to the cgroup (next to any other tool's programs), replacing a
        crashed predecessor's programs if its pins are still there, and pin."""
        from bcc import BPFAttachType
        ensure_bpffs(self.bpffs_dir)
        self._cgroup_fd = open_cgroup(self.cgroup)
        stale = self._stale_programs()
        self.bpf.attach_func(self._fns["sk_msg_splice"], self._sockhash_fd, BPFAttachType.SK_MSG_VERDICT)
        for hook in HOOKS:
            if hook.on_cgroup and (self.mode == "ebpf" or hook.function != CONNECT_HOOK):
                self.bpf.attach_func(self._fns[hook.function], self._cgroup_fd,
                                     getattr(BPFAttachType, hook.attach_type), BPF_F_ALLOW_MULTI)
        self.attached = True
        # Only now that ours run, take the predecessor's off: no gap in between.
        for prog_fd, attach_type in stale:
            _lib().bpf_prog_detach2(prog_fd, self._cgroup_fd, attach_type)
            os.close(prog_fd)
        if stale:
            log.info("replaced %d programs left attached by a previous agent", len(stale))
        self._unpin_programs()
        self._remove_other_maps_dirs()
        self._pinned = True          # from here on the pins under bpffs_dir are ours to remove
        self._pin_programs()
        self._pins_complete = True

    def detach(self, drain_seconds: float = 0.0) -> None:
        """Detach every program and remove every pin. Safe to call twice.

        With `drain_seconds`, the connect hook goes first and the others a
        little later: connections it has just redirected, still waiting in a
        proxy's accept queue, get their SO_ORIGINAL_DST answer meanwhile."""
        from bcc import BPFAttachType
        if self.attached and self._cgroup_fd is not None and drain_seconds > 0 and self.mode == "ebpf":
            self.set_mode("iptables")
            time.sleep(drain_seconds)
        if self.attached and self._cgroup_fd is not None:
            for hook in HOOKS:
                if hook.on_cgroup and (self.mode == "ebpf" or hook.function != CONNECT_HOOK):
                    try:
                        self.bpf.detach_func(self._fns[hook.function], self._cgroup_fd,
                                             getattr(BPFAttachType, hook.attach_type))
                    except Exception as e:
                        log.error("detaching %s: %s", hook.function, e)
            try:
                self.bpf.detach_func(self._fns["sk_msg_splice"], self._sockhash_fd, BPFAttachType.SK_MSG_VERDICT)
            except Exception as e:
                log.error("detaching sk_msg_splice: %s", e)
            self.attached = False
        # Only our own pins: before attach() the pins are a crashed predecessor's,
        # the one handle a later agent has to find and detach its programs.
        self._pins_complete = False
        if self._pinned:
            self._unpin_all()
            self._pinned = False
        else:
            self._forget_fresh_maps()
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None

    @property
    def serving(self) -> bool:
        """Attached and pinned: what readiness means. attach() sets `attached`
        as soon as a program is on the cgroup (so a failure later still
        detaches it), and pins last."""
        return self.attached and self._pins_complete

    def close(self, drain_seconds: float = 0.0) -> None:
        self.detach(drain_seconds)
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    # --- pins ------------------------------------------------------------------------
    # Layout: <bpffs>/maps-<layout version>/<map> (pinned by bcc at load, see
    # merbridge.h) and <bpffs>/progs/<function>__<attach type number> (bpffs
    # refuses names with a dot). The attach type in the name lets a successor
    # detach these programs without knowing which version of us pinned them.

    def _pin_programs(self) -> None:
        from bcc import BPFAttachType
        progs_dir = self.bpffs_dir / "progs"
        progs_dir.mkdir(parents=True, exist_ok=True)
        for hook in HOOKS:
            if hook.on_cgroup:
                attach_type = int(getattr(BPFAttachType, hook.attach_type))
                obj_pin(self._fns[hook.function].fd, progs_dir / f"{hook.function}__{attach_type}")

    def _stale_programs(self) -> list[tuple[int, int]]:
        progs_dir = self.bpffs_dir / "progs"
        stale = []
        if progs_dir.is_dir():
            for pin in progs_dir.iterdir():
                try:
                    attach_type = int(pin.name.rsplit("__", 1)[1])
                    stale.append((obj_get(pin), attach_type))
                except (IndexError, ValueError, DatapathError) as e:
                    log.warning("ignoring unexpected pin %s: %s", pin, e)
        return stale

    def _unpin_programs(self) -> None:
        shutil.rmtree(self.bpffs_dir / "progs", ignore_errors=True)

    def _remove_other_maps_dirs(self) -> None:
        """Maps of another layout, left by an agent of another version: their
        programs are detached by now, nobody will take them over."""
        for d in self.bpffs_dir.glob("maps-*"):
            if d != self.maps_dir:
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed maps of another datapath version: %s", d)

    def _forget_fresh_maps(self) -> None:
        """A start that failed before attaching leaves a predecessor's maps for
        the next agent, but not maps it created itself."""
        if self._created_maps_dir:
            shutil.rmtree(self.maps_dir, ignore_errors=True)
            self._created_maps_dir = False
            self._remove_empty_bpffs_dir()

    def _unpin_all(self) -> None:
        self._unpin_programs()
        for d in self.bpffs_dir.glob("maps-*"):
            shutil.rmtree(d, ignore_errors=True)
        self._remove_empty_bpffs_dir()

    def _remove_empty_bpffs_dir(self) -> None:
        try:
            self.bpffs_dir.rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise

    def set_mode(self, mode: str) -> None:
        """Switch between "ebpf" and "iptables" (see the class comment). New
        connections take the new path; established ones are not disturbed."""
        from bcc import BPFAttachType
        if mode not in MODES:
            raise DatapathError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == self.mode:
            return
        connect = self._fns[CONNECT_HOOK]
        attach_type = BPFAttachType.CGROUP_INET4_CONNECT
        if mode == "iptables":
            if self.attached:
                self.bpf.detach_func(connect, self._cgroup_fd, attach_type)
            self.mode = mode
            self._write_config()
        else:
            self.mode = mode
            self._write_config()
            if self.attached:
                self.bpf.attach_func(connect, self._cgroup_fd, attach_type, BPF_F_ALLOW_MULTI)
        log.info("datapath mode is now %s", mode)

    # --- state ----------------------------------------------------------------------

    def _write_config(self) -> None:
        policy = SPLICE_POLICIES[self.splice] if self.mode == "ebpf" else layout.SplicePolicy.NEVER
        self.bpf[b"config"][ct.c_int(0)] = layout.DatapathConfig(
            splice=policy, rewrite_inbound_port=int(self.rewrite_inbound_port),
            short_conn_ns=SHORT_CONNECTION_NS, short_streak=SHORT_STREAK,
            bulk_bytes=BULK_BYTES, bulk_window_ns=BULK_WINDOW_NS, short_memory_ns=SHORT_MEMORY_NS)

    def set_pod(self, netns_cookie: int, pod_ip: str, outbound, inbound) -> None:
        """Write one pod's policy. `outbound`/`inbound` are compiled first-match
        rule lists (merbridge_py.policy.compile_rules); the caller has checked
        they fit (a policy that does not fit is never truncated)."""
        if len(outbound) > layout.MAX_OUTBOUND_RULES or len(inbound) > layout.MAX_INBOUND_RULES:
            raise DatapathError(f"policy of {pod_ip} does not fit the datapath's rule tables")
        value = layout.PodPolicyValue()
        value.pod_ip = ip_to_net(pod_ip)
        value.n_outbound, value.n_inbound = len(outbound), len(inbound)
        for slot, rule in zip(value.outbound, outbound):
            slot.addr = ip_to_net(str(rule.network.network_address))
            slot.mask = ip_to_net(str(rule.network.netmask))
            slot.port, slot.capture = rule.port, int(rule.capture)
        for slot, rule in zip(value.inbound, inbound):
            slot.port, slot.capture = rule.port, int(rule.capture)
        # policy first, then the IP index: a reader never finds an IP without its policy
        self.bpf[b"pod_policy"][ct.c_uint64(netns_cookie)] = value
        self.bpf[b"local_pod_ip"][ct.c_uint32(value.pod_ip)] = ct.c_uint64(netns_cookie)

    def remove_pod(self, netns_cookie: int, pod_ip: str) -> None:
        for table, key in (("local_pod_ip", ct.c_uint32(ip_to_net(pod_ip))),
                           ("pod_policy", ct.c_uint64(netns_cookie))):
            try:
                del self.bpf[table.encode()][key]
            except KeyError:
                pass

    def pod_entries(self) -> list[tuple[int, str]]:
        """(netns cookie, pod IP) of every pod in the maps: after a takeover,
        also pods only the previous agent knew."""
        out = []
        for key, value in self.bpf[b"pod_policy"].items():
            out.append((int(key.value), socket.inet_ntoa(int(value.pod_ip).to_bytes(4, "little"))))
        return out

    def counters(self) -> dict[str, int]:
        table = self.bpf[b"counters"]
        return {c.name.lower(): int(sum(table[ct.c_int(c.value)])) for c in layout.Counter}

    def map_sizes(self) -> dict[str, int]:
        sizes = {name: sum(1 for _ in self.bpf[name.encode()].keys()) for name in
                 ("pod_policy", "local_pod_ip", "connect_original_dst", "original_dst")}
        sizes["sock_pairs"] = sockhash_size(self._sockhash_fd)
        return sizes


def ip_to_net(ip: str) -> int:
    """IPv4 text -> the u32 whose memory holds the address in network order."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def sockhash_size(fd: int) -> int:
    """Count sockhash keys with bpf_get_next_key: bcc cannot wrap a sockhash."""
    lib = _lib()
    key, next_key = (ct.c_char * ct.sizeof(layout.SockTuple))(), (ct.c_char * ct.sizeof(layout.SockTuple))()
    n, first = 0, True
    while lib.bpf_get_next_key(fd, None if first else ct.byref(key), ct.byref(next_key)) == 0:
        n += 1
        first = False
        ct.memmove(key, next_key, ct.sizeof(key))
    return n


def attached_program_ids(cgroup: Path) -> dict[str, list[int]]:
    """IDs of programs attached directly to `cgroup`, per hook we use: what
    `bpftool cgroup show` would list, without needing bpftool."""
    from bcc import BPFAttachType
    lib = _lib()
    lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                   ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
    fd = open_cgroup(cgroup)
    try:
        out = {}
        for hook in HOOKS:
            if not hook.on_cgroup:
                continue
            ids = (ct.c_uint32 * 64)()
            count, flags = ct.c_uint32(64), ct.c_uint32(0)
            rc = lib.bpf_prog_query(fd, int(getattr(BPFAttachType, hook.attach_type)), 0,
                                    ct.byref(flags), ids, ct.byref(count))
            if rc != 0:
                raise DatapathError(f"querying programs on {cgroup}: {os.strerror(-rc) if rc < 0 else rc}")
            out[hook.attach_type] = list(ids[: count.value])
        return out
    finally:
        os.close(fd)
