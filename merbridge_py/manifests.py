"""`merbridge-py manifests`: the all-in-one Kubernetes YAML, generated.

Every object is built by one function below as a plain dict, in the order
`kubectl apply` needs them. Decisions a platform engineer will ask about are
written next to the object as a YAML comment, so they travel with the file.
The committed manifests/all-in-one.yaml is this module's output with the
defaults; tests/test_manifests.py checks that it is up to date.
"""

from __future__ import annotations

import re

import click
import yaml

from . import __version__, rbac
from .mesh import PROFILES

NAME = "merbridge-py"
DEFAULT_NAMESPACE = "istio-system"
DEFAULT_IMAGE = f"ghcr.io/merbridge-py/{NAME}:{__version__}"   # .github/workflows/release.yml pushes it; `make image`
DEFAULT_MESH = "istio"

# Metrics, /healthz, /readyz. The agent runs on the host network, so this port
# is taken on every node. 16019 is outside Istio's 15000-15099 block (gateways
# on the host network bind 15000/15020/15021/15090 there, and Istio adds new
# ports in that block), outside kubelet/kube-proxy/control plane (10248-10259),
# outside the 9100-9999 block where Prometheus exporters on the host network
# crowd, outside NodePorts (30000-32767), and below the kernel's ephemeral range
# (32768-60999), where an outgoing connection could already hold it.
METRICS_PORT = 16019

CGROUP_MOUNT = "/sys/fs/cgroup"
BPFFS_MOUNT = "/sys/fs/bpf"
BPFFS_DIR = f"{BPFFS_MOUNT}/{NAME}"
HOST_PROC = "/host/proc"
# /status (pod details) and POST /mode: a unix socket in a root-only host
# directory, not the network port (merbridge_py/agent/http.py).
ADMIN_DIR = "/run/merbridge-py"

# What loading, attaching and pod discovery need (the DaemonSet's comment and
# docs/install.md say which does what). Each was removed in turn on a 6.18
# kernel; tests/test_manifests.py runs the agent with exactly this set.
# SYS_ADMIN is needed anyway (setns), and the kernel accepts it wherever it
# asks for CAP_BPF or CAP_PERFMON (bpf_capable(), perfmon_capable()): granting
# those two as well would add nothing (tests/test_container.py removes each
# granted capability in turn and expects the agent to fail). NET_ADMIN is
# needed on every kernel: SYS_ADMIN stands in for it in bpf() from 6.9, but
# not for reading the nf_tables rules Istio installed in each pod's namespace.
CAPABILITIES = ("NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE")

# Measured with benchmarks/agent_footprint.py, 200 pods listed and watched
# through the API server (docs/install.md, "Resources"): the agent 76 MB RSS
# plus 15 MB of BPF maps steady (request); while loading, the loader child
# (bcc and LLVM, 156 MB RSS at its peak, 63 MB of it anonymous) runs next to
# them in the same container (limit).
RESOURCES = {
    "requests": {"cpu": "50m", "memory": "96Mi"},
    "limits": {"memory": "256Mi"},
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# --- objects ------------------------------------------------------------------------

def labels() -> dict:
    return {
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/component": "node-agent",
        "app.kubernetes.io/part-of": NAME,
        "app.kubernetes.io/version": __version__,
    }


def selector_labels() -> dict:
    # a DaemonSet's selector is immutable: never include the version
    return {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "node-agent"}


def metadata(namespace: str | None = None) -> dict:
    meta: dict = {"name": NAME}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = labels()
    return meta


def service_account(namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(namespace)}


def cluster_role() -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": metadata(),
        "rules": rbac.policy_rules(rbac.CLUSTER_PERMISSIONS),
    }


def cluster_role_binding(namespace: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": metadata(),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}],
    }


def role(namespace: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(namespace),
        "rules": rbac.policy_rules(rbac.NAMESPACE_PERMISSIONS, rbac.NAMESPACE_RESOURCE_NAMES),
    }


def role_binding(namespace: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}],
    }


def toggle_config_map(namespace: str) -> dict:
    meta = metadata(namespace)
    meta["name"] = rbac.TOGGLE_CONFIGMAP
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"mode": "ebpf"}}


def host_path_volume(name: str, path: str, kind: str | None = "Directory") -> dict:
    host_path = {"path": path}
    if kind:
        host_path["type"] = kind
    return {"name": name, "hostPath": host_path}


def volumes() -> list[dict]:
    return [
        host_path_volume("cgroup", CGROUP_MOUNT),
        host_path_volume("bpffs", BPFFS_MOUNT),
        host_path_volume("host-proc", "/proc"),
        host_path_volume("admin", ADMIN_DIR, kind="DirectoryOrCreate"),
        # No type check: a node without headers still runs (the image carries
        # fallback headers); the runtime creates an empty directory if missing.
        host_path_volume("lib-modules", "/lib/modules", kind=None),
        host_path_volume("usr-src", "/usr/src", kind=None),
        # The root filesystem is read-only; the header finder (merged header
        # trees of symlinks) and bcc write here.
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]


def mount_bpffs_container(image: str) -> dict:
    """Runs once per pod start: makes sure the host's /sys/fs/bpf is a bpffs, so
    pins outlive the agent's container (a restarted agent adopts them), and
    that the admin socket's directory (created 0755 by the kubelet) is root's alone."""
    script = (f'[ "$(stat -f -c %T {BPFFS_MOUNT})" = bpf_fs ] '
              f"|| mount -t bpf bpf {BPFFS_MOUNT}; chmod 700 {ADMIN_DIR}")
    return {
        "name": "mount-bpffs",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", script],
        # Bidirectional propagation (the mount must reach the host) is only
        # allowed for privileged containers.
        "securityContext": {"privileged": True},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
        "volumeMounts": [{"name": "bpffs", "mountPath": BPFFS_MOUNT, "mountPropagation": "Bidirectional"},
                         {"name": "admin", "mountPath": ADMIN_DIR}],
    }


def field_env(name: str, field_path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def http_probe(path: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": period,
            "timeoutSeconds": 2, "failureThreshold": failures}


def agent_container(image: str, mesh: str) -> dict:
    return {
        "name": "agent",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "run",
            "--cgroup", CGROUP_MOUNT,
            "--bpffs", BPFFS_DIR,
            "--metrics-addr", f"0.0.0.0:{METRICS_PORT}",
            "--admin-socket", f"{ADMIN_DIR}/agent.sock",
            "--mesh", mesh,
        ],
        "env": [
            field_env("NODE_NAME", "spec.nodeName"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            # read on SIGTERM: present = a restart, gone = an uninstall (the
            # downward API cannot name a pod's owner, so the name is written here)
            {"name": "DAEMONSET_NAME", "value": NAME},
            # pod namespaces are found by scanning the host's processes here
            {"name": "MERBRIDGE_PROC_ROOT", "value": HOST_PROC},
        ],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        # Compiling with LLVM takes ~0.5 s on an idle node and much longer on a
        # busy one: the startup probe gives it up to 2 minutes before the
        # liveness probe may restart the agent.
        "startupProbe": http_probe("/healthz", period=2, failures=60),
        "livenessProbe": http_probe("/healthz", period=10, failures=3),
        "readinessProbe": http_probe("/readyz", period=5, failures=2),
        "resources": RESOURCES,
        "securityContext": {
            "privileged": False,
            "runAsUser": 0,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": list(CAPABILITIES)},
            "seccompProfile": {"type": "RuntimeDefault"},
            "appArmorProfile": {"type": "Unconfined"},
        },
        "volumeMounts": [
            {"name": "cgroup", "mountPath": CGROUP_MOUNT, "readOnly": True},
            {"name": "bpffs", "mountPath": BPFFS_MOUNT, "mountPropagation": "HostToContainer"},
            {"name": "host-proc", "mountPath": HOST_PROC, "readOnly": True},
            {"name": "admin", "mountPath": ADMIN_DIR},
            {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True},
            {"name": "usr-src", "mountPath": "/usr/src", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def daemon_set(namespace: str, image: str, mesh: str) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata(namespace),
        "spec": {
            "selector": {"matchLabels": selector_labels()},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels(),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": NAME,
                    "hostNetwork": True,
                    "enableServiceLinks": False,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "initContainers": [mount_bpffs_container(image)],
                    "containers": [agent_container(image, mesh)],
                    "volumes": volumes(),
                },
            },
        },
    }


# --- the comments that travel with each object ---------------------------------------

HEADER = f"""\
# merbridge-py {__version__}: eBPF acceleration of Istio's sidecar data path.
# Generated by `merbridge-py manifests`; do not edit by hand. Regenerate with:
#   merbridge-py manifests > manifests/all-in-one.yaml
# Install: kubectl apply -f manifests/all-in-one.yaml  (docs/install.md)
"""

COMMENTS = {
    "ServiceAccount": "The identity of the node agent.",
    "ClusterRole": """\
Only what the agent calls (merbridge_py/rbac.py; a test compares the two).
pods list/watch: cluster-wide, because the pods of a node are in every
namespace; the agent asks for spec.nodeName=$NODE_NAME only, but RBAC cannot
restrict by field. events create (events.k8s.io): per-pod decisions, written
in the pod's own namespace.""",
    "ClusterRoleBinding": "",
    "Role": """\
The toggle ConfigMap, by name. list/watch are authorized by resourceNames
only for requests with fieldSelector metadata.name=merbridge-py, which is how
the agent asks. The agent's own DaemonSet, by name, get only: read on
SIGTERM to tell a restart (keep the datapath for the successor) from an
uninstall (detach everything).""",
    "RoleBinding": "",
    "ConfigMap": """\
mode: ebpf | iptables, watched by every agent. iptables: the agent detaches
its connect program, so new connections use Istio's own iptables rules again
(what connections opened before need stays attached); ebpf: all attached.
Switch with `merbridge-py toggle iptables|ebpf`. Note: re-applying this file
sets the mode back to ebpf.""",
    "DaemonSet": f"""\
One agent per node (tolerates every taint), on the host network.
Security: the agent container is NOT privileged. It runs as root with all
capabilities dropped except:
  NET_ADMIN     read the Istio rules installed in each pod's namespace
                (nft, iptables-save), which the decision rests on; create
                the sockhash map and load socket program types
  SYS_ADMIN     setns() into pod network namespaces, to read each one's
                cookie and addresses; the kernel also takes it in place of
                BPF and PERFMON (loading programs, creating maps, the
                verifier's per-pod rule lookups), so those are not granted
  SYS_PTRACE    open /proc/PID/ns/net of pod processes owned by other users
Non-root is not possible: Kubernetes grants added capabilities to root only.
AppArmor is unconfined: runtime default profiles allow reading another
process's /proc/PID/ns only under that same profile, which pod processes are
not. seccomp stays RuntimeDefault (it allows bpf() and setns() to holders of
these capabilities). The root filesystem is read-only; /tmp is writable.
Only the mount-bpffs init container is privileged: it mounts bpffs on the
host's /sys/fs/bpf if missing, which needs Bidirectional mount propagation,
and Kubernetes allows that for privileged containers only. It runs for a
moment and exits; the agent sees the mount through HostToContainer.
Host mounts: cgroup v2 (read-only is enough to attach programs), bpffs (pins
survive a restart, so a new agent takes over without a gap), the host's /proc
at {HOST_PROC} instead of hostPID (enough to find pod namespaces; the agent
cannot ptrace or signal host processes), kernel headers read-only for bcc.
Endpoints: port 16019 on the node's network serves only /metrics, /healthz
and /readyz (read-only, no pod details). /status and the mode switch are on
the unix socket /run/merbridge-py/agent.sock (host directory 0700, socket
0600): `kubectl exec ds/merbridge-py -- merbridge-py status|toggle --node`.
SIGTERM: the agent reads this DaemonSet. Present (a rolling update, a
deleted pod): programs stay attached and maps pinned, and the next agent
adopts them. Gone or being deleted (an uninstall): it detaches everything
and removes its pins within a few seconds, inside the 30 s grace period.
API unreachable: it keeps (see docs/install.md; `merbridge-py cleanup`).
Resources: from measurements (docs/install.md): the agent without LLVM plus its
maps (request), and the short-lived loader child with bcc and LLVM on top
(limit). No CPU limit: throttling the compile would only delay readiness.""",
}


# --- rendering -------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Indents block sequences under their key, as kubectl and yamllint expect."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def objects(namespace: str = DEFAULT_NAMESPACE, image: str = DEFAULT_IMAGE,
            mesh: str = DEFAULT_MESH) -> list[dict]:
    """Every object of the install, in apply order."""
    if not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes name (DNS-1123 label)")
    if not image or any(c.isspace() for c in image):
        raise ValueError(f"image {image!r} is not a valid image reference")
    if mesh not in PROFILES:
        raise ValueError(f"unknown mesh {mesh!r}; known meshes: {', '.join(sorted(PROFILES))}")
    return [
        service_account(namespace),
        cluster_role(),
        cluster_role_binding(namespace),
        role(namespace),
        role_binding(namespace),
        toggle_config_map(namespace),
        daemon_set(namespace, image, mesh),
    ]


def _comment(text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines())


def render(namespace: str = DEFAULT_NAMESPACE, image: str = DEFAULT_IMAGE, mesh: str = DEFAULT_MESH) -> str:
    """The all-in-one multi-document YAML."""
    parts = [HEADER]
    for obj in objects(namespace, image, mesh):
        body = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
        parts.append("---\n" + _comment(COMMENTS[obj["kind"]]) + body)
    return "".join(parts)


EXAMPLES = """
\b
examples:
  merbridge-py manifests > manifests/all-in-one.yaml      # regenerate the committed file
  merbridge-py manifests --image registry.example.com/merbridge-py:0.1.0 | kubectl apply -f -
  merbridge-py manifests --namespace mesh-system | kubectl diff -f -
"""


@click.command(epilog=EXAMPLES)
@click.option("--namespace", "-n", default=DEFAULT_NAMESPACE, show_default=True,
              help="Namespace of the agent and its toggle ConfigMap (must exist).")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="Agent image, built from the repository's Dockerfile.")
@click.option("--mesh", type=click.Choice(sorted(PROFILES)), default=DEFAULT_MESH, show_default=True,
              help="Mesh profile the agent runs with.")
def manifests(namespace: str, image: str, mesh: str) -> None:
    """Print the Kubernetes manifests that install the node agent (all-in-one YAML)."""
    try:
        text = render(namespace=namespace, image=image, mesh=mesh)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(text, nl=False)
