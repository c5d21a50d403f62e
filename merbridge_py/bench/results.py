"""From raw per-run rows to the summary, the paired ratios and the targets of
results.json. Pure functions of the rows, so a results.json can be recomputed
(and checked) from its own "rounds".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import loads, stats
from .bed import CROSS_NODE, MODES, SAME_NODE

SCHEMA_VERSION = 1

# Row fields summarized as the median (<metric>) and IQR (iqr_<metric>) across
# rounds, and compared ebpf/iptables round by round as <name>_ebpf_over_iptables
# (name = metric without "_us").
METRICS = ("p50_us", "p90_us", "p99_us", "rps", "cpu_us_per_req", "throughput_bps")

# With fewer pairs the IQR of the baseline is not an estimate of anything (one
# round has an IQR of 0), so the noise check is left undecided.
MIN_PAIRS_FOR_NOISE = 3

CaseKey = tuple[str, str, int]   # (path, load, connections)


def case_key(row: dict) -> CaseKey:
    return row["path"], row["load"], row["connections"]


def _by_round(rows: Iterable[dict], field: str) -> dict[int, float]:
    return {r["round"]: r[field] for r in rows if r["ok"] and r.get(field) is not None}


def _case_order(rows: Sequence[dict]) -> list[CaseKey]:
    return list(dict.fromkeys(case_key(r) for r in rows))


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One entry per (path, load, connections, mode): medians and IQRs across
    the rounds that succeeded. Metrics a load does not measure are null (bulk
    has no request latency; only bulk has throughput)."""
    groups: dict[tuple[CaseKey, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(case_key(r), r["mode"])].append(r)
    out = []
    for key in _case_order(rows):
        for mode in MODES:
            group = groups.get((key, mode))
            if not group:
                continue
            path, load, conns = key
            entry = {"path": path, "load": load, "connections": conns, "mode": mode}
            for metric in METRICS:
                values = list(_by_round(group, metric).values())
                entry[metric], entry[f"iqr_{metric}"] = stats.summarize(values)
            entry["rounds_ok"] = sum(1 for r in group if r["ok"])
            entry["rounds_failed"] = sum(1 for r in group if not r["ok"])
            entry["errors"] = sum(r["errors"] or 0 for r in group if r["ok"])
            out.append(entry)
    return out


def paired_ratios(rows: Sequence[dict], numerator: str = "ebpf", denominator: str = "iptables") -> list[dict]:
    """Per case: median of the round-by-round ratios numerator/denominator for
    each metric, and whether numerator's p99 stays within denominator's noise."""
    out = []
    for key in _case_order(rows):
        case_rows = [r for r in rows if case_key(r) == key]
        num = [r for r in case_rows if r["mode"] == numerator]
        den = [r for r in case_rows if r["mode"] == denominator]
        if not num or not den:
            continue
        path, load, conns = key
        entry = {"path": path, "load": load, "connections": conns}
        for metric in METRICS:
            name = metric.removesuffix("_us")
            entry[f"{name}_{numerator}_over_{denominator}"] = stats.median_paired_ratio(
                _by_round(num, metric), _by_round(den, metric))
        entry["pairs"] = len({r["round"] for r in num if r["ok"]} & {r["round"] for r in den if r["ok"]})
        check = stats.worse_than_noise(_by_round(num, "p99_us"), _by_round(den, "p99_us"))
        if check and check.pairs < MIN_PAIRS_FOR_NOISE:
            check = None
        entry["p99_noise"] = check.noise if check else None
        entry["p99_within_noise"] = check.passed if check else None
        out.append(entry)
    return out


@dataclass(frozen=True)
class Target:
    text: str
    path: str
    load: str
    connections: int | None      # None: any connection count of that load
    metric: str                  # a key of a ratios entry
    op: str                      # "<=" or ">="
    threshold: float

    def met_by(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold


TARGETS = (
    Target("same-node keep-alive, 1 connection: p50 ratio <= 0.75",
           SAME_NODE, loads.KEEPALIVE, 1, "p50_ebpf_over_iptables", "<=", 0.75),
    Target("same-node keep-alive, 16 connections: rps ratio >= 1.60",
           SAME_NODE, loads.KEEPALIVE, 16, "rps_ebpf_over_iptables", ">=", 1.60),
    Target("same-node new connection per request: rps ratio >= 1.30",
           SAME_NODE, loads.NEWCONN, None, "rps_ebpf_over_iptables", ">=", 1.30),
    Target("cross-node keep-alive, 1 connection: p50 ratio <= 0.90",
           CROSS_NODE, loads.KEEPALIVE, 1, "p50_ebpf_over_iptables", "<=", 0.90),
)
NOISE_TARGET = "eBPF never worse than iptables at p99 by more than the run's own noise"


def evaluate_targets(ratios: Sequence[dict]) -> list[dict]:
    """Each target of the issue with this run's value and whether it was met;
    met is null when this run did not measure the case (e.g. --quick without it)."""
    out = []
    for t in TARGETS:
        matching = [r for r in ratios if (r["path"], r["load"]) == (t.path, t.load)
                    and (t.connections is None or r["connections"] == t.connections)
                    and r.get(t.metric) is not None]
        if not matching:
            out.append({"target": t.text, "metric": t.metric, "op": t.op, "threshold": t.threshold,
                        "connections": t.connections, "value": None, "met": None})
        for r in matching:
            out.append({"target": t.text, "metric": t.metric, "op": t.op, "threshold": t.threshold,
                        "connections": r["connections"], "value": r[t.metric], "met": t.met_by(r[t.metric])})
    checked = [r for r in ratios if r["p99_within_noise"] is not None]
    worse = [f"{r['path']} {r['load']} c={r['connections']}: p99 ratio {r['p99_ebpf_over_iptables']:.3f} "
             f"> 1 + noise {r['p99_noise']:.3f}" for r in checked if not r["p99_within_noise"]]
    out.append({"target": NOISE_TARGET, "metric": "p99_ebpf_over_iptables", "op": "<=",
                "threshold": None, "connections": None, "value": None,
                "met": (not worse) if checked else None, "detail": worse})
    return out


def build(machine: dict, config: dict, rows: list[dict], warmup_failures: Sequence[str] = ()) -> dict:
    ratios = paired_ratios(rows)
    return {
        "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "config": config,
        "rounds": rows,
        "summary": summarize(rows),
        "ratios": ratios,
        "targets": evaluate_targets(ratios),
        "warmup_failures": list(warmup_failures),
    }
