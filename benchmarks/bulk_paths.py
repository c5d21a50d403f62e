"""Where a bulk transfer through a sockhash loses against plain TCP (issue 21).

One loopback TCP pair, one way, `--bulk-mib` per measurement, in interleaved
rounds (the order rotates every round), reported as the median of the
round-by-round ratios to plain TCP. The pair is set up as each path a socket
of the datapath can be on:

- plain:            neither socket in a sockhash (a connection never spliced);
- fallen back:      both in the sockhash, sk_msg says SK_PASS (a socket that
                    bulk detection sent back to TCP: it keeps its psock);
- fallen back, apply_bytes: the same, the program calling
                    bpf_msg_apply_bytes(1 GiB) so the kernel skips it for
                    the following sends (what a bulk socket could ask for);
- sender only:      only the sending socket in the sockhash (what a sender
                    that left the sockhash would spare: the receiver's part);
- receiver only:    only the receiving socket in the sockhash;
- spliced:          both in, every message redirected to the peer's ingress
                    queue (bulk detection off: no TCP flow control).

With `--stream-verdict` (the default where the agent attaches one, as on
6.18.44) the sockhash also has the SK_PASS stream verdict, so every segment a
member receives passes its psock queue.

    .venv/bin/python benchmarks/bulk_paths.py [--rounds 9] [--bulk-mib 256] [--no-stream-verdict]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics

from splice_modes import bulk, redirect_to_peer_program, sockhash_with_programs

from merbridge_py import kernel_probes as kp

BPF_FUNC_MSG_APPLY_BYTES = 61   # include/uapi/linux/bpf.h

PATHS = {  # name -> (sk_msg program, sender in the sockhash, receiver in the sockhash)
    "plain": (None, False, False),
    "fallen back": ("pass", True, True),
    "fallen back, apply_bytes": ("apply", True, True),
    "sender only": ("pass", True, False),
    "receiver only": ("pass", False, True),
    "spliced": ("redirect", True, True),
}


class Pair:
    """A loopback pair, the client sending, set up as one path has it."""

    def __init__(self, msg: str | None, sender: bool, receiver: bool, stream_verdict: bool):
        self.fds = []
        self.client, self.server = kp._loopback_pair()
        for s in (self.client, self.server):
            s.settimeout(None)
        if msg is None:
            return
        programs = {"redirect": redirect_to_peer_program, "pass": lambda m: kp.pass_program(),
                    "apply": lambda m: kp._mov_imm(2, 1 << 30) + kp._call(BPF_FUNC_MSG_APPLY_BYTES) + kp.pass_program()}
        m = sockhash_with_programs(programs[msg], stream_verdict, self.fds)
        # each end under the other's port: redirect_to_peer_program looks up the sender's own port
        if sender:
            kp._sockhash_update(m, self.server.getsockname()[1], self.client.fileno())
        if receiver:
            kp._sockhash_update(m, self.client.getsockname()[1], self.server.fileno())

    def close(self):
        self.client.close()
        self.server.close()
        for fd in self.fds:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--no-stream-verdict", dest="stream_verdict", action="store_false")
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in PATHS}
    for r in range(args.rounds):
        order = list(PATHS)
        order = order[r % len(order):] + order[:r % len(order)]
        for name in order:
            pair = Pair(*PATHS[name], stream_verdict=args.stream_verdict)
            try:
                results[name].append(bulk(pair, args.bulk_mib << 20))
            finally:
                pair.close()
    print(f"bulk, {args.bulk_mib} MiB one way, stream verdict {'on' if args.stream_verdict else 'off'}, "
          f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f} at the end; "
          "median of per-round ratios to plain TCP")
    plain = results["plain"]
    for name, values in results.items():
        ratio = statistics.median(v / o for v, o in zip(values, plain))
        q = statistics.quantiles(values, n=4)
        print(f"{name:25} median {statistics.median(values):8.0f} MiB/s  IQR/median "
              f"{(q[2] - q[0]) / statistics.median(values):5.2f}  vs plain {ratio:5.2f}")


if __name__ == "__main__":
    main()
