"""TCP's own retransmission and timeout counters, per node of the bed.

TCP keeps its MIB counters per network namespace (/proc/net/snmp's `Tcp:`
lines and /proc/net/netstat's `TcpExt:` lines, what `nstat` prints). A test
bed node is a node namespace (routing only) plus its pods' namespaces, where
every socket of the client, the sidecars and the app lives, so a node's
counters are the sum over those namespaces. Their increase during a run shows
what a latency tail alone cannot: a 200 ms p99 with TCPTimeouts growing is a
retransmission timeout, with TCPSynRetrans growing a connection attempt whose
SYN was lost or refused.

The parsing and the arithmetic are pure functions of the files' text; only
read_namespace() runs a command.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .. import sandbox

# The counters a run keeps (others are parsed and dropped, to keep results.json
# readable): name as nstat spells it -> what it counts.
COUNTERS = {
    "TcpRetransSegs": "segments retransmitted (all causes)",
    "TcpExtTCPTimeouts": "retransmission timeouts (RTO fired, no fast recovery)",
    "TcpExtTCPSynRetrans": "SYN and SYN-ACK retransmissions (a connection attempt not answered in time)",
    "TcpExtTCPLostRetransmit": "retransmissions that were lost again",
    "TcpExtTCPFastRetrans": "fast retransmits (duplicate ACKs or SACK)",
    "TcpExtTCPSpuriousRTOs": "timeouts that F-RTO found spurious",
    "TcpAttemptFails": "connection attempts that failed (SYN_SENT/SYN_RECV to CLOSED)",
    "TcpOutRsts": "resets sent",
    "TcpExtListenOverflows": "SYNs dropped because a listener's accept queue was full",
    "TcpExtListenDrops": "SYNs dropped by a listener (any reason)",
    "TcpExtTCPTimeWaitOverflow": "TIME_WAIT sockets not created (tcp_max_tw_buckets reached)",
}
# The three the report shows next to latency
SHOWN = ("TcpRetransSegs", "TcpExtTCPTimeouts", "TcpExtTCPSynRetrans")


class BadCounters(ValueError):
    pass


def parse(text: str) -> dict[str, int]:
    """/proc/net/snmp and /proc/net/netstat text (either or both, in any order)
    -> {"TcpRetransSegs": n, "TcpExtTCPTimeouts": m, ...}, named as nstat
    names them: the line's prefix without its colon, then the field. Each
    section is a header line of names followed by a line of values with the
    same prefix."""
    out: dict[str, int] = {}
    pending: tuple[str, list[str]] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        prefix, _, rest = line.partition(":")
        fields = rest.split()
        if pending is None or pending[0] != prefix:
            pending = (prefix, fields)
            continue
        names = pending[1]
        if len(names) != len(fields):
            raise BadCounters(f"line {n}: {prefix} has {len(names)} names but {len(fields)} values")
        for name, value in zip(names, fields):
            try:
                out[prefix + name] = int(value)
            except ValueError as e:
                raise BadCounters(f"line {n}: {prefix}{name} = {value!r} is not an integer") from e
        pending = None
    if pending is not None:
        raise BadCounters(f"{pending[0]}: a line of names without its line of values")
    return out


def keep(counters: Mapping[str, int]) -> dict[str, int]:
    return {k: counters.get(k, 0) for k in COUNTERS}


def total(per_namespace: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out = dict.fromkeys(COUNTERS, 0)
    for counters in per_namespace:
        for k in COUNTERS:
            out[k] += counters.get(k, 0)
    return out


def deltas(before: Mapping[str, Mapping[str, int]],
           after: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """node -> counter -> increase. A node missing on either side is left out.
    A counter that went down means the namespace set changed under the run
    (a namespace was recreated): that is an error, not a negative count."""
    out = {}
    for node in after.keys() & before.keys():
        grew = {}
        for k, v in after[node].items():
            d = v - before[node].get(k, 0)
            if d < 0:
                raise BadCounters(f"{node}: {k} went down by {-d} during the run (a namespace was replaced?)")
            grew[k] = d
        out[node] = grew
    return out


def read_namespace(netns: str) -> dict[str, int]:
    """The kept counters of one network namespace: /proc/net is the reading
    process's namespace's, so cat runs inside it."""
    return keep(parse(sandbox.sh("cat", "/proc/net/snmp", "/proc/net/netstat", netns=netns)))
