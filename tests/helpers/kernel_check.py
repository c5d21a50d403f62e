"""What the kernel maps hold, read from the agent's pins with bpftool (not
through the agent): pod IP -> netns cookie from local_pod_ip, and the pod IP
of every pod_policy entry, so a test can compare them with /status."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def _dump(pin: Path) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def _bytes(hex_list: list[str]) -> bytes:
    return bytes(int(b, 16) for b in hex_list)


def kernel_pods(bpffs: Path) -> dict[str, tuple[int, str]]:
    """pod IP -> (cookie in local_pod_ip, pod IP in that cookie's pod_policy entry)."""
    (maps_dir,) = Path(bpffs).glob("maps-*")
    policies = {int.from_bytes(_bytes(e["key"]), "little"): ".".join(str(b) for b in _bytes(e["value"])[:4])
                for e in _dump(maps_dir / "pod_policy")}
    out = {}
    for e in _dump(maps_dir / "local_pod_ip"):
        ip = ".".join(str(b) for b in _bytes(e["key"]))
        cookie = int.from_bytes(_bytes(e["value"]), "little")
        out[ip] = (cookie, policies.pop(cookie, None))
    for cookie, ip in policies.items():   # a policy no IP points to (or a moment in the middle of a write)
        out.setdefault(f"orphan policy of {ip}", (cookie, None))
    return out


def status_matches_kernel(status: dict, bpffs: Path) -> tuple[bool, str]:
    accelerated = {p["ip"] for p in status["pods"] if p["accelerated"]}
    kernel = kernel_pods(bpffs)
    consistent = all(policy_ip == ip for ip, (_, policy_ip) in kernel.items())
    return accelerated == set(kernel) and consistent, f"status {sorted(accelerated)} kernel {kernel}"
