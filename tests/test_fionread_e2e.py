"""FIONREAD through the eBPF path, as an app sees it (issue 20): a Python app
checks ioctl(FIONREAD) at every moment select() says its socket is readable,
and FIONREAD must never be 0 while recv() returns data. Through Envoy
sidecars in ebpf mode, same-node and cross-node, uploads and downloads large
enough to trip bulk detection (its threshold lowered for the test through
MERBRIDGE_BULK_BYTES, so every path a socket can take is reached: redirected,
then fallen back to TCP). Whatever this kernel does, the agent's splice mode
(picked from the kernel probes) must keep FIONREAD right.

Topology: node0: a, b; node1: d (all meshed). The app listens on a port no
pod declares, so the sidecars pass it through as plain TCP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers.splicing import probes_allow_splicing
from merbridge_py import kernel_probes
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

APP = Path(__file__).parent / "helpers" / "fionread_app.py"
PORT = 9300
BULK_BYTES = 1 << 20          # bulk detection trips after 1 MiB within its window
TRANSFER = 24 << 20           # each way, per exchange
SPECS = [PodSpec("a", node=0), PodSpec("b", node=0), PodSpec("d", node=1)]
BULK = 'merbridge_splice_skipped_total{reason="bulk"}'
SPLICED = "merbridge_spliced_bytes_total"


@pytest.fixture(scope="module")
def bed():
    saved = os.environ.get("MERBRIDGE_BULK_BYTES")
    os.environ["MERBRIDGE_BULK_BYTES"] = str(BULK_BYTES)   # the agents inherit it
    servers = []
    try:
        with Testbed.up(f"fr{os.getpid() % 10000}{uuid.uuid4().hex[:3]}", nodes=2, pods=SPECS, mode="ebpf",
                        mtls="permissive") as tb:
            for pod in ("b", "d"):
                proc = tb.exec(pod, [sys.executable, str(APP), "serve", "--port", str(PORT)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                servers.append(proc)
                assert proc.stdout.readline().strip() == "ready"
            yield tb
            for proc in servers:
                proc.kill()
                proc.wait()
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if saved is None:
            os.environ.pop("MERBRIDGE_BULK_BYTES", None)
        else:
            os.environ["MERBRIDGE_BULK_BYTES"] = saved


def exchange(tb: Testbed, src: str, dst: str) -> dict:
    done = tb.exec_in(src, [sys.executable, str(APP), "client", "--host", tb.pod(dst).ip, "--port", str(PORT),
                            "--up", str(TRANSFER), "--down", str(TRANSFER)], timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_agents_picked_the_probed_splice_mode(bed):
    probed = kernel_probes.probe_kernel()   # the same probes, run here
    for node in ("node0", "node1"):
        m = bed.agent_metrics(node)
        assert m[f'merbridge_splice_mode{{mode="{probed.splice_mode}"}}'] == 1
        for p in probed.probes:
            assert m[f'merbridge_kernel_probe{{probe="{p.probe}",result="{p.result}"}}'] == 1


@pytest.mark.parametrize("dst,nodes", [("b", ("node0",)), ("d", ("node0", "node1"))], ids=["same-node", "cross-node"])
def test_fionread_never_zero_while_recv_returns_data(bed, dst, nodes):
    before = {n: bed.agent_metrics(n) for n in nodes}
    result = exchange(bed, "a", dst)
    after = {n: bed.agent_metrics(n) for n in nodes}
    for direction in ("up", "down"):
        counts = result[direction]
        assert counts["bytes"] == TRANSFER and counts["corrupt_chunks"] == 0, result
        assert counts["readable"] > 10, result
        assert counts["zero_while_data"] == 0, (f"{direction}: FIONREAD was 0 at {counts['zero_while_data']} of "
                                                f"{counts['readable']} readable moments", result)
    if probes_allow_splicing():
        # the transfers took both paths a spliced socket can take: redirected, then TCP after bulk detection
        for n in nodes:
            assert after[n].get(BULK, 0) > before[n].get(BULK, 0), (n, "no socket went bulk")
            assert after[n].get(SPLICED, 0) > before[n].get(SPLICED, 0), (n, "nothing was spliced")
