"""One measurement: a load from a client pod to a server pod for a fixed time,
with the CPU the client, the sidecars and the serving app spent on it.

Every process a measurement starts runs in its pod's network namespace and
cgroup (so the eBPF programs attached to the node's cgroup see it as they would
see a pod's process) and is ended by its pid before the measurement returns.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import sandbox
from . import loads, procs, tcpstats
from .bed import Bed, BenchPod, PodPair

# How long past its planned duration a client may run before it is killed:
# tools finish their own bookkeeping (sockperf's warm-up, iperf3's exchange of
# results) and connection set-up can be slow in a broken mode.
CLIENT_GRACE_S = 20.0


@dataclass(frozen=True)
class Measurement:
    result: loads.LoadResult
    cpu_us: dict[str, float]      # client / sidecars / apps / agents, microseconds
    # the same, user space only: a proxy's user-space work is what no kernel
    # datapath can take away; the rest (system time) is where eBPF can act
    cpu_user_us: dict[str, float] = field(default_factory=dict)
    # ebpf mode: what each node's datapath counted during the run, as
    # {"client node"|"server node"|"client and server node": {metric: increase}}
    datapath: dict[str, dict[str, float]] = field(default_factory=dict)
    # packets that hit the client pod's ISTIO_REDIRECT rule during the run,
    # per IP family of the rules: connections iptables redirected (meshed modes)
    nat_redirects: dict[str, int] = field(default_factory=dict)
    # TCP's retransmission and timeout counters (tcpstats.COUNTERS): their
    # increase during the run per node of the pair, by role as datapath
    tcp: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def cpu_us_per_req(self) -> float | None:
        if not self.result.requests:
            return None
        return sum(self.cpu_us.values()) / self.result.requests

    @property
    def sidecar_user_us_per_req(self) -> float | None:
        if not self.result.requests or "sidecars" not in self.cpu_user_us:
            return None
        return self.cpu_user_us["sidecars"] / self.result.requests

    @property
    def kernel_us_per_req(self) -> float | None:
        """System time of every counted process per request."""
        if not self.result.requests or not self.cpu_user_us:
            return None
        return (sum(self.cpu_us.values()) - sum(self.cpu_user_us.values())) / self.result.requests


def measure(bed: Bed, pair: PodPair, load: str, connections: int, duration_s: int,
            wrk_scripts: loads.WrkScripts, family: str = loads.INET) -> Measurement:
    """Run one load with the client's sockets of `family` (loads.FAMILIES);
    raises loads.LoadFailed (or TimeoutError, SandboxError) when it produced
    no usable measurement, ValueError for a load the family cannot run."""
    loads.check_family(family, [load])
    to = loads.target(family, pair.server.ip, pair.server.ip6)
    server_argv, port = _server(load, pair.server, family)
    with _serving(bed, pair.server, server_argv, port):
        # Processes counted: the client pod's sidecar(s) (not its idle app),
        # everything in the server pod, including a server started above, and
        # the node agents (ebpf mode), whose work is part of the mode's cost.
        client_roles = procs.classify(bed.pod_pids(pair.client))
        server_roles = procs.classify(bed.pod_pids(pair.server))
        counted = {"sidecars": client_roles["sidecars"] + server_roles["sidecars"],
                   "apps": server_roles["apps"], "agents": bed.agent_pids()}
        counters_before = _datapath_counters(bed)
        tcp_before = _tcp_counters(bed)
        nat_before = _nat_redirects(bed, pair.client)
        before = {role: procs.cpu_seconds(pids) for role, pids in counted.items()}
        before_user = {role: procs.cpu_seconds(pids, user_only=True) for role, pids in counted.items()}
        argv = _client(load, to, connections, duration_s, wrk_scripts)
        run = procs.run_client(lambda **io: bed.spawn(pair.client, argv, **io),
                               timeout_s=duration_s + CLIENT_GRACE_S)
        after = {role: procs.cpu_seconds(pids) for role, pids in counted.items()}
        after_user = {role: procs.cpu_seconds(pids, user_only=True) for role, pids in counted.items()}
        counters_after = _datapath_counters(bed)
        tcp_after = _tcp_counters(bed)
        nat_after = _nat_redirects(bed, pair.client)
    result = _parse(load, run.output)
    cpu_us = {"client": run.cpu_s * 1e6}
    cpu_us.update({role: procs.cpu_delta(before[role], after[role]) * 1e6 for role in counted})
    cpu_user_us = {"client": run.user_s * 1e6}
    cpu_user_us.update({role: procs.cpu_delta(before_user[role], after_user[role]) * 1e6 for role in counted})
    return Measurement(result=result, cpu_us=cpu_us, cpu_user_us=cpu_user_us,
                       datapath=counter_increase(counters_before, counters_after, pair),
                       nat_redirects={f: nat_after[f] - nat_before.get(f, 0) for f in nat_after},
                       tcp=tcp_by_role(tcpstats.deltas(tcp_before, tcp_after), pair))


def _tcp_counters(bed: Bed) -> dict[str, dict[str, int]]:
    read = getattr(bed, "tcp_counters", None)
    return read() if read else {}


def tcp_by_role(per_node: dict[str, dict[str, int]], pair: PodPair) -> dict[str, dict[str, int]]:
    """The pair's nodes' counter increases, keyed by their role in the run."""
    return {role: counters for node, counters in per_node.items() if (role := node_role(node, pair)) is not None}


def _nat_redirects(bed: Bed, pod: BenchPod) -> dict[str, int]:
    read = getattr(bed, "nat_redirects", None)
    return read(pod) if read else {}


def _datapath_counters(bed: Bed) -> dict[str, dict[str, float]]:
    read = getattr(bed, "datapath_counters", None)
    return read() if read else {}


def node_role(node: str, pair: PodPair) -> str | None:
    if node == pair.client.node == pair.server.node:
        return "client and server node"
    return {pair.client.node: "client node", pair.server.node: "server node"}.get(node)


def counter_increase(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                     pair: PodPair) -> dict[str, dict[str, float]]:
    """Per node of the pair (by its role), the counters that grew during the
    run. The counters of a node's agent cover every pod of that node, so on a
    quiet bed their increase is this run's traffic."""
    out = {}
    for node, values in after.items():
        role = node_role(node, pair)
        if role is None or node not in before:
            continue
        # counters only (`name_total`, labels or not), not their `_created` timestamps
        grew = {k: v - before[node].get(k, 0.0) for k, v in values.items()
                if k.split("{")[0].endswith("_total") and v - before[node].get(k, 0.0) > 0}
        out[role] = grew
    return out


def _server(load: str, server: BenchPod, family: str = loads.INET) -> tuple[list[str] | None, int]:
    if load in loads.WRK_LOADS:
        return None, loads.HTTP_PORT       # the pod's own app serves HTTP (on both families of a dual-stack bed)
    if load == loads.TCP_RR:
        return loads.sockperf_server_argv(server.ip), loads.SOCKPERF_PORT
    if load == loads.BULK:
        # a v4-mapped client reaches an AF_INET listener on the IPv4 address
        return loads.iperf3_server_argv(server.ip6 if family == loads.INET6 else server.ip), loads.IPERF3_PORT
    raise ValueError(f"unknown load {load!r}")


def _client(load: str, to: loads.Target | str, connections: int, duration_s: int,
            wrk_scripts: loads.WrkScripts) -> list[str]:
    to = to if isinstance(to, loads.Target) else loads.Target(to)
    if load == loads.FIXEDRATE:
        return loads.wrk_fixedrate_argv(to, connections, duration_s, wrk_scripts.fixedrate,
                                        rps=wrk_scripts.fixedrate_rps)
    if load in (loads.KEEPALIVE, loads.NEWCONN):
        return loads.wrk_argv(to, connections, duration_s, wrk_scripts.report,
                              new_connection=load == loads.NEWCONN)
    if load == loads.TCP_RR:
        return loads.sockperf_client_argv(to.address, duration_s)
    return loads.iperf3_client_argv(to.address, duration_s)


def _parse(load: str, output: str) -> loads.LoadResult:
    if load in loads.WRK_LOADS:
        return loads.parse_wrk(output)
    if load == loads.TCP_RR:
        return loads.parse_sockperf(output)
    return loads.parse_iperf3(output)


@contextlib.contextmanager
def _serving(bed: Bed, pod: BenchPod, argv: list[str] | None, port: int) -> Iterator[None]:
    """Start a server for the measurement (none for HTTP: the pod app serves)
    and end it by pid afterwards, also when the measurement fails."""
    if argv is None:
        yield
        return
    proc = bed.spawn(pod, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        procs.wait_listening(pod.netns, port, alive=lambda: proc.poll() is None)
        yield
    finally:
        sandbox.stop(proc)
