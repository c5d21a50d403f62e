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

The decision rests on what Istio really installed (issue 11): a pod the spec
alone would accelerate is decided again with the nat rules read from inside
its network namespace (policy/live_rules.py: iptables-legacy, iptables-nft or
Istio's native nftables tables). They are read when the namespace is first
seen and when the pod's spec changes, never on a pass where nothing changed
(InstalledRulesCache, keyed on the namespace's inode and the spec). A
namespace without Istio rules yet (istio-init or the CNI plugin has not run)
is read again with backoff, the pod staying on iptables meanwhile.

Status stays true to the kernel (issue 18): a pod's entries are written all
or nothing (Datapath.set_pod undoes a partial write; a new pod whose DNS entry
cannot be written loses its policy too), and a periodic audit (audit_once,
every `audit_interval` seconds on this same thread) finds pods whose sandbox
was recreated with the same IP (a new network namespace, a new cookie) and
moves their entries there, and compares the kernel's pod entries with what
the agent wrote, repairing and counting every difference (agent/audit.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..mesh import MeshProfile
from ..netns import Netns, NetnsIndex
from ..policy import Verdict, compile_rules, decide
from ..policy import dns as dns_policy
from ..policy.live_rules import InstalledRulesCache, NoIstioRules, RulesReadFailed, read_netns, spec_key
from ..policy.rules import PodKernelFields, kernel_fields
from ..policy.userns import UsernsNotReady, in_user_namespace
from ..userns import UsernsReadError
from . import audit

log = logging.getLogger("merbridge_py.agent")

FIRST_RETRY = 0.2     # a pod whose namespace is not visible yet is looked up again after this...
MAX_RETRY = 5.0       # ...doubling up to this
IDLE_WAIT = 1.0       # longest sleep with nothing to do (a wake from a source cuts it short)


# Applied.dns while a pod's DNS entry is being written: never equal to a
# decision, so a failed write is retried.
_DNS_UNKNOWN = object()


@dataclass(frozen=True)
class Applied:
    """What the kernel holds for one pod."""

    netns_cookie: int
    ip: str
    outbound: tuple
    inbound: tuple
    fields: PodKernelFields | None = None
    dns: object = None      # the DNS decision written to dns_policy (policy.dns.DnsDecision)


@dataclass
class PodStatus:
    pod: str
    accelerated: bool
    reason: str
    ip: str | None = None
    pending: bool = False   # will be retried (namespace not visible yet, or applying failed)
    code: str = "accelerated"  # short reason code: a metrics label
    source: str | None = None  # where the capture policy came from ("nftables rules", "istio-init arguments", ...)

    def to_json(self) -> dict:
        return {"pod": self.pod, "accelerated": self.accelerated, "reason": self.reason,
                "ip": self.ip, "pending": self.pending, "source": self.source}


@dataclass
class _Tracked:
    """One pod as last seen by the loop."""

    obj: object
    verdict: Verdict               # final once `resolved`; until then what the spec alone says
    rules: tuple = ((), ())        # compiled (outbound, inbound) of an accelerated verdict
    fields: PodKernelFields | None = None   # the rest of its kernel entry (proxy uid/gid)
    next_try: float = 0.0          # monotonic time of the next namespace lookup / apply attempt
    tries: int = 0
    status: PodStatus | None = None
    resolved: bool = True          # False: the installed rules must be read before the verdict is final
    netns: Netns | None = None     # the pod's namespace, once found
    check_netns: bool = False      # its object changed while accelerated: is its IP still in that namespace?


def _needs_rules(verdict: Verdict) -> bool:
    """Pods whose verdict the installed rules can change or must explain:
    those the spec accelerates (the rules may forbid it), those whose
    istio-init arguments are unreadable (the rules may stand in for them) and
    those whose spec sources disagree (the reason names the rules)."""
    return verdict.accelerate or verdict.code in ("malformed_init_args", "installed_mismatch")


def _source(verdict: Verdict) -> str | None:
    return verdict.policy.source if verdict.policy is not None else None


def _pod_uid(key: str, obj: object) -> str:
    try:
        uid = obj["metadata"]["uid"]
        if isinstance(uid, str) and uid:
            return uid
    except (KeyError, TypeError, IndexError):
        pass
    return key


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
                 on_decision_change: Callable[[dict, PodStatus], None] | None = None,
                 rules_reader: Callable | None = read_netns, audit_interval: float | None = audit.DEFAULT_INTERVAL):
        """`rules_reader(netns_path)` reads the Istio rules installed in a
        pod's namespace (live_rules.read_netns); None decides from the pod
        spec alone (tests whose namespaces are fakes). `audit_interval`:
        seconds between audits in run() (None: never)."""
        self.datapath = datapath
        self.mesh = mesh
        self.netns = netns_index or NetnsIndex()
        self.metrics = metrics
        # Called as on_decision_change(pod, status) on the reconcile thread when a pod's
        # decision (accelerated, reason) changes; it must not block (events.py only queues).
        self.on_decision_change = on_decision_change
        self.decisions = 0                     # decide() calls so far (work done, for tests and metrics)
        self.installed = InstalledRulesCache(rules_reader) if rules_reader is not None else None
        self._scan_error: str | None | bool = False     # this pass's namespace scan: False = not scanned yet
        self._pods: dict[str, dict] | None = None
        self._changed = False
        self._tracked: dict[str, _Tracked] = {}
        self._applied: dict[str, Applied] = {}
        # DNS rules read for pods decided without a rules reader: key -> ((cookie, spec key), (text, error))
        self._dns_rules: dict[str, tuple[tuple, tuple]] = {}
        self._status: dict[str, PodStatus] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.ready = threading.Event()   # every pod of a synced source has been processed once
        self.audit_interval = audit_interval
        self.audit_metrics = audit.AuditMetrics(metrics.registry if metrics is not None else None)

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
        next_audit = time.monotonic() + (self.audit_interval or 0)
        while not stop.is_set():
            wait = self._next_wait()
            if self.audit_interval:
                wait = min(wait, max(0.0, next_audit - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                if self.audit_interval and time.monotonic() >= next_audit and self.ready.is_set():
                    next_audit = time.monotonic() + self.audit_interval
                    self.audit_once()     # before the pass: it publishes what the repairs changed
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
        self._scan_error = False
        if changed:
            self._decide_changed(pods)
            self._check_namespaces([key for key, t in self._tracked.items() if t.check_netns])
        now = time.monotonic()
        unresolved = self._resolve([key for key, t in self._tracked.items() if not t.resolved and t.next_try <= now],
                                   now)
        verdict_status = self._desired_status()
        self._remove_unwanted(verdict_status)
        verdict_status.update({key: s for key, s in unresolved.items() if s is not None})
        to_apply = [key for key, t in self._tracked.items()
                    if t.resolved and key not in verdict_status and not self._in_place(key, t) and t.next_try <= now]
        for key in to_apply:
            verdict_status[key] = self._apply_isolated(key, self._tracked[key], now)
        for key, t in self._tracked.items():
            if key in verdict_status:
                continue
            if key in self._applied and self._in_place(key, t):
                verdict_status[key] = PodStatus(key, True, t.verdict.reason, t.verdict.ips[0],
                                                source=_source(t.verdict))
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
            self._dns_rules.pop(key, None)
        for key, obj in pods.items():
            t = self._tracked.get(key)
            if t is not None and _same_object(t.obj, obj):
                continue
            verdict = decide(obj, self.mesh)
            self.decisions += 1
            # A recreated sandbox changes the pod object (new containers): look
            # at its namespace now rather than at the next audit.
            new = _Tracked(obj, verdict, status=t.status if t else None, netns=t.netns if t else None,
                           check_netns=key in self._applied)
            if self.installed is not None and _needs_rules(verdict):
                new.resolved = False        # final once the pod's installed rules are read (_resolve)
            else:
                self._compile(new)
            self._tracked[key] = new
        if self.installed is not None:
            self.installed.retain(_pod_uid(key, t.obj) for key, t in self._tracked.items())

    def _compile(self, t: _Tracked) -> None:
        """What the kernel gets for `t`'s verdict: its rule lists and the rest
        of its pod_policy entry (proxy uid/gid); nothing when not accelerated."""
        if not t.verdict.accelerate:
            t.rules, t.fields = ((), ()), None
            return
        outbound, inbound = compile_rules(t.verdict.policy, self.mesh)
        t.rules, t.fields = (tuple(outbound), tuple(inbound)), kernel_fields(t.verdict, self.mesh)

    def _resolve(self, keys: list[str], now: float) -> dict[str, PodStatus]:
        """Make these pods' verdicts final: find each one's namespace, read the
        rules Istio installed there (cached per namespace and spec; the reads
        of one pass run side by side) and decide again with them. Returns a
        pending status for each pod whose namespace or rules are not there
        yet (retried with backoff); the others are done."""
        out: dict[str, PodStatus] = {}
        found: dict[str, Netns] = {}
        for key in keys:
            t = self._tracked[key]
            try:
                if not t.verdict.ips:
                    raise _Retry("no pod IP yet", "no_ip")
                found[key] = self._pod_netns(key, t, t.verdict.ips[0])
            except _Retry as r:
                out[key] = self._not_resolved(key, t, now, str(r), r.code)
        requests = {key: (_pod_uid(key, self._tracked[key].obj), ns.inode, ns.path, spec_key(self._tracked[key].obj))
                    for key, ns in found.items()}
        if not requests:
            return out      # nothing to read (and no reader at all when rules_reader is None)
        try:
            results = self.installed.get_many(list(requests.values()))
        except Exception as e:  # noqa: BLE001 - a reader bug delays these pods, never the pass
            log.warning("reading installed rules failed: %s: %s", type(e).__name__, e)
            results = [RulesReadFailed(f"reading the rules failed: {type(e).__name__}: {e}")] * len(requests)
        for (key, request), installed in zip(requests.items(), results):
            t = self._tracked[key]
            if isinstance(installed, (NoIstioRules, RulesReadFailed)):
                # no rules yet, or a reader that failed (timed out on a busy
                # node, say): nothing known of the rules; read again on the retry
                self.installed.forget(request[0])
                code = "no_rules_yet" if isinstance(installed, NoIstioRules) else "rules_read_failed"
                out[key] = self._not_resolved(key, t, now, str(installed), code)
                continue
            t.verdict = decide(t.obj, self.mesh, installed)  # the same decision, completed: not counted again
            try:   # a user-namespaced pod's proxy ids as the kernel sees them (policy/userns.py)
                maps = self.netns.user_namespace_maps(found[key]) if t.verdict.accelerate else None
                t.verdict = in_user_namespace(t.verdict, maps)
            except (UsernsReadError, UsernsNotReady) as e:
                out[key] = self._not_resolved(key, t, now, str(e), "userns_unreadable")
                continue
            self._compile(t)
            t.netns, t.resolved, t.tries, t.next_try = found[key], True, 0, 0.0
        return out

    def _not_resolved(self, key: str, t: _Tracked, now: float, why: str, code: str) -> PodStatus:
        t.next_try = now + min(MAX_RETRY, FIRST_RETRY * 2 ** min(t.tries, 16))
        t.tries += 1
        if key in self._applied:        # its previous verdict no longer holds: back to iptables
            self._remove(key, f"waiting for its installed rules: {why}")
        return PodStatus(key, False, f"not accelerated yet: {why} (will retry; the pod stays on iptables meanwhile)",
                         t.verdict.ips[0] if t.verdict.ips else None, pending=True, code=code,
                         source=_source(t.verdict))

    def _pod_netns(self, key: str, t: _Tracked, ip: str) -> Netns:
        """The namespace of an accelerated pod whose IP is unchanged is the one
        the kernel serves it in; any other pod's is looked up by IP (one scan
        per pass, a re-read on retries: an IP can appear after the namespace)."""
        cur = self._applied.get(key)
        if cur is not None and t.netns is not None and cur.ip == ip and t.netns.cookie == cur.netns_cookie:
            return t.netns
        return self._owner_of(ip, reread=t.tries > 0)

    def _owner_of(self, ip: str, reread: bool) -> Netns:
        """The one network namespace that has `ip` (one scan per pass, a
        re-read on retries: an IP can appear after the namespace)."""
        self._scan_once(reread=reread)
        owners = self.netns.owners(ip)
        if len(owners) > 1:
            raise _Retry(f"IP {ip} is in {len(owners)} network namespaces; cannot tell which is the pod's",
                         "ambiguous_netns")
        if not owners:
            raise _Retry(f"no network namespace has IP {ip}", "netns_not_found")
        return owners[0]

    def _desired_status(self) -> dict[str, PodStatus]:
        """Statuses settled by the decision alone: not accelerated, or an IP
        two pods claim (neither is accelerated: the kernel maps an IP to one
        namespace, and guessing could give one pod the other's policy)."""
        out: dict[str, PodStatus] = {}
        by_ip: dict[str, list[str]] = {}
        for key, t in self._tracked.items():
            v = t.verdict
            if not t.resolved:
                continue                # settled by _resolve
            if not v.accelerate:
                out[key] = PodStatus(key, False, v.reason, v.ips[0] if v.ips else None, code=v.code,
                                     source=_source(v))
            else:
                by_ip.setdefault(v.ips[0], []).append(key)
        for ip, keys in by_ip.items():
            if len(keys) < 2:
                continue
            for key in keys:
                others = ", ".join(k for k in sorted(keys) if k != key)
                out[key] = PodStatus(key, False, f"not accelerated: pod IP {ip} is also the IP of pod {others}; "
                                     "left to iptables until only one pod has it", ip, code="duplicate_ip",
                                     source=_source(self._tracked[key].verdict))
        return out

    def _in_place(self, key: str, t: _Tracked) -> bool:
        cur = self._applied.get(key)
        return (cur is not None and cur.ip == t.verdict.ips[0]
                and (cur.outbound, cur.inbound) == t.rules and cur.fields == t.fields
                and cur.dns == t.verdict.dns
                and not (t.verdict.dns is not None and t.verdict.dns.pending))   # DNS servers still to read

    # --- kernel -------------------------------------------------------------------------

    def _remove_unwanted(self, refused: dict[str, PodStatus]) -> None:
        for key in list(self._applied):
            t = self._tracked.get(key)
            if t is None or key in refused:
                self._remove(key, "pod deleted" if t is None else refused[key].reason)
            elif not t.resolved:
                continue        # its rules are being read again (_resolve removes it if that fails)
            elif self._applied[key].ip != t.verdict.ips[0]:
                # the IP moved: free the old one first, another pod may get it in this pass
                self._remove(key, f"IP changed to {t.verdict.ips[0]}")

    def _scan_once(self, reread: bool) -> None:
        """One namespace scan per pass serves every pod looked up in it; a
        failed scan is every such pod's reason for a retry."""
        if self._scan_error is False:
            self._scan_error = self._refresh_netns(reread)
        if self._scan_error is not None:
            raise _Retry(f"scanning network namespaces failed ({self._scan_error})", "netns_scan_failed")

    def _refresh_netns(self, reread: bool) -> str | None:
        """Rescan namespaces for the pods about to be resolved; a first attempt
        only inspects new namespaces, a retry re-reads the known ones too (an
        IP can be added after the namespace appears). Returns the error, if
        the scan failed: those pods get it as their reason and a retry."""
        try:
            self.netns.refresh(reread=reread)
        except Exception as e:  # noqa: BLE001 - a scan failure delays these pods, never the pass
            log.warning("scanning network namespaces failed: %s: %s", type(e).__name__, e)
            if self.metrics:
                self.metrics.reconcile_errors.inc()
            return f"{type(e).__name__}: {e}"
        return None

    def _apply_isolated(self, key: str, t: _Tracked, now: float) -> PodStatus:
        ip = t.verdict.ips[0]
        try:
            status = self._apply(key, t)
        except _Retry as r:
            status = PodStatus(key, False, f"not accelerated yet: {r} (will retry; the pod stays on iptables "
                                           "meanwhile)", ip, pending=True, code=r.code, source=_source(t.verdict))
        except Exception as e:  # noqa: BLE001 - one pod's failure must not stop the others
            log.warning("applying pod %s failed: %s: %s", key, type(e).__name__, e)
            failure = f"writing its datapath entries failed ({type(e).__name__}: {e}); will retry"
            if key in self._applied:   # a policy update failed: the kernel still serves the previous one
                status = PodStatus(key, True, f"accelerated with its previous policy: {failure}", ip,
                                   pending=True, code="update_failed", source=_source(t.verdict))
            else:
                status = PodStatus(key, False, f"not accelerated yet: {failure}", ip, pending=True,
                                   code="apply_failed", source=_source(t.verdict))
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
            cookie = self._find_netns(key, t, ip)
        self.datapath.set_pod(cookie, ip, list(outbound), list(inbound), t.fields)
        # On the books before the DNS write: if that fails, the pod's entries
        # are still removed when it goes, and its DNS entry (unknown until
        # written) is written again on the retry.
        self._applied[key] = Applied(cookie, ip, outbound, inbound, t.fields, _DNS_UNKNOWN)
        try:
            t.verdict = self._apply_dns(key, t, cookie, ip)
        except Exception:
            if cur is None:   # all or nothing: a new pod gets no policy without its DNS entry
                self._remove(key, "its DNS entry could not be written")
            raise
        self._applied[key] = Applied(cookie, ip, outbound, inbound, t.fields, t.verdict.dns)
        return PodStatus(key, True, t.verdict.reason, ip, source=_source(t.verdict))

    def _apply_dns(self, key: str, t: _Tracked, cookie: int, ip: str) -> Verdict:
        """DNS capture (issue 14, policy/dns.py): the pod's dns_policy entry.
        Its servers come from the installed rules the verdict was decided
        with (the cache read them); a verdict decided from the spec alone
        (no rules reader) is still pending, and its servers are read here
        with iptables-save, once per namespace and spec. Returns the verdict
        with the final DNS decision (and its reason) in it."""
        v = t.verdict
        set_pod_dns = getattr(self.datapath, "set_pod_dns", None)
        if set_pod_dns is None:
            return v
        if v.dns is None:
            # No capture now: remove an entry an earlier decision (or the
            # agent before a restart, whose maps this one took over) wrote.
            set_pod_dns(cookie, dns_policy.NOT_CAPTURED)
            return v
        dns = v.dns
        if dns.pending:
            stamp = (cookie, spec_key(t.obj))
            read = self._dns_rules.get(key)
            if read is None or read[0] != stamp:
                path = t.netns.path if t.netns is not None and t.netns.cookie == cookie else None
                if path is None:
                    owners = [o for o in self.netns.owners(ip) if o.cookie == cookie]
                    path = owners[0].path if owners else None
                read = (stamp, dns_policy.read_nat_rules(path) if path else (None, "no namespace"))
                self._dns_rules[key] = read
            dns = dns_policy.with_installed_rules(dns, *read[1])
        set_pod_dns(cookie, dns)
        return dataclasses.replace(v, dns=dns, reason=v.reason.replace(f"DNS: {v.dns.reason}", f"DNS: {dns.reason}"))

    def _find_netns(self, key: str, t: _Tracked, ip: str) -> int:
        if t.netns is not None and ip in t.netns.ipv4:
            cookie = t.netns.cookie         # found (and its rules read) by _resolve
        else:   # decided without the rules (rules_reader None): look the namespace up now
            ns = self._owner_of(ip, reread=t.tries > 0)
            cookie = ns.cookie
            if self.netns.user_namespace_maps(ns) is not None:   # translated only in _resolve
                raise _Retry("its network namespace belongs to a user namespace (hostUsers: false), whose proxy "
                             "ids are translated only when the agent reads installed rules", "userns_unsupported")
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

    # --- the audit (agent/audit.py) ---------------------------------------------------

    def audit_once(self) -> dict[str, int]:
        """Compare the kernel with the agent's view and repair every
        difference: pods whose IP moved to another namespace (a recreated
        sandbox) or whose namespace is gone, entries missing or changed in the
        maps, entries of no pod of ours. Runs on the reconcile thread (run()
        calls it between passes). Returns the differences found, by kind."""
        found = dict.fromkeys(audit.KINDS, 0)
        try:
            self._audit_namespaces(found)
            self._audit_maps(found)
        except Exception as e:  # noqa: BLE001 - counted and logged; the next audit tries again
            log.warning("audit failed: %s: %s", type(e).__name__, e)
            self.audit_metrics.failures.inc()
        else:
            self.audit_metrics.last.set_to_current_time()
        finally:
            for kind, n in found.items():
                if n:
                    self.audit_metrics.found(kind, n)
        if any(found.values()):
            self._wake.set()     # the repaired pods are applied (and their status published) by the next pass
        return found

    def _check_namespaces(self, keys: list[str]) -> None:
        """Accelerated pods whose object changed: is each one's IP still in the
        namespace its entries name? A new namespace (a recreated sandbox)
        is found by this pass's scan, which reads only namespaces it has not
        seen (the audit reads them all)."""
        found = dict.fromkeys(audit.KINDS, 0)
        for key in keys:
            self._tracked[key].check_netns = False
            a = self._applied.get(key)
            if a is None:
                continue
            try:
                self._scan_once(reread=False)
            except _Retry:
                return      # the scan failed: the audit looks again
            self._moved(key, a, self.netns.owners(a.ip), found)
        for kind, n in found.items():
            if n:
                self.audit_metrics.found(kind, n)

    def _moved(self, key: str, a: Applied, owners: list[Netns], found: dict[str, int]) -> None:
        """If pod `key`'s IP is no longer in the namespace its entries name,
        remove them and apply the pod afresh (counted in `found`)."""
        if any(o.cookie == a.netns_cookie for o in owners):
            return
        if owners:
            kind = "netns_changed"
            why = (f"its IP {a.ip} is in another network namespace now (cookie {a.netns_cookie} -> "
                   f"{', '.join(str(o.cookie) for o in owners)}: a recreated sandbox)")
        else:
            kind, why = "netns_gone", f"no network namespace has its IP {a.ip} any more"
        found[kind] += 1
        log.warning("pod %s: %s; its entries are removed and it is applied afresh", key, why)
        self._remove(key, why)
        self._apply_afresh(key)

    def _audit_namespaces(self, found: dict[str, int]) -> None:
        """Each accelerated pod's IP must still be in the namespace its entries
        name. Every namespace is read again (an inode can be reused by a new
        namespace; the cookie cannot), once per audit."""
        if not self._applied:
            return
        self.netns.refresh(reread=True)
        for key, a in list(self._applied.items()):
            self._moved(key, a, self.netns.owners(a.ip), found)

    def _apply_afresh(self, key: str) -> None:
        """Look the pod's namespace up (and read its installed rules) again on the next pass."""
        t = self._tracked.get(key)
        if t is None:
            return
        t.netns, t.tries, t.next_try = None, 0, 0.0
        if self.installed is not None and _needs_rules(t.verdict):
            t.resolved = False     # the new namespace's rules decide (istio-init ran again there)

    def _audit_maps(self, found: dict[str, int]) -> None:
        kernel_pods = getattr(self.datapath, "kernel_pods", None)
        if kernel_pods is None or getattr(self.datapath, "bpf", None) is None:
            return      # a datapath without maps to read (not loaded yet)
        kernel = kernel_pods()
        mine_policies, mine_ips, mine_dns = set(), set(), set()
        for key, a in list(self._applied.items()):
            dns_known = a.dns is not _DNS_UNKNOWN     # being written: the retry writes it
            want = self.datapath.pod_entries_of(a.netns_cookie, a.ip, a.outbound, a.inbound, a.fields,
                                                a.dns if dns_known else None)
            differences = []
            for cookie, value in want.policies.items():
                if kernel.policies.get(cookie) != value:
                    differences.append(("missing" if cookie not in kernel.policies else "changed", "pod_policy"))
            for ip, cookie in want.ips.items():
                if kernel.ips.get(ip) != cookie:
                    differences.append(("missing" if ip not in kernel.ips else "changed", f"local_pod_ip {ip}"))
            if dns_known and kernel.dns.get(a.netns_cookie) != want.dns.get(a.netns_cookie):
                kind = "missing" if a.netns_cookie not in kernel.dns else "changed"
                differences.append((kind, "dns_policy"))
            mine_policies.update(want.policies)
            mine_ips.update(want.ips)
            mine_dns.add(a.netns_cookie)
            if differences:
                for kind, _ in differences:
                    found[kind] += 1
                log.warning("audit: pod %s: %s; writing its entries again", key,
                            ", ".join(f"{where} {kind}" for kind, where in differences))
                self._rewrite(key, a)
        from ..datapath import PodEntries
        stale = PodEntries({c: v for c, v in kernel.policies.items() if c not in mine_policies},
                           {ip: c for ip, c in kernel.ips.items() if ip not in mine_ips},
                           {c: v for c, v in kernel.dns.items() if c not in mine_dns})
        for what in ([f"pod_policy {c}" for c in stale.policies] + [f"local_pod_ip {ip}" for ip in stale.ips]
                     + [f"dns_policy {c}" for c in stale.dns]):
            found["unknown"] += 1
            log.warning("audit: %s belongs to no pod of this agent; deleted", what)
        if stale.policies or stale.ips or stale.dns:
            self.datapath.delete_entries(stale)

    def _rewrite(self, key: str, a: Applied) -> None:
        """Write a pod's entries again as the agent's books have them; if that
        fails, the pod leaves the datapath and is applied afresh (retried)."""
        try:
            self.datapath.set_pod(a.netns_cookie, a.ip, list(a.outbound), list(a.inbound), a.fields)
            set_pod_dns = getattr(self.datapath, "set_pod_dns", None)
            if set_pod_dns is not None and a.dns is not _DNS_UNKNOWN:
                set_pod_dns(a.netns_cookie, a.dns if a.dns is not None else dns_policy.NOT_CAPTURED)
        except Exception as e:  # noqa: BLE001 - this pod goes back to iptables, the others are untouched
            log.warning("audit: writing pod %s's entries again failed: %s: %s", key, type(e).__name__, e)
            self._remove(key, "audit: its entries could not be written again")
            self._apply_afresh(key)

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

