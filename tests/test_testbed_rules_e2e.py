"""End to end, ebpf mode: the agent decides each pod from the rules Istio
installed in it (issue 11) -- Istio's native nftables tables or iptables --
and an annotation patched after the rules were installed never makes eBPF
capture more than those rules: the pod keeps the rules' behaviour or is
refused with a reason. Checked with traffic and counters (Envoy's listener
counts, the app's view of its peer, the pods' own redirect counters), not
only the agent's word.

Bed (one node, ebpf mode, Envoy, mTLS permissive):
  a, b  nftables rules (istio-init --native-nftables)
  w     iptables rules
  x     nftables rules, mesh default excludeOutboundPorts 9091 (istio-init -o 9091)
  plain no sidecar
every app serves 8080 and 9091.
"""

from __future__ import annotations

import copy
import json
import os
import time
import uuid

import pytest

from merbridge_py.agent.status import agent_request
from merbridge_py.testbed import Testbed, istio_iptables
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

PORTS = (8080, 9091)
SPECS = [
    PodSpec("a", ports=PORTS, rules="nftables"),
    PodSpec("b", ports=PORTS, rules="nftables"),
    PodSpec("w", ports=PORTS, rules="iptables"),
    PodSpec("x", ports=PORTS, rules="nftables", mesh_defaults={"excludeOutboundPorts": "9091"}),
    PodSpec("plain", ports=PORTS, meshed=False),
]
CONVERGE = 20.0     # the pods file is re-read on change; the agent's pass is quick, the machine is busy


@pytest.fixture(scope="module")
def bed():
    name = f"rte{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=1, pods=SPECS, mode="ebpf", mtls="permissive") as tb:
        yield tb


def agent_status(tb: Testbed) -> dict[str, dict]:
    return {p["pod"]: p for p in agent_request(tb.admin_socket("node0"), "/status", timeout=10)["pods"]}


def wait_status(tb: Testbed, pod: str, predicate, what: str) -> dict:
    deadline = time.monotonic() + CONVERGE
    while True:
        st = agent_status(tb).get(f"default/{pod}")
        if st is not None and predicate(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {pod}: {what} not seen in {CONVERGE}s; last status {st}")
        time.sleep(0.1)


class PodsFile:
    """Edits of the node's pods file, as an API server would apply a patch
    (istio-init's arguments untouched; a new resourceVersion)."""

    def __init__(self, tb: Testbed):
        self.path = tb.pods_file("node0")
        self.original = self.path.read_text()
        self.version = 100

    def patch_annotations(self, pod: str, changes: dict[str, str | None]) -> None:
        data = json.loads(self.path.read_text())
        for item in data["items"]:
            if item["metadata"]["name"] == pod:
                ann = item["metadata"]["annotations"]
                for key, value in changes.items():
                    if value is None:
                        ann.pop(key, None)
                    else:
                        ann[key] = value
                self.version += 1
                item["metadata"]["resourceVersion"] = str(self.version)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.path)

    def restore(self) -> None:
        data = json.loads(self.original)
        self.version += 1
        for item in data["items"]:
            item["metadata"]["resourceVersion"] = str(self.version)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.path)


class Hop:
    """One request from `src` with the counters around it: the source pod's
    Istio outbound redirect counter (moves only when the rules, not eBPF,
    took the connection) and its Envoy's outbound listener count."""

    def __init__(self, tb: Testbed, src: str, dst: str, port: int):
        before_nat = tb.nat_counters(src)["ISTIO_REDIRECT"]
        before_out = tb.sidecar_connections(src)["outbound"]
        status, body = tb.request(src, tb.pod(dst).ip, port)
        assert status == 200 and body["pod"] == dst
        self.peer = body["peer"].rsplit(":", 1)[0]
        self.nat = tb.nat_counters(src)["ISTIO_REDIRECT"] - before_nat
        self.sidecar = tb.sidecar_connections(src)["outbound"] - before_out


def test_decisions_rest_on_the_live_rules_of_each_kind(bed):
    st = agent_status(bed)
    for pod, source in (("a", "nftables rules"), ("b", "nftables rules"), ("x", "nftables rules"),
                        ("w", "iptables rules")):
        assert st[f"default/{pod}"]["accelerated"], st[f"default/{pod}"]
        assert st[f"default/{pod}"]["source"] == source
        assert f"policy from {source}" in st[f"default/{pod}"]["reason"]
    assert not st["default/plain"]["accelerated"] and "no istio-proxy sidecar" in st["default/plain"]["reason"]


def test_nftables_pods_are_served_by_ebpf(bed):
    """a -> b: through a's sidecar (eBPF's redirect: a's nftables redirect
    rule does not move) and b's (the app sees 127.0.0.6)."""
    hop = Hop(bed, "a", "b", 8080)
    assert (hop.sidecar, hop.nat, hop.peer) == (1, 0, "127.0.0.6")


def test_mesh_default_exclusion_in_the_rules_holds_in_ebpf_mode(bed):
    """x's rules leave 9091 alone (-o 9091 from the mesh default, no
    annotation): eBPF too -- the request goes direct, x's sidecar never sees it."""
    hop = Hop(bed, "x", "plain", 9091)
    assert (hop.sidecar, hop.nat, hop.peer) == (0, 0, bed.pod("x").ip)
    assert Hop(bed, "x", "plain", 8080).sidecar == 1


def test_annotation_patched_after_install_never_widens_capture(bed):
    """x: excludeOutboundPorts patched to "" (Istio's rules, made once, still
    send 9091 direct). The rules win: x stays accelerated and 9091 still goes
    direct -- eBPF does not start capturing what the annotation now says."""
    pods = PodsFile(bed)
    try:
        pods.patch_annotations("x", {istio_iptables.ANN_EXCLUDE_OUTBOUND_PORTS: ""})
        st = wait_status(bed, "x", lambda s: "leave alone" not in s["reason"] and
                         "annotations would capture more" in s["reason"], "the patched annotation noted")
        assert st["accelerated"] and st["source"] == "nftables rules"
        hop = Hop(bed, "x", "plain", 9091)
        assert (hop.sidecar, hop.nat, hop.peer) == (0, 0, bed.pod("x").ip)
    finally:
        pods.restore()
    wait_status(bed, "x", lambda s: s["accelerated"] and "would capture more" not in s["reason"], "restored")


def test_annotation_patched_to_exclude_what_the_rules_capture_is_refused(bed):
    """w: excludeOutboundPorts 9091 patched in; the rules still capture 9091.
    eBPF must not send it direct (capture less is fine for eBPF alone, but
    the pod's decision no longer holds): w is refused with both values named,
    and its traffic takes Istio's rules -- 9091 through the sidecar, as the
    rules say. Patched back: accelerated again."""
    pods = PodsFile(bed)
    try:
        pods.patch_annotations("w", {istio_iptables.ANN_EXCLUDE_OUTBOUND_PORTS: "9091"})
        st = wait_status(bed, "w", lambda s: not s["accelerated"], "refusal")
        assert "iptables rules capture outbound to 0.0.0.0:9091" in st["reason"], st["reason"]
        assert "annotations leave alone" in st["reason"] or "annotations" in st["reason"]
        for port in (9091, 8080):
            hop = Hop(bed, "w", "b", port)
            assert (hop.sidecar, hop.nat, hop.peer) == (1, 1, "127.0.0.6"), port   # Istio's rules, as installed
    finally:
        pods.restore()
    st = wait_status(bed, "w", lambda s: s["accelerated"], "acceleration after the patch is undone")
    assert st["source"] == "iptables rules"
    bed.settle()
    hop = Hop(bed, "w", "b", 9091)
    assert (hop.sidecar, hop.nat, hop.peer) == (1, 0, "127.0.0.6")


def test_inspect_pod_reads_the_same_rules(bed, tmp_path):
    import subprocess
    import sys
    data = json.loads(bed.pods_file("node0").read_text())
    obj = copy.deepcopy(next(i for i in data["items"] if i["metadata"]["name"] == "a"))
    (tmp_path / "a.json").write_text(json.dumps(obj))
    done = subprocess.run([sys.executable, "-m", "merbridge_py.cli", "inspect-pod", str(tmp_path / "a.json"),
                           "--netns", f"/run/netns/{bed.pod('a').netns}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["accelerate"] and verdict["policy"]["source"] == "nftables rules"
    spec_only = json.loads(subprocess.run([sys.executable, "-m", "merbridge_py.cli", "inspect-pod",
                                           str(tmp_path / "a.json")], capture_output=True, text=True,
                                          timeout=60).stdout)
    assert spec_only["policy"]["source"] == "istio-init arguments (native nftables)"
