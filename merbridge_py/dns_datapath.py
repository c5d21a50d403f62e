"""The kernel half of DNS capture: a pod's DNS decision (policy/dns.py) as
its dns_policy entry, and the DNS counters (ebpf/dns_*.bpf.c)."""

from __future__ import annotations

from . import layout
from .datapath import ip_to_net
from .policy.dns import DnsDecision


def policy_value(decision: DnsDecision) -> layout.DnsPolicyValue:
    if len(decision.servers) > layout.MAX_DNS_SERVERS:
        raise ValueError(f"{len(decision.servers)} DNS servers, the datapath holds {layout.MAX_DNS_SERVERS}")
    value = layout.DnsPolicyValue(proxy_uid=decision.proxy_uid, proxy_gid=decision.proxy_gid,
                                  flags=layout.DNS_CAPTURE_ALL if decision.capture_all else 0,
                                  n_servers=len(decision.servers))
    for i, server in enumerate(decision.servers):
        value.servers[i] = ip_to_net(server)
    return value


def write_pod(datapath, netns_cookie: int, decision: DnsDecision) -> None:
    """The pod's DNS entry: present exactly when the datapath captures its DNS."""
    if decision.accelerated and not decision.pending:
        datapath.bpf["dns_policy"].update(netns_cookie, policy_value(decision))
    else:
        datapath.bpf["dns_policy"].delete(netns_cookie)


def remove_pod(datapath, netns_cookie: int) -> None:
    datapath.bpf["dns_policy"].delete(netns_cookie)


def counters(datapath) -> dict[str, int]:
    table = datapath.bpf["dns_counters"]
    return {f"dns_{c.name.lower()}": sum(v.value for v in table.lookup(c.value) or ()) for c in layout.DnsCounter}
