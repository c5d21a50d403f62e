"""What the kernel maps hold, read from the agent's pins with bpftool (not
through the agent): pod IP -> netns cookie from local_pod_ip, and the pod IP
of every pod_policy entry, so a test can compare them with /status."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path


def _dump(pin: Path) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def _bytes(hex_list: list[str]) -> bytes:
    return bytes(int(b, 16) for b in hex_list)


def _address(raw: bytes) -> str:
    """A struct addr (16 bytes, IPv4 v4-mapped) as text."""
    v6 = ipaddress.IPv6Address(raw)
    return str(v6.ipv4_mapped or v6)


def kernel_pods(bpffs: Path) -> dict[str, tuple[int, str]]:
    """pod IP (either family) -> (cookie in local_pod_ip, pod IP of that
    family in that cookie's pod_policy entry)."""
    (maps_dir,) = Path(bpffs).glob("maps-*")
    # struct pod_policy: pod_ip at 0, pod_ip6 at 16 (zero without IPv6)
    policies = {int.from_bytes(_bytes(e["key"]), "little"): _bytes(e["value"])
                for e in _dump(maps_dir / "pod_policy")}
    out, pointed_to = {}, set()
    for e in _dump(maps_dir / "local_pod_ip"):
        ip = _address(_bytes(e["key"]))
        cookie = int.from_bytes(_bytes(e["value"]), "little")
        value = policies.get(cookie)
        pointed_to.add(cookie)
        if value is None:
            out[ip] = (cookie, None)
        else:
            out[ip] = (cookie, ".".join(str(b) for b in value[:4]) if ":" not in ip else _address(value[16:32]))
    for cookie, value in policies.items():   # a policy no IP points to (or a moment in the middle of a write)
        if cookie not in pointed_to:
            out.setdefault(f"orphan policy of {'.'.join(str(b) for b in value[:4])}", (cookie, None))
    return out


def status_matches_kernel(status: dict, bpffs: Path) -> tuple[bool, str]:
    """/status lists IPv4 addresses: compared with the kernel's IPv4 entries."""
    accelerated = {p["ip"] for p in status["pods"] if p["accelerated"]}
    kernel = {ip: entry for ip, entry in kernel_pods(bpffs).items() if ":" not in ip}
    consistent = all(policy_ip == ip for ip, (_, policy_ip) in kernel.items())
    return accelerated == set(kernel) and consistent, f"status {sorted(accelerated)} kernel {kernel}"
