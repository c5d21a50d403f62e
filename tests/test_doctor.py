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
    assert "[FAIL]" not in r.output
    assert r.output.count("[ok  ]") >= 10   # the node checks, the programs loading, the probes
    assert "[ok  ] programs load:" in r.output
    assert "] splice mode: " in r.output and "] probe fionread_redirected: " in r.output


def test_doctor_reports_missing_headers_with_a_fix(monkeypatch, tmp_path):
    from merbridge_py import kheaders
    monkeypatch.setattr(kheaders, "MODULES_DIR", tmp_path)
    monkeypatch.setattr(kheaders, "SRC_DIR", tmp_path)
    monkeypatch.delenv(kheaders.ENV_FALLBACK, raising=False)
    monkeypatch.setattr(kheaders.find, "__defaults__", (None, tmp_path, tmp_path, None))
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 1
    assert "[FAIL] kernel headers" in r.output and "fix: install linux-headers-" in r.output


def test_doctor_names_a_missing_helper_and_the_kernel_to_move_to(monkeypatch):
    """What 5.10 answers (issue 19): sockops refused for bpf_get_netns_cookie."""
    from merbridge_py import doctor as doctor_mod, kernel_probes
    refused = kernel_probes.ProbeResult(
        "programs_load", "missing", "compiling or loading the eBPF programs failed: this kernel lacks "
        "bpf_get_netns_cookie (helper #122), which the programs use (Failed to load BPF program b'sockops')")
    monkeypatch.setattr(kernel_probes, "probe_programs_load", lambda no_reader_hook=None: refused)
    monkeypatch.setattr(kernel_probes, "probe_kernel",
                        lambda: kernel_probes.KernelBehaviour([], kernel_probes.SPLICE_SK_MSG, "FIONREAD right"))
    monkeypatch.setattr(doctor_mod, "CHECKS", (doctor_mod.check_programs_load,))
    monkeypatch.setattr("merbridge_py.datapath._fs_type_of", lambda *_: "bpf")
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 1
    assert "[FAIL] programs load: " in r.output and "bpf_get_netns_cookie" in r.output
    assert "fix: this kernel lacks a hook or helper" in r.output and "6.12.118" in r.output


def _doctor_with_reader_hook_refused(monkeypatch, splice_mode: str):
    """Run doctor's programs-load check on a node whose kernel refuses every
    reader hook (6.1 under lockdown) and whose probes pick `splice_mode`.
    Returns the command's result and what the probe was told (no_reader_hook)."""
    from merbridge_py import doctor as doctor_mod, kernel_probes
    asked = []

    def probe_programs_load(no_reader_hook=None):
        asked.append(no_reader_hook)
        tracing = (f"{kernel_probes.TRACING_NOT_NEEDED}: {no_reader_hook}" if no_reader_hook else
                   f"{kernel_probes.TRACING_UNAVAILABLE}: fexit: EPERM")
        return kernel_probes.ProbeResult("programs_load", "ok", "all 9 programs compiled, passed the verifier and "
                                         f"loaded; {tracing}")
    monkeypatch.setattr(kernel_probes, "probe_programs_load", probe_programs_load)
    monkeypatch.setattr(kernel_probes, "probe_kernel",
                        lambda: kernel_probes.KernelBehaviour([], splice_mode, "as the test says"))
    monkeypatch.setattr(doctor_mod, "CHECKS", (doctor_mod.check_programs_load,))
    monkeypatch.setattr("merbridge_py.datapath._fs_type_of", lambda *_: "bpf")
    return CliRunner().invoke(main, ["doctor"]), asked


def test_doctor_says_no_reader_hook_is_needed_where_the_node_does_not_splice(monkeypatch):
    """Splicing off: nothing failed, no reader hook compiled, no fallback applies."""
    from merbridge_py import datapath, kernel_probes
    monkeypatch.delenv(datapath.BACKLOG_BYTES_ENV, raising=False)
    r, asked = _doctor_with_reader_hook_refused(monkeypatch, kernel_probes.SPLICE_OFF)
    assert r.exit_code == 0, r.output
    assert asked == ["this node does not splice (the kernel probes turned splicing off)"]
    assert "[ok  ] backpressure reader tracing: not needed: this node does not splice" in r.output
    assert "[note]" not in r.output and "MERBRIDGE_BACKLOG_FALLBACK" not in r.output


def test_doctor_says_no_reader_hook_is_needed_without_a_backlog_limit(monkeypatch):
    """MERBRIDGE_BACKLOG_BYTES=0: nothing reads the counts, so the programs-load
    probe compiles no reader hook (as the agent) and no fallback applies."""
    from merbridge_py import datapath, kernel_probes
    monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, "0")
    r, asked = _doctor_with_reader_hook_refused(monkeypatch, kernel_probes.SPLICE_SK_MSG)
    assert r.exit_code == 0, r.output
    assert asked == ["no backlog limit (MERBRIDGE_BACKLOG_BYTES=0)"]
    assert "[ok  ] backpressure reader tracing: not needed: no backlog limit (MERBRIDGE_BACKLOG_BYTES=0)" in r.output
    assert "[note]" not in r.output and "MERBRIDGE_BACKLOG_FALLBACK" not in r.output


def test_doctor_states_the_fallbacks_limits_from_the_datapaths(monkeypatch):
    """The budget and the bulk threshold doctor names are those the agent uses."""
    from merbridge_py import datapath, kernel_probes
    monkeypatch.delenv(datapath.BACKLOG_BYTES_ENV, raising=False)
    r, asked = _doctor_with_reader_hook_refused(monkeypatch, kernel_probes.SPLICE_SK_MSG)
    assert asked == [None]   # a reader hook is needed: the probe compiles one
    assert "[note] backpressure reader tracing: unavailable" in r.output, r.output
    assert "a 2 MiB budget per spliced socket" in r.output and "bulk detection from 8 MiB per 1 s" in r.output
    monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, str(3 << 19))
    monkeypatch.setattr(datapath, "FALLBACK_BULK_BYTES", 4 << 20)
    r, _ = _doctor_with_reader_hook_refused(monkeypatch, kernel_probes.SPLICE_SK_MSG)
    assert "a 1.5 MiB budget per spliced socket" in r.output and "bulk detection from 4 MiB per 1 s" in r.output


def test_doctor_says_what_to_expect_when_the_kernel_hides_redirected_bytes(monkeypatch):
    """6.1's answer: no splicing, and which kernel to move to for it."""
    from merbridge_py import doctor as doctor_mod, kernel_probes
    monkeypatch.setattr(kernel_probes, "probe_fionread_redirected", lambda: kernel_probes.ProbeResult(
        "fionread_redirected", "invisible", "bytes redirected by sk_msg: FIONREAD 0, recv 1000", 0, 1000))
    monkeypatch.setattr(kernel_probes, "probe_fionread_tcp_path", lambda: kernel_probes.ProbeResult(
        "fionread_tcp_path", "visible", "FIONREAD 1000, recv 1000", 1000, 1000))
    monkeypatch.setattr(doctor_mod, "CHECKS", (doctor_mod.check_fionread,))
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    assert "[note] probe fionread_redirected: invisible" in r.output
    assert "[note] splice mode: off:" in r.output and "expect: no splicing on this node" in r.output


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
