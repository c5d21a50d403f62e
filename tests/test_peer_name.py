"""Issue 20, the peer address: a socket whose connect the datapath rewrote
shows the destination it asked for in getpeername(), as under Istio's REDIRECT
rule; its own address (getsockname) stays the pod's; every socket the
datapath did not rewrite (the proxy's accepted and upstream ones, the app's
inbound connection from 127.0.0.6) keeps its real peer. One simulated node,
no iptables rules (every redirect seen here is ours); the test bed's
counterpart through Envoy is tests/test_peer_name_e2e.py.

Pods a, b are meshed and dual stack (as in tests/test_datapath_ipv6.py); c
is plain; r is meshed but its sidecar is not running (its redirected
connects are refused). The agent runs with --inbound-redirect ebpf (SimNode's default), so
a proxy's connection to a same-node pod is rewritten to its inbound port too.
"""

import ipaddress
import json
import os
import re

import pytest

from merbridge_py import sandbox

pytestmark = pytest.mark.bpf


def enable_ipv6(netns: str) -> None:
    for key in ("all", "default", "lo"):
        sandbox.sh("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=0", netns=netns)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from helpers.node import SimNode
    n = SimNode(tmp_path_factory.mktemp("peer"))
    prefix = f"fd01:{os.getpid() % 0xffff:x}:{os.getpid() // 0xffff % 0xffff:x}:"
    try:
        enable_ipv6(n.node_ns)
        sandbox.sh("ip", "-6", "addr", "add", f"{prefix}:1/64", "dev", "br0", "nodad", netns=n.node_ns)
        for i, (name, meshed) in enumerate((("a", True), ("b", True), ("c", False), ("r", True))):
            pod = n.add_pod(name, meshed=meshed)
            pod.ip6 = str(ipaddress.ip_address(f"{prefix}:{10 + i:x}"))
            enable_ipv6(pod.netns)
            sandbox.sh("ip", "-6", "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad", netns=pod.netns)
            sandbox.sh("ip", "-6", "addr", "add", "::6/128", "dev", "lo", netns=pod.netns)
        for pod in n.pods.values():
            n.start_app(pod)
            if pod.meshed and pod.name != "r":
                n.start_sidecar(pod)
        n.write_pods_file()
        n.start_agent(timeout=300)   # the kernel matrix runs this under software emulation: compiling is slow
        yield n
    finally:
        n.close()


def names(node, src, host, port=8080, uid=None, command="names", extra=()):
    r = node.client(node.pods[src], command, host, port, *extra, uid=uid, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def records(node, pod, port):
    return [r for r in node.sidecar_records(node.pods[pod]) if r.startswith(f"{port} ")]


def shown(node) -> float:
    m = re.search(r"^merbridge_peer_names_shown_total (\S+)$", node.agent_get("/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


# (client family, how the client writes b's address, how sockets show a's and b's IPv4/IPv6 address)
FAMILIES = {
    "inet": lambda pod: pod.ip,
    "v4-mapped": lambda pod: f"::ffff:{pod.ip}",
    "ipv6": lambda pod: pod.ip6,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_app_sees_original_destination_and_its_own_address(node, family):
    a, b = node.pods["a"], node.pods["b"]
    form = FAMILIES[family]
    before_out, before_in, before_shown = len(records(node, "a", 15001)), len(records(node, "b", 15006)), shown(node)
    (got,) = names(node, "a", form(b))
    assert got["peer"] == [form(b), 8080], got
    local_ip, local_port = got["local"]
    assert local_ip == form(a), got
    # it really went through both sidecars
    name, app_peer = got["answer"].split()
    assert name == "b" and app_peer.startswith("::6:" if family == "ipv6" else "127.0.0.6:"), got
    # The proxy's accepted socket: its peer is the app's real address (accept()
    # runs the getpeername hook too) and SO_ORIGINAL_DST still names b.
    on_proxy = b.ip6 if family == "ipv6" else b.ip
    app_addr = a.ip6 if family == "ipv6" else a.ip
    assert records(node, "a", 15001)[before_out:] == [f"15001 {on_proxy}:8080 {app_addr}:{local_port}"]
    assert len(records(node, "b", 15006)[before_in:]) == 1
    assert shown(node) == before_shown + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_sockets_keep_their_own_peers(node, family):
    """The proxy's own connection to a same-node pod, whose port the connect
    hook moved to that pod's inbound listener, shows the port it asked for
    (as with the pod's REDIRECT rule); a proxy's connection to its own pod's
    app is never rewritten and shows its real peer."""
    a, b = node.pods["a"], node.pods["b"]
    form = FAMILIES[family]
    before_in = len(records(node, "b", 15006))
    (got,) = names(node, "a", form(b), uid=1337)
    assert got["peer"] == [form(b), 8080] and got["local"][0] == form(a), got
    assert got["answer"].split()[0] == "b"
    assert len(records(node, "b", 15006)[before_in:]) == 1, "the proxy's connection did not reach b's inbound listener"
    # a proxy's connection to its own pod's app (as the inbound leg dials it) is never rewritten
    (own,) = names(node, "b", form(b), uid=1337)
    assert own["peer"] == [form(b), 8080] and own["answer"].startswith("b "), own


def test_untouched_sockets_show_the_kernels_peer(node):
    a, b, c = (node.pods[k] for k in "abc")
    before = shown(node)
    (plain,) = names(node, "c", b.ip)
    assert plain["peer"] == [b.ip, 8080] and plain["answer"].startswith(f"b {c.ip}:"), plain
    r = node.client(a, "names", b.ip, 8080, in_cgroup=False, timeout=60)
    assert r.returncode == 0, r.stderr
    outside = json.loads(r.stdout.splitlines()[0])
    assert outside["peer"] == [b.ip, 8080] and outside["answer"].startswith(f"b {a.ip}:"), outside
    (loopback,) = names(node, "a", "127.0.0.1")
    assert loopback["peer"] == ["127.0.0.1", 8080]
    assert shown(node) == before, "a socket that was not rewritten was renamed"


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_does_not_outlive_its_socket(node, family):
    """The redirected socket is reset (no TIME_WAIT); a new socket bound to
    its local address dials the proxy's outbound listener itself, so it has
    the first one's 4-tuple. It must see its real peer: the name belonged to
    the first socket, not to the tuple."""
    a, b = node.pods["a"], node.pods["b"]
    form = FAMILIES[family]
    first, second = names(node, "a", form(b), command="names_reuse")
    assert first["peer"] == [form(b), 8080]
    assert second["local"] == first["local"], (first, second)
    listener = a.ip6 if family == "ipv6" else ("::ffff:127.0.0.2" if family == "v4-mapped" else "127.0.0.2")
    assert second["peer"] == [listener, 15001], second


@pytest.mark.parametrize("family", ["inet", "v4-mapped"])
def test_a_socket_connecting_again_after_a_refused_redirect_shows_its_new_peer(node, family):
    """A TCP socket may connect again after a failed attempt. Here the first
    attempt is redirected (to a proxy that is not there: refused), the second
    goes to loopback, which is never rewritten: the socket must show the
    second peer, not the first attempt's destination."""
    b = node.pods["b"]
    host = FAMILIES[family](b)
    (got,) = names(node, "r", host, command="names_after_refused", extra=(8080,))
    loopback = "::ffff:127.0.0.1" if family == "v4-mapped" else "127.0.0.1"
    assert got["peer"] == [loopback, 8080] and got["answer"].startswith("r "), got


def test_mode_switch_keeps_the_name_of_an_established_connection(node):
    """getpeername stays attached in iptables mode: a connection rewritten
    before the switch keeps its name; new ones take the iptables path (no
    rules on this node: direct) and show the real, same, destination."""
    from click.testing import CliRunner

    from merbridge_py.cli import main
    a, b = node.pods["a"], node.pods["b"]

    def toggle(mode):
        r = CliRunner().invoke(main, ["toggle", mode, "--node", "--admin-socket", str(node.admin_socket)])
        assert r.exit_code == 0, r.output

    held = node.client_background(a, "names", b.ip, 8080, 3000)
    try:
        first = json.loads(held.stdout.readline())
        assert first["peer"] == [b.ip, 8080] and first["answer"].startswith("b 127.0.0.6:"), first
        toggle("iptables")
        (new,) = names(node, "a", b.ip)
        assert new["peer"] == [b.ip, 8080] and new["answer"].startswith(f"b {a.ip}:"), new
        out, err = held.communicate(timeout=30)
        assert held.returncode == 0, err
        assert json.loads(out)["peer"] == [b.ip, 8080], out
    finally:
        toggle("ebpf")
    (again,) = names(node, "a", b.ip)
    assert again["peer"] == [b.ip, 8080] and again["answer"].startswith("b 127.0.0.6:"), again
