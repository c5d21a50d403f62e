"""An in-process fake of the Kubernetes API server's read side (plus create),
for the real `kubernetes` Python client to list and watch against.

It serves core/v1 collections of any resource (pods, configmaps, ...), across
all namespaces (`/api/v1/pods`) or in one (`/api/v1/namespaces/NS/pods`):
lists with a resourceVersion, and watches as chunked newline-delimited JSON
events, honouring `fieldSelector`, `resourceVersion`, `timeoutSeconds` and
`allowWatchBookmarks`. It also creates objects POSTed to a namespaced
collection of any group (`/apis/events.k8s.io/v1/namespaces/NS/events`): they
are stored under "resource.group" (`objects("events.events.k8s.io")`). A GET of
one named object of any group is answered from the same store (add it as
`add("daemonsets.apps", ...)`); `forbidden` resources get 403 (lists and
watches too), and `delays` hold back the answers about a resource (a slow server).

Tests can also break it the ways real API servers break: expire resource
versions (410 Gone, as an ERROR event or as HTTP 410), compact the event
history, drop open watches, send bookmarks, and stop and restart on the same
port. Every request is recorded, so a test can check exactly which verbs and
resources a client uses (what its RBAC role must grant).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_KINDS = {"pods": "Pod", "configmaps": "ConfigMap", "namespaces": "Namespace"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]

    def permission(self) -> tuple[str, str, str]:
        """(apiGroup, resource, verb) as the API server's authorizer sees this
        request: a GET of a collection is list, or watch with ?watch."""
        group, _, resource, name = _parse_path(self.path)
        if self.method == "GET":
            verb = "get" if name else ("watch" if self.query.get("watch") in ("1", "true") else "list")
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete" if name else "deletecollection"}[self.method]
        return group, resource, verb


def _parse_path(path: str) -> tuple[str, str | None, str, str | None]:
    """(group, namespace, resource, name) of an API path such as /api/v1/pods,
    /api/v1/namespaces/NS/configmaps/NAME or /apis/GROUP/VERSION/namespaces/NS/R;
    ValueError for anything else."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        raise ValueError(f"not an API path: {path}")
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not 1 <= len(rest) <= 2:
        raise ValueError(f"not an API path: {path}")
    return group, namespace, rest[0], (rest[1] if len(rest) == 2 else None)


@dataclass(frozen=True)
class _Change:
    rv: int
    resource: str
    type: str            # ADDED, MODIFIED or DELETED
    obj: dict
    old: dict | None     # the previous version, so a watch can see an object enter or leave its selector


class _Expired(Exception):
    pass


def _field_value(obj: dict, path: str) -> str:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)


def _selector_matcher(selector: str):
    """A predicate for a field selector such as `spec.nodeName=n1,metadata.namespace!=x`."""
    terms = []
    for term in filter(None, selector.split(",")):
        negate = "!=" in term
        path, _, value = term.partition("!=" if negate else "=")
        terms.append((path, value.lstrip("="), negate))   # "==" is the same as "="
    return lambda obj: all((_field_value(obj, p) == v) != neg for p, v, neg in terms)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeApiServer:
    """`compact=N` keeps only the last N changes in the watch history, as etcd
    compaction does: a watch from an older resourceVersion gets 410 Gone."""

    def __init__(self, *, compact: int | None = None, port: int = 0):
        self.compact = compact
        self.port = port
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], dict]] = {}
        self._history: list[_Change] = []
        self._rv = 100
        self._oldest_watchable_rv = 0
        self._expire_with_http_status = False
        self._bookmark_generation = 0
        self._drop_generation = 0
        self._connections: set[socket.socket] = set()
        self._watch_connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self.forbidden: set[str] = set()    # "resource" or "resource.group": answered 403
        # A slow API server: seconds each GET of a resource ("configmaps", ...) waits before it is answered.
        self.delays: dict[str, float] = {}

    # --- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeApiServer":
        """Start serving; after a stop() this reuses the same port."""
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.daemon_threads = True
        httpd.fake = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fake-apiserver", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a crashed API server would."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self._cond:
            for conn in self._connections:
                _shutdown(conn)
            self._drop_generation += 1
            self._cond.notify_all()

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- state changes -----------------------------------------------------------

    def add(self, resource: str, obj: dict) -> dict:
        return self._write(resource, "ADDED", obj)

    def update(self, resource: str, obj: dict) -> dict:
        return self._write(resource, "MODIFIED", obj)

    def delete(self, resource: str, namespace: str, name: str) -> dict:
        return self._write(resource, "DELETED", {"metadata": {"namespace": namespace, "name": name}})

    def add_pod(self, pod: dict) -> dict:
        return self.add("pods", pod)

    def update_pod(self, pod: dict) -> dict:
        return self.update("pods", pod)

    def delete_pod(self, namespace: str, name: str) -> dict:
        return self.delete("pods", namespace, name)

    def objects(self, resource: str) -> dict[str, dict]:
        """The server's truth, keyed "namespace/name"."""
        with self._cond:
            return {f"{ns}/{name}": json.loads(json.dumps(obj))
                    for (ns, name), obj in self._objects.get(resource, {}).items()}

    @property
    def resource_version(self) -> int:
        return self._rv

    def _write(self, resource: str, change: str, obj: dict) -> dict:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        with self._cond:
            store = self._objects.setdefault(resource, {})
            old = store.get(key)
            if (change == "ADDED") != (old is None):
                raise KeyError(f"{resource} {key}: cannot {change} (exists: {old is not None})")
            self._rv += 1
            if change == "DELETED":
                obj = store.pop(key)
                obj["metadata"]["resourceVersion"] = str(self._rv)
            else:
                meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
                meta["resourceVersion"] = str(self._rv)
                store[key] = obj
            self._history.append(_Change(self._rv, resource, change, obj, old))
            if self.compact is not None and len(self._history) > self.compact:
                dropped = self._history[:-self.compact]
                del self._history[:-self.compact]
                self._oldest_watchable_rv = max(self._oldest_watchable_rv, dropped[-1].rv)
            self._cond.notify_all()
        return json.loads(json.dumps(obj))

    # --- failure injection ---------------------------------------------------------

    def expire(self, resource_version: int, *, http_status: bool = False) -> None:
        """Watches from a resourceVersion older than this one get 410 Gone: as an
        ERROR event in a 200 stream (what kube-apiserver sends), or, with
        `http_status`, as an HTTP 410 response."""
        with self._cond:
            self._oldest_watchable_rv = max(self._oldest_watchable_rv, int(resource_version))
            self._expire_with_http_status = http_status
            self._cond.notify_all()

    def drop_connections(self) -> None:
        """Cut every open watch mid-stream (no terminating chunk): the client has its
        200 response and then loses the stream, so each drop is one broken watch to it."""
        with self._cond:
            for conn in self._watch_connections:
                _shutdown(conn)
            self._watch_connections.clear()    # watch_count() is 0 until a client reconnects
            self._drop_generation += 1
            self._cond.notify_all()

    def send_bookmark(self) -> None:
        """Every open watch that asked for bookmarks gets one at the current resourceVersion."""
        with self._cond:
            self._bookmark_generation += 1
            self._cond.notify_all()

    def watch_count(self) -> int:
        """Open watches: requests whose streaming response has started (headers sent)."""
        with self._cond:
            return len(self._watch_connections)

    # --- serving ----------------------------------------------------------------------

    def _list(self, resource: str, namespace: str | None, matches) -> dict:
        with self._cond:
            items = [obj for (ns, _), obj in sorted(self._objects.get(resource, {}).items())
                     if namespace in (None, ns) and matches(obj)]
            kind = _KINDS.get(resource, resource.capitalize())
            return {"kind": f"{kind}List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _watch(self, handler: "_Handler", resource: str, namespace: str | None, matches, query) -> None:
        since = query.get("resourceVersion", "")
        with self._cond:
            if since not in ("", "0") and int(since) < self._oldest_watchable_rv and self._expire_with_http_status:
                raise _Expired(since)
            drop_generation, bookmark_generation = self._drop_generation, self._bookmark_generation
        try:
            handler.start_chunked()
            # A watch counts as open (watch_count(), drop_connections()) only once its response headers
            # are on the wire. Cut before that, the client sees "Remote end closed connection without
            # response" and urllib3 retries the GET inside the same request, so the watcher never
            # notices: a drop that tests count as a watch restart would be silently absorbed.
            # A drop_connections() between the snapshot above and here still cuts this stream: _stream
            # sees the new drop generation at once and ends it without a terminating chunk (so it is
            # not registered: it is not open, and a later drop must not be spent on it).
            with self._cond:
                if self._drop_generation == drop_generation:
                    self._watch_connections.add(handler.connection)
            if since in ("", "0"):   # "any version": start with the current state, as synthetic ADDED events
                listed = self._list(resource, namespace, matches)
                since = listed["metadata"]["resourceVersion"]
                for obj in listed["items"]:
                    handler.send_chunk({"type": "ADDED", "object": obj})
            self._stream(handler, resource, namespace, matches, query, int(since),
                         drop_generation, bookmark_generation)
        finally:
            with self._cond:
                self._watch_connections.discard(handler.connection)

    def _stream(self, handler, resource, namespace, matches, query, position,
                drop_generation, bookmark_generation) -> None:
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 1800))
        bookmarks = query.get("allowWatchBookmarks") == "true"
        kind = _KINDS.get(resource, resource.capitalize())
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._rv > position or time.monotonic() >= deadline
                                    or self._drop_generation != drop_generation
                                    or self._bookmark_generation != bookmark_generation
                                    or position < self._oldest_watchable_rv,
                                    timeout=max(0.0, deadline - time.monotonic()))
                if self._drop_generation != drop_generation:
                    handler.close_connection = True
                    return
                if position < self._oldest_watchable_rv:
                    events = [{"type": "ERROR", "object": _status(
                        410, "Expired", f"too old resource version: {position} ({self._oldest_watchable_rv})")}]
                    deadline = 0.0
                else:
                    events = [self._event(c, namespace, matches) for c in self._history
                              if c.rv > position and c.resource == resource]
                    events = [e for e in events if e]
                    position = self._rv
                    if bookmarks and self._bookmark_generation != bookmark_generation:
                        events.append({"type": "BOOKMARK", "object": {
                            "kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(position)}}})
                bookmark_generation = self._bookmark_generation
            for event in events:
                handler.send_chunk(event)
            if time.monotonic() >= deadline:
                handler.end_chunked()
                return

    @staticmethod
    def _event(change: _Change, namespace: str | None, matches) -> dict | None:
        """What one watch sees of a change: an object that starts or stops
        matching the selector is ADDED or DELETED for that watch."""
        def visible(obj):
            return obj is not None and namespace in (None, obj["metadata"]["namespace"]) and matches(obj)
        now, before = visible(change.obj), visible(change.old)
        if change.type == "DELETED":
            kind = "DELETED" if before else None
        else:
            kind = {(True, True): "MODIFIED", (True, False): "ADDED", (False, True): "DELETED"}.get((now, before))
        return kind and {"type": kind, "object": change.obj}


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # chunked watch streams and keep-alive lists, like the real server

    def setup(self) -> None:
        super().setup()
        fake = self.server.fake
        with fake._cond:
            fake._connections.add(self.connection)

    def finish(self) -> None:
        fake = self.server.fake
        with fake._cond:
            fake._connections.discard(self.connection)
        super().finish()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        fake: FakeApiServer = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        fake.requests.append(Request("GET", url.path, query))
        try:
            group, namespace, resource, name = _parse_path(url.path)
        except ValueError:
            group = name = None
        if name is not None:
            return self.get_object(f"{resource}.{group}" if group else resource, namespace or "", name)
        parts = url.path.strip("/").split("/")
        if parts[:2] != ["api", "v1"] or len(parts) not in (3, 5) or (len(parts) == 5 and parts[2] != "namespaces"):
            return self.send_json(404, _status(404, "NotFound", f"no route for {url.path}"))
        resource, namespace = parts[-1], (parts[3] if len(parts) == 5 else None)
        if fake.delays.get(resource):
            time.sleep(fake.delays[resource])
        if resource in fake.forbidden:
            return self.send_json(403, _status(403, "Forbidden", f"{resource} is forbidden"))
        matches = _selector_matcher(query.get("fieldSelector", ""))
        if query.get("watch") not in ("1", "true"):
            return self.send_json(200, fake._list(resource, namespace, matches))
        try:
            fake._watch(self, resource, namespace, matches, query)
        except _Expired as e:
            self.send_json(410, _status(410, "Expired", f"too old resource version: {e}"))
        except OSError:           # the client went away, or drop_connections() cut the stream
            self.close_connection = True

    def do_POST(self) -> None:
        """Create: the object is stored (and seen by watches) like add()."""
        fake: FakeApiServer = self.server.fake
        url = urlsplit(self.path)
        fake.requests.append(Request("POST", url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            group, namespace, resource, name = _parse_path(url.path)
        except ValueError:
            group = namespace = name = None
        if namespace is None or name is not None:
            return self.send_json(404, _status(404, "NotFound", f"no route for POST {url.path}"))
        try:
            obj = json.loads(body)
            meta = obj["metadata"]
            if not meta.get("name"):
                raise ValueError("metadata.name is required")
        except (ValueError, TypeError, KeyError) as e:
            return self.send_json(400, _status(400, "BadRequest", f"cannot decode the object: {e}"))
        if meta.setdefault("namespace", namespace) != namespace:
            return self.send_json(400, _status(400, "BadRequest", "the namespace of the object does not match "
                                                                  "the namespace of the request"))
        try:
            created = fake.add(f"{resource}.{group}" if group else resource, obj)
        except KeyError:
            return self.send_json(409, _status(409, "AlreadyExists", f"{resource} {meta['name']!r} already exists"))
        self.send_json(201, created)

    def get_object(self, resource: str, namespace: str, name: str) -> None:
        fake: FakeApiServer = self.server.fake
        if resource in fake.forbidden:
            return self.send_json(403, _status(403, "Forbidden", f"{resource} {name!r} is forbidden"))
        obj = fake.objects(resource).get(f"{namespace}/{name}")
        if obj is None:
            return self.send_json(404, _status(404, "NotFound", f"{resource} {name!r} not found"))
        self.send_json(200, obj)

    def refuse(self) -> None:
        url = urlsplit(self.path)
        self.server.fake.requests.append(Request(self.command, url.path, {}))
        self.send_json(405, _status(405, "MethodNotAllowed", "the fake API server only reads and creates"))

    do_PUT = do_PATCH = do_DELETE = refuse

    def send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
