"""The test bed reproduces real Istio installs per pod: Istio's native
nftables rules or istio-iptables' rules, mesh-wide injection defaults in
istio-init's arguments (or, with istio-cni, in the annotations), and a proxy
uid other than 1337 -- and what the pods file shows is what was installed:
the rules read back from each pod's namespace (policy/live_rules.py) equal
the capture the pod object's spec records.

One bed, iptables mode, Envoy sidecars:
  nf     nftables rules, istio-init, mesh default excludeOutboundPorts 9091
  nfcni  nftables rules, istio-cni, mesh default excludeIPRanges 10.192.0.0/10 (every bed's pod IPs)
  ipt    iptables rules, istio-init, proxy uid/gid 1000720000
  plain  no sidecar
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from merbridge_py import sandbox
from merbridge_py.policy import decide
from merbridge_py.policy.live_rules import read_netns
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

PORTS = (8080, 9091)
OTHER_UID = 1000720000
SPECS = [
    PodSpec("nf", ports=PORTS, rules="nftables", mesh_defaults={"excludeOutboundPorts": "9091"}),
    PodSpec("nfcni", ports=PORTS, rules="nftables", cni=True, mesh_defaults={"excludeIPRanges": "10.192.0.0/10"}),
    PodSpec("ipt", ports=PORTS, proxy_uid=OTHER_UID),
    PodSpec("plain", ports=PORTS, meshed=False),
]


@pytest.fixture(scope="module")
def bed():
    name = f"inst{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=1, pods=SPECS, mode="iptables", mtls="permissive") as tb:
        yield tb


def pod_objects(tb: Testbed) -> dict[str, dict]:
    data = json.loads(tb.pods_file("node0").read_text())
    return {item["metadata"]["name"]: item for item in data["items"]}


def init_container(obj: dict) -> dict:
    return obj["spec"]["initContainers"][0]


def proxy(obj: dict) -> dict:
    return next(c for c in obj["spec"]["containers"] if c["name"] == "istio-proxy")


def test_rules_of_each_backend_are_in_the_pods(bed):
    for name in ("nf", "nfcni"):
        ruleset = sandbox.sh("nft", "list", "ruleset", netns=bed.pod(name).netns)
        assert "table inet istio-proxy-nat" in ruleset, name
        assert "ISTIO_" not in sandbox.sh("iptables-save", "-t", "nat", netns=bed.pod(name).netns), name
    assert "-A ISTIO_OUTPUT" in sandbox.sh("iptables-save", "-t", "nat", netns=bed.pod("ipt").netns)
    assert "istio-proxy" not in sandbox.sh("nft", "list", "ruleset", netns=bed.pod("ipt").netns)


def test_pods_file_shows_what_the_injector_writes(bed):
    objs = pod_objects(bed)
    nf = init_container(objs["nf"])
    assert nf["name"] == "istio-init"
    assert "--native-nftables" in nf["args"]
    assert nf["args"][nf["args"].index("-o") + 1] == "9091"          # the mesh default, no annotation
    cni = objs["nfcni"]
    assert init_container(cni)["name"] == "istio-validation"
    assert cni["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundIPRanges"] == "10.192.0.0/10"
    ipt = init_container(objs["ipt"])
    assert ipt["args"][ipt["args"].index("-u") + 1] == str(OTHER_UID)
    assert "--native-nftables" not in ipt["args"]
    assert proxy(objs["ipt"])["securityContext"]["runAsUser"] == OTHER_UID
    assert proxy(objs["nf"])["securityContext"]["runAsUser"] == 1337


def test_live_rules_equal_what_the_pod_object_records(bed):
    """The installed rules, read back, are what the spec-side sources of the
    same pod object say (decide() with installed=... accepts them, the
    source named; a mismatch would be refused)."""
    objs = pod_objects(bed)
    for name, source in (("nf", "nftables rules"), ("nfcni", "nftables rules"), ("ipt", "iptables rules")):
        installed = read_netns(f"/run/netns/{bed.pod(name).netns}")
        assert not isinstance(installed, Exception), (name, installed)
        assert installed.source == source
        assert installed.proxy_uids == (bed.pod(name).proxy_uid,)
        verdict = decide(objs[name], installed=installed)
        assert verdict.policy is not None and verdict.policy.source == source, (name, verdict.reason)
        assert "disagree" not in verdict.reason and "leave alone" not in verdict.reason, (name, verdict.reason)
        if name != "ipt":      # uid 1337: accelerated (the other uid waits for the per-pod uid in the kernel)
            assert verdict.accelerate, (name, verdict.reason)


def test_sidecar_runs_as_the_pods_proxy_uid(bed):
    for name in ("nf", "ipt"):
        rec = next(r for r in bed.processes if r.role == "sidecar" and r.owner == name)
        status = open(f"/proc/{rec.pid}/status").read()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] == str(bed.pod(name).proxy_uid), (name, uid_line)


@pytest.mark.parametrize("src,dst", [("nf", "ipt"), ("ipt", "nf")])
def test_meshed_requests_take_the_sidecars_and_count_on_each_backend(bed, src, dst):
    """Through both sidecars (the app sees 127.0.0.6) and counted by the
    pod's own redirect rules, whatever their kind. A sidecar that ran as a uid
    the rules do not exempt would loop its own upstream connection back."""
    before_src, before_dst = bed.nat_counters(src), bed.nat_counters(dst)
    status, body = bed.request(src, bed.pod(dst).ip, 8080)
    assert status == 200 and body["pod"] == dst
    assert body["peer"].startswith("127.0.0.6:")
    after_src, after_dst = bed.nat_counters(src), bed.nat_counters(dst)
    assert after_src["ISTIO_REDIRECT"] - before_src["ISTIO_REDIRECT"] == 1
    assert after_dst["ISTIO_IN_REDIRECT"] - before_dst["ISTIO_IN_REDIRECT"] == 1


def test_mesh_default_exclusions_bypass_the_sidecar(bed):
    """nf: excludeOutboundPorts 9091 (a mesh default in istio-init's -o) goes
    direct; nfcni: excludeIPRanges 10.192.0.0/10 (a mesh default istio-cni
    reads from the annotations) sends every pod IP direct -- only the
    destination's inbound capture sees it."""
    before = bed.nat_counters("nf")
    status, body = bed.request("nf", bed.pod("plain").ip, 9091)
    assert status == 200 and body["peer"].split(":")[0] == bed.pod("nf").ip     # direct: the app's own address
    assert bed.nat_counters("nf")["ISTIO_REDIRECT"] == before["ISTIO_REDIRECT"]
    before_src, before_dst = bed.nat_counters("nfcni"), bed.nat_counters("nf")
    status, body = bed.request("nfcni", bed.pod("nf").ip, 8080)
    assert status == 200 and body["peer"].startswith("127.0.0.6:")               # nf's inbound sidecar only
    assert bed.nat_counters("nfcni")["ISTIO_REDIRECT"] == before_src["ISTIO_REDIRECT"]
    assert bed.nat_counters("nf")["ISTIO_IN_REDIRECT"] == before_dst["ISTIO_IN_REDIRECT"] + 1


def test_nomesh_removes_the_nftables_tables_and_iptables_restores_them(bed):
    try:
        bed.set_mode("nomesh")
        for name in ("nf", "nfcni"):
            assert "istio-proxy" not in sandbox.sh("nft", "list", "ruleset", netns=bed.pod(name).netns)
            assert bed.nat_counters(name) == {"ISTIO_REDIRECT": 0, "ISTIO_IN_REDIRECT": 0}
    finally:
        bed.set_mode("iptables")
    assert "table inet istio-proxy-nat" in sandbox.sh("nft", "list", "ruleset", netns=bed.pod("nf").netns)


def test_bad_install_options_fail_before_anything_is_created():
    for spec, match in ((PodSpec("x", rules="pf"), "rules"),
                        (PodSpec("x", mesh_defaults={"excludeIPRange": "10.0.0.0/8"}), "excludeIPRange"),
                        (PodSpec("x", proxy_uid=0), "proxy_uid")):
        with pytest.raises(ValueError, match=match):
            Testbed.up(f"bad{os.getpid()}{uuid.uuid4().hex[:4]}", nodes=1, pods=[spec])
