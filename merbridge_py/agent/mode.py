"""The agent's mode, ebpf or iptables: set by the cluster-wide ConfigMap or,
for this node alone, through the agent's admin socket (`merbridge-py toggle
--node`). The last writer wins; every switch is logged with its origin."""

from __future__ import annotations

import json
import logging
import threading

from ..datapath import MODES, DatapathError

log = logging.getLogger("merbridge_py.mode")


class ModeController:
    def __init__(self, datapath, metrics=None):
        self.datapath = datapath
        self.metrics = metrics
        self._lock = threading.Lock()
        self._observe()

    @property
    def mode(self) -> str:
        return self.datapath.mode

    def set(self, mode: str, origin: str) -> None:
        with self._lock:
            if mode == self.datapath.mode:
                return
            self.datapath.set_mode(mode)
            log.info("switched to %s mode (%s)", mode, origin)
            self._observe()

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.set_mode(self.datapath.mode)

    def from_config_maps(self, config_maps: dict[str, dict]) -> None:
        """The toggle ConfigMap changed: `data.mode` is ebpf or iptables. A
        missing ConfigMap or key changes nothing; a bad value is logged."""
        for key, cm in config_maps.items():
            mode = ((cm or {}).get("data") or {}).get("mode")
            if mode is None:
                continue
            if mode not in MODES:
                log.error("ConfigMap %s has mode %r; expected one of %s (mode unchanged)", key, mode, ", ".join(MODES))
                continue
            try:
                self.set(mode, f"ConfigMap {key}")
            except DatapathError as e:
                log.error("switching to %s mode failed: %s", mode, e)

    def http_route(self, body: bytes) -> tuple[int, dict]:
        """POST /mode {"mode": "ebpf"|"iptables"}"""
        try:
            mode = json.loads(body or b"{}").get("mode")
        except (ValueError, AttributeError):
            return 400, {"error": 'body must be JSON like {"mode": "iptables"}'}
        if mode not in MODES:
            return 400, {"error": f"mode must be one of {', '.join(MODES)}"}
        try:
            self.set(mode, "admin socket")
        except DatapathError as e:
            return 500, {"error": str(e)}
        return 200, {"mode": self.mode}
