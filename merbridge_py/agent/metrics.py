"""Prometheus metrics of the agent. Datapath counters are counted in the
kernel where the event happens (a per-CPU array) and read at scrape time."""

from __future__ import annotations

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
}
_HELP = {
    "merbridge_redirects": "Connections redirected by the connect hook",
    "merbridge_original_dst_queries": "getsockopt(SO_ORIGINAL_DST) calls seen, by result",
    "merbridge_spliced_messages": "Messages handed socket-to-socket by sk_msg",
    "merbridge_spliced_bytes": "Bytes handed socket-to-socket by sk_msg",
    "merbridge_splice_misses": "Messages of spliced sockets whose peer was not in the sockhash (sent via TCP)",
    "merbridge_sockhash_inserts": "Sockets put into the sockhash",
    "merbridge_datapath_errors": "Errors in the kernel datapath, by kind",
    "merbridge_splice_skipped": "Sockets not spliced (short-lived destination) or switched back to TCP (bulk sender)",
    "merbridge_peer_names_shown": "getpeername() calls on rewritten connections answered with the original destination",
}


class AgentMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.datapath = None
        self.source = None
        self.kernel = None     # kernel_probes.KernelBehaviour, probed once at start
        self._pods: list = []
        self.reconcile_errors = Counter("merbridge_reconcile_errors", "Failed reconcile passes (retried)",
                                        registry=self.registry)
        self.datapath_errors = self.reconcile_errors
        self.attached = Gauge("merbridge_datapath_attached", "1 while the eBPF programs are attached",
                              registry=self.registry)
        self.mode = Gauge("merbridge_mode", "1 for the datapath's current mode", ["mode"], registry=self.registry)
        self.registry.register(self)

    def set_mode(self, mode: str) -> None:
        for m in ("ebpf", "iptables"):
            self.mode.labels(m).set(1 if m == mode else 0)

    def observe_pods(self, statuses) -> None:
        self._pods = list(statuses)

    def collect(self):
        accelerated = GaugeMetricFamily("merbridge_pods_accelerated", "Pods on this node served by eBPF")
        accelerated.add_metric([], sum(1 for s in self._pods if s.accelerated))
        yield accelerated
        skipped = GaugeMetricFamily("merbridge_pods_skipped", "Pods left on iptables, by reason", labels=["reason"])
        by_reason: dict[str, int] = {}
        for s in self._pods:
            if not s.accelerated:
                by_reason[s.code] = by_reason.get(s.code, 0) + 1
        for cat, n in sorted(by_reason.items()):
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
        occupancy = GaugeMetricFamily("merbridge_map_entries", "Entries in each datapath map", labels=["map"])
        for name, n in dp.map_sizes().items():
            occupancy.add_metric([name], n)
        yield occupancy


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
