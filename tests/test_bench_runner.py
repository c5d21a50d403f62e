"""The benchmark's order of work, failure handling and profiles, on a fake bed
with a fake measurement (no processes, no namespaces)."""

import pytest

from merbridge_py.bench import loads, runner
from merbridge_py.bench.bed import BenchPod, pick_paths
from merbridge_py.bench.cli import _profile
from merbridge_py.bench.measure import Measurement

PODS = [BenchPod("n0p0", "node0", "10.244.0.10", "ns-a", True),
        BenchPod("n0p1", "node0", "10.244.0.11", "ns-b", True),
        BenchPod("n1p0", "node1", "10.244.1.10", "ns-c", True),
        BenchPod("n1p1", "node1", "10.244.1.11", "ns-d", False)]


class FakeBed:
    settle_how = "fake"

    def __init__(self, fail_mode=None):
        self.pods = PODS
        self.events = []
        self.fail_mode = fail_mode

    def set_mode(self, mode):
        self.events.append(("mode", mode))
        if mode == self.fail_mode:
            raise RuntimeError("agent did not start")

    def settle(self):
        self.events.append(("settle",))


def fake_measure(calls, fail=lambda load, mode: False, families=None):
    def measure(bed, pair, load, connections, duration_s, script, family="inet"):
        mode = next(e[1] for e in reversed(bed.events) if e[0] == "mode")
        calls.append((mode, pair.server.name, load, connections, duration_s))
        if families is not None:
            families.append(family)
        assert open(script.report).read() == loads.WRK_REPORT_LUA
        assert open(script.fixedrate).read() == loads.WRK_FIXEDRATE_LUA
        if fail(load, mode):
            raise loads.LoadFailed("no result line")
        return Measurement(loads.LoadResult(duration_s=2.0, requests=200, p50_us=100.0, p90_us=150.0, p99_us=300.0),
                           {"client": 1000.0, "sidecars": 2000.0, "apps": 1000.0},
                           cpu_user_us={"client": 600.0, "sidecars": 1200.0, "apps": 200.0},
                           datapath={"client node": {"merbridge_spliced_messages_total": 400.0}})
    return measure


PROFILE = runner.Profile(rounds=2, duration_s=2, warmup_s=1, modes=("nomesh", "iptables", "ebpf"),
                         cases=(runner.Case("same-node", "keepalive", 1), runner.Case("same-node", "newconn", 4),
                                runner.Case("cross-node", "keepalive", 1)))


def test_modes_interleave_round_by_round_and_every_block_starts_clean():
    bed, calls, seen = FakeBed(), [], []
    outcome = runner.run(bed, PROFILE, progress=seen.append, measure_fn=fake_measure(calls))
    modes = [e[1] for e in bed.events if e[0] == "mode"]
    assert modes == ["nomesh", "iptables", "ebpf", "nomesh", "iptables", "ebpf"]
    # every mode switch is followed by a settle; every newconn run gets one more
    assert bed.events[:2] == [("mode", "nomesh"), ("settle",)]
    assert sum(1 for e in bed.events if e == ("settle",)) == 6 + 6
    # per block: a warm-up per path (1 s), then each case at full duration
    block = calls[:5]
    assert [(c[1], c[2], c[4]) for c in block] == [("n0p1", "keepalive", 1), ("n1p0", "keepalive", 1),
                                                   ("n0p1", "keepalive", 2), ("n0p1", "newconn", 2),
                                                   ("n1p0", "keepalive", 2)]
    assert len(outcome.rows) == 2 * 3 * 3 and all(r["ok"] for r in outcome.rows)
    assert [(r["round"], r["mode"]) for r in outcome.rows[:4]] == [(0, "nomesh")] * 3 + [(0, "iptables")]
    assert len(seen) == len(runner.plan(PROFILE))
    assert outcome.pods["cross-node"] == {"client": "n0p0", "client_ip": "10.244.0.10", "server": "n1p0",
                                          "server_ip": "10.244.1.10", "family": "inet", "target": "10.244.1.10"}


def test_rows_carry_the_measurement():
    outcome = runner.run(FakeBed(), PROFILE, measure_fn=fake_measure([]))
    r = outcome.rows[0]
    assert (r["path"], r["load"], r["connections"]) == ("same-node", "keepalive", 1)
    assert r["rps"] == pytest.approx(100.0) and r["p99_us"] == 300.0
    assert r["cpu_us_per_req"] == pytest.approx(4000.0 / 200) and r["error"] is None
    assert r["started_at"]
    # the sidecars' user space, and the kernel time of all: (4000 - 2000) / 200
    assert r["sidecar_user_us_per_req"] == pytest.approx(6.0) and r["kernel_us_per_req"] == pytest.approx(10.0)
    assert r["datapath"] == {"client node": {"merbridge_spliced_messages_total": 400.0}}


def test_a_failed_run_is_a_row_not_an_abort():
    outcome = runner.run(FakeBed(), PROFILE,
                         measure_fn=fake_measure([], fail=lambda load, mode: load == "newconn" and mode == "ebpf"))
    failed = [r for r in outcome.rows if not r["ok"]]
    assert [(r["round"], r["mode"], r["load"]) for r in failed] == [(0, "ebpf", "newconn"), (1, "ebpf", "newconn")]
    assert failed[0]["error"] == "LoadFailed: no result line" and failed[0]["rps"] is None
    assert sum(r["ok"] for r in outcome.rows) == 18 - 2


def test_a_mode_that_cannot_start_fails_its_block_only():
    calls = []
    outcome = runner.run(FakeBed(fail_mode="ebpf"), PROFILE, measure_fn=fake_measure(calls))
    ebpf = [r for r in outcome.rows if r["mode"] == "ebpf"]
    assert len(ebpf) == 6 and not any(r["ok"] for r in ebpf)
    assert ebpf[0]["error"].startswith("switching to ebpf failed: RuntimeError: agent did not start")
    assert not any(c[0] == "ebpf" for c in calls)
    assert all(r["ok"] for r in outcome.rows if r["mode"] != "ebpf")


def test_warmup_failures_are_recorded():
    outcome = runner.run(FakeBed(), runner.Profile(1, 1, 1, ("iptables",), (runner.Case("same-node", "tcp_rr", 1),)),
                         measure_fn=fake_measure([], fail=lambda load, mode: load == "keepalive"))
    assert len(outcome.warmup_failures) == 1 and "no result line" in outcome.warmup_failures[0]
    assert outcome.rows[0]["ok"]


def test_paths_share_the_client_and_use_meshed_pods():
    pairs = pick_paths(PODS)
    assert pairs["same-node"].client is pairs["cross-node"].client
    assert (pairs["same-node"].server.name, pairs["cross-node"].server.name) == ("n0p1", "n1p0")
    with pytest.raises(ValueError):
        pick_paths(PODS[:2])


def test_quick_profile_is_the_targets_cases_and_fits_in_three_minutes():
    quick = runner.quick_profile()
    assert {(c.path, c.load, c.connections) for c in quick.cases} == {
        ("same-node", "keepalive", 1), ("same-node", "keepalive", 16), ("same-node", "newconn", 4),
        ("cross-node", "keepalive", 1)}
    # planned work leaves room for the test bed's up and down inside 180 s
    assert sum(s.weight for s in runner.plan(quick)) <= 150


def test_full_profile_covers_every_load_and_path():
    full = runner.full_profile()
    assert full.rounds >= 5
    assert {(c.load, c.connections) for c in full.cases} == {
        ("keepalive", 1), ("keepalive", 4), ("keepalive", 16), ("keepalive", 64), ("newconn", 4), ("tcp_rr", 1),
        ("bulk", 1), ("fixedrate", 16)}
    assert {c.path for c in full.cases} == {"same-node", "cross-node"}


def test_command_line_overrides():
    p = _profile(True, 4, 3, 0, ["iptables", "ebpf"], ("keepalive:1,64",), ["cross-node"])
    assert (p.rounds, p.duration_s, p.warmup_s, p.modes) == (4, 3, 0, ("iptables", "ebpf"))
    assert p.cases == (runner.Case("cross-node", "keepalive", 1), runner.Case("cross-node", "keepalive", 64))
    # paths alone keep the profile's loads
    p = _profile(True, None, None, None, None, (), ["same-node"])
    assert {c.path for c in p.cases} == {"same-node"} and len(p.cases) == 3
    for bad in (dict(modes=["istio"]), dict(paths=["moon"]), dict(load_specs=("http",))):
        args = dict(quick=False, rounds=None, duration=None, warmup=None, modes=None, load_specs=(), paths=None)
        args.update(bad)
        with pytest.raises(ValueError):
            _profile(**args)


def test_the_recorded_command_reproduces_the_profile():
    import shlex

    from merbridge_py.bench.cli import _split, bench, reproduce_command

    for quick, profile in ((True, runner.quick_profile()), (False, runner.full_profile()),
                           (False, _profile(False, 2, 1, 0, ["ebpf"], ("keepalive:1,4 bulk",), ["same-node"]))):
        for sidecar, proxy, mtls, workers in (("http", "envoy", "strict", 2), ("tcp", "envoy", "off", 1),
                                              ("http", "envoy", "permissive", 4), ("http", "haproxy", "off", 2)):
            rate = 1000 if proxy == "envoy" else 300
            argv = shlex.split(reproduce_command(profile, quick, sidecar, proxy, mtls, workers, rate))[2:]
            ctx = bench.make_context("bench", argv)
            p = ctx.params
            again = _profile(p["quick"], p["rounds"], p["duration"], p["warmup"], _split(p["modes"]),
                             p["load_specs"], _split(p["paths"]))
            assert again == profile and p["sidecar"] == sidecar
            assert (p["proxy"], p["mtls"], p["fixedrate_rps"]) == (proxy, mtls, rate)
            # the worker count is Envoy's; with HAProxy the option is left at its default
            assert p["envoy_workers"] == (workers if proxy == "envoy" else 2)
    # a bed's default mTLS not known: the command leaves the choice to the bed again
    argv = shlex.split(reproduce_command(runner.quick_profile(), True))[2:]
    assert bench.make_context("bench", argv).params["mtls"] is None


def test_progress_reports_time_left_from_the_pace_so_far():
    import io

    from merbridge_py.bench.progress import Progress, format_duration

    steps = [runner.Step("mode", 0, "iptables", weight=10.0), runner.Step("run", 0, "iptables",
                                                                           runner.Case("same-node", "bulk", 1), 30.0)]
    now = [100.0]
    out = io.StringIO()
    bar = Progress(steps, stream=out, clock=lambda: now[0], tty=False)
    now[0] += 20.0              # the first quarter of the plan took twice its planned time
    bar(steps[0])
    assert " 25% 1m00s left, 20s so far: round 1: now in iptables mode" in out.getvalue()
    now[0] += 30.0
    bar(steps[1])               # runs print nothing off a terminal: one line per mode block
    assert out.getvalue().count("\n") == 1
    tty = io.StringIO()
    bar = Progress(steps, stream=tty, clock=lambda: now[0], tty=True)
    bar(steps[0])
    bar.close()
    assert tty.getvalue().startswith("\r[######") and tty.getvalue().endswith("\n")
    assert (format_duration(59.4), format_duration(61), format_duration(-3)) == ("59s", "1m01s", "0s")


def test_datapath_counters_are_the_increase_per_node_role():
    from merbridge_py.bench.bed import PodPair
    from merbridge_py.bench.measure import counter_increase, node_role

    cross = PodPair(PODS[0], PODS[2])
    assert node_role("node0", cross) == "client node" and node_role("node1", cross) == "server node"
    assert node_role("node0", PodPair(PODS[0], PODS[1])) == "client and server node"
    skipped = 'merbridge_splice_skipped_total{reason="short_lived"}'
    before = {"node0": {"merbridge_spliced_messages_total": 10.0, "merbridge_spliced_messages_created": 1.0,
                        skipped: 3.0},
              "node1": {"merbridge_sockhash_inserts_total": 5.0}}
    after = {"node0": {"merbridge_spliced_messages_total": 410.0, "merbridge_spliced_messages_created": 2.0,
                       skipped: 7.0},
             "node1": {"merbridge_sockhash_inserts_total": 5.0, "merbridge_splice_misses_total": 2.0}}
    # only counters that grew, labelled ones too; a counter new in `after` grew from 0
    assert counter_increase(before, after, cross) == {
        "client node": {"merbridge_spliced_messages_total": 400.0, skipped: 4.0},
        "server node": {"merbridge_splice_misses_total": 2.0}}


# --- socket families (--family) ------------------------------------------------------

DUAL_PODS = [BenchPod(p.name, p.node, p.ip, p.netns, p.meshed, ip6=f"fd10:{p.node[-1]}::{p.ip.split('.')[-1]}")
             for p in PODS]


class DualStackBed(FakeBed):
    def __init__(self):
        super().__init__()
        self.pods = DUAL_PODS


@pytest.mark.parametrize("family, target", [("inet", "10.244.0.11"), ("inet6", "fd10:0::11"),
                                            ("mapped", "::ffff:10.244.0.11")])
def test_every_run_and_warmup_uses_the_profile_family(family, target):
    import dataclasses
    profile = dataclasses.replace(PROFILE, family=family)
    families = []
    outcome = runner.run(DualStackBed(), profile, measure_fn=fake_measure([], families=families))
    # a warm-up per path and mode block, and every run, all with the family
    assert families == [family] * len(families) and len(families) == 2 * 3 * (2 + 3)
    assert {r["family"] for r in outcome.rows} == {family}
    assert outcome.pods["same-node"]["family"] == family
    assert outcome.pods["same-node"]["target"] == target


def test_inet6_on_an_ipv4_only_bed_fails_before_any_load():
    import dataclasses
    calls = []
    with pytest.raises(ValueError, match="needs a server pod with an IPv6 address"):
        runner.run(FakeBed(), dataclasses.replace(PROFILE, family="inet6"), measure_fn=fake_measure(calls))
    assert calls == []


def test_a_family_a_tool_cannot_do_is_refused():
    # sockperf 3.7 parses IPv4 literals only: tcp_rr over AF_INET6 would not be what it says
    for family in ("inet6", "mapped"):
        with pytest.raises(ValueError, match="sockperf 3.7"):
            runner.Profile(1, 1, 0, ("ebpf",), (runner.Case("same-node", "tcp_rr", 1),), family=family)
        with pytest.raises(ValueError, match="tcp_rr"):
            _profile(False, None, None, None, None, (), None, family)     # the full profile has tcp_rr
        p = _profile(False, 1, 1, 0, None, ("keepalive:1,16 newconn fixedrate bulk",), ["same-node"], family)
        assert p.family == family
    with pytest.raises(ValueError, match="family 'ipx'"):
        runner.Profile(1, 1, 0, ("ebpf",), (runner.Case("same-node", "keepalive", 1),), family="ipx")
    assert runner.Profile(1, 1, 0, ("ebpf",), (runner.Case("same-node", "tcp_rr", 1),)).family == "inet"


def test_the_cli_refuses_a_family_with_a_clear_error(monkeypatch):
    from click.testing import CliRunner

    from merbridge_py.bench.cli import bench
    monkeypatch.setattr("os.geteuid", lambda: 0)
    result = CliRunner().invoke(bench, ["--family", "mapped", "--loads", "keepalive:1 tcp_rr"])
    assert result.exit_code == 2 and "--family mapped cannot run tcp_rr: sockperf 3.7" in result.output
    result = CliRunner().invoke(bench, ["--family", "inet6", "--proxy", "haproxy", "--loads", "keepalive"])
    assert result.exit_code == 2 and "needs --proxy envoy" in result.output
    result = CliRunner().invoke(bench, ["--family", "ipv6"])
    assert result.exit_code == 2 and "'inet', 'inet6', 'mapped'" in result.output


def test_the_recorded_command_reproduces_the_family():
    import shlex

    from merbridge_py.bench.cli import _split, bench, ip_families, reproduce_command

    for family in ("inet", "inet6", "mapped"):
        for quick, base in ((True, runner.quick_profile()),
                            (False, _profile(False, 3, 5, 1, ["iptables", "ebpf"], ("keepalive:1,16",),
                                             ["same-node"]))):
            profile = _profile(quick, base.rounds, base.duration_s, base.warmup_s, list(base.modes),
                               ("keepalive:1,16",) if not quick else (), ["same-node"] if not quick else None,
                               family)
            command = reproduce_command(profile, quick, "http", "envoy", "permissive", 2)
            # the default family leaves the command as it always was
            assert ("--family" in command) == (family != "inet")
            p = bench.make_context("bench", shlex.split(command)[2:]).params
            again = _profile(p["quick"], p["rounds"], p["duration"], p["warmup"], _split(p["modes"]),
                             p["load_specs"], _split(p["paths"]), p["family"])
            assert again == profile and again.family == family
    assert ip_families("inet") == ("ipv4",)
    assert ip_families("inet6") == ip_families("mapped") == ("ipv4", "ipv6")
