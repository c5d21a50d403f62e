"""Issue 20's byte-order stress run through Envoy sidecars: >= 200,000
connections that write a header and then a body in several calls the moment
connect() returns, every byte checked by the server (merbridge_py/testbed/
order_load.py), same-node (a -> b) and cross-node (a -> d) at once, under CPU
contention (busy-loop processes, started and stopped by pid) and across mode
switches (`merbridge-py toggle` ebpf <-> iptables on every node every
--toggle-every seconds).

    sudo .venv/bin/python benchmarks/byte_order.py                     # 200,000 connections
    sudo .venv/bin/python benchmarks/byte_order.py --connections 20000 --toggle-every 0 --hogs 0

The port (9300) is not declared on the pods, so Envoy carries it as istiod
does an undeclared port: virtualOutbound's PassthroughCluster to the peer,
virtualInbound's passthrough chain to the app from 127.0.0.6 (plain text
between the sidecars). The agents run with the product's default splice
policy (adaptive), so the printed sockhash inserts say how many sockets were
actually spliced. Prints one JSON document and exits 1 if any byte was
reordered, corrupted or missing, or a connection failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

from merbridge_py.testbed import PodSpec, Testbed

ORDER_PORT = 9300


def toggle_every_node(tb: Testbed, mode: str) -> None:
    for node in tb.agents:
        subprocess.run([sys.executable, "-m", "merbridge_py.cli", "toggle", mode, "--node",
                        "--admin-socket", str(tb.admin_socket(node))], check=True, capture_output=True, timeout=120)


def sockhash_inserts(tb: Testbed) -> float:
    return sum(tb.agent_metrics(node).get("merbridge_sockhash_inserts_total", 0.0) for node in tb.agents)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200_000, help="in total, half to each path")
    parser.add_argument("--workers", type=int, default=4, help="client processes per path")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy-loop processes")
    parser.add_argument("--toggle-every", type=float, default=60.0, help="seconds between mode switches (0: none)")
    parser.add_argument("--name", default=f"ord{os.getpid() % 10000}")
    args = parser.parse_args()

    started = time.monotonic()
    pods = [PodSpec("a", node=0), PodSpec("b", node=0), PodSpec("d", node=1)]
    hogs: list[subprocess.Popen] = []
    servers: dict[str, subprocess.Popen] = {}
    toggles: list[str] = []
    stop_toggling = threading.Event()
    with Testbed.up(args.name, nodes=2, pods=pods, mode="ebpf") as tb:
        try:
            for pod in ("b", "d"):
                servers[pod] = tb.exec(pod, [sys.executable, "-m", "merbridge_py.testbed.order_load", "serve",
                                             "--port", str(ORDER_PORT), "--workers", "2"],
                                       stdout=subprocess.PIPE, text=True)
                assert servers[pod].stdout.readline().strip() == "ready", f"order server in {pod} did not start"
            inserts_before = sockhash_inserts(tb)
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]

            def toggler():
                mode = "ebpf"
                while not stop_toggling.wait(args.toggle_every):
                    mode = "iptables" if mode == "ebpf" else "ebpf"
                    toggle_every_node(tb, mode)
                    toggles.append(f"{time.monotonic() - started:.0f}s:{mode}")
                if mode != "ebpf":
                    toggle_every_node(tb, "ebpf")   # counters are read in ebpf mode at the end

            thread = threading.Thread(target=toggler, daemon=True) if args.toggle_every > 0 else None
            if thread:
                thread.start()
            clients = {
                path: tb.exec("a", [sys.executable, "-m", "merbridge_py.testbed.order_load", "send",
                                    "--target", f"{tb.pod(dst).ip}:{ORDER_PORT}", "--workers", str(args.workers),
                                    "--connections", str(args.connections // 2), "--seed", str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for seed, (path, dst) in enumerate((("same-node", "b"), ("cross-node", "d")), start=1)}
            sent = {}
            for path, client in clients.items():
                out, err = client.communicate()
                if client.returncode != 0:
                    raise RuntimeError(f"{path} client failed: {err[-2000:]}")
                sent[path] = json.loads(out)
            stop_toggling.set()
            if thread:
                thread.join(300)
            inserted = sockhash_inserts(tb) - inserts_before
        finally:
            stop_toggling.set()
            for hog in hogs:
                hog.kill()
                hog.wait()
            received = {}
            for pod, server in servers.items():
                server.send_signal(signal.SIGTERM)
                line = server.stdout.readline()
                server.wait(30)
                received[pod] = json.loads(line) if line.strip() else None

    totals = {k: sum(s[k] for s in sent.values()) for k in ("connections", "bytes", "ok", "reordered", "corrupted",
                                                             "short", "errors")}
    report = {"connections": totals["connections"], "bytes_checked": totals["bytes"], "ok": totals["ok"],
              "reordered": totals["reordered"], "corrupted": totals["corrupted"], "short": totals["short"],
              "failed_connections": totals["errors"], "sockhash_inserts": inserted, "toggles": toggles,
              "hogs": args.hogs, "wall_seconds": round(time.monotonic() - started, 1),
              "per_path": sent, "servers": received}
    print(json.dumps(report, indent=1))
    bad = totals["reordered"] + totals["corrupted"] + totals["short"] + totals["errors"]
    return 1 if bad or totals["ok"] < args.connections // 2 * 2 else 0


if __name__ == "__main__":
    sys.exit(main())
