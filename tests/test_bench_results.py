"""From synthetic per-run rows to summary, ratios, targets, schema-valid
results.json, results.md and PNG plots."""

import copy
import json

import pytest

from merbridge_py.bench import plots, report, results, schema

MACHINE = {"kernel": "6.18.0-test", "cpu_count": 2, "cpu_model": "Synthetic CPU", "memory_mib": 1024,
           "tools": {"wrk": "wrk 4.1.0", "sockperf": None},
           "sysctls": [{"name": "net.ipv4.tcp_max_tw_buckets", "default": "4096",
                        "values": {"0": ["mbp-x-pod0"]}, "note": "favours iptables"}]}
CONFIG = {"command": "merbridge-py bench --rounds 3", "quick": False, "rounds": 3, "duration_s": 2, "warmup_s": 1,
          "modes": ["nomesh", "iptables", "ebpf"], "settle_how": "flushed", "started_at": "2025-01-01T00:00:00+00:00",
          "elapsed_s": 42.0, "proxy": "envoy", "proxy_version": "abc/1.40.0/Clean/RELEASE/BoringSSL",
          "mtls": "permissive", "mtls_how": "permissive: mutual TLS between sidecars", "envoy_workers": 2,
          "loadavg_before": [1.0, 1.5, 2.0], "loadavg_after": [2.0, 1.5, 1.0]}


def row(rnd, mode, path, load, conns, p50=None, p99=None, rps=None, ok=True, throughput=None, datapath=None):
    measured = ok and load != "bulk"
    return {"round": rnd, "mode": mode, "path": path, "load": load, "connections": conns,
            "planned_duration_s": 2, "started_at": None, "ok": ok, "error": None if ok else "LoadFailed: boom",
            "duration_s": 2.0 if ok else None, "requests": int(rps * 2) if measured else None,
            "rps": rps if measured else None,
            "p50_us": p50 if measured else None, "p90_us": (p50 + p99) / 2 if measured else None,
            "p99_us": p99 if measured else None, "errors": 0 if ok else None, "bytes": None,
            "throughput_bps": throughput if ok else None, "retransmits": None,
            "cpu_us": {"client": 10.0, "sidecars": 20.0, "apps": 30.0} if ok else None,
            "cpu_us_per_req": 60.0 / (rps * 2) if measured else None,
            "late_slots": 0 if measured and load == "fixedrate" else None, "datapath": datapath}


def synthetic_rows():
    rows = []
    for r in range(3):
        # same-node keep-alive 1: ebpf p50 exactly 0.7 x iptables every round -> target met
        ipt = [100.0, 110.0, 120.0][r]
        rows += [row(r, "nomesh", "same-node", "keepalive", 1, 60.0, 90.0, 9000.0),
                 row(r, "iptables", "same-node", "keepalive", 1, ipt, 2 * ipt, 5000.0),
                 row(r, "ebpf", "same-node", "keepalive", 1, 0.7 * ipt, 2 * ipt, 6000.0)]
        # same-node keep-alive 16: rps ratio 1.5 -> target (>= 1.60) missed; ebpf round 1 fails
        rows += [row(r, "iptables", "same-node", "keepalive", 16, 500.0, 900.0, 1000.0 + r),
                 row(r, "ebpf", "same-node", "keepalive", 16, 400.0, 800.0, 1.5 * (1000.0 + r), ok=(r != 1))]
        # new connection per request: p99 41% worse than a quiet iptables
        rows += [row(r, "iptables", "same-node", "newconn", 4, 300.0, 1000.0, 3000.0),
                 row(r, "ebpf", "same-node", "newconn", 4, 300.0, 1410.0, 2670.0)]
        rows += [row(r, "iptables", "same-node", "bulk", 1, throughput=10e9 + r * 1e9),
                 row(r, "ebpf", "same-node", "bulk", 1, throughput=12e9 + r * 1e9)]
        # Istio's method: nomesh 100/200 us (p50/p99); iptables adds 200/500, ebpf 150/300
        rows += [row(r, "nomesh", "same-node", "fixedrate", 16, 100.0 + r, 200.0, 1000.0),
                 row(r, "iptables", "same-node", "fixedrate", 16, 300.0 + r, 700.0, 1000.0),
                 row(r, "ebpf", "same-node", "fixedrate", 16, 250.0 + r, 500.0, 1000.0)]
        # cross-node: eBPF's p50 half again iptables' (noise 10/210), same p99 and rate
        spliced = {"client node": {"merbridge_spliced_messages_total": 4000.0,
                                   'merbridge_redirects_total{direction="outbound"}': 2.0},
                   "server node": {"merbridge_sockhash_inserts_total": 2.0}}
        rows += [row(r, "iptables", "cross-node", "keepalive", 1, 200.0 + 10 * r, 900.0, 1000.0),
                 row(r, "ebpf", "cross-node", "keepalive", 1, 1.5 * (200.0 + 10 * r), 900.0, 1000.0,
                     datapath=spliced)]
    return rows


@pytest.fixture
def doc():
    return results.build(MACHINE, CONFIG, synthetic_rows(), warmup_failures=["round 1 ebpf: slow"])


def entry(entries, **match):
    found = [e for e in entries if all(e[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_summary_medians_and_iqrs(doc):
    e = entry(doc["summary"], path="same-node", load="keepalive", connections=1, mode="iptables")
    # p50 over rounds [100, 110, 120]: median 110, q25 105, q75 115
    assert e["p50_us"] == pytest.approx(110.0) and e["iqr_p50_us"] == pytest.approx(10.0)
    assert e["p99_us"] == pytest.approx(220.0) and e["rps"] == pytest.approx(5000.0)
    assert e["cpu_us_per_req"] == pytest.approx(60.0 / 10000)
    assert (e["rounds_ok"], e["rounds_failed"]) == (3, 0)
    assert e["throughput_bps"] is None


def test_summary_counts_failed_rounds_and_keeps_bulk_latency_null(doc):
    e = entry(doc["summary"], load="keepalive", connections=16, mode="ebpf")
    assert (e["rounds_ok"], e["rounds_failed"]) == (2, 1)
    bulk = entry(doc["summary"], load="bulk", mode="ebpf")
    assert bulk["p50_us"] is None and bulk["rps"] is None
    assert bulk["throughput_bps"] == pytest.approx(13e9) and bulk["iqr_throughput_bps"] == pytest.approx(1e9)


def test_ratios_are_paired_by_round(doc):
    ka1 = entry(doc["ratios"], path="same-node", load="keepalive", connections=1)
    assert ka1["p50_ebpf_over_iptables"] == pytest.approx(0.7)
    assert ka1["rps_ebpf_over_iptables"] == pytest.approx(1.2)
    assert ka1["pairs"] == 3 and ka1["busy"] == "none"
    # three pairs, all better: the sign test's smallest p is 1/8, so not resolved, and it says it could not be
    assert ka1["verdicts"]["p50_us"] == {"verdict": "not resolved", "pairs": 3, "better": 3, "worse": 0, "ties": 0,
                                         "p_worse": 1.0, "p_better": 0.125, "resolvable": False, "alpha": 0.05}
    # p99 is equal every round: three ties, nothing to test
    assert ka1["verdicts"]["p99_us"]["ties"] == 3 and ka1["verdicts"]["p99_us"]["verdict"] == "not resolved"
    ka16 = entry(doc["ratios"], load="keepalive", connections=16)
    assert ka16["pairs"] == 2 and ka16["rps_ebpf_over_iptables"] == pytest.approx(1.5)
    assert ka16["verdicts"]["rps"]["pairs"] == 2
    nc = entry(doc["ratios"], load="newconn")
    assert nc["pairs"] == 3 and nc["rps_ebpf_over_iptables"] == pytest.approx(0.89)
    assert nc["p99_ebpf_over_iptables"] == pytest.approx(1.41)
    assert nc["verdicts"]["p99_us"]["worse"] == 3
    bulk = entry(doc["ratios"], load="bulk")
    # rounds: 12/10, 13/11, 14/12 -> median 13/11
    assert bulk["throughput_bps_ebpf_over_iptables"] == pytest.approx(13 / 11)
    assert bulk["p50_ebpf_over_iptables"] is None and set(bulk["verdicts"]) == {"throughput_bps"}
    # fixedrate's rate is the client's: not judged
    assert "rps" not in entry(doc["ratios"], load="fixedrate")["verdicts"]
    # nomesh has no partner in the ratio: only ebpf/iptables is reported
    assert not any(k.startswith("p50_nomesh") for k in ka1)


def test_targets_met_missed_and_not_measured(doc):
    by_text = {}
    for t in doc["targets"]:
        by_text.setdefault(t["target"], []).append(t)
    [p50] = by_text["same-node keep-alive, 1 connection: p50 ratio <= 0.80"]
    assert p50["met"] is True and p50["value"] == pytest.approx(0.7)
    [p90] = by_text["same-node keep-alive, 1 connection: p90 ratio <= 0.80"]
    assert p90["met"] is False and p90["value"] == pytest.approx(1.35 / 1.5)
    # one verdict per keep-alive connection count
    cpu = {t["connections"]: t for t in by_text["same-node keep-alive, every connection count: "
                                                "CPU per request ratio <= 0.75"]}
    assert cpu[1]["met"] is False and cpu[16]["met"] is True and cpu[16]["value"] == pytest.approx(1 / 1.5)
    [ka16] = by_text["same-node keep-alive, 16 connections: rps ratio >= 1.25"]
    assert ka16["met"] is True and ka16["value"] == pytest.approx(1.5)
    assert by_text["same-node new connection per request: rps ratio >= 1.15"][0]["met"] is False
    # 3 rounds: no sign test can resolve, so "never worse" is neither met nor missed
    [never] = by_text[results.NEVER_WORSE_TARGET]
    assert never["met"] is None and "had too few pairs to resolve" in never["detail"][-1]
    [cross] = by_text[results.CROSS_NODE_TARGET]
    assert cross["met"] is None


def ten_rounds(ebpf_p99_factors, ebpf_rps_factors=None, busy=None):
    """iptables at p99 1000 us / 1000 req/s every round, eBPF scaled per round."""
    rows = []
    for r, f in enumerate(ebpf_p99_factors):
        g = ebpf_rps_factors[r] if ebpf_rps_factors else 1.0
        for mode, p99, rps in (("iptables", 1000.0, 1000.0), ("ebpf", 1000.0 * f, 1000.0 * g)):
            x = row(r, mode, "cross-node", "newconn", 4, 300.0, p99, rps)
            if busy:
                x["busy"] = busy
            rows.append(x)
    return rows


def test_never_worse_fails_on_a_sign_test_verdict():
    # eBPF's p99 worse in 9 of 10 rounds (P(X >= 9) = 11/1024), its req/s better in all 10
    rows = ten_rounds([1.3] * 9 + [0.9], [1.1] * 10)
    doc = results.build(MACHINE, CONFIG, rows)
    [r] = doc["ratios"]
    assert r["verdicts"]["p99_us"]["verdict"] == "worse"
    assert r["verdicts"]["p99_us"]["p_worse"] == pytest.approx(11 / 1024)
    assert r["verdicts"]["rps"]["verdict"] == "better"
    assert r["verdicts"]["p50_us"]["verdict"] == "not resolved" and r["verdicts"]["p50_us"]["ties"] == 10
    by_text = {t["target"]: t for t in doc["targets"]}
    never = by_text[results.NEVER_WORSE_TARGET]
    assert never["met"] is False
    # p90 (the mean of p50 and p99 in these rows) is worse in the same rounds
    assert never["detail"] == ["cross-node newconn c=4: p90 worse in 9 of 10 pairs (sign test p = 0.011), "
                               "median ratio 1.231",
                               "cross-node newconn c=4: p99 worse in 9 of 10 pairs (sign test p = 0.011), "
                               "median ratio 1.300"]
    assert by_text[results.CROSS_NODE_TARGET]["met"] is False
    md = report.markdown(doc)
    assert "| cross-node | newconn | 4 | none | 1.000 n.r. (0-0) | 1.231 **WORSE** (9-1) | 1.300 **WORSE** (9-1) | " \
           "1.100 better (0-10) | 0.909 better (0-10) |" in md
    # 8 of 10 is not enough (P(X >= 8) = 56/1024 > 0.05): not resolved, and the target holds
    doc = results.build(MACHINE, CONFIG, ten_rounds([1.3] * 8 + [0.9] * 2))
    assert doc["ratios"][0]["verdicts"]["p99_us"]["verdict"] == "not resolved"
    assert {t["target"]: t for t in doc["targets"]}[results.NEVER_WORSE_TARGET]["met"] is True


def test_busy_levels_are_separate_cases():
    rows = ten_rounds([0.9] * 10) + ten_rounds([1.2] * 10, busy="all")
    doc = results.build(MACHINE, CONFIG, rows)
    schema.validate(doc)
    assert [(r["busy"], r["verdicts"]["p99_us"]["verdict"]) for r in doc["ratios"]] == [("none", "better"),
                                                                                         ("all", "worse")]
    assert {e["busy"] for e in doc["summary"]} == {"none", "all"}
    never = {t["target"]: t for t in doc["targets"]}[results.NEVER_WORSE_TARGET]
    assert never["detail"][0].startswith("cross-node newconn c=4 busy=all: p90 worse in 10 of 10")
    assert "| cross-node | newconn | 4 | all | ebpf |" in report.markdown(doc)


def test_tcp_counters_are_summed_per_case_and_compared():
    rows = ten_rounds([1.0] * 10)
    for x in rows:
        timeouts = 3 if x["mode"] == "ebpf" else 1
        x["tcp"] = {"client node": {"TcpRetransSegs": 5, "TcpExtTCPTimeouts": timeouts, "TcpExtTCPSynRetrans": 2},
                    "server node": {"TcpRetransSegs": 1, "TcpExtTCPTimeouts": 0, "TcpExtTCPSynRetrans": 0}}
    rows[0]["tcp"] = None        # a run that recorded none counts nothing
    doc = results.build(MACHINE, CONFIG, rows)
    schema.validate(doc)
    ipt = entry(doc["summary"], mode="iptables")
    assert ipt["tcp"] == {"TcpRetransSegs": 54, "TcpExtTCPTimeouts": 9, "TcpExtTCPSynRetrans": 18}
    assert entry(doc["summary"], mode="ebpf")["tcp"]["TcpExtTCPTimeouts"] == 30
    timeouts = {t["target"]: t for t in doc["targets"]}[results.TIMEOUTS_TARGET]
    assert timeouts["met"] is False and timeouts["detail"] == ["cross-node newconn c=4: eBPF 30 timeouts, iptables 9"]
    assert "| 54 / 9 / 18 |" in report.markdown(doc)
    # results made before the counters existed say so instead of showing zeros
    assert report.tcp_cell({"tcp": None}) == "not recorded"


def test_added_latency_is_istios_overhead_figure(doc):
    [fixed] = doc["added_latency"]
    assert (fixed["path"], fixed["connections"]) == ("same-node", 16)
    assert fixed["added_us"]["iptables"]["p50_us"] == pytest.approx(200.0)
    assert fixed["added_us"]["ebpf"]["p99_us"] == pytest.approx(300.0)
    assert fixed["ebpf_removes_share"]["p50_us"] == pytest.approx(0.25)
    assert fixed["ebpf_removes_share"]["p99_us"] == pytest.approx(0.4)
    assert fixed["late_slots"] == 0 and fixed["rps_min"] == 1000.0


def test_datapath_counters_per_request_per_node(doc):
    [client, server] = [d for d in doc["datapath"] if d["path"] == "cross-node"]
    assert client["node"] == "client node" and client["rounds"] == 3
    assert client["per_request"] == {"merbridge_spliced_messages_total": pytest.approx(2.0),
                                     'merbridge_redirects_total{direction="outbound"}': pytest.approx(0.001)}
    assert server["per_request"] == {"merbridge_sockhash_inserts_total": pytest.approx(0.001)}


def test_built_results_match_the_schema(doc, tmp_path):
    schema.validate(doc)
    # what other tools read is the JSON text: round-trip it
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    schema.validate(json.loads(path.read_text()))


@pytest.mark.parametrize("breakage", [
    lambda d: d.pop("ratios"),
    lambda d: d["summary"][0].pop("iqr_p50_us"),
    lambda d: d["summary"][0].update(mode="cilium"),
    lambda d: d["summary"][0].update(connections=0),
    lambda d: d["ratios"][0].update(p50_ebpf_over_iptables="fast"),
    lambda d: d["rounds"][0].update(p50_us=None),          # an ok keep-alive run must have latency
    lambda d: d["machine"].pop("kernel"),
    lambda d: d["config"].pop("mtls"),
    lambda d: d["config"].update(proxy="linkerd"),
    lambda d: d["config"].update(proxy="haproxy", envoy_workers=None),    # HAProxy speaks no mTLS
    lambda d: d["config"].update(envoy_workers=None),                     # Envoy's worker count is recorded
])
def test_schema_rejects_broken_results(doc, breakage):
    broken = copy.deepcopy(doc)
    breakage(broken)
    with pytest.raises(schema.InvalidResults):
        schema.validate(broken)


def test_markdown_reports_targets_failures_and_sysctls(doc):
    md = report.markdown(doc, plots=["latency.png"])
    assert "| same-node | keepalive | 1 | none | iptables | 110 (10.0) |" in md
    assert "**met**: same-node keep-alive, 1 connection: p50 ratio <= 0.80 (c=1): this run 0.700" in md
    assert "**MISSED**: same-node keep-alive, 1 connection: p90" in md
    assert "**not resolved**: cross-node: no case with a 'worse' verdict" in md
    assert "envoy abc/1.40.0/Clean/RELEASE/BoringSSL, 2 worker threads per sidecar" in md
    assert "permissive: mutual TLS" in md and "1.00/1.50/2.00 before" in md
    assert "| same-node | iptables | 200 | 350 | 500 | 3 |" in md
    assert "| same-node | share eBPF removes | 25% |" in md
    assert "| cross-node | keepalive | 1 | client node | 0.001 | 0.000 | 2.000 | 0.000 | 0.000 |" in md
    # a run that kept no labelled counter cannot tell redirects or skips from none
    unlabelled = [{**d, "per_request": {k: v for k, v in d["per_request"].items() if "{" not in k}}
                  for d in doc["datapath"]]
    assert "| client node | not recorded | 0.000 | 2.000 | 0.000 | not recorded |" in report.datapath_table(unlabelled)
    assert "round 2 ebpf same-node keepalive c=16: LoadFailed: boom" in md
    assert "net.ipv4.tcp_max_tw_buckets | 4096 | 0 in 1 namespace | favours iptables" in md
    assert "![latency.png](latency.png)" in md
    assert "flushed" in md


def test_cases_with_many_errors_are_flagged(doc):
    rows = synthetic_rows()
    for r in rows:
        if r["load"] == "newconn" and r["mode"] == "iptables":
            r["errors"] = r["requests"]          # a server that closes without saying so
        if r["load"] == "keepalive" and r["connections"] == 1 and r["mode"] == "ebpf":
            r["errors"] = 1                      # 1 in 12,000: noise, not a warning
    flagged = report.warnings(results.build(MACHINE, CONFIG, rows))
    assert len(flagged) == 2
    assert flagged[0] == "same-node newconn c=4 iptables: 18000 errors in 18000 requests"
    assert "Connection: close" in flagged[1]
    assert report.warnings(doc) == []


def test_console_output_has_the_table_and_targets(doc):
    text = report.console(doc)
    assert text.startswith("| path | load | conns | node busy | mode |")
    assert "Targets" in text and "MISSED" in text
    assert "1 of 42 runs failed" in text
    assert "Added latency over no mesh" in text


def test_plots_are_pngs(doc, tmp_path):
    written = plots.plot(doc, tmp_path)
    assert written == ["latency.png", "rps.png", "throughput.png"]
    for name in written:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_carried_by_tells_an_ebpf_run_from_an_iptables_one():
    """The client's ISTIO_REDIRECT packets and the eBPF redirects per case and
    mode: an ebpf run with ISTIO_REDIRECT hits (or no eBPF redirect) is flagged."""
    redirect = 'merbridge_redirects_total{direction="outbound"}'
    rows = []
    for r in range(3):
        ipt = row(r, "iptables", "same-node", "keepalive", 16, 100.0, 200.0, 1000.0)
        ipt["nat_redirects"] = {"ipv4": 0, "ipv6": 16}
        ebpf = row(r, "ebpf", "same-node", "keepalive", 16, 80.0, 150.0, 1200.0,
                   datapath={"client and server node": {redirect: 17.0, "merbridge_spliced_messages_total": 9e3}})
        ebpf["nat_redirects"] = {"ipv4": 0, "ipv6": 0}
        rows += [ipt, ebpf]
    carried = results.carried_by(rows)
    assert [(c["mode"], c["istio_redirect_packets"], c["ebpf_redirects"], c.get("carried_by_ebpf"))
            for c in carried] == [("iptables", {"ipv4": 0, "ipv6": 48}, None, None),
                                  ("ebpf", {"ipv4": 0, "ipv6": 0}, 51.0, True)]
    doc = results.build(MACHINE, {**CONFIG, "family": "inet6", "family_how": "AF_INET6 sockets"}, rows)
    schema.validate(doc)
    md = report.markdown(doc)
    assert "- Client sockets: inet6: AF_INET6 sockets" in md
    assert "| same-node | keepalive | 16 | ebpf | ipv4 0, ipv6 0 | 51 | yes |" in md
    assert not any("not carried by eBPF" in w for w in report.warnings(doc))

    # one ebpf round where iptables redirected a connection: the case is not eBPF's
    rows[3]["nat_redirects"] = {"ipv4": 0, "ipv6": 1}
    doc = results.build(MACHINE, CONFIG, rows)
    assert doc["carried_by"][1]["carried_by_ebpf"] is False
    assert any("keepalive c=16 ebpf: not carried by eBPF alone" in w for w in report.warnings(doc))
    # and one with no eBPF redirect at all
    rows[3]["nat_redirects"] = {"ipv4": 0, "ipv6": 0}
    rows[5]["datapath"] = {"client and server node": {"merbridge_spliced_messages_total": 9e3}}
    assert results.carried_by(rows)[1]["carried_by_ebpf"] is False
    # rows without nat counters (results made before) give no table
    assert results.carried_by([row(0, "ebpf", "same-node", "keepalive", 1, 1.0, 2.0, 3.0)]) == []
    bad = copy.deepcopy(results.build(MACHINE, {**CONFIG, "family": "ipv6"}, rows))
    with pytest.raises(schema.InvalidResults, match="family"):
        schema.validate(bad)
