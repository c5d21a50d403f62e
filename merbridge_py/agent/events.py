"""Kubernetes Events for the agent's per-pod decisions, so that `kubectl
describe pod` says whether the pod is accelerated and, if not, why.

The reconcile loop calls `EventSender.on_decision_change(pod, status)` when a
pod's decision changes; that call only builds the Event and queues it (never
blocks, never raises). One sender thread creates the queued Events as
events.k8s.io/v1 objects in the pod's namespace. Events are best effort: when
the queue is full an Event is dropped and counted; an API error is logged once
per kind and counted; the datapath never waits for the API server.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter

from .kube_source import describe_error

log = logging.getLogger("merbridge_py.events")

REPORTING_CONTROLLER = "merbridge.io/merbridge-py"
ACTION = "Reconcile"
# Limits the API server enforces on events.k8s.io/v1 Events (validation of
# note, reportingInstance and metadata.name); longer values are rejected.
NOTE_LIMIT_BYTES = 1024
REPORTING_INSTANCE_LIMIT = 128
NAME_LIMIT = 253

QUEUE_SIZE = 256
REPEAT_INTERVAL = 30.0    # seconds: at most one Event per pod and reason in this window
REQUEST_TIMEOUT = (5.0, 10.0)   # connect, read: a slow API server delays Events, nothing else

# Decisions worth no Event: pods outside the mesh (an Event for every pod on the
# node would be noise), and passing states the pod leaves by itself (starting
# without an IP, a namespace not yet visible, finishing, being deleted).
QUIET_CODES = frozenset({"no_sidecar", "no_ip", "netns_not_found", "deleting", "finished"})
# Not accelerated because the pod's owner or Istio's configuration chose so:
# nothing to warn about. Every other reason is a Warning (a policy that cannot
# be honoured, a malformed annotation, ...).
NORMAL_CODES = frozenset({"accelerated", "opted_out", "tproxy", "interception_none"})


def truncate_utf8(text: str, limit: int) -> str:
    """At most `limit` bytes of UTF-8, cut on a character boundary."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore")


def micro_time(moment: datetime) -> str:
    """RFC 3339 with microseconds, as the API's MicroTime fields are written."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _with_fraction(moment: datetime) -> datetime:
    # Recent kubernetes clients (pydantic models) re-serialize eventTime with isoformat(), which
    # leaves out a zero fraction; the API server parses MicroTime with exactly six digits and would
    # reject the Event. A microsecond later is as true.
    return moment.replace(microsecond=1) if moment.microsecond == 0 else moment


def build_event(pod: dict | None, status, node_name: str, moment: datetime) -> dict:
    """The events.k8s.io/v1 Event reporting `status` (an agent PodStatus) for `pod`."""
    meta = (pod or {}).get("metadata") or {}
    namespace, _, name = status.pod.partition("/")
    moment = _with_fraction(moment)
    # The naming scheme client-go's recorders use: the object's name and the time in hex nanoseconds.
    suffix = f".{int(moment.timestamp()) * 10**9 + moment.microsecond * 1000:x}"
    event_name = name[:NAME_LIMIT - len(suffix)].rstrip(".-") + suffix
    regarding = {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name}
    if meta.get("uid"):
        regarding["uid"] = meta["uid"]   # `kubectl describe pod` selects the pod's Events by uid
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": event_name, "namespace": namespace},
        "eventTime": micro_time(moment),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": node_name[:REPORTING_INSTANCE_LIMIT],
        "action": ACTION,
        "reason": "Accelerated" if status.accelerated else "NotAccelerated",
        "note": truncate_utf8(status.reason, NOTE_LIMIT_BYTES),
        "type": "Normal" if status.code in NORMAL_CODES else "Warning",
        "regarding": regarding,
    }


class EventSender:
    """Queues Events from the reconcile loop; `run(stop)` creates them (one thread)."""

    def __init__(self, api_client: client.ApiClient, node_name: str, registry: CollectorRegistry | None = None, *,
                 queue_size: int = QUEUE_SIZE, repeat_interval: float = REPEAT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.node_name = node_name
        # The source's connection settings, but one attempt per Event: urllib3's retries would hold
        # the queue up and log a warning per attempt, and a lost Event is acceptable.
        configuration = copy.deepcopy(api_client.configuration)
        configuration.retries = False
        self._api = client.EventsV1Api(client.ApiClient(configuration))
        self._queue: queue.Queue[dict] = queue.Queue(maxsize=queue_size)
        self._repeat_interval = repeat_interval
        self._clock = clock
        self._last_sent: dict[tuple[str, str], float] = {}   # (pod uid or key, reason text) -> when queued
        self._errors_logged: set[str] = set()
        registry = registry if registry is not None else CollectorRegistry()
        self.created = Counter("merbridge_events_created", "Kubernetes Events created about pod decisions",
                               registry=registry)
        self.failed = Counter("merbridge_events_failed", "Kubernetes Events the API server did not accept",
                              registry=registry)
        self.dropped = Counter("merbridge_events_dropped", "Kubernetes Events dropped because the queue was full",
                               registry=registry)

    # --- the reconcile loop's side ---------------------------------------------------

    def on_decision_change(self, pod: dict | None, status) -> None:
        """Queue an Event for this decision, unless it is a quiet one or the same
        pod got the same reason within the repeat interval. Never blocks."""
        if status.code in QUIET_CODES or status.pending:
            return
        uid = ((pod or {}).get("metadata") or {}).get("uid")
        key = (uid or status.pod, status.reason)   # by uid: a pod re-created under the same name is a new pod
        now = self._clock()
        last = self._last_sent.get(key)
        if last is not None and now - last < self._repeat_interval:
            return
        try:
            self._queue.put_nowait(build_event(pod, status, self.node_name, datetime.now(timezone.utc)))
        except queue.Full:
            self.dropped.inc()
            return
        self._last_sent[key] = now
        if len(self._last_sent) > 4 * self._queue.maxsize:
            self._forget_before(now - self._repeat_interval)

    def _forget_before(self, moment: float) -> None:
        for key in [k for k, t in self._last_sent.items() if t < moment]:
            del self._last_sent[key]

    # --- the sender thread --------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                event = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.send(event)

    def send(self, event: dict) -> bool:
        """Create one Event; False (logged, counted) if the API refused it or could not be reached."""
        try:
            response = self._api.create_namespaced_event(event["metadata"]["namespace"], event,
                                                         _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            response.drain_conn()     # read the (unused) answer, so the connection can be reused
            response.release_conn()
        except Exception as e:  # noqa: BLE001 - Events are best effort; the agent goes on
            self.failed.inc()
            kind = f"HTTP {e.status}" if isinstance(e, ApiException) else type(e).__name__
            if kind not in self._errors_logged:
                self._errors_logged.add(kind)
                log.warning("cannot create Kubernetes Events (%s); further %s errors are only counted "
                            "(merbridge_events_failed_total)", describe_error(e), kind)
            return False
        self.created.inc()
        if self._errors_logged:
            self._errors_logged.clear()
            log.info("creating Kubernetes Events works again")
        return True
