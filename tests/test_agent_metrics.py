"""merbridge_py/agent/metrics.py: a scrape costs the same whatever the map
sizes. The map walk (merbridge_map_entries) happens in the census thread,
never in a scrape; scrapes serve its latest count and its age."""

from __future__ import annotations

import re
import threading
import time

from prometheus_client import generate_latest

from merbridge_py.agent import metrics as metrics_module
from merbridge_py.agent.metrics import AgentMetrics
from merbridge_py.layout import Counter as Slot


class CountingDatapath:
    """Counts map walks; maps of `entries` entries each."""

    def __init__(self, entries: int):
        self.bpf = object()
        self.entries = entries
        self.walks = 0

    def counters(self):
        return {slot.name.lower(): 0 for slot in Slot}

    def dns_counters(self):
        return {"dns_redirected": 0}

    def map_sizes(self):
        self.walks += 1
        return {"connect_original_dst": self.entries, "sock_pairs": 2}


def sample(text: bytes, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text.decode(), re.M)
    return float(m.group(1)) if m else None


def test_scrapes_never_walk_the_maps_and_say_how_old_the_census_is():
    metrics, dp = AgentMetrics(), CountingDatapath(60000)
    metrics.datapath = dp
    before = generate_latest(metrics.registry)
    assert sample(before, "merbridge_map_entries", '{map="connect_original_dst"}') is None   # no census yet
    assert sample(before, "merbridge_redirects_total", '{direction="outbound"}') == 0
    metrics.take_map_census()
    assert dp.walks == 1
    time.sleep(0.2)
    for _ in range(50):
        text = generate_latest(metrics.registry)
    assert dp.walks == 1, "a scrape walked the maps"
    assert sample(text, "merbridge_map_entries", '{map="connect_original_dst"}') == 60000
    assert sample(text, "merbridge_map_entries", '{map="sock_pairs"}') == 2
    assert 0.2 <= sample(text, "merbridge_map_entries_age_seconds") < 30
    assert sample(text, "merbridge_map_census_seconds") is not None


def test_the_census_thread_repeats_and_stops(monkeypatch):
    monkeypatch.setattr(metrics_module, "MAP_CENSUS_MIN_INTERVAL", 0.05)
    metrics, dp = AgentMetrics(), CountingDatapath(10)
    metrics.datapath = dp
    stop = threading.Event()
    census = threading.Thread(target=metrics.run_map_census, args=(stop,))
    census.start()
    try:
        deadline = time.monotonic() + 10
        while dp.walks < 3:
            assert time.monotonic() < deadline, "the census did not repeat"
            time.sleep(0.01)
        dp.entries = 11
        deadline = time.monotonic() + 10
        while metrics.map_census.entries["connect_original_dst"] != 11:
            assert time.monotonic() < deadline, "a change in the maps never reached the census"
            time.sleep(0.01)
    finally:
        stop.set()
        census.join(5)
    assert not census.is_alive()


def test_a_failing_walk_keeps_the_census_thread_alive(monkeypatch):
    monkeypatch.setattr(metrics_module, "MAP_CENSUS_MIN_INTERVAL", 0.05)
    metrics, dp = AgentMetrics(), CountingDatapath(5)
    metrics.datapath = dp
    failures = []

    def walk():
        if len(failures) < 2:
            failures.append(1)
            raise OSError(9, "Bad file descriptor")
        dp.walks += 1
        return {"connect_original_dst": 5}
    dp.map_sizes = walk
    stop = threading.Event()
    census = threading.Thread(target=metrics.run_map_census, args=(stop,))
    census.start()
    try:
        deadline = time.monotonic() + 10
        while metrics.map_census is None:
            assert time.monotonic() < deadline, "the census stopped after a failed walk"
            time.sleep(0.01)
    finally:
        stop.set()
        census.join(5)
    assert failures == [1, 1] and metrics.map_census.entries == {"connect_original_dst": 5}


def test_pod_counts_follow_the_latest_observed_pods():
    from merbridge_py.agent.core import PodStatus
    metrics = AgentMetrics()
    metrics.observe_pods([PodStatus("a", True, "accelerated"), PodStatus("b", False, "no sidecar", code="no_sidecar"),
                          PodStatus("c", False, "no sidecar", code="no_sidecar")])
    text = generate_latest(metrics.registry)
    assert sample(text, "merbridge_pods_accelerated") == 1
    assert sample(text, "merbridge_pods_skipped", '{reason="no_sidecar"}') == 2
    metrics.observe_pods([PodStatus("a", True, "accelerated")])
    text = generate_latest(metrics.registry)
    assert sample(text, "merbridge_pods_accelerated") == 1
    assert sample(text, "merbridge_pods_skipped", '{reason="no_sidecar"}') is None


def test_every_kernel_counter_slot_is_exported_and_splice_skips_say_why():
    """A slot added to enum counter without a metric would be counted and never seen."""
    assert set(metrics_module._KERNEL_COUNTERS) == set(Slot)
    metrics, dp = AgentMetrics(), CountingDatapath(0)
    counted = {slot: 10 + slot.value for slot in Slot}
    dp.counters = lambda: {slot.name.lower(): n for slot, n in counted.items()}
    metrics.datapath = dp
    text = generate_latest(metrics.registry)
    # sockets another program's sockmap holds (-EBUSY; ebpf/sockops.bpf.c)
    assert sample(text, "merbridge_splice_skipped_total", '{reason="busy"}') == counted[Slot.SPLICE_BUSY]
    assert sample(text, "merbridge_splice_skipped_total", '{reason="short_lived"}') == counted[Slot.SPLICE_SKIPPED]
    assert sample(text, "merbridge_splice_skipped_total", '{reason="bulk"}') == counted[Slot.SPLICE_BULK]
    assert sample(text, "merbridge_datapath_errors_total", '{kind="sockhash_insert"}') == \
        counted[Slot.ERR_SOCKHASH_INSERT]
