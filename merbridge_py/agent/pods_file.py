"""A pods file as the agent's source: Kubernetes Pod objects (a Pod, a PodList
or a List, or a stream of Pod documents), YAML or JSON, in the schema the API
server returns. Re-read when it changes; a broken edit keeps the last good
state (nothing is lost) and is logged.
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


def _documents(text: str) -> list:
    # JSON (what the test bed and `kubectl get -o json` write) is YAML too, but
    # PyYAML's pure-Python parser left the agent ~30 MB larger after reading 200
    # pods than json does (benchmarks/agent_footprint.py).
    try:
        doc = json.loads(text)
    except ValueError:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    return [] if doc is None else [doc]


def parse_pods(text: str, origin: str = "pods file") -> dict[str, dict]:
    try:
        docs = _documents(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PodsFileError(f"{origin} is not valid YAML or JSON{where}: {getattr(e, 'problem', e)}; "
                            "fix the file (it must hold Pod objects, a PodList or a List)") from None
    pods: list[dict] = []
    for doc in docs:
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
            raise PodsFileError(f"{origin}: expected kind Pod, PodList or List, found kind {kind!r}")
    out: dict[str, dict] = {}
    for pod in pods:
        if not isinstance(pod.get("metadata"), dict) or not pod["metadata"].get("name"):
            raise PodsFileError(f"{origin}: a Pod has no metadata.name")
        out[pod_key(pod)] = pod
    return out


def load_pods(path: Path) -> dict[str, dict]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PodsFileError(f"cannot read pods file {path}: {e.strerror}") from None
    return parse_pods(text, f"pods file {path}")


class PodsFileSource:
    def __init__(self, path: Path, on_change: Callable[[dict[str, dict]], None], interval: float = 0.2):
        self.path = Path(path)
        self.on_change = on_change
        self.interval = interval
        self.synced = threading.Event()
        self.last_error: str | None = None
        self.watch_restarts = 0   # same surface as the Kubernetes source

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
                    if self.last_error != str(e):
                        log.error("%s (keeping the last good state)", e)
                    self.last_error = str(e)
                else:
                    self.last_error = None
                    self.on_change(pods)
                    self.synced.set()
            stop.wait(self.interval)
