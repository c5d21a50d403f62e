"""The agent with the Kubernetes source: Events about pod decisions
(merbridge_py/agent/events.py, unit tests against the fake API server), and
the real agent process on a simulated node driven through the fake API server
(pods added, changed, deleted; the mode ConfigMap; dropped and expired
watches), checked by its /status, its metrics, the Events it created, the path
the test traffic takes, and the exact set of API permissions it used."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import datetime, timezone

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from fake_apiserver import FakeApiServer
from merbridge_py import rbac
from merbridge_py.agent.core import PodStatus
from merbridge_py.agent.events import EventSender, build_event, truncate_utf8

NODE = "node1"                 # SimNode's pod manifests name this node
NAMESPACE = "mbp-system"       # where the agent looks for its ConfigMap
EVENTS = "events.events.k8s.io"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
# RFC 3339 with six fraction digits, in UTC: as the agent writes it ("Z"), or as recent kubernetes
# clients re-serialize it through their models ("+00:00"); the API server accepts both.
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)$")
# The issue asks the datapath to follow a change "within a second". Every probe here is a client
# process started in a pod (a few hundred ms on two noisy cores), so the bound has a margin; it is
# a correctness bound (the change is seen at all, promptly), not a speed measurement.
FOLLOW_DEADLINE = 3.0
CONVERGE_DEADLINE = 15.0


def wait_until(predicate, deadline: float = CONVERGE_DEADLINE, what: str = "condition", interval: float = 0.05):
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        time.sleep(interval)


def pod_object(name: str, uid: str = "uid-1", namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "uid": uid}}


def accelerated(pod: str = "default/web") -> PodStatus:
    return PodStatus(pod, True, "accelerated: istio sidecar (native, istio-init)", "10.0.0.5")


def not_accelerated(reason: str, code: str, pod: str = "default/web") -> PodStatus:
    return PodStatus(pod, False, f"not accelerated: {reason}", "10.0.0.5", code=code)


# --- Events: unit tests ------------------------------------------------------------------

def test_event_has_every_field_the_events_api_requires():
    moment = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=timezone.utc)
    event = build_event(pod_object("web", uid="u-42", namespace="shop"),
                        not_accelerated('traffic.sidecar.istio.io/excludeOutboundPorts: "70000" is not a port',
                                        "malformed_annotation", pod="shop/web"), NODE, moment)
    assert event["apiVersion"] == "events.k8s.io/v1" and event["kind"] == "Event"
    assert event["metadata"]["namespace"] == "shop"
    assert event["metadata"]["name"].startswith("web.")
    assert event["eventTime"] == "2025-03-04T05:06:07.890123Z"
    on_the_second = build_event(pod_object("web"), accelerated(), NODE, moment.replace(microsecond=0))
    assert on_the_second["eventTime"] == "2025-03-04T05:06:07.000001Z", "the fraction must survive isoformat()"
    assert event["regarding"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web", "uid": "u-42"}
    assert (event["reason"], event["type"]) == ("NotAccelerated", "Warning")
    assert event["note"].startswith("not accelerated: traffic.sidecar.istio.io/excludeOutboundPorts")
    assert (event["reportingController"], event["reportingInstance"], event["action"]) == (
        "merbridge.io/merbridge-py", NODE, "Reconcile")
    ok = build_event(pod_object("web"), accelerated(), NODE, moment)
    assert (ok["reason"], ok["type"]) == ("Accelerated", "Normal")
    opted_out = build_event(pod_object("web"), not_accelerated("opted out", "opted_out"), NODE, moment)
    assert (opted_out["reason"], opted_out["type"]) == ("NotAccelerated", "Normal")


def test_note_is_cut_to_the_apis_1kb_limit_on_a_character_boundary():
    reason = "not accelerated: " + "é" * 2000            # 2 bytes each in UTF-8
    event = build_event(pod_object("web"), not_accelerated("é" * 2000, "policy_not_exact"), NODE,
                        datetime.now(timezone.utc))
    note = event["note"].encode()
    assert len(note) <= 1024 and len(note) >= 1023
    assert reason.startswith(event["note"])
    assert truncate_utf8("short", 1024) == "short"
    long_name = build_event(pod_object("p" * 253), accelerated("default/" + "p" * 253), "n" * 300,
                            datetime.now(timezone.utc))
    assert len(long_name["metadata"]["name"]) <= 253 and len(long_name["reportingInstance"]) == 128


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server():
    with FakeApiServer() as s:
        yield s


class RunningSender:
    """An EventSender against the fake API server, its thread stopped on exit."""

    def __init__(self, url: str, **kwargs):
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.sender = EventSender(client.ApiClient(client.Configuration(host=url)), NODE, self.registry,
                                  clock=self.clock, **kwargs)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sender.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> "RunningSender":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def stored_events(server: FakeApiServer) -> list[dict]:
    return sorted(server.objects(EVENTS).values(), key=lambda e: e["eventTime"])


def test_sender_creates_the_event_in_the_pods_namespace(server):
    with RunningSender(server.url) as run:
        run.sender.on_decision_change(pod_object("web", namespace="shop"), accelerated("shop/web"))
        wait_until(lambda: stored_events(server), 5, "the Event")
    (event,) = stored_events(server)
    assert event["metadata"]["namespace"] == "shop"
    assert event["note"] == accelerated().reason
    assert MICRO_TIME.match(event["eventTime"]), event["eventTime"]   # what went over the wire
    assert [(r.path, r.permission()) for r in server.requests] == [
        ("/apis/events.k8s.io/v1/namespaces/shop/events", ("events.k8s.io", "events", "create"))]
    assert run.registry.get_sample_value("merbridge_events_created_total") == 1


def test_one_event_per_pod_and_reason_in_the_repeat_interval(server):
    with RunningSender(server.url, repeat_interval=30) as run:
        report = run.sender.on_decision_change
        bad = not_accelerated("policy cannot be honoured exactly: x", "policy_not_exact")
        report(pod_object("web"), accelerated())
        report(pod_object("web"), accelerated())                   # same reason again: suppressed
        report(pod_object("web"), bad)                             # a new reason: reported
        report(pod_object("web"), accelerated())                   # back within 30 s: suppressed
        report(pod_object("web", uid="uid-2"), accelerated())      # re-created under the same name: a new pod
        run.clock.now += 31
        report(pod_object("web"), accelerated())                   # the interval has passed
        wait_until(lambda: len(stored_events(server)) >= 4, 5, "four Events")
        time.sleep(0.3)                                            # nothing more must arrive
    assert [(e["reason"], e["regarding"]["uid"]) for e in stored_events(server)] == [
        ("Accelerated", "uid-1"), ("NotAccelerated", "uid-1"), ("Accelerated", "uid-2"), ("Accelerated", "uid-1")]


def test_passing_and_out_of_mesh_decisions_make_no_event(server):
    with RunningSender(server.url) as run:
        for reason, code in [("no istio-proxy sidecar", "no_sidecar"), ("no pod IP yet", "no_ip"),
                             ("pod is being deleted", "deleting"), ("pod phase is Succeeded", "finished")]:
            run.sender.on_decision_change(pod_object("web"), not_accelerated(reason, code))
        pending = PodStatus("default/web", False, "not accelerated yet: no network namespace has IP 10.0.0.5",
                            "10.0.0.5", pending=True, code="netns_not_found")
        run.sender.on_decision_change(pod_object("web"), pending)
        run.sender.on_decision_change(pod_object("marker"), accelerated("default/marker"))
        wait_until(lambda: stored_events(server), 5, "the marker Event")   # everything before it was handled
    assert [e["regarding"]["name"] for e in stored_events(server)] == ["marker"]


def test_a_full_queue_drops_and_counts_without_blocking(server):
    registry = CollectorRegistry()
    sender = EventSender(client.ApiClient(client.Configuration(host=server.url)), NODE, registry, queue_size=2)
    started = time.monotonic()
    for i in range(5):                                  # no sender thread: nothing drains the queue
        sender.on_decision_change(pod_object(f"web-{i}", uid=f"u{i}"), accelerated(f"default/web-{i}"))
    assert time.monotonic() - started < 1.0, "on_decision_change must not wait for room"
    assert registry.get_sample_value("merbridge_events_dropped_total") == 3
    # A dropped Event is not remembered as sent: the same decision is reported once there is room.
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(stored_events(server)) == 2, 5, "the queued Events")
        sender.on_decision_change(pod_object("web-4", uid="u4"), accelerated("default/web-4"))
        wait_until(lambda: len(stored_events(server)) == 3, 5, "the Event dropped before")
    finally:
        stop.set()
        thread.join(5)


def test_api_errors_are_logged_once_per_kind_counted_and_never_raised(server, caplog):
    caplog.set_level(logging.INFO, logger="merbridge_py.events")
    registry = CollectorRegistry()
    moment = datetime.now(timezone.utc)
    events = (build_event(pod_object(f"w{i}"), accelerated(f"default/w{i}"), NODE, moment) for i in range(100))

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    # A wrong path prefix: the fake API server answers 404 to every request.
    wrong_path = EventSender(client.ApiClient(client.Configuration(host=server.url + "/nowhere")), NODE)
    assert [wrong_path.send(next(events)) for _ in range(3)] == [False] * 3
    assert len(warnings()) == 1 and "HTTP 404" in warnings()[0]
    # An API server that is away, then back, then away again.
    flaky = FakeApiServer().start()
    flaky.stop()                                        # nothing listens on its port now
    sender = EventSender(client.ApiClient(client.Configuration(host=flaky.url)), NODE, registry)
    assert [sender.send(next(events)) for _ in range(3)] == [False] * 3
    assert len(warnings()) == 2 and "refused" in warnings()[1]
    assert registry.get_sample_value("merbridge_events_failed_total") == 3
    flaky.start()
    try:
        assert sender.send(next(events)) is True
        assert [r.getMessage() for r in caplog.records].count("creating Kubernetes Events works again") == 1
    finally:
        flaky.stop()
    assert sender.send(next(events)) is False
    assert len(warnings()) == 3, "after a recovery, a failure is worth a log line again"
    assert registry.get_sample_value("merbridge_events_created_total") == 1


def events_api(server: FakeApiServer) -> client.EventsV1Api:
    return client.EventsV1Api(client.ApiClient(client.Configuration(host=server.url)))


def test_fake_server_create_conflict_and_bad_requests(server):
    api = events_api(server)
    event = build_event(pod_object("web"), accelerated(), NODE, datetime.now(timezone.utc))
    api.create_namespaced_event("default", event)
    with pytest.raises(client.ApiException) as conflict:
        api.create_namespaced_event("default", event)
    assert conflict.value.status == 409
    with pytest.raises(client.ApiException) as wrong_namespace:
        api.create_namespaced_event("other", event)
    assert wrong_namespace.value.status == 400
    assert [r.permission() for r in server.requests] == [("events.k8s.io", "events", "create")] * 3


# --- the agent process on a simulated node, through the fake API server ------------------

def kubeconfig_text(url: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "agent", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
    })


def config_map(mode: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": rbac.TOGGLE_CONFIGMAP, "namespace": NAMESPACE}, "data": {"mode": mode}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A simulated node whose agent watches the fake API server. Pods a and b
    are meshed (apps and test sidecars running) and are added through the
    API after the agent is ready; pod "bad" (meshed, no namespace) is for a
    test to add. Tests restore any state they change."""
    from helpers.node import SimNode

    class KubeSimNode(SimNode):
        def __init__(self, tmp, server: FakeApiServer):
            super().__init__(tmp)
            self.server = server
            self.kubeconfig = tmp / "kubeconfig"
            self.kubeconfig.write_text(kubeconfig_text(server.url))
            self.agent_output: list[str] = []
            self._drain: threading.Thread | None = None

        def agent_argv(self, *extra: str) -> list[str]:
            argv = super().agent_argv(*extra)
            i = argv.index("--pods-file")
            argv[i:i + 2] = ["--kubeconfig", str(self.kubeconfig), "--namespace", NAMESPACE]
            return argv

        def start_agent(self, *extra: str, timeout: float = 30) -> None:
            super().start_agent(*extra, timeout=timeout)
            # Read the agent's log as it comes, so a chatty agent never blocks on a full pipe.
            out = self.agent.stdout
            self._drain = threading.Thread(target=lambda: self.agent_output.extend(out), daemon=True)
            self._drain.start()

        def stop_agent(self, timeout: float = 10) -> tuple[int, str]:
            self.agent.terminate()
            rc = self.agent.wait(timeout)
            self._drain.join(5)
            self.agent = None
            return rc, "".join(self.agent_output)

    server = FakeApiServer().start()
    node = None
    try:
        node = KubeSimNode(tmp_path_factory.mktemp("kube"), server)
        a, b = node.add_pod("a", meshed=True), node.add_pod("b", meshed=True)
        node.add_pod("bad", meshed=True, in_namespace=False)
        for pod in (a, b):
            node.start_app(pod)
            node.start_sidecar(pod)
        server.add("configmaps", config_map("ebpf"))
        server.add("daemonsets.apps", {"apiVersion": "apps/v1", "kind": "DaemonSet",
                                       "metadata": {"name": rbac.AGENT_DAEMONSET, "namespace": NAMESPACE}})
        node.start_agent()
        server.add_pod(a.manifest(NODE))
        server.add_pod(b.manifest(NODE))
        yield node
    finally:
        if node is not None:
            node.close()
        server.stop()


def agent_status(node) -> dict:
    return json.loads(node.agent_get("/status"))


def pod_status(node) -> dict[str, dict]:
    return {p["pod"]: p for p in agent_status(node)["pods"]}


def is_accelerated(node, *names: str) -> bool:
    pods = pod_status(node)
    return all(pods.get(f"default/{n}", {}).get("accelerated") for n in names)


def peer_seen(node, src: str, dst: str, port: int = 8080) -> str:
    """The peer address b's app saw for a request from pod `src`."""
    r = node.client(node.pods[src], "ask", node.pods[dst].ip, port)
    assert r.returncode == 0, r.stderr
    name, peer = r.stdout.split("\n")[0].split()
    assert name == dst
    return peer


def through_sidecars(node, src: str = "a", dst: str = "b") -> bool:
    return peer_seen(node, src, dst).startswith("127.0.0.6:")


def direct(node, src: str = "a", dst: str = "b") -> bool:
    return peer_seen(node, src, dst).startswith(node.pods[src].ip + ":")


def metric(node, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, node.agent_get("/metrics"), re.M)
    assert match, f"no {name}{{{labels}}} in /metrics"
    return float(match.group(1))


def manifest(node, name: str, **annotations: str) -> dict:
    pod = node.pods[name].manifest(NODE)
    pod["metadata"]["annotations"] = annotations
    return pod


def events_about(node, name: str) -> list[dict]:
    return [e for e in sorted(node.server.objects(EVENTS).values(), key=lambda e: e["eventTime"])
            if e["regarding"]["name"] == name]


def uid(node, name: str) -> str:
    return node.server.objects("pods")[f"default/{name}"]["metadata"]["uid"]


@pytest.mark.bpf
def test_pod_added_through_the_api_is_accelerated_and_its_traffic_counted(cluster):
    wait_until(lambda: is_accelerated(cluster, "a", "b"), what="pods a and b accelerated")
    status = pod_status(cluster)["default/a"]
    assert status["ip"] == cluster.pods["a"].ip and status["reason"].startswith("accelerated: istio sidecar")
    redirects = metric(cluster, "merbridge_redirects_total", 'direction="outbound"')
    spliced = metric(cluster, "merbridge_spliced_messages_total")
    r = cluster.client(cluster.pods["a"], "ask", cluster.pods["b"].ip, 8080, 20)
    answers = r.stdout.splitlines()
    assert len(answers) == 20 and all(line.split()[1].startswith("127.0.0.6:") for line in answers), r.stdout
    a, b = cluster.pods["a"], cluster.pods["b"]
    assert any(rec.startswith(f"15001 {b.ip}:8080 {a.ip}:") for rec in cluster.sidecar_records(a))
    assert any(rec.startswith(f"15006 {b.ip}:8080 {a.ip}:") for rec in cluster.sidecar_records(b))
    assert metric(cluster, "merbridge_redirects_total", 'direction="outbound"') >= redirects + 1
    # 20 requests, each crossing two spliced legs on its way to b and two on its way back
    assert metric(cluster, "merbridge_spliced_messages_total") >= spliced + 20


@pytest.mark.bpf
def test_accelerated_pod_gets_a_normal_event(cluster):
    wait_until(lambda: is_accelerated(cluster, "a"), what="pod a accelerated")
    event = wait_until(lambda: [e for e in events_about(cluster, "a") if e["regarding"]["uid"] == uid(cluster, "a")],
                       5, "an Event about pod a")[-1]
    assert (event["reason"], event["type"], event["note"]) == (
        "Accelerated", "Normal", pod_status(cluster)["default/a"]["reason"])
    assert event["metadata"]["namespace"] == "default"
    assert (event["reportingController"], event["reportingInstance"], event["action"]) == (
        "merbridge.io/merbridge-py", NODE, "Reconcile")
    assert MICRO_TIME.match(event["eventTime"]), event["eventTime"]
    assert metric(cluster, "merbridge_events_created_total") >= 1


@pytest.mark.bpf
def test_malformed_annotation_gets_a_warning_event_with_the_reason(cluster):
    bad = cluster.pods["bad"]
    cluster.server.add_pod(manifest(cluster, "bad", **{EXCLUDE_OUTBOUND_PORTS: "70000"}))
    try:
        status = wait_until(lambda: pod_status(cluster).get("default/bad"), what="pod bad in the status")
        assert status["accelerated"] is False and EXCLUDE_OUTBOUND_PORTS in status["reason"], status
        assert "70000" in status["reason"] and status["ip"] == bad.ip
        (event,) = wait_until(lambda: events_about(cluster, "bad"), 5, "an Event about pod bad")
        assert (event["reason"], event["type"], event["note"]) == ("NotAccelerated", "Warning", status["reason"])
    finally:
        cluster.server.delete_pod("default", "bad")
    wait_until(lambda: "default/bad" not in pod_status(cluster), what="pod bad gone from the status")


@pytest.mark.bpf
def test_annotation_change_takes_effect(cluster):
    wait_until(lambda: through_sidecars(cluster), what="a -> b through the sidecars")
    cluster.server.update_pod(manifest(cluster, "a", **{EXCLUDE_OUTBOUND_PORTS: "8080"}))
    try:
        wait_until(lambda: direct(cluster), FOLLOW_DEADLINE, "port 8080 excluded: a -> b direct", interval=0)
        assert pod_status(cluster)["default/a"]["accelerated"], "still accelerated, with a narrower policy"
    finally:
        cluster.server.update_pod(manifest(cluster, "a"))
    wait_until(lambda: through_sidecars(cluster), FOLLOW_DEADLINE, "a -> b through the sidecars again", interval=0)


@pytest.mark.bpf
def test_deleted_pod_is_no_longer_accelerated(cluster):
    wait_until(lambda: through_sidecars(cluster), what="a -> b through the sidecars")
    cluster.server.delete_pod("default", "a")
    try:
        wait_until(lambda: "default/a" not in pod_status(cluster), FOLLOW_DEADLINE, "pod a gone from the status")
        assert direct(cluster), "a's traffic must go direct once a is deleted"
        assert is_accelerated(cluster, "b")
    finally:
        cluster.server.add_pod(manifest(cluster, "a"))   # a new pod under the same name: a new uid
    wait_until(lambda: through_sidecars(cluster), FOLLOW_DEADLINE, "the re-created a through the sidecars",
               interval=0)
    # The re-created pod is a new pod: it gets its own Event despite the per-pod repeat interval.
    wait_until(lambda: [e for e in events_about(cluster, "a") if e["regarding"]["uid"] == uid(cluster, "a")],
               5, "an Event about the re-created pod a")


@pytest.mark.bpf
def test_config_map_switches_the_mode_and_back(cluster):
    wait_until(lambda: through_sidecars(cluster), what="a -> b through the sidecars")
    cluster.server.update("configmaps", config_map("iptables"))
    try:
        wait_until(lambda: agent_status(cluster)["mode"] == "iptables", FOLLOW_DEADLINE, "iptables mode")
        # No iptables rules on this node: in iptables mode the path is the direct one.
        assert direct(cluster)
        assert metric(cluster, "merbridge_mode", 'mode="iptables"') == 1
    finally:
        cluster.server.update("configmaps", config_map("ebpf"))
    wait_until(lambda: agent_status(cluster)["mode"] == "ebpf", FOLLOW_DEADLINE, "ebpf mode")
    assert through_sidecars(cluster)


@pytest.mark.bpf
def test_converges_after_dropped_watches_and_expired_versions(cluster):
    server = cluster.server
    wait_until(lambda: through_sidecars(cluster), what="a -> b through the sidecars")
    restarts = metric(cluster, "merbridge_watch_restarts_total")
    # 1. Watches cut mid-stream, and a change made while the agent reconnects.
    wait_until(lambda: server.watch_count() == 2, what="the pod and ConfigMap watches")
    server.drop_connections()
    server.update_pod(manifest(cluster, "a", **{EXCLUDE_OUTBOUND_PORTS: "8080"}))
    wait_until(lambda: direct(cluster), what="the change made while reconnecting", interval=0)
    wait_until(lambda: metric(cluster, "merbridge_watch_restarts_total") >= restarts + 2, what="restart counted")
    # 2. The API server goes away, things change, and the agent's resourceVersion expires (410):
    #    it must relist and see the state it missed.
    wait_until(lambda: server.watch_count() == 2, what="the watches back")
    requests_before = len(server.requests)
    server.stop()
    server.update_pod(manifest(cluster, "a"))
    server.expire(server.resource_version)
    server.start()
    wait_until(lambda: through_sidecars(cluster), what="the change made while the API server was away",
               interval=0)
    relists = [r for r in server.requests[requests_before:]
               if r.path == "/api/v1/pods" and r.permission()[2] == "list"]
    assert relists, "an expired resourceVersion must be followed by a relist"
    assert is_accelerated(cluster, "a", "b")


@pytest.mark.bpf
def test_agent_uses_exactly_the_rbac_permissions(cluster):
    """Every request the agent made in this module (pods added, changed and
    deleted, the ConfigMap switched, Events created, watches restarted and
    relisted), as the API server's authorizer sees it, equals rbac.py."""
    server = cluster.server
    cluster.server.update("configmaps", {**config_map("ebpf"), "data": {"mode": "ebpf", "note": "touched"}})
    wait_until(lambda: is_accelerated(cluster, "a", "b"), what="pods a and b accelerated")
    used = {r.permission() for r in server.requests}
    assert used == rbac.AGENT_PERMISSIONS, (
        f"used but not granted: {used - rbac.AGENT_PERMISSIONS}; granted but unused: {rbac.AGENT_PERMISSIONS - used}")
    # The ConfigMap grant is by name: list and watch are only authorized with this field selector.
    for r in server.requests:
        if r.permission()[1] == "configmaps":
            assert r.path == f"/api/v1/namespaces/{NAMESPACE}/configmaps"
            assert r.query["fieldSelector"] == f"metadata.name={rbac.TOGGLE_CONFIGMAP}"
        if r.permission()[1] == "daemonsets":   # granted by resourceNames: this one object only
            assert r.path == f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{rbac.AGENT_DAEMONSET}"


@pytest.mark.bpf
def test_agent_stops_cleanly_with_the_kubernetes_source(cluster):
    """An uninstall: the DaemonSet is deleted, then the agent gets SIGTERM."""
    cluster.server.delete("daemonsets.apps", NAMESPACE, rbac.AGENT_DAEMONSET)
    rc, out = cluster.stop_agent()
    assert rc == 0, out
    assert "Traceback" not in out, out
    assert "nothing left attached or pinned" in out
