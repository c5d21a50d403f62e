import pytest
from click.testing import CliRunner

from merbridge_py.cli import main


@pytest.mark.bpf
def test_doctor_passes_on_a_capable_node():
    from pathlib import Path

    from merbridge_py.datapath import ensure_bpffs
    ensure_bpffs(Path("/sys/fs/bpf"))  # what the agent does at start
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    assert r.output.count("[ok  ]") == 8


def test_doctor_reports_missing_headers_with_a_fix(monkeypatch, tmp_path):
    from merbridge_py import kheaders
    monkeypatch.setattr(kheaders, "MODULES_DIR", tmp_path)
    monkeypatch.setattr(kheaders, "SRC_DIR", tmp_path)
    monkeypatch.delenv(kheaders.ENV_FALLBACK, raising=False)
    monkeypatch.setattr(kheaders.find, "__defaults__", (None, tmp_path, tmp_path, None))
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 1
    assert "[FAIL] kernel headers" in r.output and "fix: install linux-headers-" in r.output
