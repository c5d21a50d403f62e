"""Kubernetes Pod objects for the test bed's pods, in the API's JSON form: what
the agent reads from a node's pods file, shaped like pods Istio's injector
produced (classic sidecar: `istio-init` init container running istio-iptables
with the flags derived from the annotations, `istio-proxy` container).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from ..mesh import ISTIO
from . import istio_iptables
from .topology import Node, Pod

NAMESPACE = "default"
PROXY_IMAGE = "docker.io/istio/proxyv2:1.26.0"   # what the pod spec names; the bed runs HAProxy in its place
APP_IMAGE = "merbridge-py/testbed-app:latest"
_UID_NAMESPACE = uuid.UUID("6b1f1f3e-9a57-4d7c-9a8e-6d62a7e0c0de")


def _sidecar_status() -> str:
    """The injector's record of what it added (annotation sidecar.istio.io/status)."""
    return json.dumps({"initContainers": ["istio-init"], "containers": [ISTIO.proxy_container],
                       "volumes": ["istio-envoy", "istio-data", "istio-podinfo", "istio-token", "istiod-ca-cert"],
                       "imagePullSecrets": None, "revision": "default"}, separators=(",", ":"))


def pod_object(testbed: str, pod: Pod, node: Node, created: str | None = None) -> dict:
    created = created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    annotations = dict(pod.annotations)
    labels = {"app": pod.name, "merbridge-py/testbed": testbed}
    app = {"name": "app", "image": APP_IMAGE,
           "command": ["python", "-m", "merbridge_py.testbed.app"],
           "args": ["--name", pod.name] + [a for p in pod.ports for a in ("--port", str(p))],
           "ports": [{"containerPort": p, "protocol": "TCP"} for p in pod.ports]}
    containers = [app]
    init_containers = []
    statuses = [{"name": "app", "ready": True, "restartCount": 0, "image": APP_IMAGE,
                 "state": {"running": {"startedAt": created}}}]
    if pod.meshed:
        flags = istio_iptables.flags_from_annotations(pod.annotations)
        annotations.setdefault("sidecar.istio.io/status", _sidecar_status())
        annotations.setdefault("kubectl.kubernetes.io/default-container", "app")
        annotations.setdefault("prometheus.io/port", "15020")
        labels.update({"security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": pod.name})
        init_containers.append({
            "name": "istio-init", "image": PROXY_IMAGE, "args": flags.argv(),
            "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                                "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False}})
        containers.append({
            "name": ISTIO.proxy_container, "image": PROXY_IMAGE,
            "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
            "securityContext": {"runAsUser": ISTIO.proxy_uid, "runAsGroup": ISTIO.proxy_gid, "runAsNonRoot": True}})
        statuses.append({"name": ISTIO.proxy_container, "ready": True, "restartCount": 0, "image": PROXY_IMAGE,
                         "state": {"running": {"startedAt": created}}})
    # The service account is the pod's name: each pod has its own mesh identity (see envoy.service_account).
    spec = {"nodeName": node.name, "serviceAccountName": pod.name, "containers": containers,
            "restartPolicy": "Always"}
    if init_containers:
        spec["initContainers"] = init_containers
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NAMESPACE,
                     "uid": str(uuid.uuid5(_UID_NAMESPACE, f"{testbed}/{pod.name}")),  # stable across runs
                     "resourceVersion": "1", "creationTimestamp": created, "labels": labels,
                     "annotations": annotations},
        "spec": spec,
        "status": {"phase": "Running", "hostIP": node.host_ip, "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
                   "startTime": created, "containerStatuses": statuses,
                   "conditions": [{"type": t, "status": "True"} for t in ("Initialized", "Ready", "ContainersReady",
                                                                            "PodScheduled")]},
    }


def pod_list(objects: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": objects}
