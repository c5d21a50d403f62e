"""Kubernetes Pod objects for the test bed's pods, in the API's JSON form: what
the agent reads from a node's pods file, shaped like pods Istio's injector
produced (classic sidecar: `istio-init` init container running istio-iptables
with the flags derived from the annotations and the mesh-wide defaults, or with
istio-cni `istio-validation` and the effective values written into the
annotations; `istio-proxy` container).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from ..mesh import ISTIO
from . import istio_dns, istio_iptables
from .topology import Node, Pod

NAMESPACE = "default"
PROXY_IMAGE = "docker.io/istio/proxyv2:1.26.0"   # what the pod spec names; the bed runs HAProxy in its place
APP_IMAGE = "merbridge-py/testbed-app:latest"
_UID_NAMESPACE = uuid.UUID("6b1f1f3e-9a57-4d7c-9a8e-6d62a7e0c0de")


def _sidecar_status(init_name: str = "istio-init") -> str:
    """The injector's record of what it added (annotation sidecar.istio.io/status)."""
    return json.dumps({"initContainers": [init_name], "containers": [ISTIO.proxy_container],
                       "volumes": ["istio-envoy", "istio-data", "istio-podinfo", "istio-token", "istiod-ca-cert"],
                       "imagePullSecrets": None, "revision": "default"}, separators=(",", ":"))


def pod_object(testbed: str, pod: Pod, node: Node, created: str | None = None,
               mesh: istio_iptables.MeshDefaults | None = None, cni: bool | None = None) -> dict:
    """`mesh`: the mesh-wide injection values the injector used; `cni`: the
    pod was injected for istio-cni (istio-validation, effective values in the
    annotations) rather than istio-init. Both default to the pod's own
    install options (topology.Pod: mesh_defaults, proxy_uid/gid, cni); a pod
    with rules "nftables" gets istio-init's --native-nftables."""
    mesh = istio_iptables.pod_mesh(pod) if mesh is None else mesh
    cni = getattr(pod, "cni", False) if cni is None else cni
    nftables = getattr(pod, "rules", "iptables") == "nftables"
    created = created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    annotations = istio_iptables.cni_annotations(pod.annotations, mesh) if pod.meshed and cni \
        else dict(pod.annotations)
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
        flags = istio_iptables.flags_from_annotations(pod.annotations, mesh=mesh)
        init_name = "istio-validation" if cni else "istio-init"
        annotations.setdefault("sidecar.istio.io/status", _sidecar_status(init_name))
        annotations.setdefault("kubectl.kubernetes.io/default-container", "app")
        annotations.setdefault("prometheus.io/port", "15020")
        labels.update({"security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": pod.name})
        if cni:
            context = {"capabilities": {"drop": ["ALL"]}, "runAsUser": mesh.proxy_uid,
                       "runAsGroup": mesh.gid, "runAsNonRoot": True}
        else:
            context = {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                       "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False}
        init_containers.append({"name": init_name, "image": PROXY_IMAGE,
                                "args": flags.argv(cni=cni, native_nftables=nftables), "securityContext": context,
                                **proxy_metadata_env(pod)})
        containers.append({
            "name": ISTIO.proxy_container, "image": PROXY_IMAGE,
            "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
            "securityContext": {"runAsUser": mesh.proxy_uid, "runAsGroup": mesh.gid, "runAsNonRoot": True},
            **proxy_metadata_env(pod)})
        statuses.append({"name": ISTIO.proxy_container, "ready": True, "restartCount": 0, "image": PROXY_IMAGE,
                         "state": {"running": {"startedAt": created}}})
    # The service account is the pod's name: each pod has its own mesh identity (see envoy.service_account).
    spec = {"nodeName": node.name, "serviceAccountName": pod.name, "containers": containers,
            "restartPolicy": "Always"}
    if init_containers:
        spec["initContainers"] = init_containers
    if not pod.host_users:
        spec["hostUsers"] = False
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NAMESPACE,
                     "uid": str(uuid.uuid5(_UID_NAMESPACE, f"{testbed}/{pod.name}")),  # stable across runs
                     "resourceVersion": "1", "creationTimestamp": created, "labels": labels,
                     "annotations": annotations},
        "spec": spec,
        "status": {"phase": "Running", "hostIP": node.host_ip, "podIP": pod.ip, "podIPs": [{"ip": ip} for ip in pod.ips],
                   "startTime": created, "containerStatuses": statuses,
                   "conditions": [{"type": t, "status": "True"} for t in ("Initialized", "Ready", "ContainersReady",
                                                                            "PodScheduled")]},
    }


def proxy_metadata_env(pod: Pod) -> dict:
    """The injector copies proxy.istio.io/config's proxyMetadata into the
    env of istio-proxy and istio-init (ISTIO_META_DNS_CAPTURE among them)."""
    env = [{"name": k, "value": v} for k, v in sorted(istio_dns.proxy_metadata(pod.annotations).items())]
    return {"env": env} if env else {}


def pod_list(objects: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": objects}
