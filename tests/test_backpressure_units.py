"""The pure Python of backpressure (issue 20): the stall app's stream and its
check, the backlog limit's setting, and the tracing state's metric."""

from __future__ import annotations

import pytest

from merbridge_py import datapath
from merbridge_py.agent.metrics import _backlog_tracing_family
from merbridge_py.testbed.stall_app import StreamCheck, stream_bytes


def test_stream_bytes_name_their_position():
    whole = stream_bytes(0, 4096)
    assert len(whole) == 4096
    assert whole[8:16] == (1).to_bytes(8, "little")
    for offset, length in ((0, 1), (3, 17), (4000, 96), (7, 1)):
        assert stream_bytes(offset, length) == whole[offset:offset + length]


def test_stream_check_finds_the_first_wrong_byte():
    check = StreamCheck()
    for offset, length in ((0, 100), (100, 3), (103, 5000)):
        check.feed(stream_bytes(offset, length))
    assert check.result() == {"bytes": 5103, "in_order": True, "first_bad": None}
    swapped = StreamCheck()
    swapped.feed(stream_bytes(0, 64))
    swapped.feed(stream_bytes(128, 64))   # a chunk overtook the one before it
    swapped.feed(stream_bytes(64, 64))
    assert swapped.result() == {"bytes": 192, "in_order": False, "first_bad": 64}


def test_backlog_bytes_setting(monkeypatch):
    monkeypatch.delenv(datapath.BACKLOG_BYTES_ENV, raising=False)
    assert datapath.backlog_bytes() == datapath.BACKLOG_BYTES
    monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, "0")
    assert datapath.backlog_bytes() == 0   # no limit
    monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, "1048576")
    assert datapath.backlog_bytes() == 1 << 20
    for bad in ("-1", "4294967296", "2MiB"):
        monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, bad)
        with pytest.raises(datapath.DatapathError, match="MERBRIDGE_BACKLOG_BYTES"):
            datapath.backlog_bytes()


class _FakeDatapath:
    def __init__(self, state):
        self.backlog_tracing = state


@pytest.mark.parametrize("state,expected", [("attached", "attached"), ("not attached", "not_attached"),
                                            ("not needed: this node does not splice (x)", "not_needed"),
                                            ("unavailable: attaching tcp_bpf_recvmsg: No such process",
                                             "unavailable")])
def test_backlog_tracing_metric(state, expected):
    family = _backlog_tracing_family(_FakeDatapath(state))
    values = {s.labels["state"]: s.value for s in family.samples}
    assert values == {s: (1 if s == expected else 0) for s in ("attached", "not_attached", "not_needed",
                                                                "unavailable")}


def test_backlog_tracing_state_of_a_datapath(monkeypatch):
    from merbridge_py.mesh import ISTIO
    monkeypatch.delenv(datapath.BACKLOG_BYTES_ENV, raising=False)
    dp = datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused")
    assert dp.backlog_tracing == "not attached"
    dp.tracing_error = "tcp_bpf_recvmsg not in this kernel's BTF"
    assert dp.backlog_tracing.startswith("unavailable: tcp_bpf_recvmsg not in this kernel's BTF; fallback ")


def test_no_reader_hook_is_needed_where_the_node_never_splices(monkeypatch):
    """Said as such, never as a failure with a fallback; and the loader is
    told not to compile one."""
    from merbridge_py import kernel_probes
    from merbridge_py.mesh import ISTIO
    off = kernel_probes.KernelBehaviour([], kernel_probes.SPLICE_OFF, "FIONREAD misses redirected bytes")
    for dp, why in ((datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused", kernel=off),
                     "the kernel probes turned splicing off"),
                    (datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused", splice="never"),
                     "the splice setting is never")):
        assert not dp.reader_hook_needed and not dp._counts_readers()
        dp.tracing_error = "whatever the loader said"   # even so: not needed is what matters
        assert dp.backlog_tracing == f"not needed: this node does not splice ({why})"
    monkeypatch.delenv(datapath.BACKLOG_BYTES_ENV, raising=False)
    assert datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused").reader_hook_needed
    argvs = []

    def fake_run(argv, **_):
        argvs.append(argv)
        raise datapath.DatapathError("stop here")
    monkeypatch.setattr(datapath.subprocess, "run", fake_run)
    for reader_hook in (True, False):
        with pytest.raises(datapath.DatapathError):
            datapath.run_loader("/m", "/p", ["-DX=1"], reader_hook=reader_hook)
    assert ("--no-reader-hook" in argvs[0], "--no-reader-hook" in argvs[1]) == (False, True)
    assert argvs[1][-2:] == ["--", "-DX=1"]


def test_no_reader_hook_is_needed_without_a_backlog_limit(monkeypatch):
    """MERBRIDGE_BACKLOG_BYTES=0: nothing reads the counts, and the tracepoint
    would run on every socket read of the node for nothing."""
    from merbridge_py.mesh import ISTIO
    monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, "0")
    dp = datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused")
    assert not dp.reader_hook_needed and not dp._counts_readers()
    assert dp.backlog_tracing == "not needed: no backlog limit (MERBRIDGE_BACKLOG_BYTES=0)"
    assert {s.labels["state"] for s in _backlog_tracing_family(dp).samples if s.value} == {"not_needed"}


@pytest.mark.parametrize("splice_mode,splice,backlog,why", [
    ("sk_msg", "adaptive", "", None),                          # the usual node: counts are read
    ("sk_msg+stream_verdict", "always", "1048576", None),
    (None, "adaptive", "", None),                              # not probed: sk_msg
    ("off", "adaptive", "", "this node does not splice (the kernel probes turned splicing off)"),
    ("off", "adaptive", "0", "this node does not splice (the kernel probes turned splicing off)"),
    ("sk_msg", "never", "", "this node does not splice (the splice setting is never)"),
    ("sk_msg", "adaptive", "0", "no backlog limit (MERBRIDGE_BACKLOG_BYTES=0)"),
])
def test_why_no_reader_hook(monkeypatch, splice_mode, splice, backlog, why):
    monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, backlog)
    assert datapath.why_no_reader_hook(splice_mode, splice) == why


def test_why_no_reader_hook_refuses_a_bad_backlog_setting(monkeypatch):
    monkeypatch.setenv(datapath.BACKLOG_BYTES_ENV, "2MiB")
    with pytest.raises(datapath.DatapathError, match="MERBRIDGE_BACKLOG_BYTES"):
        datapath.why_no_reader_hook("sk_msg", "adaptive")


def test_a_later_attach_clears_the_tracing_error(monkeypatch):
    """A failed attach of the reader hook (the fallback's limits written)
    does not stay forever: the next attach that works counts readers again."""
    import os

    from merbridge_py import bpf_syscall
    from merbridge_py.mesh import ISTIO
    for name in (datapath.BACKLOG_BYTES_ENV, datapath.BULK_BYTES_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(datapath.BACKLOG_FALLBACK_ENV, "bulk")
    dp = datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused")
    written = []
    monkeypatch.setattr(dp, "_write_config", lambda: written.append(dp.backlog_limits()))
    dp.tracing_progs = {"raw_tracepoint__sock_recv_length": -1}
    answers = [OSError(16, "Device or resource busy")]

    def tracing_attach(prog_fd, name, tracepoint):
        if answers:
            raise answers.pop()
        return os.open("/dev/null", os.O_RDONLY)   # stands for the link fd
    monkeypatch.setattr(bpf_syscall, "tracing_attach", tracing_attach)
    dp._attach_tracing()
    assert dp.backlog_tracing.startswith("unavailable: attaching ") and not dp.tracing_links
    assert written == [(0, datapath.FALLBACK_BULK_BYTES)]
    dp._attach_tracing()
    try:
        assert dp.tracing_error is None and dp.backlog_tracing == "attached: tracepoint sock_recv_length"
        assert written[-1] == (datapath.BACKLOG_BYTES, datapath.BULK_BYTES)   # the fallback's limits gone
    finally:
        dp._detach_tracing()


def test_the_loaders_tracing_error_stays_through_attaches(monkeypatch):
    """The loader's error means no reader program loaded: attaching finds
    nothing to attach, and the fallback stays (unlike a failed attach's)."""
    from merbridge_py import bpf_syscall
    from merbridge_py.mesh import ISTIO
    monkeypatch.delenv(datapath.BACKLOG_BYTES_ENV, raising=False)
    dp = datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused")
    monkeypatch.setattr(dp, "_write_config", lambda: pytest.fail("nothing changed, nothing to write"))
    monkeypatch.setattr(bpf_syscall, "tracing_attach", lambda *_: pytest.fail("no program to attach"))
    dp.tracing_error = "fexit: EPERM; sock_recv_length: not in this kernel"   # as load() takes it from the loader
    for _ in range(2):
        dp._attach_tracing()
        assert dp.tracing_error.startswith("fexit: EPERM") and not dp.tracing_links
        assert dp.backlog_tracing.startswith("unavailable: fexit: EPERM")


@pytest.mark.parametrize("name,value", [(datapath.BACKLOG_FALLBACK_ENV, "bluk"), (datapath.BACKLOG_BYTES_ENV, "2MiB"),
                                        (datapath.BULK_BYTES_ENV, "0")])
def test_a_wrong_setting_stops_the_agent_at_start(monkeypatch, tmp_path, name, value):
    """Even the fallback's, which is read only where no reader hook loads:
    a typo is one clear error at start, not a surprise on some kernel."""
    from click.testing import CliRunner

    from merbridge_py.cli import main
    for other in (datapath.BACKLOG_FALLBACK_ENV, datapath.BACKLOG_BYTES_ENV, datapath.BULK_BYTES_ENV):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    (tmp_path / "pods.yaml").write_text("")
    result = CliRunner().invoke(main, ["run", "--cgroup", str(tmp_path), "--pods-file", str(tmp_path / "pods.yaml")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {name}={value!r}: expected "), result.output


def test_the_fallback_where_readers_progress_cannot_be_counted(monkeypatch):
    from merbridge_py.mesh import ISTIO
    for name in (datapath.BACKLOG_BYTES_ENV, datapath.BULK_BYTES_ENV, datapath.BACKLOG_FALLBACK_ENV):
        monkeypatch.delenv(name, raising=False)
    dp = datapath.Datapath(ISTIO, "/sys/fs/cgroup", "/sys/fs/bpf/unused")
    assert dp.backlog_limits() == (datapath.BACKLOG_BYTES, datapath.BULK_BYTES)
    dp.tracing_error = "the kernel refused to load an fexit program (EPERM: ...)"
    # default: the budget, the limit kept (bounded at any writer rate)
    assert dp.backlog_limits() == (datapath.BACKLOG_BYTES, datapath.BULK_BYTES)
    assert "fallback budget: every spliced socket goes to TCP after 2097152 bytes" in dp.backlog_tracing
    monkeypatch.setenv(datapath.BACKLOG_FALLBACK_ENV, "bulk")           # opt-in: a lower bulk threshold
    assert dp.backlog_limits() == (0, datapath.FALLBACK_BULK_BYTES)
    assert "fallback bulk" in dp.backlog_tracing
    monkeypatch.setenv(datapath.BULK_BYTES_ENV, "1048576")                 # never raised by the fallback
    assert dp.backlog_limits() == (0, 1 << 20)
    monkeypatch.setenv(datapath.BACKLOG_FALLBACK_ENV, "budget")
    assert dp.backlog_limits() == (datapath.BACKLOG_BYTES, 1 << 20)
    assert "fallback budget" in dp.backlog_tracing
    monkeypatch.setenv(datapath.BACKLOG_FALLBACK_ENV, "")                  # empty: the default
    assert dp.backlog_limits() == (datapath.BACKLOG_BYTES, 1 << 20)
    monkeypatch.setenv(datapath.BACKLOG_FALLBACK_ENV, "none")
    with pytest.raises(datapath.DatapathError, match="MERBRIDGE_BACKLOG_FALLBACK"):
        dp.backlog_limits()
