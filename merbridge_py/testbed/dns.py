"""DNS on the test bed: a DNS server outside the pods, the DNS proxy Istio's
agent runs inside pods with DNS capture, and the resolv.conf pods see.

  server  one per node, in the node's namespace on its gateway address, port
          53 (UDP and TCP): the cluster DNS the pods' resolv.conf names. It
          answers SERVER_RECORDS and NXDOMAIN for anything else.
  proxy   in every meshed pod whose proxy metadata has
          ISTIO_META_DNS_CAPTURE=true, as pilot-agent's DNS proxy: on
          127.0.0.1:15053 (UDP and TCP), running as the pod's proxy uid/gid
          (1337 by default), in the pod's namespace and cgroup. It answers PROXY_RECORDS itself (as
          istio-agent answers mesh service names) and forwards everything
          else to the pod's nameservers.
  resolv.conf  /etc/netns/<pod netns>/resolv.conf: `ip netns exec` (which
          every process of the bed goes through) bind-mounts it over
          /etc/resolv.conf in a mount namespace of its own, so glibc and dig
          inside a pod ask the node's server. Removed with the bed.

Both programs count the queries they get, by transport, and tell the counts
to whoever connects to their stats socket (a unix socket in the bed's work
directory): the proxy's count is the witness that a lookup was captured.

Run as `python -m merbridge_py.testbed.dns {server,proxy} ...`; the `lookups`
(glibc getaddrinfo in a loop, timing each) and `query` (one query over a
chosen socket kind) roles are the clients the tests run inside pods.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A, AAAA, DNSRecord

from . import topology

PROXY_PORT = 15053
DNS_PORT = 53
NETNS_ETC = Path("/etc/netns")
FORWARD_TIMEOUT = 2.0
START_TIMEOUT = 20.0

# name -> (IPv4, IPv6): what each side answers itself.
SERVER_RECORDS = {"outside.dns.test.": ("10.250.0.1", "fd00:250::1")}
PROXY_RECORDS = {"mesh.dns.test.": ("10.251.0.1", "fd00:251::1")}
# resolv.conf of every pod. `timeout:1`: a lost query costs 1 s instead of
# glibc's default 5 s, so the 10,000-lookup test stays short; it counts the
# lookups that had to wait for the timeout either way.
RESOLV_OPTIONS = "options timeout:1 attempts:2"


# --- the DNS programs ----------------------------------------------------------------

class Resolver:
    """Answers from a table; forwards the rest upstream (proxy) or says NXDOMAIN (server)."""

    def __init__(self, records: dict[str, tuple[str, str]], upstream: tuple[str, int] | None):
        self.records = records
        self.upstream = upstream
        self.counts = {"udp": 0, "tcp": 0, "answered": 0, "forwarded": 0, "failed": 0}

    async def answer(self, data: bytes) -> bytes | None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - a bad packet gets no answer, as from any server
            self.counts["failed"] += 1
            return None
        name = str(query.q.qname).lower()
        if name in self.records or self.upstream is None:
            reply = query.reply()
            if name in self.records:
                v4, v6 = self.records[name]
                if query.q.qtype == QTYPE.A:
                    reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(v4), ttl=5))
                elif query.q.qtype == QTYPE.AAAA:
                    reply.add_answer(RR(query.q.qname, QTYPE.AAAA, rdata=AAAA(v6), ttl=5))
            else:
                reply.header.rcode = RCODE.NXDOMAIN
            self.counts["answered"] += 1
            return reply.pack()
        self.counts["forwarded"] += 1
        try:
            return await self._forward(data)
        except (OSError, asyncio.TimeoutError):
            self.counts["failed"] += 1
            reply = query.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()

    async def _forward(self, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, reply, addr):
                if not done.done():
                    done.set_result(reply)

            def error_received(self, exc):
                if not done.done():
                    done.set_exception(exc)

        transport, _ = await loop.create_datagram_endpoint(Upstream, remote_addr=self.upstream)
        try:
            transport.sendto(data)
            return await asyncio.wait_for(done, FORWARD_TIMEOUT)
        finally:
            transport.close()


class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver):
        self.resolver = resolver
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.resolver.counts["udp"] += 1
        asyncio.ensure_future(self._reply(data, addr))

    async def _reply(self, data, addr):
        reply = await self.resolver.answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


async def _tcp_client(resolver: Resolver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            data = await reader.readexactly(size)
            resolver.counts["tcp"] += 1
            reply = await resolver.answer(data)
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _stats_client(resolver: Resolver, reader, writer) -> None:
    writer.write(json.dumps(resolver.counts).encode())
    await writer.drain()
    writer.close()


async def serve(listen: tuple[str, int], records: dict, upstream: tuple[str, int] | None,
                stats_socket: Path, ready_file: Path) -> None:
    resolver = Resolver(records, upstream)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: UdpServer(resolver), local_addr=listen)
    await asyncio.start_server(lambda r, w: _tcp_client(resolver, r, w), listen[0], listen[1])
    stats_socket.unlink(missing_ok=True)
    await asyncio.start_unix_server(lambda r, w: _stats_client(resolver, r, w), str(stats_socket))
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    ready_file.write_text(str(os.getpid()))
    await stop


def lookups(name: str, count: int, slow_s: float) -> dict:
    """`count` getaddrinfo() calls for `name` with AF_UNSPEC, glibc's default
    shape: its resolver sends the A and the AAAA query from one socket at
    once (no `options single-request`). A lookup that took `slow_s` or more
    waited for a resolver timeout (a query or a reply was lost)."""
    durations, errors = [], 0
    for _ in range(count):
        started = time.monotonic()
        try:
            socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        except socket.gaierror:
            errors += 1
        durations.append(time.monotonic() - started)
    durations.sort()
    return {"count": count, "errors": errors, "timeouts": sum(d >= slow_s for d in durations),
            "median_ms": round(durations[len(durations) // 2] * 1000, 3),
            "p99_ms": round(durations[int(len(durations) * 0.99)] * 1000, 3),
            "max_ms": round(durations[-1] * 1000, 3)}


def query(server: str, name: str, how: str) -> dict:
    """One A query for `name` to server:53 over `how`: "unconnected" UDP
    (sendto/recvfrom), "connected" UDP (connect/send/recvfrom) or "tcp"; a
    "6" suffix asks from an AF_INET6 socket through the server's v4-mapped
    address (::ffff:a.b.c.d), as dual-stack runtimes do. Says where the
    reply came from (as recvfrom reports it) and, for connected sockets,
    what getpeername() says: a resolver drops replies whose source is not
    the server it asked."""
    data = DNSRecord.question(name).pack()
    family, address = socket.AF_INET, server
    if how.endswith("6"):
        family, address, how = socket.AF_INET6, f"::ffff:{server}", how[:-1]
    with socket.socket(family, socket.SOCK_STREAM if how == "tcp" else socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        peer = None
        if how == "unconnected":
            s.sendto(data, (address, DNS_PORT))
            reply, source = s.recvfrom(4096)
        elif how == "connected":
            s.connect((address, DNS_PORT))
            peer = s.getpeername()
            s.send(data)
            reply, source = s.recvfrom(4096)
        elif how == "tcp":
            s.connect((address, DNS_PORT))
            peer = s.getpeername()
            s.sendall(struct.pack("!H", len(data)) + data)
            size = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
            reply, source = s.recv(size, socket.MSG_WAITALL), peer
        else:
            raise ValueError(f"how {how!r}: unconnected, connected or tcp, optionally with a 6")
    answers = [str(rr.rdata) for rr in DNSRecord.parse(reply).rr]
    return {"answers": answers, "reply_from": list(source[:2]), "peer": list(peer[:2]) if peer else None}


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m merbridge_py.testbed.dns")
    parser.add_argument("role", choices=("server", "proxy", "lookups", "query"))
    parser.add_argument("--listen", type=_address, help="IP:PORT (UDP and TCP)")
    parser.add_argument("--upstream", type=_address, help="proxy: where names it does not know go")
    parser.add_argument("--stats-socket", type=Path)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--name", help="lookups: the name to resolve")
    parser.add_argument("--count", type=int, default=1000, help="lookups: how many")
    parser.add_argument("--server", help="query: the DNS server's IPv4 address")
    parser.add_argument("--how", default="unconnected", help="query: unconnected, connected or tcp (+6: AF_INET6, v4-mapped)")
    parser.add_argument("--slow", type=float, default=0.9, help="lookups: seconds that count as a timeout")
    args = parser.parse_args(argv)
    if args.role == "query":
        if not (args.server and args.name):
            parser.error("query needs --server and --name")
        print(json.dumps(query(args.server, args.name, args.how)))
        return
    if args.role == "lookups":
        if not args.name:
            parser.error("lookups needs --name")
        print(json.dumps(lookups(args.name, args.count, args.slow)))
        return
    if not (args.listen and args.stats_socket and args.ready_file):
        parser.error(f"{args.role} needs --listen, --stats-socket and --ready-file")
    if args.role == "proxy" and args.upstream is None:
        parser.error("proxy needs --upstream")
    records = SERVER_RECORDS if args.role == "server" else PROXY_RECORDS
    asyncio.run(serve(args.listen, records, args.upstream if args.role == "proxy" else None,
                      args.stats_socket, args.ready_file))


# --- on the bed -----------------------------------------------------------------------

def captures_dns(pod) -> bool:
    """A meshed pod whose proxy metadata turns DNS capture on (as Istio reads it)."""
    from .istio_dns import ENV_DNS_CAPTURE, GO_TRUE, proxy_metadata
    return bool(pod.meshed and proxy_metadata(pod.annotations).get(ENV_DNS_CAPTURE, "") in GO_TRUE)


def resolv_conf(node) -> str:
    return f"nameserver {node.gateway}\n{RESOLV_OPTIONS}\n"


def nameservers(node) -> tuple[str, ...]:
    return (node.gateway,)


def etc_dir(netns: str) -> Path:
    return NETNS_ETC / netns


def write_resolv_confs(tb) -> None:
    for pod in tb.pods:
        d = etc_dir(pod.netns)
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(resolv_conf(tb.node(pod.node)))


def remove_resolv_confs(netns_prefix: str) -> None:
    """Remove the resolv.conf the bed wrote under /etc/netns/<prefix>* (and
    the directory, when nothing else was put there)."""
    for d in NETNS_ETC.glob(f"{netns_prefix}*"):
        if d.is_dir():
            (d / "resolv.conf").unlink(missing_ok=True)
            try:
                d.rmdir()
            except OSError:
                pass   # something else put files there: not ours to remove


def _dir(tb) -> Path:
    return tb.workdir / "dns"


def stats_socket(tb, owner: str, role: str) -> Path:
    return _dir(tb) / f"{owner}.{role}.sock"


def start(tb) -> None:
    """Start the node servers and the pods' DNS proxies (any mode: without
    Istio's rules or the agent nothing sends them the pods' lookups)."""
    from .. import sandbox
    from . import istio_iptables
    d = _dir(tb)
    d.mkdir(exist_ok=True)
    records = []
    for node in tb.nodes:
        argv = [sys.executable, "-m", "merbridge_py.testbed.dns", "server", "--listen", f"{node.gateway}:{DNS_PORT}",
                "--stats-socket", str(stats_socket(tb, node.name, "server")),
                "--ready-file", str(d / f"{node.name}.server.ready")]
        with open(d / f"{node.name}.server.log", "ab") as log:
            # in the bed's own cgroup (as its agents): `down` finds it even without the state file
            proc = sandbox.spawn(argv, netns=node.netns, cgroup=topology.cgroup_dir(tb.name) / "ctl",
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        records.append((tb._track(proc, "dns-server", node.name), d / f"{node.name}.server.ready"))
    for pod in tb.pods:
        if not captures_dns(pod):
            continue
        pod_dir = d / pod.name
        pod_dir.mkdir(exist_ok=True)
        # as pilot-agent: the pod's proxy uid/gid (1337, or e.g. an OpenShift range's
        # 1000720000), which Istio's rules and the datapath exempt from DNS capture
        mesh = istio_iptables.pod_mesh(pod)
        uid, gid = mesh.proxy_uid, mesh.gid
        os.chown(pod_dir, uid, gid)   # the proxy makes its socket there
        ready = pod_dir / "proxy.ready"
        argv = [sys.executable, "-m", "merbridge_py.testbed.dns", "proxy", "--listen", f"127.0.0.1:{PROXY_PORT}",
                "--upstream", f"{nameservers(tb.node(pod.node))[0]}:{DNS_PORT}",
                "--stats-socket", str(pod_dir / "proxy.sock"), "--ready-file", str(ready)]
        with open(d / f"{pod.name}.proxy.log", "ab") as log:
            proc = sandbox.spawn(argv, netns=pod.netns, cgroup=Path(pod.cgroup), uid=uid, gid=gid,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        records.append((tb._track(proc, "dns-proxy", pod.name), ready))
    deadline = time.monotonic() + START_TIMEOUT
    for rec, ready in records:
        while not ready.exists():
            if not rec.alive() or time.monotonic() > deadline:
                log = d / (f"{rec.owner}.server.log" if rec.role == "dns-server" else f"{rec.owner}.proxy.log")
                raise RuntimeError(f"{rec.role} of {rec.owner} did not start: "
                                   f"{log.read_text(errors='replace')[-1500:] if log.exists() else ''}")
            time.sleep(0.02)


def _read_stats(path: Path) -> dict[str, int]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return json.loads(data)


def proxy_stats(tb, pod) -> dict[str, int]:
    """Queries the pod's DNS proxy got: {"udp", "tcp", "answered", "forwarded", "failed"}."""
    return _read_stats(_dir(tb) / tb.pod(pod).name / "proxy.sock")


def server_stats(tb, node) -> dict[str, int]:
    """Queries the node's DNS server got (same keys as proxy_stats)."""
    return _read_stats(stats_socket(tb, tb.node(node).name, "server"))


if __name__ == "__main__":
    main()
