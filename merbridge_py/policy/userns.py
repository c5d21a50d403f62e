"""User-namespaced pods (`hostUsers: false`): the proxy's uid/gid as the kernel sees them.

Istio's owner match (`-m owner --uid-owner 1337`, nftables `meta skuid`) is
interpreted in the user namespace that owns the pod's network namespace: a
pod whose namespace maps uids 0-65535 to 100000-165535 exempts the process
the host sees as uid 101337. bpf_get_current_uid_gid() returns ids as the
initial user namespace sees them, so the datapath must be given 101337, not
the 1337 the pod spec and the rules show.

This module is pure (map text in, verdict out); merbridge_py/userns.py reads
the maps of a process in the pod's user namespace. A pod whose proxy ids the
namespace does not map, or whose maps are malformed, stays on iptables with
the reason; maps that cannot be read yet are the caller's retry
(UsernsNotReady).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from merbridge_py.policy.model import Verdict

MAX_ID = 2**32 - 1       # ids are u32; (u32)-1 is "no id" and never mapped (user_namespaces(7))
MAX_RANGES = 340         # the kernel's limit on lines in uid_map/gid_map (Linux >= 4.15)


class IdMapError(ValueError):
    """The map text is not what the kernel writes; the message says where."""


class UsernsNotReady(Exception):
    """Nothing can be decided yet (no mapping written): retry later."""


@dataclass(frozen=True)
class IdRange:
    inside: int       # first id inside the pod's user namespace
    outside: int      # the id the reader's (the agent's, the initial) namespace sees for it
    count: int


@dataclass(frozen=True)
class UsernsMaps:
    """The id maps of the user namespace owning a pod's network namespace, as
    read by the agent; `origin` names where they were read (for reasons)."""

    uid_map: str
    gid_map: str
    origin: str


def parse_id_map(text: str, what: str = "uid_map") -> tuple[IdRange, ...]:
    """/proc/PID/uid_map (or gid_map) text -> ranges. Raises IdMapError for
    anything the kernel would not write: a line without exactly three
    integers, a zero or out-of-range count, overlapping ranges, too many lines."""
    ranges: list[IdRange] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise IdMapError(f"{what} line {number} {line.strip()!r}: expected 'inside outside count'")
        try:
            inside, outside, count = (int(f, 10) for f in fields)
        except ValueError:
            raise IdMapError(f"{what} line {number} {line.strip()!r}: not three decimal integers") from None
        if min(inside, outside) < 0 or count < 1 or inside + count - 1 > MAX_ID or outside + count - 1 > MAX_ID:
            raise IdMapError(f"{what} line {number} {line.strip()!r}: range outside 0..{MAX_ID} or empty")
        ranges.append(IdRange(inside, outside, count))
    if len(ranges) > MAX_RANGES:
        raise IdMapError(f"{what} has {len(ranges)} ranges; the kernel allows {MAX_RANGES}")
    for side in ("inside", "outside"):
        spans = sorted((getattr(r, side), getattr(r, side) + r.count) for r in ranges)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise IdMapError(f"{what}: {side} ranges overlap at {start}")
    return tuple(ranges)


def to_host(inner: int, ranges: tuple[IdRange, ...]) -> int | None:
    """The id the map's outer namespace sees for `inner`; None when unmapped."""
    for r in ranges:
        if r.inside <= inner < r.inside + r.count:
            return r.outside + (inner - r.inside)
    return None


def _show(ranges: tuple[IdRange, ...]) -> str:
    shown = ", ".join(f"{r.inside}-{r.inside + r.count - 1} -> {r.outside}-{r.outside + r.count - 1}"
                      for r in ranges[:4])
    return shown + (f" and {len(ranges) - 4} more" if len(ranges) > 4 else "")


def refused(verdict: Verdict, why: str, code: str) -> Verdict:
    """`verdict`, not accelerated for `why` (families and DNS decision with it)."""
    from merbridge_py.policy.rules import family_verdicts   # rules imports model only; avoids a cycle
    refused = dataclasses.replace(verdict, accelerate=False, code=code, dns=None,
                                  reason=f"not accelerated: {why}; the pod stays on iptables")
    ipv6 = tuple(f.address for f in verdict.families if f.family == "ipv6" and f.address)
    return dataclasses.replace(refused, families=family_verdicts(refused, ipv6))


def in_user_namespace(verdict: Verdict, maps: UsernsMaps | None) -> Verdict:
    """`verdict` with the proxy uid/gid (its policy's and its DNS decision's)
    as the host sees them through the pod's user namespace `maps`; None
    means the pod's network namespace belongs to the agent's own user
    namespace (ids as written). A proxy id the namespace does not map, or
    malformed maps, refuse the pod. Raises UsernsNotReady for a namespace
    whose maps are not written yet."""
    if not verdict.accelerate or maps is None or verdict.policy is None:
        return verdict
    if not maps.uid_map.strip() or not maps.gid_map.strip():
        raise UsernsNotReady(f"the pod's user namespace ({maps.origin}) has no uid/gid map written yet")
    try:
        uid_ranges = parse_id_map(maps.uid_map, "uid_map")
        gid_ranges = parse_id_map(maps.gid_map, "gid_map")
    except IdMapError as e:
        return refused(verdict, f"the pod's user namespace maps cannot be read exactly ({maps.origin}: {e})",
                        "userns_malformed")
    policy = verdict.policy
    uid, gid = to_host(policy.proxy_uid, uid_ranges), to_host(policy.proxy_gid, gid_ranges)
    unmapped = [f"{kind} {inner} (its {kind}_map: {_show(ranges) or 'empty'})"
                for kind, inner, host, ranges in (("uid", policy.proxy_uid, uid, uid_ranges),
                                                   ("gid", policy.proxy_gid, gid, gid_ranges)) if host is None]
    if unmapped:
        return refused(verdict, f"the pod's user namespace ({maps.origin}) does not map the proxy's "
                                 f"{' or '.join(unmapped)}, so the proxy's own connections cannot be told apart",
                        "userns_unmapped")
    if (uid, gid) == (policy.proxy_uid, policy.proxy_gid):
        return verdict
    dns = verdict.dns
    if dns is not None:
        dns_uid = to_host(dns.proxy_uid, uid_ranges) if dns.proxy_uid is not None else None
        dns_gid = to_host(dns.proxy_gid, gid_ranges) if dns.proxy_gid is not None else None
        if (dns.proxy_uid is not None and dns_uid is None) or (dns.proxy_gid is not None and dns_gid is None):
            return refused(verdict, f"the pod's user namespace ({maps.origin}) does not map the DNS proxy ids "
                                     f"{dns.proxy_uid}/{dns.proxy_gid}", "userns_unmapped")
        dns = dataclasses.replace(dns, proxy_uid=dns_uid, proxy_gid=dns_gid)
    note = (f"user namespace ({maps.origin}): proxy uid {policy.proxy_uid} and gid {policy.proxy_gid} "
            f"are {uid} and {gid} on the host")
    return dataclasses.replace(verdict, policy=dataclasses.replace(policy, proxy_uid=uid, proxy_gid=gid), dns=dns,
                               reason=f"{verdict.reason}; {note}")
