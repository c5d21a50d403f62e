"""Boot one kernel under QEMU's software emulation, run one command, read its
exit status from the console.

Software emulation (TCG), not KVM: this machine kind's /dev/kvm stops stock
kernels with "KVM internal error ... emulation failure". QEMU exits 0 whatever
the guest's command did, so the status comes from the init's status line; a VM
that prints none (panic, hang, timeout) is a failure of its own kind.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .initramfs import STATUS_MARK, VIRTFS_TAG

QEMU = "qemu-system-x86_64"
_STATUS_RE = re.compile(rf"^{re.escape(STATUS_MARK)}: (\d+)\s*$", re.MULTILINE)


@dataclass
class VmRun:
    status: int | None      # the command's exit status; None: the VM printed none
    console: str
    seconds: float
    timed_out: bool


def exit_status(console: str) -> int | None:
    """The command's exit status from the init's status line, or None. The
    last such line counts (a test may print the mark in its own output)."""
    found = _STATUS_RE.findall(console.replace("\r", ""))
    return int(found[-1]) if found else None


def qemu_argv(kernel: Path, initrd: Path, memory_mb: int = 3072, cpus: int = 2) -> list[str]:
    return [QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            # random.trust_cpu: Python's os.urandom must not wait for entropy on old kernels
            "-append", "console=ttyS0 quiet panic=-1 random.trust_cpu=on",
            "-virtfs", f"local,path=/,mount_tag={VIRTFS_TAG},security_model=none,readonly=on,multidevs=remap"]


def boot(kernel: Path, initrd: Path, console_log: Path, timeout: float, memory_mb: int = 3072) -> VmRun:
    """Run the VM to its end or `timeout` seconds, whichever comes first; on
    timeout the QEMU process (ours, by pid) is killed."""
    start = time.monotonic()
    timed_out = False
    with console_log.open("wb") as log:
        proc = subprocess.Popen(qemu_argv(kernel, initrd, memory_mb), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    console = console_log.read_bytes().decode(errors="replace")
    return VmRun(exit_status(console), console, time.monotonic() - start, timed_out)
