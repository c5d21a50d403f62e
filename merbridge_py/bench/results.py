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

SCHEMA_VERSION = 2

# Row fields summarized as the median (<metric>) and IQR (iqr_<metric>) across
# rounds, and compared ebpf/iptables round by round as <name>_ebpf_over_iptables
# (name = metric without "_us").
METRICS = ("p50_us", "p90_us", "p99_us", "rps", "cpu_us_per_req", "throughput_bps",
           # where the CPU goes: the sidecars' user space (out of any kernel
           # datapath's reach) and the system time of every counted process
           "sidecar_user_us_per_req", "kernel_us_per_req")

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
        for metric in ("p50_us", "p99_us"):
            check = stats.worse_than_noise(_by_round(num, metric), _by_round(den, metric))
            if check and check.pairs < MIN_PAIRS_FOR_NOISE:
                check = None
            name = metric.removesuffix("_us")
            entry[f"{name}_noise"] = check.noise if check else None
            entry[f"{name}_within_noise"] = check.passed if check else None
        # req/s: higher is better, so the candidate may fall short by the noise
        rps_den = _by_round(den, "rps")
        ratio = entry["rps_ebpf_over_iptables"] if numerator == "ebpf" else None
        if ratio is not None and entry["pairs"] >= MIN_PAIRS_FOR_NOISE and stats.median(rps_den.values()) > 0:
            entry["rps_noise"] = stats.relative_iqr(rps_den.values())
            entry["rps_within_noise"] = ratio >= 1.0 - entry["rps_noise"]
        else:
            entry["rps_noise"] = entry["rps_within_noise"] = None
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


# Issue 10's goals (Envoy sidecars with mTLS), eBPF / iptables.
TARGETS = (
    Target("same-node keep-alive, 1 connection: p50 ratio <= 0.80",
           SAME_NODE, loads.KEEPALIVE, 1, "p50_ebpf_over_iptables", "<=", 0.80),
    Target("same-node keep-alive, 1 connection: p90 ratio <= 0.80",
           SAME_NODE, loads.KEEPALIVE, 1, "p90_ebpf_over_iptables", "<=", 0.80),
    Target("same-node keep-alive, every connection count: CPU per request ratio <= 0.75",
           SAME_NODE, loads.KEEPALIVE, None, "cpu_us_per_req_ebpf_over_iptables", "<=", 0.75),
    Target("same-node keep-alive, 16 connections: rps ratio >= 1.25",
           SAME_NODE, loads.KEEPALIVE, 16, "rps_ebpf_over_iptables", ">=", 1.25),
    Target("same-node new connection per request: rps ratio >= 1.15",
           SAME_NODE, loads.NEWCONN, None, "rps_ebpf_over_iptables", ">=", 1.15),
)
NOISE_TARGET = "eBPF never worse than iptables at p99 by more than the run's own noise"
CROSS_NODE_TARGET = "cross-node: eBPF never worse than iptables beyond the run's own noise (p50, p99, req/s)"


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
    out.append(_cross_node_target(ratios))
    return out


def _cross_node_target(ratios: Sequence[dict]) -> dict:
    """Every cross-node case with latency and a rate (bulk has neither; the
    fixed-rate load's rate is set by its client, so only its latency counts)."""
    worse, decided = [], 0
    for r in ratios:
        if r["path"] != CROSS_NODE or r["load"] == loads.BULK:
            continue
        checks = [("p50", "<="), ("p99", "<=")] + ([] if r["load"] == loads.FIXEDRATE else [("rps", ">=")])
        for name, op in checks:
            within = r.get(f"{name}_within_noise")
            if within is None:
                continue
            decided += 1
            if not within:
                noise = r[f"{name}_noise"]
                bound = 1 + noise if op == "<=" else 1 - noise
                worse.append(f"{r['load']} c={r['connections']}: {name} ratio {r[f'{name}_ebpf_over_iptables']:.3f} "
                             f"{'>' if op == '<=' else '<'} {bound:.3f} (1 {'+' if op == '<=' else '-'} noise)")
    return {"target": CROSS_NODE_TARGET, "metric": "p50, p99, rps", "op": None, "threshold": None,
            "connections": None, "value": None, "met": (not worse) if decided else None, "detail": worse}


def added_latency(rows: Sequence[dict], load: str = loads.FIXEDRATE, baseline: str = "nomesh") -> list[dict]:
    """Istio's overhead figure: latency a mode adds over no mesh at a fixed
    rate. Per path and mode, the median over rounds of (mode - nomesh) at p50,
    p90 and p99, paired by round; and the share of the iptables mesh's added
    latency that eBPF removes, (iptables_added - ebpf_added) / iptables_added,
    from those medians."""
    out = []
    for path in dict.fromkeys(r["path"] for r in rows if r["load"] == load):
        case = [r for r in rows if r["path"] == path and r["load"] == load]
        base = {m: _by_round([r for r in case if r["mode"] == baseline], m) for m in ("p50_us", "p90_us", "p99_us")}
        entry: dict = {"path": path, "load": load, "connections": case[0]["connections"]}
        added: dict[str, dict[str, float | None]] = {}
        for mode in (m for m in MODES if m != baseline):
            mode_rows = [r for r in case if r["mode"] == mode]
            if not mode_rows:
                continue
            added[mode] = {}
            for metric in ("p50_us", "p90_us", "p99_us"):
                values = _by_round(mode_rows, metric)
                diffs = [values[k] - base[metric][k] for k in sorted(values.keys() & base[metric].keys())]
                added[mode][metric] = stats.median(diffs) if diffs else None
            added[mode]["pairs"] = len(_by_round(mode_rows, "p50_us").keys() & base["p50_us"].keys())
        entry["added_us"] = added
        share = {}
        for metric in ("p50_us", "p90_us", "p99_us"):
            ipt, ebpf = added.get("iptables", {}).get(metric), added.get("ebpf", {}).get(metric)
            share[metric] = (ipt - ebpf) / ipt if ipt is not None and ebpf is not None and ipt > 0 else None
        entry["ebpf_removes_share"] = share
        entry["late_slots"] = sum(r.get("late_slots") or 0 for r in case if r["ok"])
        achieved = [r["rps"] for r in case if r["ok"] and r.get("rps")]
        entry["rps_min"] = min(achieved) if achieved else None
        out.append(entry)
    return out


def datapath_per_request(rows: Sequence[dict]) -> list[dict]:
    """ebpf mode: per case and node role, the median over rounds of each
    datapath counter's increase per request (spliced messages, sockhash
    inserts, skipped splices...): which legs were spliced."""
    out = []
    for key in _case_order(rows):
        case = [r for r in rows if case_key(r) == key and r["mode"] == "ebpf" and r["ok"] and r.get("datapath")
                and r.get("requests")]
        if not case:
            continue
        roles = dict.fromkeys(role for r in case for role in r["datapath"])
        for role in roles:
            names = sorted({k for r in case for k in r["datapath"].get(role, {})})
            per_req = {n: stats.median([r["datapath"].get(role, {}).get(n, 0.0) / r["requests"] for r in case])
                       for n in names}
            out.append({"path": key[0], "load": key[1], "connections": key[2], "node": role,
                        "rounds": len(case), "per_request": per_req})
    return out


REDIRECTS = "merbridge_redirects_total"


def _ebpf_redirects(row: dict) -> float:
    """eBPF connect-hook redirects the datapath counted during a run, over
    the pair's nodes (labelled by direction or not)."""
    return sum(v for counters in (row.get("datapath") or {}).values() for k, v in counters.items()
               if k.split("{")[0] == REDIRECTS)


def carried_by(rows: Sequence[dict]) -> list[dict]:
    """Per case and meshed mode, summed over the rounds that worked: the
    packets that hit the client pod's ISTIO_REDIRECT rule, per family of the
    rules (each is a connection iptables redirected), and the redirects the
    eBPF datapath counted. In ebpf mode the first must be 0 and the second
    not: otherwise the run was (partly) iptables' and its figures are not
    eBPF's. Rows without nat counters (older results, other beds) are left out."""
    out = []
    for key in _case_order(rows):
        for mode in ("iptables", "ebpf"):
            case = [r for r in rows if case_key(r) == key and r["mode"] == mode and r["ok"]
                    and r.get("nat_redirects") is not None]
            if not case:
                continue
            families = dict.fromkeys(f for r in case for f in r["nat_redirects"])
            nat = {f: sum(r["nat_redirects"].get(f, 0) for r in case) for f in families}
            entry = {"path": key[0], "load": key[1], "connections": key[2], "mode": mode, "rounds": len(case),
                     "istio_redirect_packets": nat,
                     "ebpf_redirects": sum(_ebpf_redirects(r) for r in case) if mode == "ebpf" else None}
            if mode == "ebpf":
                entry["carried_by_ebpf"] = not any(nat.values()) and all(_ebpf_redirects(r) > 0 for r in case)
            out.append(entry)
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
        "added_latency": added_latency(rows),
        "datapath": datapath_per_request(rows),
        "carried_by": carried_by(rows),
        "warmup_failures": list(warmup_failures),
    }
