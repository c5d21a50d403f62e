"""ebpf/merbridge.h and merbridge_py/layout.py describe the same structs: a
layout change must be made in both, and these tests say when it was not."""

import ctypes as ct
import ipaddress
import re
from pathlib import Path

import pytest

from merbridge_py import layout

HEADER = (Path(__file__).resolve().parent.parent / "ebpf" / "merbridge.h").read_text()


def test_limits_agree():
    defined = dict(re.findall(r"^#define (MAX_\w+) (\d+)$", HEADER, re.M))
    for name in ("MAX_OUTBOUND_RULES", "MAX_INBOUND_RULES", "MAX_PODS", "MAX_CONNECTIONS", "MAX_DESTINATIONS",
                 "MAX_DNS_SERVERS"):
        assert int(defined[name]) == getattr(layout, name), name


def test_counter_slots_agree():
    body = re.search(r"enum counter \{(.*?)\};", HEADER, re.S).group(1)
    names = re.findall(r"^\s*CNT_(\w+)", body, re.M)
    assert names[-1] == "MAX"
    assert names[:-1] == [c.name for c in sorted(layout.Counter, key=lambda c: c.value)]


def test_dns_constants_and_counter_slots_agree():
    defined = dict(re.findall(r"^#define (\w+) (0x[0-9a-f]+|\d+)", HEADER, re.M))
    assert int(defined["MB_DNS_PORT"]) == layout.DNS_PORT
    assert int(defined["MB_DNS_PROXY_PORT"]) == layout.DNS_PROXY_PORT
    assert int(defined["DNS_CAPTURE_ALL"]) == layout.DNS_CAPTURE_ALL
    assert int(defined["MB_DNS_PROXY_IP_HOST"], 16) == int(ipaddress.IPv4Address(layout.DNS_PROXY_IP))
    body = re.search(r"enum dns_counter \{(.*?)\};", HEADER, re.S).group(1)
    names = re.findall(r"^\s*DNS_CNT_(\w+)", body, re.M)
    assert names[-1] == "MAX"
    assert names[:-1] == [c.name for c in sorted(layout.DnsCounter, key=lambda c: c.value)]


def flatten(ctype, prefix="") -> list[tuple[str, int, int]]:
    """(field path, offset, size) of every scalar in a ctypes type."""
    if issubclass(ctype, ct.Structure):
        out = []
        for name, ftype in ((f[0], f[1]) for f in ctype._fields_):
            off = getattr(ctype, name).offset
            out += [(p, off + o, s) for p, o, s in flatten(ftype, f"{prefix}{name}.")]
        return out
    if issubclass(ctype, ct.Array):
        elem = ctype._type_
        return [(p, i * ct.sizeof(elem) + o, s)
                for i in range(ctype._length_) for p, o, s in flatten(elem, f"{prefix}[{i}].")]
    return [(prefix.rstrip("."), 0, ct.sizeof(ctype))]


@pytest.mark.bpf
def test_structs_agree_with_what_bcc_compiles():
    """bcc runs in this (test) process; the agent itself never imports it."""
    import os
    import shutil

    from merbridge_py import kheaders
    from merbridge_py.datapath import ensure_bpffs
    from merbridge_py.loader import compile_programs
    from merbridge_py.mesh import ISTIO
    kheaders.find().apply()
    maps_dir = Path(f"/sys/fs/bpf/mbp-layout{os.getpid()}")
    ensure_bpffs(maps_dir)
    try:
        bpf, _ = compile_programs(maps_dir, ISTIO.cflags())  # compiles, loads, pins fresh maps, attaches nothing
        try:
            for name, (key_type, value_type) in layout.MAPS.items():
                table = bpf[name.encode()]
                assert ct.sizeof(table.Key) == ct.sizeof(key_type), name
                leaf = table.Leaf
                if name in ("counters", "dns_counters"):  # per-CPU: bcc gives an array of one value per CPU
                    leaf = leaf._type_
                assert ct.sizeof(leaf) == ct.sizeof(value_type), name
                if issubclass(value_type, ct.Structure):
                    assert flatten(leaf) == flatten(value_type), name
                if issubclass(key_type, ct.Structure):
                    assert flatten(table.Key) == flatten(key_type), name
        finally:
            bpf.cleanup()
    finally:
        shutil.rmtree(maps_dir)


def test_flag_constants_agree():
    defined = {name: int(value, 0) for name, value in re.findall(r"^#define ((?:POD|ODST)_\w+) (\w+)$", HEADER, re.M)}
    assert defined == {"POD_IPV4": layout.POD_IPV4, "POD_IPV6": layout.POD_IPV6,
                       "ODST_VIA_INBOUND_REDIRECT": layout.ODST_VIA_INBOUND_REDIRECT,
                       "ODST_SPLICED": layout.ODST_SPLICED}


def test_addresses_are_stored_v4_mapped():
    assert bytes(layout.Addr.of("10.1.2.3")) == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert layout.Addr.of("10.1.2.3").text() == "10.1.2.3"
    assert layout.Addr.of("fd00::1:2").text() == "fd00::1:2"
