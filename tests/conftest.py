"""Shared test set-up.

Tests marked `bpf` need root, bcc, kernel headers and a BPF-capable kernel.
Where those are missing they skip, except when MERBRIDGE_REQUIRE_BPF=1 (CI sets
it): then the missing piece is a failure, so CI can never pass by skipping.
"""

import os
import shutil

import pytest

REQUIRE_BPF = os.environ.get("MERBRIDGE_REQUIRE_BPF") == "1"


def _bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (install Debian's python3-bpfcc; use a venv with --system-site-packages)"
    from merbridge_py import kheaders
    try:
        kheaders.find()
    except kheaders.HeadersNotFound as e:
        return str(e)
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


_REASON = None
_CHECKED = False


def bpf_unavailable_reason():
    global _REASON, _CHECKED
    if not _CHECKED:
        _REASON, _CHECKED = _bpf_unavailable_reason(), True
    return _REASON


def pytest_runtest_setup(item):
    if item.get_closest_marker("bpf") is None:
        return
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_BPF:
        pytest.fail(f"BPF test cannot run ({reason}) and MERBRIDGE_REQUIRE_BPF=1 forbids skipping", pytrace=False)
    pytest.skip(reason)
