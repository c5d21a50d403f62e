"""`merbridge-py doctor`: can this node run the datapath? Each check prints
what it found and, when it fails, how to fix it. What the kernel offers and
how it behaves is probed (merbridge_py/kernel_probes.py), never read from its
version string: stable kernels of one version differ (docs/kernel-behaviour.md)."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

import click

# The kernel the matrix found right on both FIONREAD probes (docs/kernel-behaviour.md).
KERNEL_WITH_BOTH_RIGHT = "6.12.118 (Debian 12 security)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    note: bool = False   # ok, but the agent works around something: `fix` says what to expect


def check_kernel() -> Check:
    # informational only: what the kernel can do is probed by the checks below
    return Check("kernel", True, f"{platform.release()} (capabilities are probed, not read from this)")


def check_bpf_syscall() -> Check:
    from .bpf_syscall import Cmd, bpf
    # BPF_PROG_LOAD with an empty attr: EINVAL/EFAULT mean the syscall exists and we may call it
    attr = ctypes.create_string_buffer(128)
    try:
        os.close(bpf(Cmd.PROG_LOAD, attr, "bpf(BPF_PROG_LOAD)"))
        return Check("bpf() syscall", True, "available")
    except OSError as e:
        ok = e.errno in (errno.EINVAL, errno.EFAULT, errno.E2BIG)
        return Check("bpf() syscall", ok, e.strerror if not ok else "available",
                     "run as root (or with CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN); check kernel.unprivileged_bpf_disabled "
                     "is irrelevant for root; the kernel needs CONFIG_BPF_SYSCALL")


def check_cgroup2() -> Check:
    from .sandbox import SandboxError, cgroup2_root
    try:
        root = cgroup2_root()
        return Check("cgroup v2", True, f"mounted at {root}")
    except SandboxError as e:
        return Check("cgroup v2", False, str(e), "mount -t cgroup2 none /sys/fs/cgroup/unified")


def check_bpffs() -> Check:
    from .datapath import _fs_type_of, _mounts
    fs = _fs_type_of(Path("/sys/fs/bpf"), _mounts())
    ok = fs == "bpf"
    return Check("bpffs", ok, "/sys/fs/bpf is a bpffs" if ok else f"/sys/fs/bpf is {fs or 'missing'}",
                 "mount -t bpf bpf /sys/fs/bpf (the agent mounts it itself if it can)")


def check_sockhash() -> Check:
    from .bpf_syscall import MapType, map_create
    try:
        os.close(map_create(MapType.SOCKHASH, 12, 4, 1))
    except OSError as e:
        return Check("sockhash map", False, e.strerror,
                     "the kernel needs CONFIG_BPF_STREAM_PARSER (sockmap/sockhash)")
    return Check("sockhash map", True, "can be created")


def check_netns_cookie() -> Check:
    from .netns import netns_cookie_of_current_thread
    try:
        netns_cookie_of_current_thread()
        return Check("SO_NETNS_COOKIE", True, "available")
    except OSError as e:
        return Check("SO_NETNS_COOKIE", False, e.strerror, "needs Linux >= 5.14")


# (program type, expected attach type, what it is in our datapath): the program
# types that call bpf_get_netns_cookie (ebpf/connect, dns_*, sockops). Linux
# gained the helper for cgroup sock_addr programs in 5.7 but for sockops only
# in 5.15; an older kernel's verifier refuses the object with "unknown func
# bpf_get_netns_cookie#122" (seen on Debian's 5.10 in the kernel matrix).
_NETNS_COOKIE_USERS = (
    (18, 10, "connect4/DNS (cgroup sock_addr)"),   # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_INET4_CONNECT
    (13, 0, "sockops"),                            # BPF_PROG_TYPE_SOCK_OPS
)
_BPF_FUNC_GET_NETNS_COOKIE = 122


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32)]


def _verifier_says(prog_type: int, attach_type: int, helper: int) -> str | None:
    """Load `r0 = helper(ctx); r0 = 1; exit` as `prog_type`: None when the
    verifier accepts it, else the verifier's last line."""
    from .bpf_syscall import BpfError, Cmd, bpf
    # struct bpf_insn: u8 code, u8 dst:4 src:4, s16 off, s32 imm
    insns = (ctypes.c_uint64 * 3)(
        0x85 | (helper << 32),          # call helper
        0xb7 | (1 << 32),               # r0 = 1 (every type here takes 1 as "carry on")
        0x95)                           # exit
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=3, insns=ctypes.addressof(insns),
                         license=ctypes.addressof(license), log_level=1, log_size=len(log),
                         log_buf=ctypes.addressof(log), expected_attach_type=attach_type)
    try:
        os.close(bpf(Cmd.PROG_LOAD, attr, "bpf(BPF_PROG_LOAD)"))
        return None
    except BpfError as e:
        # the verifier's reason, not its closing statistics ("processed 1 insns ...")
        lines = [line for line in log.value.decode(errors="replace").splitlines()
                 if line.strip() and not line.startswith("processed ")]
        return lines[-1] if lines else e.strerror


def check_helpers() -> Check:
    refused = []
    for prog_type, attach_type, what in _NETNS_COOKIE_USERS:
        said = _verifier_says(prog_type, attach_type, _BPF_FUNC_GET_NETNS_COOKIE)
        if said is not None:
            refused.append(f"{what}: {said}")
    if refused:
        return Check("helper bpf_get_netns_cookie", False,
                     "the verifier refuses it in " + "; ".join(refused),
                     "move to Linux >= 5.15 (sockops programs gained bpf_get_netns_cookie there); "
                     "the kernels tested: docs/kernels.md")
    return Check("helper bpf_get_netns_cookie", True,
                 "available to " + ", ".join(w for _, _, w in _NETNS_COOKIE_USERS))


def check_bcc() -> Check:
    try:
        import bcc
        return Check("bcc", True, f"{getattr(bcc, '__version__', '?')} at {Path(bcc.__file__).parent}")
    except ImportError:
        return Check("bcc", False, "not importable",
                     "apt-get install python3-bpfcc (bcc is not on PyPI); in a venv use --system-site-packages")


def check_headers() -> Check:
    from .kheaders import HeadersNotFound, find
    try:
        return Check("kernel headers", True, find().description)
    except HeadersNotFound as e:
        return Check("kernel headers", False, str(e).split(". Fix:")[0], str(e).split("Fix: ")[-1])


def check_programs_load(kernel) -> Check | list[Check]:
    """Every hook and helper the programs use, by compiling and verifying them;
    backpressure's reader hook only where the node needs one, as the agent
    does (datapath.why_no_reader_hook). `kernel`: kernel_probes.probe_kernel()'s
    answer."""
    from .datapath import DatapathError, _fs_type_of, _mounts, why_no_reader_hook
    from .kernel_probes import TRACING_UNAVAILABLE, probe_programs_load
    if _fs_type_of(Path("/sys/fs/bpf"), _mounts()) != "bpf":
        return Check("programs load", False, "not tried: /sys/fs/bpf is not a bpffs", "mount -t bpf bpf /sys/fs/bpf")
    try:
        # "adaptive": the agent's default --splice (doctor cannot know a DaemonSet's)
        no_reader_hook = why_no_reader_hook(kernel.splice_mode, "adaptive")
    except DatapathError as e:   # a bad MERBRIDGE_BACKLOG_BYTES
        return Check("programs load", False, f"not tried: {e}", "correct the setting: the agent refuses to start "
                     "with it")
    r = probe_programs_load(no_reader_hook=no_reader_hook)
    if r.ok:
        if no_reader_hook:   # no fallback either: nothing reads the counts
            return [Check("programs load", True, r.explanation),
                    Check("backpressure reader tracing", True, f"not needed: {no_reader_hook}, so the agent "
                          "compiles no reader hook and no fallback applies")]
        if TRACING_UNAVAILABLE not in r.explanation:
            return Check("programs load", True, r.explanation)
        from .datapath import BACKLOG_FALLBACK_ENV, BULK_WINDOW_NS, FALLBACK_BULK_BYTES, backlog_bytes
        budget = backlog_bytes()   # the node's setting, as the agent will read it (checked above)
        return [Check("programs load", True, r.explanation),
                Check("backpressure reader tracing", True, "unavailable (the line above says why)",
                      "the datapath works; backpressure cannot see readers' progress, so the agent falls back "
                      f"({BACKLOG_FALLBACK_ENV}: by default a {_mib(budget)} budget per spliced socket, after "
                      f"which it goes to TCP; `bulk`: bulk detection from {_mib(FALLBACK_BULK_BYTES)} per "
                      f"{BULK_WINDOW_NS / 1e9:g} s, slower writers not held back; `status` says which)", note=True)]
    if r.result == "missing":
        return Check("programs load", False, r.explanation,
                     "this kernel lacks a hook or helper the datapath needs: pods stay on iptables here; move the "
                     f"node to a kernel that passes (tested: {KERNEL_WITH_BOTH_RIGHT}, 6.1.192, 6.18.44; "
                     "5.10 lacks bpf_get_netns_cookie for sockops)")
    return Check("programs load", False, r.explanation, "see the loader's message above")


def check_fionread(kernel) -> list[Check]:
    """The FIONREAD probes and the splice mode the agent will pick from them
    (`kernel`: kernel_probes.probe_kernel()'s answer)."""
    from .kernel_probes import SPLICE_OFF, SPLICE_SK_MSG
    checks = []
    for p in kernel.probes:
        failed = p.result == "error"
        wrong = p.result == "invisible"
        checks.append(Check(f"probe {p.probe}", not failed, f"{p.result}: {p.explanation}",
                            "the probe could not run; the agent will not splice sockets" if failed else
                            "handled by the splice mode below" if wrong else "", note=wrong))
    if kernel.splice_mode == SPLICE_SK_MSG:
        fix = ""
    elif kernel.splice_mode == SPLICE_OFF:
        fix = ("no splicing on this node: connections are redirected without iptables, but bytes go through "
               f"TCP/IP in the pod. For splicing, move to a kernel whose probes both show visible "
               f"(tested: {KERNEL_WITH_BOTH_RIGHT})")
    else:
        fix = ("splicing with a stream verdict program; TCP-path bytes are counted through it. No fix needed; "
               f"a kernel whose probes both show visible (tested: {KERNEL_WITH_BOTH_RIGHT}) needs no extra program")
    checks.append(Check("splice mode", True, f"{kernel.splice_mode}: {kernel.why}", fix, note=bool(fix)))
    return checks


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


CHECKS = (check_kernel, check_bpf_syscall, check_cgroup2, check_bpffs, check_sockhash, check_netns_cookie,
          check_helpers, check_bcc, check_headers, check_programs_load, check_fionread)
# The checks that read what the kernel probes found: given it, probed once per run.
KERNEL_CHECKS = (check_programs_load, check_fionread)


@click.command(epilog="\b\nexamples:\n  merbridge-py doctor      # run every check; exit 0 when all pass")
def doctor():
    """Check that this node can run the eBPF datapath."""
    from .kernel_probes import probe_kernel
    kernel = probe_kernel() if any(fn in KERNEL_CHECKS for fn in CHECKS) else None
    failed = 0
    for fn in CHECKS:
        found = fn(kernel) if fn in KERNEL_CHECKS else fn()
        for c in found if isinstance(found, list) else [found]:
            mark = "FAIL" if not c.ok else "note" if c.note else "ok  "
            click.echo(f"[{mark}] {c.name}: {c.detail}")
            if not c.ok:
                failed += 1
            if c.fix and (not c.ok or c.note):
                click.echo(f"       {'fix' if not c.ok else 'expect'}: {c.fix}")
    if failed:
        raise SystemExit(1)
