"""The sidecar proxy of a meshed test-bed pod, behind a small interface:
Envoy (envoy.py, the default, as Istio runs it) or HAProxy (here: a second,
independent proxy showing the datapath does not depend on one proxy).

What a sidecar must do here (what Istio's Envoy does for plain TCP):
  15001 outbound: accept connections redirected to it and forward each to
        its original destination (SO_ORIGINAL_DST), as the proxy uid/gid
        1337, which Istio's rules exempt from capture;
  15006 inbound:  the same, but connect from 127.0.0.6 so the app's reply
        path is not captured again (Istio's rules RETURN for that source);
  15021 readiness: answer GET /healthz/ready.
Like Envoy, the outbound side also resolves service virtual IPs to their
endpoints (the test bed has no kube-proxy).

Ports declared HTTP (`http_ports`, as a Service port named `http-*` is to
Istio) are proxied per request with pooled upstream connections, as Envoy's
HTTP connection pool does: a client's new connection ends at its own sidecar,
and the sidecar-to-sidecar and sidecar-to-app connections are reused. Every
other port is plain TCP: one upstream connection per client connection.
"""

from __future__ import annotations

import abc
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import sandbox
from ..mesh import ISTIO, MeshProfile

HEALTH_PORT = 15021
LISTENERS = ("outbound", "inbound", "health")


@dataclass(frozen=True)
class ProxiedConnection:
    """One connection a sidecar forwarded, from its log."""

    listener: str      # "outbound" or "inbound"
    client: str        # ip:port that connected to the sidecar
    original_dst: str  # ip:port the client meant to reach (SO_ORIGINAL_DST)
    upstream: str      # ip:port the sidecar connected to (a service IP resolved to its endpoint)


class Sidecar(abc.ABC):
    """A pod's proxy: started inside the pod's network namespace and cgroup."""

    @abc.abstractmethod
    def start(self, netns: str, cgroup: Path, **popen) -> subprocess.Popen:
        """Start the proxy; returns at once (see `ready`)."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """Listening on every port."""

    @abc.abstractmethod
    def connection_counts(self) -> dict[str, int]:
        """Connections accepted so far per listener: {"outbound", "inbound", "health"}."""


class HAProxySidecar(Sidecar):
    """HAProxy (Debian's 2.6) in TCP mode. Started as root in the pod's
    namespace, it binds its listeners and then drops to the proxy's uid/gid
    (`uid`/`gid` in `global`), so every upstream connection is owned by 1337.
    `server orig 0.0.0.0` with no port makes it connect to each connection's
    original destination, which it reads with getsockopt(SOL_IP, SO_ORIGINAL_DST)."""

    def __init__(self, workdir: Path, pod: str, log_connections: bool = False, profile: MeshProfile = ISTIO,
                 services: dict[str, str] | None = None, http_ports: tuple[int, ...] = ()):
        self.http_ports = tuple(http_ports)
        self.workdir = Path(workdir)
        self.pod = pod
        self.services = services or {}    # service IP -> endpoint pod IP
        self.log_connections = log_connections
        self.profile = profile
        self.config_path = self.workdir / f"{pod}.haproxy.cfg"
        self.socket_path = self.workdir / f"{pod}.haproxy.sock"
        self.log_path = self.workdir / f"{pod}.haproxy.log"

    def config(self) -> str:
        p = self.profile
        # Logging: one line per forwarded connection as soon as the upstream
        # connection is made (logasap), raw to stdout, which goes to log_path.
        # %fi:%fp is the connection's destination as HAProxy sees it, which it
        # reads with SO_ORIGINAL_DST: the original destination.
        log_global = "    log stdout format raw local0\n" if self.log_connections else ""
        log_proxy = ("    log global\n    option logasap\n    log-format \"%f %ci:%cp %fi:%fp %si:%sp\"\n"
                     if self.log_connections else "")
        # A connection to a service IP goes to the service's endpoint, same
        # port. Each endpoint is a server of its own (weight 0: reached only
        # via use-server), so each has its own pool of idle HTTP connections,
        # as each endpoint has in Envoy; a single 0.0.0.0 server keeps only
        # about as many idle connections as it recently had busy ones, which
        # starves all but one destination. Any other destination goes to the
        # original destination as it is.
        endpoint_ips = sorted(set(self.services.values()))
        server_of = {ip: f"ep{i}" for i, ip in enumerate(endpoint_ips)}
        routes = [(vip, server_of[ip]) for vip, ip in self.services.items()]
        routes += [(ip, server_of[ip]) for ip in endpoint_ips]
        outbound_servers = ("".join(f"    use-server {name} if {{ dst {ip} }}\n" for ip, name in routes)
                            + "    server orig 0.0.0.0\n"
                            + "".join(f"    server {server_of[ip]} {ip} weight 0\n" for ip in endpoint_ips))
        inbound_servers = f"    server orig 0.0.0.0 source {p.inbound_passthrough_ip}\n"
        return f"""# generated by merbridge_py.testbed for pod {self.pod}
global
    uid {p.proxy_uid}
    gid {p.proxy_gid}
    nbthread 1
    maxconn 8192
    stats socket {self.socket_path} mode 600 level admin
{log_global}
defaults
    mode tcp
    no option splice-auto
    timeout connect 5s
    timeout client 5m
    timeout server 5m
    timeout client-fin 5s
    timeout server-fin 5s
    timeout http-request 10s
    timeout http-keep-alive 5m

frontend outbound
    bind 0.0.0.0:{p.outbound_port}
{log_proxy}{self._http_switch("outbound")}    default_backend outbound_tcp

backend outbound_tcp
{outbound_servers}{self._http_backend("outbound", outbound_servers)}
frontend inbound
    bind 0.0.0.0:{p.inbound_port}
{log_proxy}{self._http_switch("inbound")}    default_backend inbound_tcp

backend inbound_tcp
{inbound_servers}{self._http_backend("inbound", inbound_servers)}
frontend health
    mode http
    bind 0.0.0.0:{HEALTH_PORT}
    monitor-uri /healthz/ready
"""

    def _http_switch(self, side: str) -> str:
        if not self.http_ports:
            return ""
        ports = " ".join(str(port) for port in self.http_ports)
        # dst_port is the original destination's port (SO_ORIGINAL_DST).
        return f"    use_backend {side}_http if {{ dst_port {ports} }}\n"

    def _http_backend(self, side: str, servers: str) -> str:
        if not self.http_ports:
            return ""
        # A TCP frontend may hand over to an HTTP backend. `http-reuse always`
        # shares idle upstream connections between client connections; with
        # a 0.0.0.0 server HAProxy keys its pool by the destination address,
        # so a request only reuses a connection to its own destination.
        return f"""
backend {side}_http
    mode http
    http-reuse always
{servers}"""

    def start(self, netns: str, cgroup: Path, **popen) -> subprocess.Popen:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self.socket_path.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        try:
            # -db: stay in the foreground (we track this pid); no master process.
            return sandbox.spawn(["haproxy", "-db", "-f", str(self.config_path)], netns=netns, cgroup=cgroup,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen)
        finally:
            log.close()

    def _command(self, command: str, timeout: float = 2.0) -> str:
        # The stats socket is a filesystem socket: reachable from any network namespace.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def ready(self) -> bool:
        # HAProxy binds every listener before it serves the stats socket.
        try:
            return "Pid:" in self._command("show info")
        except OSError:
            return False

    def connection_counts(self) -> dict[str, int]:
        lines = self._command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        col_px, col_sv, col_total = header.index("pxname"), header.index("svname"), header.index("stot")
        counts = {}
        for line in lines[1:]:
            row = line.split(",")
            if len(row) > col_total and row[col_sv] == "FRONTEND" and row[col_px] in LISTENERS:
                counts[row[col_px]] = int(row[col_total] or 0)
        return counts

    def connections(self) -> list[ProxiedConnection]:
        """Every forwarded connection with its original destination (empty
        unless the sidecar was created with connection logging on)."""
        if not self.log_connections or not self.log_path.exists():
            return []
        result = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) == 4 and words[0] in ("outbound", "inbound"):
                result.append(ProxiedConnection(*words))
        return result
