"""The busy-node case: levels, the stress-ng command, the order in which the
runner starts and stops the background load, and the real thing in a
namespace and cgroup of ours, stopped by pid."""

import contextlib
import os
import time
from pathlib import Path

import pytest

from merbridge_py import sandbox
from merbridge_py.bench import busy, runner
from merbridge_py.bench.cli import _profile, reproduce_command

from test_bench_runner import FakeBed, fake_measure


def test_levels_parse_in_order_without_repeats():
    assert busy.parse_levels("none,half,all") == ("none", "half", "all")
    assert busy.parse_levels("all, half,all") == ("all", "half")
    for bad in ("", "some", "none,most"):
        with pytest.raises(ValueError, match="none, half, all"):
            busy.parse_levels(bad)


@pytest.mark.parametrize("level, cpus, n", [("none", 2, 0), ("half", 2, 1), ("all", 2, 2),
                                            ("half", 1, 1), ("half", 7, 3), ("all", 8, 8)])
def test_workers_per_level(level, cpus, n):
    assert busy.workers(level, cpus) == n


def test_stress_command_is_fixed_and_bounded():
    assert busy.stress_argv(2, 90) == ["stress-ng", "--cpu", "2", "--cpu-method", "matrixprod", "--timeout", "90s",
                                       "--quiet"]
    with pytest.raises(ValueError):
        busy.stress_argv(0, 90)
    with pytest.raises(ValueError):
        busy.workers("half", 0)
    assert "half: `stress-ng --cpu 1 --cpu-method matrixprod`" in busy.how(("none", "half"), 2)
    assert busy.how(("none",), 2) == "none: nothing else ran on the node"


class BusyBed(FakeBed):
    def __init__(self, fail_start=False):
        super().__init__()
        self.fail_start = fail_start

    @contextlib.contextmanager
    def node_process(self, node, argv):
        if self.fail_start:
            raise RuntimeError("stress-ng exited at once")
        self.events.append(("busy start", node, argv[2]))
        try:
            yield
        finally:
            self.events.append(("busy stop", node))


def test_runner_runs_each_level_under_its_load_and_stops_it_before_a_mode_switch():
    cases = runner.cases_for(["same-node", "cross-node"], [("keepalive", 1)], ("none", "half", "all"))
    assert [c.busy for c in cases] == ["none", "none", "half", "half", "all", "all"]
    profile = runner.Profile(rounds=1, duration_s=1, warmup_s=0, modes=("iptables", "ebpf"), cases=cases)
    bed = BusyBed()
    outcome = runner.run(bed, profile, measure_fn=fake_measure([]), cpu_count=4)
    events = [e for e in bed.events if e[0] != "settle"]
    block = [("busy start", "node0", "2"), ("busy stop", "node0"), ("busy start", "node0", "4"),
             ("busy stop", "node0")]
    assert events == [("mode", "iptables")] + block + [("mode", "ebpf")] + block
    assert [(r["mode"], r["path"], r["busy"], r["busy_workers"]) for r in outcome.rows[:6]] == [
        ("iptables", "same-node", "none", 0), ("iptables", "cross-node", "none", 0),
        ("iptables", "same-node", "half", 2), ("iptables", "cross-node", "half", 2),
        ("iptables", "same-node", "all", 4), ("iptables", "cross-node", "all", 4)]


def test_a_load_that_cannot_start_fails_its_runs_not_the_bench():
    cases = runner.cases_for(["same-node"], [("keepalive", 1)], ("none", "all"))
    outcome = runner.run(BusyBed(fail_start=True), runner.Profile(1, 1, 0, ("iptables",), cases),
                         measure_fn=fake_measure([]))
    assert [(r["busy"], r["ok"]) for r in outcome.rows] == [("none", True), ("all", False)]
    assert outcome.rows[1]["error"].startswith("starting the busy-node load (all) failed")


def test_profile_and_reproduce_command_carry_the_levels():
    p = _profile(False, 10, 5, 2, ["iptables", "ebpf"], ["keepalive:1"], ["same-node"], busy_levels=("none", "all"))
    assert [(c.load, c.busy) for c in p.cases] == [("keepalive", "none"), ("keepalive", "all")]
    cmd = reproduce_command(p, quick=False)
    assert "--busy none,all" in cmd and "--loads keepalive:1 --paths same-node" in cmd
    # the quick cases on a busy node need no --loads to come back
    q = _profile(True, None, None, None, None, (), None, busy_levels=("half",))
    assert all(c.busy == "half" for c in q.cases) and len(q.cases) == len(runner.quick_profile().cases)
    assert "--loads" not in reproduce_command(q, quick=True) and "--busy half" in reproduce_command(q, quick=True)
    assert runner.full_profile().rounds >= 10


@pytest.mark.bpf
def test_node_process_runs_in_the_nodes_netns_and_a_cgroup_of_its_own_and_is_stopped_by_pid():
    """TestbedBed.node_process on a node of our own (a namespace and a child
    cgroup): stress-ng's workers run there, and after the block no process
    of it is left and its cgroup is gone."""
    from merbridge_py.bench.bed import BUSY_CGROUP, TestbedBed

    tag = f"benchbusy{os.getpid()}"
    ns, cgroup = f"{sandbox.OWNED_PREFIX}{tag}", sandbox.cgroup2_root() / f"{sandbox.OWNED_PREFIX}{tag}"

    class Node:
        name, netns = "node0", ns
        cgroup = str(Path(sandbox.cgroup2_root(), f"{sandbox.OWNED_PREFIX}{tag}", "node0"))

    class Testbed:
        pods, nodes = [], [Node]

        def node(self, name):
            assert name == "node0"
            return Node

    sandbox.netns_add(ns)
    sandbox.cgroup_create(Path(Node.cgroup))
    try:
        bed = TestbedBed(Testbed())
        with bed.node_process("node0", busy.stress_argv(2, 60)) as proc:
            deadline = time.monotonic() + 10
            while len(sandbox.cgroup_pids(Path(Node.cgroup, BUSY_CGROUP))) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            pids = sandbox.cgroup_pids(Path(Node.cgroup, BUSY_CGROUP))
            names = {Path(f"/proc/{p}/comm").read_text().strip() for p in pids}
            assert len(pids) >= 3 and names <= {"stress-ng", "stress-ng-cpu", "ip"}, names    # parent + 2 workers
            netns_inode = os.stat(f"/run/netns/{ns}").st_ino
            assert all(os.stat(f"/proc/{p}/ns/net").st_ino == netns_inode for p in pids)
        assert proc.poll() is not None
        assert not Path(Node.cgroup, BUSY_CGROUP).exists()
        assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    finally:
        sandbox.cgroup_remove(cgroup)
        sandbox.netns_delete(ns)
