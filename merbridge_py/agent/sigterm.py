"""What a SIGTERM means: a restart, or an uninstall.

A restart (rolling update, pod deleted, node draining or shutting down) is
followed by a successor on the same node. The agent then leaves its programs
attached and its maps pinned: traffic keeps its eBPF path meanwhile, bytes
already redirected and connections not yet accepted keep their state, and
the successor adopts the maps and replaces the programs, as after a crash.
An uninstall (the DaemonSet deleted) has no successor: the agent detaches
its programs and removes its pins, and traffic falls back to Istio's own
iptables rules.

`--on-sigterm auto` tells them apart by reading the agent's own DaemonSet
(one `get`, RBAC-granted for that one object):
  present, not being deleted      -> keep   (a restart)
  gone (404) or deletionTimestamp -> detach (an uninstall)
  401/403, after it was readable  -> detach (`kubectl delete -f` removes our
                                      ServiceAccount and roles with the
                                      DaemonSet, usually before we are stopped)
  anything else (API unreachable, never readable) -> keep
Keep is the safe side of a wrong guess: the programs left behind carry the
traffic as before (and Istio's rules stay underneath), a successor adopts
them, and `merbridge-py cleanup` removes them from a node that has none.
A wrong detach would cost every node its eBPF path until the successor
starts, and loses bytes in flight.
"""

from __future__ import annotations

import json
import logging
import threading

log = logging.getLogger("merbridge_py.agent")

KEEP, DETACH, AUTO = "keep", "detach", "auto"
API_TIMEOUT = 3.0                     # seconds per call: SIGTERM's grace period is short
STARTUP_RETRY = (1.0, 30.0)           # first and longest wait between reads at start


class DaemonSetCheck:
    """Reads the agent's own DaemonSet: once it is readable at start (so a 404
    or a 403 later means something), and again on SIGTERM."""

    def __init__(self, api_client, namespace: str, name: str):
        from kubernetes import client
        self.apps = client.AppsV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.readable = threading.Event()

    def _read(self) -> tuple[int, dict | None]:
        """(HTTP status, metadata) of the DaemonSet; status 0 when the API
        server could not be reached."""
        from kubernetes.client.rest import ApiException
        try:
            # the raw answer: only metadata matters, and the client's models refuse partial objects
            resp = self.apps.read_namespaced_daemon_set(self.name, self.namespace, _request_timeout=API_TIMEOUT,
                                                        _preload_content=False)
            return 200, json.loads(resp.data).get("metadata") or {}
        except ApiException as e:
            return e.status or 0, None
        except Exception as e:   # urllib3's connection and timeout errors, a garbled answer
            log.debug("reading DaemonSet %s/%s: %s", self.namespace, self.name, e)
            return 0, None

    def watch_start(self, stop: threading.Event) -> None:
        """Until the DaemonSet has been read once (or `stop`): try again, later and later."""
        wait, warned = STARTUP_RETRY[0], False
        while not stop.is_set():
            code, _ = self._read()
            if code == 200:
                self.readable.set()
                log.info("own DaemonSet %s/%s readable: on SIGTERM, keep for a successor unless it is deleted",
                         self.namespace, self.name)
                return
            if not warned:
                log.warning("cannot read own DaemonSet %s/%s (%s); until it can be read, SIGTERM keeps the "
                            "programs attached (check --daemonset and the agent's RBAC)",
                            self.namespace, self.name, code or "API unreachable")
                warned = True
            stop.wait(wait)
            wait = min(wait * 2, STARTUP_RETRY[1])

    def decide(self) -> tuple[str, str]:
        """(KEEP or DETACH, why) for a SIGTERM now."""
        ref = f"DaemonSet {self.namespace}/{self.name}"
        code, meta = self._read()
        if code == 200:
            if meta.get("deletionTimestamp"):
                return DETACH, f"{ref} is being deleted"
            return KEEP, f"{ref} is present: a restart or update"
        if not self.readable.is_set():
            return KEEP, f"{ref} was never readable ({code or 'API unreachable'}): cannot tell an uninstall"
        if code == 404:
            return DETACH, f"{ref} is gone"
        if code in (401, 403):
            return DETACH, f"{ref} no longer readable ({code}): our credentials were removed with it"
        return KEEP, f"{ref} cannot be read now ({code or 'API unreachable'})"


def decide(on_sigterm: str, check: DaemonSetCheck | None) -> tuple[str, str]:
    if on_sigterm != AUTO:
        return on_sigterm, f"--on-sigterm {on_sigterm}"
    if check is None:
        return DETACH, "no Kubernetes API configured: a standalone agent has no successor"
    return check.decide()
