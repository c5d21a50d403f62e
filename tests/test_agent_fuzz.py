"""Issue 13 acceptance: 10,000 random and malformed pod objects through the
whole agent (source thread + reconcile thread), once through the pods-file
source and once through the real Kubernetes client against the fake API
server. No crash, no dead thread, no pod without a reason, and a well-formed
pod added afterwards is accelerated within seconds.

The kernel is faked (helpers/fake_kernel.py): this is about the agent's input
handling, not the datapath."""

from __future__ import annotations

import copy
import json
import os
import random
import threading
import time

from kubernetes import client

from fake_apiserver import FakeApiServer
from helpers.fake_kernel import FakeDatapath, FakeNetns
from merbridge_py.agent.core import Agent
from merbridge_py.agent.kube_source import KubePodSource
from merbridge_py.agent.metrics import AgentMetrics
from merbridge_py.agent.pods_file import PodsFileSource
from merbridge_py.mesh import ISTIO

NODE = "node-1"
BATCHES, BATCH = int(os.environ.get("MERBRIDGE_FUZZ_BATCHES", "100")), 100   # 10,000 objects per source
SETTLE = 10.0                 # generous bound for the agent to catch up with a batch
GOOD_IP = "10.99.0.1"

VALID = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "x", "namespace": "fuzz", "annotations": {
        "traffic.sidecar.istio.io/excludeOutboundPorts": "9090"}},
    "spec": {"nodeName": NODE, "containers": [{"name": "app"}, {"name": "istio-proxy", "env": [
        {"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]}],
        "initContainers": [{"name": "istio-init"}]},
    "status": {"phase": "Running", "podIP": "10.98.0.1", "podIPs": [{"ip": "10.98.0.1"}]},
}
PATHS = [("metadata",), ("metadata", "annotations"), ("metadata", "namespace"),
         ("metadata", "annotations", "traffic.sidecar.istio.io/excludeOutboundPorts"),
         ("metadata", "annotations", "traffic.sidecar.istio.io/includeOutboundIPRanges"),
         ("metadata", "annotations", "sidecar.istio.io/interceptionMode"),
         ("metadata", "annotations", "merbridge.io/accelerate"), ("metadata", "deletionTimestamp"),
         ("spec",), ("spec", "containers"), ("spec", "initContainers"), ("spec", "hostNetwork"),
         ("status",), ("status", "podIP"), ("status", "podIPs"), ("status", "phase")]

class Garbage:
    """Random and malformed pod objects from a seeded generator (reproducible:
    a failure names the batch; the seed gives the same objects again)."""

    WORDS = ["istio-proxy", "istio-init", "Always", "Running", "Failed", "10.98.0.7", "::1", "true", "*",
             "80,90", "1:5", "0.0.0.0/0", "TPROXY", "", " ", "\u2028", "\x00", "\U0001f600", "9" * 30]

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def scalar(self):
        r = self.rng
        return r.choice([None, True, False, r.randint(-2**70, 2**70), r.random() * 1e6, r.choice(self.WORDS),
                         "".join(chr(r.randint(1, 0xD7FF)) for _ in range(r.randint(0, 12))),
                         ",".join(str(r.randint(-5, 70000)) for _ in range(r.randint(0, 6)))])

    def value(self, depth: int = 0):
        kind = self.rng.random()
        if depth > 3 or kind < 0.6:
            return self.scalar()
        if kind < 0.8:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {str(self.scalar()): self.value(depth + 1) for _ in range(self.rng.randint(0, 4))}

    def mutated_pod(self) -> dict:
        pod = copy.deepcopy(VALID)
        for _ in range(self.rng.randint(0, 4)):
            path = self.rng.choice(PATHS)
            target = pod
            for part in path[:-1]:
                target = target.get(part) if isinstance(target, dict) else None
            if isinstance(target, dict):
                target[path[-1]] = self.value()
        return pod

    def obj(self):
        r = self.rng.random()
        if r < 0.7:
            return self.mutated_pod()
        if r < 0.75:   # nested far deeper than any pod
            deep: object = {}
            for _ in range(500):
                deep = {"spec": deep}
            return {"kind": "Pod", "spec": deep}
        return self.value()


def name_it(obj, name: str) -> dict:
    """Every object needs a name to be filed at all (the API server gives every object one)."""
    obj = obj if isinstance(obj, dict) else {"value": obj}
    meta = obj.get("metadata")
    obj["metadata"] = meta = meta if isinstance(meta, dict) else {}
    meta["name"] = name
    if not isinstance(meta.get("namespace"), str) or not meta["namespace"]:
        meta["namespace"] = "fuzz"
    spec = obj.get("spec")
    if isinstance(spec, dict) and "nodeName" not in spec:
        spec["nodeName"] = NODE
    return obj


def good_pod(name: str = "good") -> dict:
    pod = copy.deepcopy(VALID)
    pod["metadata"] = {"name": name, "namespace": "fuzz"}
    pod["status"] = {"phase": "Running", "podIP": GOOD_IP}
    return pod


class AgentUnderTest:
    def __init__(self, source_factory):
        self.datapath, self.netns, self.metrics = FakeDatapath(), FakeNetns(), AgentMetrics()
        self.netns.add(GOOD_IP, 99)
        self.agent = Agent(self.datapath, ISTIO, netns_index=self.netns, metrics=self.metrics, rules_reader=None)
        self.source = source_factory(self.agent.update_pods)
        self.metrics.source = self.source
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.source.run, args=(self.stop,), daemon=True),
                        threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)]
        for t in self.threads:
            t.start()
        self.objects = 0

    def assert_settled(self, expected: set[str]) -> None:
        """The agent shows exactly these pods, each with a reason; both threads alive."""
        deadline = time.monotonic() + SETTLE
        while True:
            assert all(t.is_alive() for t in self.threads), "a thread died"
            statuses = {s["pod"]: s for s in self.agent.status()}
            if set(statuses) == expected:
                break
            assert time.monotonic() < deadline, (f"agent did not catch up: missing {sorted(expected - set(statuses))[:5]}, "
                                                 f"extra {sorted(set(statuses) - expected)[:5]}")
            time.sleep(0.02)
        for s in statuses.values():
            assert s["reason"].startswith(("accelerated", "not accelerated")), s

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(5)


def fuzz(under: AgentUnderTest, deliver, batches=BATCHES, seed=13):
    garbage = Garbage(seed)
    for n in range(batches):
        batch = [name_it(garbage.obj(), f"p{i}") for i in range(BATCH)]
        expected = deliver(batch)
        under.objects += len(batch)
        try:
            under.assert_settled(expected)
        except AssertionError as e:
            raise AssertionError(f"batch {n} (seed {seed}): {e}") from None


def assert_good_pod_accelerated_within_seconds(under: AgentUnderTest, add) -> float:
    start = time.monotonic()
    add(good_pod())
    while True:
        st_ = {s["pod"]: s for s in under.agent.status()}.get("fuzz/good")
        if st_ and st_["accelerated"]:
            break
        assert time.monotonic() - start < 5, st_
        time.sleep(0.02)
    assert under.datapath.local_pod_ip.get(GOOD_IP) == 99
    return time.monotonic() - start


def test_fuzz_through_the_pods_file_source(tmp_path):
    path = tmp_path / "pods.json"
    path.write_text(json.dumps({"kind": "PodList", "items": []}))
    under = AgentUnderTest(lambda on_change: PodsFileSource(path, on_change, interval=0.01))
    broken_files = [b"\xff\xfe not utf-8", b"[" * 100_000, b"kind: Pod\nmetadata: {name: a, creationTimestamp: 2025-13-01}",
                    b'{"kind": "PodList", "items": 5}', b"{unclosed"]
    try:
        def deliver(batch):
            items = [o for o in batch if o.get("kind", "Pod") == "Pod"]
            # an item of another kind makes the whole file invalid: keep those out, they are tested below
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"kind": "PodList", "items": items}))
            tmp.replace(path)
            expected = {f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in items}
            if under.objects // BATCH % 10 == 0:   # now and then a broken file: the last good state stays
                errors = under.source.errors
                path.write_bytes(broken_files[under.objects // BATCH // 10 % len(broken_files)])
                deadline = time.monotonic() + SETTLE
                while under.source.errors == errors:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                tmp.write_text(json.dumps({"kind": "PodList", "items": items}))
                tmp.replace(path)
            return expected
        fuzz(under, deliver)
        assert under.objects == BATCHES * BATCH
        assert under.source.errors >= BATCHES // 10
        current = json.loads(path.read_text())["items"]

        def add(pod):
            path.write_text(json.dumps({"kind": "PodList", "items": current + [pod]}))
        took = assert_good_pod_accelerated_within_seconds(under, add)
        print(f"pods file: {under.objects} objects, {under.source.errors} broken files refused, "
              f"{under.agent.decisions} decisions; good pod accelerated after {took:.2f}s")
    finally:
        under.close()


def test_fuzz_through_the_kubernetes_source():
    with FakeApiServer() as server:
        api = client.ApiClient(client.Configuration(host=server.url))
        under = AgentUnderTest(lambda on_change: KubePodSource(NODE, on_change, api_client=api,
                                                               backoff_initial=0.05, backoff_max=0.5))
        live: set[tuple[str, str]] = set()
        try:
            def deliver(batch):
                for ns, name in sorted(live):
                    server.delete_pod(ns, name)
                live.clear()
                for obj in batch:
                    stored = server.add_pod(obj)
                    live.add((stored["metadata"]["namespace"], stored["metadata"]["name"]))
                on_node = server.objects("pods")
                return {k for k, o in on_node.items()
                        if isinstance(o.get("spec"), dict) and o["spec"].get("nodeName") == NODE}
            fuzz(under, deliver)
            assert under.objects == BATCHES * BATCH
            took = assert_good_pod_accelerated_within_seconds(under, server.add_pod)
            print(f"API: {under.objects} objects, {under.source.errors} refused by the source, "
                  f"{under.agent.decisions} decisions; good pod accelerated after {took:.2f}s")
        finally:
            under.close()
