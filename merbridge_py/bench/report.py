"""results.md: the tables a person reads, and the part of it the command prints."""

from __future__ import annotations

from collections.abc import Sequence

from . import loads, tcpstats


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _us(value: float | None) -> str:
    return _num(value, 1 if value is not None and value < 100 else 0)


def _with_iqr(entry: dict, metric: str, fmt=_us) -> str:
    if entry.get(metric) is None:
        return "–"
    return f"{fmt(entry[metric])} ({fmt(entry.get('iqr_' + metric))})"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _busy(e: dict) -> str:
    return e.get("busy", "none")


def _path(e: dict) -> str:
    return e["path"] if _busy(e) == "none" else f"{e['path']} (node busy: {_busy(e)})"


def _load(e: dict) -> str:
    """The load, with the node's background load when there was one."""
    return e["load"] if _busy(e) == "none" else f"{e['load']} (node busy: {_busy(e)})"


def tcp_cell(e: dict) -> str:
    """retransmitted segments / RTO timeouts / SYN retransmissions, summed
    over the case's nodes and rounds ("not recorded" in older results)."""
    tcp = e.get("tcp")
    if tcp is None:
        return "not recorded"
    return " / ".join(_num(tcp.get(k, 0)) for k in tcpstats.SHOWN)


def results_table(summary: Sequence[dict]) -> str:
    lines = ["| path | load | conns | node busy | mode | p50 µs | p90 µs | p99 µs | req/s | CPU µs/req | "
             "TCP retrans / timeouts / SYN retrans | rounds ok | errors |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary:
        if e["load"] == loads.BULK:
            continue
        lines.append(f"| {e['path']} | {e['load']} | {e['connections']} | {_busy(e)} | {e['mode']} | "
                     f"{_with_iqr(e, 'p50_us')} | {_with_iqr(e, 'p90_us')} | {_with_iqr(e, 'p99_us')} | "
                     f"{_with_iqr(e, 'rps', _num)} | {_with_iqr(e, 'cpu_us_per_req', lambda v: _num(v, 1))} | "
                     f"{tcp_cell(e)} | {e['rounds_ok']}/{e['rounds_ok'] + e['rounds_failed']} | {e['errors']} |")
    return "\n".join(lines)


def bulk_table(summary: Sequence[dict]) -> str | None:
    rows = [e for e in summary if e["load"] == loads.BULK]
    if not rows:
        return None
    gbit = lambda v: _num(v / 1e9 if v is not None else None, 2)  # noqa: E731
    lines = ["| path | node busy | mode | Gbit/s | TCP retrans / timeouts / SYN retrans | rounds ok |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {e['path']} | {_busy(e)} | {e['mode']} | {_with_iqr(e, 'throughput_bps', gbit)} | {tcp_cell(e)} | "
              f"{e['rounds_ok']}/{e['rounds_ok'] + e['rounds_failed']} |" for e in rows]
    return "\n".join(lines)


VERDICT_MARK = {"better": "better", "worse": "**WORSE**", "not resolved": "n.r."}


def _with_verdict(r: dict, metric: str) -> str:
    name = metric.removesuffix("_us")
    ratio = _ratio(r.get(f"{name}_ebpf_over_iptables"))
    v = (r.get("verdicts") or {}).get(metric)
    if v is None:
        return ratio
    return f"{ratio} {VERDICT_MARK[v['verdict']]} ({v['worse']}-{v['better']})"


def ratios_table(ratios: Sequence[dict]) -> str:
    """Median paired ratio and the sign test's verdict per metric: worse,
    better or n.r. (not resolved), with (rounds eBPF did worse - rounds it did
    better)."""
    lines = ["| path | load | conns | node busy | p50 | p90 | p99 | req/s | CPU/req | throughput | pairs |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ratios:
        lines.append(f"| {r['path']} | {r['load']} | {r['connections']} | {_busy(r)} | {_with_verdict(r, 'p50_us')} | "
                     f"{_with_verdict(r, 'p90_us')} | {_with_verdict(r, 'p99_us')} | {_with_verdict(r, 'rps')} | "
                     f"{_with_verdict(r, 'cpu_us_per_req')} | {_with_verdict(r, 'throughput_bps')} | {r['pairs']} |")
    return "\n".join(lines)


VERDICT_HOW = ("Each cell: median of the round-by-round ratios eBPF/iptables (below 1 is better for latency and "
               "CPU, above 1 for req/s and throughput), then the verdict of an exact sign test on those paired "
               "ratios with (rounds eBPF did worse - rounds it did better): **WORSE** or better when the "
               "one-sided binomial tail P(X >= that count | n, 1/2) is at most 0.05, n.r. (not resolved) otherwise. "
               "A sign test needs at least 5 untied pairs to resolve anything at 0.05 and 10 pairs resolve only "
               "9-1 splits or clearer, so a run of 3 rounds (--quick) leaves every verdict not resolved.")


def added_latency_table(added: Sequence[dict]) -> str | None:
    """Istio's overhead figure: microseconds each mode adds over no mesh at a
    fixed rate, and the share of iptables' addition that eBPF removes."""
    if not added:
        return None
    lines = ["| path | mode | added p50 µs | added p90 µs | added p99 µs | pairs |", "|---|---|---:|---:|---:|---:|"]
    for a in added:
        for mode, v in a["added_us"].items():
            lines.append(f"| {_path(a)} | {mode} | {_us(v['p50_us'])} | {_us(v['p90_us'])} | {_us(v['p99_us'])} | "
                         f"{v['pairs']} |")
        share = a["ebpf_removes_share"]
        pct = lambda v: "–" if v is None else f"{v:.0%}"  # noqa: E731
        lines.append(f"| {_path(a)} | share eBPF removes | {pct(share['p50_us'])} | {pct(share['p90_us'])} | "
                     f"{pct(share['p99_us'])} | |")
    return "\n".join(lines)


def cpu_split_table(summary: Sequence[dict]) -> str | None:
    rows = [e for e in summary if e["load"] != loads.BULK and e.get("sidecar_user_us_per_req") is not None]
    if not rows:
        return None
    lines = ["| path | load | conns | mode | CPU µs/req | sidecars' user space | kernel (all processes) |",
             "|---|---|---:|---|---:|---:|---:|"]
    one = lambda v: _num(v, 1)  # noqa: E731
    lines += [f"| {e['path']} | {_load(e)} | {e['connections']} | {e['mode']} | {one(e['cpu_us_per_req'])} | "
              f"{one(e['sidecar_user_us_per_req'])} | {one(e['kernel_us_per_req'])} |" for e in rows]
    return "\n".join(lines)


# Counters worth a column, in the order a leg goes through them, and whether
# the agent labels them (by direction, by reason).
DATAPATH_COLUMNS = (
    ("merbridge_redirects_total", "redirects", True),
    ("merbridge_sockhash_inserts_total", "sockhash inserts", False),
    ("merbridge_spliced_messages_total", "spliced msgs", False),
    ("merbridge_splice_misses_total", "splice misses", False),
    ("merbridge_splice_skipped_total", "splice skipped", True),
)


def datapath_table(datapath: Sequence[dict]) -> str | None:
    if not datapath:
        return None
    head = " | ".join(label for _, label, _ in DATAPATH_COLUMNS)
    lines = [f"| path | load | conns | node | {head} |", "|---|---|---:|---|" + "---:|" * len(DATAPATH_COLUMNS)]
    # runs made before the bench kept labelled counters have none at all (not even redirects)
    labelled = any("{" in k for d in datapath for k in d["per_request"])
    for d in datapath:
        cells = []
        for prefix, _, has_labels in DATAPATH_COLUMNS:
            if has_labels and not labelled:
                cells.append("not recorded")
                continue
            # counters with labels (redirects by direction, skips by reason) are summed
            total = sum(v for k, v in d["per_request"].items() if k.split("{")[0] == prefix)
            cells.append(f"{total:.3f}")
        lines.append(f"| {d['path']} | {_load(d)} | {d['connections']} | {d['node']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def carried_table(carried: Sequence[dict]) -> str | None:
    if not carried:
        return None
    lines = ["| path | load | conns | mode | client's ISTIO_REDIRECT packets | eBPF redirects | carried by eBPF |",
             "|---|---|---:|---|---|---:|---|"]
    for c in carried:
        nat = ", ".join(f"{f} {n}" for f, n in c["istio_redirect_packets"].items()) or "–"
        ok = {True: "yes", False: "NO", None: "–"}[c.get("carried_by_ebpf")]
        lines.append(f"| {c['path']} | {_load(c)} | {c['connections']} | {c['mode']} | {nat} | "
                     f"{_num(c['ebpf_redirects'])} | {ok} |")
    return "\n".join(lines)


def targets_section(targets: Sequence[dict]) -> str:
    lines = []
    for t in targets:
        mark = {True: "met", False: "MISSED", None: "not resolved" if t.get("detail") else "not measured"}[t["met"]]
        if t.get("value") is not None:
            where = f" (c={t['connections']})" if t["connections"] is not None else ""
            lines.append(f"- **{mark}**: {t['target']}{where}: this run {t['value']:.3f}")
        else:
            lines.append(f"- **{mark}**: {t['target']}")
        lines += [f"  - {d}" for d in t.get("detail", [])]
    return "\n".join(lines)


# More errors than this fraction of requests makes a case's numbers suspect.
ERROR_WARN_FRACTION = 0.01


def warnings(results: dict) -> list[str]:
    """Cases whose runs saw many errors, with the likely cause where known."""
    totals: dict[tuple, list[int]] = {}
    for r in results["rounds"]:
        if r["ok"] and r["requests"]:
            t = totals.setdefault((r["path"], r["load"], r["connections"], r["mode"]), [0, 0])
            t[0] += r["errors"] or 0
            t[1] += r["requests"]
    flagged = [(load, f"{path} {load} c={conns} {mode}: {errors} errors in {requests} requests")
               for (path, load, conns, mode), (errors, requests) in totals.items()
               if errors > ERROR_WARN_FRACTION * requests]
    out = [text for _, text in flagged]
    out += [f"{c['path']} {c['load']} c={c['connections']} ebpf: not carried by eBPF alone (client's ISTIO_REDIRECT "
            f"packets {c['istio_redirect_packets']}, eBPF redirects {c['ebpf_redirects']:.0f}): its figures are "
            "not eBPF's" for c in results.get("carried_by", []) if c.get("carried_by_ebpf") is False]
    if any(load == loads.NEWCONN for load, _ in flagged):
        out.append("newconn: wrk counts a read error each time a server closes a connection without answering "
                   "`Connection: close`; if errors are about equal to requests, make the app send that header")
    return out


def console(results: dict) -> str:
    """What `merbridge-py bench` prints at the end."""
    parts = [results_table(results["summary"])]
    bulk = bulk_table(results["summary"])
    if bulk:
        parts.append(bulk)
    if results["ratios"]:
        parts += ["eBPF / iptables, median of per-round ratios, sign-test verdict (rounds worse-better):",
                  ratios_table(results["ratios"])]
    added = added_latency_table(results.get("added_latency", []))
    if added:
        parts += ["Added latency over no mesh at a fixed rate (Istio's method):", added]
    parts += ["Targets (a miss is a finding, not an error):", targets_section(results["targets"])]
    warned = warnings(results)
    if warned:
        parts.append("Warnings:\n" + "\n".join(f"- {w}" for w in warned))
    failed = [r for r in results["rounds"] if not r["ok"]]
    if failed:
        parts.append(f"{len(failed)} of {len(results['rounds'])} runs failed; see results.md.")
    return "\n\n".join(parts)


def _proxy_line(cfg: dict) -> str:
    proxy = cfg.get("proxy")
    if proxy is None:
        return "proxy not recorded"
    text = f"{proxy} {cfg.get('proxy_version') or '(version unknown)'}"
    if cfg.get("envoy_workers"):
        text += f", {cfg['envoy_workers']} worker thread{'s' if cfg['envoy_workers'] > 1 else ''} per sidecar"
    return text


def _loadavg(values) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "not recorded"


def markdown(results: dict, plots: Sequence[str] = ()) -> str:
    m, cfg = results["machine"], results["config"]
    tools = "; ".join(v if k.lower() in v.lower() else f"{k} {v}" for k, v in m["tools"].items() if v)
    parts = [
        "# merbridge-py bench results",
        f"- Machine: Linux {m['kernel']}, {m['cpu_count']} × {m['cpu_model']}, {m.get('memory_mib')} MiB",
        f"- Tools: {tools}",
        f"- Command: `{cfg['command']}`",
        f"- Rounds: {cfg['rounds']} × {cfg['duration_s']} s per run, modes interleaved in the order "
        f"{', '.join(cfg['modes'])} in every round, {cfg['warmup_s']} s keep-alive warm-up per mode block",
        f"- Clean state: {cfg['settle_how']}; new-connection runs settle again before they start",
        f"- Sidecars: {_proxy_line(cfg)}; {cfg.get('sidecar_how', 'not recorded')}",
        f"- Client sockets: {cfg.get('family', 'inet')}: "
        f"{cfg.get('family_how', 'AF_INET sockets to the server pod IPv4 address (not recorded: before --family)')}",
        f"- mTLS between sidecars: {cfg.get('mtls_how', cfg.get('mtls', 'not recorded'))}",
        f"- Node busy: {cfg.get('busy_how', 'none: nothing else on the node (not recorded: before --busy)')}",
        f"- Machine load (1/5/15 min load average): {_loadavg(cfg.get('loadavg_before'))} before, "
        f"{_loadavg(cfg.get('loadavg_after'))} after",
        "- Pods: " + ("; ".join(f"{path} {p['client']} ({p['client_ip']}) -> {p['server']} "
                                f"({p.get('target', p['server_ip'])})"
                                for path, p in cfg.get("pods", {}).items()) or "not recorded"),
        f"- Started {cfg['started_at']}, took {cfg['elapsed_s']:.0f} s",
        "",
        "## Results",
        "Median over rounds, interquartile range in parentheses (quartiles by linear interpolation, "
        "numpy's default). CPU is user+system time of the client, both sidecars, the server app "
        "and the node agents (ebpf mode) per request. wrk times a request from its write, so connect cost shows in req/s only. "
        "Errors: wrk's socket errors, timeouts and non-2xx answers, or sockperf's lost, duplicated and "
        "reordered messages, summed over rounds. TCP: increases of TCP's own counters (TcpRetransSegs, "
        "TcpExtTCPTimeouts, TcpExtTCPSynRetrans as nstat names them) in the network namespaces of the case's "
        "nodes and their pods during the runs, summed over rounds; results.json has more of them per run. "
        "Node busy: the background CPU load of the run (none, or stress-ng on half or all of the cores).",
        "",
        results_table(results["summary"]),
    ]
    warned = warnings(results)
    if warned:
        parts += ["", "Warnings:", ""] + [f"- {w}" for w in warned]
    bulk = bulk_table(results["summary"])
    if bulk:
        parts += ["", "Bulk (iperf3, one stream):", "", bulk]
    if results["ratios"]:
        parts += ["", "## eBPF / iptables", VERDICT_HOW, "", ratios_table(results["ratios"])]
    parts += ["", "## Targets", "A miss is a finding to investigate, not a failure of the run.", "",
              targets_section(results["targets"])]
    added = added_latency_table(results.get("added_latency", []))
    if added:
        fixed = cfg.get("fixedrate", {})
        parts += ["", "## Added latency at a fixed rate (Istio's method)",
                  f"{fixed.get('rps', '?')} requests/s in total over the fixedrate case's connections, "
                  f"{fixed.get('payload_bytes', '?')}-byte request bodies, paced by a wrk script (see "
                  "merbridge_py/bench/loads.py); per round, the mode's percentile minus no mesh's, then the median "
                  "over rounds. The share eBPF removes is (iptables added - eBPF added) / iptables added.", "", added]
        late = [f"{a['path']}: {a['late_slots']} late send slots, lowest rate {_num(a['rps_min'])} req/s"
                for a in results["added_latency"]]
        parts += ["", "Schedule: " + "; ".join(late) + " (a late slot is a send the client could not make on time)."]
    split = cpu_split_table(results["summary"])
    if split:
        parts += ["", "## Where the CPU goes, per request",
                  "Medians over rounds. The sidecars' user-space time is the proxies' own work (HTTP, TLS, "
                  "routing), which no kernel datapath can remove; kernel time (system time of the client, "
                  "sidecars, app and agents) is where iptables and eBPF differ.", "", split]
    dp = datapath_table(results.get("datapath", []))
    if dp:
        parts += ["", "## What the datapath did, per request (ebpf mode)",
                  "Increase of each node agent's counters during a run divided by the run's requests, median over "
                  "rounds. The client node runs the client pod and its sidecar, the server node the server pod and "
                  "its sidecar; each spliced leg moves a request and its response, so about 2 spliced messages per "
                  "request per spliced leg (more when a message is split).", "", dp]
    carried = carried_table(results.get("carried_by", []))
    if carried:
        parts += ["", "## Who carried the client's connections",
                  "Summed over the rounds: packets that hit the client pod's ISTIO_REDIRECT rule (iptables; one "
                  "per connection it redirected), per family of the rules, and the redirects the eBPF datapath "
                  "counted. An ebpf run is eBPF's only with no ISTIO_REDIRECT packet and eBPF redirects in every "
                  "round.", "", carried]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    parts += ["", "## Sysctls the test bed set", ""]
    if m["sysctls"]:
        parts += ["| sysctl | fresh namespace | set to (namespaces) | which mode it helps |", "|---|---|---|---|"]
        for s in m["sysctls"]:
            where = "; ".join(f"{v} in {len(ns)} namespace{'s' if len(ns) > 1 else ''}"
                              for v, ns in s["values"].items())
            parts.append(f"| {s['name']} | {s['default']} | {where} | {s['note'] or 'no note: judge by hand'} |")
    else:
        parts.append("None: every net.* sysctl in the bed's namespaces has a fresh namespace's value.")
    failed = [r for r in results["rounds"] if not r["ok"]]
    if failed or results.get("warmup_failures"):
        parts += ["", "## Failures", ""]
        parts += [f"- round {r['round'] + 1} {r['mode']} {r['path']} {r['load']} c={r['connections']}: "
                  f"{r['error']}" for r in failed]
        parts += [f"- warm-up {w}" for w in results.get("warmup_failures", [])]
    return "\n".join(parts) + "\n"
