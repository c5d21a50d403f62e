"""The deployment: generated manifests, committed and up to date, valid against
the Kubernetes schemas offline, lint-clean, with RBAC equal to what the agent
calls and a DaemonSet that obeys the API server's rules the schemas do not
express; the Dockerfile's structure; and, on this kernel, the agent running
with exactly the capabilities the DaemonSet grants.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from configparser import ConfigParser
from fnmatch import fnmatch
from pathlib import Path

import click
import kubernetes_validate
import psutil
import pytest
import yaml
from click.testing import CliRunner
from yamllint import linter
from yamllint.config import YamlLintConfig

from merbridge_py import cli, datapath, manifests, rbac, sandbox
from merbridge_py.agent.http import network_routes
from merbridge_py.agent.status import agent_request
from merbridge_py.mesh import PROFILES
from merbridge_py.testbed import istio_iptables

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "manifests" / "all-in-one.yaml"
REGENERATE = "merbridge-py manifests > manifests/all-in-one.yaml"
# appArmorProfile in securityContext exists from 1.30 on (checked below)
MIN_KUBERNETES = "1.30.0"


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


@pytest.fixture(scope="module")
def committed() -> list[dict]:
    return docs_of(COMMITTED.read_text())


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]


def agent_container(docs: list[dict]) -> dict:
    (agent,) = [c for c in pod_spec(docs)["containers"] if c["name"] == "agent"]
    return agent


# --- generated, not hand-edited -------------------------------------------------------

def test_committed_file_equals_generated_output():
    assert COMMITTED.read_text() == manifests.render(), \
        f"manifests/all-in-one.yaml is stale or hand-edited; regenerate it with: {REGENERATE}"


def test_command_prints_the_generated_yaml():
    result = CliRunner().invoke(cli.main, ["manifests"])
    assert result.exit_code == 0, result.output
    assert result.output == manifests.render()


def test_options_set_namespace_image_and_mesh():
    result = CliRunner().invoke(cli.main, ["manifests", "--namespace", "mesh-system", "--image",
                                           "registry.example.com/mbp:1", "--mesh", "istio"])
    assert result.exit_code == 0, result.output
    docs = docs_of(result.output)
    namespaced = [d for d in docs if not d["kind"].startswith("Cluster")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"mesh-system"}
    for binding in (one(docs, "ClusterRoleBinding"), one(docs, "RoleBinding")):
        assert binding["subjects"][0]["namespace"] == "mesh-system"
    spec = pod_spec(docs)
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {"registry.example.com/mbp:1"}
    args = agent_container(docs)["args"]
    assert args[args.index("--mesh") + 1] == "istio"


@pytest.mark.parametrize("argv", [["--namespace", "Istio_System"], ["--image", ""], ["--mesh", "linkerd"]])
def test_bad_options_are_usage_errors(argv):
    result = CliRunner().invoke(cli.main, ["manifests", *argv])
    assert result.exit_code == 2
    assert "Error" in result.output


# --- valid offline: Kubernetes schemas and yamllint -----------------------------------

@pytest.mark.parametrize("version", [MIN_KUBERNETES, kubernetes_validate.latest_version()])
def test_every_document_validates_strictly(committed, version):
    assert [d["kind"] for d in committed] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                              "RoleBinding", "ConfigMap", "DaemonSet"]
    for doc in committed + docs_of(manifests.render(namespace="other", image="example.com/x:y")):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_unknown_fields_and_defines_the_minimum_version(committed):
    daemon_set = json.loads(json.dumps(one(committed, "DaemonSet")))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemon_set, "1.29.0", strict=True)  # no appArmorProfile before 1.30
    daemon_set["spec"]["template"]["spec"]["containers"][0]["hostPID"] = True  # a pod-level field, misplaced
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemon_set, MIN_KUBERNETES, strict=True)


def yamllint_problems(text: str) -> list[str]:
    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    return [f"{p.line}:{p.column} {p.message} ({p.rule})" for p in linter.run(text, config)]


def test_yamllint_passes_with_the_committed_config():
    assert yamllint_problems(COMMITTED.read_text()) == []


def test_yamllint_config_still_catches_problems():
    assert yamllint_problems("---\nkey: value \nkey: other\n")  # trailing space, duplicate key


# --- RBAC: exactly what the agent calls ----------------------------------------------

def test_rbac_rules_equal_the_agent_permissions(committed):
    cluster = rbac.permissions_of(one(committed, "ClusterRole")["rules"])
    namespaced = rbac.permissions_of(one(committed, "Role")["rules"])
    assert cluster == rbac.CLUSTER_PERMISSIONS
    assert namespaced == rbac.NAMESPACE_PERMISSIONS
    assert cluster | namespaced == rbac.AGENT_PERMISSIONS
    assert ("", "pods", "list") in rbac.AGENT_PERMISSIONS  # plain tuples compare equal


def test_rbac_has_no_wildcards_and_confines_namespaced_grants_by_name(committed):
    for role in (one(committed, "ClusterRole"), one(committed, "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
    names = {rule["resources"][0]: rule["resourceNames"] for rule in one(committed, "Role")["rules"]}
    assert names == {"configmaps": [rbac.TOGGLE_CONFIGMAP], "daemonsets": [rbac.AGENT_DAEMONSET]}
    assert one(committed, "ConfigMap")["metadata"]["name"] == rbac.TOGGLE_CONFIGMAP
    assert one(committed, "ConfigMap")["data"] == {"mode": "ebpf"}
    assert all("resourceNames" not in r for r in one(committed, "ClusterRole")["rules"])


def test_bindings_grant_the_roles_to_the_agent_service_account(committed):
    account = one(committed, "ServiceAccount")["metadata"]
    assert pod_spec(committed)["serviceAccountName"] == account["name"]
    for binding, role in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        b = one(committed, binding)
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role,
                                "name": one(committed, role)["metadata"]["name"]}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                  "namespace": account["namespace"]}]


# --- the DaemonSet: rules the API server enforces beyond the schema ------------------

def test_bidirectional_propagation_only_in_privileged_containers(committed):
    spec = pod_spec(committed)
    for container in spec["containers"] + spec["initContainers"]:
        privileged = container.get("securityContext", {}).get("privileged", False)
        for mount in container.get("volumeMounts", []):
            if mount.get("mountPropagation") == "Bidirectional":
                assert privileged, f"{container['name']}: the API server rejects Bidirectional when not privileged"
    assert [c["name"] for c in spec["initContainers"]] == ["mount-bpffs"]


def test_agent_is_unprivileged_with_named_capabilities(committed):
    spec = pod_spec(committed)
    context = agent_container(committed)["securityContext"]
    assert context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"], "add": list(manifests.CAPABILITIES)}
    assert set(manifests.CAPABILITIES) == {"NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}
    # the API server rejects allowPrivilegeEscalation: false together with SYS_ADMIN
    assert context.get("allowPrivilegeEscalation") is not False
    assert context["readOnlyRootFilesystem"] is True
    assert "hostPID" not in spec and "hostIPC" not in spec
    assert spec["hostNetwork"] is True


def test_selector_matches_template_and_excludes_the_version(committed):
    daemon_set = one(committed, "DaemonSet")
    selector = daemon_set["spec"]["selector"]["matchLabels"]
    template_labels = daemon_set["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert "app.kubernetes.io/version" not in selector  # the selector is immutable across upgrades


def test_mounts_refer_to_volumes_and_host_state_is_read_only_except_bpffs(committed):
    spec = pod_spec(committed)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"] + spec["initContainers"]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes
    mounts = {m["mountPath"]: m for m in agent_container(committed)["volumeMounts"]}
    for path in ("/sys/fs/cgroup", manifests.HOST_PROC, "/lib/modules", "/usr/src"):
        assert mounts[path]["readOnly"] is True
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert volumes[mounts[manifests.HOST_PROC]["name"]]["hostPath"]["path"] == "/proc"


def test_agent_command_probes_and_scheduling(committed):
    spec = pod_spec(committed)
    agent = agent_container(committed)
    args = agent["args"]
    assert args[0] in cli.SUBCOMMANDS
    assert args[args.index("--cgroup") + 1] == "/sys/fs/cgroup"
    assert args[args.index("--bpffs") + 1] == "/sys/fs/bpf/merbridge-py"
    metrics_port = int(args[args.index("--metrics-addr") + 1].rsplit(":", 1)[1])
    assert agent["ports"] == [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}]
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # the DaemonSet the agent reads on SIGTERM is this one, and the Role grants reading it by name
    assert env["DAEMONSET_NAME"]["value"] == one(committed, "DaemonSet")["metadata"]["name"] == rbac.AGENT_DAEMONSET
    ds_rule = next(r for r in one(committed, "Role")["rules"] if r["resources"] == ["daemonsets"])
    assert ds_rule == {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": [rbac.AGENT_DAEMONSET],
                       "verbs": ["get"]}
    # /status and the mode switch: a socket in a host directory only the privileged init step and root touch
    admin_socket = Path(args[args.index("--admin-socket") + 1])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    assert volumes[mounts[str(admin_socket.parent)]]["hostPath"] == {"path": str(admin_socket.parent),
                                                                      "type": "DirectoryOrCreate"}
    # the network port serves only the read-only endpoints: probes and scrapes
    probes = {agent[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes <= {path for _, path in network_routes(None, None, None)}
    assert "/status" not in {path for _, path in network_routes(None, None, None)}
    assert env["MERBRIDGE_PROC_ROOT"]["value"] == manifests.HOST_PROC
    assert agent["resources"]["requests"]["memory"] == "96Mi"
    assert agent["resources"]["limits"] == {"memory": "256Mi"}
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["terminationGracePeriodSeconds"] == 30
    assert one(committed, "DaemonSet")["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_metrics_port_avoids_mesh_kubelet_and_ephemeral_ports():
    port = manifests.METRICS_PORT
    for profile in PROFILES.values():
        assert port not in (profile.outbound_port, profile.inbound_port, profile.status_port,
                            *profile.always_exempt_inbound_ports)
    assert not 15000 <= port <= 15099      # Istio's block (gateways on the host network live there)
    assert not 10248 <= port <= 10259      # kubelet, kube-proxy, control plane
    assert not 9100 <= port <= 9999        # Prometheus exporters
    assert not 30000 <= port <= 32767      # NodePorts
    assert port < 32768                    # Linux's default ephemeral range starts here


# --- the image ---------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuations joined."""
    logical, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
        current = ""
    return logical


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            for token in shlex.split(rest):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().lstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: a path is excluded when it or a
    parent matches; `**/` matches any number of leading directories."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        bare = pattern[3:] if pattern.startswith("**/") else None
        for prefix in prefixes:
            if fnmatch(prefix, pattern) or (bare and (fnmatch(prefix, bare) or fnmatch(prefix, "*/" + bare))):
                return True
    return False


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "debian:bookworm-slim")
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"apt-get install [^;]*python3-bpfcc", runs)
    assert "venv --system-site-packages" in runs  # the venv must see Debian's bcc

    copies = [shlex.split(rest) for keyword, rest in instructions if keyword == "COPY"]
    destinations = {}
    for *sources, destination in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
            destinations[source] = destination
    env = dockerfile_env(instructions)
    assert env[datapath.EBPF_DIR_ENV] == destinations["ebpf"].rstrip("/")
    assert (REPO / "ebpf" / datapath.HEADER).is_file()
    assert {"setup.cfg", "pyproject.toml", "merbridge_py"} <= destinations.keys()

    (entrypoint,) = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    setup = ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"]
    assert entrypoint[0] == "merbridge-py" and re.search(r"^\s*merbridge-py\s*=", scripts, re.M)
    assert "/opt/venv/bin" in env["PATH"].split(":")


def test_dockerignore_keeps_what_the_image_copies():
    patterns = dockerignore_patterns()
    copied = [source for keyword, rest in dockerfile_instructions() if keyword == "COPY"
              for source in shlex.split(rest)[:-1]]
    for source in copied:
        files = [source] if (REPO / source).is_file() else [
            str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.[ch]") if "__pycache__" not in p.parts
        ] + [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.py") if "__pycache__" not in p.parts]
        assert files, source
        for f in files:
            assert not ignored(f, patterns), f"{f} is copied by the Dockerfile but excluded by .dockerignore"
    assert ignored(".venv/bin/python", patterns) and ignored("merbridge_py/__pycache__/x.pyc", patterns)


# --- on this kernel ------------------------------------------------------------------

@pytest.mark.bpf
def test_init_container_script_mounts_bpffs_once(tmp_path):
    """The mount-bpffs script, run twice in a private mount namespace (so the
    host's /sys/fs/bpf is untouched): it mounts a bpffs, then leaves it be,
    and makes the admin socket's directory (here a stand-in) root's alone."""
    (init,) = pod_spec(docs_of(manifests.render()))["initContainers"]
    admin_dir = tmp_path / "admin"
    admin_dir.mkdir(mode=0o755)     # as the kubelet creates a DirectoryOrCreate hostPath
    script = init["command"][2].replace(manifests.ADMIN_DIR, str(admin_dir))
    check = ' && stat -f -c %T /sys/fs/bpf && grep -c " /sys/fs/bpf " /proc/self/mountinfo'
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec",
                          f"umount -q /sys/fs/bpf || true; {script}; {script}{check}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bpf_fs", "1"]
    assert stat.S_IMODE(admin_dir.stat().st_mode) == 0o700


def _meshed_pod(name: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": "node1",
                     "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxyv2"}],
                     "initContainers": [{"name": "istio-init", "image": "proxyv2"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _admin_status(admin_socket: Path) -> dict | None:
    try:
        return agent_request(admin_socket, "/status", timeout=1)
    except click.ClickException:
        return None


@pytest.mark.bpf
@pytest.mark.slow
@pytest.mark.parametrize("case, dropped, accelerated", [
    (0, (), True),
    (1, ("SYS_PTRACE",), False),   # /proc/PID/ns/net of another user's process: EACCES
    # Without SYS_ADMIN nothing stands in for CAP_BPF (not granted): the loader
    # cannot even create the maps, and the agent exits with its error.
    (2, ("SYS_ADMIN",), None),
], ids=["as-deployed", "without-SYS_PTRACE", "without-SYS_ADMIN"])
def test_agent_with_the_daemonset_capabilities(tmp_path, case, dropped, accelerated):
    """Runs `merbridge-py run` the way the DaemonSet does: its own pid and mount
    namespaces, the host's /proc bind-mounted for pod discovery (no hostPID),
    cgroup v2 read-only, no view of /run/netns, bpffs prepared by the init
    container's script, and only the agent container's capabilities. The pod's
    only process runs as uid 65535, like a pause container. With the full set
    the pod is accelerated; without SYS_PTRACE it is not, and without SYS_ADMIN
    (which also stands in for CAP_BPF and CAP_PERFMON) the agent cannot load its
    programs and exits: which is why both are in the manifest."""
    docs = docs_of(manifests.render())
    agent = agent_container(docs)
    (init,) = pod_spec(docs)["initContainers"]
    caps = [c for c in agent["securityContext"]["capabilities"]["add"] if c not in dropped]
    assert {e["name"] for e in agent["env"]} == {"NODE_NAME", "POD_NAMESPACE", "DAEMONSET_NAME", "MERBRIDGE_PROC_ROOT"}
    admin_dir = tmp_path / "admin"
    admin_dir.mkdir(mode=0o755)     # the hostPath stand-in, as the kubelet creates it

    tag = f"mbp-cap{os.getpid()}-{case}"
    ip = f"10.251.{os.getpid() % 250}.{10 + case}"
    cgroup = sandbox.cgroup2_root() / tag
    bpffs = Path("/sys/fs/bpf") / tag
    host_proc = tmp_path / "host-proc"
    host_proc.mkdir()
    pods_file = tmp_path / "pods.json"
    pods_file.write_text(json.dumps({"apiVersion": "v1", "kind": "PodList", "items": [_meshed_pod(tag, ip)]}))
    port = _free_port()
    pod_process = agent_process = runner = None
    try:
        sandbox.netns_add(tag)
        sandbox.sh("ip", "addr", "add", f"{ip}/32", "dev", "lo", netns=tag)
        # Istio's rules, as istio-init installs them: the agent reads them (nsenter + iptables-nft-save and
        # nft inside the pod's namespace) with the same capabilities before it accelerates the pod.
        sandbox.sh("iptables-restore", "--noflush", netns=tag,
                   input=istio_iptables.restore_payload(istio_iptables.flags_from_annotations({})))
        pod_process = subprocess.Popen(["ip", "netns", "exec", tag, "setpriv", "--reuid", "65535", "--regid",
                                        "65535", "--clear-groups", "sleep", "600"])
        sandbox.cgroup_create(cgroup)
        bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
        run = [sys.executable, "-m", "merbridge_py.cli", "run", "--cgroup", str(cgroup), "--pods-file",
               str(pods_file), "--bpffs", str(bpffs), "--metrics-addr", f"127.0.0.1:{port}", "--node-name", "node1",
               "--admin-socket", str(admin_dir / "agent.sock")]
        script = "\n".join([
            "set -e",
            f"mount --bind /proc {host_proc}",
            "mount -t proc proc /proc",
            "mount -t tmpfs tmpfs /run/netns",
            f"mount -o remount,bind,ro {sandbox.cgroup2_root()}",
            init["command"][2].replace(manifests.ADMIN_DIR, str(admin_dir)),
            f"exec setpriv --inh-caps=-all --bounding-set={bounding} -- "
            f"env MERBRIDGE_PROC_ROOT={host_proc} {shlex.join(run)}",
        ])
        runner = subprocess.Popen(["unshare", "-m", "-p", "-f", "--kill-child", "--propagation", "private",
                                   "sh", "-c", script],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        status, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline and runner.poll() is None:
            status = _admin_status(admin_dir / "agent.sock")
            pods = (status or {}).get("pods", [])
            if pods and pods[0]["accelerated"]:
                break
            if status and status["attached"] and not accelerated and deadline - time.monotonic() > 5:
                deadline = time.monotonic() + 5   # attached: give discovery 5 s to (wrongly) succeed
            time.sleep(0.2)
        if accelerated is None:
            out, _ = runner.communicate(timeout=60)
            assert runner.returncode != 0 and "could not open bpf map" in out and "Operation not permitted" in out, out
            return
        assert runner.poll() is None, f"agent exited {runner.returncode}: {runner.stdout.read()}"
        assert status and status["attached"], "agent did not attach in time"
        assert [p["accelerated"] for p in status["pods"]] == [accelerated], (
            f"{status['pods']}: as deployed, the agent finds pod namespaces only by scanning the host's /proc "
            f"at $MERBRIDGE_PROC_ROOT (its own /proc shows its own pid namespace, /run/netns is not mounted)")

        (agent_process,) = psutil.Process(runner.pid).children()
        agent_process.terminate()   # what the kubelet sends
        out, _ = runner.communicate(timeout=20)
        assert runner.returncode == 0, out
    finally:
        for proc in (runner, pod_process):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        sandbox.netns_delete(tag)
        sandbox.cgroup_remove(cgroup)   # also drops any program still attached to it
        if bpffs.exists():   # only when the host's /sys/fs/bpf is a bpffs the namespace shared
            for p in sorted(bpffs.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            bpffs.rmdir()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
