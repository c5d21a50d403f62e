"""A busy node: background CPU load beside the measured pods (`--busy`).

Production nodes are never idle, and on a busy node the kernel work a
datapath defers (softirqs, wake-ups of a receiver on another CPU) waits for a
CPU. The bench runs the same cases with `stress-ng --cpu N` started inside the
client's node (its network namespace, and a child cgroup of the node's cgroup
that is not a pod), so it competes for the CPUs as a neighbour on that node
would. N is half or all of the machine's cores: the bed's nodes are namespaces
on one machine and share its cores, so "the node's cores" are the machine's.
The load is identical in every mode (same N, same method) and is stopped by
its pid, and its cgroup emptied, before the block moves on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

NONE, HALF, ALL = "none", "half", "all"
LEVELS = (NONE, HALF, ALL)

# One fixed stress-ng method, so the load does not change character between
# mode blocks (the default, "all", cycles through every method).
CPU_METHOD = "matrixprod"


def parse_levels(text: str) -> tuple[str, ...]:
    """'none,half,all' -> ("none", "half", "all"), in the given order, without
    repeats; an unknown level is a ValueError naming the choices."""
    levels = tuple(dict.fromkeys(v.strip() for v in text.replace(" ", ",").split(",") if v.strip()))
    unknown = [v for v in levels if v not in LEVELS]
    if unknown or not levels:
        raise ValueError(f"--busy takes levels among {', '.join(LEVELS)} (comma-separated), got {text!r}")
    return levels


def workers(level: str, cpu_count: int) -> int:
    """stress-ng CPU workers for a level on a machine of cpu_count cores."""
    if cpu_count < 1:
        raise ValueError(f"cpu_count must be >= 1, got {cpu_count}")
    if level == NONE:
        return 0
    if level == HALF:
        return max(1, cpu_count // 2)
    if level == ALL:
        return cpu_count
    raise ValueError(f"unknown busy level {level!r}; choose from {', '.join(LEVELS)}")


def stress_argv(n_workers: int, timeout_s: int) -> list[str]:
    """stress-ng with n CPU hogs at 100%. --timeout is a backstop only: the
    bench stops it by pid when the block ends."""
    if n_workers < 1 or timeout_s < 1:
        raise ValueError("stress-ng needs >= 1 worker and a timeout >= 1 s")
    return ["stress-ng", "--cpu", str(n_workers), "--cpu-method", CPU_METHOD, "--timeout", f"{timeout_s}s",
            "--quiet"]


def how(levels: Sequence[str], cpu_count: int) -> str:
    """One sentence for the report."""
    if tuple(levels) == (NONE,):
        return "none: nothing else ran on the node"
    parts = [f"{level}: " + ("nothing else on the node" if level == NONE else
                             f"`stress-ng --cpu {workers(level, cpu_count)} --cpu-method {CPU_METHOD}`")
             for level in levels]
    return ("; ".join(parts) + f" ({cpu_count} cores); stress-ng runs in the client's node network namespace and "
            "a child cgroup of its node's cgroup, identical in every mode, started before the level's cases of a "
            "mode block and stopped by pid after them")


@contextlib.contextmanager
def background(bed, node: str, level: str, timeout_s: int, cpu_count: int | None = None) -> Iterator[int]:
    """Run the level's load on `node` of the bed for the with-block; yields
    the number of workers (0 for none: nothing is started)."""
    n = workers(level, cpu_count or os.cpu_count() or 1)
    if n == 0:
        yield 0
        return
    with bed.node_process(node, stress_argv(n, timeout_s)):
        yield n
