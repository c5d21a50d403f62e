"""The equivalence matrix (issue 11): for randomly drawn meshed pods and
probes, the hop sequence of every request in ebpf mode equals the one in
iptables mode, observed end to end on the test bed (probes.py), not
compared as data. A second iptables pass shows the probes are
deterministic, so a difference is the datapath's, not noise.

The seed is printed; MERBRIDGE_MATRIX_SEED=<n> repeats a run (the bed's
slot may differ, which shifts the pod addresses and the drawn ranges alike).
MERBRIDGE_MATRIX_PODS_PER_NODE sets the meshed pods per node (default 21:
42 meshed pods on 2 nodes, plus one plain pod per node).
MERBRIDGE_MATRIX_VERBOSE=1 prints every probe's hop sequence (iptables mode)
and whether Istio's nat rules took part in the ebpf pass.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import ipaddress
import os
import socket
import random
import time
import uuid
from collections import Counter

import pytest

from merbridge_py import sandbox
from merbridge_py.agent.status import agent_request
from merbridge_py.testbed import Testbed, istio_iptables, pod_draws, probes, topology
from merbridge_py.testbed.probes import HopObserver, difference_table, differences


SEED = int(os.environ.get("MERBRIDGE_MATRIX_SEED") or random.SystemRandom().randrange(2 ** 32))
MESHED_PER_NODE = int(os.environ.get("MERBRIDGE_MATRIX_PODS_PER_NODE", "21"))
NODES = 2
MIN_PODS = 40       # the bar


def _bed_with_drawn_pods(name: str):
    """Up in iptables mode with pods drawn for the slot the bed gets (another
    bed coming up at the same time can take the predicted slot: draw again)."""
    for _ in range(3):
        slot = pod_draws.next_slot()
        specs = pod_draws.draw_pods(random.Random(SEED), slot, MESHED_PER_NODE, NODES)
        tb = Testbed.up(name, nodes=NODES, pods=specs, mode="iptables", envoy_workers=1)
        if tb.slot == slot:
            _unlimited_icmp(tb)
            return tb, specs
        tb.down()
    raise RuntimeError("could not get the predicted test bed slot three times in a row")


def _unlimited_icmp(tb) -> None:
    """A request to an address no node routes (a Service IP a pod's rules
    send direct) gets ICMP unreachable from the pod's node; the kernel's
    per-destination ICMP rate limit would turn some of those into timeouts
    at random. Off in the bed's node namespaces, so the outcome is one."""
    for node in tb.nodes:
        sandbox.sh("sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0", netns=node.netns)


def _agent_verdicts(tb) -> dict[str, dict]:
    return {entry["pod"].split("/", 1)[1]: entry
            for node in tb.nodes for entry in agent_request(tb.admin_socket(node), "/status")["pods"]}


def _path_kind(tb, probe) -> str:
    client = tb.pod(probe.client)
    if not client.meshed:
        return "from a plain pod"
    if probe.server is None:
        return "outside the bed"
    server = tb.pod(probe.server)
    if server.name == client.name:
        return "to itself"
    return f"{'same' if server.node == client.node else 'other'} node, {'meshed' if server.meshed else 'plain'}"


def _via_client_sidecar(hops) -> str:
    return ", via client sidecar" if any(role == "client" for role, _, _ in hops.sidecars) else ""


def _nat_words(by_role: dict[str, int]) -> str:
    took = [role for role, n in sorted(by_role.items()) if n]
    return f"nat rules in {'+'.join(took)}" if took else "eBPF only"


def _nat_redirects(tb, pods) -> int:
    """Connections Istio's REDIRECT rules took so far, over `pods`."""
    return sum(sum(tb.nat_counters(p).values()) for p in pods)


@pytest.mark.bpf
@pytest.mark.slow
def test_hop_sequences_are_equal_in_iptables_and_ebpf_modes():
    print(f"\nequivalence matrix seed {SEED} (MERBRIDGE_MATRIX_SEED={SEED} repeats it)")
    started = time.monotonic()
    tb, specs = _bed_with_drawn_pods(f"mx{os.getpid()}{uuid.uuid4().hex[:4]}")
    with tb, HopObserver(tb) as observer:
        meshed = [s for s in specs if s.meshed]
        assert len(meshed) >= MIN_PODS or "MERBRIDGE_MATRIX_PODS_PER_NODE" in os.environ
        for spec in meshed:
            print("  ", pod_draws.describe_pod(spec))
        drawn = pod_draws.draw_probes(random.Random(SEED + 1), tb.pods)

        meshed_pods = [tb.pod(s.name) for s in meshed]
        nat = [_nat_redirects(tb, meshed_pods)]
        iptables = observer.run(drawn)
        nat.append(_nat_redirects(tb, meshed_pods))
        tb.set_mode("ebpf")
        verdicts = _agent_verdicts(tb)
        observer.count_nat = True
        ebpf = observer.run(drawn)
        observer.count_nat = False
        ebpf_nat = dict(observer.nat_redirects)
        nat.append(_nat_redirects(tb, meshed_pods))
        redirects = sum(v for node in tb.nodes for k, v in tb.agent_metrics(node).items()
                        if k.startswith("merbridge_redirects_total"))
        tb.set_mode("iptables")
        iptables_again = observer.run(drawn)
    nat_iptables, nat_ebpf = nat[1] - nat[0], nat[2] - nat[1]

    accelerated = [s.name for s in meshed if verdicts.get(s.name, {}).get("accelerated")]
    pods = [tb.pod(s.name) for s in meshed]
    dimensions = Counter(f"{p.rules}/{'istio-cni' if p.cni else 'istio-init'}/uid {p.proxy_uid}"
                         f"{' (accelerated)' if p.name in accelerated else ''}" for p in pods)
    with_mesh_defaults = sum(1 for p in pods if p.mesh_defaults)
    refused = {s.name: verdicts.get(s.name, {}).get("reason", "not seen by the agent")
               for s in meshed if s.name not in accelerated}
    peers = Counter(h.peer for h in iptables.values())
    outcomes = Counter(h.outcome for h in iptables.values())
    mismatches = differences(iptables, ebpf)
    unstable = differences(iptables, iptables_again)
    print(f"matrix: {len(meshed)} meshed pods x {len(drawn) / len(meshed):.1f} probes = {len(drawn)} probes "
          f"(seed {SEED}); {len(accelerated)} pods accelerated; connections redirected by Istio's nat rules: "
          f"{nat_iptables} in the iptables pass, {nat_ebpf} in the ebpf pass; agent redirects {redirects:.0f}; "
          f"peers {dict(peers)}; outcomes {dict(outcomes)}")
    carried = Counter(f"{_path_kind(tb, p)}{_via_client_sidecar(hops)}: {_nat_words(ebpf_nat[p])}"
                      for p, hops in ebpf.items() if hops.sidecars)
    print("ebpf pass, probes through a sidecar, by path:")
    for path, n in sorted(carried.items()):
        print(f"   {n:4d}  {path}")
    print(f"pods by rules/init/uid: {dict(sorted(dimensions.items()))}; with mesh defaults: {with_mesh_defaults}")
    for name, reason in refused.items():
        print(f"   not accelerated: {name}: {reason}")
    if os.environ.get("MERBRIDGE_MATRIX_VERBOSE"):
        for probe, hops in iptables.items():
            print(f"   {probe.key()}: {hops.describe()}; ebpf pass: {_nat_words(ebpf_nat[probe])}")
    print(f"mismatches iptables vs ebpf: {len(mismatches)}; iptables vs iptables again: {len(unstable)}; "
          f"{time.monotonic() - started:.0f} s")

    # The matrix must exercise both datapaths and both kinds of path.
    assert accelerated, f"no pod was accelerated: the ebpf pass compared iptables with itself; {refused}"
    assert redirects > 0 and nat_ebpf < nat_iptables, (redirects, nat_iptables, nat_ebpf)
    assert peers["inbound-sidecar"] and peers["client"], peers
    assert not unstable, ("the iptables passes differ, the probes are not deterministic:\n"
                          + difference_table(unstable, "iptables", "again"))
    assert not mismatches, (f"{len(mismatches)} of {len(drawn)} probes took another path in ebpf mode "
                            f"(seed {SEED}):\n" + difference_table(mismatches, "iptables", "ebpf"))


# --- the pieces, without a bed ------------------------------------------------------

def test_draws_repeat_from_the_seed_and_give_installable_pods():
    first = pod_draws.draw_pods(random.Random(7), 3, 21)
    assert first == pod_draws.draw_pods(random.Random(7), 3, 21)
    assert first != pod_draws.draw_pods(random.Random(8), 3, 21)
    meshed = [s for s in first if s.meshed]
    assert len(meshed) == 42 and len(first) == 44
    for spec in meshed:
        mesh = istio_iptables.MeshDefaults.from_dict(spec.mesh_defaults)
        if spec.proxy_uid is not None:
            mesh = dataclasses.replace(mesh, proxy_uid=spec.proxy_uid, proxy_gid=spec.proxy_uid)
        flags = istio_iptables.installed_flags(spec.annotations, mesh, cni=spec.cni)
        assert istio_iptables.rule_lines(flags)       # istio-iptables would accept these flags
    # every dimension of the issue occurs in one draw of this size
    assert {s.rules for s in meshed} == {"iptables", "nftables"}
    assert {bool(s.cni) for s in meshed} == {True, False}
    assert any(s.proxy_uid == pod_draws.OTHER_PROXY_UID or s.mesh_defaults.get("proxyUID") for s in meshed)
    assert any(s.mesh_defaults for s in meshed) and any(not s.mesh_defaults for s in meshed)


def test_probes_reach_into_every_drawn_range():
    specs = pod_draws.draw_pods(random.Random(11), 0, 6)
    _, pods, _ = topology.plan("u", specs, 2)
    drawn = pod_draws.draw_probes(random.Random(12), pods)
    assert drawn == pod_draws.draw_probes(random.Random(12), pods)
    by_client: dict[str, list] = {}
    for probe in drawn:
        by_client.setdefault(probe.client, []).append(ipaddress.ip_address(probe.address))
    for pod in pods:
        if not pod.meshed:
            continue
        for name in (istio_iptables.ANN_INCLUDE_OUTBOUND_IP_RANGES, istio_iptables.ANN_EXCLUDE_OUTBOUND_IP_RANGES):
            for item in filter(None, pod.annotations.get(name, "").split(",")):
                if item != "*":
                    net = ipaddress.ip_network(item)
                    assert any(a in net for a in by_client[pod.name]), (pod.name, item)
    assert any(p.kind.startswith("inbound") for p in drawn) and any("plain" in p.kind for p in drawn)


def test_counter_labels_and_error_words():
    assert probes._counter_label("listener.0.0.0.0_15006.downstream_cx_total") == "virtualInbound"
    assert probes._counter_label("listener.0.0.0.0_15006.ssl.handshake") == "virtualInbound.tls"
    assert probes._counter_label("listener.10.1.2.3_8080.downstream_cx_total") == "listener 10.1.2.3_8080"
    assert probes._counter_label("cluster.outbound|8080||a.default.svc.cluster.local.upstream_cx_total") \
        == "outbound|8080||a.default.svc.cluster.local"
    assert probes.classify_error(ConnectionRefusedError()) == "refused"
    assert probes.classify_error(http.client.RemoteDisconnected()) == "closed"
    assert probes.classify_error(OSError(errno.EHOSTUNREACH, "no route")) == "unreachable"
    assert probes.classify_error(socket.timeout()) == "timeout"


def test_a_difference_is_reported_with_both_sides():
    p = probes.Probe("a", "10.0.0.1", 8080, "pod of meshed b", "b")
    direct = probes.Hops((), "client", "http 200", "b:8080")
    proxied = probes.Hops((("server", "virtualInbound", 1),), "inbound-sidecar", "http 200", "b:8080")
    assert probes.differences({p: direct}, {p: direct}) == []
    diffs = probes.differences({p: direct}, {p: proxied})
    assert diffs == [(p, direct, proxied)]
    table = probes.difference_table(diffs, "iptables", "ebpf")
    assert "a -> 10.0.0.1:8080" in table and "peer client" in table and "server:virtualInbound+1" in table
