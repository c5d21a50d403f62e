"""Behaviour probes: what this kernel really does with the sockets we splice,
measured instead of read from a version string.

Each FIONREAD probe is built like a case of the kernel's sockmap selftests:
one TCP socket pair on loopback, one sockhash holding both ends, one small
program attached to that map, 1000 bytes sent, one ioctl(FIONREAD) on the
receiver, one recv(). The programs are a few hand-written instructions
loaded with bpf(2), so the agent probes without bcc (and its LLVM); nothing
is attached to a cgroup, so no other socket on the node is touched.

Stable kernels disagree here (docs/kernel-behaviour.md): 6.1 shows 0 for
bytes an sk_msg program redirected; 6.6.128+, 6.12.75+ and 6.18.14+ carry
"bpf, sockmap: Fix FIONREAD for sockmap", which counts only those and shows 0
for bytes that arrived through TCP on a socket in a sockhash, until a later
fix (6.12.118 counts both). Which of them this kernel is decides how the
agent splices (`splice_mode`).
"""

from __future__ import annotations

import ctypes as ct
import fcntl
import json
import os
import re
import select
import socket
import struct
import termios
from dataclasses import asdict, dataclass
from pathlib import Path

from .bpf_syscall import BPF_ANY, BpfError, Cmd, MapType, _ElemAttr, bpf, map_create, prog_attach

PROBE_BYTES = 1000
READ_TIMEOUT = 5.0

# enum bpf_prog_type / bpf_attach_type values used here (UAPI, stable)
PROG_TYPE_SK_SKB = 14
PROG_TYPE_SK_MSG = 16
ATTACH_SK_SKB_STREAM_VERDICT = 5
ATTACH_SK_MSG_VERDICT = 7
BPF_FUNC_MSG_REDIRECT_HASH = 71
BPF_F_INGRESS = 1
SK_PASS = 1
BPF_PSEUDO_MAP_FD = 1


# --- a tiny assembler: the few instructions the probe programs need ------------------

def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _mov_imm(dst: int, imm: int) -> bytes:         # BPF_ALU64 | BPF_MOV | BPF_K
    return _insn(0xB7, dst, imm=imm)


def _mov_reg(dst: int, src: int) -> bytes:         # BPF_ALU64 | BPF_MOV | BPF_X
    return _insn(0xBF, dst, src)


def _add_imm(dst: int, imm: int) -> bytes:         # BPF_ALU64 | BPF_ADD | BPF_K
    return _insn(0x07, dst, imm=imm)


def _store_word(dst: int, off: int, imm: int) -> bytes:   # BPF_ST | BPF_MEM | BPF_W
    return _insn(0x62, dst, off=off, imm=imm)


def _load_map_fd(dst: int, map_fd: int) -> bytes:  # BPF_LD | BPF_DW | BPF_IMM, two slots
    return _insn(0x18, dst, BPF_PSEUDO_MAP_FD, imm=map_fd) + _insn(0)


def _call(helper: int) -> bytes:                   # BPF_JMP | BPF_CALL
    return _insn(0x85, imm=helper)


def _exit() -> bytes:                              # BPF_JMP | BPF_EXIT
    return _insn(0x95)


def pass_program() -> bytes:
    """sk_msg or sk_skb verdict: SK_PASS, nothing else (the message goes through TCP)."""
    return _mov_imm(0, SK_PASS) + _exit()


def redirect_program(map_fd: int, key: int) -> bytes:
    """sk_msg: msg_redirect_hash(msg, map, &key, BPF_F_INGRESS); return SK_PASS,
    what ebpf/sk_msg.bpf.c does for a spliced socket."""
    return (_store_word(10, -4, key) + _load_map_fd(2, map_fd) + _mov_reg(3, 10) + _add_imm(3, -4)
            + _mov_imm(4, BPF_F_INGRESS) + _call(BPF_FUNC_MSG_REDIRECT_HASH) + _mov_imm(0, SK_PASS) + _exit())


class _ProgLoadAttr(ct.Structure):
    _fields_ = [("prog_type", ct.c_uint32), ("insn_cnt", ct.c_uint32), ("insns", ct.c_uint64),
                ("license", ct.c_uint64), ("log_level", ct.c_uint32), ("log_size", ct.c_uint32),
                ("log_buf", ct.c_uint64), ("kern_version", ct.c_uint32), ("prog_flags", ct.c_uint32),
                ("prog_name", ct.c_char * 16), ("prog_ifindex", ct.c_uint32),
                ("expected_attach_type", ct.c_uint32)]


def prog_load(prog_type: int, insns: bytes, expected_attach_type: int = 0) -> tuple[int, str]:
    """Load a program; (fd, "") or (-1, the verifier's log). The log is kept
    because it names what the kernel lacks ("unknown func bpf_x#N")."""
    code = ct.create_string_buffer(insns, len(insns))
    license_text = ct.create_string_buffer(b"GPL")
    log = ct.create_string_buffer(64 * 1024)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ct.addressof(code),
                         license=ct.addressof(license_text), log_level=1, log_size=len(log),
                         log_buf=ct.addressof(log), expected_attach_type=expected_attach_type)
    try:
        return bpf(Cmd.PROG_LOAD, attr, "loading a probe program"), ""
    except BpfError as e:
        return -1, log.value.decode(errors="replace").strip() or e.strerror


# --- the FIONREAD probes ---------------------------------------------------------------

@dataclass
class ProbeResult:
    """One probe's answer. `result` is one word (the metric's label);
    `explanation` says what was measured."""

    probe: str
    result: str            # "visible" / "invisible" for FIONREAD probes, "ok" / "missing" / "error"
    explanation: str
    fionread: int | None = None
    received: int | None = None

    @property
    def ok(self) -> bool:
        return self.result in ("visible", "ok")


def _sockhash_update(map_fd: int, key: int, sock_fd: int) -> None:
    k, v = ct.c_uint32(key), ct.c_uint32(sock_fd)
    bpf(Cmd.MAP_UPDATE_ELEM, _ElemAttr(map_fd=map_fd, key=ct.addressof(k), value=ct.addressof(v), flags=BPF_ANY),
        "inserting a socket into the probe's sockhash")


def fionread(sock: socket.socket) -> int:
    buf = struct.pack("i", 0)
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf))[0]


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=READ_TIMEOUT)
        server, _ = listener.accept()
    server.settimeout(READ_TIMEOUT)
    return client, server


def read_when_ready(receiver: socket.socket, expected: int) -> tuple[int, int]:
    """Wait until the receiver is readable (as an app would, with select),
    then FIONREAD, then recv everything that arrived: (fionread, received).
    Waits a little for all `expected` bytes to be queued first, so a partial
    arrival is not mistaken for an invisible byte count."""
    ready, _, _ = select.select([receiver], [], [], READ_TIMEOUT)
    if not ready:
        return 0, 0
    # let the rest arrive (the sender wrote it in one call; loopback is quick)
    deadline_polls = 50
    seen = fionread(receiver)
    while seen < expected and deadline_polls:
        select.select([], [], [], 0.01)
        seen = fionread(receiver)
        deadline_polls -= 1
    received = 0
    receiver.setblocking(False)
    try:
        while received < expected:
            try:
                chunk = receiver.recv(65536)
            except BlockingIOError:
                if not select.select([receiver], [], [], 0.5)[0]:
                    break
                continue
            if not chunk:
                break
            received += len(chunk)
    finally:
        receiver.setblocking(True)
    return seen, received


def _run_pair_probe(name: str, msg_program, stream_verdict: bool, what: str) -> ProbeResult:
    """Sockhash {0: client, 1: server}; `msg_program(map_fd)` on it (and an
    SK_PASS stream verdict program if asked); the client sends PROBE_BYTES."""
    fds: list[int] = []
    socks: list[socket.socket] = []
    try:
        map_fd = map_create(MapType.SOCKHASH, 4, 4, 2)
        fds.append(map_fd)
        prog_fd, log = prog_load(PROG_TYPE_SK_MSG, msg_program(map_fd), ATTACH_SK_MSG_VERDICT)
        if prog_fd < 0:
            return ProbeResult(name, "error", f"the kernel refused the probe's sk_msg program: {_last_line(log)}")
        fds.append(prog_fd)
        prog_attach(map_fd, prog_fd, ATTACH_SK_MSG_VERDICT)
        if stream_verdict:
            skb_fd, log = prog_load(PROG_TYPE_SK_SKB, pass_program(), ATTACH_SK_SKB_STREAM_VERDICT)
            if skb_fd < 0:
                return ProbeResult(name, "error", f"the kernel refused an sk_skb stream verdict program: "
                                                  f"{_last_line(log)}")
            fds.append(skb_fd)
            prog_attach(map_fd, skb_fd, ATTACH_SK_SKB_STREAM_VERDICT)
        client, server = _loopback_pair()
        socks += [client, server]
        _sockhash_update(map_fd, 0, client.fileno())
        _sockhash_update(map_fd, 1, server.fileno())
        client.sendall(b"x" * PROBE_BYTES)
        seen, received = read_when_ready(server, PROBE_BYTES)
    except OSError as e:
        return ProbeResult(name, "error", f"the probe could not run: {e}")
    finally:
        for s in socks:
            s.close()
        for fd in fds:
            os.close(fd)
    if received == 0:
        return ProbeResult(name, "error", f"{what}: nothing arrived within {READ_TIMEOUT:.0f} s", seen, received)
    visible = seen >= received
    return ProbeResult(name, "visible" if visible else "invisible",
                       f"{what}: FIONREAD {seen}, recv {received}", seen, received)


def probe_fionread_redirected() -> ProbeResult:
    """Bytes an sk_msg program redirected into the peer's ingress queue."""
    return _run_pair_probe("fionread_redirected", lambda map_fd: redirect_program(map_fd, 1), False,
                           "bytes redirected by sk_msg")


def probe_fionread_tcp_path() -> ProbeResult:
    """Bytes that came through TCP to a socket in a sockhash with only an
    sk_msg program (which said SK_PASS): a bulk or missed send of ours."""
    return _run_pair_probe("fionread_tcp_path", lambda map_fd: pass_program(), False,
                           "bytes through TCP to a socket in a sockhash (sk_msg SK_PASS)")


def probe_fionread_tcp_path_stream_verdict() -> ProbeResult:
    """The same with an SK_PASS stream verdict program on the sockhash too:
    TCP-path bytes then go through the socket's psock queue as well."""
    return _run_pair_probe("fionread_tcp_path_stream_verdict", lambda map_fd: pass_program(), True,
                           "bytes through TCP to a socket in a sockhash with an SK_PASS stream verdict")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def probe_order_after_tcp() -> ProbeResult:
    """Bytes that went through TCP before the receiver joined the sockhash,
    then bytes redirected after: does the reader get them in order? (Not an
    input to the decision: sk_msg.bpf.c never redirects after a TCP send; it
    says why it must not.)"""
    name = "order_after_tcp"
    fds: list[int] = []
    socks: list[socket.socket] = []
    try:
        map_fd = map_create(MapType.SOCKHASH, 4, 4, 2)
        fds.append(map_fd)
        prog_fd, log = prog_load(PROG_TYPE_SK_MSG, redirect_program(map_fd, 1), ATTACH_SK_MSG_VERDICT)
        if prog_fd < 0:
            return ProbeResult(name, "error", f"the kernel refused the probe's sk_msg program: {_last_line(log)}")
        fds.append(prog_fd)
        prog_attach(map_fd, prog_fd, ATTACH_SK_MSG_VERDICT)
        client, server = _loopback_pair()
        socks += [client, server]
        _sockhash_update(map_fd, 0, client.fileno())
        half = PROBE_BYTES // 2
        client.sendall(b"a" * half)            # the receiver is not in the map: through TCP
        read_when_ready_peek(server, half)
        _sockhash_update(map_fd, 1, server.fileno())
        client.sendall(b"b" * half)            # now redirected into its ingress queue
        data = _recv_exactly(server, 2 * half)
    except OSError as e:
        return ProbeResult(name, "error", f"the probe could not run: {e}")
    finally:
        for s in socks:
            s.close()
        for fd in fds:
            os.close(fd)
    if len(data) != 2 * half:
        return ProbeResult(name, "error", f"received {len(data)} of {2 * half} bytes", received=len(data))
    in_order = data == b"a" * half + b"b" * half
    return ProbeResult(name, "in_order" if in_order else "reordered",
                       f"{half} bytes through TCP, then {half} redirected after the receiver joined: read "
                       + ("in order" if in_order else "redirected bytes first"), received=len(data))


def read_when_ready_peek(sock: socket.socket, n: int) -> None:
    """Wait until `n` bytes are queued on `sock`, without reading them."""
    for _ in range(500):
        if select.select([sock], [], [], 0.01)[0] and len(sock.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= n:
            return


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and select.select([sock], [], [], READ_TIMEOUT)[0]:
        try:
            chunk = sock.recv(n - len(data), socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return data


# --- helpers the programs need ------------------------------------------------------

_UNKNOWN_FUNC = re.compile(r"(?:unknown|invalid) func (\w+)#(\d+)")


def missing_helpers(verifier_log: str) -> list[str]:
    """Helpers a verifier log says this kernel does not offer the program
    (e.g. 5.10: "unknown func bpf_get_netns_cookie#122" for sockops)."""
    seen = []
    for name, number in _UNKNOWN_FUNC.findall(verifier_log):
        label = f"{name if name.startswith('bpf_') else 'bpf_' + name} (helper #{number})"
        if label not in seen:
            seen.append(label)
    return seen


TRACING_UNAVAILABLE = "backpressure's reader tracing unavailable"
TRACING_NOT_NEEDED = "backpressure's reader hook not compiled: not needed"


def probe_programs_load(bpffs_root: Path = Path("/sys/fs/bpf"), no_reader_hook: str | None = None) -> ProbeResult:
    """Compile and verify every program of the datapath, as the agent does at
    start (the loader child, into throwaway pins): the one sure test that
    this kernel offers every hook and helper they use. A refusal names the
    missing helper from the verifier's log. `no_reader_hook`: why this node
    needs no reader hook of backpressure's (datapath.why_no_reader_hook), so
    none is compiled, as the agent does; None: it needs one."""
    import shutil
    import tempfile

    from .datapath import DatapathError, HOOKS, run_loader
    from .mesh import get_profile
    name = "programs_load"
    try:
        scratch = Path(tempfile.mkdtemp(prefix="merbridge-probe-", dir=bpffs_root))
    except OSError as e:
        return ProbeResult(name, "error", f"cannot make a scratch directory under {bpffs_root}: {e.strerror}")
    try:
        loaded = run_loader(scratch / "maps", scratch / "progs", get_profile("istio").cflags(),
                            reader_hook=no_reader_hook is None)
        # backpressure's reader side is optional (datapath.READER_HOOKS): said, never a failure
        tracing = (f"; {TRACING_NOT_NEEDED}: {no_reader_hook}" if no_reader_hook else
                   f"; {TRACING_UNAVAILABLE}: {loaded['tracing_error']}" if loaded.get("tracing_error") else
                   f"; backpressure's reader tracing loaded and attached ({loaded.get('reader_tracing')})")
        return ProbeResult(name, "ok", f"all {len(HOOKS)} programs compiled, passed the verifier and loaded{tracing}")
    except DatapathError as e:
        missing = missing_helpers(str(e))
        return ProbeResult(name, "missing" if missing else "error", str(e))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- the decision ---------------------------------------------------------------------

SPLICE_SK_MSG = "sk_msg"                        # splice; sk_msg program only
SPLICE_STREAM_VERDICT = "sk_msg+stream_verdict"  # splice; sk_skb stream verdict added (ebpf/sk_skb.bpf.c)
SPLICE_OFF = "off"                               # never splice: redirect and SO_ORIGINAL_DST only
SPLICE_MODES = (SPLICE_SK_MSG, SPLICE_STREAM_VERDICT, SPLICE_OFF)
SPLICE_MODE_ENV = "MERBRIDGE_SPLICE_MODE"        # measurements only: force a mode (docs/kernel-behaviour.md)


@dataclass
class KernelBehaviour:
    probes: list[ProbeResult]
    splice_mode: str
    why: str
    forced: bool = False

    def to_json(self) -> dict:
        return {"splice_mode": self.splice_mode, "why": self.why, "forced": self.forced,
                "probes": [asdict(p) for p in self.probes]}

    def summary(self) -> str:
        found = ", ".join(f"{p.probe} {p.result}" for p in self.probes)
        return f"kernel probes: {found}; splice mode {self.splice_mode}: {self.why}"


def choose(redirected: ProbeResult, tcp_path: ProbeResult, stream_verdict: ProbeResult | None) -> tuple[str, str]:
    """The splice mode that keeps FIONREAD right, from the probes: (mode, why)."""
    if redirected.result != "visible":
        return SPLICE_OFF, ("FIONREAD does not count bytes an sk_msg program redirects on this kernel "
                            f"({_counts(redirected)}): sockets are not spliced; connections are still "
                            "redirected without iptables")
    if tcp_path.result == "visible":
        return SPLICE_SK_MSG, "FIONREAD counts redirected bytes and bytes that come through TCP to a spliced socket"
    if stream_verdict is not None and stream_verdict.result == "visible":
        return SPLICE_STREAM_VERDICT, ("FIONREAD misses bytes that come through TCP to a socket in a sockhash "
                                       f"({_counts(tcp_path)}) unless a stream verdict program queues them "
                                       f"with the redirected ones ({_counts(stream_verdict)}): added")
    return SPLICE_OFF, (f"FIONREAD misses bytes that come through TCP to a spliced socket ({_counts(tcp_path)}) "
                        "and a stream verdict program does not help: sockets are not spliced")


def _counts(p: ProbeResult) -> str:
    return f"FIONREAD {p.fionread}, recv {p.received}" if p.received is not None else p.explanation


def probe_kernel() -> KernelBehaviour:
    """Run the FIONREAD probes and pick the splice mode (what the agent does once at start)."""
    redirected = probe_fionread_redirected()
    tcp_path = probe_fionread_tcp_path()
    probes = [redirected, tcp_path]
    stream_verdict = None
    if redirected.result == "visible" and tcp_path.result != "visible":
        stream_verdict = probe_fionread_tcp_path_stream_verdict()
        probes.append(stream_verdict)
    mode, why = choose(redirected, tcp_path, stream_verdict)
    forced = os.environ.get(SPLICE_MODE_ENV)
    if forced:
        if forced not in SPLICE_MODES:
            raise ValueError(f"{SPLICE_MODE_ENV}={forced!r}: expected one of {', '.join(SPLICE_MODES)}")
        return KernelBehaviour(probes, forced, f"forced by {SPLICE_MODE_ENV} (the probes chose {mode}: {why})",
                               forced=True)
    return KernelBehaviour(probes, mode, why)


def main(argv: list[str] | None = None) -> int:
    """`python -m merbridge_py.kernel_probes [--all]`: the probes as JSON (the kernel matrix reads this)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m merbridge_py.kernel_probes", description=main.__doc__)
    parser.add_argument("--all", action="store_true",
                        help="also the order probe and compiling/verifying every program (needs bcc)")
    args = parser.parse_args(argv)
    behaviour = probe_kernel()
    out = behaviour.to_json()
    if args.all:
        from .datapath import DatapathError, why_no_reader_hook
        try:
            # "adaptive": the agent's default --splice (the probes cannot know a DaemonSet's)
            no_reader_hook = why_no_reader_hook(behaviour.splice_mode, "adaptive")
        except DatapathError as e:   # a bad MERBRIDGE_BACKLOG_BYTES
            parser.error(str(e))
        out["probes"] += [asdict(probe_order_after_tcp()), asdict(probe_programs_load(no_reader_hook=no_reader_hook))]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
