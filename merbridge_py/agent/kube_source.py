"""The node agent's Kubernetes source: the pods scheduled on this node, kept
current by list+watch and handed on as plain API JSON.

`ListWatch` is the reusable part: one collection of one resource, listed, then
watched from the last resourceVersion (bookmarks included), relisted on 410
Gone, reconnected with capped, jittered backoff after any other failure.
`KubePodSource` runs one for `spec.nodeName=<node>` pods in all namespaces.

Responses are read with `_preload_content=False` and parsed as JSON here, so
the objects keep the API's own camelCase form (`status.podIP`,
`spec.initContainers`), which is what the decision code and `inspect-pod` read.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from typing import Any, Callable, Iterator

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("merbridge_py.kube")

OnChange = Callable[[dict[str, dict]], None]


class ResourceExpired(Exception):
    """410 Gone: the resourceVersion we hold is no longer served; relist."""


class WatchError(Exception):
    """The API server ended a watch with an ERROR event other than 410."""


class Backoff:
    """Capped exponential backoff with jitter, so that a node fleet that lost
    the API server together does not come back in lockstep."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum = initial, maximum
        self._failures = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(self._failures, 32))
        self._failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0


def object_key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


class Malformed(ValueError):
    """An object or event from the API that cannot be filed: refused, counted, skipped."""


def checked_key(obj: object) -> str:
    """object_key() of an object the API should never send malformed; Malformed if it did."""
    if not isinstance(obj, dict):
        raise Malformed(f"object is a {type(obj).__name__}, not a mapping")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise Malformed("object has no metadata mapping")
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        raise Malformed("object has no metadata.name string")
    if namespace is not None and not isinstance(namespace, str):
        raise Malformed(f"object {name} has a metadata.namespace that is not a string")
    return object_key(obj)


class ListWatch:
    """Mirror of one collection, delivered whole to `on_change` after every
    list and every change.

    `list_call` is a kubernetes client list method with its selection already
    bound (e.g. `functools.partial(core.list_pod_for_all_namespaces,
    field_selector=...)`); it gets called with the list/watch keywords.
    `run()` blocks; `abort()` (from another thread) cuts the open request.
    """

    def __init__(self, name: str, list_call: Callable[..., Any], on_change: OnChange, *,
                 backoff_initial: float = 0.2, backoff_max: float = 10.0,
                 watch_timeout: int = 300, connect_timeout: float = 5.0, list_read_timeout: float = 60.0):
        self.name = name
        self.objects: dict[str, dict] = {}
        self.resource_version: str | None = None   # None means: (re)list first
        self.synced = threading.Event()
        self.watch_restarts = 0
        self.errors = 0                          # objects and events refused as malformed (skipped)
        self.last_error: str | None = None       # the failure being retried; None once a request succeeds
        self._list_call = list_call
        self._on_change = on_change
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._watch_timeout = watch_timeout
        self._connect_timeout = connect_timeout
        self._list_read_timeout = list_read_timeout
        self._stop = threading.Event()
        self._response_lock = threading.Lock()
        self._response: Any = None

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            listing = self.resource_version is None
            try:
                self._list() if listing else self._watch()
            except ResourceExpired as e:
                # The server's normal answer to a version it no longer keeps, not a fault: relist after
                # the usual short delay (which still grows if a proxy answers 410 to everything).
                log.info("%s: resourceVersion %s expired (%s); relisting", self.name, self.resource_version, e)
                self.resource_version = None
                delay = self._backoff.next()
            except Exception as e:             # never exit on an API error: log, back off, retry
                if stop.is_set():
                    break
                self.last_error = f"{'list' if listing else 'watch'} {self.name}: {describe_error(e)}"
                delay = self._backoff.next()
                log.warning("%s; retrying in %.2fs", self.last_error, delay)
            else:
                if listing:
                    continue                   # straight on to the watch
                # A watch that ended cleanly reset the backoff, so this is the short delay: enough
                # to keep a server that ends every watch at once from spinning us.
                delay = self._backoff.next()
            if not listing and not stop.is_set():
                self.watch_restarts += 1
            stop.wait(delay)

    def abort(self) -> None:
        """Unblock a read in progress; used on stop."""
        with self._response_lock:
            response = self._response
        if response is not None:
            try:
                response.shutdown()    # urllib3 >= 2.3: shuts the socket's read side, waking the reader
            except (ValueError, RuntimeError, OSError):
                pass

    # --- one attempt each ---------------------------------------------------------

    def _list(self) -> None:
        response = self._request(self._list_read_timeout)
        try:
            body = _json(response.data)
        finally:
            response.release_conn()
        metadata = body.get("metadata") if isinstance(body, dict) else None
        items = body.get("items") if isinstance(body, dict) else None
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(version, str) or not isinstance(items, (list, type(None))):
            # retried by run() with backoff, like any failed request; the last good state stays
            raise Malformed("the list answer is not a list with metadata.resourceVersion")
        item_kind = body.get("kind") if isinstance(body.get("kind"), str) else ""
        objects = {}
        for obj in items or []:
            try:
                key = checked_key(obj)
            except Malformed as e:
                self._refuse(f"list item: {e}")
                continue
            # List items come without kind/apiVersion; watch objects have them. Make both look alike.
            obj.setdefault("kind", item_kind.removesuffix("List"))
            obj.setdefault("apiVersion", body.get("apiVersion", "v1"))
            objects[key] = obj
        self.objects = objects
        self.resource_version = version
        self._backoff.reset()
        log.info("%s: listed %d at resourceVersion %s", self.name, len(objects), self.resource_version)
        if not self._stop.is_set():
            self._deliver()
            self.synced.set()

    def _watch(self) -> None:
        """Follow the watch until it ends; return on a clean end (the server's timeout)."""
        # The server-side timeout is spread between 1x and 2x so that watches of many nodes do not
        # all restart at the same moment; the read timeout notices a connection that died silently.
        timeout = int(self._watch_timeout * random.uniform(1.0, 2.0))
        log.info("%s: watching from resourceVersion %s", self.name, self.resource_version)
        response = self._request(timeout + 30, watch=True, resource_version=self.resource_version,
                                 allow_watch_bookmarks=True, timeout_seconds=timeout)
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    return
                try:
                    self._apply(_json(line))
                except Malformed as e:
                    self._refuse(f"watch event: {e}")
        finally:
            with self._response_lock:
                self._response = None
            response.close()
        self._backoff.reset()

    def _request(self, read_timeout: float, **params: Any) -> Any:
        try:
            response = self._list_call(_preload_content=False,
                                       _request_timeout=(self._connect_timeout, read_timeout), **params)
        except ApiException as e:
            if e.status == 410:
                raise ResourceExpired(f"HTTP 410 {e.reason}") from e
            raise
        self.last_error = None
        with self._response_lock:
            self._response = response
        if self._stop.is_set():       # stop came while we were connecting: abort() had nothing to cut
            self.abort()
        return response

    def _refuse(self, problem: str) -> None:
        self.errors += 1
        log.warning("%s: refused a malformed %s", self.name, problem)

    def _apply(self, event: dict) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("object") or {}, dict):
            raise Malformed("event or its object is not a mapping")
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise ResourceExpired(obj.get("message", "Gone"))
            raise WatchError(f"ERROR event {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        rv = metadata.get("resourceVersion")
        if not isinstance(rv, str):
            raise Malformed(f"{kind} event without a resourceVersion string")
        if kind == "BOOKMARK":
            self.resource_version = rv
            self._backoff.reset()
            log.debug("%s: bookmark at resourceVersion %s", self.name, rv)
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: ignoring watch event of unknown type %r", self.name, kind)
            return
        key = checked_key(obj)
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.resource_version = rv
        self._backoff.reset()
        log.info("%s: %s %s at resourceVersion %s", self.name, kind, key, rv)
        self._deliver()

    def _deliver(self) -> None:
        try:
            self._on_change(dict(self.objects))
        except Exception:
            log.error("%s: on_change callback failed; continuing", self.name, exc_info=True)


def _json(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise Malformed("JSON nested too deeply") from None
    except ValueError as e:   # includes UnicodeDecodeError
        raise Malformed(f"not JSON: {str(e).splitlines()[0][:100]}") from None


def _lines(response: Any) -> Iterator[bytes]:
    """Newline-delimited JSON events as they arrive (read1 returns what is
    there instead of waiting for a full buffer)."""
    pending = b""
    while chunk := response.read1(65536):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from filter(None, complete)
    if pending.strip():
        yield pending


def describe_error(e: BaseException) -> str:
    """One line for logs and `status`."""
    if isinstance(e, ApiException):
        try:
            message = json.loads(e.body or "{}").get("message")
        except (ValueError, AttributeError):
            message = None
        return f"HTTP {e.status} {e.reason}" + (f": {message}" if message else "")
    reason = getattr(e, "reason", None)   # urllib3's MaxRetryError wraps the socket error
    if isinstance(reason, BaseException):
        e = reason
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def default_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """The pod's service account when running in a cluster, else the kubeconfig."""
    if kubeconfig is None:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass
    return config.new_client_from_config(config_file=kubeconfig)


class KubePodSource:
    """The pods on one node, delivered whole to `on_change` as
    `{"namespace/name": pod}` after every list and every change.

    `on_change` runs on a watcher thread; `run(stop)` blocks until `stop` is set.
    """

    def __init__(self, node_name: str, on_change: OnChange, api_client: client.ApiClient | None = None,
                 kubeconfig: str | None = None, backoff_initial: float = 0.2, backoff_max: float = 10.0):
        core = client.CoreV1Api(api_client or default_api_client(kubeconfig))
        self._core = core
        self._backoff = (backoff_initial, backoff_max)
        self.node_name = node_name
        self._pods = ListWatch(
            f"pods on {node_name}",
            functools.partial(core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node_name}"),
            on_change, backoff_initial=backoff_initial, backoff_max=backoff_max)
        self._watchers = [self._pods]

    def watch_config_map(self, namespace: str, name: str, on_change: OnChange) -> None:
        """Also list+watch one ConfigMap (the mode toggle); `on_change` gets
        `{"namespace/name": configmap}`, or `{}` while it does not exist.
        Call before run()."""
        self._config_map = ListWatch(
            f"configmap {namespace}/{name}",
            functools.partial(self._core.list_namespaced_config_map, namespace, field_selector=f"metadata.name={name}"),
            on_change, backoff_initial=self._backoff[0], backoff_max=self._backoff[1])
        self._watchers.append(self._config_map)

    @property
    def config_map_error(self) -> str | None:
        """The ConfigMap watch's current failure (None once a request succeeds)."""
        watcher = getattr(self, "_config_map", None)
        return watcher.last_error if watcher is not None else None

    @property
    def synced(self) -> threading.Event:
        return self._pods.synced

    @property
    def watch_restarts(self) -> int:
        return sum(w.watch_restarts for w in self._watchers)

    @property
    def last_error(self) -> str | None:
        return self._pods.last_error

    @property
    def errors(self) -> int:
        return self._pods.errors

    @property
    def resource_version(self) -> str | None:
        """Where the pod watch resumes from (None: it will relist)."""
        return self._pods.resource_version

    def run(self, stop: threading.Event) -> None:
        # Each watcher blocks in socket reads on its own thread; this thread waits for stop and
        # then cuts those reads, so run() returns promptly even mid-request.
        threads = [threading.Thread(target=w.run, args=(stop,), name=f"mbp-watch-{w.name}", daemon=True)
                   for w in self._watchers]
        for thread in threads:
            thread.start()
        stop.wait()
        for watcher in self._watchers:
            watcher.abort()
        deadline = time.monotonic() + 0.5
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
