"""Steady HTTP load from inside a test-bed pod that accounts for every request:
which failed, when, how, and which keep-alive connections broke.

wrk and friends report error totals only; a test of a mode switch needs to
know that *no* request failed and that connections opened before a switch
were still serving after it. This client is small and exact instead of fast.

    python -m merbridge_py.testbed.load --target b=10.200.0.11:8080 --target d=10.200.1.10:8080 \
        --keepalive 2 --newconn 1 --duration 60 [--rotate 9] [--ready-file F] [--family inet6]

A target's address is IPv4 or "[IPv6]:port". `--family inet6` makes the
workers use AF_INET6 sockets for IPv4 targets too, through their v4-mapped
addresses (::ffff:a.b.c.d), as the JVM does.

For every target it runs `--keepalive` workers that reuse one connection
(replaced by a fresh one every `--rotate` seconds, the workers' replacements
spread evenly over that period; 0 = keep it for the whole run) and
`--newconn` workers that open a new connection per request. Each request
is `GET /whoami`; it succeeds when the answer is 200 and names the target
pod (a response from the wrong pod is a failure too). Workers stop by
themselves after `--duration` seconds, or soon after SIGTERM (each finishes
its request in flight). One JSON document goes to stdout:

  {"started": t, "duration": s, "requests": n, "failed": n, "connections": n,
   "failures": [{"t", "started", "worker", "kind", "error", "local", "requests_on_connection"}],
   "keepalive_connections": [{"worker", "local", "opened", "closed", "requests", "broken"}],
   "max_latency": s}

Times are time.monotonic() (CLOCK_MONOTONIC, the same clock in every process
on the host), so a test can place each failure (`started`: when the failed
request or connect began, `t`: when it failed) and each connection between
its own events. Failure kinds: "connect" (no connection), "broken" (an
established keep-alive connection that had already served a request failed),
"request" (a fresh connection's first request failed), "response" (a wrong
answer). Standard library only, so it starts fast inside a pod.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_RECORDED_FAILURES = 200   # the count is always exact; the details are capped


@dataclass(frozen=True)
class Target:
    pod: str
    host: str
    port: int
    connect_to: str = ""     # the address the socket connects to when not `host` (v4-mapped)

    @classmethod
    def parse(cls, text: str) -> "Target":
        pod, _, addr = text.partition("=")
        host, _, port = addr.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not pod or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"--target {text!r}: expected POD=IP:PORT (POD=[IPv6]:PORT)")
        return cls(pod, host, int(port))

    def in_family(self, family: str | None) -> "Target":
        """This target as a socket of `family` reaches it: "inet6" connects to
        an IPv4 host at ::ffff:a.b.c.d (the Host header still names a.b.c.d,
        as a JVM client's does)."""
        if family == "inet6" and ipaddress.ip_address(self.host).version == 4:
            return Target(self.pod, self.host, self.port, connect_to=f"::ffff:{self.host}")
        if family == "inet" and ipaddress.ip_address(self.host).version == 6:
            raise ValueError(f"an AF_INET socket cannot reach the IPv6 address {self.host}")
        return self

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class Connection:
    worker: str
    local: str
    opened: float
    closed: float | None = None
    requests: int = 0
    broken: bool = False


@dataclass
class Tally:
    requests: int = 0
    failed: int = 0
    connections: int = 0
    max_latency: float = 0.0
    failures: list[dict] = field(default_factory=list)
    keepalive: list[Connection] = field(default_factory=list)

    def fail(self, worker: str, kind: str, error: str, conn: Connection | None, started: float) -> None:
        self.failed += 1
        if len(self.failures) < MAX_RECORDED_FAILURES:
            self.failures.append({"t": time.monotonic(), "started": started, "worker": worker, "kind": kind,
                                  "error": error,
                                  "local": conn.local if conn else None,
                                  "requests_on_connection": conn.requests if conn else 0})
        print(f"load: {worker}: {kind}: {error}", file=sys.stderr, flush=True)


class ResponseError(Exception):
    """An answer that is not a 200 from the target pod."""


async def _get_whoami(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
    writer.write(f"GET /whoami HTTP/1.1\r\nHost: {target.authority}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length)
    if len(status) < 2 or status[1] != "200":
        raise ResponseError(f"status {lines[0]!r}")
    try:
        pod = json.loads(body).get("pod")
    except ValueError:
        raise ResponseError(f"not JSON: {body[:80]!r}")
    if pod != target.pod:
        raise ResponseError(f"answered by pod {pod!r}, expected {target.pod!r}")


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return f"connection closed after {len(e.partial)} bytes"
    return f"{type(e).__name__}: {e}"


class Worker:
    def __init__(self, name: str, target: Target, tally: Tally, deadline: float, timeout: float):
        self.name, self.target, self.tally = name, target, tally
        self.deadline, self.timeout = deadline, timeout

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Connection] | None:
        start = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.target.connect_to or self.target.host, self.target.port), self.timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.tally.requests += 1   # the request this connection was for never went out
            self.tally.fail(self.name, "connect", _describe(e), None, start)
            return None
        self.tally.connections += 1
        host, port = writer.get_extra_info("sockname")[:2]
        local = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return reader, writer, Connection(self.name, local, time.monotonic())

    async def _request(self, reader, writer, conn: Connection) -> bool:
        self.tally.requests += 1
        start = time.monotonic()
        try:
            await asyncio.wait_for(_get_whoami(reader, writer, self.target), self.timeout)
        except ResponseError as e:
            self.tally.fail(self.name, "response", str(e), conn, start)
            return False
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as e:
            self.tally.fail(self.name, "broken" if conn.requests else "request", _describe(e), conn, start)
            return False
        finally:
            self.tally.max_latency = max(self.tally.max_latency, time.monotonic() - start)
        conn.requests += 1
        return True

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass

    async def _open_until_deadline(self):
        """A new connection, retrying every 50 ms; None once the run is over."""
        while time.monotonic() < self.deadline:
            opened = await self._open()
            if opened is not None:
                return opened
            await asyncio.sleep(0.05)
        return None

    async def keepalive(self, rotate: float, first_rotate: float) -> None:
        lifetime = first_rotate
        while (opened := await self._open_until_deadline()) is not None:
            reader, writer, conn = opened
            self.tally.keepalive.append(conn)
            replace_at = conn.opened + lifetime if rotate > 0 else float("inf")
            lifetime = rotate
            while time.monotonic() < min(self.deadline, replace_at):
                if not await self._request(reader, writer, conn):
                    conn.broken = True
                    break
            conn.closed = time.monotonic()
            await self._close(writer)

    async def new_connection_per_request(self) -> None:
        while (opened := await self._open_until_deadline()) is not None:
            reader, writer, conn = opened
            await self._request(reader, writer, conn)
            await self._close(writer)


async def run(targets: list[Target], keepalive: int, newconn: int, duration: float, rotate: float,
              timeout: float, ready_file: Path | None = None) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + duration
    workers, tasks = [], []
    for target in targets:
        for i in range(keepalive):
            w = Worker(f"{target.pod}-keepalive{i}", target, tally, deadline, timeout)
            workers.append(w)
            # Staggered: the workers' connections are replaced at evenly spread
            # moments, never all at once, so some connection is always old.
            tasks.append(asyncio.create_task(w.keepalive(rotate, rotate * (i + 1) / keepalive)))
        for i in range(newconn):
            w = Worker(f"{target.pod}-newconn{i}", target, tally, deadline, timeout)
            workers.append(w)
            tasks.append(asyncio.create_task(w.new_connection_per_request()))

    def stop_early() -> None:
        for w in workers:
            w.deadline = min(w.deadline, time.monotonic())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop_early)
    if ready_file is not None:
        # Ready once every keep-alive worker's first connection has served a request.
        while (not all(t.done() for t in tasks)
               and sum(1 for c in tally.keepalive if c.requests) < keepalive * len(targets)):
            await asyncio.sleep(0.01)
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(f"{time.monotonic()}\n")
        tmp.replace(ready_file)
    # Every worker checks the deadline between requests and a request is
    # bounded by `timeout`, so this returns by deadline + a few timeouts.
    await asyncio.gather(*tasks)
    return tally


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m merbridge_py.testbed.load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Target.parse, action="append", required=True, help="POD=IP:PORT (repeatable)")
    parser.add_argument("--keepalive", type=int, default=2, help="keep-alive workers per target")
    parser.add_argument("--newconn", type=int, default=1, help="connection-per-request workers per target")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--rotate", type=float, default=0.0,
                        help="replace each keep-alive connection after this many seconds (0: never)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per connect and per request")
    parser.add_argument("--ready-file", type=Path, help="created once every keep-alive connection has served")
    parser.add_argument("--family", choices=("inet", "inet6"),
                        help="socket family (default: each address's own); inet6 reaches IPv4 targets v4-mapped")
    args = parser.parse_args(argv)
    try:
        targets = [t.in_family(args.family) for t in args.target]
    except ValueError as e:
        parser.error(str(e))
    started = time.monotonic()
    tally = asyncio.run(run(targets, args.keepalive, args.newconn, args.duration, args.rotate, args.timeout,
                            args.ready_file))
    json.dump({"started": started, "duration": time.monotonic() - started, "requests": tally.requests,
               "failed": tally.failed, "connections": tally.connections, "max_latency": tally.max_latency,
               "failures": tally.failures, "keepalive_connections": [asdict(c) for c in tally.keepalive]},
              sys.stdout)
    sys.stdout.write("\n")


# --- the test's side ---------------------------------------------------------------

class LoadProcess:
    """A load client running inside a test-bed pod (its network namespace and
    cgroup, so the eBPF programs treat it as that pod's app).

        load = LoadProcess(tb, "a", {"b": "10.200.0.11:8080"}, duration=60)
        load6 = LoadProcess(tb, "a", {"b": "10.200.0.11:8080"}, duration=60, family="inet6")  # v4-mapped
        native = LoadProcess(tb, "a", {"b": "[fd10:200::11]:8080"}, duration=60)
        load.wait_ready()
        ...
        result = load.result()      # or load.stop() first to end it early
    """

    def __init__(self, tb, pod: str, targets: dict[str, str], duration: float, keepalive: int = 2,
                 newconn: int = 1, rotate: float = 0.0, timeout: float = 10.0, family: str | None = None):
        self.duration, self.timeout = duration, timeout
        # Not base.with_suffix(): it would replace ".load<id>", and two loads in one pod would share files.
        base = f"{pod}.load{id(self)}"
        self.ready_file, self.output, self.log = (tb.workdir / f"{base}{s}" for s in (".ready", ".json", ".log"))
        argv = [sys.executable, "-m", "merbridge_py.testbed.load", "--duration", str(duration),
                "--keepalive", str(keepalive), "--newconn", str(newconn), "--rotate", str(rotate),
                "--timeout", str(timeout), "--ready-file", str(self.ready_file)]
        for name, addr in targets.items():
            argv += ["--target", f"{name}={addr}"]
        if family is not None:
            argv += ["--family", family]
        with open(self.output, "wb") as out, open(self.log, "wb") as err:
            self.proc = tb.spawn_in(pod, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"load client not ready (exit code {self.proc.poll()}): "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """End the run early; result() still reports every request."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def result(self) -> dict:
        try:
            self.proc.wait(timeout=self.duration + 4 * self.timeout + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"load client did not stop by itself; its log:\n{self.log.read_text()[-2000:]}")
        if self.proc.returncode != 0:
            raise RuntimeError(f"load client failed ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        return json.loads(self.output.read_text())


if __name__ == "__main__":
    main()
