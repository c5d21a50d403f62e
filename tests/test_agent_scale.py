"""Issue 13's scale acceptance: 200 meshed pods on one node, then a minute of
churn (20 pods created and 20 deleted per second) while steady load runs
between stable pods; no request may fail, and afterwards the agent's /status
must equal what the kernel maps hold (read with bpftool, not through the
agent) with every pod in the pods file accelerated.

Bed: one node, stable pods a, b, c, d with Envoy sidecars. Load for the
whole churn: a -> b, a -> c and d -> b, each with keep-alive connections
(d's replaced every ROTATE seconds) and a new connection per request. The
extra pods are namespaces with an IP and a pod object, no sidecar
(merbridge_py/testbed/extra_pods.py): the agent needs only those. Churn
rewrites the node's pods file atomically each step, as a kubelet-fed source
would change it: a new pod's namespace exists before its object appears; a
deleted pod's namespace goes before its object does.

During the churn the agent may be behind the file by a few steps, and a
pod whose namespace it scanned before the address was on it stays pending
("no network namespace has IP ...") until its retry; no pod may be refused
for good. Reported (-s), not asserted: the churn rate achieved, how far the
agent was behind, its CPU seconds over the churn minute and over an idle
minute with 200 pods (issue 11: no per-pod work when nothing changed), and
its RSS before the churn and after the idle minute.
"""

from __future__ import annotations

import collections
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from helpers.kernel_check import status_matches_kernel

from merbridge_py.agent.status import agent_request
from merbridge_py.testbed import PodSpec, Testbed, kube, topology
from merbridge_py.testbed.extra_pods import add_pod_namespaces, pod_objects, remove_all, remove_pod_namespaces
from merbridge_py.testbed.load import LoadProcess

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

EXTRA = 200            # extra meshed pods, kept at this count through the churn
RATE = 20              # pods created, and as many deleted, per second
CHURN_SECONDS = 60.0
STEP = 0.25            # seconds between churn steps: RATE * STEP pods each way per step
IDLE_SECONDS = 60.0
SETTLE_TIMEOUT = 60.0  # for the agent to catch up after the churn
ROTATE = 10.0
AHEAD = 2              # churn steps whose namespaces are being made


def write_pods_file(path, serialized: dict[str, str]) -> None:
    """A PodList of objects serialized once each, written atomically:
    serializing all ~200 objects on every step cost more than the churn."""
    envelope = json.dumps(kube.pod_list(["ITEMS"]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(envelope.replace('["ITEMS"]', "[" + ",".join(serialized.values()) + "]"))
    os.replace(tmp, path)


def serialize(objects: list[dict]) -> dict[str, str]:
    return {o["metadata"]["name"]: json.dumps(o) for o in objects}


def agent_process(tb: Testbed) -> psutil.Process:
    (record,) = [r for r in tb.processes if r.role == "agent"]
    return psutil.Process(record.pid)


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def not_settled(tb: Testbed, expected: set[str]) -> list[str]:
    """What keeps the agent from the settled state: every pod in `expected`
    accelerated, no other pod known, and /status equal to the kernel maps."""
    status = agent_request(tb.admin_socket("node0"), "/status")
    by_pod = {p["pod"]: p for p in status["pods"]}
    problems = [f"{name}: {by_pod[name]['reason'] if name in by_pod else 'not in /status'}"
                for name in sorted(expected) if not by_pod.get(name, {}).get("accelerated")]
    problems += [f"{name}: in /status but not in the pods file" for name in sorted(set(by_pod) - expected)]
    matches, detail = status_matches_kernel(status, tb.node("node0").bpffs)
    if not matches:
        problems.append(f"/status differs from the kernel maps: {detail}")
    return problems


def wait_settled(tb: Testbed, expected: set[str], timeout: float) -> float:
    """Seconds until settled (see not_settled)."""
    start = time.monotonic()
    while problems := not_settled(tb, expected):
        if time.monotonic() - start > timeout:
            pytest.fail(f"not settled {timeout:.0f} s after the last change ({len(problems)} problems): "
                        + "; ".join(problems[:10]))
        time.sleep(0.2)
    return time.monotonic() - start


class Lag:
    """The agent behind the pods file, sampled from /status during the churn:
    pods in the file it does not report accelerated yet, pods it still
    reports after their deletion, and any refusal that is not pending (a pod
    given up on: none of these pods should be)."""

    def __init__(self):
        self.behind, self.stale, self.refused = 0, 0, []

    def sample(self, tb: Testbed, objects: dict[str, str]) -> None:
        status = {p["pod"]: p for p in agent_request(tb.admin_socket("node0"), "/status")["pods"]}
        wanted = {f"{kube.NAMESPACE}/{name}" for name in objects}
        self.behind = max(self.behind, sum(1 for n in wanted if not status.get(n, {}).get("accelerated")))
        self.stale = max(self.stale, len(set(status) - wanted))
        self.refused += [f"{n}: {status[n]['reason']}" for n in wanted & set(status)
                         if not status[n]["accelerated"] and not status[n]["pending"]]


def churn(tb: Testbed, pods_file, objects: dict[str, str], live: list, lag: Lag) -> tuple[int, float]:
    """RATE pods created and RATE deleted per second (the oldest first) for
    CHURN_SECONDS, in steps of STEP seconds, each ending in one rewrite of
    the pods file; `lag` sampled once a second; (pods created, seconds it
    took). A step's namespaces are made AHEAD steps early in worker threads
    (a runtime, too, makes a pod's sandbox before its IP shows in the API):
    made in line, they alone took longer than a step on a busy machine."""
    per_step = int(RATE * STEP)
    next_index = EXTRA
    prepared = collections.deque()
    created = steps = 0
    with ThreadPoolExecutor(max_workers=AHEAD) as workers:
        def prepare():
            nonlocal next_index
            prepared.append(workers.submit(add_pod_namespaces, tb, per_step, next_index))
            next_index += per_step
        for _ in range(AHEAD):
            prepare()
        start = time.monotonic()
        while time.monotonic() - start < CHURN_SECONDS:
            new = prepared.popleft().result()
            prepare()
            old, live[:] = live[:per_step], live[per_step:] + new
            remove_pod_namespaces(old)
            for p in old:
                del objects[p.name]
            objects.update(serialize(pod_objects(tb, new)))
            write_pods_file(pods_file, objects)
            created += len(new)
            steps += 1
            if steps % round(1 / STEP) == 0:
                lag.sample(tb, objects)
            time.sleep(max(0.0, start + steps * STEP - time.monotonic()))
        seconds = time.monotonic() - start
        remove_pod_namespaces([p for f in prepared for p in f.result()])   # made ahead, never in the file
    return created, seconds


def test_200_pods_and_a_minute_of_churn_lose_no_request_and_status_equals_kernel():
    name = f"scl{os.getpid()}"
    started = time.monotonic()
    specs = [PodSpec(p) for p in ("a", "b", "c", "d")]
    with Testbed.up(name, nodes=1, pods=specs, mode="ebpf") as tb:
        pods_file = tb.pods_file("node0")
        objects = serialize(json.loads(pods_file.read_text())["items"])   # the stable pods, then the extra ones
        try:
            agent = agent_process(tb)
            live = add_pod_namespaces(tb, EXTRA)   # extra pods in the file, oldest first
            objects.update(serialize(pod_objects(tb, live)))
            write_pods_file(pods_file, objects)

            def names() -> set[str]:
                return {f"{kube.NAMESPACE}/{name}" for name in objects}
            first = wait_settled(tb, names(), SETTLE_TIMEOUT)
            rss_before_mb = agent.memory_info().rss / 2**20
            print(f"\n{EXTRA} extra pods accelerated {first:.1f} s after they appeared in the pods file")

            b, c = (f"{tb.pod(p).ip}:{topology.APP_PORT}" for p in ("b", "c"))
            budget = CHURN_SECONDS * 3 + SETTLE_TIMEOUT   # stopped early, once the agent has settled
            loads = [LoadProcess(tb, "a", {"b": b, "c": c}, duration=budget, keepalive=2, newconn=1),
                     LoadProcess(tb, "d", {"b": b}, duration=budget, keepalive=2, newconn=1, rotate=ROTATE)]
            try:
                for load in loads:
                    load.wait_ready()
                redirects = tb.agent_metrics("node0")['merbridge_redirects_total{direction="outbound"}']
                cpu_before = cpu_seconds(agent)
                lag = Lag()
                created, churn_seconds = churn(tb, pods_file, objects, live, lag)
                churn_cpu = cpu_seconds(agent) - cpu_before
                settle = wait_settled(tb, names(), SETTLE_TIMEOUT)
                redirected = tb.agent_metrics("node0")['merbridge_redirects_total{direction="outbound"}'] - redirects
            finally:
                for load in loads:
                    load.stop()
            results = [load.result() for load in loads]

            cpu_before = cpu_seconds(agent)
            time.sleep(IDLE_SECONDS)
            idle_cpu = cpu_seconds(agent) - cpu_before
            rss_mb = agent.memory_info().rss / 2**20
            idle_problems = not_settled(tb, names())
        finally:
            remove_all(tb)
        leftover_extra = [ns for ns in topology.owned_netns(name) if ns.startswith(f"{topology.prefix(name)}x")]
    leftover = topology.owned_netns(name)

    requests = sum(r["requests"] for r in results)
    failed = sum(r["failed"] for r in results)
    broken = [c for r in results for c in r["keepalive_connections"] if c["broken"]]
    print(f"churn: {created} pods created and {created} deleted in {churn_seconds:.1f} s "
          f"({created / churn_seconds:.1f}/s each way, target {RATE}/s), {len(live)} extra pods at the end; "
          f"agent settled {settle:.1f} s after the last change; during the churn, at most {lag.behind} pods of the "
          f"file not accelerated yet and {lag.stale} deleted pods still in /status (sampled once a second)\n"
          f"load: {requests} requests ({sum(r['connections'] for r in results)} connections), {failed} failed, "
          f"{len(broken)} keep-alive connections broken; {redirected:.0f} connections redirected by eBPF meanwhile\n"
          f"agent CPU: {churn_cpu:.2f} s over the churn ({churn_seconds:.0f} s), {idle_cpu:.2f} s over "
          f"{IDLE_SECONDS:.0f} s idle with {len(live)} extra pods; RSS {rss_before_mb:.1f} MB before the churn, "
          f"{rss_mb:.1f} MB after the idle minute\n"
          f"run time {time.monotonic() - started:.0f} s")

    assert failed == 0, [f for r in results for f in r["failures"]][:20]
    assert broken == []
    assert lag.refused == [], lag.refused[:10]
    assert redirected > 0, "the stable pods' load did not go through eBPF during the churn"
    assert idle_problems == [], idle_problems
    assert leftover_extra == [], "extra pod namespaces survived the test's own clean-up"
    assert leftover == [], "the bed's teardown left namespaces"
