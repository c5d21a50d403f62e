"""Which of backpressure's reader hooks (merbridge_py.datapath.READER_HOOKS)
this kernel must take, asked of the kernel itself, so that a test can require
the counted path instead of accepting the fallback wherever it runs."""

from __future__ import annotations

from pathlib import Path


def tracepoint_exists(name: str) -> bool:
    """The kernel defines tracepoint `name` (its __tracepoint_ symbol)."""
    with open("/proc/kallsyms") as f:
        return any(line.rstrip().endswith(f" __tracepoint_{name}") for line in f)


def lockdown_mode() -> str | None:
    """The selected kernel lockdown mode ("none", "integrity",
    "confidentiality"), or None where securityfs does not say."""
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return None


def a_reader_hook_must_load() -> str | None:
    """Why this kernel must take a reader hook, or None when it may refuse both
    (a kernel before 6.4, without the sock_recv_length tracepoint, that may
    refuse fexit under lockdown)."""
    if tracepoint_exists("sock_recv_length"):
        return "the sock_recv_length tracepoint exists (a raw tracepoint program needs no BPF trampoline)"
    if lockdown_mode() == "none":
        return "kernel lockdown is off, so nothing forbids fexit programs"
    return None
