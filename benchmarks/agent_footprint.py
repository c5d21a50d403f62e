"""The node agent's footprint: its RSS with many pods, and how long it takes
from start to ready (programs loaded, attached and pinned, every pod written).

Brings up a one-node test bed with no mesh running (one plain pod; nothing
attached), adds --pods extra network namespaces, each holding one address of
198.18.0.0/15 (the benchmarking range) on its loopback, and writes a pods
file with one meshed pod object per namespace (as the test bed's own pods,
minus the sidecar process: the agent only needs the object and the
namespace). Then, in interleaved rounds, starts the agent of each code
variant on that node and measures:

- ready: from the agent's start to /readyz answering 200;
- RSS: the agent process's resident set after it has been ready --settle
  seconds (the median of a few samples), with the pods it reports accelerated;
- whether bcc or LLVM is mapped into the agent process;
- for variants with a loader child (merbridge_py/loader.py): the child alone,
  run on its own with fresh maps, its wall time and its peak RSS.

Variants are git refs of this repository, exported with `git archive` into a
temporary directory, or `.` for the working tree. Needs root. Run from the
repository:

    .venv/bin/python benchmarks/agent_footprint.py --variants main,HEAD [--pods 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from merbridge_py.agent.status import agent_request
from merbridge_py.mesh import ISTIO
from merbridge_py.testbed import PodSpec, Testbed, kube
from merbridge_py.testbed.extra_pods import add_pod_namespaces, pod_objects

REPO = Path(__file__).resolve().parent.parent
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LLVM_MARKERS = ("libbcc", "libLLVM", "libclang")


def export(ref: str, into: Path) -> Path:
    if ref == ".":
        return REPO
    dest = into / re.sub(r"\W", "_", ref)
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def get(addr: str, path: str) -> tuple[int, bytes]:
    try:
        with _NO_PROXY.open(f"http://{addr}{path}", timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_agent(code: Path, tb: Testbed, source: list[str], bpffs: str, settle: float, log: Path) -> dict:
    node = tb.node("node0")
    addr = f"127.0.0.1:{free_port()}"
    # A private admin socket, and detach on SIGTERM whatever the source: each
    # variant starts from a clean node (older versions ignore both variables).
    admin = log.with_suffix(".sock")
    env = dict(os.environ, PYTHONPATH=str(code), MERBRIDGE_EBPF_DIR=str(code / "ebpf"),
               MERBRIDGE_ADMIN_SOCKET=str(admin), MERBRIDGE_ON_SIGTERM="detach")
    argv = [sys.executable, "-m", "merbridge_py.cli", "run", "--cgroup", node.cgroup, *source,
            "--bpffs", bpffs, "--metrics-addr", addr]
    with open(log, "ab") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while get(addr, "/readyz")[0] != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"agent of {code} exited with {proc.returncode}; see {log}")
            if time.monotonic() - started > 120:
                raise RuntimeError(f"agent of {code} not ready after 120 s; see {log}")
            time.sleep(0.02)
        ready = time.monotonic() - started
        cpu = psutil.Process(proc.pid).cpu_times()   # children: the loader, if any, has been waited for
        ready_cpu = cpu.user + cpu.system + cpu.children_user + cpu.children_system
        time.sleep(settle)
        p = psutil.Process(proc.pid)
        samples = []
        for _ in range(5):
            samples.append(p.memory_info().rss)
            time.sleep(0.2)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        anon_kb = int(re.search(r"^RssAnon:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text(), re.M).group(1))
        # /status moved to the admin socket; older versions serve it on the port.
        status = agent_request(admin, "/status") if admin.exists() else json.loads(get(addr, "/status")[1] or b"{}")
        accelerated = sum(1 for s in status.get("pods", []) if s["accelerated"])
        return {"ready_s": ready, "ready_cpu_s": ready_cpu, "rss_mb": statistics.median(samples) / 2**20, "anon_mb": anon_kb / 1024,
                "maps_mb": maps_memlock(Path(bpffs)) / 2**20,
                "llvm_mapped": any(m in maps for m in LLVM_MARKERS), "accelerated": accelerated}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def maps_memlock(bpffs: Path) -> int:
    """Kernel memory of the pinned maps (the `memlock` of each map's fdinfo):
    charged to the memory cgroup of whoever created them, not part of any RSS."""
    from merbridge_py.bpf_syscall import obj_get
    total = 0
    for pin in bpffs.glob("maps-*/*"):
        fd = obj_get(pin)
        try:
            total += int(re.search(r"^memlock:\s+(\d+)", Path(f"/proc/self/fdinfo/{fd}").read_text(), re.M).group(1))
        finally:
            os.close(fd)
    return total


def run_loader_alone(code: Path, bpffs: Path) -> dict | None:
    """The loader child on its own, with fresh maps; None for code without one."""
    if not (code / "merbridge_py" / "loader.py").is_file():
        return None
    maps_dir, pin_dir = bpffs / "maps-loader", bpffs / "loading"
    maps_dir.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(code), MERBRIDGE_EBPF_DIR=str(code / "ebpf"))
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "merbridge_py.loader", "--maps-dir", str(maps_dir),
                               "--pin-dir", str(pin_dir), "--", *ISTIO.cflags()],
                              cwd=code, env=env, capture_output=True, text=True, timeout=120)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"loader of {code} failed: {done.stderr.strip()}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        return {"loader_s": wall, "loader_cpu_s": report.get("cpu_seconds"), "loader_peak_mb": report["peak_rss_kb"] / 1024,
                "loader_anon_mb": report.get("anon_rss_kb", 0) / 1024,
                "loader_file_mb": report.get("file_rss_kb", 0) / 1024}
    finally:
        shutil.rmtree(bpffs, ignore_errors=True)


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="main,HEAD",
                        help="comma-separated git refs; '.' is the working tree as it is")
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after ready before RSS is sampled")
    parser.add_argument("--source", choices=("file", "api"), default="file",
                        help="the agent reads the pods from a pods file, or lists and watches them on an "
                             "in-process fake API server (tests/fake_apiserver.py) with the kubernetes client, "
                             "as in a cluster")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    variants = args.variants.split(",")

    name = f"fp{os.getpid()}"
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mbp-footprint-"))
        tb = stack.enter_context(Testbed.up(name, nodes=1, pods=[PodSpec("plain", meshed=False)], mode="nomesh"))
        codes = {v: export(v, Path(tmp)) for v in variants}
        node = tb.node("node0")
        pods = add_pod_namespaces(tb, args.pods)
        objects = pod_objects(tb, pods)
        if args.source == "file":
            pods_file = Path(tmp) / "pods.json"
            pods_file.write_text(json.dumps(kube.pod_list(objects)))
            source = ["--pods-file", str(pods_file)]
        else:
            sys.path.insert(0, str(REPO / "tests"))
            from fake_apiserver import FakeApiServer
            api = stack.enter_context(FakeApiServer())
            for obj in objects:
                api.add_pod(obj)
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "agent", "user": {"token": "not-checked"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}]}))
            source = ["--kubeconfig", str(kubeconfig), "--node-name", node.name]
        bpffs = f"{node.bpffs}-agent"   # under the bed's prefix: its teardown removes leftovers
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                row = run_agent(codes[v], tb, source, bpffs, args.settle, Path(tmp) / f"agent-{r}.log")
                row.update(run_loader_alone(codes[v], Path(f"{node.bpffs}-loader")) or {})
                results[v].append(row)
                print(f"round {r + 1} {v}: " + ", ".join(f"{k}={x:.2f}" if isinstance(x, float) else f"{k}={x}"
                                                         for k, x in row.items()), flush=True)

    print(f"\n{args.pods} pods from the {args.source} source, {args.rounds} interleaved rounds, medians:")
    columns = [("ready s", "ready_s", ".2f"), ("ready CPU s", "ready_cpu_s", ".2f"), ("RSS MB", "rss_mb", ".1f"),
               ("anon MB", "anon_mb", ".1f"), ("maps MB", "maps_mb", ".1f"), ("accel", "accelerated", ".0f"),
               ("loader s", "loader_s", ".2f"), ("loader CPU s", "loader_cpu_s", ".2f"),
               ("loader peak MB", "loader_peak_mb", ".1f"), ("loader anon MB", "loader_anon_mb", ".1f"),
               ("loader file MB", "loader_file_mb", ".1f")]
    print(f"{'variant':<12} " + " ".join(f"{title:>{len(title)}}" for title, _, _ in columns) + "  LLVM mapped")
    for v, rows in results.items():
        cells = []
        for title, key, fmt in columns:
            m = median(rows, key)
            cells.append(f"{'-' if m is None else format(m, fmt):>{len(title)}}")
        print(f"{v:<12} " + " ".join(cells) + f"  {any(r['llvm_mapped'] for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps({"pods": args.pods, "rounds": results}, indent=2))


if __name__ == "__main__":
    main()
