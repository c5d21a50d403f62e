"""A tiny benchmark on the real test bed, end to end through the command:
every load in every mode on Envoy sidecars with the bed's default mTLS,
results.json valid against its schema, the datapath's counters and the TLS
handshakes recorded, the report and plots written, nothing left behind."""

import json
import os
import uuid

import pytest
from click.testing import CliRunner

from merbridge_py import sandbox
from merbridge_py.bench import schema
from merbridge_py.bench.cli import bench

pytestmark = [pytest.mark.bpf, pytest.mark.slow]


def test_tiny_bench_on_the_test_bed(tmp_path):
    name = f"bt{os.getpid()}{uuid.uuid4().hex[:4]}"
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, [
        "--rounds", "1", "--duration", "1", "--warmup", "0", "--modes", "nomesh,iptables,ebpf",
        "--loads", "keepalive:2 newconn:2 tcp_rr bulk fixedrate:2", "--paths", "same-node",
        "--fixedrate-rps", "100",
        "--name", name, "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    doc = json.loads((out / "results.json").read_text())
    schema.validate(doc)
    failed = [(r["mode"], r["load"], r["error"]) for r in doc["rounds"] if not r["ok"]]
    assert not failed
    assert len(doc["rounds"]) == 3 * 5
    for r in doc["rounds"]:
        # the sidecars carry the traffic where the mesh is on, and only there
        if r["mode"] == "nomesh":
            assert r["cpu_us"]["sidecars"] == 0, r
        else:
            assert r["cpu_us"]["sidecars"] > 0, r
        assert r["cpu_us"]["client"] > 0, r
        # /proc counts CPU in 10 ms ticks: nginx serving 100 requests may not reach one
        assert r["load"] == "fixedrate" or r["cpu_us"]["apps"] > 0, r
        # node agents run in ebpf mode only; their CPU is counted there
        assert (r["mode"] == "ebpf") or r["cpu_us"]["agents"] == 0, r
        if r["load"] == "bulk":
            assert r["throughput_bps"] > 0
        else:
            assert r["rps"] > 0 and 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"]
        assert (r["late_slots"] is not None) == (r["load"] == "fixedrate")
        # TCP's counters of the one node, read in every mode (all zero is fine: loopback rarely retransmits)
        assert set(r["tcp"]) == {"client and server node"}, r
        assert set(r["tcp"]["client and server node"]) >= {"TcpRetransSegs", "TcpExtTCPTimeouts"}, r
        assert r["busy"] == "none" and r["busy_workers"] == 0
        # the agent's counters are read in ebpf mode only: on one node, every leg spliced
        if r["mode"] == "ebpf" and r["load"] == "keepalive":
            spliced = r["datapath"]["client and server node"]["merbridge_spliced_messages_total"]
            assert spliced >= 3 * r["requests"], r
        else:
            assert r["mode"] == "ebpf" or r["datapath"] is None
    assert {(e["load"], e["mode"]) for e in doc["summary"]} == {
        (load, mode) for load in ("keepalive", "newconn", "tcp_rr", "bulk", "fixedrate")
        for mode in ("nomesh", "iptables", "ebpf")}
    assert len(doc["ratios"]) == 5
    [added] = doc["added_latency"]
    assert set(added["added_us"]) == {"iptables", "ebpf"}
    assert doc["machine"]["tools"]["wrk"] and doc["config"]["settle_how"]
    assert doc["config"]["sidecar"] == "http"    # the default: Envoy's pooling on the HTTP port
    cfg = doc["config"]
    assert (cfg["proxy"], cfg["mtls"], cfg["envoy_workers"]) == ("envoy", "permissive", 2)
    assert "/1.40.0/" in cfg["proxy_version"] and cfg["fixedrate"]["rps"] == 100
    # permissive still means mutual TLS between sidecars: the client's Envoy originated it
    client = doc["config"]["pods"]["same-node"]["client"]
    assert cfg["tls_handshakes_last_round"][client]["outbound"] > 0

    md = (out / "results.md").read_text()
    assert "## Targets" in md and "| same-node | tcp_rr | 1 | none | ebpf |" in md
    assert "- Sidecars: envoy " in md and "2 worker threads per sidecar" in md
    assert "## Added latency at a fixed rate" in md and "## What the datapath did" in md
    for png in ("latency.png", "rps.png", "throughput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| path | load | conns | node busy | mode |" in result.output      # the table is printed at the end

    # the bench brought its own test bed up and took it down again
    assert not [ns for ns in sandbox.netns_list() if ns.startswith(f"{sandbox.OWNED_PREFIX}{name}-")]
    assert not (sandbox.cgroup2_root() / f"{sandbox.OWNED_PREFIX}{name}").exists()


@pytest.mark.parametrize("family, rules", [("inet6", "ipv6"), ("mapped", "ipv4")])
def test_tiny_bench_over_af_inet6_sockets_is_carried_by_ebpf(tmp_path, family, rules):
    """Issue 14: the bench's clients on AF_INET6 sockets (native IPv6, or
    v4-mapped as the JVM connects) on a dual-stack bed. In iptables mode the
    client pod's ISTIO_REDIRECT of the family on the wire (`rules`: a
    v4-mapped connection is IPv4 on the wire) counts the client's connections;
    in ebpf mode it stays flat while the datapath redirects and splices."""
    name = f"bt6{os.getpid()}{uuid.uuid4().hex[:4]}"
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, [
        "--rounds", "1", "--duration", "1", "--warmup", "0", "--modes", "iptables,ebpf",
        "--loads", "keepalive:2 bulk", "--paths", "same-node", "--family", family, "--no-plots",
        "--name", name, "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    doc = json.loads((out / "results.json").read_text())
    schema.validate(doc)
    cfg = doc["config"]
    assert (cfg["family"], cfg["ip_families"]) == (family, ["ipv4", "ipv6"])
    assert f"--family {family}" in cfg["command"]
    target = cfg["pods"]["same-node"]["target"]
    server_ip = cfg["pods"]["same-node"]["server_ip"]
    assert target == f"::ffff:{server_ip}" if family == "mapped" else ":" in target and "." not in target
    assert not [(r["mode"], r["load"], r["error"]) for r in doc["rounds"] if not r["ok"]]
    other = "ipv4" if rules == "ipv6" else "ipv6"
    for r in doc["rounds"]:
        assert r["family"] == family
        nat = r["nat_redirects"]
        if r["mode"] == "iptables":
            # wrk's connections (and its first probe), iperf3's control and data connections
            assert nat[rules] >= 2 and nat[other] == 0, r
        else:
            assert nat == {"ipv4": 0, "ipv6": 0}, r
            counters = r["datapath"]["client and server node"]
            assert sum(v for k, v in counters.items() if k.startswith("merbridge_redirects_total")) >= 2, r
            if r["load"] == "keepalive":
                assert counters["merbridge_spliced_messages_total"] >= 3 * r["requests"], r
    assert all(c["carried_by_ebpf"] for c in doc["carried_by"] if c["mode"] == "ebpf")
    md = (out / "results.md").read_text()
    assert f"- Client sockets: {family}: AF_INET6 sockets" in md and "## Who carried the client's connections" in md
    assert not [ns for ns in sandbox.netns_list() if ns.startswith(f"{sandbox.OWNED_PREFIX}{name}-")]


def test_tiny_bench_on_a_busy_node(tmp_path):
    """--busy all: stress-ng on every core in the client's node during the
    level's runs, in both modes; recorded per row, and gone afterwards."""
    name = f"btb{os.getpid()}{uuid.uuid4().hex[:4]}"
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, [
        "--rounds", "1", "--duration", "1", "--warmup", "0", "--modes", "iptables,ebpf",
        "--loads", "keepalive:2", "--paths", "same-node", "--busy", "none,all", "--no-plots",
        "--name", name, "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    doc = json.loads((out / "results.json").read_text())
    schema.validate(doc)
    assert not [(r["mode"], r["busy"], r["error"]) for r in doc["rounds"] if not r["ok"]]
    assert [(r["mode"], r["busy"], r["busy_workers"]) for r in doc["rounds"]] == [
        ("iptables", "none", 0), ("iptables", "all", os.cpu_count()),
        ("ebpf", "none", 0), ("ebpf", "all", os.cpu_count())]
    assert doc["config"]["busy"] == ["none", "all"] and "stress-ng --cpu" in doc["config"]["busy_how"]
    assert "--busy none,all" in doc["config"]["command"]
    assert {r["busy"] for r in doc["ratios"]} == {"none", "all"}
    assert "| same-node | keepalive | 2 | all | ebpf |" in (out / "results.md").read_text()
    assert not (sandbox.cgroup2_root() / f"{sandbox.OWNED_PREFIX}{name}").exists()
    assert not [ns for ns in sandbox.netns_list() if ns.startswith(f"{sandbox.OWNED_PREFIX}{name}-")]
