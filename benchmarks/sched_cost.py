"""Where a keep-alive request's wall time goes: running, or waiting for a CPU.

Brings up a test bed (nginx apps, Envoy or HAProxy sidecars, Istio's rules),
and for iptables and ebpf mode in turn (interleaved, `--rounds` times) runs
wrk from one pod to the other and reads the scheduler's own accounting
(/proc/<pid>/task/<tid>/schedstat: time on a CPU, time runnable but waiting
for one, and how many times the thread was scheduled in) of every thread of
the client, both sidecars and the server app over the middle of the run,
plus the machine's cross-CPU wake-ups (rescheduling and function-call IPIs in
/proc/interrupts) and idle CPU time (/proc/stat). It prints medians per
request, per process group, per mode.

Why: at 4 keep-alive connections on 2 cores eBPF used less CPU per request
than iptables but was not faster (benchmarks/results). A request that costs
less CPU but waits longer for one points at scheduling, not work. Run from
the repository as root:

    .venv/bin/python benchmarks/sched_cost.py [--connections 4] [--threads 2] [--rounds 5] [--seconds 4]
        [--sidecar http|tcp] [--path same-node|cross-node] [--proxy envoy|haproxy] [--mtls strict|permissive|off]
        [--envoy-workers N]

"sidecars run_us" is the sidecars' time on a CPU per request, user and kernel;
"sidecars user_us" is the user-space part (from /proc/<pid>/stat utime), the
proxy's own work that no kernel datapath can remove.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from merbridge_py import sandbox
from merbridge_py.bench.bed import add_sidecar_options, profiler_pair, sidecar_kwargs
from merbridge_py.bench.procs import SIDECAR_NAMES, cpu_seconds
from merbridge_py.testbed import Testbed

GROUPS = ("client", "sidecars", "app")
FIELDS = ("run_us", "wait_us", "slices", "user_us")


def schedstat(pid: int) -> tuple[int, int, int]:
    """(ns on a CPU, ns runnable but waiting, times scheduled in), summed
    over the process's threads; zeros for a process that is gone."""
    total = [0, 0, 0]
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0, 0, 0
    for tid in tids:
        try:
            values = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except FileNotFoundError:
            continue
        for i in range(3):
            total[i] += int(values[i])
    return total[0], total[1], total[2]


def group_of(pid: int, client_pid: int, server_pids: set[int]) -> str | None:
    if pid == client_pid:
        return "client"
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None
    if name in SIDECAR_NAMES:
        return "sidecars"
    return "app" if pid in server_pids else None


def machine_counters() -> dict[str, int]:
    """Cross-CPU wake-ups (rescheduling and function-call IPIs, all CPUs) and
    idle time (ns, all CPUs) so far."""
    counters = {}
    for line in Path("/proc/interrupts").read_text().splitlines():
        words = line.split()
        if words and words[0] in ("RES:", "CAL:"):
            counters[words[0][:-1]] = sum(int(w) for w in words[1:] if w.isdigit())
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()
    counters["idle"] = int(cpu[4]) * 10**9 // os.sysconf("SC_CLK_TCK")
    return counters


def snapshot(pids: dict[int, str]) -> dict[str, list[int]]:
    sums = {g: [0, 0, 0, 0] for g in GROUPS}
    user = cpu_seconds(pids, user_only=True)
    for pid, group in pids.items():
        for i, v in enumerate(schedstat(pid)):
            sums[group][i] += v
        sums[group][3] += int(user.get(pid, 0.0) * 1e9)
    sums["machine"] = machine_counters()
    return sums


def measure(tb: Testbed, connections: int, threads: int, seconds: int, path: str) -> dict[str, float]:
    """One wrk run; per-request figures of the middle of the run (the first
    and last half second left out, so start-up and wind-down do not count)."""
    src, dst = profiler_pair(tb, path)
    tb.settle()
    wrk = tb.spawn_in(src.name, ["wrk", f"-c{connections}", f"-t{threads}", f"-d{seconds}s",
                                 f"http://{dst.ip}:8080/"], stdout=subprocess.PIPE, text=True)
    server_pids = set(sandbox.cgroup_pids(Path(dst.cgroup)))
    pids = {}
    for pid in [wrk.pid] + sandbox.cgroup_pids(Path(src.cgroup)) + sorted(server_pids):
        group = group_of(pid, wrk.pid, server_pids)
        if group:
            pids[pid] = group
    time.sleep(0.5)
    t0, before = time.monotonic(), snapshot(pids)
    time.sleep(seconds - 1.0)
    t1, after = time.monotonic(), snapshot(pids)
    out, _ = wrk.communicate()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = rps * (t1 - t0)
    result = {"rps": rps,
              "ipi": sum(after["machine"][k] - before["machine"][k] for k in ("RES", "CAL")) / requests,
              "idle_us": (after["machine"]["idle"] - before["machine"]["idle"]) / 1e3 / requests}
    for g in GROUPS:
        result[f"{g}.run_us"] = (after[g][0] - before[g][0]) / 1e3 / requests
        result[f"{g}.wait_us"] = (after[g][1] - before[g][1]) / 1e3 / requests
        result[f"{g}.slices"] = (after[g][2] - before[g][2]) / requests
        result[f"{g}.user_us"] = (after[g][3] - before[g][3]) / 1e3 / requests
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (the bench uses min(connections, 2))")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--sidecar", choices=("http", "tcp"), default="http",
                    help="sidecars proxy port 8080 as HTTP with pooled upstreams (as Envoy) or as plain TCP")
    add_sidecar_options(ap)
    args = ap.parse_args()
    if args.seconds < 2:
        ap.error("--seconds must be at least 2 (the first and last half second are not counted)")
    http_ports = (8080,) if args.sidecar == "http" else ()
    runs: dict[str, list[dict[str, float]]] = {"iptables": [], "ebpf": []}
    with Testbed.up(f"sched{os.getpid()}", nodes=2, pods_per_node=2, mode="iptables", app="nginx",
                    http_ports=http_ports, **sidecar_kwargs(args)) as tb:
        for r in range(args.rounds):
            for mode in runs:
                tb.set_mode(mode)
                runs[mode].append(measure(tb, args.connections, args.threads, args.seconds, args.path))
                print(f"round {r + 1} {mode}: {runs[mode][-1]['rps']:,.0f} req/s", file=sys.stderr)
    print(f"\n{args.path}, keep-alive, {args.connections} connections, {args.threads} wrk threads, {args.proxy} "
          f"{args.sidecar} sidecars, mTLS {args.mtls or 'bed default'}; medians of {args.rounds} rounds, per request")
    print(f"{'':<10}{'req/s':>10}{'IPIs':>8}{'idle us':>9}"
          + "".join(f"{g + ' ' + f:>20}" for g in GROUPS for f in FIELDS))
    for mode, rows in runs.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"{mode:<10}{med['rps']:>10,.0f}{med['ipi']:>8.2f}{med['idle_us']:>9.1f}"
              + "".join(f"{med[f'{g}.{f}']:>20.2f}" for g in GROUPS for f in FIELDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
