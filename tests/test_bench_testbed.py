"""A tiny benchmark on the real test bed, end to end through the command:
every load in every mode, results.json valid against its schema, the report
and plots written, nothing left behind."""

import json
import os
import uuid

import pytest
from click.testing import CliRunner

from merbridge_py import sandbox
from merbridge_py.bench import schema
from merbridge_py.bench.cli import bench

pytestmark = [pytest.mark.bpf, pytest.mark.slow]


def test_tiny_bench_on_the_test_bed(tmp_path):
    name = f"bt{os.getpid()}{uuid.uuid4().hex[:4]}"
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, [
        "--rounds", "1", "--duration", "1", "--warmup", "0", "--modes", "nomesh,iptables,ebpf",
        "--loads", "keepalive:2 newconn:2 tcp_rr bulk", "--paths", "same-node",
        "--name", name, "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    doc = json.loads((out / "results.json").read_text())
    schema.validate(doc)
    failed = [(r["mode"], r["load"], r["error"]) for r in doc["rounds"] if not r["ok"]]
    assert not failed
    assert len(doc["rounds"]) == 3 * 4
    for r in doc["rounds"]:
        # the sidecars carry the traffic where the mesh is on, and only there
        if r["mode"] == "nomesh":
            assert r["cpu_us"]["sidecars"] == 0, r
        else:
            assert r["cpu_us"]["sidecars"] > 0, r
        assert r["cpu_us"]["client"] > 0 and r["cpu_us"]["apps"] > 0, r
        # node agents run in ebpf mode only; their CPU is counted there
        assert (r["mode"] == "ebpf") or r["cpu_us"]["agents"] == 0, r
        if r["load"] == "bulk":
            assert r["throughput_bps"] > 0
        else:
            assert r["rps"] > 0 and 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"]
    assert {(e["load"], e["mode"]) for e in doc["summary"]} == {
        (load, mode) for load in ("keepalive", "newconn", "tcp_rr", "bulk") for mode in ("nomesh", "iptables", "ebpf")}
    assert len(doc["ratios"]) == 4
    assert doc["machine"]["tools"]["wrk"] and doc["config"]["settle_how"]
    assert doc["config"]["sidecar"] == "http"    # the default: Envoy-like pooling on the HTTP port

    md = (out / "results.md").read_text()
    assert "## Targets" in md and "| same-node | tcp_rr | 1 | ebpf |" in md
    assert "- Sidecars: HAProxy proxies port 8080 as HTTP" in md
    for png in ("latency.png", "rps.png", "throughput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| path | load | conns | mode |" in result.output      # the table is printed at the end

    # the bench brought its own test bed up and took it down again
    assert not [ns for ns in sandbox.netns_list() if ns.startswith(f"{sandbox.OWNED_PREFIX}{name}-")]
    assert not (sandbox.cgroup2_root() / f"{sandbox.OWNED_PREFIX}{name}").exists()
