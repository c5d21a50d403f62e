"""Hop sequences: which way one request went through the mesh, observed from
outside the datapath, so two datapaths (Istio's iptables rules, eBPF) can be
compared request by request without trusting either one's own account.

For a probe (a client pod, a destination address and port, TCP) one HTTP
GET /whoami runs from inside the client pod (its network namespace and its
cgroup: the app's view), and the hop sequence is

  sidecars  which listeners of the client's and the server's Envoy accepted
            the connection and which of their clusters connected onward,
            with counts, from Envoy's counters read just before and just
            after the request: `listener.<ip>_<port>` (an outbound listener
            of a known destination), `virtualOutbound` (nothing matched:
            PassthroughCluster or BlackHoleCluster), `virtualInbound`
            (0.0.0.0:15006), its TLS handshakes, `inbound|<port>||` or
            `InboundPassthroughCluster`; each tagged with the sidecar's
            role: `client`, `server`, or `self` (a pod calling itself);
  peer      who the server's app saw connecting: `inbound-sidecar`
            (127.0.0.6, Envoy's inbound passthrough source), `client`
            (the client pod's own address: no sidecar in between on the
            server side), or the address itself;
  outcome   `http <status>`, or how it failed: `refused` (at connect),
            `unreachable`, `timeout`, `closed` (connected, then closed or
            reset before a response: e.g. a sidecar whose upstream refused);
  client    what the client app's own socket shows (issue 20): its
            getpeername() (the destination it dialled under Istio's rules,
            which NAT packets and leave the socket alone) and the address
            of its getsockname() (the pod's own address).

A probe's client socket is one of three kinds (`family`): `inet` (AF_INET),
`v4-mapped` (AF_INET6 to ::ffff:<IPv4>, as the JVM dials: the kernel runs
the IPv6 connect hook for it) or `inet6` (native IPv6, on a dual-stack bed).
With `proxy` the request is made as the pod's proxy uid (inside the pod's
user namespace, if it has one): Istio's owner match lets such connections
out directly, and so must the datapath. A DNS probe (`dns_name`) sends one A
query to the pod's nameserver (`address`, port 53) over `dns_how` (dns.py
query: unconnected/connected UDP or TCP, a `6` suffix for v4-mapped); its
hops are the query counts of the pod's DNS proxy (captured) and of the
node's DNS server, its outcome the answers, its peers where the reply came
from and what the connected socket's getpeername() says.

Requests run one at a time from one long-lived process per client pod and
uid (`python -m merbridge_py.testbed.probes`, fed one JSON request per line), so
the counters of a probe can only move for that probe: the bed carries no
other traffic between the two reads but Envoy's own health listener, whose
counters are not read.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass

from .client import format_address

PASSTHROUGH_SOURCE = "127.0.0.6"    # Envoy's inbound clusters bind here (ISTIO.inbound_passthrough_ip)
PASSTHROUGH_SOURCE6 = "::6"         # ... and here for IPv6
FAMILIES = ("inet", "v4-mapped", "inet6")
PROBE_TIMEOUT = 5.0                 # per request; every outcome of the bed is decided well within it
_VIRTUAL = {"0.0.0.0_15001": "virtualOutbound", "0.0.0.0_15006": "virtualInbound"}
# Counters that say where a connection went; the health listener (15021)
# and the admin endpoint are left out: they carry the bed's own checks.
_STATS_FILTER = (r"^(listener\.[0-9.]+_[0-9]+\.(downstream_cx_total|ssl\.handshake)"
                 r"|cluster\..+\.upstream_cx_total)$")
_IGNORED_LISTENERS = ("listener.0.0.0.0_15021.",)


@dataclass(frozen=True)
class Probe:
    """One request to make: from pod `client` to `address`:`port`. `server`
    is the bed's pod that owns the address (pod IP or Service IP), if any;
    `kind` says what the destination is, for tables."""

    client: str
    address: str
    port: int
    kind: str
    server: str | None = None
    family: str = "inet"        # the client socket: "inet", "v4-mapped" or "inet6" (FAMILIES)
    proxy: bool = False         # made as the pod's proxy uid, not as its app
    dns_name: str = ""          # a DNS query for this name instead of an HTTP request
    dns_how: str = "unconnected"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: one of {', '.join(FAMILIES)}")

    def key(self) -> str:
        how = [] if self.family == "inet" else [self.family]
        how += ["as proxy"] if self.proxy else []
        what = f"DNS {self.dns_name} over {self.dns_how} to " if self.dns_name else ""
        extra = f", {' '.join(how)}" if how else ""
        return f"{self.client} -> {what}{self.address}:{self.port} ({self.kind}{extra})"

    def request(self) -> dict:
        """The line the probe process inside the client pod reads."""
        if self.dns_name:
            return {"dns": self.dns_name, "server": self.address, "how": self.dns_how}
        return {"host": self.address, "port": self.port, "family": self.family}


@dataclass(frozen=True)
class Hops:
    """What one request went through (see the module's docstring)."""

    sidecars: tuple[tuple[str, str, int], ...]   # (role, counter, increase), sorted
    peer: str
    outcome: str
    answered_by: str = ""                         # pod:port that answered /whoami
    client_peer: str = "-"      # the client socket's getpeername(), "-" if it never connected
    client_local: str = "-"     # the address (no port) of its getsockname()

    def describe(self) -> str:
        hops = ", ".join(f"{role}:{name}+{n}" for role, name, n in self.sidecars) or "no sidecar"
        answer = f" by {self.answered_by}" if self.answered_by else ""
        return (f"{self.outcome}{answer}, peer {self.peer}; client sees peer {self.client_peer} "
                f"from {self.client_local}; {hops}")


# --- inside the client pod --------------------------------------------------------

def classify_error(exc: BaseException) -> str:
    """How a request failed, in words both datapaths must agree on."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                        http.client.RemoteDisconnected, http.client.IncompleteRead, http.client.BadStatusLine)):
        return "closed"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return f"error {type(exc).__name__}"


def _dialled(host: str, family: str) -> str:
    return f"::ffff:{host}" if family == "v4-mapped" else host


class _Connection(http.client.HTTPConnection):
    """http.client's connection, on a socket of the probe's family (it
    would pick by name resolution, never v4-mapped)."""

    def __init__(self, host: str, port: int, family: str, timeout: float):
        super().__init__(_dialled(host, family), port, timeout=timeout)
        self.family = socket.AF_INET if family == "inet" else socket.AF_INET6

    def connect(self):
        self.sock = socket.socket(self.family, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.connect((self.host, self.port))
        except BaseException:
            self.sock.close()
            self.sock = None
            raise


def request_once(host: str, port: int, timeout: float = PROBE_TIMEOUT, family: str = "inet") -> dict:
    """One GET /whoami on a new connection: {"outcome", "body", "local",
    "peer"}, the last two the socket's getsockname() and getpeername()."""
    conn = _Connection(host, port, family, timeout)
    local = peer = None
    try:
        conn.connect()
        local = format_address(conn.sock.getsockname())
        peer = format_address(conn.sock.getpeername())
        # The Host header names the address as given (a JVM client sends the
        # URL's host even on a v4-mapped socket; Envoy routes HTTP by it).
        conn.request("GET", "/whoami", headers={"Host": format_address((host, port))})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return {"outcome": f"http {resp.status}", "body": body, "local": local, "peer": peer}
    except (OSError, http.client.HTTPException) as e:
        return {"outcome": classify_error(e), "body": None, "local": local, "peer": peer}
    finally:
        conn.close()


def lookup_once(server: str, name: str, how: str) -> dict:
    """One DNS A query (dns.query): {"outcome", "reply_from", "peer"}."""
    from .dns import query     # dnslib: only DNS probes need it
    try:
        answer = query(server, name, how)
    except Exception as e:  # noqa: BLE001 - a short TCP reply (struct.error), a bad packet: an outcome, not a crash
        return {"outcome": classify_error(e), "reply_from": None, "peer": None}
    return {"outcome": "answers " + (",".join(sorted(answer["answers"])) or "none"),
            "reply_from": format_address(answer["reply_from"]),
            "peer": format_address(answer["peer"]) if answer["peer"] else None}


def serve_probes(stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Read one JSON request per line (Probe.request), answer each with one JSON line."""
    stdout.write(json.dumps({"ready": True}) + "\n")
    stdout.flush()
    for line in stdin:
        ask = json.loads(line)
        if "dns" in ask:
            answer = lookup_once(ask["server"], ask["dns"], ask["how"])
        else:
            answer = request_once(ask["host"], int(ask["port"]), family=ask.get("family", "inet"))
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


# --- on the host ------------------------------------------------------------------

class ProbeError(RuntimeError):
    pass


class _ClientProcess:
    """The long-lived probe process inside one client pod."""

    def __init__(self, tb, pod: str, ids: tuple[int, int] | None = None):
        """`ids`: run as this (uid, gid) as the pod sees them, else as root."""
        self.pod = pod
        ids = {} if ids is None else {"uid": ids[0], "gid": ids[1]}
        self.proc = tb.exec(pod, [sys.executable, "-m", "merbridge_py.testbed.probes"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, **ids)
        self._read()   # the ready line

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            try:   # its stdout closed: it is ending; its stderr says why
                self.proc.wait(timeout=5)
                err = self.proc.stderr.read()
            except subprocess.TimeoutExpired:
                err = "(still running with its stdout closed)"
            raise ProbeError(f"probe process in pod {self.pod} ended: {err.strip()}")
        return json.loads(line)

    def request(self, probe: Probe) -> dict:
        self.proc.stdin.write(json.dumps(probe.request()) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def _routing_counters(tb, pod) -> dict[str, int]:
    """The counters of the pod's Envoy that say where connections went."""
    path = f"/stats?usedonly&filter={urllib.parse.quote(_STATS_FILTER)}"
    status, text = tb.sidecar(pod).admin(path)
    if status != 200:
        raise ProbeError(f"Envoy admin of pod {tb.pod(pod).name}: {path} answered {status}: {text[:200]}")
    values = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and value.isdigit() and not name.startswith(_IGNORED_LISTENERS):
            values[name] = int(value)
    return values


def _counter_label(name: str) -> str:
    """`listener.0.0.0.0_15006.downstream_cx_total` -> `virtualInbound`,
    `listener.0.0.0.0_15006.ssl.handshake` -> `virtualInbound.tls`,
    `cluster.X.upstream_cx_total` -> `X`."""
    for suffix, tag in ((".downstream_cx_total", ""), (".ssl.handshake", ".tls")):
        if name.startswith("listener.") and name.endswith(suffix):
            address = name[len("listener."):-len(suffix)]
            return _VIRTUAL.get(address, f"listener {address}") + tag
    return name[len("cluster."):-len(".upstream_cx_total")]


class HopObserver:
    """Runs probes on a bed and returns their hop sequences. One probe
    process per client pod, kept until close(); Envoy counters are read
    through its admin socket. Use as a context manager."""

    def __init__(self, tb, count_nat: bool = False):
        if tb.proxy != "envoy":
            raise ValueError("hop sequences are read from Envoy's counters: the bed needs proxy='envoy'")
        self.tb = tb
        # With count_nat, also how many connections of each probe Istio's
        # REDIRECT rules took (client and server pod): not part of the hop
        # sequence, since the two datapaths differ there by design, but the
        # witness of which one carried a probe.
        self.count_nat = count_nat
        self.nat_redirects: dict[Probe, dict[str, int]] = {}    # probe -> {role: connections}
        self._clients: dict[tuple[str, bool], _ClientProcess] = {}   # (pod, as its proxy) -> process

    def __enter__(self) -> "HopObserver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients = {}

    def _client(self, pod: str, proxy: bool) -> _ClientProcess:
        if (pod, proxy) not in self._clients:
            p = self.tb.pod(pod)
            ids = (p.proxy_uid, p.proxy_gid) if proxy else None
            self._clients[pod, proxy] = _ClientProcess(self.tb, pod, ids)
        return self._clients[pod, proxy]

    def observe(self, probe: Probe) -> Hops:
        if probe.dns_name:
            return self._observe_dns(probe)
        tb = self.tb
        roles: dict[str, str] = {}      # meshed pod -> its role in this probe
        if tb.pod(probe.client).meshed:
            roles[probe.client] = "client"
        if probe.server and tb.pod(probe.server).meshed:
            roles[probe.server] = "self" if probe.server == probe.client else "server"
        client = self._client(probe.client, probe.proxy)
        before = {pod: _routing_counters(tb, pod) for pod in roles}
        nat_before = self._nat(roles)
        result = client.request(probe)
        after = {pod: _routing_counters(tb, pod) for pod in roles}
        if self.count_nat:
            nat_after = self._nat(roles)
            self.nat_redirects[probe] = {role: nat_after[pod] - nat_before[pod] for pod, role in roles.items()}
        moved = []
        for pod, role in roles.items():
            for name, value in after[pod].items():
                delta = value - before[pod].get(name, 0)
                if delta:
                    moved.append((role, _counter_label(name), delta))
        return Hops(sidecars=tuple(sorted(moved)), peer=self._peer(probe, result), outcome=result["outcome"],
                    answered_by=self._answer(result), client_peer=result.get("peer") or "-",
                    client_local=_address_part(result.get("local")))

    def _observe_dns(self, probe: Probe) -> Hops:
        """A DNS probe: which of the pod's DNS proxy and its node's DNS server
        got the query, the answers, and where the reply came from."""
        from . import dns
        tb = self.tb
        pod = tb.pod(probe.client)
        counters = {"node": lambda: dns.server_stats(tb, pod.node)}
        if dns.captures_dns(pod):
            counters["client"] = lambda: dns.proxy_stats(tb, pod)
        before = {role: read() for role, read in counters.items()}
        result = self._client(probe.client, probe.proxy).request(probe)
        after = {role: read() for role, read in counters.items()}
        moved = [(role, f"dns-{'proxy' if role == 'client' else 'server'}.{name}", after[role][name] - value)
                 for role, values in before.items() for name, value in values.items()
                 if name in ("udp", "tcp") and after[role][name] != value]
        return Hops(sidecars=tuple(sorted(moved)), peer=result.get("reply_from") or "-", outcome=result["outcome"],
                    client_peer=result.get("peer") or "-")

    def _nat(self, pods) -> dict[str, int]:
        if not self.count_nat:
            return {}
        return {pod: sum(self.tb.nat_counters(pod).values()) for pod in pods}

    def _peer(self, probe: Probe, result: dict) -> str:
        body = result.get("body")
        if not isinstance(body, dict) or "peer" not in body:
            return "-"
        ip = _address_part(body["peer"])
        if ip in (PASSTHROUGH_SOURCE, PASSTHROUGH_SOURCE6):
            return "inbound-sidecar"
        if ip in (self.tb.pod(probe.client).ip, self.tb.pod(probe.client).ip6):
            return "client"
        return ip

    @staticmethod
    def _answer(result: dict) -> str:
        body = result.get("body")
        if isinstance(body, dict) and "pod" in body:
            return f"{body['pod']}:{body.get('port')}"
        return ""

    def run(self, probes: list[Probe]) -> dict[Probe, Hops]:
        return {probe: self.observe(probe) for probe in probes}


def _address_part(address: str | None) -> str:
    """"ip:port" or "[ip]:port" -> "ip"; None -> "-"."""
    if not address:
        return "-"
    return address.rpartition(":")[0].strip("[]")


def differences(first: dict[Probe, Hops], second: dict[Probe, Hops]) -> list[tuple[Probe, Hops, Hops]]:
    """Probes whose hop sequences differ (same probe set on both sides)."""
    if set(first) != set(second):
        raise ValueError("the two runs did not make the same probes")
    return [(p, first[p], second[p]) for p in first if first[p] != second[p]]


def difference_table(diffs: list[tuple[Probe, Hops, Hops]], left: str, right: str) -> str:
    lines = []
    for probe, a, b in diffs:
        lines += [probe.key(), f"    {left:>9}: {a.describe()}", f"    {right:>9}: {b.describe()}"]
    return "\n".join(lines)


if __name__ == "__main__":
    serve_probes()
