"""Shared test set-up.

Tests marked `bpf` need root, bcc, kernel headers and a BPF-capable kernel.
Where those are missing they skip, except when MERBRIDGE_REQUIRE_BPF=1 (CI sets
it): then the missing piece is a failure, so CI can never pass by skipping.
That holds for every skip of a bpf test, whatever raised it (this file's
check, a pytest.skip() inside the test or a fixture, a skipif marker): the
report hook below turns them all into failures.
"""

import os
import shutil

import pytest

pytest_plugins = ["pytester"]   # tests of this file's hooks run pytest on generated tests

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_BPF and report.skipped and item.get_closest_marker("bpf") is not None):
        return
    if hasattr(report, "wasxfail"):
        return   # an expected failure is reported as skipped too; it is not a skip
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"BPF test skipped ({reason}) and MERBRIDGE_REQUIRE_BPF=1 forbids skipping"
