"""Reference model: would Istio's iptables capture this connection?

Written straight from istio-iptables' documented precedence, independently of
rules.py, so tests can check the compiled first-match lists against it (and the
testbed and benchmarks can predict where a connection should go):

- outbound (ISTIO_OUTPUT): an excluded port (-o) is never captured; neither is
  an excluded IPv4 range (-x); otherwise an included port (-q) is captured to
  any address, and an included range (-i, "*" = everything) is captured.
- inbound (ISTIO_INBOUND): the tunnel port is never captured; with
  includeInboundPorts "*" every port except the excluded ones (-d) is;
  with a list, exactly the listed ports are and -d plays no part.

Scope as for rules.py: TCP from an application process to a destination that
is neither loopback nor the pod itself. IPv6 ranges never match an IPv4 address.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from merbridge_py.mesh import ISTIO, MeshProfile
from merbridge_py.policy.model import PodPolicy
from merbridge_py.policy.rules import DNS_PORT, inbound_tunnel_port


def _in_any(address: IPv4Address, networks) -> bool:
    return any(n.version == 4 and address in n for n in networks)


def captures_outbound(policy: PodPolicy, ip: str, port: int) -> bool:
    address = IPv4Address(ip)
    if port in policy.exclude_outbound_ports:
        return False
    if policy.dns_capture and port == DNS_PORT:
        return False  # iptables hands it to istio-agent's DNS proxy, not to the outbound listener
    if _in_any(address, policy.exclude_outbound_ip_ranges):
        return False
    if port in policy.include_outbound_ports:
        return True
    return _in_any(address, policy.include_outbound_ip_ranges)


def captures_inbound(policy: PodPolicy, port: int, mesh: MeshProfile = ISTIO) -> bool:
    if port == inbound_tunnel_port(mesh):
        return False
    if policy.captures_all_inbound_ports:
        return port not in policy.exclude_inbound_ports
    return port in policy.include_inbound_ports
