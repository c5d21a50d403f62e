"""Istio's DNS capture rules for a pod (istio-iptables with REDIRECT_DNS, IPv4),
built on the flag model of istio_iptables.py.

What turns DNS capture on, and for which servers, is Istio's:
  - the proxy's environment has ISTIO_META_DNS_CAPTURE=true (the injector
    copies it from `proxy.istio.io/config: {proxyMetadata: {...}}`);
  - istio-iptables then reads the `nameserver` lines of the pod's resolv.conf
    and captures DNS to those servers only; with CAPTURE_ALL_DNS (what the
    istio-cni plugin sets, since it cannot read the pod's files) port 53 to
    any address is captured.

istio_iptables.tables() writes the per-server form already (checked here
against Istio's dns-uid-gid.golden); the capture-all form is written here, by
replacing the server-specific rules of the ISTIO_OUTPUT_DNS chains with the
address-free ones Istio's SetupDNSRedir/addDNSConntrackZones write.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, replace

from . import istio_iptables as ii

ANN_PROXY_CONFIG = "proxy.istio.io/config"
ENV_DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
ENV_CAPTURE_ALL_DNS = "CAPTURE_ALL_DNS"    # istio-iptables' env; istio-cni sets it for every DNS-capture pod
DNS_PORT = "53"
GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}   # Go's strconv.ParseBool


@dataclass(frozen=True)
class DnsCapture:
    """The DNS part of istio-iptables' configuration for one pod."""

    redirect: bool = False              # REDIRECT_DNS / ISTIO_META_DNS_CAPTURE
    capture_all: bool = False           # CAPTURE_ALL_DNS
    servers: tuple[str, ...] = ()       # IPv4 nameservers of the pod's resolv.conf

    @property
    def active(self) -> bool:
        """istio-iptables switches DNS capture off (with a warning) when it
        has neither capture-all nor a server to capture."""
        return self.redirect and (self.capture_all or bool(self.servers))


def proxy_metadata(annotations: dict[str, str] | None) -> dict[str, str]:
    """proxyMetadata of the pod's `proxy.istio.io/config` annotation (YAML or
    JSON, as Istio accepts); {} when absent. A malformed value is an error."""
    text = (annotations or {}).get(ANN_PROXY_CONFIG)
    if not text:
        return {}
    try:
        import yaml
        config = yaml.safe_load(text)
    except ImportError:        # JSON is YAML; without PyYAML only that form is read
        config = json.loads(text)
    except Exception as e:     # noqa: BLE001 - yaml raises many kinds
        raise ValueError(f"{ANN_PROXY_CONFIG}: not YAML: {e}") from None
    if config is None:
        return {}
    if not isinstance(config, dict) or not isinstance(config.get("proxyMetadata", {}), dict):
        raise ValueError(f"{ANN_PROXY_CONFIG}: expected a mapping with a proxyMetadata mapping")
    return {str(k): str(v) for k, v in (config.get("proxyMetadata") or {}).items()}


def resolv_conf_servers(text: str) -> tuple[str, ...]:
    """IPv4 `nameserver` addresses of a resolv.conf, in order (the IPv6 ones
    are ip6tables' business)."""
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if ip.version == 4 and str(ip) not in servers:
                servers.append(str(ip))
    return tuple(servers)


def dns_capture(annotations: dict[str, str] | None, resolv_conf: str, cni: bool = False) -> DnsCapture:
    """What istio-iptables does with DNS for a pod with these annotations and
    this resolv.conf (istio-init), or under istio-cni (capture all)."""
    meta = proxy_metadata(annotations)
    redirect = meta.get(ENV_DNS_CAPTURE, "") in GO_TRUE
    capture_all = cni or meta.get(ENV_CAPTURE_ALL_DNS, "") in GO_TRUE
    return DnsCapture(redirect, capture_all, () if capture_all else resolv_conf_servers(resolv_conf))


def with_dns(flags: ii.CaptureFlags, dns: DnsCapture) -> ii.CaptureFlags:
    """istio_iptables' flags carrying the per-server DNS capture. Capture-all
    has no field there: tables() below handles it."""
    if not dns.active:
        return replace(flags, redirect_dns=False, dns_servers=())
    # any placeholder server makes istio_iptables write the DNS chains; tables() replaces them
    return replace(flags, redirect_dns=True, dns_servers=dns.servers or ("0.0.0.0",))


def tables(flags: ii.CaptureFlags, dns: DnsCapture) -> list:
    """istio-iptables' nat (and raw) tables for these flags with this DNS capture."""
    result = ii.tables(with_dns(flags, dns))
    if dns.active and dns.capture_all:
        nat, raw = result
        nat.rules = _capture_all_nat(nat.rules)
        raw.rules = _capture_all_raw(ii._split(flags.proxy_uid), ii._split(flags.proxy_gid))
    return result


def _capture_all_nat(rules: list[str]) -> list[str]:
    out = [r for r in rules if not r.startswith("-A ISTIO_OUTPUT_DNS ")]
    at = out.index("-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS") + 1
    port = str(ii.DNS_AGENT_PORT)
    out[at:at] = [f"-A ISTIO_OUTPUT_DNS -p tcp --dport {DNS_PORT} -j REDIRECT --to-ports {port}",
                  f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -j REDIRECT --to-port {port}"]
    return out


def _capture_all_raw(uids: list[str], gids: list[str]) -> list[str]:
    rules = ["-A OUTPUT -j ISTIO_OUTPUT_DNS"]
    for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            rules += [f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -m owner {owner} {ident} -j CT --zone 1",
                      f"-A ISTIO_OUTPUT_DNS -p udp --sport {ii.DNS_AGENT_PORT} -m owner {owner} {ident} -j CT --zone 2"]
    return rules + ["-A PREROUTING -j ISTIO_INBOUND",
                    f"-A ISTIO_OUTPUT_DNS -p udp --dport {DNS_PORT} -j CT --zone 2",
                    f"-A ISTIO_INBOUND -p udp --sport {DNS_PORT} -j CT --zone 1"]


def rule_lines(flags: ii.CaptureFlags, dns: DnsCapture) -> list[str]:
    return [line for table in tables(flags, dns) for line in table.lines()]


def restore_payload(flags: ii.CaptureFlags, dns: DnsCapture) -> str:
    """Input for `iptables-restore --noflush` in the pod's namespace."""
    return "\n".join(rule_lines(flags, dns)) + "\n"
