"""The node's mode, ebpf or iptables, where it came from, and why it
survives the agent (issue 18).

Two switches set it: the cluster-wide ConfigMap (`merbridge-py toggle MODE`)
and, for one node, the agent's admin socket (`merbridge-py toggle MODE
--node`). Precedence, the same live and after a restart:

- A per-node switch holds until the next write to the ConfigMap (any change
  of its resourceVersion: `merbridge-py toggle` always writes) or until
  `merbridge-py toggle --node --clear`, which puts the node back on the
  ConfigMap's mode.
- Otherwise the ConfigMap's `data.mode` decides. A ConfigMap that is missing,
  or has no valid `mode`, changes nothing: the last mode it held stays, and
  with none ever seen the default, ebpf, applies.

The decision is persisted beside the pinned maps (`<bpffs>/agent_mode`, a
one-entry BPF array holding JSON: bpffs holds only BPF objects) with every
change, and read back before the programs are loaded, so a restarted agent
(crash, OOM kill, upgrade) attaches in the mode the node was in. In cluster
mode the agent reads the ConfigMap before attaching; while it cannot (API
unreachable, slow, forbidden) it keeps the persisted mode, or with no record
at all stays in iptables mode, and keeps trying. A read failure never turns
the connect programs on. An uninstall (all pins removed, or `merbridge-py
cleanup`) removes the record too, so a reinstall starts from the default.
"""

from __future__ import annotations

import ctypes as ct
import errno
import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import bpf_syscall
from ..datapath import MODE_RECORD_PIN, MODES, DatapathError

log = logging.getLogger("merbridge_py.mode")

DEFAULT_MODE = "ebpf"
RECORD_PIN = MODE_RECORD_PIN   # under --bpffs; the datapath removes it with its pins on an uninstall

# Origins, as persisted and shown by `status`.
DEFAULT = "default"
CONFIG_MAP = "ConfigMap"
NODE_SWITCH = "node switch"
NOT_READ = "waiting for the ConfigMap"   # cluster mode, no record, ConfigMap not read yet: held in iptables mode
UNREADABLE = "persisted record unreadable"   # held in iptables mode until a switch decides

PRECEDENCE = ("a per-node switch (toggle --node) holds until the next write to the ConfigMap or "
              "toggle --node --clear; otherwise the ConfigMap's mode; the default is ebpf")


def now_text() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ModeRecord:
    """What is persisted: the node's mode and where it came from."""

    mode: str
    origin: str                              # DEFAULT, CONFIG_MAP or NODE_SWITCH
    since: str                               # RFC 3339 UTC: when this mode and origin took effect
    configmap_version: str | None = None     # resourceVersion of the ConfigMap last read (None: never read)
    configmap_mode: str | None = None        # the last valid mode seen in it (None: none seen)

    @classmethod
    def parse(cls, text: str) -> "ModeRecord":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("mode") not in MODES or \
                data.get("origin") not in (DEFAULT, CONFIG_MAP, NODE_SWITCH) or not isinstance(data.get("since"), str):
            raise ValueError(f"not a mode record: {text[:200]!r}")
        cm_mode = data.get("configmap_mode")
        cm_version = data.get("configmap_version")
        return cls(data["mode"], data["origin"], data["since"],
                   cm_version if isinstance(cm_version, str) else None, cm_mode if cm_mode in MODES else None)


class _RecordValue(ct.Structure):
    _fields_ = [("text", ct.c_char * 512)]


class ModeStore:
    """The record pinned at `<bpffs>/agent_mode`. A write is one map update:
    a reader (or an agent killed mid-write) sees the old record or the new
    one, never a mix."""

    def __init__(self, bpffs_dir: Path):
        self.path = Path(bpffs_dir) / RECORD_PIN

    def _open(self) -> bpf_syscall.Map:
        return bpf_syscall.Map.open(self.path, ct.c_uint32, _RecordValue)

    def load(self) -> ModeRecord | None:
        """The record, or None when there is none. Raises ValueError for a
        record that cannot be read (the caller decides what is safe)."""
        if not self.path.exists():
            return None
        try:
            m = self._open()
        except OSError as e:
            raise ValueError(f"cannot open {self.path}: {e}") from None
        try:
            value = m.lookup(0)
        finally:
            m.close()
        if value is None or not value.text:
            return None
        try:
            return ModeRecord.parse(value.text.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: {e}") from None

    def save(self, record: ModeRecord) -> None:
        text = json.dumps(asdict(record), separators=(",", ":")).encode()
        if len(text) >= ct.sizeof(_RecordValue):
            raise ValueError(f"mode record too long ({len(text)} bytes)")
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = bpf_syscall.map_create(bpf_syscall.MapType.ARRAY, 4, ct.sizeof(_RecordValue), 1)
            try:
                bpf_syscall.obj_pin(fd, self.path)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
            finally:
                os.close(fd)
        m = self._open()
        try:
            m.update(0, _RecordValue(text))
        finally:
            m.close()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class ModeController:
    """The node's mode: decided from the persisted record, the ConfigMap and
    the per-node switch (precedence in the module comment), applied to the
    datapath, persisted, and reported by `status`.

    `cluster`: the agent watches the ConfigMap (the Kubernetes source); it
    must be read before the datapath attaches in ebpf mode."""

    def __init__(self, datapath, metrics=None, store: ModeStore | None = None, cluster: bool = False):
        self.datapath = datapath
        self.metrics = metrics
        self.store = store
        self.cluster = cluster
        self.config_map_read = threading.Event()   # set by the first successful read of the ConfigMap
        self.config_map_read_at: str | None = None
        self.config_map_error = None               # () -> str | None: the ConfigMap watch's current failure
        self.record_error: str | None = None       # the persisted record could not be read or written
        self.record: ModeRecord | None = None      # the decision in force (None: held, waiting for the ConfigMap)
        self._held_since = now_text()
        self._lock = threading.RLock()
        self._observe()

    @property
    def mode(self) -> str:
        return self.datapath.mode

    # --- start-up ----------------------------------------------------------------

    def restore(self) -> str:
        """Before the datapath is loaded: take the persisted mode (or, with
        none, the default; in cluster mode iptables until the ConfigMap is
        read). Only sets the datapath's mode attribute: load() writes the
        matching config and attach() attaches only that mode's programs."""
        if getattr(self.datapath, "bpf", None) is not None:
            raise RuntimeError("restore() must run before the datapath is loaded")
        record = None
        if self.store is not None:
            try:
                record = self.store.load()
            except (ValueError, OSError) as e:
                # Unknown last mode: the safe one is Istio's own path, until a switch or the ConfigMap decides.
                self.record_error = f"the persisted mode could not be read ({e}); starting in iptables mode"
                log.error("%s", self.record_error)
                self.datapath.mode = "iptables"
                self._observe()
                return self.datapath.mode
        if record is not None:
            self.record = record
            self.datapath.mode = record.mode
            log.info("mode %s restored from %s (%s since %s)", record.mode, self.store.path, record.origin,
                     record.since)
        elif self.cluster:
            self.datapath.mode = "iptables"
            log.info("no persisted mode: iptables until the ConfigMap has been read")
        else:
            # Not persisted: no record means the default anyway, and a start
            # that fails before attaching leaves nothing behind.
            self.datapath.mode = DEFAULT_MODE
            self.record = ModeRecord(DEFAULT_MODE, DEFAULT, now_text())
        self._observe()
        return self.datapath.mode

    @contextmanager
    def locked(self):
        """Hold switches off (e.g. while the datapath attaches in the current mode)."""
        with self._lock:
            yield

    # --- inputs --------------------------------------------------------------------

    def from_config_maps(self, config_maps: dict[str, dict]) -> None:
        """A successful read of the toggle ConfigMap (`{}`: it does not exist)."""
        version, cm_mode = None, None
        for key, cm in config_maps.items():
            version = ((cm or {}).get("metadata") or {}).get("resourceVersion")
            value = ((cm or {}).get("data") or {}).get("mode")
            if value is None:
                continue
            if value not in MODES:
                log.error("ConfigMap %s has mode %r; expected one of %s (ignored)", key, value, ", ".join(MODES))
                continue
            cm_mode = value
        try:
            self._from_config_map(version, cm_mode)
        except DatapathError as e:
            log.error("applying the ConfigMap's mode failed: %s (mode stays %s)", e, self.datapath.mode)

    def _from_config_map(self, version: str | None, cm_mode: str | None) -> None:
        with self._lock:
            first = not self.config_map_read.is_set()
            self.config_map_read_at = now_text()
            self.config_map_read.set()
            cur = self.record
            last_seen = cm_mode or (cur.configmap_mode if cur else None)
            if cur is not None and cur.origin == NODE_SWITCH and (
                    cur.configmap_version is None or version == cur.configmap_version or cm_mode is None):
                # Not a write since the switch (or a switch made before any read: this read is its
                # baseline), or a ConfigMap without a mode: the node's switch holds.
                self._decide(ModeRecord(cur.mode, NODE_SWITCH, cur.since, version or cur.configmap_version, last_seen),
                             "ConfigMap unchanged since the node switch" if first else None)
            elif last_seen is not None:
                self._decide(ModeRecord(last_seen, CONFIG_MAP, now_text(), version, last_seen),
                             f"ConfigMap{' (read at start)' if first else ''}")
            else:
                self._decide(ModeRecord(DEFAULT_MODE, DEFAULT, now_text(), version, None),
                             "no mode in the ConfigMap")

    def switch_node(self, mode: str) -> None:
        """`toggle --node`: this node only, until the next ConfigMap write or --clear."""
        with self._lock:
            cur = self.record
            read = self.config_map_read.is_set()
            self._decide(ModeRecord(mode, NODE_SWITCH, now_text(),
                                    cur.configmap_version if cur and read else None,
                                    cur.configmap_mode if cur else None), "admin socket")

    def clear_node(self) -> None:
        """`toggle --node --clear`: back to the ConfigMap's mode (or the default)."""
        with self._lock:
            cur = self.record
            if cur is None or cur.origin != NODE_SWITCH:
                return
            if self.cluster and not self.config_map_read.is_set():
                raise ModeConflict("the ConfigMap has not been read yet (is the API server reachable?); the node "
                                   "switch stays until it can be; try again")
            if cur.configmap_mode is not None:
                self._decide(ModeRecord(cur.configmap_mode, CONFIG_MAP, now_text(), cur.configmap_version,
                                        cur.configmap_mode), "node switch cleared")
            else:
                self._decide(ModeRecord(DEFAULT_MODE, DEFAULT, now_text(), cur.configmap_version, None),
                             "node switch cleared")

    # --- applying ------------------------------------------------------------------

    def _decide(self, new: ModeRecord, why: str | None) -> None:
        """Apply `new` to the datapath and persist it. A mode that cannot be
        applied is not persisted (the record says what the kernel does)."""
        cur = self.record
        if cur is not None and (cur.mode, cur.origin) == (new.mode, new.origin):
            new.since = cur.since      # the same decision, refreshed: it has held since then
        if new.mode != self.datapath.mode:
            self.datapath.set_mode(new.mode)     # DatapathError: the caller reports it
            log.info("switched to %s mode (%s)", new.mode, why or new.origin)
        elif why and (cur is None or (cur.mode, cur.origin) != (new.mode, new.origin)):
            log.info("%s mode, now by %s (%s)", new.mode, new.origin, why)
        self.record = new
        self._observe()
        if self.store is not None and new != cur:
            try:
                self.store.save(new)
                self.record_error = None
            except (OSError, ValueError) as e:
                self.record_error = f"persisting the mode failed: {e}"
                log.error("%s; a restarted agent may not find it", self.record_error)

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.set_mode(self.datapath.mode)

    # --- reporting -------------------------------------------------------------------

    def status(self) -> dict:
        """The mode fields of `status` (/status JSON)."""
        with self._lock:
            rec = self.record
            error = self.config_map_error() if self.config_map_error else None
            return {
                "mode": self.datapath.mode,
                "mode_origin": rec.origin if rec else (NOT_READ if self.cluster else
                                                       UNREADABLE if self.record_error else DEFAULT),
                "mode_since": rec.since if rec else self._held_since,
                "mode_precedence": PRECEDENCE,
                "configmap": {"watched": self.cluster, "read": self.config_map_read.is_set(),
                              "read_at": self.config_map_read_at,
                              "mode": rec.configmap_mode if rec else None,
                              "resource_version": rec.configmap_version if rec else None,
                              "error": error},
                "mode_record_error": self.record_error,
            }

    def http_route(self, body: bytes) -> tuple[int, dict]:
        """POST /mode {"mode": "ebpf"|"iptables"} or {"clear": true}"""
        try:
            request = json.loads(body or b"{}")
            mode, clear = request.get("mode"), request.get("clear", False)
        except (ValueError, AttributeError):
            return 400, {"error": 'body must be JSON like {"mode": "iptables"} or {"clear": true}'}
        if clear is not True and clear is not False:
            return 400, {"error": '"clear" must be true or false'}
        if clear == (mode is not None):
            return 400, {"error": f'give either "mode" (one of {", ".join(MODES)}) or "clear": true'}
        if not clear and mode not in MODES:
            return 400, {"error": f"mode must be one of {', '.join(MODES)}"}
        try:
            self.clear_node() if clear else self.switch_node(mode)
        except ModeConflict as e:
            return 409, {"error": str(e)}
        except DatapathError as e:
            return 500, {"error": str(e)}
        return 200, {"mode": self.mode}   # origin and the rest: GET /status


class ModeConflict(Exception):
    pass
