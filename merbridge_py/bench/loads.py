"""The load generators: their command lines and parsers for their output.

Four loads, each driven by a Debian tool:
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
LOADS = (KEEPALIVE, NEWCONN, TCP_RR, BULK)

HTTP_PORT = 8080        # the test bed's pod app
SOCKPERF_PORT = 11111
IPERF3_PORT = 5201

# A wrk script whose only job is to print exact percentiles from wrk's own
# histogram (the default report rounds them to 2-3 significant digits) and the
# raw counters, in one line the parser can find among wrk's report.
WRK_REPORT_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "mbp-wrk requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d"
    .. " p50_us=%d p90_us=%d p99_us=%d\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


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
DEFAULT_CONNECTIONS = {KEEPALIVE: 1, NEWCONN: 4, TCP_RR: 1, BULK: 1}


# --- command lines ---------------------------------------------------------------

def wrk_argv(ip: str, connections: int, duration_s: int, script_path: str, *, new_connection: bool,
             port: int = HTTP_PORT) -> list[str]:
    argv = ["wrk", "-c", str(connections), "-t", str(min(connections, 2)),
            "-d", f"{duration_s}s",
            # far above any latency we expect: a slow request must land in the
            # histogram, not vanish as a timeout
            "--timeout", "10s",
            "-s", script_path]
    if new_connection:
        argv += ["-H", "Connection: close"]
    return argv + [f"http://{ip}:{port}/"]


def sockperf_server_argv(ip: str, port: int = SOCKPERF_PORT) -> list[str]:
    return ["sockperf", "server", "--tcp", "-i", ip, "-p", str(port)]


def sockperf_client_argv(ip: str, duration_s: int, port: int = SOCKPERF_PORT) -> list[str]:
    # sockperf spends ~0.4 s of the run warming up and reports only the rest
    return ["sockperf", "ping-pong", "--tcp", "-i", ip, "-p", str(port),
            "-t", str(duration_s), "--full-rtt"]


def iperf3_server_argv(ip: str, port: int = IPERF3_PORT) -> list[str]:
    return ["iperf3", "--server", "--one-off", "--bind", ip, "--port", str(port)]


def iperf3_client_argv(ip: str, duration_s: int, port: int = IPERF3_PORT) -> list[str]:
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
    return LoadResult(
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
