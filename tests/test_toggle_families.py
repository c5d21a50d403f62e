"""Issue 14's toggle acceptance: the toggle-under-load run of issue 5
(tests/test_toggle_under_load.py) on a dual-stack bed, with clients of the
three kinds a dual-stack pod has, all at once:

  inet   AF_INET sockets to the targets' IPv4 addresses;
  mapped AF_INET6 sockets to ::ffff:<IPv4> (what the JVM does), which the
         kernel hands to the connect6 hook and IPv4 netfilter;
  ipv6   AF_INET6 sockets to the targets' own IPv6 addresses.

Each kind runs in its own client pod, so the pod's ISTIO_REDIRECT counter of
the family its packets take (IPv4 for inet and mapped, IPv6 for ipv6) tells
that kind's path apart from the others'. Bed: node0 runs the clients a
(inet), m (mapped), v (ipv6) and the server b; node1 runs the server d; all
meshed, Envoy sidecars, mTLS STRICT. Load for the whole run, per kind:
  -> b (same node), -> d (cross-node): two keep-alive connections per target
     held for the whole run (opened in ebpf mode, they must outlive all ten
     switches) and a new connection per request;
  -> b: three keep-alive connections replaced every ROTATE seconds, so
     connections opened in either mode cross every switch.
Both nodes switch ebpf <-> iptables ten times through `merbridge-py toggle`,
without restarting a sidecar or flushing conntrack. No request may fail.
After each switch the path of new connections is read per kind: the client
pod's ISTIO_REDIRECT counter of its family moves only in iptables mode (the
other family's never moves), the client's sidecar accepted new outbound
connections in both modes, and the agents' redirect and splice counters
(node-wide, not per family) move only in ebpf mode.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid

import pytest

from merbridge_py.agent.status import agent_request
from merbridge_py.testbed import PodSpec, Testbed
from merbridge_py.testbed.load import LoadProcess
from test_toggle_under_load import delta, describe, splice_decisions, toggle_every_node

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

TOGGLES = 10
# Shorter than the IPv4 test's 6 s (three times the clients, so three times
# the counters read per window); every counter checked moves by dozens per
# second under this load, so 4 s tells the modes apart with a wide margin.
WINDOW = 4.0
SETTLE = 0.3    # after a switch returns, before counting: connects already in flight finish
# > WINDOW + a switch. The ROTATING workers of a kind are staggered by
# ROTATE / ROTATING, so some connection crosses every switch shorter than
# ROTATE * (1 - 1 / ROTATING) - 1 s (19 s). Longer than the IPv4 test's 14 s
# (two workers, 6 s): with six load processes and other work on 2 cores, a
# switch of both nodes (two new Python processes) took up to 18 s.
ROTATE = 30.0
ROTATING = 3
DUAL = ("ipv4", "ipv6")
# kind -> (client pod, the family whose netfilter rules its packets meet, load's --family)
KINDS = {"inet": ("a", "ipv4", "inet"), "mapped": ("m", "ipv4", "inet6"), "ipv6": ("v", "ipv6", None)}
AGENT_COUNTERS = ("app_redirects", "proxy_redirects", "spliced_node0", "spliced_node1")


def targets(tb: Testbed, kind: str, pods: tuple[str, ...]) -> dict[str, str]:
    """Where a client of `kind` sends: IPv4 addresses for inet and mapped
    (mapped connects to their ::ffff: form), IPv6 addresses for ipv6."""
    if kind == "ipv6":
        return {p: f"[{tb.pod(p).ip6}]:8080" for p in pods}
    return {p: f"{tb.pod(p).ip}:8080" for p in pods}


def path_counters(tb: Testbed) -> dict[str, float]:
    node0, node1 = tb.agent_metrics("node0"), tb.agent_metrics("node1")
    assert node0['merbridge_mode{mode="ebpf"}'] + node0['merbridge_mode{mode="iptables"}'] == 1
    counters = {
        "mode_ebpf": node0['merbridge_mode{mode="ebpf"}'] + node1['merbridge_mode{mode="ebpf"}'],
        "app_redirects": node0['merbridge_redirects_total{direction="outbound"}'],
        "proxy_redirects": node0['merbridge_redirects_total{direction="inbound"}'],
        "spliced_node0": splice_decisions(node0),
        "spliced_node1": splice_decisions(node1),   # d's inbound sidecar -> d's app
    }
    for kind, (pod, _, _) in KINDS.items():
        for family in DUAL:
            counters[f"{kind}.istio_redirect.{family}"] = tb.nat_counters(pod, family)["ISTIO_REDIRECT"]
        counters[f"{kind}.sidecar_outbound"] = tb.sidecar_connections(pod)["outbound"]
    return counters


def path_mismatch(mode: str, moved: dict[str, float]) -> list[str]:
    """What in a window's counter deltas contradicts `mode`."""
    ebpf = mode == "ebpf"
    wrong = [k for k in AGENT_COUNTERS if (moved[k] <= 0 if ebpf else moved[k] != 0)]
    for kind, (_, family, _) in KINDS.items():
        redirect = moved[f"{kind}.istio_redirect.{family}"]
        wrong += [f"{kind}.istio_redirect.{family}"] if (redirect != 0 if ebpf else redirect <= 0) else []
        other = next(f for f in DUAL if f != family)
        wrong += [f"{kind}.istio_redirect.{other}"] if moved[f"{kind}.istio_redirect.{other}"] != 0 else []
        wrong += [f"{kind}.sidecar_outbound"] if moved[f"{kind}.sidecar_outbound"] <= 0 else []
    return wrong


def client_reasons(tb: Testbed) -> dict[str, str]:
    """The agent's status line for each client pod: it says, per family,
    whether the pod is accelerated and why not."""
    statuses = {p["pod"]: p["reason"] for node in tb.nodes
                for p in agent_request(tb.admin_socket(node), "/status")["pods"]}
    return {pod: statuses.get(f"default/{pod}", "no status") for pod, _, _ in KINDS.values()}


def socket_kind(local: str) -> str:
    """The kind of client a connection's local address shows: "ip:port" for
    AF_INET, "[::ffff:ip]:port" for a v4-mapped AF_INET6, else native IPv6."""
    if not local.startswith("["):
        return "inet"
    return "mapped" if local.lower().startswith("[::ffff:") and "." in local else "ipv6"


def test_ten_toggles_under_mixed_family_load_lose_no_request():
    name = f"togf{os.getpid()}{uuid.uuid4().hex[:4]}"
    pods = [PodSpec("a", node=0), PodSpec("m", node=0), PodSpec("v", node=0), PodSpec("b", node=0),
            PodSpec("d", node=1)]
    run_started = time.monotonic()
    with Testbed.up(name, nodes=2, pods=pods, mode="ebpf", mtls="strict", ip_families=DUAL) as tb:
        bed_ready = time.monotonic()
        # An upper bound (the loads are stopped after the last window).
        budget = 5 + TOGGLES * (SETTLE + WINDOW + 30)
        loads = {}
        for kind, (pod, _, family) in KINDS.items():
            loads[kind, "pinned"] = LoadProcess(tb, pod, targets(tb, kind, ("b", "d")), duration=budget,
                                                keepalive=2, newconn=1, family=family)
            loads[kind, "rotating"] = LoadProcess(tb, pod, targets(tb, kind, ("b",)), duration=budget,
                                                  keepalive=ROTATING, newconn=0, rotate=ROTATE, family=family)
        try:
            for load in loads.values():
                load.wait_ready()
            reasons = client_reasons(tb)
            windows = []   # (mode, switch started, switch done, counter deltas)
            before = path_counters(tb)
            time.sleep(WINDOW)
            windows.append(("ebpf", None, None, delta(before, path_counters(tb))))
            for k in range(TOGGLES):
                mode = "iptables" if k % 2 == 0 else "ebpf"
                started = time.monotonic()
                toggle_every_node(tb, mode)
                done = time.monotonic()
                time.sleep(SETTLE)
                before = path_counters(tb)
                time.sleep(WINDOW)
                windows.append((mode, started, done, delta(before, path_counters(tb))))
        finally:
            for load in loads.values():
                load.stop()
        results = {key: load.result() for key, load in loads.items()}   # before the bed goes down
        toggled = time.monotonic()
    finished = time.monotonic()

    switches = [(w[1], w[2]) for w in windows[1:]]
    seconds = [done - started for started, done in switches]
    per_kind = {kind: {f: sum(results[kind, load][f] for load in ("pinned", "rotating"))
                       for f in ("requests", "failed", "connections")} for kind in KINDS}
    print(f"\n{TOGGLES} toggles (both nodes) in {statistics.median(seconds):.2f} s median, {max(seconds):.2f} s max; "
          f"bed up {bed_ready - run_started:.0f} s, load {toggled - bed_ready:.0f} s, total {finished - run_started:.0f} s; "
          f"slowest request {max(r['max_latency'] for r in results.values()):.3f} s")
    for kind, n in per_kind.items():
        print(f"  {kind}: {n['requests']} requests ({n['connections']} connections), {n['failed']} failed")
    for mode, _, _, moved in windows:
        print(f"  {mode:8} " + " ".join(f"{k}={v:g}" for k, v in moved.items() if k != "mode_ebpf"))

    failures = [dict(f, worker=f"{kind}/{f['worker']}") for (kind, _), r in results.items() for f in r["failures"]]
    assert sum(n["failed"] for n in per_kind.values()) == 0, describe(failures, windows)
    assert all(n["requests"] > 0 for n in per_kind.values()), per_kind
    broken = [c for r in results.values() for c in r["keepalive_connections"] if c["broken"]]
    assert broken == []

    # Each load used the socket family of its kind.
    for (kind, _), r in results.items():
        assert {socket_kind(c["local"]) for c in r["keepalive_connections"]} == {kind}, (kind, r["keepalive_connections"][:2])

    # The path of new connections after each switch matches the mode, per kind.
    for mode, _, _, moved in windows:
        assert moved["mode_ebpf"] == 0, "the agents' mode changed inside a window"
        assert path_mismatch(mode, moved) == [], (mode, moved, reasons)
    assert [w[0] for w in windows] == ["ebpf"] + ["iptables", "ebpf"] * (TOGGLES // 2)

    # Keep-alive connections opened before the first switch serve after the last, per kind.
    last_switch_done = switches[-1][1]
    for kind in KINDS:
        pinned = results[kind, "pinned"]["keepalive_connections"]
        assert len(pinned) == 4 and len({c["worker"] for c in pinned}) == 4, f"a pinned {kind} connection was replaced"
        assert all(c["opened"] < switches[0][0] and c["closed"] > last_switch_done + WINDOW / 2 for c in pinned), kind
        rotating = results[kind, "rotating"]["keepalive_connections"]
        for i, (started, done) in enumerate(switches):
            crossing = [c for c in rotating if c["opened"] < started and c["closed"] > done + 1.0]
            assert crossing, f"no rotating {kind} keep-alive connection crossed switch {i + 1}"
