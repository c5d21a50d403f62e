"""Issue 5's crash acceptance: the node agent killed with SIGKILL under load,
then started again the way the test bed starts it, three times over. No
request may fail: the programs stay attached without their agent, and each
new agent replaces them (found through the pins its predecessor left) only
after its own run. After each restart exactly one set of our programs is
attached, the pins are the new agent's, and the old programs are gone from
the kernel; after the bed is down, nothing of any agent is left.

Bed: node0 with a, b, c (meshed). Load for the whole run: a -> b over
keep-alive connections held throughout (spliced by the first agent's
programs, they must survive every replacement) and two workers opening a
new connection per request; c -> b over keep-alive connections replaced
every two seconds, and two new-connection workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merbridge_py import bpf_syscall, datapath
from merbridge_py.testbed import PodSpec, Testbed, state
from merbridge_py.testbed.cleanup import leftovers
from merbridge_py.testbed.load import LoadProcess
from merbridge_py.testbed.testbed import AGENT_START_TIMEOUT

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

RESTARTS = 3
RUN = 2.5            # seconds of load with each agent
AGENT_DEAD = 1.5     # with no agent at all
CLIENT_PODS = ("a", "c")
CLIENT_PATIENCE = int(AGENT_START_TIMEOUT) + 30   # seconds a paused client waits for its answer


def pinned_objects(bpffs: Path) -> dict[str, int | None]:
    """Every pin under `bpffs` -> the id of the program it holds (None for a map)."""
    found = {}
    for pin in sorted(p for p in bpffs.rglob("*") if not p.is_dir()):
        fd = datapath.obj_get(pin)
        try:
            info = dict(line.split(":\t", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                        if ":\t" in line)
        finally:
            os.close(fd)
        found[str(pin.relative_to(bpffs))] = int(info["prog_id"]) if "prog_id" in info else None
    return found


def program_exists(prog_id: int) -> bool:
    try:
        fd = bpf_syscall.prog_get_fd_by_id(prog_id)
    except OSError:
        return False
    os.close(fd)
    return True


def wait_gone(prog_ids: set[int], timeout: float = 5.0) -> set[int]:
    """Program ids still loaded after up to `timeout` (the kernel frees them asynchronously)."""
    deadline = time.monotonic() + timeout
    while (alive := {i for i in prog_ids if program_exists(i)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def istio_redirects(tb: Testbed) -> int:
    return sum(tb.nat_counters(p)["ISTIO_REDIRECT"] for p in CLIENT_PODS)


def one_program_per_hook(cgroup: Path) -> dict[str, int]:
    attached = datapath.attached_program_ids(cgroup)
    assert all(len(ids) == 1 for ids in attached.values()), attached
    return {hook: ids[0] for hook, ids in attached.items()}


def kill_agent(tb: Testbed, node) -> float:
    """SIGKILL the node's agent (the bed's own child, by pid) and wait until
    it is gone; returns when it was killed."""
    agent = next(r for r in tb.processes if r.role == "agent" and r.owner == tb.node(node).name)
    killed_at = time.monotonic()
    assert state.signal_if_ours(agent, signal.SIGKILL)
    while agent.alive():
        assert time.monotonic() - killed_at < 10, "the agent survived SIGKILL"
        time.sleep(0.02)
    return killed_at


def describe(failures: list[dict], restarts: list[tuple[float, float, float]]) -> list[str]:
    """Each failed request, placed relative to the restart nearest to its start."""
    out = []
    for f in failures:
        k, (killed, _, ready) = min(enumerate(restarts), key=lambda r: abs(f["started"] - r[1][2]))
        out.append(f"{f['worker']} {f['kind']} ({f['error']}) from {f['local']}: started "
                   f"{f['started'] - ready:+.2f} s from agent {k + 2} being ready (killed {killed - ready:+.2f} s)")
    return out


@pytest.mark.parametrize("rules", ["iptables", "nftables"])   # Istio's iptables rules, or its native nftables
def test_agent_killed_under_load_then_restarted_loses_no_request(rules):
    name = f"rst{rules[0]}{os.getpid()}"
    with Testbed.up(name, nodes=1, pods=[PodSpec("a"), PodSpec("b"), PodSpec("c")], mode="ebpf", mtls="strict",
                    rules=rules) as tb:
        node = tb.node("node0")
        cgroup, bpffs = Path(node.cgroup), Path(node.bpffs)
        programs = one_program_per_hook(cgroup)
        pins = pinned_objects(bpffs)
        assert sorted(i for i in pins.values() if i) == sorted(programs.values())

        b = f"{tb.pod('b').ip}:8080"
        budget = RESTARTS * (RUN + AGENT_DEAD + 30) + 30    # an upper bound: stopped at the end
        loads = {"pinned": LoadProcess(tb, "a", {"b": b}, duration=budget, keepalive=2, newconn=2),
                 "rotating": LoadProcess(tb, "c", {"b": b}, duration=budget, keepalive=2, newconn=2, rotate=2.0)}
        restarts = []      # (killed, restart started, new agent ready)
        refused = []       # SO_ORIGINAL_DST calls refused, per agent (a proxy asked about a connection we lost)
        still_loaded = []  # programs of a replaced agent still in the kernel
        try:
            for load in loads.values():
                load.wait_ready()
            nat_start = istio_redirects(tb)
            for _ in range(RESTARTS):
                time.sleep(RUN)
                metrics = tb.agent_metrics(node)
                assert metrics['merbridge_redirects_total{direction="outbound"}'] > 0
                refused.append(metrics['merbridge_original_dst_queries_total{result="refused"}'])

                killed = kill_agent(tb, node)
                time.sleep(AGENT_DEAD)
                # Nothing changed in the kernel, and traffic still bypasses Istio's rules.
                assert one_program_per_hook(cgroup) == programs
                assert pinned_objects(bpffs) == pins
                assert istio_redirects(tb) == nat_start

                restart = time.monotonic()
                tb.restart_agent(node)
                restarts.append((killed, restart, time.monotonic()))
                # The new agent replaced the old programs: one set attached, its own.
                new_programs = one_program_per_hook(cgroup)
                assert set(new_programs.values()).isdisjoint(programs.values())
                new_pins = pinned_objects(bpffs)
                assert new_pins.keys() == pins.keys()
                assert sorted(i for i in new_pins.values() if i) == sorted(new_programs.values())
                still_loaded += wait_gone(set(programs.values()))
                programs, pins = new_programs, new_pins
            time.sleep(RUN)
            refused.append(tb.agent_metrics(node)['merbridge_original_dst_queries_total{result="refused"}'])
            nat_end = istio_redirects(tb)
        finally:
            for load in loads.values():
                load.stop()
        results = {kind: load.result() for kind, load in loads.items()}   # before the bed goes down

    requests = sum(r["requests"] for r in results.values())
    failures = [f for r in results.values() for f in r["failures"]]
    print(f"\n{requests} requests ({sum(r['connections'] for r in results.values())} connections), "
          f"{sum(r['failed'] for r in results.values())} failed; {RESTARTS} kills and restarts, restart until ready "
          f"{max(ready - restart for _, restart, ready in restarts):.1f} s max; "
          f"slowest request {max(r['max_latency'] for r in results.values()):.3f} s")

    assert sum(r["failed"] for r in results.values()) == 0, (
        f"SO_ORIGINAL_DST refused per agent: {refused}", describe(failures, restarts))
    assert [c for r in results.values() for c in r["keepalive_connections"] if c["broken"]] == []
    # Connections spliced by the first agent's programs outlived every replacement.
    pinned = results["pinned"]["keepalive_connections"]
    assert len(pinned) == 2 and all(c["opened"] < restarts[0][0] and c["closed"] > restarts[-1][2] for c in pinned)
    assert nat_end == nat_start, "new connections fell back to Istio's iptables rules"
    assert still_loaded == [], "a killed agent's programs are still loaded"

    # Down: nothing of any agent is left.
    assert leftovers(name) == []
    assert not bpffs.exists()
    assert wait_gone(set(programs.values())) == set()


def test_a_failed_start_after_a_crash_keeps_the_pins():
    """The pins are the only handle on a killed agent's programs. An agent
    that fails to start (here: its eBPF sources are missing) must leave them,
    so that the next one still replaces those programs instead of attaching
    a second set next to them."""
    name = f"rsf{os.getpid()}"
    with Testbed.up(name, nodes=1, pods=[PodSpec("a"), PodSpec("b")], mode="ebpf", mtls="strict") as tb:
        node = tb.node("node0")
        cgroup, bpffs = Path(node.cgroup), Path(node.bpffs)
        first = one_program_per_hook(cgroup)
        pins = pinned_objects(bpffs)
        kill_agent(tb, node)
        failed = subprocess.run(
            [sys.executable, "-m", "merbridge_py.cli", "run", "--cgroup", node.cgroup, "--pods-file",
             str(tb.pods_file(node)), "--bpffs", node.bpffs, "--metrics-addr", "127.0.0.1:0"],
            env=dict(os.environ, MERBRIDGE_EBPF_DIR=str(tb.workdir / "no-ebpf-here")),
            capture_output=True, text=True, timeout=120)
        assert failed.returncode == 1 and "eBPF sources not found" in failed.stderr
        assert pinned_objects(bpffs) == pins
        assert one_program_per_hook(cgroup) == first

        tb.restart_agent(node)
        assert set(one_program_per_hook(cgroup).values()).isdisjoint(first.values())
        assert wait_gone(set(first.values())) == set()
        assert [r["error"] for r in tb.requests("a", "b", count=10, new_connection=True) if r["error"]] == []


def test_connections_a_proxy_has_not_accepted_yet_survive_a_restart():
    """The replacement, made deterministic: connections established by the
    killed agent's programs but still in the sidecar's accept queue when the
    new agent replaces them. Their SO_ORIGINAL_DST answer must not be lost
    with the old programs' maps (a proxy told "your own listener" falls back
    to its local address and connects to itself). The sidecar is paused
    (SIGSTOP) around the restart, as a busy proxy lags behind its queue."""
    name = f"rsq{os.getpid()}"
    with Testbed.up(name, nodes=1, pods=[PodSpec("a"), PodSpec("b")], mode="ebpf", mtls="strict") as tb:
        node, b = tb.node("node0"), tb.pod("b")
        sidecar = next(r for r in tb.processes if r.role == "sidecar" and r.owner == "a")
        clients = []
        assert state.signal_if_ours(sidecar, signal.SIGSTOP)
        try:
            for _ in range(3):
                # The clients must outwait the restart (bcc compiles for up to
                # AGENT_START_TIMEOUT on busy cores): a client that gives up
                # closes its socket, which rightly drops its record.
                clients.append(tb.spawn_in("a", [sys.executable, "-m", "merbridge_py.testbed.client", "--host", b.ip,
                                                 "--port", "8080", "--timeout", str(CLIENT_PATIENCE)],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True))
            deadline = time.monotonic() + 10
            while len(tb.exec_in("a", ["ss", "-Htn", "state", "established", "dst", "127.0.0.2:15001"])
                      .stdout.splitlines()) < len(clients):
                assert time.monotonic() < deadline, "the clients' connections were not established"
                time.sleep(0.05)
            kill_agent(tb, node)
            tb.restart_agent(node)
        finally:
            state.signal_if_ours(sidecar, signal.SIGCONT)
        answers = [json.loads(c.communicate(timeout=CLIENT_PATIENCE + 30)[0])["results"][0] for c in clients]
        refused = tb.agent_metrics(node)['merbridge_original_dst_queries_total{result="refused"}']
    assert [(r["status"], r["error"]) for r in answers] == [(200, None)] * len(clients), f"refused: {refused}"
    assert {r["body"]["pod"] for r in answers} == {"b"}
    assert refused == 0
