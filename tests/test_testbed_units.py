"""Fast tests of the test bed's pieces that need no namespaces: the plan,
the Pod objects, the sidecar's config, state records, and the app and client
over loopback."""

import json
import socket
import subprocess
import sys
import time

import pytest

from merbridge_py.agent.pods_file import parse_pods
from merbridge_py.policy import decide
from merbridge_py.testbed import client, istio_iptables, kube, state, topology
from merbridge_py.testbed.sidecar import HAProxySidecar
from merbridge_py.testbed.topology import PodSpec


def test_plan_names_addresses_and_cgroups():
    nodes, pods, fabric = topology.plan("tb", topology.default_specs(2, 2), 2, slot=3)
    assert fabric == "mbp-tb-fabric"
    assert [n.netns for n in nodes] == ["mbp-tb-node0", "mbp-tb-node1"]
    assert [n.cidr for n in nodes] == ["10.203.0.0/24", "10.203.1.0/24"]
    assert [(p.name, p.node, p.ip, p.netns, p.service_ip) for p in pods] == [
        ("n0p0", "node0", "10.203.0.10", "mbp-tb-pod-n0p0", "10.96.0.10"),
        ("n0p1", "node0", "10.203.0.11", "mbp-tb-pod-n0p1", "10.96.0.11"),
        ("n1p0", "node1", "10.203.1.10", "mbp-tb-pod-n1p0", "10.96.1.10"),
        ("n1p1", "node1", "10.203.1.11", "mbp-tb-pod-n1p1", "10.96.1.11"),
    ]
    # another slot, other pod addresses: beds side by side never share a pod IP
    assert topology.plan("tb2", topology.default_specs(1, 1), 1, slot=4)[1][0].ip == "10.204.0.10"
    assert pods[2].cgroup.endswith("/mbp-tb/node1/n1p0") and nodes[1].cgroup.endswith("/mbp-tb/node1")
    assert nodes[0].bpffs == "/sys/fs/bpf/mbp-tb-node0"
    # every name carries the test bed's prefix, so `down --name` touches only its own
    spaces = [fabric] + [n.netns for n in nodes] + [p.netns for p in pods]
    assert all(ns.startswith(topology.prefix("tb")) for ns in spaces)


def test_plain_pods_are_the_last_of_each_node():
    specs = topology.default_specs(2, 3, plain_per_node=1)
    assert [(s.name, s.meshed) for s in specs] == [("n0p0", True), ("n0p1", True), ("n0p2", False),
                                                   ("n1p0", True), ("n1p1", True), ("n1p2", False)]


@pytest.mark.parametrize("name", ["", "Tb", "tb-1", "1tb", "a" * 21, "tb_1"])
def test_bad_testbed_names_are_refused(name):
    with pytest.raises(ValueError, match="test bed name"):
        topology.plan(name, [PodSpec("a")])


def test_bad_pod_specs_are_refused():
    with pytest.raises(ValueError, match="used twice"):
        topology.plan("tb", [PodSpec("a"), PodSpec("a")])
    with pytest.raises(ValueError, match="node 3"):
        topology.plan("tb", [PodSpec("a", node=3)], nodes=2)
    with pytest.raises(ValueError, match="pod name"):
        topology.plan("tb", [PodSpec("A_b")])
    with pytest.raises(ValueError, match=r"app_ports \[9300\] are not all among its ports \[8080\]"):
        topology.plan("tb", [PodSpec("a", app_ports=(9300,))])


def test_app_ports_leave_declared_ports_to_a_test_app():
    _, pods, _ = topology.plan("tb", [PodSpec("a", ports=(8080, 9300), app_ports=(8080,)), PodSpec("b")])
    assert (pods[0].ports, pods[0].bed_app_ports) == ([8080, 9300], [8080])
    assert pods[1].bed_app_ports == pods[1].ports == [8080]


@pytest.mark.parametrize("ports", [(0,), (70000,), ("8080",)])
def test_bad_http_ports_are_refused_before_anything_is_made(ports):
    from merbridge_py.testbed import Testbed
    with pytest.raises(ValueError, match="http_ports"):
        Testbed.up("badports", http_ports=ports)
    assert state.load("badports") is None


def _objects(specs, nodes=1):
    node_list, pods, _ = topology.plan("tb", specs, nodes)
    by_name = {n.name: n for n in node_list}
    return [kube.pod_object("tb", p, by_name[p.node]) for p in pods]


def test_pod_objects_are_what_the_agent_reads_and_accelerates():
    annotations = {istio_iptables.ANN_EXCLUDE_INBOUND_PORTS: "9090"}
    objects = _objects([PodSpec("a", annotations=annotations), PodSpec("b", meshed=False)])
    parsed = parse_pods(json.dumps(kube.pod_list(objects)))
    assert sorted(parsed) == ["default/a", "default/b"]
    meshed, plain = decide(parsed["default/a"]), decide(parsed["default/b"])
    assert meshed.accelerate and meshed.ips == ("10.200.0.10",), meshed.reason
    assert not plain.accelerate and "no istio-proxy" in plain.reason
    # the agent reads the same exclusions istio-init was given
    assert 9090 in meshed.policy.exclude_inbound_ports


def test_meshed_pod_object_looks_injected():
    pod = _objects([PodSpec("a", annotations={istio_iptables.ANN_EXCLUDE_OUTBOUND_PORTS: "9091"})])[0]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "istio-proxy"]
    init = pod["spec"]["initContainers"][0]
    assert init["name"] == "istio-init"
    assert init["args"] == istio_iptables.flags_from_annotations(pod["metadata"]["annotations"]).argv()
    assert init["args"][init["args"].index("-o") + 1] == "9091"
    assert pod["status"]["podIP"] == "10.200.0.10" and pod["status"]["podIPs"] == [{"ip": "10.200.0.10"}]
    assert pod["spec"]["nodeName"] == "node0" and pod["status"]["phase"] == "Running"
    assert json.loads(pod["metadata"]["annotations"]["sidecar.istio.io/status"])["containers"] == ["istio-proxy"]
    # stable identity across runs
    assert pod["metadata"]["uid"] == _objects([PodSpec("a")])[0]["metadata"]["uid"]


def test_plain_pod_object_has_no_sidecar():
    pod = _objects([PodSpec("b", meshed=False)])[0]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    assert "initContainers" not in pod["spec"]


def test_haproxy_config(tmp_path):
    cfg = HAProxySidecar(tmp_path, "a", services={"10.96.0.10": "10.200.0.10"}).config()
    assert "uid 1337" in cfg and "gid 1337" in cfg and "nbthread 1" in cfg
    assert "bind 0.0.0.0:15001" in cfg and "bind 0.0.0.0:15006" in cfg and "bind 0.0.0.0:15021" in cfg
    assert "server orig 0.0.0.0 source 127.0.0.6" in cfg           # inbound
    # a service IP and its endpoint's own IP reach the same per-endpoint server
    assert "use-server ep0 if { dst 10.96.0.10 }" in cfg and "use-server ep0 if { dst 10.200.0.10 }" in cfg
    assert "server ep0 10.200.0.10 weight 0" in cfg
    assert "mode http" not in cfg.split("frontend health")[0]    # no HTTP ports: everything is TCP
    assert f"stats socket {tmp_path / 'a.haproxy.sock'}" in cfg
    # logs nothing by default
    assert not [line for line in cfg.splitlines() if line.strip().startswith(("log", "option logasap"))]
    assert "log-format" in HAProxySidecar(tmp_path, "a", log_connections=True).config()


def test_haproxy_config_with_http_ports(tmp_path):
    cfg = HAProxySidecar(tmp_path, "a", services={"10.96.0.10": "10.200.0.10", "10.96.0.11": "10.200.1.10"},
                         http_ports=(8080, 8081)).config()
    for side in ("outbound", "inbound"):
        frontend = cfg.split(f"frontend {side}\n")[1].split("\n\n")[0]
        assert "use_backend %s_http if { dst_port 8080 8081 }" % side in frontend
        assert f"default_backend {side}_tcp" in frontend
        backend = cfg.split(f"backend {side}_http\n")[1].split("\n\n")[0]
        assert "mode http" in backend and "http-reuse always" in backend
    outbound = cfg.split("backend outbound_http\n")[1].split("\n\n")[0]
    # one server, so one idle pool, per endpoint
    assert "server ep0 10.200.0.10 weight 0" in outbound and "server ep1 10.200.1.10 weight 0" in outbound
    assert "server orig 0.0.0.0 source 127.0.0.6" in cfg.split("backend inbound_http\n")[1]


@pytest.mark.parametrize("http_ports", [(), (8080,)])
def test_haproxy_config_is_valid(tmp_path, http_ports):
    cfg = HAProxySidecar(tmp_path, "a", log_connections=True, services={"10.96.0.10": "10.200.0.10"},
                         http_ports=http_ports)
    (tmp_path / "a.cfg").write_text(cfg.config())
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "a.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_sidecar_log_parsing(tmp_path):
    sc = HAProxySidecar(tmp_path, "a", log_connections=True)
    sc.log_path.write_text("outbound 10.200.0.10:4000 10.96.0.11:8080 10.200.0.11:8080\n"
                           "[WARNING] something else\n"
                           "inbound 10.200.0.10:4001 10.200.0.11:8080 10.200.0.11:8080\n")
    conns = sc.connections()
    assert [(c.listener, c.original_dst, c.upstream) for c in conns] == [
        ("outbound", "10.96.0.11:8080", "10.200.0.11:8080"), ("inbound", "10.200.0.11:8080", "10.200.0.11:8080")]
    assert HAProxySidecar(tmp_path, "a").connections() == []      # logging off: nothing claimed


def test_process_records_tell_recycled_pids_apart():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec = state.ProcessRecord.of(proc.pid, "app", "a")
        assert rec.alive()
        impostor = state.ProcessRecord(proc.pid, rec.start + 1, "app", "a")
        assert not impostor.alive()
        assert not state.signal_if_ours(impostor, 15)      # never signals a process that is not ours
        assert proc.poll() is None
        state.terminate([rec], timeout=5, reap=lambda pid, block=False: proc.poll())
        assert proc.wait(5) == -15 and not rec.alive()
    finally:
        proc.kill()
        proc.wait()


def test_app_and_client_over_loopback(tmp_path):
    ready = tmp_path / "ready"
    port = _free_port()
    app = subprocess.Popen([sys.executable, "-m", "merbridge_py.testbed.app", "--name", "podx",
                            "--port", str(port), "--ready-file", str(ready)])
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert app.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        results = client.run("127.0.0.1", port, "/whoami", count=3, new_connection=False, timeout=5)
        assert [r["status"] for r in results] == [200, 200, 200]
        assert {r["body"]["pod"] for r in results} == {"podx"}
        # keep-alive: one connection for all three, and the server saw the client's own socket
        assert len({r["local"] for r in results}) == 1
        assert results[0]["body"]["peer"] == results[0]["local"]
        fresh = client.run("127.0.0.1", port, "/whoami", count=3, new_connection=True, timeout=5)
        assert len({r["local"] for r in fresh}) == 3
        assert client.run("127.0.0.1", port, "/", 1, False, 5)[0]["body"] == "hello from podx\n"
        big = client.run("127.0.0.1", port, "/bytes?n=1000000", 1, False, 5)[0]
        assert big["status"] == 200 and big["body"] == "<1000000 bytes>"
        assert client.run("127.0.0.1", port, "/bytes?n=-1", 1, False, 5)[0]["status"] == 400
        assert client.run("127.0.0.1", port, "/nope", 1, False, 5)[0]["status"] == 404
        # a refused connection is a result with an error, not an exception
        app.terminate()
        app.wait(5)
        down = client.run("127.0.0.1", port, "/whoami", 1, False, 1)[0]
        assert down["status"] is None and "ConnectionRefused" in down["error"]
    finally:
        app.kill()
        app.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_prints_one_json_document(tmp_path):
    out = subprocess.run([sys.executable, "-m", "merbridge_py.testbed.client", "--host", "127.0.0.1",
                          "--port", str(_free_port()), "--timeout", "1"], capture_output=True, text=True)
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["results"][0]["status"] is None and doc["results"][0]["error"]
