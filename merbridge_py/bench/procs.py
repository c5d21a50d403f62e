"""Processes of one measurement: run a client to completion with its exact CPU
time, wait for a server to listen, and account the CPU of long-lived pod
processes (sidecars, apps) over a run.

CPU time per request is the sum over client, sidecars and the serving app of
user+system time during the run, divided by the requests served. Kernel work
done in softirq context on behalf of a socket is charged to whichever process
the CPU happened to interrupt; on a loopback/veth test bed most of it runs in
the sender's syscall and so lands on the right processes, but not all of it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from .. import sandbox

# Process names that are a mesh's sidecar; everything else in a pod counts as app.
SIDECAR_NAMES = frozenset({"haproxy", "envoy", "pilot-agent"})


@dataclass(frozen=True)
class ClientRun:
    returncode: int
    output: str          # stdout then stderr: the parsers look for their lines anywhere
    cpu_s: float         # user + system time of the client process itself
    user_s: float = 0.0  # of which user space


def run_client(start: Callable[..., subprocess.Popen], timeout_s: float) -> ClientRun:
    """Start a client with `start(stdout=..., stderr=...)` and wait for it,
    reaping it with wait4() so its own rusage is known exactly (psutil cannot
    read the CPU time of a process that has already exited). Output goes to
    temporary files, so a chatty tool can never block on a full pipe."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = start(stdout=out, stderr=err)
        deadline = time.monotonic() + timeout_s
        reaped = False
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    reaped = True
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{' '.join(map(str, proc.args))} still running after {timeout_s:.0f} s")
                time.sleep(0.02)
        finally:
            if not reaped:
                sandbox.stop(proc)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ClientRun(returncode=proc.returncode, output=out.read() + err.read(),
                         cpu_s=rusage.ru_utime + rusage.ru_stime, user_s=rusage.ru_utime)


def wait_listening(netns: str | None, port: int, timeout_s: float = 5.0,
                   alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until something in `netns` listens on TCP `port`. Asks the kernel
    (ss) instead of connecting, so no probe connection crosses the mesh."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for port {port} exited before listening")
        if sandbox.sh("ss", "-Hltn", f"sport = :{port}", netns=netns, check=False).strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} in {netns or 'this namespace'} after {timeout_s} s")


def classify(pids: Iterable[int]) -> dict[str, list[int]]:
    """Split a pod's processes into sidecars and apps by process name.
    `ip netns exec` execs its command in place, so names are the programs'."""
    roles: dict[str, list[int]] = {"sidecars": [], "apps": []}
    for pid in pids:
        try:
            name = psutil.Process(pid).name()
        except psutil.NoSuchProcess:
            continue
        roles["sidecars" if name in SIDECAR_NAMES else "apps"].append(pid)
    return roles


def cpu_seconds(pids: Iterable[int], user_only: bool = False) -> dict[int, float]:
    """user + system (or only user) seconds so far of each pid that still exists."""
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[pid] = t.user if user_only else t.user + t.system
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots by the processes in both. A
    process that exited in between contributes nothing: its last use is lost,
    which is why load clients are measured with run_client instead."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())
