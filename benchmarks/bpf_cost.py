"""Where the eBPF datapath spends its time, per request.

Brings up a test bed (nginx apps, Envoy or HAProxy sidecars as `merbridge-py
bench` runs them, Istio's rules, the agents), turns on the kernel's BPF run-time statistics for as long as this
script holds the file descriptor (bpf(BPF_ENABLE_STATS): nothing is left
changed), runs wrk from one pod to the other under a load, and prints, for each
of our programs, how often it ran and how much CPU time it took per request.

Needs root and bpftool (Debian: bpftool). Run from the repository:

    .venv/bin/python benchmarks/bpf_cost.py [--seconds 5] [--sidecar http|tcp] [--path same-node|cross-node]
        [--proxy envoy|haproxy] [--mtls strict|permissive|off] [--envoy-workers N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from merbridge_py.bench.bed import CROSS_NODE, add_sidecar_options, profiler_pair, sidecar_kwargs
from merbridge_py.testbed import Testbed

BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
# Our programs. The kernel keeps 15 characters of a name; bpftool prints the
# full one when the program has BTF. Both are matched on those 15.
PROGRAMS = ("sock4_connect", "sockops", "sk_msg_splice", "sockopt_original_dst",
            # backpressure's reader hook, whichever the kernel took (datapath.READER_HOOKS): the
            # tracepoint runs on every socket read of the node, so its cost is per read, everywhere
            "raw_tracepoint__sock_recv_length", "kretfunc__tcp_bpf_recvmsg", "kretfunc__tcp_bpf_recvmsg_parser")
NAME_LEN = 15
LOADS = {
    "keep-alive, 1 connection": ["-c1", "-t1"],
    "new connection per request, 4 connections": ["-c4", "-t1", "-H", "Connection: close"],
}


def enable_stats() -> int:
    """An fd that keeps run-time stats on until it is closed (Linux >= 5.8)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(ctypes.c_uint32(BPF_STATS_RUN_TIME).value.to_bytes(4, "little"), 128)
    fd = libc.syscall(321, BPF_ENABLE_STATS, attr, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "bpf(BPF_ENABLE_STATS)")
    return fd


def program_ids(pids: list[int]) -> set[int]:
    """IDs of the BPF programs these processes hold open (fdinfo's prog_id):
    this bed's agents' programs, not those of other beds on the machine."""
    ids = set()
    for pid in pids:
        fdinfo = Path(f"/proc/{pid}/fdinfo")
        for entry in fdinfo.iterdir():
            try:
                m = re.search(r"^prog_id:\s+(\d+)$", entry.read_text(), re.MULTILINE)
            except OSError:
                continue
            if m:
                ids.add(int(m.group(1)))
    return ids


def program_stats(ids: set[int]) -> dict[str, tuple[int, int]]:
    """name -> (run_cnt, run_time_ns), summed over the programs `ids` of that name."""
    out: dict[str, tuple[int, int]] = {}
    for p in json.loads(subprocess.check_output(["bpftool", "-j", "prog", "show"])):
        if p.get("id") not in ids:
            continue
        name = next((prog for prog in PROGRAMS if prog[:NAME_LEN] == p.get("name", "")[:NAME_LEN]), None)
        if name:
            cnt, ns = out.get(name, (0, 0))
            out[name] = (cnt + p.get("run_cnt", 0), ns + p.get("run_time_ns", 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--sidecar", choices=("http", "tcp"), default="http",
                    help="sidecars proxy port 8080 as HTTP with pooled upstreams (as Envoy) or as plain TCP")
    add_sidecar_options(ap)
    args = ap.parse_args()
    stats_fd = enable_stats()
    name = f"cost{os.getpid()}"
    try:
        http_ports = (8080,) if args.sidecar == "http" else ()
        nodes = 2 if args.path == CROSS_NODE else 1
        with Testbed.up(name, nodes=nodes, pods_per_node=2, mode="ebpf", app="nginx", http_ports=http_ports,
                        **sidecar_kwargs(args)) as tb:
            src, dst = profiler_pair(tb, args.path)
            print(f"{args.path}, {tb.proxy} sidecars, mTLS {getattr(tb, 'mtls', 'off')}, {args.sidecar} port 8080")
            ids = program_ids([r.pid for r in tb.processes if r.role == "agent" and r.alive()])
            for load, flags in LOADS.items():
                tb.settle()
                before = program_stats(ids)
                p = tb.spawn_in(src.name, ["wrk", *flags, f"-d{args.seconds}s", f"http://{dst.ip}:8080/"],
                                stdout=subprocess.PIPE, text=True)
                out, _ = p.communicate()
                after = program_stats(ids)
                requests = int(re.search(r"(\d+) requests in", out).group(1))
                print(f"\n{load}: {requests} requests")
                print(f"  {'program':<21} {'runs/request':>12} {'ns/run':>8} {'ns/request':>11}")
                total = 0.0
                for prog in PROGRAMS:
                    cnt = after.get(prog, (0, 0))[0] - before.get(prog, (0, 0))[0]
                    ns = after.get(prog, (0, 0))[1] - before.get(prog, (0, 0))[1]
                    per_request = ns / requests if requests else 0.0
                    total += per_request
                    print(f"  {prog:<21} {cnt / requests:>12.2f} {ns / cnt if cnt else 0:>8.0f} {per_request:>11.0f}")
                print(f"  {'all programs':<21} {'':>12} {'':>8} {total:>11.0f}")
    finally:
        os.close(stats_fd)


if __name__ == "__main__":
    sys.exit(main())
