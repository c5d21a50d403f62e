"""The agent's reconcile loop: pods (from any source) -> decision (policy.decide,
the same code `inspect-pod` prints) -> desired datapath entries -> kernel.

Sources call `Agent.update_pods()` with the full set of pods on this node; a
single thread applies the difference. Work is proportional to what changed: a
pod is decided again only when its object changed, a pod whose network
namespace is not visible yet is looked up again with backoff, and a failure
while applying one pod gives that pod a reason and a retry while the others
proceed. A pod that cannot be accelerated is left to Istio's iptables rules
(the safe fallback) and its reason is kept for `merbridge-py status`, the
metrics and Events.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..mesh import MeshProfile
from ..netns import NetnsIndex
from ..policy import Verdict, compile_rules, decide
from ..policy import dns as dns_policy

log = logging.getLogger("merbridge_py.agent")

FIRST_RETRY = 0.2     # a pod whose namespace is not visible yet is looked up again after this...
MAX_RETRY = 5.0       # ...doubling up to this
IDLE_WAIT = 1.0       # longest sleep with nothing to do (a wake from a source cuts it short)


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
    pending: bool = False   # will be retried (namespace not visible yet, or applying failed)
    code: str = "accelerated"  # short reason code: a metrics label

    def to_json(self) -> dict:
        return {"pod": self.pod, "accelerated": self.accelerated, "reason": self.reason,
                "ip": self.ip, "pending": self.pending}


@dataclass
class _Tracked:
    """One pod as last seen by the loop."""

    obj: object
    verdict: Verdict
    rules: tuple = ((), ())        # compiled (outbound, inbound) of an accelerated verdict
    next_try: float = 0.0          # monotonic time of the next namespace lookup / apply attempt
    tries: int = 0
    status: PodStatus | None = None


def _same_object(old: object, new: object) -> bool:
    """Unchanged pod? The same resourceVersion (as the API server assigns it)
    or, without one (a pods file), equal content."""
    if old is new:
        return True
    try:
        rv_old, rv_new = old["metadata"]["resourceVersion"], new["metadata"]["resourceVersion"]
        if isinstance(rv_new, str) and rv_new and rv_old == rv_new:
            return True
    except (KeyError, TypeError, IndexError):
        pass
    try:
        return old == new
    except RecursionError:  # absurdly nested: decide again, decide() refuses it cheaply
        return False


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
        self.decisions = 0                     # decide() calls so far (work done, for tests and metrics)
        self._pods: dict[str, dict] | None = None
        self._changed = False
        self._tracked: dict[str, _Tracked] = {}
        self._applied: dict[str, Applied] = {}
        self._status: dict[str, PodStatus] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.ready = threading.Event()   # every pod of a synced source has been processed once

    # --- inputs ----------------------------------------------------------------------

    def update_pods(self, pods: dict[str, dict]) -> None:
        with self._lock:
            self._pods = dict(pods)
            self._changed = True
        self._wake.set()

    # --- outputs --------------------------------------------------------------------

    def status(self) -> list[dict]:
        with self._lock:
            return [s.to_json() for s in sorted(self._status.values(), key=lambda s: s.pod)]

    # --- the loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.wait(self._next_wait())
            self._wake.clear()
            if stop.is_set():
                break
            try:
                self.reconcile_once()
            except Exception:  # noqa: BLE001 - a bug here must not end the loop; each pass starts afresh
                log.exception("reconcile pass failed; retrying")
                if self.metrics:
                    self.metrics.reconcile_errors.inc()
                stop.wait(FIRST_RETRY)

    def _next_wait(self) -> float:
        due = [t.next_try for t in self._tracked.values() if t.status is not None and t.status.pending]
        if not due:
            return IDLE_WAIT
        return min(IDLE_WAIT, max(0.0, min(due) - time.monotonic()))

    def reconcile_once(self) -> None:
        with self._lock:
            pods, changed = self._pods, self._changed
            self._changed = False
        if pods is None:
            return  # no source has delivered yet
        if changed:
            self._decide_changed(pods)
        verdict_status = self._desired_status()
        self._remove_unwanted(verdict_status)
        now = time.monotonic()
        to_apply = [key for key, t in self._tracked.items()
                    if key not in verdict_status and not self._in_place(key, t) and t.next_try <= now]
        # Only pods new to the kernel need their namespace found; one scan serves them all.
        new_pods = [key for key in to_apply if key not in self._applied]
        scan_error = self._refresh_netns(new_pods) if new_pods else None
        for key in to_apply:
            verdict_status[key] = self._apply_isolated(key, self._tracked[key], scan_error, now)
        for key, t in self._tracked.items():
            if key in verdict_status:
                continue
            if key in self._applied and self._in_place(key, t):
                verdict_status[key] = PodStatus(key, True, t.verdict.reason, t.verdict.ips[0])
            else:   # waiting for its retry: keep what it said
                verdict_status[key] = t.status
        self._publish(verdict_status)
        if not self.ready.is_set():
            self._sweep_taken_over_maps()
        self.ready.set()

    # --- decision ---------------------------------------------------------------------

    def _decide_changed(self, pods: dict[str, dict]) -> None:
        for key in self._tracked.keys() - pods.keys():
            del self._tracked[key]
        for key, obj in pods.items():
            t = self._tracked.get(key)
            if t is not None and _same_object(t.obj, obj):
                continue
            verdict = decide(obj, self.mesh)
            self.decisions += 1
            rules = ((), ())
            if verdict.accelerate:
                outbound, inbound = compile_rules(verdict.policy, self.mesh)
                rules = (tuple(outbound), tuple(inbound))
            self._tracked[key] = _Tracked(obj, verdict, rules, status=t.status if t else None)

    def _desired_status(self) -> dict[str, PodStatus]:
        """Statuses settled by the decision alone: not accelerated, or an IP
        two pods claim (neither is accelerated: the kernel maps an IP to one
        namespace, and guessing could give one pod the other's policy)."""
        out: dict[str, PodStatus] = {}
        by_ip: dict[str, list[str]] = {}
        for key, t in self._tracked.items():
            v = t.verdict
            if not v.accelerate:
                out[key] = PodStatus(key, False, v.reason, v.ips[0] if v.ips else None, code=v.code)
            else:
                by_ip.setdefault(v.ips[0], []).append(key)
        for ip, keys in by_ip.items():
            if len(keys) < 2:
                continue
            for key in keys:
                others = ", ".join(k for k in sorted(keys) if k != key)
                out[key] = PodStatus(key, False, f"not accelerated: pod IP {ip} is also the IP of pod {others}; "
                                     "left to iptables until only one pod has it", ip, code="duplicate_ip")
        return out

    def _in_place(self, key: str, t: _Tracked) -> bool:
        cur = self._applied.get(key)
        return (cur is not None and cur.ip == t.verdict.ips[0]
                and (cur.outbound, cur.inbound) == t.rules
                and not (t.verdict.dns is not None and t.verdict.dns.pending))   # DNS servers still to read

    # --- kernel -------------------------------------------------------------------------

    def _remove_unwanted(self, refused: dict[str, PodStatus]) -> None:
        for key in list(self._applied):
            t = self._tracked.get(key)
            if t is None or key in refused:
                self._remove(key, "pod deleted" if t is None else refused[key].reason)
            elif self._applied[key].ip != t.verdict.ips[0]:
                # the IP moved: free the old one first, another pod may get it in this pass
                self._remove(key, f"IP changed to {t.verdict.ips[0]}")

    def _refresh_netns(self, keys: list[str]) -> str | None:
        """Rescan namespaces for the pods about to be applied; a first attempt
        only inspects new namespaces, a retry re-reads the known ones too (an
        IP can be added after the namespace appears). Returns the error, if
        the scan failed: those pods get it as their reason and a retry."""
        reread = any(self._tracked[k].tries > 0 for k in keys)
        try:
            self.netns.refresh(reread=reread)
        except Exception as e:  # noqa: BLE001 - a scan failure delays these pods, never the pass
            log.warning("scanning network namespaces failed: %s: %s", type(e).__name__, e)
            if self.metrics:
                self.metrics.reconcile_errors.inc()
            return f"{type(e).__name__}: {e}"
        return None

    def _apply_isolated(self, key: str, t: _Tracked, scan_error: str | None, now: float) -> PodStatus:
        ip = t.verdict.ips[0]
        try:
            if scan_error is not None and key not in self._applied:
                raise _Retry(f"scanning network namespaces failed ({scan_error})", "netns_scan_failed")
            status = self._apply(key, t)
        except _Retry as r:
            status = PodStatus(key, False, f"not accelerated yet: {r} (will retry; the pod stays on iptables "
                                           "meanwhile)", ip, pending=True, code=r.code)
        except Exception as e:  # noqa: BLE001 - one pod's failure must not stop the others
            log.warning("applying pod %s failed: %s: %s", key, type(e).__name__, e)
            failure = f"writing its datapath entries failed ({type(e).__name__}: {e}); will retry"
            if key in self._applied:   # a policy update failed: the kernel still serves the previous one
                status = PodStatus(key, True, f"accelerated with its previous policy: {failure}", ip,
                                   pending=True, code="update_failed")
            else:
                status = PodStatus(key, False, f"not accelerated yet: {failure}", ip, pending=True,
                                   code="apply_failed")
        if status.pending:
            t.next_try = now + min(MAX_RETRY, FIRST_RETRY * 2 ** min(t.tries, 16))
            t.tries += 1
        else:
            t.tries, t.next_try = 0, 0.0
        return status

    def _apply(self, key: str, t: _Tracked) -> PodStatus:
        v = t.verdict
        ip = v.ips[0]
        outbound, inbound = t.rules
        cur = self._applied.get(key)
        if cur is not None:   # same IP (a moved IP was removed first): only the rules changed
            cookie = cur.netns_cookie
        else:
            cookie = self._find_netns(key, ip)
        self.datapath.set_pod(cookie, ip, list(outbound), list(inbound))
        t.verdict = self._apply_dns(cookie, ip, v)
        self._applied[key] = Applied(cookie, ip, outbound, inbound)
        return PodStatus(key, True, t.verdict.reason, ip)

    def _apply_dns(self, cookie: int, ip: str, v: Verdict) -> Verdict:
        """DNS capture (issue 14, policy/dns.py): the servers come from the
        pod's installed rules. Returns the verdict with the final DNS
        decision (and its reason) in it."""
        set_pod_dns = getattr(self.datapath, "set_pod_dns", None)
        if v.dns is None or set_pod_dns is None:
            return v
        dns = v.dns
        if dns.pending:
            owners = self.netns.owners(ip)
            text, error = dns_policy.read_nat_rules(owners[0].path) if len(owners) == 1 else (None, "no namespace")
            dns = dns_policy.with_installed_rules(dns, text, error)
        set_pod_dns(cookie, dns)
        return dataclasses.replace(v, dns=dns, reason=v.reason.replace(f"DNS: {v.dns.reason}", f"DNS: {dns.reason}"))

    def _find_netns(self, key: str, ip: str) -> int:
        owners = self.netns.owners(ip)
        if len(owners) > 1:
            raise _Retry(f"IP {ip} is in {len(owners)} network namespaces; cannot tell which is the pod's",
                         "ambiguous_netns")
        if not owners:
            raise _Retry(f"no network namespace has IP {ip}", "netns_not_found")
        cookie = owners[0].cookie
        for other, applied in self._applied.items():
            if applied.netns_cookie == cookie:
                # pod_policy is keyed by namespace: writing would replace the other pod's policy
                raise _Retry(f"its network namespace (IP {ip}) already serves pod {other}", "shared_netns")
        return cookie

    def _remove(self, key: str, why: str) -> None:
        cur = self._applied.pop(key)
        try:
            self.datapath.remove_pod(cur.netns_cookie, cur.ip)
        except Exception as e:  # noqa: BLE001 - isolated like _apply; the entry is gone from our books
            log.warning("removing pod %s from the datapath failed: %s: %s", key, type(e).__name__, e)
        log.info("pod %s removed from the datapath: %s", key, why)

    def remove_all(self) -> None:
        for key in list(self._applied):
            self._remove(key, "agent stopping")

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

    # --- reporting ------------------------------------------------------------------------

    def _publish(self, new: dict[str, PodStatus]) -> None:
        with self._lock:
            old = self._status
            self._status = new
        for key, s in new.items():
            t = self._tracked[key]
            t.status = s
            before = old.get(key)
            if before is None or (before.accelerated, before.reason) != (s.accelerated, s.reason):
                log.info("pod %s: %s", key, s.reason)
                if self.on_decision_change is not None:
                    try:
                        self.on_decision_change(t.obj if isinstance(t.obj, dict) else None, s)
                    except Exception:  # noqa: BLE001 - reporting must never stop the datapath's updates
                        log.exception("reporting the decision for pod %s failed", key)
        for key in old.keys() - new.keys():
            log.info("pod %s: gone", key)
        if self.metrics:
            self.metrics.observe_pods(new.values())


class _Retry(Exception):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code

