"""Issue 20's stalled-reader measurement through Envoy sidecars: a writer in
pod a offers a fixed rate to an app in pod b (same node) that reads nothing
for --pause seconds; how many bytes did the path accept, and how much did
the node's TCP memory grow? Then the app reads again, and every byte must
arrive in order. eBPF against iptables, interleaved (the mode alternates run
by run, and which mode goes first alternates rate by rate).

    sudo .venv/bin/python benchmarks/backpressure.py                   # 1, 10, 60 MiB/s, 60 s pauses
    sudo .venv/bin/python benchmarks/backpressure.py --rates 10 --pause 20 --rounds 2

TCP memory is /proc/net/sockstat's "TCP: ... mem N" (pages). In that line
"inuse" and "tw" are per network namespace, but "mem" (with "alloc" and
"orphan") is the kernel's single tcp_prot counter for every namespace
(net/ipv4/proc.c, sockstat_seq_show): the figure is node-wide, the same read
in any namespace; the run records it read in the node's and in pod b's
namespace to show that. It includes every other TCP socket on the machine,
so the baseline is taken right before each run and each figure is a
difference. It does count what sk_msg redirects into a socket's ingress
queue (bpf_tcp_ingress charges it through sk_wmem_schedule), which a
per-socket `ss -m` does not show.

The port (9310) is not declared on the pods, so Envoy carries it as plain
TCP (PassthroughCluster, one upstream connection per downstream one). The
agents run with the product's defaults (bulk detection at 64 MiB within 1 s,
backlog limit datapath.BACKLOG_BYTES; where the kernel refuses the fexit
programs, the budget fallback) unless MERBRIDGE_* say otherwise in the
environment (MERBRIDGE_BACKLOG_FALLBACK=bulk for the other fallback). Prints one JSON document; exits 1 if any byte was lost or
reordered, or a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from merbridge_py import sandbox
from merbridge_py.testbed import PodSpec, Testbed

PORT = 9310
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
APP = [sys.executable, "-m", "merbridge_py.testbed.stall_app"]


def tcp_mem_pages(netns: str | None = None) -> int:
    text = sandbox.sh("cat", "/proc/net/sockstat", netns=netns) if netns else open("/proc/net/sockstat").read()
    for line in text.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    raise RuntimeError("no TCP line in /proc/net/sockstat")


def one_run(tb: Testbed, rate_mib: float, pause: float) -> dict:
    server = tb.exec("b", APP + ["serve", "--port", str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)
    writer = None
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            samples.append(tcp_mem_pages())

    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the stall app did not start in pod b")
        base = tcp_mem_pages()
        base_in_pod = tcp_mem_pages(tb.pod("b").netns)
        writer = tb.exec("a", APP + ["offer", "--host", tb.pod("b").ip, "--port", str(PORT),
                                     "--total", str(1 << 40), "--rate", str(rate_mib * MIB),
                                     "--seconds", str(pause), "--idle-seconds", str(pause + 60)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "accepted":
            raise RuntimeError("the stall app accepted no connection")
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        line = writer.stdout.readline()   # after --pause seconds of offering
        stop.set()
        thread.join()
        if not line:
            raise RuntimeError(f"the writer failed: {writer.stderr.read()[-2000:]}")
        wrote = json.loads(line)
        end = tcp_mem_pages()
        end_in_pod = tcp_mem_pages(tb.pod("b").netns)
        server.stdin.write("resume\n")
        server.stdin.flush()
        read = json.loads(server.stdout.readline())
        writer.wait(timeout=600)
    finally:
        stop.set()
        for proc in (server, writer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"mode": tb.mode, "rate_mib_s": rate_mib, "pause_s": pause,
            "accepted_mib": round(wrote["accepted"] / MIB, 2),
            "tcp_mem_growth_mib": round((end - base) * PAGE / MIB, 2),
            "tcp_mem_peak_growth_mib": round((max(samples + [end]) - base) * PAGE / MIB, 2),
            "tcp_mem_growth_mib_read_in_pod_b": round((end_in_pod - base_in_pod) * PAGE / MIB, 2),
            "accepted_per_second_mib": [round(b / MIB, 1) for b in wrote["accepted_per_second"]],
            "read_mib": round(read["bytes"] / MIB, 2), "all_arrived_in_order":
                read["in_order"] and read["bytes"] == wrote["accepted"], "first_bad": read["first_bad"]}


def counters(tb: Testbed) -> dict:
    m = tb.agent_metrics("node0")
    return {k: m.get(k, 0.0) for k in ('merbridge_splice_skipped_total{reason="backpressure"}',
                                       'merbridge_splice_skipped_total{reason="bulk"}',
                                       'merbridge_backlog_tracing{state="attached"}',
                                       "merbridge_spliced_bytes_total")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1,10,60", help="writer rates, MiB/s, comma-separated")
    parser.add_argument("--pause", type=float, default=60.0, help="seconds the reader reads nothing")
    parser.add_argument("--rounds", type=int, default=1, help="runs per mode and rate")
    parser.add_argument("--name", default=f"bpb{os.getpid() % 10000}")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    started = time.monotonic()
    runs, agent_counters = [], []
    with Testbed.up(args.name, nodes=1, pods=[PodSpec("a", node=0), PodSpec("b", node=0)], mode="ebpf") as tb:
        for i, rate in enumerate(rates):
            for r in range(args.rounds):
                order = ("ebpf", "iptables") if (i + r) % 2 == 0 else ("iptables", "ebpf")
                for mode in order:
                    tb.set_mode(mode)
                    before = counters(tb) if mode == "ebpf" else None
                    run = one_run(tb, rate, args.pause)
                    if before is not None:
                        after = counters(tb)
                        run["agent"] = {k: after[k] - before[k] if "total" in k else after[k] for k in after}
                    runs.append(run)
                    print(json.dumps(run), file=sys.stderr, flush=True)
        load = os.getloadavg()
    ratios = {}
    for rate in rates:
        pick = lambda mode, key: statistics.median(r[key] for r in runs if r["rate_mib_s"] == rate and r["mode"] == mode)  # noqa: E731
        ratios[f"{rate:g}"] = {
            "accepted_mib": {"ebpf": pick("ebpf", "accepted_mib"), "iptables": pick("iptables", "accepted_mib")},
            "tcp_mem_growth_mib": {"ebpf": pick("ebpf", "tcp_mem_growth_mib"),
                                   "iptables": pick("iptables", "tcp_mem_growth_mib")},
        }
        for key in ("accepted_mib", "tcp_mem_growth_mib"):
            v = ratios[f"{rate:g}"][key]
            v["ratio_ebpf_over_iptables"] = round(v["ebpf"] / v["iptables"], 2) if v["iptables"] > 0 else None
    report = {"rates_mib_s": rates, "pause_s": args.pause, "rounds": args.rounds,
              "loadavg_at_end": [round(x, 2) for x in load], "wall_seconds": round(time.monotonic() - started, 1),
              "medians": ratios, "runs": runs}
    print(json.dumps(report, indent=1))
    return 0 if all(r["all_arrived_in_order"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
