"""Issue 20: a pod in its own user namespace (`hostUsers: false`: ids 0-65535
inside = 100000-165535 on the host, owning the pod's network namespace), with
Istio's default rules written from inside it as istio-init does and Envoy as
uid 1337 inside (101337 on the host). In both modes the app's connection to
another pod goes through the sidecar and is answered, and the proxy's own
connection to an address outside the mesh goes direct and is answered. In
ebpf mode the kernel must exempt 101337, the uid Istio's owner match means
(the agent reads the pod's uid_map); exempting 1337 would send the proxy's own
connections back into its outbound listener.

Bed (one node, Envoy, mTLS permissive): a (hostUsers: false, istio-iptables rules), c (hostUsers:
false, Istio's native nftables rules: `meta skuid`), b, out (no sidecar).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from merbridge_py.agent.status import agent_request
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

SPECS = [PodSpec("a", host_users=False), PodSpec("c", host_users=False, rules="nftables"), PodSpec("b"),
         PodSpec("out", meshed=False)]
USER_NAMESPACED = ("a", "c")
CONVERGE = 30.0     # the agent's pass is quick; the machine is busy


@pytest.fixture(scope="module")
def bed():
    name = f"uns{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=1, pods=SPECS, mode="iptables", mtls="permissive") as tb:
        yield tb


def agent_status(tb: Testbed) -> dict[str, dict]:
    return {p["pod"]: p for p in agent_request(tb.admin_socket("node0"), "/status", timeout=10)["pods"]}


def ask(tb: Testbed, src: str, dst: str, uid: int | None = None) -> dict:
    """One GET from a process of pod `src` (root inside it, or `uid` inside it)."""
    argv = [sys.executable, "-m", "merbridge_py.testbed.client", "--host", tb.pod(dst).ip, "--port", "8080",
            "--path", "/whoami", "--count", "1", "--timeout", "10"]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + argv
    proc = tb.exec(src, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)["results"][0]


def check_paths(tb: Testbed, src: str, redirects_expected: int) -> None:
    assert tb.pod(src).host_id(1337) == 101337
    nat, envoy = tb.nat_counters(src)["ISTIO_REDIRECT"], tb.sidecar_connections(src)["outbound"]

    app = ask(tb, src, "b")
    assert app["error"] is None and app["status"] == 200, app
    assert app["body"]["pod"] == "b" and app["body"]["peer"].startswith("127.0.0.6:"), app   # via both sidecars
    assert tb.sidecar_connections(src)["outbound"] == envoy + 1
    assert tb.nat_counters(src)["ISTIO_REDIRECT"] == nat + redirects_expected

    own = ask(tb, src, "out", uid=1337)      # as the proxy: uid 1337 inside the pod
    assert own["error"] is None and own["status"] == 200, own
    # direct: the server saw the client's own socket, and the pod's Envoy carried nothing
    assert own["body"]["pod"] == "out" and own["body"]["peer"] == own["local"], own
    assert tb.sidecar_connections(src)["outbound"] == envoy + 1
    assert tb.nat_counters(src)["ISTIO_REDIRECT"] == nat + redirects_expected


def test_iptables_mode_sends_the_app_to_the_sidecar_and_lets_the_proxy_out(bed):
    bed.set_mode("iptables")
    for src in USER_NAMESPACED:
        check_paths(bed, src, redirects_expected=1)


def test_ebpf_mode_exempts_the_proxy_uid_as_the_host_sees_it(bed):
    bed.set_mode("ebpf")
    deadline = time.monotonic() + CONVERGE
    while True:
        status = agent_status(bed)
        if all(status.get(f"default/{p}", {}).get("accelerated") for p in USER_NAMESPACED + ("b",)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for p in USER_NAMESPACED + ("b",):
        assert status[f"default/{p}"]["accelerated"], status[f"default/{p}"]
    for src in USER_NAMESPACED:
        check_paths(bed, src, redirects_expected=0)
    for src in USER_NAMESPACED:
        assert "proxy uid 1337 and gid 1337 are 101337 and 101337 on the host" in status[f"default/{src}"]["reason"]
    assert "on the host" not in status["default/b"]["reason"]      # the host's user namespace: ids as written
