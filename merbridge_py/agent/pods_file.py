"""A pods file as the agent's source: Kubernetes Pod objects (a Pod, a PodList
or a List, or a stream of Pod documents), YAML or JSON, in the schema the API
server returns. Re-read when it changes; a broken edit keeps the last good
state (nothing is lost), is logged, counted and shown in the agent's status.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import yaml

log = logging.getLogger("merbridge_py.pods_file")


class PodsFileError(ValueError):
    pass


def pod_key(pod: dict) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _documents(text: str, origin: str) -> list:
    if not text.strip():
        # Also what a reader sees while an editor truncates and rewrites the file: never "no pods".
        raise PodsFileError(f"{origin} is empty (for no pods, write a PodList with no items)")
    try:
        # JSON first: what the test bed and `kubectl -o json` write, far faster than YAML.
        return [json.loads(text)]
    except ValueError:
        pass
    except RecursionError:
        raise PodsFileError(f"{origin} is nested too deeply") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return [d for d in yaml.load_all(text, Loader=loader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PodsFileError(f"{origin} is not valid YAML or JSON{where}: {getattr(e, 'problem', e)}; "
                            "fix the file (it must hold Pod objects, a PodList or a List)") from None
    except RecursionError:
        raise PodsFileError(f"{origin} is nested too deeply") from None
    except ValueError as e:   # a YAML scalar that cannot be a value, e.g. the timestamp 2025-13-01
        raise PodsFileError(f"{origin} holds a value YAML cannot read: {str(e).splitlines()[0]}") from None


def parse_pods(text: str, origin: str = "pods file") -> dict[str, dict]:
    pods: list[dict] = []
    for doc in _documents(text, origin):
        if not isinstance(doc, dict):
            raise PodsFileError(f"{origin}: expected Pod objects or a PodList, found a {type(doc).__name__}")
        kind = doc.get("kind")
        if kind in ("PodList", "List"):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise PodsFileError(f"{origin}: {kind}.items is not a list")
            for item in items:
                if not isinstance(item, dict) or item.get("kind", "Pod") != "Pod":
                    raise PodsFileError(f"{origin}: {kind} holds something that is not a Pod")
                pods.append(item)
        elif kind == "Pod":
            pods.append(doc)
        else:
            raise PodsFileError(f"{origin}: expected kind Pod, PodList or List, found kind {_shown(kind)}")
    out: dict[str, dict] = {}
    for pod in pods:
        meta = pod.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
            raise PodsFileError(f"{origin}: a Pod has no metadata.name (a non-empty string)")
        # Other wrong types are the decision's business: such a pod gets a reason, not the whole file.
        # A resourceVersion in a file is not an API server's word that nothing
        # changed (the test bed writes "1", `kubectl get -o yaml` keeps its
        # own): drop it, so the agent compares such pods by content.
        meta.pop("resourceVersion", None)
        out[pod_key(pod)] = pod
    return out


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def load_pods(path: Path) -> dict[str, dict]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PodsFileError(f"cannot read pods file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PodsFileError(f"pods file {path} is not UTF-8 text (byte {e.start})") from None
    return parse_pods(text, f"pods file {path}")


class PodsFileSource:
    def __init__(self, path: Path, on_change: Callable[[dict[str, dict]], None], interval: float = 0.2):
        self.path = Path(path)
        self.on_change = on_change
        self.interval = interval
        self.synced = threading.Event()
        self.last_error: str | None = None
        self.watch_restarts = 0   # same surface as the Kubernetes source
        self.errors = 0           # reads refused (bad file); the last good state was kept

    def _signature(self):
        try:
            st = os.stat(self.path)
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def run(self, stop: threading.Event) -> None:
        seen = object()
        while not stop.is_set():
            sig = self._signature()
            if sig != seen:
                seen = sig
                try:
                    pods = load_pods(self.path)
                except PodsFileError as e:
                    self._failed(str(e))
                except Exception as e:  # noqa: BLE001 - a bug must not end the only source: keep the last state
                    self._failed(f"reading pods file {self.path} failed: {type(e).__name__}: {e}")
                else:
                    self.last_error = None
                    self.on_change(pods)
                    self.synced.set()
            stop.wait(self.interval)

    def _failed(self, error: str) -> None:
        if self.last_error != error:
            log.error("%s (keeping the last good state)", error)
        self.last_error = error
        self.errors += 1
