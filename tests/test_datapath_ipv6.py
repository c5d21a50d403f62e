"""Issue 14: AF_INET6 sockets on the eBPF datapath, one simulated node, no
iptables or ip6tables rules (so every redirect seen here is ours).

Pods a, b, e, f are meshed and dual stack (an IPv4 and an IPv6 address, both
in the pod object's status.podIPs; ::6 on lo, as istio-iptables adds it),
with test sidecars listening on 0.0.0.0 and [::] as Istio's dual-stack Envoy
does. Pod m's sidecar dials IPv4 upstreams through AF_INET6 sockets (v4-mapped).
Pod g is meshed with an IPv6 address in its namespace but the API shows
it IPv4-only (Istio installs no ip6tables rules for it). Pod h captures only
its IPv4 subnet (includeOutboundIPRanges), so no IPv6 destination. Pod a
excludes outbound port 9090, e's IPv4 address and f's IPv6 address.
"""

import ipaddress
import json
import os

import pytest

from merbridge_py import sandbox

pytestmark = pytest.mark.bpf

T = "traffic.sidecar.istio.io/"


def enable_ipv6(netns: str) -> None:
    for key in ("all", "default", "lo"):
        sandbox.sh("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=0", netns=netns)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from helpers.node import SimNode
    n = SimNode(tmp_path_factory.mktemp("dp6"))
    prefix = f"fd00:{os.getpid() % 0xffff:x}:{os.getpid() // 0xffff % 0xffff:x}:"   # ours alone, as the IPv4 subnet
    try:
        enable_ipv6(n.node_ns)
        sandbox.sh("ip", "-6", "addr", "add", f"{prefix}:1/64", "dev", "br0", "nodad", netns=n.node_ns)
        for i, name in enumerate("abefghm"):
            pod = n.add_pod(name, meshed=True)
            pod.ip6 = str(ipaddress.ip_address(f"{prefix}:{10 + i:x}"))   # canonical, as sockets print it
            enable_ipv6(pod.netns)
            sandbox.sh("ip", "-6", "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad", netns=pod.netns)
            sandbox.sh("ip", "-6", "addr", "add", "::6/128", "dev", "lo", netns=pod.netns)
        a, e, f, g, h = (n.pods[k] for k in "aefgh")
        a.annotations = {T + "excludeOutboundPorts": "9090",
                         T + "excludeOutboundIPRanges": f"{e.ip}/32,{f.ip6}/128"}
        g.ip6_in_manifest = False
        h.annotations = {T + "includeOutboundIPRanges": f"{n.subnet}.0/24"}
        n.pods["m"].sidecar_args = ["--mapped-upstreams"]
        for pod in n.pods.values():
            n.start_app(pod)
            n.start_sidecar(pod)
        n.start_app(n.pods["b"], port=9090)
        n.write_pods_file()
        n.start_agent()
        yield n
    finally:
        n.close()


def ask(node, src, host, port=8080, n=1):
    r = node.client(node.pods[src], "ask", host, port, n, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\n")[0].split()   # [pod name, peer the app saw]


def records(node, pod, port):
    return [r for r in node.sidecar_records(node.pods[pod]) if r.startswith(f"{port} ")]


def metric(node, name, labels=""):
    import re
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", node.agent_get("/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


def segments_for(node, src, host, messages=300):
    before = node.tcp_out_segs(node.pods[src])
    r = node.client(node.pods[src], "ask", host, 8080, messages, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout, node.tcp_out_segs(node.pods[src]) - before


def test_status_per_family(node):
    status = {p["pod"]: p for p in json.loads(node.agent_get("/status"))["pods"]}
    assert all(status[f"default/{k}"]["accelerated"] for k in "abefghm"), status
    assert "IPv4 and IPv6" in status["default/a"]["reason"]
    assert "IPv4 and IPv6" not in status["default/g"]["reason"]


def test_v4_mapped_client_is_redirected_answered_and_spliced(node):
    """An AF_INET6 socket to ::ffff:<b's IPv4> (the JVM's default): a's
    proxy accepts it on its IPv4 listener and is told b's IPv4 address."""
    a, b = node.pods["a"], node.pods["b"]
    before_a, before_b = len(records(node, "a", 15001)), len(records(node, "b", 15006))
    name, peer = ask(node, "a", f"::ffff:{b.ip}")
    assert name == "b" and peer.startswith("127.0.0.6:"), (name, peer)
    out_a, in_b = records(node, "a", 15001)[before_a:], records(node, "b", 15006)[before_b:]
    assert len(out_a) == 1 and out_a[0].startswith(f"15001 {b.ip}:8080 {a.ip}:"), out_a
    assert len(in_b) == 1 and in_b[0].startswith(f"15006 {b.ip}:8080 {a.ip}:"), in_b
    out, spliced = segments_for(node, "a", f"::ffff:{b.ip}")
    assert out.count("127.0.0.6:") == 300
    # handshakes and FINs of the app's and the proxy's connections only (as
    # test_datapath's IPv4 case), against ~1200 when every message crosses TCP
    assert spliced < 40, spliced


def test_native_ipv6_is_redirected_answered_and_spliced(node):
    """a -> [b's IPv6]:8080: redirected to [a's own IPv6]:15001, a's proxy is told b's
    IPv6 address by getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST), its upstream
    goes to b's inbound listener, which connects from ::6."""
    a, b = node.pods["a"], node.pods["b"]
    before_a, before_b = len(records(node, "a", 15001)), len(records(node, "b", 15006))
    answered = metric(node, "merbridge_original_dst_queries_total", '{result="answered"}')
    name, peer = ask(node, "a", b.ip6)
    assert name == "b" and peer.startswith("::6:"), (name, peer)
    out_a, in_b = records(node, "a", 15001)[before_a:], records(node, "b", 15006)[before_b:]
    assert len(out_a) == 1 and out_a[0].startswith(f"15001 {b.ip6}:8080 {a.ip6}:"), out_a
    assert len(in_b) == 1 and in_b[0].startswith(f"15006 {b.ip6}:8080 {a.ip6}:"), in_b
    assert metric(node, "merbridge_original_dst_queries_total", '{result="answered"}') == answered + 2
    out, spliced = segments_for(node, "a", b.ip6)
    assert out.count("::6:") == 300
    assert spliced < 40, spliced


def test_unspliced_ipv6_crosses_tcp(node):
    """The splice figure above means something: with splicing off, the same
    300 messages over IPv6 take hundreds of segments."""
    node.stop_agent()
    try:
        node.start_agent("--splice", "never")
        out, unspliced = segments_for(node, "a", node.pods["b"].ip6)
        assert out.count("::6:") == 300
        assert unspliced > 600, unspliced
    finally:
        node.stop_agent()
        node.start_agent()


def test_exclusions_apply_per_family(node):
    a, b, e, f = (node.pods[k] for k in "abef")
    before = len(records(node, "a", 15001))
    # excluded port: both families go direct
    assert ask(node, "a", b.ip6, 9090)[1].startswith(f"{a.ip6}:")
    assert ask(node, "a", f"::ffff:{b.ip}", 9090)[1].startswith(f"{a.ip}:")
    # e's IPv4 address is excluded, its IPv6 one is not
    assert ask(node, "a", e.ip)[1].startswith(f"{a.ip}:")
    assert ask(node, "a", f"::ffff:{e.ip}")[1].startswith(f"{a.ip}:")
    assert ask(node, "a", e.ip6)[1].startswith("::6:")
    # f's IPv6 address is excluded, its IPv4 one is not
    assert ask(node, "a", f.ip6)[1].startswith(f"{a.ip6}:")
    assert ask(node, "a", f.ip)[1].startswith("127.0.0.6:")
    assert len(records(node, "a", 15001)) == before + 2
    # IPv6 loopback and the pod's own IPv6 address stay local, as Istio's -o lo RETURN leaves them
    assert ask(node, "a", "::1")[0] == "a"
    assert ask(node, "a", a.ip6)[1].startswith(f"{a.ip6}:")
    # so do the unspecified addresses (connect() turns them into loopback) and ::6, which is on lo
    for host in ("::", "0.0.0.0", "::6"):
        assert ask(node, "a", host)[0] == "a", host
    assert len(records(node, "a", 15001)) == before + 2


def test_a_pod_without_ipv6_policy_leaves_ipv6_alone(node):
    """g has an IPv6 address the API does not show (no ip6tables rules in
    Istio's eyes): its IPv6 connections go direct, its v4-mapped ones follow
    its IPv4 policy. h captures only its IPv4 subnet: IPv6 is not captured."""
    b, g, h = (node.pods[k] for k in "bgh")
    before_g, before_h = len(records(node, "g", 15001)), len(records(node, "h", 15001))
    assert ask(node, "g", b.ip6)[1].startswith(f"{g.ip6}:")
    assert ask(node, "h", b.ip6)[1].startswith(f"{h.ip6}:")
    assert len(records(node, "g", 15001)) == before_g and len(records(node, "h", 15001)) == before_h
    assert ask(node, "g", f"::ffff:{b.ip}")[1].startswith("127.0.0.6:")
    assert ask(node, "h", f"::ffff:{b.ip}")[1].startswith("127.0.0.6:")
    assert len(records(node, "g", 15001)) == before_g + 1 and len(records(node, "h", 15001)) == before_h + 1


def test_the_kernel_holds_both_addresses_and_forgets_them(node):
    from helpers.kernel_check import kernel_pods
    kernel = kernel_pods(node.bpffs)
    for name in "abefh":
        pod = node.pods[name]
        assert kernel[pod.ip6][1] == pod.ip6 and kernel[pod.ip6][0] == kernel[pod.ip][0], (name, kernel)
    assert node.pods["g"].ip6 not in kernel
    rc, out = node.stop_agent()
    assert rc == 0, out
    assert not node.bpffs.exists(), "pins left behind (connect6 among them)"
    node.start_agent()


def test_mode_switch_takes_both_connect_hooks_off_and_back(node):
    """`toggle iptables` detaches connect6 with connect4 (this node has no
    rules: the iptables path is the direct path), `toggle ebpf` attaches both."""
    from click.testing import CliRunner

    from merbridge_py.cli import main
    from merbridge_py.datapath import attached_program_ids
    a, b = node.pods["a"], node.pods["b"]

    def toggle(mode):
        r = CliRunner().invoke(main, ["toggle", mode, "--node", "--admin-socket", str(node.admin_socket)])
        assert r.exit_code == 0, r.output

    toggle("iptables")
    try:
        attached = attached_program_ids(node.cgroup)
        assert not attached["CGROUP_INET4_CONNECT"] and not attached["CGROUP_INET6_CONNECT"], attached
        assert ask(node, "a", b.ip6)[1].startswith(f"{a.ip6}:")
        assert ask(node, "a", f"::ffff:{b.ip}")[1].startswith(f"{a.ip}:")
    finally:
        toggle("ebpf")
    assert ask(node, "a", b.ip6)[1].startswith("::6:")
    assert ask(node, "a", f"::ffff:{b.ip}")[1].startswith("127.0.0.6:")


def test_a_proxy_dialling_a_same_node_pod_v4_mapped(node):
    """m's proxy reaches b through an AF_INET6 socket to ::ffff:<b's IPv4>:
    connect6 takes the proxy-side path (this node has no rules, so the hook
    itself moves it to b's inbound listener), b's proxy is answered b's
    IPv4 address on its AF_INET socket, and the leg is spliced."""
    b, m = node.pods["b"], node.pods["m"]
    before = len(records(node, "b", 15006))
    name, peer = ask(node, "m", b.ip)
    assert name == "b" and peer.startswith("127.0.0.6:"), (name, peer)
    new = records(node, "b", 15006)[before:]
    assert len(new) == 1 and new[0].startswith(f"15006 {b.ip}:8080 {m.ip}:"), new
    out, segs = segments_for(node, "m", b.ip)
    assert out.count("127.0.0.6:") == 300
    assert segs < 40, segs
