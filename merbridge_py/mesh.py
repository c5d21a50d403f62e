"""Mesh profiles: every mesh-specific constant in one place.

The eBPF programs get these as -D defines at compile time (see `cflags`), so a
port or uid is never written twice. Adding a mesh is adding one profile.
"""

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address


@dataclass(frozen=True)
class MeshProfile:
    name: str
    proxy_container: str          # the sidecar's container name
    outbound_port: int            # where intercepted outbound connections go
    inbound_port: int             # where intercepted inbound connections go
    proxy_uid: int                # the proxy's default uid/gid (each pod's own are in its policy, see policy/)
    proxy_gid: int
    inbound_passthrough_ip: str   # source address the proxy uses to reach its own app
    outbound_redirect_ip: str     # loopback address redirected app connections go to (see ISTIO below)
    status_port: int              # default readiness port, exempt from inbound capture
    inbound_tunnel_port: int      # mTLS tunnel (HBONE) port, never captured inbound
    always_exempt_inbound_ports: tuple[int, ...]  # ports the mesh never captures inbound
    inbound_passthrough_ip6: str = "::6"   # the same for IPv6 (Istio adds ::6 to lo for this)

    def cflags(self) -> list[str]:
        """-D defines that hand this profile to the eBPF programs."""
        passthrough = int(IPv4Address(self.inbound_passthrough_ip))
        redirect = int(IPv4Address(self.outbound_redirect_ip))
        return [
            f"-DMESH_OUTBOUND_PORT={self.outbound_port}",
            f"-DMESH_INBOUND_PORT={self.inbound_port}",
            # host-order value; the programs convert with bpf_htonl
            f"-DMESH_PASSTHROUGH_IP_HOST={passthrough}U",
            f"-DMESH_REDIRECT_IP_HOST={redirect}U",
            f"-DMESH_PASSTHROUGH_IP6_HOST={_host_words(self.inbound_passthrough_ip6)}",
        ]


def _host_words(ip6: str) -> str:
    """An IPv6 address as four host-order u32 literals, "w0U,w1U,w2U,w3U":
    the programs turn each into network order (addr_set_host in merbridge.h)."""
    value = int(IPv6Address(ip6))
    return ",".join(f"{(value >> shift) & 0xffffffff}U" for shift in (96, 64, 32, 0))


# Istio's sidecar defaults, as istio-iptables receives them from the injector:
# `-p 15001 -z 15006 -u 1337 -g 1337`, inbound upstream bound to 127.0.0.6, and
# `-d 15090,15021,15020` (Prometheus, health, merged metrics) never captured.
#
# Redirected app connections go to 127.0.0.2:15001, not to 127.0.0.1:15001
# where iptables' REDIRECT sends them: a connection's conntrack entry outlives
# it (TIME_WAIT), and an eBPF-mode connection whose tuple is the inverse of an
# iptables-mode entry's reply tuple (127.0.0.1:15001 -> pod:port) gets its
# source port silently remapped by netfilter, so the proxy's SO_ORIGINAL_DST
# lookup misses. No iptables-mode entry ever involves 127.0.0.2, and Istio's
# `-o lo -m owner ! --uid-owner 1337 -j RETURN` leaves the connection alone.
# The proxy's listener binds 0.0.0.0:15001 (as Envoy's does), so it accepts it;
# an app's AF_INET6 socket to a v4-mapped address goes to ::ffff:127.0.0.2.
# Native IPv6 connections go to [the pod's own IPv6 address]:15001, for the
# same reason (an IPv6 namespace has only one loopback address, ::1, where
# ip6tables' REDIRECT sends them): see ebpf/connect.bpf.c.
ISTIO = MeshProfile(
    name="istio",
    proxy_container="istio-proxy",
    outbound_port=15001,
    inbound_port=15006,
    proxy_uid=1337,
    proxy_gid=1337,
    inbound_passthrough_ip="127.0.0.6",
    outbound_redirect_ip="127.0.0.2",
    status_port=15021,
    inbound_tunnel_port=15008,
    always_exempt_inbound_ports=(15090, 15021, 15020),
)

PROFILES = {ISTIO.name: ISTIO}


def get_profile(name: str) -> MeshProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown mesh {name!r}; known meshes: {', '.join(sorted(PROFILES))}") from None
