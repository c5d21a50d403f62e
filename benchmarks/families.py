"""Issue 14's benchmark line: does the same-node keep-alive gain of eBPF over
iptables hold for clients on AF_INET6 sockets (native IPv6, or v4-mapped as
the JVM connects) as it does over AF_INET?

Runs `merbridge-py bench --family F` for F in the given families, one round
each (iptables and ebpf blocks paired inside the run), and cycles through the
families `--cycles` times, so a slow drift of a busy machine hits every family
alike. Then, per family and case, the per-run eBPF/iptables ratios: median,
IQR and range. Writes results.json and results.md to --out, and keeps every
run's own results under --out/runs/.

    python benchmarks/families.py --cycles 5 --out benchmarks/results/families

`--aggregate-only` recomputes results.json/results.md from --out/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merbridge_py.bench import machine, stats  # noqa: E402

METRICS = ("p50", "p90", "p99", "rps", "cpu_us_per_req")


def bench_argv(family: str, args, out: Path, name: str) -> list[str]:
    return [str(Path(sys.executable).parent / "merbridge-py"), "bench", "--family", family, "--rounds", "1",
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--modes", "iptables,ebpf",
            "--loads", args.loads, "--paths", "same-node", "--no-plots", "--name", name, "--out", str(out)]


def run_all(args, runs: Path) -> list[dict]:
    log = []
    for cycle in range(args.first_cycle, args.first_cycle + args.cycles):
        order = args.families if cycle % 2 == 0 else list(reversed(args.families))   # who runs first alternates
        for family in order:
            out = runs / f"c{cycle}-{family}"
            name = f"bf{os.getpid() % 10000}{cycle}{family[-1]}"
            before = machine.load_average()
            started = time.monotonic()
            done = subprocess.run(bench_argv(family, args, out, name), capture_output=True, text=True)
            log.append({"cycle": cycle, "family": family, "rc": done.returncode, "loadavg_before": before,
                        "loadavg_after": machine.load_average(), "elapsed_s": time.monotonic() - started,
                        "stderr_tail": done.stderr[-400:] if done.returncode else ""})
            print(f"cycle {cycle} {family}: rc {done.returncode}, {log[-1]['elapsed_s']:.0f} s, load "
                  f"{log[-1]['loadavg_after'][0]:.2f}", flush=True)
    return log


def ratio_of(doc: dict, conns: int, metric: str) -> float | None:
    for r in doc["ratios"]:
        if (r["path"], r["load"], r["connections"]) == ("same-node", "keepalive", conns):
            return r.get(f"{metric}_ebpf_over_iptables")
    return None


def value_of(doc: dict, conns: int, mode: str, metric: str) -> float | None:
    for e in doc["summary"]:
        if (e["path"], e["load"], e["connections"], e["mode"]) == ("same-node", "keepalive", conns, mode):
            return e.get(metric)
    return None


def spread(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "median": None, "iqr": None, "min": None, "max": None}
    return {"n": len(values), "median": stats.median(values), "iqr": stats.iqr(values),
            "q1": stats.quantile(values, 0.25), "q3": stats.quantile(values, 0.75), "min": min(values),
            "max": max(values), "values": values}


def gain_resolved(s: dict, metric: str) -> bool | None:
    """Is the gain itself outside this family's noise: the whole interquartile
    range of its per-run ratios on the better side of 1?"""
    if s["median"] is None:
        return None
    return s["q1"] > 1.0 if metric == "rps" else s["q3"] < 1.0


def aggregate(runs: Path, families: list[str], conns_list: list[int]) -> dict:
    docs = {}
    for d in sorted(runs.iterdir()):
        f = d / "results.json"
        if f.exists():
            doc = json.loads(f.read_text())
            docs[d.name] = doc
    per = {}
    for family in families:
        fam_docs = [(n, d) for n, d in docs.items() if d["config"].get("family", "inet") == family]
        entry = {"runs": [n for n, _ in fam_docs]}
        for conns in conns_list:
            case = {}
            for metric in METRICS:
                case[metric] = spread([v for _, d in fam_docs if (v := ratio_of(d, conns, metric)) is not None])
            for mode in ("iptables", "ebpf"):
                case[f"{mode}_p50_us"] = spread([v for _, d in fam_docs
                                                 if (v := value_of(d, conns, mode, "p50_us")) is not None])
                case[f"{mode}_rps"] = spread([v for _, d in fam_docs
                                              if (v := value_of(d, conns, mode, "rps")) is not None])
            # which legs eBPF spliced: ~2 messages per request per spliced leg, whatever the timing noise
            case["ebpf_spliced_messages_per_request"] = spread([
                r["datapath"]["client and server node"].get("merbridge_spliced_messages_total", 0.0) / r["requests"]
                for _, d in fam_docs for r in d["rounds"]
                if r["mode"] == "ebpf" and r["ok"] and r["connections"] == conns and r.get("datapath")])
            carried = [c for _, d in fam_docs for c in d.get("carried_by", [])
                       if c["mode"] == "ebpf" and c["connections"] == conns]
            case["ebpf_runs_carried_by_ebpf"] = f"{sum(bool(c['carried_by_ebpf']) for c in carried)}/{len(carried)}"
            case["iptables_istio_redirect_packets"] = [c["istio_redirect_packets"] for _, d in fam_docs
                                                       for c in d.get("carried_by", [])
                                                       if c["mode"] == "iptables" and c["connections"] == conns]
            failed = [(n, r["mode"], r["error"]) for n, d in fam_docs for r in d["rounds"]
                      if not r["ok"] and r["connections"] == conns]
            case["failed_runs"] = failed
            entry[f"keepalive c={conns}"] = case
        per[family] = entry
    # Same gain within noise: a family's median ratio differs from inet's by no
    # more than the larger IQR of the two (each family's run-to-run spread).
    verdicts = []
    for family in families:
        if family == "inet" or "inet" not in per:
            continue
        for conns in conns_list:
            for metric in ("p50", "rps", "cpu_us_per_req"):
                a, b = per["inet"][f"keepalive c={conns}"][metric], per[family][f"keepalive c={conns}"][metric]
                if a["median"] is None or b["median"] is None:
                    continue
                diff = b["median"] - a["median"]
                noise = max(a["iqr"], b["iqr"])
                verdicts.append({"family": family, "case": f"keepalive c={conns}", "metric": metric,
                                 "inet_median": a["median"], "family_median": b["median"], "difference": diff,
                                 "noise": noise, "within_noise": abs(diff) <= noise,
                                 "inet_gain_resolved": gain_resolved(a, metric),
                                 "family_gain_resolved": gain_resolved(b, metric)})
    return {"per_family": per, "same_gain": verdicts}


def markdown(agg: dict, meta: dict) -> str:
    lines = ["# Same-node keep-alive: eBPF/iptables per client socket family", "",
             f"Runs: {meta.get('cycles')} cycles × families {', '.join(meta['families'])}, each a fresh "
             f"`merbridge-py bench --family F --rounds 1 --duration {meta.get('duration')} --modes iptables,ebpf "
             f"--loads '{meta.get('loads')}' --paths same-node` (Envoy, 2 workers, Istio's default permissive "
             "mTLS: sidecar-to-sidecar mutual TLS). Ratios are eBPF/iptables within each run (one pair per run); "
             "below 1 is better for latency and CPU, above 1 for req/s.", "",
             "| family | case | metric | median | IQR | min | max | runs |", "|---|---|---|---:|---:|---:|---:|---:|"]
    f3 = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for family, entry in agg["per_family"].items():
        for case, data in entry.items():
            if case == "runs":
                continue
            for metric in METRICS:
                s = data[metric]
                lines.append(f"| {family} | {case} | {metric} | {f3(s['median'])} | {f3(s['iqr'])} | "
                             f"{f3(s['min'])} | {f3(s['max'])} | {s['n']} |")
    lines += ["", "Absolute medians over runs (µs, req/s):", "",
              "| family | case | iptables p50 | eBPF p50 | iptables req/s | eBPF req/s | ebpf runs carried by eBPF "
              "| eBPF spliced msgs/req (min–max) |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    f0 = lambda v: "–" if v is None else f"{v:,.0f}"  # noqa: E731
    for family, entry in agg["per_family"].items():
        for case, data in entry.items():
            if case == "runs":
                continue
            lines.append(f"| {family} | {case} | {f0(data['iptables_p50_us']['median'])} | "
                         f"{f0(data['ebpf_p50_us']['median'])} | {f0(data['iptables_rps']['median'])} | "
                         f"{f0(data['ebpf_rps']['median'])} | {data['ebpf_runs_carried_by_ebpf']} | "
                         f"{f3(data['ebpf_spliced_messages_per_request']['min'])}–"
                         f"{f3(data['ebpf_spliced_messages_per_request']['max'])} |")
    lines += ["", "Same gain as inet within noise? Within noise: |median ratio − inet's median ratio| ≤ the larger "
              "IQR of the two families' per-run ratios. Gain resolved: the family's whole IQR of ratios is on the "
              "better side of 1 (Q3 < 1 for p50 and CPU, Q1 > 1 for req/s); where it is not, 'within noise' says "
              "only that the noise is too large to tell the families apart.", "",
              "| family | case | metric | inet median | family median | difference | noise | within noise | "
              "gain resolved (inet / family) |",
              "|---|---|---|---:|---:|---:|---:|---|---|"]
    yn = {True: "yes", False: "no", None: "–"}
    for v in agg["same_gain"]:
        lines.append(f"| {v['family']} | {v['case']} | {v['metric']} | {f3(v['inet_median'])} | "
                     f"{f3(v['family_median'])} | {v['difference']:+.3f} | {v['noise']:.3f} | "
                     f"{'yes' if v['within_noise'] else 'NO'} | {yn[v['inet_gain_resolved']]} / "
                     f"{yn[v['family_gain_resolved']]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="inet,inet6,mapped")
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--loads", default="keepalive:1,16")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/families"))
    ap.add_argument("--first-cycle", type=int, default=0,
                    help="number the cycles from here: a later batch adds runs to --out instead of replacing them")
    ap.add_argument("--aggregate-only", action="store_true")
    args = ap.parse_args()
    families = args.families = args.families.split(",")
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / "runs.json"
    if not args.aggregate_only:
        batch = {"cycles": args.cycles, "first_cycle": args.first_cycle,
                 "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "loadavg_before": machine.load_average()}
        batch["log"] = run_all(args, runs)
        batch["loadavg_after"] = machine.load_average()
        batch["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = json.loads(meta_path.read_text()) if args.first_cycle and meta_path.exists() else \
            {"families": families, "duration": args.duration, "warmup": args.warmup, "loads": args.loads,
             "batches": []}
        meta["batches"].append(batch)
        meta["cycles"] = sum(b["cycles"] for b in meta["batches"])
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    meta = json.loads(meta_path.read_text())
    conns = sorted({int(c) for spec in meta["loads"].split() for c in spec.partition(":")[2].split(",") if c})
    agg = aggregate(runs, meta["families"], conns)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, **agg}, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(agg, meta))
    print(markdown(agg, meta))


if __name__ == "__main__":
    main()
