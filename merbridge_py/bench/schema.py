"""The results.json schema, as a JSON Schema (draft 2020-12) other tools can
use too (`merbridge_py.bench.schema.RESULTS_SCHEMA`), and a validator.

The four keys of the issue (machine, rounds, summary, ratios) and their fields
are required, and so is what decides every figure about the sidecar (config:
proxy, its version, mTLS mode, Envoy's worker count); more keys are allowed,
so adding a metric does not break a reader. Latency fields are null where a load does not measure latency (bulk),
and every metric is null where all rounds of a case failed.
"""

from __future__ import annotations

import jsonschema

from ..testbed.options import MTLS_MODES, PROXIES
from . import busy, stats
from .bed import MODES, PATHS
from .loads import FAMILIES, LOADS

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_P_US = {"p50_us": _NUM_OR_NULL, "p90_us": _NUM_OR_NULL, "p99_us": _NUM_OR_NULL}
_CASE = {
    "path": {"enum": list(PATHS)},
    "load": {"enum": list(LOADS)},
    "connections": {"type": "integer", "minimum": 1},
}
# the node's background CPU load (absent in results made before --busy: none)
_BUSY = {"busy": {"enum": list(busy.LEVELS)}}
# TCP counter name (tcpstats.COUNTERS) -> increase
_TCP_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_VERDICT = {
    "type": "object",
    "required": ["verdict", "pairs", "better", "worse", "ties", "p_worse", "p_better", "resolvable", "alpha"],
    "properties": {
        "verdict": {"enum": [stats.BETTER, stats.WORSE, stats.NOT_RESOLVED]},
        "pairs": {"type": "integer", "minimum": 1},
        "better": {"type": "integer", "minimum": 0}, "worse": {"type": "integer", "minimum": 0},
        "ties": {"type": "integer", "minimum": 0},
        "p_worse": {"type": "number", "minimum": 0, "maximum": 1},
        "p_better": {"type": "number", "minimum": 0, "maximum": 1},
        "resolvable": {"type": "boolean"}, "alpha": {"type": "number"},
    },
}

RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "merbridge-py bench results",
    "type": "object",
    "required": ["machine", "config", "rounds", "summary", "ratios"],
    "properties": {
        "schema_version": {"type": "integer"},
        "config": {
            "type": "object",
            "required": ["command", "proxy", "proxy_version", "mtls", "envoy_workers"],
            "properties": {
                "command": {"type": "string"},
                "proxy": {"enum": list(PROXIES)},
                "proxy_version": {"type": ["string", "null"]},
                "mtls": {"enum": list(MTLS_MODES)},
                # Envoy's --concurrency; null with HAProxy
                "envoy_workers": {"type": ["integer", "null"], "minimum": 1},
                # the clients' socket family (absent in results made before --family: inet)
                "family": {"enum": list(FAMILIES)},
                "busy": {"type": "array", "items": _BUSY["busy"]},
                "loadavg_before": {"type": "array", "items": _NUM},
                "loadavg_after": {"type": "array", "items": _NUM},
            },
            "if": {"properties": {"proxy": {"const": "envoy"}}},
            "then": {"properties": {"envoy_workers": {"type": "integer"}}},
            "else": {"properties": {"mtls": {"const": "off"}}},
        },
        "machine": {
            "type": "object",
            "required": ["kernel", "cpu_count", "cpu_model", "tools", "sysctls"],
            "properties": {
                "kernel": {"type": "string"},
                "cpu_count": {"type": "integer", "minimum": 1},
                "cpu_model": {"type": "string"},
                "tools": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
                "sysctls": {"type": "array", "items": {
                    "type": "object",
                    "required": ["name", "default", "values"],
                }},
            },
        },
        "rounds": {"type": "array", "items": {
            "type": "object",
            "required": ["round", "mode", *_CASE, "ok", "error", "rps", "p50_us", "p90_us", "p99_us",
                         "cpu_us", "cpu_us_per_req"],
            "properties": {
                "round": {"type": "integer", "minimum": 0},
                "mode": {"enum": list(MODES)},
                **_CASE, **_BUSY,
                "busy_workers": {"type": "integer", "minimum": 0},
                # node role -> TCP counter increases during the run in the node's and its pods' namespaces
                "tcp": {"type": ["object", "null"], "additionalProperties": _TCP_COUNTS},
                "ok": {"type": "boolean"},
                "error": {"type": ["string", "null"]},
                "rps": _NUM_OR_NULL, "p50_us": _NUM_OR_NULL, "p90_us": _NUM_OR_NULL, "p99_us": _NUM_OR_NULL,
                "cpu_us": {"type": ["object", "null"], "additionalProperties": _NUM},
                "cpu_us_per_req": _NUM_OR_NULL,
                "late_slots": {"type": ["integer", "null"], "minimum": 0},
                # node role -> counter -> increase during the run (ebpf mode)
                "datapath": {"type": ["object", "null"],
                             "additionalProperties": {"type": "object", "additionalProperties": _NUM}},
                # IP family of the rules -> packets that hit the client pod's ISTIO_REDIRECT (meshed modes)
                "nat_redirects": {"type": ["object", "null"],
                                  "additionalProperties": {"type": "integer", "minimum": 0}},
            },
            # a successful run has the numbers its load measures
            "if": {"properties": {"ok": {"const": True}, "load": {"not": {"const": "bulk"}}}},
            "then": {"properties": {"rps": _NUM, "p50_us": _NUM, "p90_us": _NUM, "p99_us": _NUM}},
        }},
        "summary": {"type": "array", "items": {
            "type": "object",
            "required": [*_CASE, "mode", "p50_us", "p90_us", "p99_us", "rps", "cpu_us_per_req", "iqr_p50_us"],
            "properties": {
                **_CASE, **_BUSY,
                "mode": {"enum": list(MODES)},
                "p50_us": _NUM_OR_NULL, "p90_us": _NUM_OR_NULL, "p99_us": _NUM_OR_NULL,
                "rps": _NUM_OR_NULL, "cpu_us_per_req": _NUM_OR_NULL, "iqr_p50_us": _NUM_OR_NULL,
                # summed over the case's nodes and successful rounds; null when not recorded
                "tcp": {"oneOf": [{"type": "null"}, _TCP_COUNTS]},
            },
        }},
        "ratios": {"type": "array", "items": {
            "type": "object",
            "required": [*_CASE, "p50_ebpf_over_iptables", "rps_ebpf_over_iptables"],
            "properties": {
                **_CASE, **_BUSY,
                "p50_ebpf_over_iptables": _NUM_OR_NULL,
                "rps_ebpf_over_iptables": _NUM_OR_NULL,
                # metric -> the paired sign test (stats.sign_test)
                "verdicts": {"type": "object", "additionalProperties": _VERDICT},
            },
        }},
        "added_latency": {"type": "array", "items": {
            "type": "object",
            "required": [*_CASE, "added_us", "ebpf_removes_share"],
            "properties": {
                **_CASE,
                "added_us": {"type": "object", "additionalProperties": {"type": "object", "properties": _P_US}},
                "ebpf_removes_share": {"type": "object", "properties": _P_US},
            },
        }},
        "datapath": {"type": "array", "items": {
            "type": "object",
            "required": [*_CASE, "node", "per_request"],
            "properties": {**_CASE, "node": {"type": "string"},
                           "per_request": {"type": "object", "additionalProperties": _NUM}},
        }},
        "targets": {"type": "array", "items": {
            "type": "object",
            "required": ["target", "met"],
            "properties": {"target": {"type": "string"}, "met": {"type": ["boolean", "null"]}},
        }},
    },
}


class InvalidResults(ValueError):
    pass


def validate(results: dict) -> None:
    """Raise InvalidResults listing every violation (not only the first)."""
    validator = jsonschema.Draft202012Validator(RESULTS_SCHEMA)
    problems = sorted(validator.iter_errors(results), key=lambda e: list(e.absolute_path))
    if problems:
        lines = [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in problems[:20]]
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise InvalidResults("results.json does not match its schema:\n" + "\n".join(lines) + more)
