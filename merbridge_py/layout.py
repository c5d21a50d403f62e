"""Python mirror of ebpf/merbridge.h: the structs user space writes into or
reads from the maps, and the limits. tests/test_layout.py compiles the header
with bcc and checks these against the types bcc generates, so the two cannot
drift apart silently.
"""

import ctypes as ct
import enum
import ipaddress

MAX_OUTBOUND_RULES = 128
MAX_INBOUND_RULES = 128
MAX_PODS = 1024
MAX_CONNECTIONS = 65536
MAX_DESTINATIONS = 4096


class Addr(ct.Structure):
    """struct addr: 16 bytes, network order; IPv4 v4-mapped (::ffff:a.b.c.d)."""

    _fields_ = [("w", ct.c_uint32 * 4)]

    @classmethod
    def of(cls, ip: str) -> "Addr":
        packed = ipaddress.ip_address(ip)
        if packed.version == 4:
            packed = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + packed.packed)
        return cls.from_buffer_copy(packed.packed)

    def text(self) -> str:
        """The address in its own family's notation (IPv4 for v4-mapped)."""
        v6 = ipaddress.IPv6Address(bytes(self))
        return str(v6.ipv4_mapped or v6)


class OutboundRule(ct.Structure):
    _fields_ = [
        ("addr", ct.c_uint32),     # network order
        ("mask", ct.c_uint32),     # network order
        ("port", ct.c_uint16),     # host order, 0 = any
        ("capture", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class OutboundRule6(ct.Structure):
    _fields_ = [
        ("addr", Addr),
        ("mask", Addr),
        ("port", ct.c_uint16),     # host order, 0 = any
        ("capture", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class InboundRule(ct.Structure):
    _fields_ = [
        ("port", ct.c_uint16),     # host order, 0 = any
        ("capture", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class PodPolicyValue(ct.Structure):
    _fields_ = [
        ("pod_ip", ct.c_uint32),   # network order
        ("n_outbound", ct.c_uint16),
        ("n_inbound", ct.c_uint16),
        ("proxy_uid", ct.c_uint32),  # the proxy's own connections are never redirected
        ("proxy_gid", ct.c_uint32),
        ("pod_ip6", Addr),         # zero without POD_IPV6
        ("n_outbound6", ct.c_uint16),
        ("families", ct.c_uint16),   # POD_IPV4 | POD_IPV6
        ("outbound", OutboundRule * MAX_OUTBOUND_RULES),
        ("outbound6", OutboundRule6 * MAX_OUTBOUND_RULES),
        ("inbound", InboundRule * MAX_INBOUND_RULES),
    ]


POD_IPV4 = 1
POD_IPV6 = 2


class SockTuple(ct.Structure):
    """A connection seen from one end (original_dst: the client's view)."""

    _fields_ = [
        ("local_ip", Addr),
        ("remote_ip", Addr),
        ("local_port", ct.c_uint16),   # host order
        ("remote_port", ct.c_uint16),  # host order
    ]


class OriginalDst(ct.Structure):
    _fields_ = [
        ("ip", Addr),
        ("port", ct.c_uint16),  # host order
        ("flags", ct.c_uint16),  # ODST_* in merbridge.h
        ("pad", ct.c_uint32),
    ]


ODST_VIA_INBOUND_REDIRECT = 1
ODST_SPLICED = 2


class SplicePolicy(enum.IntEnum):
    NEVER = 0
    ALWAYS = 1
    ADAPTIVE = 2


class Leg(enum.IntEnum):
    APP = 0
    PROXY = 1
    INBOUND = 2


class DestKey(ct.Structure):
    _fields_ = [("netns", ct.c_uint64), ("ip", Addr), ("port", ct.c_uint16), ("leg", ct.c_uint16),
                ("pad", ct.c_uint32)]


class DestProfile(ct.Structure):
    _fields_ = [("short_streak", ct.c_uint32), ("pad", ct.c_uint32), ("last_short_ns", ct.c_uint64)]


class DatapathConfig(ct.Structure):
    _fields_ = [
        ("splice", ct.c_uint32),               # SplicePolicy
        ("rewrite_inbound_port", ct.c_uint32),
        ("short_msgs", ct.c_uint32),
        ("pad0", ct.c_uint32),
        ("short_streak", ct.c_uint32),
        ("bulk_bytes", ct.c_uint32),
        ("bulk_window_ns", ct.c_uint64),
        ("short_memory_ns", ct.c_uint64),
        ("backlog_bytes", ct.c_uint32),        # backpressure: unread bytes a peer may hold (0: no limit)
        ("pad1", ct.c_uint32),
    ]


class Counter(enum.IntEnum):
    """Slots of the per-CPU counters array, in enum counter's order."""

    REDIRECT_OUTBOUND = 0
    REDIRECT_INBOUND = 1
    ORIGINAL_DST_ANSWERED = 2
    ORIGINAL_DST_MISS = 3
    ORIGINAL_DST_REFUSED = 4
    SPLICE_MSGS = 5
    SPLICE_BYTES = 6
    SPLICE_MISS = 7
    SOCKHASH_INSERT = 8
    ERR_SOCKHASH_INSERT = 9
    ERR_BIND = 10
    ERR_MAP_UPDATE = 11
    SPLICE_SKIPPED = 12
    SPLICE_BULK = 13
    PEER_NAME = 14
    SPLICE_BUSY = 15
    SPLICE_BACKPRESSURE = 16


class PeerBacklog(ct.Structure):
    """struct peer_backlog: bytes redirected into a spliced socket and bytes its reader took."""

    _fields_ = [("redirected", ct.c_uint64), ("consumed", ct.c_uint64)]


COUNTER_SLOTS = len(Counter)

# map name -> (key type, value type) as declared in merbridge.h; the sockhash's
# value is a socket, which user space never reads.
MAPS = {
    "pod_policy": (ct.c_uint64, PodPolicyValue),
    "local_pod_ip": (Addr, ct.c_uint64),
    "connect_original_dst": (ct.c_uint64, OriginalDst),
    "original_dst": (SockTuple, OriginalDst),
    "dest_profiles": (DestKey, DestProfile),
    "inbound_leg_spliced": (SockTuple, ct.c_uint32),
    "config": (ct.c_uint32, DatapathConfig),
    "counters": (ct.c_uint32, ct.c_uint64),
    "peer_backlogs": (SockTuple, PeerBacklog),
    "backlog_keys": (SockTuple, SockTuple),
}
SOCKHASH_MAPS = ("sock_pairs",)


# ---- DNS capture (the DNS block at the end of merbridge.h) ------------------------

MAX_DNS_SERVERS = 8
DNS_PORT = 53
DNS_PROXY_PORT = 15053
DNS_PROXY_IP = "127.0.0.1"   # MB_DNS_PROXY_IP_HOST
DNS_CAPTURE_ALL = 1     # DnsPolicyValue.flags


class DnsPolicyValue(ct.Structure):
    _fields_ = [
        ("proxy_uid", ct.c_uint32),
        ("proxy_gid", ct.c_uint32),
        ("flags", ct.c_uint32),        # DNS_CAPTURE_ALL
        ("n_servers", ct.c_uint32),
        ("servers", ct.c_uint32 * MAX_DNS_SERVERS),   # network order
    ]


class DnsOrigin(ct.Structure):
    _fields_ = [("ip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class DnsCounter(enum.IntEnum):
    """Slots of the per-CPU dns_counters array, in enum dns_counter's order."""

    UDP_CONNECT = 0
    UDP_SENDMSG = 1
    TCP_CONNECT = 2
    REPLY_SOURCE = 3
    PEER_NAME = 4
    PROXY_SKIPPED = 5
    ERR_MAP_UPDATE = 6


MAPS.update({
    "dns_policy": (ct.c_uint64, DnsPolicyValue),
    "dns_origins": (ct.c_uint64, DnsOrigin),
    "dns_counters": (ct.c_uint32, ct.c_uint64),
})
