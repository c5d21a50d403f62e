"""Issue 20's acceptance, the transfer part: in both modes, same-node and
cross-node, through Envoy sidecars with mTLS STRICT, a 256 MiB upload and a
256 MiB download arrive byte-identical, FIONREAD is never 0 while recv()
returns data on the receiving app's socket (the server app's for the upload,
the client app's for the download), and the client app's getpeername() is
the destination it dialled.

The apps (helpers/fionread_app.py) send a stream in which every 4 KiB block
starts with its own offset and compare every received byte with it, so a
lost, repeated or displaced block counts as corrupt wherever it lands; each
readable moment is select(), ioctl(FIONREAD), recv(). The app port is
declared by the destination pods, so the sidecars give it a Service cluster
and speak mTLS to each other (a new TLS handshake per connection: checked);
bulk detection keeps the product's default threshold.

Topology: node0: a, b; node1: d; all meshed. One bed, iptables first, then
switched to ebpf (the bed's own set_mode, as in tests/test_peer_name_e2e.py).
The transfer size is the acceptance's everywhere, host and kernel VMs
(docs/kernels.md, "256 MiB transfers through Envoy": measured cost per kernel).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers.splicing import probes_allow_splicing
from merbridge_py import sandbox
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.testbed import timeout_scale
from merbridge_py.testbed.topology import APP_PORT, PodSpec

pytestmark = pytest.mark.bpf

APP = Path(__file__).parent / "helpers" / "fionread_app.py"
PORT = 9310                       # declared by b and d, served by APP (the bed's own app keeps 8080)
TRANSFER = 256 << 20              # bytes each way: the acceptance's size
SPECS = [PodSpec("a", node=0),
         PodSpec("b", node=0, ports=(APP_PORT, PORT), app_ports=(APP_PORT,)),
         PodSpec("d", node=1, ports=(APP_PORT, PORT), app_ports=(APP_PORT,))]
MODES = ["iptables", "ebpf"]
PEER_NAMES = "merbridge_peer_names_shown_total"
SPLICED = "merbridge_spliced_bytes_total"
BULK = 'merbridge_splice_skipped_total{reason="bulk"}'


@pytest.fixture(scope="module")
def strict_bed():
    servers = []
    with Testbed.up(f"bx{os.getpid() % 10000}{uuid.uuid4().hex[:3]}", nodes=2, pods=SPECS, mode=MODES[0],
                    mtls="strict") as tb:
        try:
            for pod in ("b", "d"):
                proc = tb.exec(pod, [sys.executable, str(APP), "serve", "--port", str(PORT)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                servers.append(proc)
                ready, _, _ = select.select([proc.stdout], [], [], 30 * timeout_scale())
                assert ready and proc.stdout.readline().strip() == "ready", f"the app in {pod} did not start"
            yield tb
        finally:
            for proc in servers:     # before the bed goes (its cgroup removal would kill what is left)
                sandbox.stop(proc, timeout=10)


@pytest.fixture(scope="module", params=MODES)
def bed(request, strict_bed):
    strict_bed.set_mode(request.param)
    return strict_bed


@pytest.mark.parametrize("dst", ["b", "d"], ids=["same-node", "cross-node"])
def test_256_mib_each_way_through_envoy_mtls(bed, dst):
    a, server = bed.pod("a"), bed.pod(dst)
    redirects = bed.nat_counters("a")["ISTIO_REDIRECT"]
    handshakes = bed.sidecar_tls_handshakes(dst)["inbound"]
    shown = bed.agent_metrics(a.node).get(PEER_NAMES, 0) if bed.mode == "ebpf" else 0
    nodes = sorted({a.node, server.node})
    before = {n: bed.agent_metrics(n) for n in nodes} if bed.mode == "ebpf" else {}

    done = bed.exec_in("a", [sys.executable, str(APP), "client", "--host", server.ip, "--port", str(PORT),
                             "--up", str(TRANSFER), "--down", str(TRANSFER), "--stream", "offsets"],
                       timeout=600 * timeout_scale())
    result = json.loads(done.stdout) if done.stdout.strip() else {}
    assert "send_error" not in result, (
        f"{bed.mode}: the client app's send() failed ({result.get('send_error')}) after {result.get('sent')} of "
        f"{TRANSFER} bytes, {result.get('seconds')} s into the upload", result)
    assert done.returncode == 0, done.stderr

    # the client app's view of its own connection, right after connect and after the transfers
    dialled = f"{server.ip}:{PORT}"
    assert result["peer"] == dialled and result["peer_after"] == dialled, (
        f"{bed.mode}: getpeername() said {result['peer']} (after the transfers {result['peer_after']}), "
        f"the app dialled {dialled}")
    assert result["local"].startswith(f"{a.ip}:"), result
    for direction, reader in (("up", f"the server app in {dst}"), ("down", "the client app in a")):
        counts = result[direction]
        assert counts["bytes"] == TRANSFER and counts["corrupt_chunks"] == 0, (
            f"{bed.mode} {direction}: {reader} got {counts['bytes']} of {TRANSFER} bytes, "
            f"{counts['corrupt_chunks']} chunks differed from the stream sent, the first at offset "
            f"{counts['first_corrupt_offset']}", result)
        assert counts["readable"] > 10, result
        assert counts["zero_while_data"] == 0, (
            f"{bed.mode} {direction}: {reader} read FIONREAD 0 at {counts['zero_while_data']} of "
            f"{counts['readable']} readable moments where recv() returned data", result)

    # through both sidecars, with mTLS between them
    handshaken = bed.sidecar_tls_handshakes(dst)["inbound"] - handshakes
    assert handshaken > 0, ("no mTLS handshake: not through Envoy", result)
    # what the path did, for the record (pytest -rP; the kernel VMs' console with -s): how fast, how
    # many readable moments, and in ebpf mode what the agents spliced and whether a socket went bulk
    after = {n: bed.agent_metrics(n) for n in before}
    print(json.dumps({"mode": bed.mode, "dst": dst, "mib": TRANSFER >> 20, "tls_handshakes": handshaken,
                      **{f"{d}_mib_per_s": round((TRANSFER >> 20) / max(result[d]["seconds"], 1e-3), 1)
                         for d in ("up", "down")},
                      **{f"{d}_readable": result[d]["readable"] for d in ("up", "down")},
                      **{f"{n}_{short}": after[n].get(metric, 0) - before[n].get(metric, 0)
                         for n in before for short, metric in (("spliced_bytes", SPLICED), ("bulk_skips", BULK))}}))
    moved = bed.nat_counters("a")["ISTIO_REDIRECT"] - redirects
    if bed.mode == "ebpf":
        assert moved == 0, ("the connect hook did not take the connection: Istio's rule did", result)
        assert bed.agent_metrics(a.node).get(PEER_NAMES, 0) > shown, ("getpeername() was not answered by the "
                                                                        "agent's hook", result)
        if probes_allow_splicing():
            # the transfers took the splice, not only TCP, on each node (its leg of the connection)
            for n in before:
                assert after[n].get(SPLICED, 0) > before[n].get(SPLICED, 0), (n, "nothing spliced", result)
    else:
        assert moved == 1, ("Istio's rule did not take the connection", result)
