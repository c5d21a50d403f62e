"""TCP's retransmission counters: parsing /proc/net/snmp and /proc/net/netstat
as nstat names them, summing a node's namespaces, increases over a run."""

import subprocess
from pathlib import Path

import pytest

from merbridge_py.bench import tcpstats
from merbridge_py.bench.bed import BenchPod, PodPair
from merbridge_py.bench.measure import tcp_by_role

# The layout of the two files (fields cut down; the real ones have dozens)
SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1000
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens AttemptFails RetransSegs OutRsts
Tcp: 1 200 120000 -1 40 2 17 5
Udp: InDatagrams NoPorts
Udp: 3 0
"""
NETSTAT = """TcpExt: SyncookiesSent TCPTimeouts TCPSynRetrans TCPLostRetransmit ListenOverflows
TcpExt: 0 4 3 1 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


def test_parse_names_counters_as_nstat_does():
    counters = tcpstats.parse(SNMP + NETSTAT)
    assert counters["TcpRetransSegs"] == 17 and counters["TcpMaxConn"] == -1
    assert counters["TcpExtTCPTimeouts"] == 4 and counters["TcpExtTCPSynRetrans"] == 3
    assert counters["IpForwarding"] == 1 and counters["UdpNoPorts"] == 0
    kept = tcpstats.keep(counters)
    assert set(kept) == set(tcpstats.COUNTERS)
    assert kept["TcpAttemptFails"] == 2 and kept["TcpExtTCPLostRetransmit"] == 1
    assert kept["TcpExtTCPFastRetrans"] == 0          # absent from the text: 0, not missing


def test_parse_reads_this_machines_files():
    text = Path("/proc/net/snmp").read_text() + Path("/proc/net/netstat").read_text()
    counters = tcpstats.parse(text)
    assert set(tcpstats.SHOWN) <= set(counters)


@pytest.mark.parametrize("text, message", [
    ("Tcp: A B\nTcp: 1\n", "2 names but 1 values"),
    ("Tcp: A B\nTcp: 1 x\n", "TcpB = 'x' is not an integer"),
    ("Tcp: A B\n", "without its line of values"),
])
def test_parse_rejects_malformed_text(text, message):
    with pytest.raises(tcpstats.BadCounters, match=message):
        tcpstats.parse(text)


def test_total_sums_a_nodes_namespaces():
    node_ns = {"TcpRetransSegs": 1}
    pod_a = {"TcpRetransSegs": 2, "TcpExtTCPTimeouts": 1}
    pod_b = {"TcpExtTCPSynRetrans": 4}
    t = tcpstats.total([node_ns, pod_a, pod_b])
    assert (t["TcpRetransSegs"], t["TcpExtTCPTimeouts"], t["TcpExtTCPSynRetrans"]) == (3, 1, 4)
    assert t["TcpOutRsts"] == 0


def test_deltas_per_node_and_a_counter_that_went_down_is_an_error():
    before = {"node0": {"TcpRetransSegs": 10, "TcpExtTCPTimeouts": 1}, "node1": {"TcpRetransSegs": 0}}
    after = {"node0": {"TcpRetransSegs": 15, "TcpExtTCPTimeouts": 1}, "node1": {"TcpRetransSegs": 2},
             "node2": {"TcpRetransSegs": 9}}            # not read before: left out
    assert tcpstats.deltas(before, after) == {"node0": {"TcpRetransSegs": 5, "TcpExtTCPTimeouts": 0},
                                              "node1": {"TcpRetransSegs": 2}}
    with pytest.raises(tcpstats.BadCounters, match="node0: TcpRetransSegs went down by 3"):
        tcpstats.deltas(before, {"node0": {"TcpRetransSegs": 7}})


def test_deltas_are_keyed_by_the_nodes_role_in_the_run():
    client = BenchPod("a", "node0", "10.0.0.10", "ns-a", True)
    cross = PodPair(client, BenchPod("b", "node1", "10.0.1.10", "ns-b", True))
    same = PodPair(client, BenchPod("c", "node0", "10.0.0.11", "ns-c", True))
    per_node = {"node0": {"TcpRetransSegs": 1}, "node1": {"TcpRetransSegs": 2}, "node9": {"TcpRetransSegs": 3}}
    assert tcp_by_role(per_node, cross) == {"client node": {"TcpRetransSegs": 1},
                                            "server node": {"TcpRetransSegs": 2}}
    assert tcp_by_role(per_node, same) == {"client and server node": {"TcpRetransSegs": 1}}


# A listener that never accepts, with an accept queue of one: further SYNs are
# dropped (ListenOverflows) and their senders retransmit them after 1 s.
FULL_LISTENER = """
import socket, time
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(0)
clients = []
for _ in range(4):
    c = socket.socket(); c.setblocking(False)
    c.connect_ex(server.getsockname()); clients.append(c)
time.sleep(2.5)
"""


@pytest.mark.bpf
def test_read_namespace_counts_that_namespaces_own_retransmissions():
    """SYNs dropped by a full listener in a fresh namespace are retransmitted:
    that namespace's counters grow, the machine's own do not matter."""
    from merbridge_py import sandbox
    ns = f"mbp-benchtcp{__import__('os').getpid()}"
    sandbox.netns_add(ns)
    try:
        sandbox.sh("ip", "link", "set", "lo", "up", netns=ns)
        before = tcpstats.read_namespace(ns)
        subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", FULL_LISTENER], check=True, timeout=30)
        after = tcpstats.read_namespace(ns)
    finally:
        sandbox.netns_delete(ns)
    grew = tcpstats.deltas({"ns": before}, {"ns": after})["ns"]
    assert grew["TcpExtTCPSynRetrans"] >= 1 and grew["TcpRetransSegs"] >= 1, grew
    assert grew["TcpExtListenOverflows"] >= 1, grew
