"""The kernel half, driven from user space: have the programs compiled and
loaded with bcc in a child process (merbridge_py/loader.py), attach them to a
cgroup v2 directory, pin them under bpffs, write per-pod state, read counters,
and take everything down again, all through bpf(2) on the pinned objects.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import bpf_syscall, layout
from .mesh import MeshProfile

log = logging.getLogger("merbridge_py.datapath")

EBPF_DIR_ENV = "MERBRIDGE_EBPF_DIR"
HEADER = "merbridge.h"

SPLICE_POLICIES = {p.name.lower(): p for p in layout.SplicePolicy}
# Adaptive splicing (ebpf/sockops.bpf.c): this many connections in a row from
# a pod to a destination on one leg, each short (its client end sent fewer than
# SHORT_MESSAGES messages: one request, also over Envoy's mTLS, where the client
# end of a one-request connection sent 4: its two handshake flights, the request
# and, presumably, the TLS close; measured by
# tests/test_testbed_http_sidecar.py::test_one_request_connections_are_short_on_every_leg_also_over_mtls,
# which fails with 4 here), and that pod's new ones to it are not spliced on that leg.
SHORT_MESSAGES = 5
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
# Tests (and kernels in slow virtual machines, where nothing reaches 64 MiB/s)
# lower the threshold to reach the bulk path on purpose (docs/kernel-behaviour.md).
BULK_BYTES_ENV = "MERBRIDGE_BULK_BYTES"
# Backpressure (ebpf/sk_msg.bpf.c): a spliced socket whose peer holds more than
# this many redirected bytes unread sends through TCP from then on, whatever
# its rate. TCP would let a stalled reader hold its receive buffer (up to
# tcp_rmem's 6 MiB by default) plus the writer's send buffer; this adds at most
# this much per spliced leg, and a reader that keeps up never gets near it.
BACKLOG_BYTES = 2 << 20
BACKLOG_BYTES_ENV = "MERBRIDGE_BACKLOG_BYTES"   # 0: no limit (as before backpressure)
# The reader's side of that count: a reader hook (READER_HOOKS below: fexit on
# the recvmsg of sockets in a sockmap, else the sock_recv_length tracepoint),
# compiled as a module of its own so a kernel that takes neither still runs
# everything else.
# What the agent does where the kernel takes neither (a kernel before 6.4 that
# refuses fexit, e.g. under kernel lockdown), MERBRIDGE_BACKLOG_FALLBACK:
#   "budget" (default): keep the limit; nothing is ever counted as read, so
#     every spliced socket goes to TCP after BACKLOG_BYTES: bounded at any
#     writer rate, as TCP is (issue 20: an app or operator must not tell us
#     from iptables, and a stalled consumer filling the node's TCP memory is
#     the reliability failure that matters most), but long-lived connections
#     lose splicing once they have sent BACKLOG_BYTES;
#   "bulk" (opt-in): no backlog limit, and bulk detection from
#     FALLBACK_BULK_BYTES per window: writers faster than that are held back,
#     slower ones not (measured: 4.7 times iptables' accepted bytes at 1 MiB/s
#     into a stalled reader, benchmarks/results/backpressure/), and long-lived
#     connections stay spliced.
BACKLOG_FALLBACK_ENV = "MERBRIDGE_BACKLOG_FALLBACK"
BACKLOG_FALLBACKS = ("budget", "bulk")     # the first is the default
FALLBACK_BULK_BYTES = 8 << 20


@dataclass(frozen=True)
class ReaderHook:
    """One way of counting what spliced sockets' readers take (backpressure):
    its source (compiled with READER_PROGRESS_HEADER), its programs as bcc
    names them, bcc's program type for them, and what attaching one needs
    (a tracepoint's name, or None: the kernel function it was loaded for)."""

    kind: str
    source: str
    programs: tuple[str, ...]
    prog_type: str      # name in bcc's BPF (TRACING, RAW_TRACEPOINT)
    tracepoint: str | None = None


READER_PROGRESS_HEADER = "reader_progress.h"
# Tried in this order by the loader, which pins the first one the kernel takes;
# never both (a read would count twice). fexit runs only on sockets in a
# sockmap; the tracepoint on every socket read of the node, but loads where
# fexit is refused (ebpf/sock_recv_length.bpf.c).
READER_HOOKS = (
    ReaderHook("fexit on tcp_bpf_recvmsg", "tcp_bpf_recvmsg.bpf.c",
               ("kretfunc__tcp_bpf_recvmsg", "kretfunc__tcp_bpf_recvmsg_parser"), "TRACING"),
    ReaderHook("tracepoint sock_recv_length", "sock_recv_length.bpf.c",
               ("raw_tracepoint__sock_recv_length",), "RAW_TRACEPOINT", tracepoint="sock_recv_length"),
)
READER_PROGRAMS = {name: hook for hook in READER_HOOKS for name in hook.programs}


@dataclass(frozen=True)
class Hook:
    """One program: its source file, function, and where it attaches."""

    source: str
    function: str
    prog_type: str      # name in bcc's BPFProgType (the loader's business)
    attach_type: str    # name in bcc's BPFAttachType and bpf_syscall.AttachType
    on_cgroup: bool     # False: attaches to the sockhash

    @property
    def attach_type_number(self) -> int:
        return int(bpf_syscall.AttachType[self.attach_type])


# The hooks a mode switch takes off and puts back: the ones that redirect.
# connect4 for AF_INET sockets, connect6 for AF_INET6 ones (IPv6 and
# v4-mapped IPv4 destinations); both also dispatch captured DNS (TCP and
# connected UDP to port 53) before anything else, so there is one program per
# connect hook. sendmsg4/6 redirect unconnected UDP DNS. recvmsg and
# getpeername only rewrite what a redirected socket shows, so they stay (a
# connection rewritten before a switch to iptables keeps its peer name).
CONNECT_HOOKS = ("sock4_connect", "sock6_connect")
DNS_SENDMSG_HOOKS = ("dns_sendmsg4", "dns_sendmsg6")
REDIRECT_HOOKS = CONNECT_HOOKS + DNS_SENDMSG_HOOKS
HOOKS = (
    Hook("connect.bpf.c", "sock4_connect", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT", True),
    Hook("connect.bpf.c", "sock6_connect", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT", True),
    Hook("sockops.bpf.c", "sockops", "SOCK_OPS", "CGROUP_SOCK_OPS", True),
    Hook("sk_msg.bpf.c", "sk_msg_splice", "SK_MSG", "SK_MSG_VERDICT", False),
    # attached to the sockhash only when the kernel probe asks for it (kernel_probes.SPLICE_STREAM_VERDICT)
    Hook("sk_skb.bpf.c", "sk_skb_stream_verdict", "SK_SKB", "SK_SKB_STREAM_VERDICT", False),
    Hook("getsockopt.bpf.c", "sockopt_original_dst", "CGROUP_SOCKOPT", "CGROUP_GETSOCKOPT", True),
    # DNS capture (issue 14); TCP and connected UDP DNS are dispatched from the
    # connect hooks above, sendmsg redirects, so it follows the mode as connect does
    Hook("dns_sendmsg.bpf.c", "dns_sendmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG", True),
    Hook("dns_recvmsg.bpf.c", "dns_recvmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG", True),
    Hook("dns_inet6.bpf.c", "dns_sendmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG", True),
    Hook("dns_inet6.bpf.c", "dns_recvmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG", True),
    # What a rewritten socket shows as its peer: the destination it asked for
    # (the mesh's redirects and DNS capture alike, one program per hook)
    Hook("getpeername.bpf.c", "sock4_getpeername", "CGROUP_SOCK_ADDR", "CGROUP_INET4_GETPEERNAME", True),
    Hook("getpeername.bpf.c", "sock6_getpeername", "CGROUP_SOCK_ADDR", "CGROUP_INET6_GETPEERNAME", True),
)
SK_MSG_HOOK = next(h for h in HOOKS if h.function == "sk_msg_splice")
SK_SKB_HOOK = next(h for h in HOOKS if h.function == "sk_skb_stream_verdict")


class DatapathError(RuntimeError):
    pass


@dataclass
class PodEntries:
    """Pod entries of the maps, as the audit compares them: pod_policy and
    dns_policy (netns cookie -> value bytes) and local_pod_ip (address text ->
    netns cookie)."""

    policies: dict
    ips: dict
    dns: dict


def ebpf_dir() -> Path:
    env = os.environ.get(EBPF_DIR_ENV)
    d = Path(env) if env else Path(__file__).resolve().parent.parent / "ebpf"
    if not (d / HEADER).is_file():
        raise DatapathError(f"eBPF sources not found in {d}; set {EBPF_DIR_ENV} to the repository's ebpf/ directory")
    return d


def layout_version(directory: Path | None = None) -> str:
    """Names the maps directory: agents with the same shared header share maps."""
    return hashlib.sha256((directory or ebpf_dir()).joinpath(HEADER).read_bytes()).hexdigest()[:12]


def program_text(directory: Path | None = None, sources: tuple[str, ...] | None = None) -> str:
    """The exact C text compiled: the shared header, then one file per hook
    (or `sources`: a reader hook's, READER_HOOKS). bcc only takes
    programs and map rewrites from its main file, so the files are joined
    here; #line markers keep compiler errors pointing at them."""
    d = directory or ebpf_dir()
    parts = []
    if sources is None:
        sources = tuple(dict.fromkeys(h.source for h in HOOKS))   # a file may hold several hooks
    for name in (HEADER,) + sources:
        body = (d / name).read_text()
        body = re.sub(r'^#include "(merbridge\.h|reader_progress\.h)"\s*$', "", body, flags=re.M)
        body = body.replace("#pragma once", "")
        parts.append(f'#line 1 "{d / name}"\n{body}')
    return "\n".join(parts)


# --- pins --------------------------------------------------------------------------

def obj_pin(fd: int, path: Path) -> None:
    try:
        bpf_syscall.obj_pin(fd, path)
    except OSError as e:
        raise DatapathError(f"cannot pin {path}: {e.strerror}") from None


def obj_get(path: Path) -> int:
    try:
        return bpf_syscall.obj_get(path)
    except OSError as e:
        raise DatapathError(f"cannot open pinned object {path}: {e.strerror}") from None


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
MODE_RECORD_PIN = "agent_mode"   # under the bpffs dir: the node's persisted mode (agent/mode.py)


class LoadedObjects:
    """File descriptors of one load: the programs (by function) and the maps
    (by name, opened from their pins), all released by close()."""

    def __init__(self, progs: dict[str, int], maps: dict[str, bpf_syscall.Map], sockhash_fd: int):
        self.progs, self.maps, self.sockhash_fd = progs, maps, sockhash_fd

    def __getitem__(self, name: str) -> bpf_syscall.Map:
        return self.maps[name]

    def close(self) -> None:
        for fd in [*self.progs.values(), self.sockhash_fd]:
            if fd >= 0:
                os.close(fd)
        for m in self.maps.values():
            m.close()
        self.progs, self.maps, self.sockhash_fd = {}, {}, -1


class Datapath:
    """Programs, maps and pins of one agent. Use as: load(); attach(); ...; detach().

    Modes: in "ebpf" every hook runs. In "iptables" the connect hook is
    detached and nothing new is spliced, so every new connection takes
    Istio's own rules; the other hooks stay, because connections opened
    before the switch still need them (their spliced sockets, the proxy's
    SO_ORIGINAL_DST answer, the clean-up of their entries when they close).

    Compiling is the loader child's job (merbridge_py/loader.py); this
    process only holds file descriptors and talks bpf(2), so it never maps
    bcc's LLVM.
    """

    def __init__(self, mesh: MeshProfile, cgroup: Path, bpffs_dir: Path, splice: str = "adaptive",
                 rewrite_inbound_port: bool = False, max_connections: int | None = None,
                 kernel=None):
        if splice not in SPLICE_POLICIES:
            raise DatapathError(f"unknown splice policy {splice!r}; expected one of {', '.join(SPLICE_POLICIES)}")
        # What the kernel probes found and the splice mode picked from it
        # (kernel_probes.KernelBehaviour); None: sk_msg only, as before probes.
        self.kernel = kernel
        self.mesh = mesh
        self.cgroup = Path(cgroup)
        self.bpffs_dir = Path(bpffs_dir)
        self.splice = splice
        self.rewrite_inbound_port = rewrite_inbound_port
        self.max_connections = max_connections   # size of the per-connection maps (None: the header's)
        self.mode = "ebpf"
        self.bpf: LoadedObjects | None = None
        self.loader_result: dict = {}     # what the loader child reported (timings, its peak RSS)
        self._cgroup_fd: int | None = None
        self.attached = False
        self._pinned = False   # the program pins under bpffs_dir are ours (not a predecessor's)
        self._pins_complete = False
        # Maps of another size are another layout: never adopt them.
        size = f"-c{int(max_connections)}" if max_connections else ""
        self.maps_dir = self.bpffs_dir / f"maps-{layout_version()}{size}"
        self.adopted_maps = False     # the maps were a predecessor's, taken over
        self._created_maps_dir = False
        # Backpressure's reader side (READER_HOOKS): fds of the loaded
        # programs, of their links once attached, and why not, when not.
        self.tracing_progs: dict[str, int] = {}
        self.tracing_links: list[int] = []
        self.tracing_error: str | None = None

    # --- lifecycle ----------------------------------------------------------------

    def compile_flags(self) -> list[str]:
        """-D defines for the compiler (the loader adds the maps directory)."""
        return self.mesh.cflags() + ([f"-DMAX_CONNECTIONS={int(self.max_connections)}"] if self.max_connections else [])

    def load(self) -> None:
        ensure_bpffs(self.bpffs_dir)
        # bcc (in the loader) creates the maps pinned under maps_dir, or reuses those it finds there.
        self.adopted_maps = self.maps_dir.is_dir() and any(self.maps_dir.iterdir())
        self._created_maps_dir = not self.maps_dir.exists()
        self.maps_dir.mkdir(parents=True, exist_ok=True)
        if self.adopted_maps:
            log.info("taking over the maps a previous agent left in %s", self.maps_dir)
        staging = self.bpffs_dir / LOADER_PIN_DIR
        shutil.rmtree(staging, ignore_errors=True)   # a loader's whose agent died before taking them
        try:
            self.loader_result = run_loader(self.maps_dir, staging, self.compile_flags(),
                                            reader_hook=self.reader_hook_needed)
            progs = {}
            try:
                for hook in HOOKS:
                    progs[hook.function] = obj_get(staging / hook.function)
                self.tracing_error = self.loader_result.get("tracing_error")
                for name in self.loader_result.get("tracing_programs", []):
                    self.tracing_progs[name] = obj_get(staging / name)
            except DatapathError:
                for fd in [*progs.values(), *self.tracing_progs.values()]:
                    os.close(fd)
                self.tracing_progs = {}
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)   # the fds keep the programs loaded now
            self.bpf = _open_maps(self.maps_dir, progs)
            if self.adopted_maps:
                self._credit_reads_while_no_agent_ran()
        except DatapathError:
            self._forget_fresh_maps()
            raise
        log.info("eBPF programs loaded by the loader child in %.2f s (compiled %.2f s against %s; "
                 "its peak RSS %d MB)", self.loader_result.get("elapsed", 0), self.loader_result.get("seconds", 0),
                 self.loader_result.get("headers", "?"), self.loader_result.get("peak_rss_kb", 0) // 1024)
        self._write_config()

    def _credit_reads_while_no_agent_ran(self) -> None:
        """The reader hook ends with the agent that attached it, while sk_msg
        keeps counting redirected bytes: reads done between two agents were
        never counted, so every spliced socket would look that much further
        behind and go to TCP early. Count everything redirected so far as read
        (each entry's consumed raised to its redirected): the limit errs late,
        by at most what was really unread at the restart, never early.
        Racing senders' additions to redirected may be lost in the rewrite;
        that too errs late, by one message per socket."""
        backlogs = self.bpf["peer_backlogs"]
        credited = 0
        for key, backlog in list(backlogs.items()):
            if backlog.consumed >= backlog.redirected:
                continue
            try:
                backlogs.update(key, layout.PeerBacklog(redirected=backlog.redirected, consumed=backlog.redirected),
                                bpf_syscall.BPF_EXIST)
            except OSError as e:
                if e.errno != errno.ENOENT:   # ENOENT: gone meanwhile (its socket closed, or LRU)
                    # not fatal: those sockets only go to TCP early, as before this credit
                    log.warning("crediting reads in peer_backlogs: %s", e.strerror)
                    return
                continue
            credited += 1
        if credited:
            log.info("counted as read what %d spliced sockets received while no agent ran", credited)

    def attach(self) -> None:
        """Attach to the cgroup (next to any other tool's programs), replacing a
        crashed predecessor's programs if its pins are still there, and pin."""
        ensure_bpffs(self.bpffs_dir)
        self._cgroup_fd = open_cgroup(self.cgroup)
        stale = self._stale_programs()
        # Set before the first attach: if a later one fails, detach() still takes
        # off those already attached (nothing pins them yet, so `cleanup` could
        # not find them).
        self.attached = True
        try:
            # A sockhash has one sk_msg program: this replaces a predecessor's on adopted maps.
            self._attach(self.bpf.sockhash_fd, SK_MSG_HOOK, 0)
            if self.stream_verdict:
                self._attach(self.bpf.sockhash_fd, SK_SKB_HOOK, 0)
            for hook in HOOKS:
                if hook.on_cgroup and (self.mode == "ebpf" or hook.function not in REDIRECT_HOOKS):
                    self._attach(self._cgroup_fd, hook, bpf_syscall.BPF_F_ALLOW_MULTI)
        except BaseException:
            for prog_fd, _ in stale:
                os.close(prog_fd)
            raise
        # Only now that ours run, take the predecessor's off: no gap in between.
        for prog_fd, attach_type in stale:
            try:
                bpf_syscall.prog_detach(self._cgroup_fd, prog_fd, attach_type)
            except OSError as e:   # e.g. not attached any more
                log.warning("detaching a previous agent's program: %s", e)
            os.close(prog_fd)
        if stale:
            log.info("replaced %d programs left attached by a previous agent", len(stale))
        if self._counts_readers():
            self._attach_tracing()
        self._unpin_programs()
        self._remove_other_maps_dirs()
        self._pinned = True          # from here on the pins under bpffs_dir are ours to remove
        self._pin_programs()
        self._pins_complete = True

    def _counts_readers(self) -> bool:
        """Whether backpressure's reader hook should run: only while this node
        splices under a backlog limit. In iptables mode (and where no reader
        hook is needed, why_no_reader_hook) it would only cost: the tracepoint
        runs on every socket read of the node. Sockets spliced before a switch
        to iptables keep their backlog limit; with their reads no longer
        counted they go to TCP sooner, never later."""
        return self.mode == "ebpf" and self.reader_hook_needed

    @property
    def reader_hook_needed(self) -> bool:
        """False where nothing would use a reader hook (why_no_reader_hook):
        nothing there changes while the agent runs, so the loader does not
        compile one."""
        return self.no_reader_hook_reason is None

    @property
    def no_reader_hook_reason(self) -> str | None:
        return why_no_reader_hook(self.kernel.splice_mode if self.kernel is not None else None, self.splice)

    def _attach_tracing(self) -> None:
        """Attach backpressure's reader side, all or none; a failure is not
        fatal (see READER_HOOKS) but said in status, doctor and a metric."""
        if self.tracing_links:
            return
        try:
            for name, fd in self.tracing_progs.items():
                self.tracing_links.append(bpf_syscall.tracing_attach(fd, name, READER_PROGRAMS[name].tracepoint))
        except OSError as e:
            self._detach_tracing()
            self.tracing_error = f"attaching {e}"
            self._write_config()   # the fallback's limits
        else:
            if self.tracing_error and self.tracing_links:
                # An error with links attached came from an earlier attach (e.g. before a switch
                # to iptables): the loader's means no reader program loaded, so none could
                # attach. This one worked: readers' progress is counted again, the fallback's
                # limits go.
                self.tracing_error = None
                self._write_config()
                log.info("backpressure counts what readers take again (%s)", self.backlog_tracing)
        if self.tracing_error:
            log.warning("backpressure cannot count what readers take (%s); %s", self.tracing_error,
                        self.backlog_fallback_text())

    def _detach_tracing(self) -> None:
        for fd in self.tracing_links:
            os.close(fd)
        self.tracing_links = []

    @property
    def backlog_tracing(self) -> str:
        """"attached: <which reader hook>", "not attached" (before attach, after detach),
        "not needed: <why, from why_no_reader_hook>" or
        "unavailable: <why>; <what the agent does instead>"."""
        no_reader_hook = self.no_reader_hook_reason
        if no_reader_hook:
            return f"not needed: {no_reader_hook}"
        if self.tracing_error:
            return f"unavailable: {self.tracing_error}; {self.backlog_fallback_text()}"
        if not self.tracing_links:
            return "not attached"
        kinds = sorted({READER_PROGRAMS[name].kind for name in self.tracing_progs})
        return f"attached: {', '.join(kinds)}"

    def backlog_limits(self) -> tuple[int, int]:
        """(backlog_bytes, bulk_bytes) for the config map: the settings, or
        the fallback's where readers' progress cannot be counted."""
        backlog, bulk = backlog_bytes(), bulk_bytes()
        if backlog and self.tracing_error and backlog_fallback() == "bulk":
            return 0, min(bulk, FALLBACK_BULK_BYTES)
        return backlog, bulk

    def backlog_fallback_text(self) -> str:
        backlog, bulk = self.backlog_limits()
        if backlog:
            return f"fallback budget: every spliced socket goes to TCP after {backlog} bytes"
        return (f"fallback bulk: no backlog limit; spliced sockets sending more than {bulk} bytes within "
                f"{BULK_WINDOW_NS / 1e9:g} s go to TCP (slower writers are not held back)")

    def _attach(self, target_fd: int, hook: "Hook", flags: int) -> None:
        try:
            bpf_syscall.prog_attach(target_fd, self.bpf.progs[hook.function], hook.attach_type_number, flags)
        except OSError as e:
            raise DatapathError(f"attaching {hook.function}: {e.strerror}") from None

    def _detach(self, target_fd: int, hook: "Hook") -> None:
        bpf_syscall.prog_detach(target_fd, self.bpf.progs[hook.function], hook.attach_type_number)

    def detach(self, drain_seconds: float = 0.0) -> None:
        """Detach every program and remove every pin. Safe to call twice.

        With `drain_seconds`, the connect hook goes first and the others a
        little later: connections it has just redirected, still waiting in a
        proxy's accept queue, get their SO_ORIGINAL_DST answer meanwhile."""
        if self.attached and self._cgroup_fd is not None and drain_seconds > 0 and self.mode == "ebpf":
            self.set_mode("iptables")
            time.sleep(drain_seconds)
        if self.attached and self._cgroup_fd is not None:
            for hook in HOOKS:
                if hook.on_cgroup and (self.mode == "ebpf" or hook.function not in REDIRECT_HOOKS):
                    try:
                        self._detach(self._cgroup_fd, hook)
                    except OSError as e:
                        log.error("detaching %s: %s", hook.function, e)
            try:
                self._detach(self.bpf.sockhash_fd, SK_MSG_HOOK)
            except OSError as e:
                log.error("detaching %s: %s", SK_MSG_HOOK.function, e)
            if self.stream_verdict:
                try:
                    self._detach(self.bpf.sockhash_fd, SK_SKB_HOOK)
                except OSError as e:
                    log.error("detaching %s: %s", SK_SKB_HOOK.function, e)
            self.attached = False
        self._detach_tracing()
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
    def stream_verdict(self) -> bool:
        """The kernel needs sk_skb.bpf.c on the sockhash for FIONREAD to count TCP-path bytes."""
        from .kernel_probes import SPLICE_STREAM_VERDICT
        return self.kernel is not None and self.kernel.splice_mode == SPLICE_STREAM_VERDICT

    @property
    def splice_allowed(self) -> bool:
        """False when the kernel probes ruled splicing out (FIONREAD would lie)."""
        from .kernel_probes import SPLICE_OFF
        return self.kernel is None or self.kernel.splice_mode != SPLICE_OFF

    @property
    def serving(self) -> bool:
        """Attached and pinned: what readiness means. attach() sets `attached`
        as soon as a program is on the cgroup (so a failure later still
        detaches it), and pins last."""
        return self.attached and self._pins_complete

    def close(self, drain_seconds: float = 0.0) -> None:
        self.detach(drain_seconds)
        for fd in self.tracing_progs.values():
            os.close(fd)
        self.tracing_progs = {}
        if self.bpf is not None:
            self.bpf.close()
            self.bpf = None

    # --- pins ------------------------------------------------------------------------
    # Layout: <bpffs>/maps-<layout version>/<map> (pinned by bcc at load, see
    # merbridge.h) and <bpffs>/progs/<function>__<attach type number> (bpffs
    # refuses names with a dot). The attach type in the name lets a successor
    # detach these programs without knowing which version of us pinned them.
    # <bpffs>/loading/<function> holds the loader child's programs until this
    # process has opened them.

    def _pin_programs(self) -> None:
        progs_dir = self.bpffs_dir / "progs"
        progs_dir.mkdir(parents=True, exist_ok=True)
        for hook in HOOKS:
            if hook.on_cgroup:
                obj_pin(self.bpf.progs[hook.function], progs_dir / f"{hook.function}__{hook.attach_type_number}")

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
        # An uninstall: the node's persisted mode goes too, so a reinstall starts from the default.
        (self.bpffs_dir / MODE_RECORD_PIN).unlink(missing_ok=True)
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
        if mode not in MODES:
            raise DatapathError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == self.mode:
            return
        redirecting = [h for h in HOOKS if h.function in REDIRECT_HOOKS]
        if mode == "iptables":
            if self.attached:
                errors = []
                for hook in redirecting:   # each one tried: a failure leaves as few attached as possible
                    try:
                        self._detach(self._cgroup_fd, hook)
                    except OSError as e:
                        errors.append(f"detaching {hook.function}: {e.strerror}")
                if errors:
                    raise DatapathError("; ".join(errors))
            self.mode = mode
            self._write_config()
            self._detach_tracing()
        else:
            self.mode = mode
            self._write_config()
            if self.attached:
                for hook in redirecting:
                    self._attach(self._cgroup_fd, hook, bpf_syscall.BPF_F_ALLOW_MULTI)
                if self._counts_readers():
                    self._attach_tracing()
        log.info("datapath mode is now %s", mode)

    # --- state ----------------------------------------------------------------------

    def _write_config(self) -> None:
        splicing = self.mode == "ebpf" and self.splice_allowed
        policy = SPLICE_POLICIES[self.splice] if splicing else layout.SplicePolicy.NEVER
        backlog, bulk = self.backlog_limits()
        self.bpf["config"].update(0, layout.DatapathConfig(
            splice=policy, rewrite_inbound_port=int(self.rewrite_inbound_port),
            short_msgs=SHORT_MESSAGES, short_streak=SHORT_STREAK,
            bulk_bytes=bulk, bulk_window_ns=BULK_WINDOW_NS, short_memory_ns=SHORT_MEMORY_NS,
            backlog_bytes=backlog))

    def pod_policy_value(self, pod_ip: str, outbound, inbound, fields=None) -> layout.PodPolicyValue:
        """The pod_policy entry set_pod writes for these arguments (the audit
        compares the kernel's with it). `outbound`/`inbound` are compiled
        first-match rule lists (merbridge_py.policy.compile_rules); the caller
        has checked they fit (a policy that does not fit is never truncated).
        `fields` is the rest (policy.rules.PodKernelFields: the proxy's
        uid/gid, the IPv6 address and rules when IPv6 is accelerated); without
        it, the mesh's uid/gid and IPv4 only."""
        outbound6 = fields.outbound6 if fields else ()
        if len(outbound) > layout.MAX_OUTBOUND_RULES or len(inbound) > layout.MAX_INBOUND_RULES or \
                len(outbound6) > layout.MAX_OUTBOUND_RULES:
            raise DatapathError(f"policy of {pod_ip} does not fit the datapath's rule tables")
        value = layout.PodPolicyValue()
        value.pod_ip = ip_to_net(pod_ip)
        value.n_outbound, value.n_inbound = len(outbound), len(inbound)
        value.proxy_uid = fields.proxy_uid if fields else self.mesh.proxy_uid
        value.proxy_gid = fields.proxy_gid if fields else self.mesh.proxy_gid
        value.families = layout.POD_IPV4
        for slot, rule in zip(value.outbound, outbound):
            slot.addr = ip_to_net(str(rule.network.network_address))
            slot.mask = ip_to_net(str(rule.network.netmask))
            slot.port, slot.capture = rule.port, int(rule.capture)
        for slot, rule in zip(value.inbound, inbound):
            slot.port, slot.capture = rule.port, int(rule.capture)
        ipv6 = fields.ipv6 if fields else None
        if ipv6:
            value.families |= layout.POD_IPV6
            value.pod_ip6 = layout.Addr.of(ipv6)
            value.n_outbound6 = len(outbound6)
            for slot, rule in zip(value.outbound6, outbound6):
                slot.addr = layout.Addr.of(str(rule.network.network_address))
                slot.mask = layout.Addr.of(str(rule.network.netmask))
                slot.port, slot.capture = rule.port, int(rule.capture)
        return value

    def set_pod(self, netns_cookie: int, pod_ip: str, outbound, inbound, fields=None) -> None:
        """Write one pod's policy (see pod_policy_value), all or nothing: the
        policy, then its IP index entries; if any write fails, those already
        made are undone before the error is raised, so the kernel holds what it
        held before (never a policy no IP leads to, nor an IP index entry
        whose policy was not written)."""
        value = self.pod_policy_value(pod_ip, outbound, inbound, fields)
        ipv6 = fields.ipv6 if fields else None
        old6 = _ipv6_of(self.bpf["pod_policy"].lookup(netns_cookie))
        # policy first, then the IP index: a reader never finds an IP without its policy
        steps = [("pod_policy", netns_cookie, value), ("local_pod_ip", layout.Addr.of(pod_ip), netns_cookie)]
        if ipv6:
            steps.append(("local_pod_ip", layout.Addr.of(ipv6), netns_cookie))
        if old6 and old6 != ipv6:   # IPv6 no longer accelerated, or another address
            steps.append(("local_pod_ip", layout.Addr.of(old6), None))
        self._write_all(steps)

    def _write_all(self, steps) -> None:
        """Apply (map, key, value or None to delete) in order; on a failure,
        put every key already written back as it was, last first."""
        done = []
        try:
            for name, key, value in steps:
                table = self.bpf[name]
                before = table.lookup(key)
                if value is None:
                    table.delete(key)
                else:
                    table.update(key, value)
                done.append((name, key, before))
        except BaseException:
            for name, key, before in reversed(done):
                try:
                    if before is None:
                        self.bpf[name].delete(key)
                    else:
                        self.bpf[name].update(key, before)
                except OSError as e:   # the audit finds and repairs what is left
                    log.error("undoing a partial write to %s failed: %s", name, e)
            raise

    def remove_pod(self, netns_cookie: int, pod_ip: str) -> None:
        """Delete one pod's entries: its IP index entries first (no new
        connection is redirected from then on), then its policies. Every
        delete is tried; the first failure is raised after the rest."""
        ipv6 = _ipv6_of(self.bpf["pod_policy"].lookup(netns_cookie))
        steps = [("local_pod_ip", layout.Addr.of(pod_ip))]
        if ipv6:
            steps.append(("local_pod_ip", layout.Addr.of(ipv6)))
        steps += [("pod_policy", netns_cookie), ("dns_policy", netns_cookie)]
        self._delete_each(steps)

    def _delete_each(self, steps) -> None:
        failure = None
        for name, key in steps:
            try:
                self.bpf[name].delete(key)
            except Exception as e:  # noqa: BLE001 - the others are still deleted; raised below
                failure = failure or e
        if failure is not None:
            raise failure

    # --- the audit's view (agent/audit.py) ------------------------------------------

    def kernel_pods(self) -> "PodEntries":
        """Every pod entry the kernel holds, as bytes to compare."""
        return PodEntries(
            policies={int(k.value): bytes(v) for k, v in self.bpf["pod_policy"].items()},
            ips={k.text(): int(v.value) for k, v in self.bpf["local_pod_ip"].items()},
            dns={int(k.value): bytes(v) for k, v in self.bpf["dns_policy"].items()})

    def pod_entries_of(self, netns_cookie: int, pod_ip: str, outbound, inbound, fields=None,
                       dns=None) -> "PodEntries":
        """The entries set_pod (and set_pod_dns with `dns`, when given) write
        for one pod."""
        from .dns_datapath import policy_value
        value = self.pod_policy_value(pod_ip, outbound, inbound, fields)
        ips = {layout.Addr.of(pod_ip).text(): netns_cookie}   # as kernel_pods() spells addresses
        if fields is not None and fields.ipv6:
            ips[layout.Addr.of(fields.ipv6).text()] = netns_cookie
        out = PodEntries({netns_cookie: bytes(value)}, ips, {})
        if dns is not None and dns.accelerated and not dns.pending:
            out.dns[netns_cookie] = bytes(policy_value(dns))
        return out

    def delete_entries(self, stale: "PodEntries") -> None:
        """Delete these keys (entries no pod of ours has: the audit's repair)."""
        self._delete_each([("local_pod_ip", layout.Addr.of(ip)) for ip in stale.ips]
                          + [("pod_policy", c) for c in stale.policies] + [("dns_policy", c) for c in stale.dns])

    def set_pod_dns(self, netns_cookie: int, decision) -> None:
        """The pod's DNS capture entry (merbridge_py/dns_datapath.py)."""
        from .dns_datapath import write_pod
        write_pod(self, netns_cookie, decision)

    def dns_counters(self) -> dict[str, int]:
        from .dns_datapath import counters
        return counters(self)

    def pod_entries(self) -> list[tuple[int, str]]:
        """(netns cookie, pod IP) of every pod in the maps: after a takeover,
        also pods only the previous agent knew."""
        return [(int(key.value), socket.inet_ntoa(int(value.pod_ip).to_bytes(4, "little")))
                for key, value in self.bpf["pod_policy"].items()]

    def counters(self) -> dict[str, int]:
        table = self.bpf["counters"]
        return {c.name.lower(): sum(v.value for v in table.lookup(c.value) or ()) for c in layout.Counter}

    def map_sizes(self) -> dict[str, int]:
        sizes = {name: sum(1 for _ in self.bpf[name].keys()) for name in
                 ("pod_policy", "local_pod_ip", "connect_original_dst", "original_dst")}
        sizes["sock_pairs"] = sockhash_size(self.bpf.sockhash_fd)
        return sizes


def _env_bytes(name: str, default: int, minimum: int, what: str) -> int:
    """A byte count from environment variable `name` (unset or empty:
    `default`), `minimum` to 2**32-1 (a u32 in the config map)."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not minimum <= value < 1 << 32:
        raise DatapathError(f"{name}={text!r}: expected {what}, {minimum}{' (no limit)' if minimum == 0 else ''} "
                            f"to {(1 << 32) - 1}")
    return value


def bulk_bytes() -> int:
    """BULK_BYTES, or the tests' lower threshold from MERBRIDGE_BULK_BYTES."""
    return _env_bytes(BULK_BYTES_ENV, BULK_BYTES, 1, "bytes per bulk window")


def backlog_bytes() -> int:
    """BACKLOG_BYTES, or MERBRIDGE_BACKLOG_BYTES (0 turns backpressure off)."""
    return _env_bytes(BACKLOG_BYTES_ENV, BACKLOG_BYTES, 0, "the unread bytes a spliced socket's peer may hold")


def why_no_reader_hook(splice_mode: str | None, splice: str) -> str | None:
    """Why this node needs none of backpressure's reader hooks (READER_HOOKS),
    or None when it needs one: the one rule the agent, `doctor` and the
    kernel probes follow. `splice_mode`: what the kernel probes picked
    (kernel_probes.KernelBehaviour.splice_mode; None: not probed, sk_msg);
    `splice`: the --splice setting. A reader hook only costs where nothing
    reads its counts: a compile at start, and the sock_recv_length
    tracepoint runs on every socket read of the node. Nothing reads them
    where the node never splices, nor where the backlog limit is off.
    Raises DatapathError for a bad MERBRIDGE_BACKLOG_BYTES."""
    from .kernel_probes import SPLICE_OFF
    if splice_mode == SPLICE_OFF:
        return "this node does not splice (the kernel probes turned splicing off)"
    if splice == "never":
        return "this node does not splice (the splice setting is never)"
    if backlog_bytes() == 0:
        return f"no backlog limit ({BACKLOG_BYTES_ENV}=0)"
    return None


def backlog_fallback() -> str:
    """MERBRIDGE_BACKLOG_FALLBACK: "budget" (default) or "bulk"."""
    value = os.environ.get(BACKLOG_FALLBACK_ENV) or BACKLOG_FALLBACKS[0]
    if value not in BACKLOG_FALLBACKS:
        raise DatapathError(f"{BACKLOG_FALLBACK_ENV}={value!r}: expected one of {', '.join(BACKLOG_FALLBACKS)}")
    return value


def check_settings() -> None:
    """Every environment setting above, checked at agent start: a typo in one
    read only where no reader hook loads (the fallback) would otherwise go
    unnoticed until then."""
    bulk_bytes()
    backlog_bytes()
    backlog_fallback()


LOADER_PIN_DIR = "loading"
LOADER_TIMEOUT = 120.0
# Overrides LOADER_TIMEOUT (seconds) on machines that compile far slower: the
# kernel matrix's emulated VMs on a busy machine took over 120 s for one compile.
LOADER_TIMEOUT_ENV = "MERBRIDGE_LOADER_TIMEOUT"


def loader_timeout() -> float:
    value = os.environ.get(LOADER_TIMEOUT_ENV)
    if value is None:
        return LOADER_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise DatapathError(f"{LOADER_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise DatapathError(f"{LOADER_TIMEOUT_ENV}={value!r} must be positive")
    return seconds


def run_loader(maps_dir: Path, pin_dir: Path, cflags: list[str], reader_hook: bool = True) -> dict:
    """Compile, load and pin the programs in a child process (merbridge_py/
    loader.py): bcc and LLVM live and die there. Returns its report, plus
    `elapsed` (seconds, as this process saw it). `reader_hook`: False skips
    backpressure's reader hook (why_no_reader_hook)."""
    argv = [sys.executable, "-m", "merbridge_py.loader", "--maps-dir", str(maps_dir), "--pin-dir", str(pin_dir),
            *([] if reader_hook else ["--no-reader-hook"]), "--", *cflags]
    timeout = loader_timeout()
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        shutil.rmtree(pin_dir, ignore_errors=True)
        raise DatapathError(f"compiling or loading the eBPF programs took longer than {timeout:.0f} s "
                            f"(set {LOADER_TIMEOUT_ENV} to allow more)") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        why = lines[-1].removeprefix("error: ") if lines else f"the loader exited with status {done.returncode}"
        from .kernel_probes import missing_helpers
        missing = missing_helpers(done.stderr)
        if missing:
            why = (f"this kernel lacks {', '.join(missing)}, which the programs use ({why}); "
                   "see docs/kernel-behaviour.md for the kernels tested")
        if len(lines) > 1:   # what clang or the verifier printed before the error
            log.error("the eBPF loader said:\n%s", "\n".join(lines[:-1]))
        raise DatapathError(f"compiling or loading the eBPF programs failed: {why}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise DatapathError(f"the eBPF loader reported nothing readable: {done.stdout[-200:]!r}") from None
    result["elapsed"] = round(time.monotonic() - started, 3)
    return result


def _open_maps(maps_dir: Path, progs: dict[str, int]) -> LoadedObjects:
    """Open every pinned map with its layout.py types; the kernel's key and
    value sizes are checked against them."""
    maps: dict[str, bpf_syscall.Map] = {}
    sockhash_fd = None
    try:
        for name, (key_type, value_type) in layout.MAPS.items():
            maps[name] = bpf_syscall.Map.open(maps_dir / name, key_type, value_type)
        sockhash_fd = obj_get(maps_dir / layout.SOCKHASH_MAPS[0])
    except (OSError, DatapathError) as e:
        for m in maps.values():
            m.close()
        for fd in progs.values():
            os.close(fd)
        raise DatapathError(f"opening the pinned maps in {maps_dir}: {e}") from None
    return LoadedObjects(progs, maps, sockhash_fd)


def _ipv6_of(value) -> str | None:
    """The IPv6 address a pod_policy value serves, if any."""
    if value is None or not value.families & layout.POD_IPV6:
        return None
    return value.pod_ip6.text()


def ip_to_net(ip: str) -> int:
    """IPv4 text -> the u32 whose memory holds the address in network order."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def sockhash_size(fd: int) -> int:
    """Count sockhash keys (its values are sockets, which user space cannot read)."""
    return sum(1 for _ in bpf_syscall.iter_keys(fd, layout.SockTuple, "sock_pairs"))


def attached_program_ids(cgroup: Path) -> dict[str, list[int]]:
    """IDs of programs attached directly to `cgroup`, per hook we use: what
    `bpftool cgroup show` would list, without needing bpftool."""
    fd = open_cgroup(cgroup)
    try:
        out = {}
        for hook in HOOKS:
            if hook.on_cgroup:
                try:
                    out[hook.attach_type] = bpf_syscall.prog_query(fd, hook.attach_type_number)
                except OSError as e:
                    raise DatapathError(f"querying programs on {cgroup}: {e.strerror}") from None
        return out
    finally:
        os.close(fd)


def leave_attached(dp: Datapath) -> None:
    """End `dp` for a successor (a restart, not an uninstall): the programs
    stay attached and the maps and programs pinned, exactly as after a crash,
    and the next agent adopts the maps and replaces the programs. Only this
    process's handles are closed."""
    dp.attached = False
    dp._detach_tracing()   # held by this process's link fds only: the successor attaches its own
    for fd in dp.tracing_progs.values():
        os.close(fd)
    dp.tracing_progs = {}
    dp._pinned = dp._pins_complete = False
    dp._created_maps_dir = False      # ours or not, the maps are the successor's now
    if dp._cgroup_fd is not None:
        os.close(dp._cgroup_fd)
        dp._cgroup_fd = None
    if dp.bpf is not None:
        dp.bpf.close()    # closes descriptors; cgroup attachments and pins hold the programs
        dp.bpf = None


def detach_pinned(bpffs_dir: Path, cgroup: Path) -> list[str]:
    """`merbridge-py cleanup`: detach from `cgroup` the programs pinned under
    `bpffs_dir` by an agent that is gone, and remove every pin there. Only
    programs found through our pins are detached (each by its own descriptor,
    so another tool's programs on the cgroup are untouched). Returns what was
    done, one line each; nothing when there is nothing of ours."""
    done = []
    progs_dir = Path(bpffs_dir) / "progs"
    if progs_dir.is_dir():
        cgroup_fd = open_cgroup(cgroup)
        try:
            for pin in sorted(progs_dir.iterdir()):
                try:
                    attach_type = int(pin.name.rsplit("__", 1)[1])
                    prog_fd = obj_get(pin)
                except (IndexError, ValueError, DatapathError) as e:
                    done.append(f"skipped {pin}: not one of our program pins ({e})")
                    continue
                function = pin.name.rsplit("__", 1)[0]
                try:
                    bpf_syscall.prog_detach(cgroup_fd, prog_fd, attach_type)
                    done.append(f"detached {function} from {cgroup}")
                except OSError:
                    done.append(f"{function} was not attached to {cgroup}")
                finally:
                    os.close(prog_fd)
        finally:
            os.close(cgroup_fd)
    if Path(bpffs_dir).is_dir():
        for pin in sorted(p for p in Path(bpffs_dir).rglob("*") if not p.is_dir()):
            pin.unlink()
            done.append(f"removed pin {pin}")
        for d in sorted((p for p in Path(bpffs_dir).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        Path(bpffs_dir).rmdir()
        done.append(f"removed {bpffs_dir}")
    return done
