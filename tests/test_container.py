"""The DaemonSet's container, run for real: the image `make image` builds, run
by podman with runc exactly as the committed manifest describes it, against a
node of the test bed.

What is read from manifests/all-in-one.yaml (never restated here): the image,
the init container's command and privilege, the agent's command and args,
env, hostNetwork, runAsUser, privileged, the capability list (everything else
dropped), readOnlyRootFilesystem, the seccomp and AppArmor profiles, the
memory limit, every volume and mount with its readOnly flag and propagation,
and the termination grace period.

What is translated, and only this (`NodeMapping`):
- hostPath volumes onto the bed's node: /sys/fs/cgroup -> the node's cgroup
  (the cgroup v2 tree of that simulated node), /sys/fs/bpf -> a directory on
  the host's bpffs owned by the node; /proc, /lib/modules and /usr/src are the
  host's own (the bed's pods are host processes); any other hostPath is
  node-local state and gets a fresh directory of the node. emptyDir -> a
  fresh directory.
- hostNetwork -> the node's network namespace (a bed node's "host network";
  the root namespace of this machine is not a node and stays untouched).
- the pod source: there is no API server, so `--pods-file` with the node's
  pods file (mounted read-only) is appended to the manifest's args, and the
  downward-API env (spec.nodeName, metadata.namespace) gets the node's name and
  the DaemonSet's namespace, as the kubelet would fill them in.
- seccompProfile RuntimeDefault: the manifest relies on containerd's default
  profile, which allows bpf(), perf_event_open(), setns() and mount() to
  holders of CAP_BPF / CAP_PERFMON / CAP_SYS_ADMIN. Podman's default profile is
  another list (Debian's podman 4.3 refuses bpf() to CAP_BPF holders), so the
  test loads containerd's profile, computed for the container's capabilities
  as containerd computes it (tests/helpers/runtime_default_seccomp.py).

Endpoints are read generically: /readyz and /metrics on the manifest's
network port (`--metrics-addr`), inside the node's network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from merbridge_py import manifests
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import Node

from helpers import runtime_default_seccomp

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "manifests" / "all-in-one.yaml"
BUILD = REPO / "scripts" / "build-image.sh"
# runc: crun refuses hybrid cgroup hosts. Explicit ulimits: podman's defaults
# exceed the hard limits of some hosts (20000 open files here).
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
POD_SOURCE_PATH = "/etc/merbridge-test/pods.json"
AGENT_READY_TIMEOUT = 120.0   # bcc compiles at start: seconds, more on 2 busy cores
# hostPaths a test-bed node shares with the machine (the host's processes and headers)
SHARED_HOST_PATHS = ("/proc", "/lib/modules", "/usr/src")
UNACCELERATED_SETTLE = 15.0   # ready but pods not accelerated this long: discovery failed for good


# --- the manifest ------------------------------------------------------------------

def daemon_set() -> dict:
    (ds,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "DaemonSet"]
    return ds


def pod_spec() -> dict:
    return daemon_set()["spec"]["template"]["spec"]


def agent_container() -> dict:
    (agent,) = [c for c in pod_spec()["containers"] if c["name"] == "agent"]
    return agent


def metrics_port() -> int:
    args = agent_container()["args"]
    return int(args[args.index("--metrics-addr") + 1].rsplit(":", 1)[1])


# --- the translation onto a test-bed node ---------------------------------------------

@dataclass
class NodeMapping:
    """Where the manifest's node-level things are on a test-bed node."""
    node: Node
    pods_file: Path
    scratch: Path                       # emptyDirs are made here
    namespace: str
    host_paths: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, tb: Testbed, node: Node, scratch: Path) -> "NodeMapping":
        bpffs = Path(node.bpffs)
        bpffs.mkdir(exist_ok=True)   # on the host's bpffs; the bed removes it when it goes down
        return cls(node, tb.pods_file(node), scratch, daemon_set()["metadata"]["namespace"],
                   host_paths={"/sys/fs/cgroup": node.cgroup, "/sys/fs/bpf": str(bpffs)})

    def host_path(self, path: str) -> str:
        """The mapped directory; the host's own for the kernel's views every node
        shares (/proc, headers); any other hostPath is node-local state, kept in
        a directory of this node's own."""
        if path in self.host_paths:
            return self.host_paths[path]
        if path in SHARED_HOST_PATHS:
            return path
        local = self.scratch / "host" / path.strip("/")
        local.mkdir(parents=True, exist_ok=True)
        return str(local)

    def field_value(self, field_path: str) -> str:
        return {"spec.nodeName": self.node.name, "metadata.namespace": self.namespace}[field_path]

    def network(self) -> list[str]:
        assert pod_spec().get("hostNetwork") is True, "the test maps the host network only"
        return ["--network", f"ns:/run/netns/{self.node.netns}"]


_PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(q[: -len(suffix)]) * factor
    return int(q)


def run_args(container: dict, mapping: NodeMapping, name: str, seccomp_file: Path,
             drop: tuple[str, ...] = (), seccomp_without: tuple[str, ...] = ()) -> list[str]:
    """`podman run` arguments for one container of the DaemonSet's pod, from
    the manifest; `drop`: capabilities to withhold from those it grants;
    `seccomp_without`: capabilities the seccomp profile is computed without
    (while the container still holds them)."""
    spec = pod_spec()
    context = container.get("securityContext", {})
    argv = ["run", "--name", name, "--pull=never", *ULIMITS, *mapping.network(),
            "--label", "merbridge-py-test=container"]
    if context.get("privileged"):
        argv.append("--privileged")
    else:
        caps = context.get("capabilities", {})
        for cap in caps.get("drop", []):
            argv += ["--cap-drop", cap]
        granted = [c for c in caps.get("add", []) if c not in drop]
        for cap in granted:
            argv += ["--cap-add", cap]
        profile = context.get("seccompProfile", {}).get("type")
        assert profile == "RuntimeDefault", f"the test knows RuntimeDefault only, not {profile}"
        profile_caps = [c for c in granted if c not in seccomp_without]
        seccomp_file.write_text(json.dumps(runtime_default_seccomp.profile(profile_caps)))
        argv += ["--security-opt", f"seccomp={seccomp_file}"]
        if context.get("appArmorProfile", {}).get("type") == "Unconfined":
            argv += ["--security-opt", "apparmor=unconfined"]
        # as the kubelet: no_new_privs stays off unless allowPrivilegeEscalation is false
        assert context.get("allowPrivilegeEscalation") is not False
    if "runAsUser" in context:
        argv += ["--user", str(context["runAsUser"])]
    if context.get("readOnlyRootFilesystem"):
        argv += ["--read-only", "--read-only-tmpfs=false"]   # no tmpfs the manifest did not ask for
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit:
        argv += ["--memory", str(_quantity_bytes(limit))]

    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            source = mapping.host_path(volume["hostPath"]["path"])
        elif "emptyDir" in volume:
            source = mapping.scratch / f"{name}-{mount['name']}"
            source.mkdir(parents=True)
        else:
            raise AssertionError(f"volume {volume} of a kind the test does not map")
        options = ["ro" if mount.get("readOnly") else "rw", _PROPAGATION[mount.get("mountPropagation")]]
        argv += ["--volume", f"{source}:{mount['mountPath']}:{','.join(options)}"]

    env = {}
    for var in container.get("env", []):
        env[var["name"]] = (var["value"] if "value" in var
                            else mapping.field_value(var["valueFrom"]["fieldRef"]["fieldPath"]))
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]

    args = list(container.get("args", []))
    if "command" in container:
        argv += ["--entrypoint", json.dumps(container["command"])]
    if args[:1] == ["run"]:   # the agent: its pods come from the node's file instead of the API server
        argv += ["--volume", f"{mapping.pods_file}:{POD_SOURCE_PATH}:ro"]
        args += ["--pods-file", POD_SOURCE_PATH]
    return argv + [container["image"]] + args


# --- podman and the node ------------------------------------------------------------

def podman(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(PODMAN + list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(argv[:3])}... failed ({done.returncode}): {done.stderr.strip()}")
    return done


def http_get(netns: str, port: int, path: str) -> tuple[int, str]:
    """GET on the node's loopback from inside its network namespace; (0, error) when nothing answers."""
    script = ("import sys, urllib.request, urllib.error\n"
              "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
              "try:\n"
              f"    r = opener.open('http://127.0.0.1:{port}{path}', timeout=3)\n"
              "    print(r.status); sys.stdout.write(r.read().decode())\n"
              "except urllib.error.HTTPError as e:\n"
              "    print(e.code)\n"
              "except OSError as e:\n"
              "    print(0); print(e)\n")
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=30).stdout
    status, _, body = out.partition("\n")
    return int(status or 0), body


def unlabelled_samples(text: str) -> dict[str, float]:
    """The samples of a /metrics page that carry no labels, by name."""
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def container_state(name: str) -> dict:
    return json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)


def container_logs(name: str) -> str:
    done = podman("logs", name, check=False)
    return "\n".join((done.stdout + done.stderr).splitlines()[-30:])


@pytest.fixture(scope="module")
def image() -> str:
    """The manifest's image, built (or found up to date) by `make image`'s script."""
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/install-system-deps.sh (make test does)")
    name = agent_container()["image"]
    assert name == manifests.DEFAULT_IMAGE
    done = subprocess.run([str(BUILD), name], capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert done.returncode == 0, f"{BUILD} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return name


@pytest.fixture
def node(tmp_path):
    """A one-node bed in iptables mode (Istio's rules, sidecars, no agent)
    and that node's mapping; every container of the test removed afterwards."""
    name = f"ct{os.getpid()}{uuid.uuid4().hex[:4]}"
    containers: list[str] = []
    with Testbed.up(name, nodes=1, pods_per_node=2, mode="iptables") as tb:
        mapping = NodeMapping.of(tb, tb.nodes[0], tmp_path)
        try:
            yield tb, mapping, containers
        finally:
            for c in containers:
                podman("rm", "--force", "--time", "0", c, check=False)


def run_pod(tb: Testbed, mapping: NodeMapping, containers: list[str], tmp_path: Path,
            drop: tuple[str, ...] = (), seccomp_without: tuple[str, ...] = ()) -> str:
    """The pod's init containers to completion, then the agent, detached; its container name."""
    spec = pod_spec()
    tag = uuid.uuid4().hex[:8]
    for init in spec.get("initContainers", []):
        name = f"mbp-test-{init['name']}-{tag}"
        containers.append(name)
        done = podman(*run_args(init, mapping, name, tmp_path / f"{name}.seccomp.json"), timeout=120, check=False)
        assert done.returncode == 0, f"init container {init['name']} failed: {done.stderr}"
    name = f"mbp-test-agent-{tag}"
    containers.append(name)
    argv = run_args(agent_container(), mapping, name, tmp_path / f"{name}.seccomp.json", drop=drop,
                    seccomp_without=seccomp_without)
    podman(argv[0], "--detach", *argv[1:])
    return name


def meshed_pair(tb: Testbed):
    meshed = [p for p in tb.pods if p.meshed]
    assert len(meshed) >= 2, "the bed's default pods are meshed"
    return meshed[0], meshed[1]


def traffic(tb: Testbed, count: int = 5) -> dict:
    """`count` requests from one meshed pod to another: how many worked, and
    how much the client's outbound sidecar, the server's inbound sidecar and
    the client's Istio outbound REDIRECT rule moved."""
    client, server = meshed_pair(tb)
    before = (tb.sidecar_connections(client), tb.sidecar_connections(server), tb.nat_counters(client))
    results = tb.requests(client, server, new_connection=True, count=count)
    after = (tb.sidecar_connections(client), tb.sidecar_connections(server), tb.nat_counters(client))
    return {"ok": sum(1 for r in results if r["error"] is None and r["status"] == 200),
            "outbound": after[0]["outbound"] - before[0]["outbound"],
            "inbound": after[1]["inbound"] - before[1]["inbound"],
            "istio_redirect": after[2]["ISTIO_REDIRECT"] - before[2]["ISTIO_REDIRECT"]}


def wait_ready(mapping: NodeMapping, name: str, timeout: float, settle: float | None = None) -> dict | None:
    """The agent's metrics once /readyz says 200 and both meshed pods are
    accelerated; None when the container exits first, or `timeout` passes,
    or (with `settle`) the agent has been ready that long without
    accelerating them (discovery retries, but a missing capability does not
    come back)."""
    deadline = time.monotonic() + timeout
    ready_since = None
    while time.monotonic() < deadline:
        if not container_state(name)["Running"]:
            return None
        status, _ = http_get(mapping.node.netns, metrics_port(), "/readyz")
        if status == 200:
            ready_since = ready_since or time.monotonic()
            code, text = http_get(mapping.node.netns, metrics_port(), "/metrics")
            if code == 200:
                samples = unlabelled_samples(text)
                if samples.get("merbridge_pods_accelerated", 0) >= 2:
                    return samples
            if settle is not None and time.monotonic() - ready_since > settle:
                return None
        time.sleep(0.5)
    return None


# --- the tests ------------------------------------------------------------------------

def test_the_daemonset_container_accelerates_the_node(image, node, tmp_path):
    """As deployed: the init step, then the agent with exactly the manifest's
    privileges; ready, metrics served, both meshed pods accelerated, traffic
    through both sidecars with Istio's outbound rule untouched (the eBPF
    connect hook redirected it), and a clean exit on SIGTERM within the
    manifest's grace period."""
    tb, mapping, containers = node
    name = run_pod(tb, mapping, containers, tmp_path)
    samples = wait_ready(mapping, name, AGENT_READY_TIMEOUT)
    assert samples is not None, f"agent not ready with both pods accelerated; its log:\n{container_logs(name)}"
    assert samples["merbridge_datapath_attached"] == 1

    moved = traffic(tb)
    assert moved == {"ok": 5, "outbound": 5, "inbound": 5, "istio_redirect": 0}, moved

    grace = pod_spec()["terminationGracePeriodSeconds"]
    started = time.monotonic()
    podman("stop", "--time", str(grace), name, timeout=grace + 30)   # SIGTERM, SIGKILL after the grace period
    took = time.monotonic() - started
    state = container_state(name)
    assert state["ExitCode"] == 0 and took < grace, (state, took, container_logs(name))
    # whatever the agent leaves behind for a successor, the pods keep working
    assert traffic(tb, count=2)["ok"] == 2


# The manifest grants neither CAP_BPF nor CAP_PERFMON: the kernel accepts
# SYS_ADMIN wherever it asks for them (bpf_capable(), perfmon_capable()), and
# containerd's RuntimeDefault allows bpf() and perf_event_open() to SYS_ADMIN
# holders too. From 6.9 on it also accepts SYS_ADMIN where BPF asks for
# CAP_NET_ADMIN (bpf_token_capable(), e.g. creating a sockhash), but the agent
# also reads the nf_tables rules Istio installed in each pod's namespace,
# which needs NET_ADMIN itself (measured: "Operation not permitted" from nft
# and iptables-nft-save without it). So every granted capability is needed on
# every kernel, and no case below is expected to fail; a capability SYS_ADMIN
# covers would be listed here, with the reason, as a strict expected failure.
COVERED_BY_SYS_ADMIN: dict[str, str] = {}


def _capability_cases():
    for cap in agent_container()["securityContext"]["capabilities"]["add"]:
        reason = COVERED_BY_SYS_ADMIN.get(cap)
        marks = [pytest.mark.xfail(strict=True, reason=f"not needed beside SYS_ADMIN: {reason}")] if reason else []
        yield pytest.param(cap, marks=marks, id=f"without-{cap}")


def test_a_node_without_kernel_headers_uses_the_images(image, node, tmp_path):
    """The manifest's /lib/modules and /usr/src hostPaths have no type, so on a
    node without headers the kubelet mounts empty directories: the agent must
    then compile against the Debian headers the image carries."""
    tb, mapping, containers = node
    for path in ("/lib/modules", "/usr/src"):
        empty = tmp_path / f"empty{path.replace('/', '-')}"
        empty.mkdir()
        mapping.host_paths[path] = str(empty)
    name = run_pod(tb, mapping, containers, tmp_path)
    samples = wait_ready(mapping, name, AGENT_READY_TIMEOUT)
    logs = container_logs(name)
    assert samples is not None, f"agent not ready with both pods accelerated; its log:\n{logs}"
    assert "/opt/kernel-headers/" in logs, logs
    assert traffic(tb, count=2) == {"ok": 2, "outbound": 2, "inbound": 2, "istio_redirect": 0}


@pytest.mark.parametrize("cap", list(_capability_cases()))
def test_each_granted_capability_is_needed(image, node, tmp_path, cap):
    """The agent without one of the capabilities the manifest grants (the
    seccomp profile follows, as containerd's would): it must not end up
    serving the node's pods through eBPF: it exits, never gets ready, leaves
    the pods unaccelerated, or traffic still takes Istio's outbound rule.
    Where the kernel lets SYS_ADMIN stand in, the case is an expected failure
    (strict: if the capability ever becomes necessary, it shows)."""
    tb, mapping, containers = node
    name = run_pod(tb, mapping, containers, tmp_path, drop=(cap,))
    samples = wait_ready(mapping, name, AGENT_READY_TIMEOUT, settle=UNACCELERATED_SETTLE)
    if samples is None:
        return
    moved = traffic(tb)
    assert not (moved["ok"] == 5 and moved["istio_redirect"] == 0), (
        f"without CAP_{cap} the agent still accelerated the node ({moved}); its log:\n{container_logs(name)}")


def test_the_seccomp_profile_is_in_force(image, node, tmp_path):
    """The same container, its profile computed as if it held neither CAP_BPF
    nor CAP_SYS_ADMIN (it still holds both): bpf() is refused by seccomp, so
    the agent cannot load its programs. Without this, the runs above could
    pass with no seccomp filter at all."""
    tb, mapping, containers = node
    name = run_pod(tb, mapping, containers, tmp_path, seccomp_without=("BPF", "SYS_ADMIN"))
    assert wait_ready(mapping, name, AGENT_READY_TIMEOUT, settle=UNACCELERATED_SETTLE) is None
    assert traffic(tb, count=2)["istio_redirect"] == 2   # both requests took Istio's own rule
