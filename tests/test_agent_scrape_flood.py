"""Issue 18, "endpoints that cannot be starved": the agent running with its
per-connection maps holding ENTRIES entries each, SCRAPERS parallel scrapers
fetch /metrics back to back for FLOOD_SECONDS from one process while another
probes /healthz and /readyz as a kubelet would (1 s timeout) every
PROBE_INTERVAL (the scrapers run at nice 19: on a node they would be other
machines, not the node's own CPU). No probe may fail, /healthz's p99 must stay under 100 ms,
/metrics must still be served (and show the entries), and the agent is the
same process at the end.

The maps are filled the cheapest honest way: entries written straight into
the pinned connect_original_dst and original_dst maps (the LRU maps the
connect hook fills, 65,536 entries at most), with socket cookies and
addresses (198.18.0.0/15, the benchmarking range) no real connection has.
The per-pod maps cannot hold that many (MAX_PODS is 1,024). The agent walks
every map it reports in merbridge_map_entries, so these entries cost it the
same as real connections would.

A quick run: MERBRIDGE_SCRAPE_FLOOD_SECONDS=10 MERBRIDGE_SCRAPE_FLOOD_ENTRIES=20000.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from merbridge_py import bpf_syscall, layout

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
FLOOD = str(HERE / "helpers" / "scrape_flood.py")
ENTRIES = int(os.environ.get("MERBRIDGE_SCRAPE_FLOOD_ENTRIES", "60000"))
FLOOD_SECONDS = float(os.environ.get("MERBRIDGE_SCRAPE_FLOOD_SECONDS", "60"))
SCRAPERS = int(os.environ.get("MERBRIDGE_SCRAPE_FLOOD_SCRAPERS", "32"))
PROBE_INTERVAL = 0.1
P99_LIMIT = 0.100
FILLED_MAPS = ("connect_original_dst", "original_dst")
COOKIE_BASE = 1 << 62   # socket cookies count up from 1: none comes near this


@pytest.fixture
def node(tmp_path):
    from helpers.node import SimNode
    n = SimNode(tmp_path)
    try:
        n.write_pods_file()   # no pods: the maps below are what the agent walks
        yield n
    finally:
        n.close()


def fill_maps(node, n: int) -> None:
    maps_dir, = node.bpffs.glob("maps-*")
    maps = {name: bpf_syscall.Map.open(maps_dir / name, *layout.MAPS[name]) for name in FILLED_MAPS}
    try:
        server = layout.Addr.of("198.18.0.1")
        for i in range(n):
            value = layout.OriginalDst(ip=server, port=8080)
            maps["connect_original_dst"].update(COOKIE_BASE + i, value)
            client = layout.Addr.of(f"198.19.{i // 256}.{i % 256}")
            maps["original_dst"].update(layout.SockTuple(local_ip=client, remote_ip=server, local_port=40000,
                                                         remote_port=15001), value)
    finally:
        for m in maps.values():
            m.close()


def map_entries(node) -> dict[str, int]:
    return {m: int(float(v)) for m, v in re.findall(r'^merbridge_map_entries\{map="(\w+)"\} (\S+)$',
                                                     node.agent_get("/metrics"), re.M)}


def gauge(node, name: str) -> float:
    """NaN when absent (an agent before the census had none; the test also runs against it)."""
    m = re.search(rf"^{name} (\S+)$", node.agent_get("/metrics"), re.M)
    return float(m.group(1)) if m else float("nan")


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def test_a_scrape_flood_with_full_maps_never_starves_the_probes(node):
    node.start_agent()
    pid = node.agent.pid
    fill_maps(node, ENTRIES)
    deadline = time.monotonic() + 60   # the map census runs in the background: wait for one that saw them
    while any(map_entries(node).get(m, 0) < ENTRIES for m in FILLED_MAPS):
        assert time.monotonic() < deadline, map_entries(node)
        time.sleep(0.5)
    walk, age = gauge(node, "merbridge_map_census_seconds"), gauge(node, "merbridge_map_entries_age_seconds")
    print(f"\nthe census walks {ENTRIES} entries in each of {', '.join(FILLED_MAPS)} (and the other maps) in "
          f"{walk * 1000:.0f} ms; the count a scrape serves is {age:.1f} s old")
    port = str(node.agent_port)
    agent = psutil.Process(pid)
    cpu_before = agent.cpu_times()
    # At the lowest priority: a real flood comes over the network from other
    # machines, while here it shares the node's two cores with the agent and
    # the prober; the agent still has to take and answer every request.
    flood = subprocess.Popen([sys.executable, FLOOD, "flood", "127.0.0.1", port, str(SCRAPERS), str(FLOOD_SECONDS)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(19))
    prober = subprocess.Popen([sys.executable, FLOOD, "probe", "127.0.0.1", port, str(FLOOD_SECONDS),
                               str(PROBE_INTERVAL)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        probe_out, probe_err = prober.communicate(timeout=FLOOD_SECONDS + 120)
        flood_out, flood_err = flood.communicate(timeout=FLOOD_SECONDS + 120)
    finally:
        for p in (prober, flood):
            if p.poll() is None:
                p.kill()
                p.wait()
    cpu = sum(agent.cpu_times()[:2]) - sum(cpu_before[:2])   # user + system, all threads
    assert prober.returncode == 0, probe_err
    assert flood.returncode == 0, flood_err
    probes, scrapes = json.loads(probe_out), json.loads(flood_out)
    healthz = probes["latencies"]["/healthz"]
    readyz = probes["latencies"]["/readyz"]
    tried = probes["attempts"]["/healthz"]   # every /healthz probe, a failed one with its time to failure
    print(f"\n{ENTRIES} entries in each of {', '.join(FILLED_MAPS)}; {SCRAPERS} scrapers for {FLOOD_SECONDS:.0f} s: "
          f"/metrics answers {scrapes['codes']}, connection errors {scrapes['errors']}; "
          f"/healthz {len(tried)} probes, {len(healthz)} answered: p50 {statistics.median(tried) * 1000:.1f} ms, "
          f"p99 {p99(tried) * 1000:.1f} ms, max {max(tried) * 1000:.1f} ms (a failure counts as its time to "
          f"failure); /readyz {len(readyz)} answered, max {max(readyz, default=0) * 1000:.1f} ms; "
          f"failed probes {len(probes['failures'])} {probes['failures'][:5]}; the agent used "
          f"{cpu / FLOOD_SECONDS:.0%} of a core; load average {os.getloadavg()[0]:.1f}")
    assert node.agent.poll() is None and node.agent.pid == pid, "the agent exited during the flood"
    assert probes["failures"] == [], probes["failures"][:20]
    expected = FLOOD_SECONDS / PROBE_INTERVAL / 2
    assert len(healthz) > expected / 2, f"only {len(healthz)} /healthz answers in {FLOOD_SECONDS:.0f} s"
    assert p99(tried) < P99_LIMIT, f"/healthz p99 {p99(tried) * 1000:.1f} ms"
    # /metrics kept being served, with the entries in it (the flood may be turned away in part, not all of it)
    assert scrapes["codes"].get("200", 0) >= FLOOD_SECONDS, scrapes
    assert scrapes["largest_map_entries"] >= ENTRIES, scrapes
    assert set(scrapes["codes"]) <= {"200", "503"}, scrapes
