"""The agent's reconcile loop: pods (from any source) -> decision (policy.decide,
the same code `inspect-pod` prints) -> desired datapath entries -> kernel.

Sources call `Agent.update_pods()` with the full set of pods on this node; a
single thread applies the difference. A pod that cannot be accelerated is
left to Istio's iptables rules (the safe fallback) and its reason is kept for
`merbridge-py status` and the metrics.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ..mesh import MeshProfile
from ..netns import NetnsIndex
from ..policy import Verdict, compile_rules, decide

log = logging.getLogger("merbridge_py.agent")

RETRY_INTERVAL = 0.5   # how soon a pod whose namespace is not visible yet is tried again


@dataclass(frozen=True)
class Applied:
    """What the kernel holds for one pod."""

    netns_cookie: int
    ip: str
    outbound: tuple
    inbound: tuple


@dataclass
class PodStatus:
    pod: str
    accelerated: bool
    reason: str
    ip: str | None = None
    pending: bool = False   # waiting for its network namespace to appear
    code: str = "accelerated"  # short reason code: a metrics label

    def to_json(self) -> dict:
        return {"pod": self.pod, "accelerated": self.accelerated, "reason": self.reason,
                "ip": self.ip, "pending": self.pending}


class Agent:
    def __init__(self, datapath, mesh: MeshProfile, netns_index: NetnsIndex | None = None, metrics=None,
                 on_decision_change: Callable[[dict, PodStatus], None] | None = None):
        self.datapath = datapath
        self.mesh = mesh
        self.netns = netns_index or NetnsIndex()
        self.metrics = metrics
        # Called as on_decision_change(pod, status) on the reconcile thread when a pod's
        # decision (accelerated, reason) changes; it must not block (events.py only queues).
        self.on_decision_change = on_decision_change
        self._pods: dict[str, dict] | None = None
        self._applied: dict[str, Applied] = {}
        self._status: dict[str, PodStatus] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.ready = threading.Event()   # every pod of a synced source has been processed once

    # --- inputs ----------------------------------------------------------------------

    def update_pods(self, pods: dict[str, dict]) -> None:
        with self._lock:
            self._pods = dict(pods)
        self._wake.set()

    # --- outputs --------------------------------------------------------------------

    def status(self) -> list[dict]:
        with self._lock:
            return [s.to_json() for s in sorted(self._status.values(), key=lambda s: s.pod)]

    # --- the loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.wait(RETRY_INTERVAL)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                self.reconcile_once()
            except Exception:
                log.exception("reconcile failed; retrying")
                if self.metrics:
                    self.metrics.datapath_errors.inc()

    def reconcile_once(self) -> None:
        with self._lock:
            pods = self._pods
        if pods is None:
            return  # no source has delivered yet
        verdicts, objects = {}, {}
        for key, pod in pods.items():
            v = decide(pod, self.mesh)
            verdicts[v.pod if v.pod else key] = v
            objects[v.pod if v.pod else key] = pod

        for key in list(self._applied):
            v = verdicts.get(key)
            if v is None or not v.accelerate:
                self._remove(key, "pod deleted" if v is None else v.reason)

        wanted = {k: v for k, v in verdicts.items() if v.accelerate}
        missing = [v for k, v in wanted.items() if not self._in_place(k, v)]
        if missing:
            self.netns.refresh()
        new_status: dict[str, PodStatus] = {}
        for key, v in verdicts.items():
            if not v.accelerate:
                new_status[key] = PodStatus(key, False, v.reason, v.ips[0] if v.ips else None, code=v.code)
                continue
            new_status[key] = self._apply(key, v)
        with self._lock:
            old = self._status
            self._status = new_status
        self._log_changes(old, new_status, objects)
        if self.metrics:
            self.metrics.observe_pods(new_status.values())
        if not self.ready.is_set():
            self._sweep_taken_over_maps()
        self.ready.set()

    def _sweep_taken_over_maps(self) -> None:
        """After taking over a previous agent's maps: drop the pods it knew
        that are gone now (deleted while no agent was running)."""
        if not getattr(self.datapath, "adopted_maps", False):
            return
        ours = {a.netns_cookie for a in self._applied.values()}
        for cookie, ip in self.datapath.pod_entries():
            if cookie not in ours:
                self.datapath.remove_pod(cookie, ip)
                log.info("removed pod %s left in the maps by a previous agent", ip)

    def _in_place(self, key: str, v: Verdict) -> bool:
        cur = self._applied.get(key)
        if cur is None or cur.ip != v.ips[0]:
            return False
        outbound, inbound = compile_rules(v.policy, self.mesh)
        return cur.outbound == tuple(outbound) and cur.inbound == tuple(inbound)

    def _apply(self, key: str, v: Verdict) -> PodStatus:
        ip = v.ips[0]
        outbound, inbound = compile_rules(v.policy, self.mesh)
        cur = self._applied.get(key)
        ns = self.netns.lookup(ip)
        if ns is None:
            owners = self.netns.owners(ip)
            if cur is not None:
                # keep what works; the namespace index may just be catching up
                return PodStatus(key, True, v.reason, ip)
            if len(owners) > 1:
                return PodStatus(key, False, f"not accelerated: IP {ip} is in {len(owners)} network namespaces; "
                                             "cannot tell which is the pod's", ip, code="ambiguous_netns")
            return PodStatus(key, False, f"not accelerated yet: no network namespace has IP {ip} "
                                         "(will retry; the pod stays on iptables meanwhile)", ip, pending=True,
                             code="netns_not_found")
        new = Applied(ns.cookie, ip, tuple(outbound), tuple(inbound))
        if cur != new:
            if cur is not None and (cur.netns_cookie != new.netns_cookie or cur.ip != new.ip):
                self.datapath.remove_pod(cur.netns_cookie, cur.ip)
            self.datapath.set_pod(new.netns_cookie, ip, outbound, inbound)
            self._applied[key] = new
        return PodStatus(key, True, v.reason, ip)

    def _remove(self, key: str, why: str) -> None:
        cur = self._applied.pop(key)
        self.datapath.remove_pod(cur.netns_cookie, cur.ip)
        log.info("pod %s removed from the datapath: %s", key, why)

    def remove_all(self) -> None:
        for key in list(self._applied):
            self._remove(key, "agent stopping")

    def _log_changes(self, old: dict[str, PodStatus], new: dict[str, PodStatus], pods: dict[str, dict]) -> None:
        for key, s in new.items():
            before = old.get(key)
            if before is None or (before.accelerated, before.reason) != (s.accelerated, s.reason):
                log.info("pod %s: %s", key, s.reason)
                if self.on_decision_change is not None:
                    try:
                        self.on_decision_change(pods.get(key), s)
                    except Exception:  # noqa: BLE001 - reporting must never stop the datapath's updates
                        log.exception("reporting the decision for pod %s failed", key)
        for key in old.keys() - new.keys():
            log.info("pod %s: gone", key)
