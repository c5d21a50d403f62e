import pytest
from click.testing import CliRunner

from merbridge_py import doctor
from merbridge_py.cli import main


@pytest.mark.bpf
def test_doctor_passes_on_a_capable_node():
    from pathlib import Path

    from merbridge_py.datapath import ensure_bpffs
    ensure_bpffs(Path("/sys/fs/bpf"))  # what the agent does at start
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    assert r.output.count("[ok  ]") == len(doctor.CHECKS)


def test_doctor_reports_missing_headers_with_a_fix(monkeypatch, tmp_path):
    from merbridge_py import kheaders
    monkeypatch.setattr(kheaders, "MODULES_DIR", tmp_path)
    monkeypatch.setattr(kheaders, "SRC_DIR", tmp_path)
    monkeypatch.delenv(kheaders.ENV_FALLBACK, raising=False)
    monkeypatch.setattr(kheaders.find, "__defaults__", (None, tmp_path, tmp_path, None))
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 1
    assert "[FAIL] kernel headers" in r.output and "fix: install linux-headers-" in r.output


@pytest.mark.bpf
def test_a_helper_the_kernel_lacks_is_named_with_the_verifiers_words(monkeypatch):
    """What 5.10 shows in the kernel matrix (make test-kernels), made on this
    kernel by probing a helper number no kernel has."""
    from merbridge_py import doctor
    assert doctor.check_helpers().ok
    assert doctor._verifier_says(13, 0, doctor._BPF_FUNC_GET_NETNS_COOKIE) is None
    monkeypatch.setattr(doctor, "_BPF_FUNC_GET_NETNS_COOKIE", 100000)
    c = doctor.check_helpers()
    assert not c.ok
    assert "sockops: " in c.detail and "100000" in c.detail, c.detail
    assert "5.15" in c.fix


def test_a_kernel_older_than_the_oldest_tested_says_so(monkeypatch):
    monkeypatch.setattr(doctor.platform, "release", lambda: "5.15.0-91-generic")
    c = doctor.check_kernel()
    assert c.ok and "the oldest kernel tested" in c.detail and "docs/kernels.md" in c.detail
    monkeypatch.setattr(doctor.platform, "release", lambda: "5.10.0-46-amd64")
    assert not doctor.check_kernel().ok
    monkeypatch.setattr(doctor.platform, "release", lambda: "6.1.0-57-amd64")
    assert doctor.check_kernel().detail == "6.1.0-57-amd64"
