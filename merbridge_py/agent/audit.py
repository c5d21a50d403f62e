"""The periodic audit (issue 18, "status stays true"): the kernel's pod
entries compared with what the agent believes it wrote, each difference
repaired and counted. Agent.audit_once (core.py) does the comparing and the
repairs on the reconcile thread; this module holds what they are counted in.
A pod whose object changes is also checked for a new namespace at once (its
sandbox recreated): those moves are counted here too.

Kinds of difference:
  netns_changed  a pod's IP now lives in another network namespace (its
                 sandbox was recreated with the same IP): its entries move
  netns_gone     no namespace has the pod's IP any more: its entries go, and
                 the pod waits for its namespace like a new one
  missing        an entry the agent wrote is not in the kernel: written again
  changed        an entry the agent wrote holds something else: written again
  unknown        an entry of no pod of ours (left behind, or written by
                 someone else): deleted
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# Seconds between audits (merbridge-py run --audit-interval). Each one reads
# every network namespace again: about 0.07 s of CPU with 200 pods here.
DEFAULT_INTERVAL = 30.0
KINDS = ("netns_changed", "netns_gone", "missing", "changed", "unknown")


class AuditMetrics:
    """Plain counters: reading them costs the same whatever the map sizes."""

    def __init__(self, registry: CollectorRegistry | None):
        self.differences = Counter("merbridge_audit_differences", "Differences found between the kernel's pod "
                                   "entries and the agent's view, by kind, each repaired: by the periodic audit, "
                                   "or, for a pod whose object changed, at once",
                                   ["kind"], registry=registry)
        for kind in KINDS:
            self.differences.labels(kind)     # every kind shows, at 0 until found
        self.failures = Counter("merbridge_audit_failures", "Audits that could not read the maps or the "
                                "network namespaces (retried at the next interval)", registry=registry)
        self.last = Gauge("merbridge_audit_last_timestamp_seconds", "When the last complete audit ended (Unix "
                          "time)", registry=registry)

    def found(self, kind: str, n: int = 1) -> None:
        self.differences.labels(kind).inc(n)
