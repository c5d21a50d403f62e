"""What having our programs attached costs a connection, apart from what they do.

Brings up a test bed (nginx apps, Envoy or HAProxy sidecars, Istio's rules)
and runs wrk with a new connection per request from one pod to the other in
three variants, interleaved round by round:

  iptables        Istio's rules only, no agent;
  agent-iptables  the agent in `iptables` mode (POST /mode): the connect
                  hook is detached, so every connection takes Istio's rules,
                  but sockops, getsockopt and sk_msg stay attached and run;
  ebpf            the agent in `ebpf` mode.

The second variant does none of eBPF's work and still pays for the programs
being called, so its ratio to the first is the price of being attached.
Prints requests/s per round and the median of the paired ratios. Run from the
repository as root:

    .venv/bin/python benchmarks/attached_cost.py [--rounds 5] [--seconds 4] [--sidecar tcp|http]
        [--path same-node|cross-node] [--proxy envoy|haproxy] [--mtls strict|permissive|off] [--envoy-workers N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

from merbridge_py.agent.status import agent_request
from merbridge_py.bench.bed import CROSS_NODE, add_sidecar_options, profiler_pair, sidecar_kwargs
from merbridge_py.testbed import Testbed

VARIANTS = ("iptables", "agent-iptables", "ebpf")


def run_wrk(tb: Testbed, seconds: int, path: str) -> float:
    src, dst = profiler_pair(tb, path)
    tb.settle()
    wrk = tb.spawn_in(src.name, ["wrk", "-c4", "-t2", f"-d{seconds}s", "-H", "Connection: close",
                                 f"http://{dst.ip}:8080/"], stdout=subprocess.PIPE, text=True)
    out, _ = wrk.communicate()
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def set_variant(tb: Testbed, variant: str) -> None:
    if variant == "iptables":
        tb.set_mode("iptables")
        return
    tb.set_mode("ebpf")
    agent_mode = "iptables" if variant == "agent-iptables" else "ebpf"
    for node in tb.nodes:
        agent_request(tb.admin_socket(node), "/mode", {"mode": agent_mode})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--sidecar", choices=("tcp", "http"), default="tcp",
                    help="tcp: every leg of a request is a new connection (the case this measures); "
                         "http: pooled upstreams, as Envoy")
    add_sidecar_options(ap)
    args = ap.parse_args()
    http_ports = (8080,) if args.sidecar == "http" else ()
    rps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    nodes = 2 if args.path == CROSS_NODE else 1
    with Testbed.up(f"attached{os.getpid()}", nodes=nodes, pods_per_node=2, mode="iptables", app="nginx",
                    http_ports=http_ports, **sidecar_kwargs(args)) as tb:
        for r in range(args.rounds):
            for variant in VARIANTS:
                set_variant(tb, variant)
                rps[variant].append(run_wrk(tb, args.seconds, args.path))
            print(f"round {r + 1}: " + ", ".join(f"{v} {rps[v][-1]:,.0f}" for v in VARIANTS), file=sys.stderr)
    print(f"\n{args.path}, new connection per request, 4 connections, {args.proxy} {args.sidecar} sidecars, "
          f"mTLS {args.mtls or 'bed default'}, {args.rounds} rounds")
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(rps[v], rps["iptables"])]
        print(f"{v:<16} median {statistics.median(rps[v]):>8,.0f} req/s   "
              f"ratio to iptables {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
