"""`merbridge-py doctor`: can this node run the datapath? Each check prints
what it found and, when it fails, how to fix it."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import click

MIN_KERNEL = (5, 15)  # bpf_get_netns_cookie in sockops/sk_msg/sockopt programs


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_kernel() -> Check:
    release = platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return Check("kernel version", version >= MIN_KERNEL, release,
                 f"upgrade to Linux >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]}; older kernels lack helpers the programs use")


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


CHECKS = (check_kernel, check_bpf_syscall, check_cgroup2, check_bpffs, check_sockhash, check_netns_cookie,
          check_bcc, check_headers)


@click.command(epilog="\b\nexamples:\n  merbridge-py doctor      # run every check; exit 0 when all pass")
def doctor():
    """Check that this node can run the eBPF datapath."""
    failed = 0
    for fn in CHECKS:
        c = fn()
        mark = "ok  " if c.ok else "FAIL"
        click.echo(f"[{mark}] {c.name}: {c.detail}")
        if not c.ok:
            failed += 1
            click.echo(f"       fix: {c.fix}")
    if failed:
        raise SystemExit(1)
