"""Load tool command lines, and parsers on outputs captured from the real tools
(wrk 4.1, sockperf 3.7, iperf3 3.12 on loopback in a scratch namespace; the
samples live in tests/data/bench/)."""

from pathlib import Path

import pytest

from merbridge_py.bench import loads

SAMPLES = Path(__file__).parent / "data" / "bench"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def test_wrk_keepalive_sample():
    r = loads.parse_wrk(sample("wrk_keepalive.txt"))
    assert r.requests == 25793
    assert r.duration_s == pytest.approx(2.099386)
    assert r.rps == pytest.approx(25793 / 2.099386)
    assert (r.p50_us, r.p90_us, r.p99_us) == (236.0, 900.0, 3916.0)
    assert r.errors == 0 and r.bytes == 2940402
    assert r.throughput_bps is None


def test_wrk_newconn_sample():
    r = loads.parse_wrk(sample("wrk_newconn.txt"))
    assert r.requests == 6040
    assert (r.p50_us, r.p99_us) == (1299.0, 5502.0)


def test_wrk_error_counters_add_up():
    line = ("mbp-wrk requests=10 duration_us=1000000 bytes=100 connect=1 read=2 write=3 status=4 timeout=5"
            " p50_us=1 p90_us=2 p99_us=3\n")
    assert loads.parse_wrk("Running 1s test\n" + line).errors == 15


@pytest.mark.parametrize("text", [
    "unable to connect to 127.0.0.1:18099 Connection refused\n",
    "mbp-wrk requests=0 duration_us=1000000 bytes=0 connect=1 read=0 write=0 status=0 timeout=0"
    " p50_us=0 p90_us=0 p99_us=0\n",
    "",
])
def test_wrk_failures(text):
    with pytest.raises(loads.LoadFailed):
        loads.parse_wrk(text)


def test_wrk_refused_sample_names_the_cause():
    with pytest.raises(loads.LoadFailed, match="Connection refused"):
        loads.parse_wrk(sample("wrk_refused.txt"))


def test_sockperf_pingpong_sample():
    r = loads.parse_sockperf(sample("sockperf_pingpong.txt"))
    text = sample("sockperf_pingpong.txt")
    assert "ReceivedMessages=" in text and "\x1b[" in text   # the sample keeps sockperf's colours
    assert r.requests > 0 and r.duration_s > 0
    assert 0 < r.p50_us <= r.p90_us <= r.p99_us
    assert r.errors == 0


def test_sockperf_parses_exact_numbers():
    text = ("sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=21436; ReceivedMessages=21436\n"
            "sockperf: \x1b[2;35m====> avg-rtt=72.278 (std-dev=18.423)\x1b[0m\n"
            "sockperf: # dropped messages = 1; # duplicated messages = 0; # out-of-order messages = 2\n"
            "sockperf: Summary: Round trip is 72.278 usec\n"
            "sockperf: ---> percentile 99.000 =  113.822\n"
            "sockperf: ---> percentile 90.000 =   79.091\n"
            "sockperf: ---> percentile 50.000 =   71.258\n")
    r = loads.parse_sockperf(text)
    assert (r.requests, r.duration_s) == (21436, 1.55)
    assert (r.p50_us, r.p90_us, r.p99_us) == (71.258, 79.091, 113.822)
    assert r.errors == 3


def test_sockperf_one_way_latency_is_refused():
    text = sample("sockperf_pingpong.txt").replace("Round trip is", "Latency is")
    with pytest.raises(loads.LoadFailed, match="full-rtt"):
        loads.parse_sockperf(text)


def test_sockperf_refused_sample():
    with pytest.raises(loads.LoadFailed, match="Connection refused"):
        loads.parse_sockperf(sample("sockperf_refused.txt"))


def test_iperf3_sample():
    r = loads.parse_iperf3(sample("iperf3_bulk.json"))
    assert r.throughput_bps > 1e9          # loopback moves gigabits
    assert r.duration_s == pytest.approx(2.0, abs=0.1)
    assert r.bytes > 0 and r.retransmits is not None
    assert r.requests is None and r.rps is None and r.p50_us is None


@pytest.mark.parametrize("text", [sample("iperf3_refused.json"), "iperf3: error - unable to connect", "{}"])
def test_iperf3_failures(text):
    with pytest.raises(loads.LoadFailed):
        loads.parse_iperf3(text)


def test_wrk_command_lines():
    ka = loads.wrk_argv("10.0.0.2", 16, 3, "/tmp/r.lua", new_connection=False)
    # one connection per thread: the report script times each thread's one outstanding request
    assert ka[:5] == ["wrk", "-c", "16", "-t", "16"]
    assert "-d" in ka and ka[ka.index("-d") + 1] == "3s"
    assert "Connection: close" not in ka and ka[-1] == "http://10.0.0.2:8080/"
    one = loads.wrk_argv("10.0.0.2", 1, 3, "/tmp/r.lua", new_connection=True)
    assert one[one.index("-t") + 1] == "1"
    assert one[one.index("-H") + 1] == "Connection: close"
    assert one[one.index("-s") + 1] == "/tmp/r.lua"


def test_tool_command_lines():
    assert loads.sockperf_client_argv("10.0.0.3", 2)[-1] == "--full-rtt"
    assert loads.sockperf_server_argv("10.0.0.3")[:3] == ["sockperf", "server", "--tcp"]
    assert "--json" in loads.iperf3_client_argv("10.0.0.3", 2)
    assert "--one-off" in loads.iperf3_server_argv("10.0.0.3")


def test_the_report_script_prints_what_the_parser_reads():
    for field in ("requests", "duration_us", "p50_us", "p90_us", "p99_us", "timeout", "timed", "wrk_p99_us"):
        assert f"{field}=" in loads.WRK_REPORT_LUA
    # its percentiles are of the requests it timed; wrk's corrected histogram only gives wrk_p99_us
    assert "percentile(50), percentile(90), percentile(99)" in loads.WRK_REPORT_LUA
    assert "function response(" in loads.WRK_REPORT_LUA or "response = function(" in loads.WRK_REPORT_LUA


def test_wrk_line_with_timed_requests():
    line = ("mbp-wrk requests=10 duration_us=1000000 bytes=100 connect=0 read=0 write=0 status=0 timeout=0"
            " p50_us=100 p90_us=200 p99_us=300 timed=10 wrk_p99_us=90000")
    r = loads.parse_wrk(line)
    assert (r.p99_us, r.wrk_corrected_p99_us) == (300.0, 90000.0)
    with pytest.raises(loads.LoadFailed, match="timed 9 of 10 requests"):
        loads.parse_wrk(line.replace("timed=10", "timed=9"))
    # outputs recorded before the script timed requests have neither field
    assert loads.parse_wrk(sample("wrk_keepalive.txt")).wrk_corrected_p99_us is None


def test_load_specs():
    assert loads.parse_load_specs(["keepalive:1,16", "newconn"]) == [("keepalive", 1), ("keepalive", 16),
                                                                    ("newconn", 4)]
    assert loads.parse_load_specs(["keepalive:1 keepalive:1,4 tcp_rr bulk"]) == [
        ("keepalive", 1), ("keepalive", 4), ("tcp_rr", 1), ("bulk", 1)]
    for bad in ("http:1", "keepalive:x", "keepalive:0", "bulk:4"):
        with pytest.raises(ValueError):
            loads.parse_load_specs([bad])


def test_wrk_fixedrate_sample():
    # recorded: wrk -c 16 -t 2 -d 3s -s <WRK_FIXEDRATE_LUA> ... -- 500 1024 against nginx on loopback
    r = loads.parse_wrk(sample("wrk_fixedrate.txt"))
    assert (r.requests, r.p50_us, r.p90_us, r.p99_us) == (3032, 103.0, 355.0, 3964.0)
    assert r.rps == pytest.approx(1000.2, abs=0.1)
    # a 23 ms stall in that run left 34 send slots already past when claimed
    assert r.late_slots == 34 and r.errors == 0
    # the other wrk loads have no schedule
    assert loads.parse_wrk(sample("wrk_keepalive.txt")).late_slots is None


def test_wrk_fixedrate_command_line_splits_the_rate_over_threads():
    argv = loads.wrk_fixedrate_argv("10.0.0.2", 16, 5, "/tmp/f.lua")
    assert argv[:5] == ["wrk", "-c", "16", "-t", "16"] and argv[argv.index("-s") + 1] == "/tmp/f.lua"
    # Istio's method: 1000 requests/s in total, 1 KB bodies; each of 16 threads (one connection each) paces 62.5/s
    assert argv[-4:] == ["http://10.0.0.2:8080/", "--", "62.5", "1024"]
    one = loads.wrk_fixedrate_argv("10.0.0.2", 1, 5, "/tmp/f.lua", rps=300, payload_bytes=10)
    assert one[-2:] == ["300", "10"]
    assert loads.parse_load_specs(["fixedrate"]) == [("fixedrate", 16)]


def test_the_fixedrate_script_paces_and_reports_what_the_parser_reads():
    text = loads.WRK_FIXEDRATE_LUA
    assert "function delay()" in text and "CLOCK_MONOTONIC" in text
    assert "late=%d" in text and 'wrk.method = "POST"' in text
    # the pacing must not leak into the other wrk loads: their script has no delay()
    assert "delay" not in loads.WRK_REPORT_LUA


# --- socket families -------------------------------------------------------------------

def test_targets_per_family():
    assert loads.target("inet", "10.0.0.2", "fd10::2") == loads.Target("10.0.0.2", None)
    six = loads.target("inet6", "10.0.0.2", "fd10::2")
    assert (six.address, six.url_host, six.host_header) == ("fd10::2", "[fd10::2]", "[fd10::2]:8080")
    mapped = loads.target("mapped", "10.0.0.2", "")
    # the socket reaches ::ffff:10.0.0.2; the Host header names the IPv4 address, as a JVM client's
    assert (mapped.address, mapped.url_host, mapped.host_header) == ("::ffff:10.0.0.2", "[::ffff:10.0.0.2]",
                                                                     "10.0.0.2:8080")
    with pytest.raises(ValueError, match="IPv6 address"):
        loads.target("inet6", "10.0.0.2", "")
    with pytest.raises(ValueError, match="one of inet, inet6, mapped"):
        loads.target("ipv6", "10.0.0.2", "fd10::2")


@pytest.mark.parametrize("family, url, host", [
    ("inet", "http://10.0.0.2:8080/", None),
    ("inet6", "http://[fd10::2]:8080/", "Host: [fd10::2]:8080"),
    ("mapped", "http://[::ffff:10.0.0.2]:8080/", "Host: 10.0.0.2:8080"),
])
def test_wrk_argv_per_family(family, url, host):
    to = loads.target(family, "10.0.0.2", "fd10::2")
    for argv in (loads.wrk_argv(to, 16, 3, "/tmp/r.lua", new_connection=False),
                 loads.wrk_fixedrate_argv(to, 16, 3, "/tmp/f.lua")[:-3]):
        assert argv[-1] == url
        headers = [argv[i + 1] for i, a in enumerate(argv) if a == "-H"]
        assert headers == ([host] if host else [])
    # inet: exactly the command line the bench always ran
    if family == "inet":
        assert loads.wrk_argv(to, 1, 2, "/r", new_connection=True) == \
            loads.wrk_argv("10.0.0.2", 1, 2, "/r", new_connection=True)


def test_client_and_server_argv_per_family():
    from merbridge_py.bench.bed import BenchPod
    from merbridge_py.bench.measure import _client, _server

    scripts = loads.WrkScripts(report="/r.lua", fixedrate="/f.lua")
    server = BenchPod("b", "node0", "10.0.0.2", "ns", True, ip6="fd10::2")
    for family in loads.FAMILIES:
        to = loads.target(family, server.ip, server.ip6)
        assert _client("keepalive", to, 1, 2, scripts)[-1].startswith(f"http://{to.url_host}:")
        assert _client("fixedrate", to, 16, 2, scripts)[-4] == f"http://{to.url_host}:8080/"
        assert _client("bulk", to, 1, 2, scripts)[2] == to.address
    # iperf3's server: the IPv6 address for inet6; a v4-mapped client reaches the IPv4 listener
    assert _server("bulk", server, "inet6")[0][4] == "fd10::2"
    assert _server("bulk", server, "mapped")[0][4] == "10.0.0.2"
    assert _client("tcp_rr", loads.target("inet", server.ip), 1, 2, scripts)[4] == "10.0.0.2"
    assert loads.check_family("inet", ["tcp_rr"]) is None
    with pytest.raises(ValueError, match="sockperf"):
        loads.check_family("mapped", ["keepalive", "tcp_rr"])
