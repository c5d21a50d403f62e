"""Prometheus metrics of the agent. Datapath counters are counted in the
kernel where the event happens (a per-CPU array) and read at scrape time.

A scrape costs the same whatever the map sizes (the network port is
unauthenticated: a scrape flood must not be able to make the agent walk maps
of 65,536 entries over and over). Everything read at scrape time is O(1): the
agent's own bookkeeping, and per-CPU counter arrays of fixed size. Map
occupancy (merbridge_map_entries) takes a walk of every key, so a background
thread (run_map_census) counts it, walking at most MAP_CENSUS_DUTY of the
time and no more often than every MAP_CENSUS_MIN_INTERVAL; scrapes serve its
latest count and say how old it is (merbridge_map_entries_age_seconds).

Adding a metric: a Counter or Gauge made in AgentMetrics.__init__, or a
family yielded by collect(). Whatever a scrape reads must be O(1); anything
that walks a map belongs in take_map_census (or a thread like it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..layout import Counter as Slot

# kernel counter slot -> (metric, labels)
_KERNEL_COUNTERS = {
    Slot.REDIRECT_OUTBOUND: ("merbridge_redirects", {"direction": "outbound"}),
    Slot.REDIRECT_INBOUND: ("merbridge_redirects", {"direction": "inbound"}),
    Slot.ORIGINAL_DST_ANSWERED: ("merbridge_original_dst_queries", {"result": "answered"}),
    Slot.ORIGINAL_DST_MISS: ("merbridge_original_dst_queries", {"result": "miss"}),
    Slot.ORIGINAL_DST_REFUSED: ("merbridge_original_dst_queries", {"result": "refused"}),
    Slot.SPLICE_MSGS: ("merbridge_spliced_messages", {}),
    Slot.SPLICE_BYTES: ("merbridge_spliced_bytes", {}),
    Slot.SPLICE_MISS: ("merbridge_splice_misses", {}),
    Slot.SOCKHASH_INSERT: ("merbridge_sockhash_inserts", {}),
    Slot.ERR_SOCKHASH_INSERT: ("merbridge_datapath_errors", {"kind": "sockhash_insert"}),
    Slot.ERR_BIND: ("merbridge_datapath_errors", {"kind": "bind"}),
    Slot.ERR_MAP_UPDATE: ("merbridge_datapath_errors", {"kind": "map_update"}),
    Slot.SPLICE_SKIPPED: ("merbridge_splice_skipped", {"reason": "short_lived"}),
    Slot.SPLICE_BULK: ("merbridge_splice_skipped", {"reason": "bulk"}),
    Slot.PEER_NAME: ("merbridge_peer_names_shown", {}),
    Slot.SPLICE_BUSY: ("merbridge_splice_skipped", {"reason": "busy"}),
    Slot.SPLICE_BACKPRESSURE: ("merbridge_splice_skipped", {"reason": "backpressure"}),
}
_HELP = {
    "merbridge_redirects": "Connections redirected by the connect hook",
    "merbridge_original_dst_queries": "getsockopt(SO_ORIGINAL_DST) calls seen, by result",
    "merbridge_spliced_messages": "Messages handed socket-to-socket by sk_msg",
    "merbridge_spliced_bytes": "Bytes handed socket-to-socket by sk_msg",
    "merbridge_splice_misses": "Spliced sockets whose peer was not in the sockhash: they send through TCP from then on",
    "merbridge_sockhash_inserts": "Sockets put into the sockhash",
    "merbridge_datapath_errors": "Errors in the kernel datapath, by kind",
    "merbridge_splice_skipped": "Sockets not spliced (short: the destination's recent connections carried few "
                                "messages; busy: another program's sockmap holds the socket) or switched back to "
                                "TCP (bulk sender, or backpressure: its peer held too many unread bytes)",
    "merbridge_peer_names_shown": "getpeername() calls on rewritten connections answered with the original destination",
}

log = logging.getLogger("merbridge_py.metrics")

MAP_CENSUS_MIN_INTERVAL = 1.0   # seconds between two census starts when walks are quick
# Share of the time the census may spend walking. Measured: 2 x 60,000 entries
# took 1.2-5.5 s to walk on a loaded 2-core machine, so a count ~25-110 s old.
MAP_CENSUS_DUTY = 0.05


class MapCensus(NamedTuple):
    entries: dict[str, int]    # map name -> entries
    taken_at: float            # time.monotonic() when the walk ended
    seconds: float             # how long the walk took


class AgentMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.datapath = None
        self.source = None
        self.kernel = None     # kernel_probes.KernelBehaviour, probed once at start
        self._pod_counts: tuple[int, dict[str, int]] = (0, {})   # (accelerated, skipped by reason code)
        self.reconcile_errors = Counter("merbridge_reconcile_errors", "Failed reconcile passes (retried)",
                                        registry=self.registry)
        self.datapath_errors = self.reconcile_errors
        self.attached = Gauge("merbridge_datapath_attached", "1 while the eBPF programs are attached",
                              registry=self.registry)
        self.mode = Gauge("merbridge_mode", "1 for the datapath's current mode", ["mode"], registry=self.registry)
        self.requests_rejected = Counter("merbridge_requests_rejected", "Requests on the network port turned away "
                                         "with 503 because as many were already being answered (a scrape flood)",
                                         ["path"], registry=self.registry)
        self.map_census: MapCensus | None = None   # the latest, replaced whole by the census thread
        self.registry.register(self)

    def set_mode(self, mode: str) -> None:
        for m in ("ebpf", "iptables"):
            self.mode.labels(m).set(1 if m == mode else 0)

    def observe_pods(self, statuses) -> None:
        """Counted here, once per change, so a scrape reads the counts only."""
        pods = list(statuses)
        skipped: dict[str, int] = {}
        for s in pods:
            if not s.accelerated:
                skipped[s.code] = skipped.get(s.code, 0) + 1
        self._pod_counts = (sum(1 for s in pods if s.accelerated), dict(sorted(skipped.items())))

    def count_rejected(self, path: str) -> None:
        self.requests_rejected.labels(path).inc()

    def take_map_census(self) -> None:
        """Walk the datapath's maps once (O(entries)) and keep the count."""
        dp = self.datapath
        if dp is None or dp.bpf is None:
            return
        started = time.monotonic()
        entries = dp.map_sizes()
        ended = time.monotonic()
        self.map_census = MapCensus(entries, ended, ended - started)

    def run_map_census(self, stop: threading.Event) -> None:
        """The census thread: a walk now, then again after a pause long enough
        that walking takes at most MAP_CENSUS_DUTY of the time, until `stop`."""
        while not stop.is_set():
            try:
                self.take_map_census()
            except Exception as e:   # e.g. the datapath closed under the walk; the next census retries
                log.warning("counting map entries failed: %s", e)
            took = self.map_census.seconds if self.map_census else 0.0
            stop.wait(max(MAP_CENSUS_MIN_INTERVAL, took / MAP_CENSUS_DUTY - took))

    def collect(self):
        n_accelerated, by_reason = self._pod_counts
        accelerated = GaugeMetricFamily("merbridge_pods_accelerated", "Pods on this node served by eBPF")
        accelerated.add_metric([], n_accelerated)
        yield accelerated
        skipped = GaugeMetricFamily("merbridge_pods_skipped", "Pods left on iptables, by reason", labels=["reason"])
        for cat, n in by_reason.items():
            skipped.add_metric([cat], n)
        yield skipped
        restarts = CounterMetricFamily("merbridge_watch_restarts", "Times the pod watch was re-established")
        restarts.add_metric([], getattr(self.source, "watch_restarts", 0))
        yield restarts
        # A bad input never stops the source: it is refused, counted here, and the last good state kept.
        refused = CounterMetricFamily("merbridge_source_errors", "Inputs the pod source refused (bad pods "
                                      "file, malformed API object); the last good state was kept")
        refused.add_metric([], getattr(self.source, "errors", 0))
        yield refused
        failing = GaugeMetricFamily("merbridge_source_failing", "1 while the pod source's latest input is refused "
                                    "or its requests fail (see `merbridge-py status`)")
        failing.add_metric([], 1 if getattr(self.source, "last_error", None) else 0)
        yield failing
        if self.kernel is not None:
            yield from _kernel_families(self.kernel)
        dp = self.datapath
        if dp is None or dp.bpf is None:
            return
        families: dict[str, CounterMetricFamily] = {}
        values = dp.counters()
        for slot, (name, labels) in _KERNEL_COUNTERS.items():
            fam = families.get(name)
            if fam is None:
                fam = families[name] = CounterMetricFamily(name, _HELP[name], labels=sorted(labels))
            fam.add_metric([labels[k] for k in sorted(labels)], values[slot.name.lower()])
        yield from families.values()
        dns = CounterMetricFamily("merbridge_dns_events", "DNS capture in the kernel, by event: lookups sent to "
                                  "the DNS proxy, replies and peers shown as the server, the proxy's own lookups "
                                  "left alone, errors", labels=["event"])
        for event, n in dp.dns_counters().items():
            dns.add_metric([event.removeprefix("dns_")], n)
        yield dns
        yield _backlog_tracing_family(dp)
        census = self.map_census   # None until the census thread's first walk
        if census is not None:
            occupancy = GaugeMetricFamily("merbridge_map_entries", "Entries in each datapath map, as of the latest "
                                          "census (see merbridge_map_entries_age_seconds)", labels=["map"])
            for name, n in census.entries.items():
                occupancy.add_metric([name], n)
            yield occupancy
            yield GaugeMetricFamily("merbridge_map_entries_age_seconds", "Seconds since the census behind "
                                    "merbridge_map_entries ended (maps are walked in the background, not per "
                                    "scrape)", value=round(time.monotonic() - census.taken_at, 3))
            yield GaugeMetricFamily("merbridge_map_census_seconds", "How long the latest walk of every datapath "
                                    "map took", value=round(census.seconds, 4))


BACKLOG_TRACING_STATES = ("attached", "not_attached", "not_needed", "unavailable")


def _backlog_tracing_family(dp):
    """Whether backpressure counts what readers take (datapath.READER_HOOKS);
    "unavailable": the agent's fallback (MERBRIDGE_BACKLOG_FALLBACK) instead:
    by default every spliced socket goes to TCP after the backlog limit;
    "not_needed": the node does not splice, or has no backlog limit
    (datapath.why_no_reader_hook), so nothing reads the counts."""
    state = getattr(dp, "backlog_tracing", "not attached").split(":")[0].replace(" ", "_")
    fam = GaugeMetricFamily("merbridge_backlog_tracing", "1 for the state of backpressure's reader-side "
                            "programs (unavailable: the agent falls back, by default every spliced socket goes to TCP "
                            "after the backlog limit; not_needed: the node does not splice or has no backlog limit; "
                            "`merbridge-py status` says which)", labels=["state"])
    for s in BACKLOG_TRACING_STATES:
        fam.add_metric([s], 1 if s == state else 0)
    return fam


def _kernel_families(kernel):
    """What the kernel probes found at start, and the splice mode picked from it."""
    from ..kernel_probes import SPLICE_MODES
    probes = GaugeMetricFamily("merbridge_kernel_probe", "Behaviour probes run at start (1 for each probe's result; "
                               "see `merbridge-py doctor`)", labels=["probe", "result"])
    for p in kernel.probes:
        probes.add_metric([p.probe, p.result], 1)
    yield probes
    mode = GaugeMetricFamily("merbridge_splice_mode", "1 for the splice mode picked from the kernel probes",
                             labels=["mode"])
    for m in SPLICE_MODES:
        mode.add_metric([m], 1 if m == kernel.splice_mode else 0)
    yield mode
