"""Source 1 of a pod's capture: the nat rules Istio installed in the pod's
network namespace, read back exactly -- `iptables-save -t nat` text (legacy
and nft backends print the same syntax) or Istio's native nftables tables
(`nft -j list ruleset`, tables inet istio-proxy-*). With iptables, the
pod's `ip6tables-save -t nat` rules are read too and give its IPv6 side
(with_ipv6). A rule, match or order istio-iptables would not produce raises
InstalledError with the reason.

Facts carried over (not code) from istio/istio: tools/istio-iptables and
tools/istio-nftables pkg/capture/run.go (rule order) and their goldens.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network

from merbridge_py.policy.annotations import show
from merbridge_py.policy.capture import (
    DNS_PORT, SOURCE_IPTABLES, SOURCE_NFTABLES, Capture, InstalledError, make_capture,
)

SOURCE_IP6TABLES = "ip6tables rules"
from merbridge_py.policy.model import ALL_PORTS

PASSTHROUGH_SOURCE = IPv4Network("127.0.0.6/32")
# ip6tables' twins (istio-iptables run.go): the inbound proxy reaches its app
# from ::6, and the loopback destination is always ::1.
PASSTHROUGH_SOURCE6 = IPv6Network("::6/128")
LOOPBACK6 = IPv6Network("::1/128")
DNS_AGENT_PORT = 15053

@dataclass(frozen=True)
class Rule:
    """One nat rule, normalised so iptables and nftables rules compare equal.
    neg_* say the match is negated; dports is a tuple of ports."""

    chain: str
    proto: str | None = None
    src: IPv4Network | IPv6Network | None = None
    dst: IPv4Network | IPv6Network | None = None
    neg_dst: bool = False
    oif: str | None = None
    dports: tuple[int, ...] | None = None
    neg_dports: bool = False
    uid: int | None = None
    neg_uid: bool = False
    gid: int | None = None
    neg_gid: bool = False
    target: str = ""               # RETURN, REDIRECT or a chain name (ISTIO_* spelling)
    to_port: int | None = None
    text: str = field(default="", compare=False)


def _net(text: str, version: int = 4) -> IPv4Network | IPv6Network:
    """An address or CIDR of the family the rules belong to (iptables: 4,
    ip6tables: 6); the other family's is refused."""
    network, bits = (IPv4Network, 32) if version == 4 else (IPv6Network, 128)
    try:
        return network(text if "/" in text else f"{text}/{bits}")
    except ValueError:
        raise InstalledError(f"{show(text)} is not an IPv{version} network") from None


def _int(text: object, what: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str) and text.isascii() and text.isdigit():
        return int(text)
    raise InstalledError(f"{what}: {show(text)} is not a number")


def parse_iptables_rule(line: str, version: int = 4) -> Rule:
    """One `-A CHAIN ...` line of iptables-save (or iptables-restore input);
    version 6 for ip6tables-save, whose lines differ only in their addresses."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise InstalledError(f"unreadable rule {show(line)}: {e}") from None
    if len(words) < 2 or words[0] != "-A":
        raise InstalledError(f"not a rule: {show(line)}")
    r: dict = {"chain": words[1], "text": line}
    negate, i = False, 2

    def take() -> str:
        nonlocal i
        i += 1
        if i >= len(words):
            raise InstalledError(f"rule {show(line)} ends early")
        return words[i]

    def positive(option: str) -> None:
        if negate:
            raise InstalledError(f"rule {show(line)}: unexpected '!' before {option}")

    while i < len(words):
        w = words[i]
        if w == "!":
            negate = True
            i += 1
            continue
        if w == "-p":
            positive(w)
            r["proto"] = take()
        elif w == "-s":
            positive(w)
            r["src"] = _net(take(), version)
        elif w == "-d":
            r["dst"], r["neg_dst"] = _net(take(), version), negate
        elif w == "-o":
            positive(w)
            r["oif"] = take()
        elif w == "-m":
            positive(w)
            if take() not in ("tcp", "udp", "multiport", "owner"):
                raise InstalledError(f"rule {show(line)}: match module {show(words[i])} is not one Istio uses")
        elif w in ("--dport", "--dports"):
            r["dports"] = tuple(_int(p, "port") for p in take().split(","))
            r["neg_dports"] = negate
        elif w in ("--uid-owner", "--gid-owner"):
            key = "uid" if w == "--uid-owner" else "gid"
            r[key], r["neg_" + key] = _int(take(), w), negate
        elif w == "-j":
            positive(w)
            r["target"] = take()
        elif w in ("--to-ports", "--to-port") and r.get("target") == "REDIRECT":
            positive(w)
            r["to_port"] = _int(take(), w)
        else:
            raise InstalledError(f"rule {show(line)}: {show(w)} is not something Istio's rules use")
        negate = False
        i += 1
    if negate:
        raise InstalledError(f"rule {show(line)} ends with '!'")
    return Rule(**r)


def iptables_nat_rules(text: str, version: int = 4) -> list[Rule]:
    """The nat table's rules from `iptables-save` output (`ip6tables-save`
    with version 6; other tables skipped)."""
    rules, table = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
        elif line == "COMMIT":
            table = None
        elif table == "nat":
            if line.startswith(":") or line.startswith("-N "):
                continue              # chain declarations
            rules.append(parse_iptables_rule(line, version))
    return rules


# nftables chain names -> the iptables spelling the classifier uses.
_NFT_CHAINS = {"prerouting": "PREROUTING", "output": "OUTPUT", "istio-inbound": "ISTIO_INBOUND",
               "istio-redirect": "ISTIO_REDIRECT", "istio-in-redirect": "ISTIO_IN_REDIRECT",
               "istio-output": "ISTIO_OUTPUT", "istio-output-dns": "ISTIO_OUTPUT_DNS"}
NFT_TABLES = ("istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw")


def _nft_value(value: object) -> object:
    if isinstance(value, dict) and "prefix" in value:
        return _net(f"{value['prefix']['addr']}/{value['prefix']['len']}")
    if isinstance(value, dict) and "set" in value:
        return tuple(_int(v, "set element") for v in value["set"])
    return value


def _nft_rule(chain: str, exprs: list, text: str) -> Rule | None:
    """A rule of table inet istio-proxy-nat; None for IPv6-only rules (IPv6
    traffic is never accelerated, so their values do not matter here)."""
    r: dict = {"chain": _NFT_CHAINS.get(chain, chain), "text": text}
    for expr in exprs:
        if not isinstance(expr, dict) or len(expr) != 1:
            raise InstalledError(f"rule {text}: unreadable expression {show(expr)}")
        (kind, body), = expr.items()
        if kind == "counter":
            continue
        if kind == "return":
            r["target"] = "RETURN"
        elif kind == "jump":
            r["target"] = _NFT_CHAINS.get(body.get("target"), body.get("target"))
        elif kind == "redirect":
            r["target"], r["to_port"] = "REDIRECT", _int(body.get("port"), "redirect port")
        elif kind == "match":
            op, left, right = body.get("op"), body.get("left"), _nft_value(body.get("right"))
            if op not in ("==", "!="):
                raise InstalledError(f"rule {text}: operator {show(op)} is not one Istio uses")
            neg = op == "!="
            if "meta" in left and left["meta"].get("key") in ("l4proto", "oifname", "skuid", "skgid"):
                key = left["meta"]["key"]
                if key == "l4proto" and not neg:
                    r["proto"] = right
                elif key == "oifname" and not neg:
                    r["oif"] = right
                elif key in ("skuid", "skgid"):
                    name = "uid" if key == "skuid" else "gid"
                    r[name], r["neg_" + name] = _int(right, key), neg
                else:
                    raise InstalledError(f"rule {text}: negated {key} is not something Istio's rules use")
            elif "payload" in left:
                proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
                if proto == "ip6":
                    return None
                if proto == "ip" and fld in ("saddr", "daddr") and isinstance(right, (str, IPv4Network)):
                    net = right if isinstance(right, IPv4Network) else _net(right)
                    if fld == "saddr" and not neg:
                        r["src"] = net
                    elif fld == "daddr":
                        r["dst"], r["neg_dst"] = net, neg
                    else:
                        raise InstalledError(f"rule {text}: negated source address is not something Istio uses")
                elif proto in ("tcp", "udp") and fld == "dport":
                    if r.get("proto", proto) != proto:
                        raise InstalledError(f"rule {text}: mixes protocols")
                    r["proto"] = proto
                    r["dports"] = right if isinstance(right, tuple) else (_int(right, "port"),)
                    r["neg_dports"] = neg
                else:
                    raise InstalledError(f"rule {text}: match on {proto} {fld} is not something Istio's rules use")
            else:
                raise InstalledError(f"rule {text}: match {show(left)} is not something Istio's rules use")
        else:
            raise InstalledError(f"rule {text}: statement {show(kind)} is not something Istio's nat rules use")
    return Rule(**r)


def nftables_nat_rules(ruleset_json: str) -> list[Rule]:
    """The rules of table inet istio-proxy-nat from `nft -j list ruleset` (or
    `nft -j list table inet istio-proxy-nat`). A mangle table (TPROXY mode or
    drop-invalid) is refused: it is not the REDIRECT capture the datapath mirrors."""
    try:
        items = json.loads(ruleset_json)["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise InstalledError(f"unreadable nft JSON: {e}") from None
    rules, tables = [], set()
    for item in items:
        if not isinstance(item, dict):
            raise InstalledError(f"unreadable nft JSON item {show(item)}")
        if "table" in item and item["table"].get("family") == "inet" and item["table"].get("name") in NFT_TABLES:
            tables.add(item["table"]["name"])
        rule = item.get("rule")
        if rule is None or rule.get("family") != "inet" or rule.get("table") != "istio-proxy-nat":
            continue
        text = f"[{rule.get('chain')} handle {rule.get('handle')}]"
        parsed = _nft_rule(rule.get("chain"), rule.get("expr", []), text)
        if parsed is not None:
            rules.append(parsed)
    if "istio-proxy-mangle" in tables:
        raise InstalledError("table inet istio-proxy-mangle exists (TPROXY mode or drop-invalid): "
                             "left to Istio's nftables rules")
    if "istio-proxy-nat" not in tables:
        raise InstalledError("no table inet istio-proxy-nat")
    return rules


def from_rules(rules: list[Rule], source: str, version: int = 4) -> Capture:
    """Source 1: the capture flags that produce exactly these nat rules
    (iptables' with version 4, ip6tables' with version 6: the same chains,
    with ::6 as the passthrough source and ::1 as loopback)."""
    if not rules:
        raise InstalledError(f"no Istio nat rules ({source})")
    by_chain: dict[str, list[Rule]] = {}
    for r in rules:
        by_chain.setdefault(r.chain, []).append(r)
    known = {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "ISTIO_INBOUND", "ISTIO_REDIRECT",
             "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS"}
    for chain in by_chain:
        if chain not in known:
            raise InstalledError(f"chain {show(chain)} is not one istio-iptables creates in REDIRECT mode")
    if "ISTIO_OUTPUT" not in by_chain:
        raise InstalledError(f"no ISTIO_OUTPUT rules ({source})")

    def only(chain: str, expected: Iterable[Rule], what: str) -> None:
        got = by_chain.get(chain, [])
        if got != list(expected):
            shown = "; ".join(r.text for r in got) or "none"
            raise InstalledError(f"{chain} is not {what} ({source}): {shown}")

    only("OUTPUT", [Rule("OUTPUT", target="ISTIO_OUTPUT")], "a jump to ISTIO_OUTPUT")
    proxy_port = _redirect_port(by_chain, "ISTIO_REDIRECT", source)
    inbound_port = _redirect_port(by_chain, "ISTIO_IN_REDIRECT", source)
    tunnel, include_inbound, exclude_inbound = _inbound(by_chain, source)
    out = _output(by_chain["ISTIO_OUTPUT"], tunnel, source, version)
    dns_chain = by_chain.get("ISTIO_OUTPUT_DNS", [])
    for r in dns_chain:
        if not (r.target == "REDIRECT" and r.to_port == DNS_AGENT_PORT and r.dports == (DNS_PORT,)
                and r.proto in ("tcp", "udp") and not r.neg_dports and not r.neg_dst and r.src is None
                and r.oif is None and r.uid is None and r.gid is None):
            raise InstalledError(f"ISTIO_OUTPUT_DNS rule is not a DNS redirect ({source}): {r.text}")
    # ip6tables gets ISTIO_OUTPUT_DNS only for IPv6 resolvers; its proxy uid
    # rules still skip port 53 whenever DNS capture is on.
    if out["dns"] != bool(dns_chain) and not (version == 6 and out["dns"] and not dns_chain):
        raise InstalledError(f"DNS capture rules are incomplete ({source})")
    return make_capture(source, include_ranges=out["include_ranges"], exclude_ranges=out["exclude_ranges"],
                        include_inbound=include_inbound, exclude_inbound=exclude_inbound,
                        include_outbound=out["include_ports"], exclude_outbound=out["exclude_ports"],
                        dns=out["dns"], uids=out["uids"], gids=out["gids"], proxy_port=proxy_port,
                        inbound_port=inbound_port,
                        dns_redirects=[(r.proto, None if r.dst is None else str(r.dst)) for r in dns_chain])


def _redirect_port(by_chain: dict, chain: str, source: str) -> int:
    got = by_chain.get(chain, [])
    if len(got) != 1 or replace(got[0], to_port=None) != Rule(chain, proto="tcp", target="REDIRECT") \
            or got[0].to_port is None:
        raise InstalledError(f"{chain} is not one REDIRECT rule ({source}): "
                             + ("; ".join(r.text for r in got) or "none"))
    return got[0].to_port


def _inbound(by_chain: dict, source: str) -> tuple[int, object, list[int]]:
    chain = list(by_chain.get("ISTIO_INBOUND", []))
    if not chain or chain[0].target != "RETURN" or replace(chain[0], dports=None) != \
            Rule("ISTIO_INBOUND", proto="tcp", target="RETURN") or not chain[0].dports or len(chain[0].dports) != 1:
        raise InstalledError(f"ISTIO_INBOUND does not start with the tunnel port's RETURN ({source})")
    tunnel, rest = chain[0].dports[0], chain[1:]
    prerouting = by_chain.get("PREROUTING", [])
    if not prerouting:
        if rest:
            raise InstalledError(f"ISTIO_INBOUND has rules but PREROUTING does not jump to it ({source})")
        return tunnel, (), []
    if prerouting != [Rule("PREROUTING", proto="tcp", target="ISTIO_INBOUND")]:
        raise InstalledError(f"PREROUTING is not a jump to ISTIO_INBOUND ({source}): "
                             + "; ".join(r.text for r in prerouting))
    catch_all = Rule("ISTIO_INBOUND", proto="tcp", target="ISTIO_IN_REDIRECT")
    if rest and rest[-1] == catch_all:
        excluded = []
        for r in rest[:-1]:
            if replace(r, dports=None) != Rule("ISTIO_INBOUND", proto="tcp", target="RETURN") or not r.dports:
                raise InstalledError(f"unrecognised ISTIO_INBOUND rule ({source}): {r.text}")
            excluded += r.dports
        return tunnel, ALL_PORTS, excluded
    included = []
    for r in rest:
        if replace(r, dports=None) != Rule("ISTIO_INBOUND", proto="tcp", target="ISTIO_IN_REDIRECT") \
                or not r.dports or len(r.dports) != 1:
            raise InstalledError(f"unrecognised ISTIO_INBOUND rule ({source}): {r.text}")
        included += r.dports
    return tunnel, included, []


def _output(chain: list[Rule], tunnel: int, source: str, version: int = 4) -> dict:
    """ISTIO_OUTPUT in istio-iptables' order; any other rule or order is refused."""
    passthrough, anywhere = (PASSTHROUGH_SOURCE, IPv4Network("0.0.0.0/0")) if version == 4 else \
        (PASSTHROUGH_SOURCE6, IPv6Network("::/0"))
    o = "ISTIO_OUTPUT"
    out = {"exclude_ports": [], "uids": [], "gids": [], "dns": False, "exclude_ranges": [],
           "include_ports": [], "include_ranges": []}
    rules, i = chain, 0

    def at(pred) -> bool:
        return i < len(rules) and pred(rules[i])

    def fail(why: str):
        shown = rules[i].text if i < len(rules) else "end of chain"
        raise InstalledError(f"ISTIO_OUTPUT: {why} ({source}): {shown}")

    # -o: RETURN per port (and protocol); TCP and UDP must list the same ports.
    by_proto: dict[str, list[int]] = {"tcp": [], "udp": []}
    while at(lambda r: r.proto in ("tcp", "udp") and r.dports and replace(r, proto=None, dports=None)
             == Rule(o, target="RETURN")):
        by_proto[rules[i].proto] += rules[i].dports
        i += 1
    if set(by_proto["tcp"]) != set(by_proto["udp"]):
        fail("excluded TCP and UDP ports differ")
    out["exclude_ports"] = by_proto["tcp"]
    if not at(lambda r: r == Rule(o, oif="lo", src=passthrough, target="RETURN")):
        fail(f"expected the {passthrough.network_address} passthrough RETURN")
    i += 1
    loopback = None
    for key in ("uid", "gid"):
        while at(lambda r: getattr(r, key) is not None and r.oif == "lo" and r.target == "ISTIO_IN_REDIRECT"):
            r = rules[i]
            ident = getattr(r, key)
            loopback = loopback or r.dst
            dns = r.dports == (DNS_PORT, tunnel)
            if r != Rule(o, oif="lo", dst=r.dst, neg_dst=True, proto="tcp",
                         dports=(DNS_PORT, tunnel) if dns else (tunnel,), neg_dports=True,
                         target="ISTIO_IN_REDIRECT", **{key: ident}) or r.dst != loopback:
                fail(f"unrecognised proxy {key} rule")
            if key == "uid":
                out["dns"] = out["dns"] or dns
            i += 1
            lo_return = Rule(o, oif="lo", target="RETURN", **{key: ident, "neg_" + key: True})
            lo_return_dns = replace(lo_return, proto="tcp", dports=(DNS_PORT,), neg_dports=True)
            if at(lambda r: r in (lo_return, lo_return_dns)):
                i += 1
            if not at(lambda r: r == Rule(o, target="RETURN", **{key: ident})):
                fail(f"expected the proxy {key} {ident} RETURN")
            i += 1
            out[key + "s"].append(ident)
    if not out["uids"]:
        fail("no proxy uid rules")
    if version == 6 and loopback != LOOPBACK6:
        fail(f"the loopback destination is {loopback}, ip6tables' is always {LOOPBACK6}")
    if at(lambda r: r == Rule(o, target="ISTIO_OUTPUT_DNS")):
        out["dns"] = True
        i += 1
    if not at(lambda r: r == Rule(o, dst=loopback, target="RETURN")):
        fail("expected the loopback RETURN")
    i += 1
    # iptables-save prints "-d 0.0.0.0/0" as no -d at all
    while at(lambda r: r == Rule(o, dst=r.dst, target="RETURN")):
        out["exclude_ranges"].append(rules[i].dst or anywhere)
        i += 1
    while at(lambda r: r.dports is not None and len(r.dports) == 1
             and r == Rule(o, proto="tcp", dports=r.dports, target="ISTIO_REDIRECT")):
        out["include_ports"].append(rules[i].dports[0])
        i += 1
    # -i '*' and a listed 0.0.0.0/0 both read as a rule without -d
    while at(lambda r: r == Rule(o, dst=r.dst, target="ISTIO_REDIRECT")):
        out["include_ranges"].append(rules[i].dst or anywhere)
        i += 1
    if i != len(rules):
        fail("unrecognised rule")
    return out


def from_iptables_save(text: str) -> Capture:
    return from_rules(iptables_nat_rules(text), SOURCE_IPTABLES)


def from_ip6tables_save(text: str) -> Capture:
    """The IPv6 capture of `ip6tables-save` output: its own ranges, and the
    ports, ids and inbound capture that with_ipv6() checks against IPv4's."""
    return from_rules(iptables_nat_rules(text, 6), SOURCE_IP6TABLES, 6)


def from_nft_json(text: str) -> Capture:
    return from_rules(nftables_nat_rules(text), SOURCE_NFTABLES)


# --- reading a pod's namespace ----------------------------------------------------

# Where Istio's rules can be, and how each kind is read without changing the
# namespace (measured: `iptables-legacy-save -t nat` makes the kernel create an
# empty legacy nat table where there was none):
#   native nftables  tables inet istio-proxy-*        -> in `nft -j list ruleset`
#   iptables-nft     ISTIO_* chains in table ip nat   -> seen in the same listing,
#                                                        read with iptables-nft-save -t nat
#   iptables-legacy  listed in /proc/net/ip_tables_names -> iptables-legacy-save (only
#                                                        the tables that exist)
#   ip6tables        the same, family ip6 in the listing -> ip6tables-nft-save -t nat;
#                    nat in /proc/net/ip6_tables_names  -> ip6tables-legacy-save -t nat
#                    (also measured: saving creates the legacy IPv6 nat table)
# So a pod costs one process (two with iptables-nft rules, the common case;
# three when it has ip6tables rules too).


class NoIstioRules(InstalledError):
    """The namespace holds no Istio rules (yet: istio-init or the CNI plugin
    may not have run). Worth reading again later, unlike rules that exist
    and cannot be read exactly."""


class RulesReadFailed(InstalledError):
    """A reader failed (it exited non-zero, timed out, could not start): says
    nothing about the rules, so, as with NoIstioRules, worth reading again later."""


def _run_in_netns(netns_path: str, argv: Sequence[str]) -> str | None:
    """stdout of argv run inside the namespace; None when the binary is missing."""
    if shutil.which(argv[0]) is None:
        return None
    proc = subprocess.run(["nsenter", f"--net={netns_path}", *argv], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RulesReadFailed(f"{' '.join(argv)} failed in {netns_path}: {proc.stderr.strip()[:200]}")
    return proc.stdout


def _legacy_tables(netns_path: str, names_file: str = "ip_tables_names") -> set[str]:
    """Names of the namespace's iptables-legacy tables (ip6tables-legacy's
    with names_file="ip6_tables_names"), read from a thread
    that enters it (/proc/thread-self/net is the thread's namespace; no
    process, and no table is created)."""
    import ctypes
    import os
    import threading
    result: dict = {}

    def enter_and_read():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:      # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), f"setns({netns_path})")
            finally:
                os.close(fd)
            try:
                with open(f"/proc/thread-self/net/{names_file}") as f:
                    result["names"] = set(f.read().split())
            except FileNotFoundError:      # ip(6)_tables not loaded: no legacy table anywhere
                result["names"] = set()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    t = threading.Thread(target=enter_and_read, name="legacy-tables")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["names"]


def _iptables_nft_istio_chains(ruleset: dict, families: tuple[str, ...] = ("ip", "ip6")) -> bool:
    """Does an `nft -j` listing hold chains iptables-nft (family ip) or
    ip6tables-nft (family ip6) made for Istio?"""
    return any(isinstance(item, dict) and isinstance(item.get("chain"), dict)
               and item["chain"].get("family") in families
               and str(item["chain"].get("name", "")).startswith("ISTIO_")
               for item in ruleset.get("nftables", []))


def read_netns(netns_path: str, run=_run_in_netns, legacy_tables=_legacy_tables) -> Capture | InstalledError:
    """Source 1 for one pod: the Istio rules in the network namespace at
    `netns_path` (/proc/PID/ns/net or /run/netns/NAME), whichever kind is
    there. Never raises: an InstalledError is returned as the reason
    (NoIstioRules when there are none). Reads only: nothing is created in
    the namespace."""
    try:
        found: list[tuple[str, str]] = []
        checked = []
        text = run(netns_path, ["nft", "-j", "list", "ruleset"])
        nft_listing: dict | None = None
        nft_saver = text is None           # without nft, iptables-nft-save must look itself
        if text is not None:
            checked.append("nft")
            try:
                ruleset = json.loads(text) if text.strip() else {}
            except ValueError as e:
                raise InstalledError(f"nft -j list ruleset: not JSON ({e})") from None
            if not isinstance(ruleset, dict):
                raise InstalledError("nft -j list ruleset: not a JSON object")
            if '"istio-proxy-' in text:
                found.append(("nft", text))
            nft_saver, nft_listing = _iptables_nft_istio_chains(ruleset), ruleset
        if nft_saver:
            saved = run(netns_path, ["iptables-nft-save", "-t", "nat"])
            if saved is not None:
                checked.append("iptables-nft-save")
                if any(line.startswith("-A ISTIO_") for line in saved.splitlines()):
                    found.append(("iptables-nft-save", saved))
        if "nat" in legacy_tables(netns_path):
            saved = run(netns_path, ["iptables-legacy-save"])
            if saved is not None:
                if any(line.startswith("-A ISTIO_") for line in saved.splitlines()):
                    found.append(("iptables-legacy-save", saved))
        checked.append("/proc/net/ip_tables_names")
        if not found:
            return NoIstioRules(f"no Istio rules in the pod's network namespace (read with {', '.join(checked)})")
        if len(found) > 1:
            return InstalledError(f"Istio rules of more than one kind ({', '.join(k for k, _ in found)})")
        kind, text = found[0]
        if kind == "nft":
            return from_nft_json(text)
        ipv6 = _read_ip6tables(netns_path, run, legacy_tables, nft_listing)
        if isinstance(ipv6, RulesReadFailed):
            return ipv6     # read both again later, rather than settle IPv6 on a failed read
        return with_ipv6(from_iptables_save(text), ipv6)
    except InstalledError as e:
        return e
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return RulesReadFailed(f"reading the rules failed: {type(e).__name__}: {e}")


def _read_ip6tables(netns_path: str, run, legacy_tables, nft_listing: dict | None) -> Capture | InstalledError:
    """The pod's IPv6 capture from its ip6tables nat rules, read with the
    IPv4 reader's care: ip6tables-nft-save only when the nft listing shows
    ISTIO_ chains of family ip6 (or nft is missing), ip6tables-legacy-save
    only when /proc/net/ip6_tables_names lists nat (saving creates the
    table otherwise). NoIstioRules when there are none."""
    try:
        found: list[tuple[str, str]] = []
        if nft_listing is None or _iptables_nft_istio_chains(nft_listing, ("ip6",)):
            saved = run(netns_path, ["ip6tables-nft-save", "-t", "nat"])
            if saved is not None and any(line.startswith("-A ISTIO_") for line in saved.splitlines()):
                found.append(("ip6tables-nft-save", saved))
        if "nat" in legacy_tables(netns_path, "ip6_tables_names"):
            saved = run(netns_path, ["ip6tables-legacy-save", "-t", "nat"])
            if saved is not None and any(line.startswith("-A ISTIO_") for line in saved.splitlines()):
                found.append(("ip6tables-legacy-save", saved))
        if not found:
            return NoIstioRules("no Istio ip6tables rules in the pod's network namespace")
        if len(found) > 1:
            return InstalledError(f"Istio ip6tables rules of more than one kind ({', '.join(k for k, _ in found)})")
        return from_ip6tables_save(found[0][1])
    except InstalledError as e:
        return e
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return RulesReadFailed(f"reading the ip6tables rules failed: {type(e).__name__}: {e}")


# What the IPv4 and IPv6 rules must agree on: the pod's policy holds one
# value of each for both families (the datapath shares inbound capture and
# the port lists between them).
_SHARED = ("proxy_uids", "proxy_gids", "proxy_port", "inbound_port")
_SHARED_POLICY = ("include_inbound_ports", "exclude_inbound_ports", "include_outbound_ports",
                  "exclude_outbound_ports")


def _listed(value: object) -> str:
    return show(list(value)) if isinstance(value, tuple) else show(value)


def with_ipv6(ipv4: Capture, ipv6: Capture | InstalledError) -> Capture:
    """The pod's capture from its iptables rules, with its IPv6 side from its
    ip6tables rules (the ground truth for IPv6, as the IPv4 rules are for
    IPv4): their IPv6 ranges join the policy and mark it exact for IPv6. No
    ip6tables rules means Istio leaves IPv6 alone, so must eBPF; unreadable
    rules, or rules whose shared values differ from IPv4's (the datapath
    would apply IPv4's to IPv6), keep IPv6 on iptables with the reason."""
    p4 = ipv4.policy
    if isinstance(ipv6, NoIstioRules):
        why = f"{ipv6}: Istio does not capture the pod's IPv6 traffic, so eBPF must not either"
        return replace(ipv4, policy=replace(p4, ipv6_refused=why))
    if isinstance(ipv6, InstalledError):
        return replace(ipv4, policy=replace(p4, ipv6_refused=f"its ip6tables rules cannot be read exactly: {ipv6}"))
    p6 = ipv6.policy
    for what in _SHARED:
        mine, theirs = getattr(ipv4, what), getattr(ipv6, what)
        if mine != theirs:
            why = f"iptables and ip6tables rules disagree on {what}: {_listed(mine)} vs {_listed(theirs)}"
            return replace(ipv4, policy=replace(p4, ipv6_refused=why))
    for what in _SHARED_POLICY:
        mine, theirs = getattr(p4, what), getattr(p6, what)
        if set(mine) != set(theirs):
            why = (f"iptables and ip6tables rules disagree on {what}: {show(list(mine))} vs {show(list(theirs))} "
                   f"(iptables rules: {ipv4.describe()}; ip6tables rules: {ipv6.describe()})")
            return replace(ipv4, policy=replace(p4, ipv6_refused=why))
    policy = replace(
        p4,
        include_outbound_ip_ranges=tuple(n for n in p4.include_outbound_ip_ranges if n.version == 4)
        + tuple(p6.include_outbound_ip_ranges),
        exclude_outbound_ip_ranges=tuple(n for n in p4.exclude_outbound_ip_ranges if n.version == 4)
        + tuple(p6.exclude_outbound_ip_ranges),
        # port 53 left alone in both families when either family's rules capture DNS
        dns_capture=p4.dns_capture or p6.dns_capture,
        ipv6_exact=True, ipv6_refused=None)
    return replace(ipv4, policy=policy)


def spec_key(pod: Mapping) -> str:
    """A fingerprint of what the pod spec says about capture (annotations,
    init containers, the proxy's security context): a change means the
    spec-side sources must be compared with the rules again."""
    metadata = pod.get("metadata") if isinstance(pod, Mapping) else None
    spec = pod.get("spec") if isinstance(pod, Mapping) else None
    metadata, spec = metadata if isinstance(metadata, Mapping) else {}, spec if isinstance(spec, Mapping) else {}
    relevant = {"annotations": metadata.get("annotations"), "init": spec.get("initContainers"),
                "contexts": [c.get("securityContext") for c in spec.get("containers") or [] if isinstance(c, Mapping)]}
    return json.dumps(relevant, sort_keys=True, default=str)


class InstalledRulesCache:
    """The rules of each pod, read when its namespace is first seen or its
    spec changes -- not on every reconcile pass (issue 11). Keyed by pod uid;
    forgets pods not seen in the last `retain` call."""

    def __init__(self, reader=read_netns):
        self._reader = reader
        self._entries: dict[str, tuple[tuple, Capture | InstalledError]] = {}
        self.reads = 0

    def get(self, pod_uid: str, netns_inode: int, netns_path: str, key: str) -> Capture | InstalledError:
        stamp = (netns_inode, key)
        entry = self._entries.get(pod_uid)
        if entry is None or entry[0] != stamp:
            self.reads += 1
            entry = (stamp, self._reader(netns_path))
            self._entries[pod_uid] = entry
        return entry[1]

    def get_many(self, requests: Sequence[tuple[str, int, str, str]], workers: int = 4) -> list:
        """get() for each (pod_uid, netns_inode, netns_path, key); the reads
        needed run in up to `workers` threads (each read waits on processes)."""
        missing = {}
        for uid, inode, path, key in requests:
            entry = self._entries.get(uid)
            if (entry is None or entry[0] != (inode, key)) and uid not in missing:
                missing[uid] = (inode, path, key)
        if len(missing) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(min(workers, len(missing)), thread_name_prefix="read-rules") as pool:
                read = dict(zip(missing, pool.map(lambda m: self._reader(m[1]), missing.values())))
        else:
            read = {uid: self._reader(m[1]) for uid, m in missing.items()}
        for uid, (inode, _, key) in missing.items():
            self.reads += 1
            self._entries[uid] = ((inode, key), read[uid])
        return [self._entries[uid][1] for uid, _, _, _ in requests]

    def forget(self, pod_uid: str) -> None:
        """Read this pod's rules again next time (they were not there yet)."""
        self._entries.pop(pod_uid, None)

    def retain(self, pod_uids: Iterable[str]) -> None:
        keep = set(pod_uids)
        for uid in list(self._entries):
            if uid not in keep:
                del self._entries[uid]
