"""What each splice mode of docs/kernel-behaviour.md costs, at the socket level.

One loopback TCP pair (no sidecars, no test bed: the machine is shared and
noisy, and this isolates the kernel mechanics the modes differ in), measured
in interleaved rounds (the order rotates every round), reported as the median
of the round-by-round ratios:

- request/response: 100-byte ping-pong, `--round-trips` per measurement, on
  plain TCP (mode `off`), redirected both ways by sk_msg (`sk_msg`), and the
  same with the SK_PASS stream verdict attached (`sk_msg+stream_verdict`);
- bulk: `--bulk-mib` one way on plain TCP, and on a pair in a sockhash whose
  sk_msg program says SK_PASS (a socket bulk detection sent back to TCP), with
  and without the stream verdict.

    .venv/bin/python benchmarks/splice_modes.py [--rounds 15] [--round-trips 20000] [--bulk-mib 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import threading
import time

from merbridge_py import kernel_probes as kp
from merbridge_py.bpf_syscall import MapType, map_create, prog_attach


def redirect_to_peer_program(map_fd: int) -> bytes:
    """sk_msg: redirect to the socket stored under the sender's own local port
    (each end is inserted under the other's port), then SK_PASS."""
    ldx_w = kp._insn(0x61, 2, 1, off=64)      # r2 = msg->local_port (struct sk_msg_md)
    stx_w = kp._insn(0x63, 10, 2, off=-4)     # *(u32 *)(r10 - 4) = r2
    return (ldx_w + stx_w + kp._load_map_fd(2, map_fd) + kp._mov_reg(3, 10) + kp._add_imm(3, -4)
            + kp._mov_imm(4, kp.BPF_F_INGRESS) + kp._call(kp.BPF_FUNC_MSG_REDIRECT_HASH)
            + kp._mov_imm(0, kp.SK_PASS) + kp._exit())


def sockhash_with_programs(sk_msg_code, stream_verdict: bool, fds: list[int]) -> int:
    """A two-slot sockhash with an sk_msg program (sk_msg_code(map_fd) gives
    its instructions) and, if asked, a stream verdict that passes every
    segment; every fd it opens goes into `fds`. Returns the map's fd."""
    m = map_create(MapType.SOCKHASH, 4, 4, 2)
    fds.append(m)
    p, log = kp.prog_load(kp.PROG_TYPE_SK_MSG, sk_msg_code(m), kp.ATTACH_SK_MSG_VERDICT)
    if p < 0:
        raise SystemExit(log)
    fds.append(p)
    prog_attach(m, p, kp.ATTACH_SK_MSG_VERDICT)
    if stream_verdict:
        q, log = kp.prog_load(kp.PROG_TYPE_SK_SKB, kp.pass_program(), kp.ATTACH_SK_SKB_STREAM_VERDICT)
        if q < 0:
            raise SystemExit(log)
        fds.append(q)
        prog_attach(m, q, kp.ATTACH_SK_SKB_STREAM_VERDICT)
    return m


class Pair:
    """A loopback pair set up as one mode has it."""

    def __init__(self, msg: str | None, stream_verdict: bool):
        self.fds = []
        self.client, self.server = kp._loopback_pair()
        self.client.settimeout(None)
        self.server.settimeout(None)
        for s in (self.client, self.server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if msg is None:
            return
        m = sockhash_with_programs(
            lambda m: redirect_to_peer_program(m) if msg == "redirect" else kp.pass_program(),
            stream_verdict, self.fds)
        kp._sockhash_update(m, self.server.getsockname()[1], self.client.fileno())
        kp._sockhash_update(m, self.client.getsockname()[1], self.server.fileno())

    def close(self):
        self.client.close()
        self.server.close()
        for fd in self.fds:
            os.close(fd)


def _recv_exactly(sock, n):
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError
        got += len(chunk)


def request_response(pair: Pair, round_trips: int) -> float:
    """Round trips per second."""
    msg = b"q" * 100

    def echo():
        for _ in range(round_trips):
            _recv_exactly(pair.server, 100)
            pair.server.sendall(msg)
    t = threading.Thread(target=echo)
    t.start()
    started = time.perf_counter()
    for _ in range(round_trips):
        pair.client.sendall(msg)
        _recv_exactly(pair.client, 100)
    elapsed = time.perf_counter() - started
    t.join()
    return round_trips / elapsed


def bulk(pair: Pair, total: int) -> float:
    """MiB/s received."""
    buf = b"x" * (128 << 10)

    def write():
        sent = 0
        while sent < total:
            pair.client.sendall(buf)
            sent += len(buf)
        pair.client.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=write)
    started = time.perf_counter()
    t.start()
    got = 0
    while True:
        chunk = pair.server.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    elapsed = time.perf_counter() - started
    t.join()
    assert got == total
    return total / elapsed / 2**20


CASES = {
    "request/response": {"off": (None, False), "sk_msg": ("redirect", False),
                         "sk_msg+stream_verdict": ("redirect", True)},
    "bulk (fallen back to TCP)": {"off": (None, False), "sk_msg": ("pass", False),
                                  "sk_msg+stream_verdict": ("pass", True)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--bulk-mib", type=int, default=256)
    args = parser.parse_args()
    results = {case: {mode: [] for mode in modes} for case, modes in CASES.items()}
    for r in range(args.rounds):
        for case, modes in CASES.items():
            order = list(modes)
            order = order[r % len(order):] + order[:r % len(order)]
            for mode in order:
                pair = Pair(*modes[mode])
                try:
                    value = (request_response(pair, args.round_trips) if case == "request/response"
                             else bulk(pair, args.bulk_mib << 20))
                finally:
                    pair.close()
                results[case][mode].append(value)
    unit = {"request/response": "round trips/s", "bulk (fallen back to TCP)": "MiB/s"}
    print(f"{args.rounds} interleaved rounds; median of per-round ratios (higher is better for both)")
    for case, modes in results.items():
        off = modes["off"]
        for mode, values in modes.items():
            vs_off = statistics.median(v / o for v, o in zip(values, off))
            vs_msg = statistics.median(v / o for v, o in zip(values, modes["sk_msg"]))
            q = statistics.quantiles(values, n=4)
            print(f"{case:28} {mode:22} median {statistics.median(values):10.0f} {unit[case]:14} "
                  f"IQR/median {(q[2] - q[0]) / statistics.median(values):5.2f}  vs off {vs_off:5.2f}  "
                  f"vs sk_msg {vs_msg:5.2f}")


if __name__ == "__main__":
    main()
