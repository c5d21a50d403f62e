"""The behaviour probes against a direct, independent measurement made here:
the same question asked with a C program compiled by bcc (as the kernel's
sockmap selftests would write it), not with the probes' hand-assembled
instructions. So these tests hold on every kernel, whatever its answer: on
6.1.192 redirected bytes are invisible, on 6.12.100 and 6.18.44 TCP-path
bytes are, on 6.12.118 neither (docs/kernel-behaviour.md)."""

from __future__ import annotations

import ctypes as ct
import os
import socket
import time

import pytest

from merbridge_py import kernel_probes as kp
from merbridge_py.bpf_syscall import BPF_ANY, Cmd, _ElemAttr, bpf

DIRECT_PROGRAMS = r"""
#include <uapi/linux/bpf.h>
BPF_SOCKHASH(pair, u32, 2);

int msg_redirect(struct sk_msg_md *msg)
{
    u32 peer = 1;
    pair.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    return SK_PASS;
}

int msg_pass(struct sk_msg_md *msg)
{
    return SK_PASS;
}

int skb_pass(struct __sk_buff *skb)
{
    return SK_PASS;
}
"""


class Direct:
    """One bcc-compiled sockhash and its programs: the independent measurement."""

    def __init__(self):
        from bcc import BPF, BPFAttachType, BPFProgType
        from bcc import libbcc

        from merbridge_py import kheaders
        kheaders.find().apply()
        self.bpf = BPF(text=DIRECT_PROGRAMS.encode())
        self.map_fd = libbcc.lib.bpf_table_fd(self.bpf.module, b"pair")
        self.types = BPFProgType, BPFAttachType

    def measure(self, msg_prog: str, stream_verdict: bool, before_join: int = 0) -> tuple[int, int, bytes]:
        """Send 1000 bytes (`before_join` of them before the receiver joins
        the map); (FIONREAD when readable, bytes received, the bytes)."""
        BPFProgType, BPFAttachType = self.types
        fn = self.bpf.load_func(msg_prog.encode(), BPFProgType.SK_MSG, attach_type=BPFAttachType.SK_MSG_VERDICT)
        self.bpf.attach_func(fn, self.map_fd, BPFAttachType.SK_MSG_VERDICT)
        if stream_verdict:
            skb = self.bpf.load_func(b"skb_pass", BPFProgType.SK_SKB,
                                     attach_type=BPFAttachType.SK_SKB_STREAM_VERDICT)
            self.bpf.attach_func(skb, self.map_fd, BPFAttachType.SK_SKB_STREAM_VERDICT)
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        listener.close()
        try:
            self._insert(0, client)
            if before_join:
                client.sendall(b"a" * before_join)
                time.sleep(0.2)
            self._insert(1, server)
            client.sendall(b"b" * (1000 - before_join))
            time.sleep(0.2)      # everything has arrived on loopback by now
            buf = ct.c_int(0)
            import fcntl
            import termios
            fcntl.ioctl(server.fileno(), termios.FIONREAD, buf)
            data = b""
            server.settimeout(2)
            while len(data) < 1000:
                try:
                    chunk = server.recv(4096)
                except socket.timeout:
                    break
                if not chunk:
                    break
                data += chunk
            return buf.value, len(data), data
        finally:
            client.close()
            server.close()

    def _insert(self, key: int, sock: socket.socket) -> None:
        k, v = ct.c_uint32(key), ct.c_uint32(sock.fileno())
        bpf(Cmd.MAP_UPDATE_ELEM, _ElemAttr(map_fd=self.map_fd, key=ct.addressof(k), value=ct.addressof(v),
                                           flags=BPF_ANY), "test sockhash insert")

    def close(self):
        self.bpf.cleanup()


@pytest.fixture
def direct():
    d = Direct()
    yield d
    d.close()


def _word(fionread: int, received: int) -> str:
    return "visible" if fionread >= received else "invisible"


@pytest.mark.bpf
def test_redirected_probe_matches_a_direct_measurement(direct):
    seen, received, _ = direct.measure("msg_redirect", stream_verdict=False)
    assert received == 1000
    probe = kp.probe_fionread_redirected()
    assert (probe.result, probe.received) == (_word(seen, received), 1000), (probe, seen)


@pytest.mark.bpf
def test_tcp_path_probe_matches_a_direct_measurement(direct):
    seen, received, _ = direct.measure("msg_pass", stream_verdict=False)
    assert received == 1000
    probe = kp.probe_fionread_tcp_path()
    assert (probe.result, probe.received) == (_word(seen, received), 1000), (probe, seen)


@pytest.mark.bpf
def test_stream_verdict_probe_matches_a_direct_measurement(direct):
    seen, received, _ = direct.measure("msg_pass", stream_verdict=True)
    assert received == 1000
    probe = kp.probe_fionread_tcp_path_stream_verdict()
    assert (probe.result, probe.received) == (_word(seen, received), 1000), (probe, seen)


@pytest.mark.bpf
def test_order_probe_matches_a_direct_measurement(direct):
    _, received, data = direct.measure("msg_redirect", stream_verdict=False, before_join=500)
    assert received == 1000
    direct_word = "in_order" if data == b"a" * 500 + b"b" * 500 else "reordered"
    assert kp.probe_order_after_tcp().result == direct_word


@pytest.mark.bpf
def test_the_chosen_mode_follows_the_probes_on_this_kernel():
    k = kp.probe_kernel()
    by_name = {p.probe: p.result for p in k.probes}
    expected, _ = kp.choose(*(next(p for p in k.probes if p.probe == n) if n in by_name else None
                              for n in ("fionread_redirected", "fionread_tcp_path",
                                        "fionread_tcp_path_stream_verdict")))
    assert k.splice_mode == expected and not k.forced
    assert k.probes[0].probe == "fionread_redirected" and k.why


@pytest.mark.bpf
def test_every_program_loads_on_this_kernel():
    r = kp.probe_programs_load()
    assert r.result == "ok", r.explanation
    assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith("merbridge-probe-")]   # scratch removed


def _r(name, result, fionread=1000):
    return kp.ProbeResult(name, result, "x", fionread, 1000)


@pytest.mark.parametrize("redirected,tcp_path,stream_verdict,mode", [
    ("invisible", "visible", None, kp.SPLICE_OFF),                         # 6.1.192
    ("visible", "invisible", "visible", kp.SPLICE_STREAM_VERDICT),         # 6.12.100, 6.18.44
    ("visible", "visible", None, kp.SPLICE_SK_MSG),                        # 6.12.118
    ("visible", "invisible", "invisible", kp.SPLICE_OFF),                  # no remedy works
    ("error", "error", None, kp.SPLICE_OFF),                               # probes could not run
])
def test_choice_per_probe_outcome(redirected, tcp_path, stream_verdict, mode):
    sv = _r("fionread_tcp_path_stream_verdict", stream_verdict) if stream_verdict else None
    chosen, why = kp.choose(_r("fionread_redirected", redirected), _r("fionread_tcp_path", tcp_path), sv)
    assert chosen == mode and why


def test_forced_mode_is_checked_and_said(monkeypatch):
    monkeypatch.setattr(kp, "probe_fionread_redirected", lambda: _r("fionread_redirected", "visible"))
    monkeypatch.setattr(kp, "probe_fionread_tcp_path", lambda: _r("fionread_tcp_path", "visible"))
    monkeypatch.setenv(kp.SPLICE_MODE_ENV, kp.SPLICE_OFF)
    k = kp.probe_kernel()
    assert (k.splice_mode, k.forced) == (kp.SPLICE_OFF, True) and "the probes chose sk_msg" in k.why
    monkeypatch.setenv(kp.SPLICE_MODE_ENV, "bogus")
    with pytest.raises(ValueError, match="MERBRIDGE_SPLICE_MODE"):
        kp.probe_kernel()


def test_missing_helper_is_named_from_the_verifier_log():
    log = ("0: (bf) r6 = r1\n1: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\n"
           "processed 2 insns\nerror: Failed to load BPF program b'sockops': Invalid argument")
    assert kp.missing_helpers(log) == ["bpf_get_netns_cookie (helper #122)"]
    assert kp.missing_helpers("invalid func unknown#212") == ["bpf_unknown (helper #212)"]
    assert kp.missing_helpers("all fine") == []


def test_metrics_and_status_show_the_kernel_behaviour():
    from click.testing import CliRunner
    from prometheus_client import generate_latest

    from merbridge_py.agent import status as status_cmd
    from merbridge_py.agent.metrics import AgentMetrics
    k = kp.KernelBehaviour([_r("fionread_redirected", "visible"), _r("fionread_tcp_path", "invisible", 0)],
                           kp.SPLICE_STREAM_VERDICT, "because")
    m = AgentMetrics()
    m.kernel = k
    text = generate_latest(m.registry).decode()
    assert 'merbridge_kernel_probe{probe="fionread_tcp_path",result="invisible"} 1.0' in text
    assert 'merbridge_splice_mode{mode="sk_msg+stream_verdict"} 1.0' in text
    assert 'merbridge_splice_mode{mode="off"} 0.0' in text
    answer = {"mode": "ebpf", "attached": True, "ready": True, "pods": [], "kernel": k.to_json()}
    orig = status_cmd.agent_request
    status_cmd.agent_request = lambda *_a, **_k: answer
    try:
        out = CliRunner().invoke(status_cmd.status, []).output
    finally:
        status_cmd.agent_request = orig
    assert "splice mode: sk_msg+stream_verdict (because)" in out


@pytest.mark.parametrize("splice_mode,backlog,told", [
    (kp.SPLICE_SK_MSG, "", None),
    (kp.SPLICE_OFF, "", "this node does not splice (the kernel probes turned splicing off)"),
    (kp.SPLICE_SK_MSG, "0", "no backlog limit (MERBRIDGE_BACKLOG_BYTES=0)"),
])
def test_all_compiles_a_reader_hook_only_where_the_agent_would(monkeypatch, capsys, splice_mode, backlog, told):
    """`kernel_probes --all` follows datapath.why_no_reader_hook, as the agent does."""
    import json
    asked = []
    monkeypatch.setenv("MERBRIDGE_BACKLOG_BYTES", backlog)
    monkeypatch.setattr(kp, "probe_kernel", lambda: kp.KernelBehaviour([], splice_mode, "as the test says"))
    monkeypatch.setattr(kp, "probe_order_after_tcp", lambda: kp.ProbeResult("order_after_tcp", "ok", "in order"))

    def probe_programs_load(no_reader_hook=None):
        asked.append(no_reader_hook)
        return kp.ProbeResult("programs_load", "ok", "loaded")
    monkeypatch.setattr(kp, "probe_programs_load", probe_programs_load)
    assert kp.main(["--all"]) == 0
    assert asked == [told]
    assert [p["probe"] for p in json.loads(capsys.readouterr().out)["probes"]] == ["order_after_tcp", "programs_load"]


def test_all_refuses_a_bad_backlog_setting(monkeypatch, capsys):
    monkeypatch.setenv("MERBRIDGE_BACKLOG_BYTES", "2MiB")
    monkeypatch.setattr(kp, "probe_kernel", lambda: kp.KernelBehaviour([], kp.SPLICE_SK_MSG, "as the test says"))
    with pytest.raises(SystemExit) as exit_:
        kp.main(["--all"])
    assert exit_.value.code == 2 and "MERBRIDGE_BACKLOG_BYTES='2MiB': expected" in capsys.readouterr().err
