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

SCHEMA_VERSION = 3

# Row fields summarized as the median (<metric>) and IQR (iqr_<metric>) across
# rounds, and compared ebpf/iptables round by round as <name>_ebpf_over_iptables
# (name = metric without "_us").
METRICS = ("p50_us", "p90_us", "p99_us", "rps", "cpu_us_per_req", "throughput_bps",
           # where the CPU goes: the sidecars' user space (out of any kernel
           # datapath's reach) and the system time of every counted process
           "sidecar_user_us_per_req", "kernel_us_per_req")

# Metrics judged by the paired sign test (stats.sign_test), with the direction
# that is better. fixedrate's req/s is set by its client, so it is not judged.
VERDICT_METRICS = (("p50_us", stats.LOWER_IS_BETTER), ("p90_us", stats.LOWER_IS_BETTER),
                   ("p99_us", stats.LOWER_IS_BETTER), ("rps", stats.HIGHER_IS_BETTER),
                   ("cpu_us_per_req", stats.LOWER_IS_BETTER), ("throughput_bps", stats.HIGHER_IS_BETTER))

# The node's background CPU load of a run (busy.LEVELS); rows made before
# --busy ran on a node left alone
DEFAULT_BUSY = "none"

CaseKey = tuple[str, str, int, str]   # (path, load, connections, busy)


def case_key(row: dict) -> CaseKey:
    return row["path"], row["load"], row["connections"], row.get("busy", DEFAULT_BUSY)


def _case_fields(key: CaseKey) -> dict:
    path, load, conns, busy = key
    return {"path": path, "load": load, "connections": conns, "busy": busy}


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
            entry = {**_case_fields(key), "mode": mode}
            for metric in METRICS:
                values = list(_by_round(group, metric).values())
                entry[metric], entry[f"iqr_{metric}"] = stats.summarize(values)
            entry["rounds_ok"] = sum(1 for r in group if r["ok"])
            entry["rounds_failed"] = sum(1 for r in group if not r["ok"])
            entry["errors"] = sum(r["errors"] or 0 for r in group if r["ok"])
            entry["tcp"] = tcp_totals(group)
            out.append(entry)
    return out


def tcp_totals(rows: Iterable[dict]) -> dict[str, int] | None:
    """TCP counter increases summed over the rows' nodes and successful
    rounds; None when no row recorded them (results made before they were)."""
    recorded = [r["tcp"] for r in rows if r["ok"] and r.get("tcp") is not None]
    if not recorded:
        return None
    out: dict[str, int] = {}
    for per_node in recorded:
        for counters in per_node.values():
            for k, v in counters.items():
                out[k] = out.get(k, 0) + v
    return out


def paired_ratios(rows: Sequence[dict], numerator: str = "ebpf", denominator: str = "iptables") -> list[dict]:
    """Per case: median of the round-by-round ratios numerator/denominator for
    each metric, and the sign test's verdict on each (verdicts: metric ->
    better / worse / not resolved with its counts and p-values)."""
    out = []
    for key in _case_order(rows):
        case_rows = [r for r in rows if case_key(r) == key]
        num = [r for r in case_rows if r["mode"] == numerator]
        den = [r for r in case_rows if r["mode"] == denominator]
        if not num or not den:
            continue
        entry = _case_fields(key)
        for metric in METRICS:
            name = metric.removesuffix("_us")
            entry[f"{name}_{numerator}_over_{denominator}"] = stats.median_paired_ratio(
                _by_round(num, metric), _by_round(den, metric))
        entry["pairs"] = len({r["round"] for r in num if r["ok"]} & {r["round"] for r in den if r["ok"]})
        entry["verdicts"] = verdicts(num, den, key[1])
        out.append(entry)
    return out


def verdicts(candidate: Sequence[dict], baseline: Sequence[dict], load: str) -> dict[str, dict]:
    """metric -> the sign test of candidate/baseline over the paired rounds,
    for each metric the load measures."""
    out = {}
    for metric, direction in VERDICT_METRICS:
        if metric == "rps" and load == loads.FIXEDRATE:
            continue
        ratios = stats.paired_ratios(_by_round(candidate, metric), _by_round(baseline, metric))
        if not ratios:
            continue
        t = stats.sign_test(ratios, direction)
        out[metric] = {"verdict": t.verdict, "pairs": t.pairs, "better": t.better, "worse": t.worse,
                       "ties": t.ties, "p_worse": t.p_worse, "p_better": t.p_better,
                       "resolvable": t.resolvable, "alpha": t.alpha}
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
NEVER_WORSE_TARGET = ("eBPF never worse than iptables: no case with a 'worse' verdict of the paired sign test "
                      "(p50, p90, p99, req/s, CPU/request, throughput)")
CROSS_NODE_TARGET = "cross-node: no case with a 'worse' verdict of the paired sign test (p50, p90, p99, req/s)"
TIMEOUTS_TARGET = "no eBPF case has more TCP retransmission timeouts (TCPTimeouts, all rounds) than iptables"


def evaluate_targets(ratios: Sequence[dict], summary: Sequence[dict] = ()) -> list[dict]:
    """Each target of the issue with this run's value and whether it was met;
    met is null when this run did not measure the case (e.g. --quick without it)."""
    out = []
    for t in TARGETS:
        matching = [r for r in ratios if (r["path"], r["load"]) == (t.path, t.load)
                    and r.get("busy", DEFAULT_BUSY) == DEFAULT_BUSY
                    and (t.connections is None or r["connections"] == t.connections)
                    and r.get(t.metric) is not None]
        if not matching:
            out.append({"target": t.text, "metric": t.metric, "op": t.op, "threshold": t.threshold,
                        "connections": t.connections, "value": None, "met": None})
        for r in matching:
            out.append({"target": t.text, "metric": t.metric, "op": t.op, "threshold": t.threshold,
                        "connections": r["connections"], "value": r[t.metric], "met": t.met_by(r[t.metric])})
    out.append(_never_worse(NEVER_WORSE_TARGET, ratios, [m for m, _ in VERDICT_METRICS]))
    out.append(_never_worse(CROSS_NODE_TARGET, [r for r in ratios if r["path"] == CROSS_NODE],
                            ["p50_us", "p90_us", "p99_us", "rps"]))
    out.append(_timeouts_target(summary))
    return out


def case_label(r: dict) -> str:
    busy = r.get("busy", DEFAULT_BUSY)
    return f"{r['path']} {r['load']} c={r['connections']}" + ("" if busy == DEFAULT_BUSY else f" busy={busy}")


def _never_worse(text: str, ratios: Sequence[dict], metrics: Sequence[str]) -> dict:
    """met: false when any verdict is 'worse'; true when none is and every
    test had enough pairs to resolve; null when some had too few (a quick run:
    absence of a 'worse' verdict then proves nothing)."""
    worse, unresolvable, tests = [], 0, 0
    for r in ratios:
        for metric in metrics:
            v = (r.get("verdicts") or {}).get(metric)
            if v is None:
                continue
            tests += 1
            unresolvable += not v["resolvable"]
            if v["verdict"] == stats.WORSE:
                name = metric.removesuffix("_us")
                worse.append(f"{case_label(r)}: {name} worse in {v['worse']} of {v['pairs']} pairs "
                             f"(sign test p = {v['p_worse']:.3f}), median ratio "
                             f"{r[f'{name}_ebpf_over_iptables']:.3f}")
    detail = list(worse)
    if unresolvable:
        detail.append(f"{unresolvable} of {tests} tests had too few pairs to resolve "
                      f"(the sign test needs >= {stats.min_pairs_to_resolve()} untied pairs at alpha {stats.ALPHA})")
    met = False if worse else (None if unresolvable or not tests else True)
    return {"target": text, "metric": ", ".join(metrics), "op": None, "threshold": None, "connections": None,
            "value": None, "met": met, "detail": detail}


def _timeouts_target(summary: Sequence[dict]) -> dict:
    by_case: dict[CaseKey, dict[str, int]] = {}
    for e in summary:
        if e["mode"] in ("ebpf", "iptables") and e.get("tcp") is not None:
            by_case.setdefault(case_key(e), {})[e["mode"]] = e["tcp"].get("TcpExtTCPTimeouts", 0)
    compared = {k: v for k, v in by_case.items() if len(v) == 2}
    more = [f"{case_label(_case_fields(k))}: eBPF {v['ebpf']} timeouts, iptables {v['iptables']}"
            for k, v in compared.items() if v["ebpf"] > v["iptables"]]
    return {"target": TIMEOUTS_TARGET, "metric": "TcpExtTCPTimeouts", "op": "<=", "threshold": None,
            "connections": None, "value": None, "met": (not more) if compared else None, "detail": more}


def added_latency(rows: Sequence[dict], load: str = loads.FIXEDRATE, baseline: str = "nomesh") -> list[dict]:
    """Istio's overhead figure: latency a mode adds over no mesh at a fixed
    rate. Per path and mode, the median over rounds of (mode - nomesh) at p50,
    p90 and p99, paired by round; and the share of the iptables mesh's added
    latency that eBPF removes, (iptables_added - ebpf_added) / iptables_added,
    from those medians."""
    out = []
    for path, busy in dict.fromkeys((r["path"], r.get("busy", DEFAULT_BUSY)) for r in rows if r["load"] == load):
        case = [r for r in rows if r["path"] == path and r["load"] == load and r.get("busy", DEFAULT_BUSY) == busy]
        base = {m: _by_round([r for r in case if r["mode"] == baseline], m) for m in ("p50_us", "p90_us", "p99_us")}
        entry: dict = {"path": path, "load": load, "connections": case[0]["connections"], "busy": busy}
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
            out.append({**_case_fields(key), "node": role,
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
            entry = {**_case_fields(key), "mode": mode, "rounds": len(case),
                     "istio_redirect_packets": nat,
                     "ebpf_redirects": sum(_ebpf_redirects(r) for r in case) if mode == "ebpf" else None}
            if mode == "ebpf":
                entry["carried_by_ebpf"] = not any(nat.values()) and all(_ebpf_redirects(r) > 0 for r in case)
            out.append(entry)
    return out


def build(machine: dict, config: dict, rows: list[dict], warmup_failures: Sequence[str] = ()) -> dict:
    ratios = paired_ratios(rows)
    summary = summarize(rows)
    return {
        "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "config": config,
        "rounds": rows,
        "summary": summary,
        "ratios": ratios,
        "targets": evaluate_targets(ratios, summary),
        "added_latency": added_latency(rows),
        "datapath": datapath_per_request(rows),
        "carried_by": carried_by(rows),
        "warmup_failures": list(warmup_failures),
    }
