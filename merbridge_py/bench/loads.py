"""The load generators: their command lines and parsers for their output.

Five loads, each driven by a Debian tool:
- keepalive: wrk over persistent HTTP/1.1 connections (`-c` connections).
- newconn:   wrk with `Connection: close`; the server answers with
             `Connection: close` too, so wrk opens a new connection for every
             request (checked against a server counting accepts: 6430
             connections for 6420 requests in 2 s). wrk starts a request's clock
             when it writes the request, so connect time shows in requests/s,
             not in the latency percentiles.
- tcp_rr:    sockperf ping-pong over TCP (one connection, 14-byte messages),
             full round-trip times.
- bulk:      iperf3, one TCP stream, receiver-side throughput.
- fixedrate: Istio's own overhead method: a fixed 1000 requests/s over 16
             keep-alive connections with 1 KB request bodies, paced by a wrk
             script (WRK_FIXEDRATE_LUA; why wrk and not hey: see there).

Socket families (`--family`): "inet" (AF_INET to the server pod's IPv4
address, the default), "inet6" (AF_INET6 to its IPv6 address on a dual-stack
bed) and "mapped" (AF_INET6 to ::ffff:<its IPv4 address>, the JVM's way). A
`Target` says what the client connects to; sockperf 3.7 parses IPv4 literals
only ("'-i' Invalid address: ::1"), so tcp_rr is refused for the other two.

Every tool here exits 0 on some failures (sockperf on "connection refused",
iperf3 with -J), so the parsers decide success from the output, not from the
exit code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

KEEPALIVE = "keepalive"
NEWCONN = "newconn"
TCP_RR = "tcp_rr"
BULK = "bulk"
FIXEDRATE = "fixedrate"
LOADS = (KEEPALIVE, NEWCONN, TCP_RR, BULK, FIXEDRATE)
# The loads wrk drives (HTTP to the pod app), and which of them runs the pacing script.
WRK_LOADS = (KEEPALIVE, NEWCONN, FIXEDRATE)

# Istio's published sidecar overhead is measured at 1000 requests/s over 16
# connections with 1 KB payloads; the fixedrate load repeats that method.
FIXEDRATE_RPS = 1000
FIXEDRATE_PAYLOAD_BYTES = 1024

HTTP_PORT = 8080        # the test bed's pod app
SOCKPERF_PORT = 11111
IPERF3_PORT = 5201

INET = "inet"
INET6 = "inet6"
MAPPED = "mapped"
FAMILIES = (INET, INET6, MAPPED)
FAMILY_HOW = {
    INET: "AF_INET sockets to the server pod's IPv4 address",
    INET6: "AF_INET6 sockets to the server pod's IPv6 address (dual-stack test bed)",
    MAPPED: "AF_INET6 sockets to the server pod's IPv4 address in its v4-mapped form ::ffff:a.b.c.d, as the JVM "
            "connects (dual-stack test bed); the HTTP Host header names the IPv4 address, as a JVM client's does",
}
# Loads whose tool cannot open the family's sockets, and why.
UNSUPPORTED = {
    (TCP_RR, INET6): "sockperf 3.7 accepts IPv4 addresses only ('-i' Invalid address: ::1)",
    (TCP_RR, MAPPED): "sockperf 3.7 accepts IPv4 addresses only, not ::ffff:a.b.c.d",
}


def check_family(family: str, load_names) -> None:
    """Refuse a family that no load can measure honestly: a tool that cannot
    open the family's sockets would measure IPv4 instead, or nothing."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")
    refused = [f"{load}: {UNSUPPORTED[(load, family)]}" for load in dict.fromkeys(load_names)
               if (load, family) in UNSUPPORTED]
    if refused:
        raise ValueError(f"--family {family} cannot run " + "; ".join(refused)
                         + "; choose --loads without them")


@dataclass(frozen=True)
class Target:
    """Where a client connects: `address` (an IPv4 or IPv6 literal, v4-mapped
    for the mapped family) and what an HTTP client names in its Host header
    (None: the tool's own choice from the URL, as in the inet family)."""
    address: str
    host_header: str | None = None

    @property
    def url_host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address


def target(family: str, ip: str, ip6: str = "", port: int = HTTP_PORT) -> Target:
    """The server pod's address for `family`. The Host header is set for the
    AF_INET6 families so the client sidecar routes the request to the server
    pod's own route (a v4-mapped literal names no route and would fall to
    Envoy's PassthroughCluster: plain text, a different path)."""
    if family == INET:
        return Target(ip)
    if family == INET6:
        if not ip6:
            raise ValueError(f"--family inet6 needs a server pod with an IPv6 address; {ip} has none "
                             "(the bench brings the bed up dual-stack for it)")
        return Target(ip6, f"[{ip6}]:{port}")
    if family == MAPPED:
        return Target(f"::ffff:{ip}", f"{ip}:{port}")
    raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")


# wrk's report script: latency percentiles from every request as it was
# measured, and the raw counters, in one line the parser can find.
#
# Not wrk's own histogram: before it calls done(), wrk 4.1 "corrects" it for
# coordinated omission (stats_correct in its stats.c): every sample longer than
# twice the mean cycle time of a connection (runtime / requests per connection)
# adds synthetic samples at that value minus 1, 2, 3... cycle times. In this
# closed-loop client one stall of 300 ms at a 130 us cycle adds ~2,300 samples
# between 0.1 and 300 ms, so a few stalls of a busy machine become the p90 and
# p99. Measured on a plain Python server in a scratch namespace, no mesh, one
# connection, load average 12-19: wrk's p99 122-164 ms and mean x rate = 39-61
# (Little's law: must be <= 1 with one connection); the requests as measured:
# p99 2.3-3.8 ms, mean x rate = 0.90-0.96. So this script times each request
# itself, from the moment wrk asks for it (request(), right before wrk starts
# its own clock and writes it) to its complete response (response()), into a
# per-thread 1 us histogram, and takes nearest-rank percentiles (wrk's
# definition: the smallest value with at least p% of the samples at or below
# it) over all threads. That needs one connection per thread (wrk_argv), so a
# response always answers the thread's one outstanding request. wrk's
# corrected p99 is printed too (wrk_p99_us), for comparison with old results.
# LuaJIT's ffi gives a monotonic microsecond clock (os.clock is CPU time).
WRK_REPORT_LUA = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } mbp_timespec;
int clock_gettime(int clk, mbp_timespec *tp);
]]
local mbp_ts = ffi.new("mbp_timespec")
function mbp_now_us()
  ffi.C.clock_gettime(1, mbp_ts)  -- CLOCK_MONOTONIC
  return tonumber(mbp_ts.tv_sec) * 1000000 + math.floor(tonumber(mbp_ts.tv_nsec) / 1000)
end

local sent_us, request_text = nil, nil
latencies = {}  -- global: done() reads every thread's; microseconds -> requests

request = function()
  if request_text == nil then request_text = wrk.format() end
  sent_us = mbp_now_us()
  return request_text
end

response = function(status, headers, body)
  if sent_us ~= nil then
    local us = mbp_now_us() - sent_us
    latencies[us] = (latencies[us] or 0) + 1
    sent_us = nil
  end
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

-- more fields for the result line; the fixed-rate script adds its own
function report_extra() return "" end

done = function(summary, latency, requests)
  local merged, values, count, total_us = {}, {}, 0, 0
  for _, t in ipairs(threads) do
    for us, n in pairs(t:get("latencies")) do merged[us] = (merged[us] or 0) + n end
  end
  for us, n in pairs(merged) do
    table.insert(values, us)
    count = count + n
    total_us = total_us + us * n
  end
  table.sort(values)
  local function percentile(p)
    local rank, seen = math.max(1, math.ceil(p / 100 * count)), 0
    for _, us in ipairs(values) do
      seen = seen + merged[us]
      if seen >= rank then return us end
    end
    return 0
  end
  local e = summary.errors
  io.write(string.format(
    "mbp-wrk requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d"
    .. " p50_us=%d p90_us=%d p99_us=%d timed=%d mean_us=%d wrk_p99_us=%d%s\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    percentile(50), percentile(90), percentile(99), count, count > 0 and total_us / count or 0,
    latency:percentile(99), report_extra()))
end
"""

# The fixed-rate client. Debian has no wrk2 or fortio; its `hey -q` paces each
# worker with a Go ticker but prints latencies in seconds with 4 decimals
# (100 us steps), too coarse for differences of tens of microseconds. wrk keeps
# a 1 us histogram, and its `delay()` hook decides when each connection sends
# its next request, so a schedule can be imposed on it: each wrk thread hands
# out send slots `1 / (its share of the rate)` apart, in order, to whichever
# of its connections has its answer back. Slots never drift (a slot is the
# previous slot plus the period, not "now" plus it), so the rate holds even
# though wrk's timer rounds waits down to whole milliseconds. Latency is timed
# by wrk from the actual send, as fortio (Istio's client) and hey time it: a
# stall longer than the slack between a connection's requests would delay the
# sends behind it and hide their waiting (coordinated omission). The script
# therefore counts slots that were already past when claimed (`late=`); with
# late=0 the schedule held and nothing was omitted. With one connection per
# thread (wrk_argv), each connection keeps its own schedule.
WRK_FIXEDRATE_LUA = WRK_REPORT_LUA + """\
local period_us, slot_us = 0, nil
late = 0  -- global: done() reads it from every thread

function init(args)
  period_us = 1e6 / tonumber(args[1])  -- args[1]: this thread's requests/s
  wrk.method = "POST"
  wrk.body = string.rep("x", tonumber(args[2]))
  wrk.headers["Content-Type"] = "application/octet-stream"
end

function delay()
  local now = mbp_now_us()
  slot_us = (slot_us or now) + period_us
  local wait = slot_us - now
  if wait < 0 then
    late = late + 1
    return 0
  end
  return wait / 1000  -- milliseconds
end

function report_extra()
  local behind = 0
  for _, t in ipairs(threads) do behind = behind + t:get("late") end
  return string.format(" late=%d", behind)
end
"""


@dataclass(frozen=True)
class WrkScripts:
    """Paths of the two wrk scripts, as files every pod can read."""
    report: str       # WRK_REPORT_LUA: keepalive and newconn
    fixedrate: str    # WRK_FIXEDRATE_LUA
    fixedrate_rps: int = FIXEDRATE_RPS


class LoadFailed(RuntimeError):
    """A load tool ran but produced no usable measurement."""


@dataclass(frozen=True)
class LoadResult:
    duration_s: float
    requests: int | None = None        # requests / round trips; None for bulk
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None
    errors: int = 0
    bytes: int | None = None
    throughput_bps: float | None = None  # bulk only: bits/s at the receiver
    retransmits: int | None = None       # bulk only: TCP retransmissions seen by the sender
    late_slots: int | None = None        # fixedrate only: send slots already past when claimed
    # wrk only: wrk's own p99 after its coordinated-omission correction (see
    # WRK_REPORT_LUA); kept to compare with results made before the bench
    # timed requests itself. None in their outputs and for the other tools.
    wrk_corrected_p99_us: float | None = None

    @property
    def rps(self) -> float | None:
        if self.requests is None or self.duration_s <= 0:
            return None
        return self.requests / self.duration_s


def parse_load_specs(specs: list[str]) -> list[tuple[str, int]]:
    """"keepalive:1,16", "newconn" or "newconn:4", "tcp_rr", "bulk" -> [(load,
    connections), ...]. Several specs may share one string, separated by spaces."""
    out: list[tuple[str, int]] = []
    for spec in (s for item in specs for s in item.split()):
        load, _, conns = spec.partition(":")
        if load not in LOADS:
            raise ValueError(f"unknown load {load!r}; choose from {', '.join(LOADS)}")
        if not conns:
            counts = [DEFAULT_CONNECTIONS[load]]
        else:
            try:
                counts = [int(c) for c in conns.split(",")]
            except ValueError:
                raise ValueError(f"bad connection counts in {spec!r}: want integers like keepalive:1,16") from None
        if load in (TCP_RR, BULK) and counts != [1]:
            raise ValueError(f"{load} uses one connection; drop the ':' part of {spec!r}")
        for c in counts:
            if c < 1:
                raise ValueError(f"connection count must be >= 1 in {spec!r}")
            if (load, c) not in out:
                out.append((load, c))
    return out


# A new connection per request with 4 concurrent clients: what the prototype
# measured, enough to keep two cores busy without measuring only the queue.
DEFAULT_CONNECTIONS = {KEEPALIVE: 1, NEWCONN: 4, TCP_RR: 1, BULK: 1, FIXEDRATE: 16}


# --- command lines ---------------------------------------------------------------

def wrk_argv(ip: str | Target, connections: int, duration_s: int, script_path: str, *, new_connection: bool,
             port: int = HTTP_PORT) -> list[str]:
    """`ip`: an address, or a Target (its Host header, if any, is sent)."""
    to = ip if isinstance(ip, Target) else Target(ip)
    # one connection per thread: WRK_REPORT_LUA times each request itself
    argv = ["wrk", "-c", str(connections), "-t", str(connections),
            "-d", f"{duration_s}s",
            # far above any latency we expect: a slow request must land in the
            # histogram, not vanish as a timeout
            "--timeout", "10s",
            "-s", script_path]
    if new_connection:
        argv += ["-H", "Connection: close"]
    if to.host_header:
        argv += ["-H", f"Host: {to.host_header}"]
    return argv + [f"http://{to.url_host}:{port}/"]


def wrk_fixedrate_argv(ip: str | Target, connections: int, duration_s: int, script_path: str, *,
                       rps: int = FIXEDRATE_RPS, payload_bytes: int = FIXEDRATE_PAYLOAD_BYTES,
                       port: int = HTTP_PORT) -> list[str]:
    """wrk paced by WRK_FIXEDRATE_LUA: `rps` in total, split evenly over its threads."""
    argv = wrk_argv(ip, connections, duration_s, script_path, new_connection=False, port=port)
    threads = int(argv[argv.index("-t") + 1])
    return argv + ["--", f"{rps / threads:g}", str(payload_bytes)]


def sockperf_server_argv(ip: str, port: int = SOCKPERF_PORT) -> list[str]:
    return ["sockperf", "server", "--tcp", "-i", ip, "-p", str(port)]


def sockperf_client_argv(ip: str, duration_s: int, port: int = SOCKPERF_PORT) -> list[str]:
    # sockperf spends ~0.4 s of the run warming up and reports only the rest
    return ["sockperf", "ping-pong", "--tcp", "-i", ip, "-p", str(port),
            "-t", str(duration_s), "--full-rtt"]


def iperf3_server_argv(ip: str, port: int = IPERF3_PORT) -> list[str]:
    return ["iperf3", "--server", "--one-off", "--bind", ip, "--port", str(port)]


def iperf3_client_argv(ip: str, duration_s: int, port: int = IPERF3_PORT) -> list[str]:
    # iperf3 3.12 takes IPv6 and v4-mapped literals (an AF_INET6 socket for both: checked with strace)
    return ["iperf3", "--client", ip, "--port", str(port), "--time", str(duration_s),
            "--connect-timeout", "5000", "--json"]


# --- parsers -------------------------------------------------------------------

_WRK_LINE = re.compile(r"^mbp-wrk (.*)$", re.MULTILINE)


def parse_wrk(output: str) -> LoadResult:
    m = _WRK_LINE.search(output)
    if not m:
        raise LoadFailed(f"wrk printed no result line: {_tail(output)}")
    fields = dict(kv.split("=", 1) for kv in m.group(1).split())
    n = {k: int(v) for k, v in fields.items()}
    if n["requests"] == 0:
        raise LoadFailed(f"wrk completed no request: {_tail(output)}")
    if "timed" in n and n["timed"] != n["requests"]:
        # each response answers its thread's one outstanding request; anything
        # else means the percentiles are not of these requests
        raise LoadFailed(f"wrk's script timed {n['timed']} of {n['requests']} requests: run it with one "
                         "connection per thread (-t = -c)")
    return LoadResult(
        late_slots=n.get("late"),
        wrk_corrected_p99_us=float(n["wrk_p99_us"]) if "wrk_p99_us" in n else None,
        duration_s=n["duration_us"] / 1e6,
        requests=n["requests"],
        p50_us=float(n["p50_us"]), p90_us=float(n["p90_us"]), p99_us=float(n["p99_us"]),
        errors=sum(n[k] for k in ("connect", "read", "write", "status", "timeout")),
        bytes=n["bytes"],
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SOCKPERF_VALID = re.compile(
    r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)")
_SOCKPERF_PCT = re.compile(r"percentile ([\d.]+) =\s*([\d.]+)")
_SOCKPERF_ANOMALIES = re.compile(
    r"# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)")


def parse_sockperf(output: str) -> LoadResult:
    """sockperf ping-pong with --full-rtt: percentiles are round trips in us."""
    text = _ANSI.sub("", output)
    valid = _SOCKPERF_VALID.search(text)
    pct = {float(p): float(v) for p, v in _SOCKPERF_PCT.findall(text)}
    if not valid or not {50.0, 90.0, 99.0} <= pct.keys():
        raise LoadFailed(f"sockperf printed no statistics: {_tail(text)}")
    if "Round trip is" not in text:
        raise LoadFailed("sockperf reported one-way latency; run the client with --full-rtt")
    anomalies = _SOCKPERF_ANOMALIES.search(text)
    received = int(valid.group(3))
    if received == 0:
        raise LoadFailed(f"sockperf received no reply: {_tail(text)}")
    return LoadResult(
        duration_s=float(valid.group(1)),
        requests=received,
        p50_us=pct[50.0], p90_us=pct[90.0], p99_us=pct[99.0],
        errors=sum(int(x) for x in anomalies.groups()) if anomalies else 0,
    )


def parse_iperf3(output: str) -> LoadResult:
    try:
        doc = json.loads(output)
    except json.JSONDecodeError:
        raise LoadFailed(f"iperf3 printed no JSON: {_tail(output)}") from None
    if "error" in doc:
        raise LoadFailed(f"iperf3: {doc['error']}")
    try:
        received = doc["end"]["sum_received"]
        sent = doc["end"]["sum_sent"]
    except KeyError:
        raise LoadFailed("iperf3 JSON has no end.sum_received") from None
    return LoadResult(
        duration_s=float(received["seconds"]),
        bytes=int(received["bytes"]),
        throughput_bps=float(received["bits_per_second"]),
        retransmits=int(sent.get("retransmits", 0)),
    )


def _tail(text: str, lines: int = 3) -> str:
    tail = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(tail) if tail else "(no output)"
