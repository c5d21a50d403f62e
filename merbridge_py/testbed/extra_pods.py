"""Many more meshed pods on a test-bed node than the bed starts: a network
namespace holding the pod's IP (on its loopback) and a pod object, but no
app, no sidecar and no veth. The agent needs only those two to accelerate a
pod, so a benchmark or a scale test can put hundreds on one node cheaply.
Each namespace also gets the Istio rules istio-init would install (the agent
decides from them, and refuses a pod whose namespace has none).

IPs come from 198.18.0.0/15 (the benchmarking range), one per index; the
namespaces are named under the bed's prefix, so the bed's teardown removes
whatever a caller leaves behind.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading

from pyroute2 import IPRoute

from . import istio_iptables, kube, topology
from .topology import Pod


def pod_ip(i: int) -> str:
    return f"198.18.{i // 250}.{i % 250 + 1}"


def add_pod_namespaces(tb, n: int, start: int = 0, node: str = "node0") -> list[Pod]:
    """Pods start .. start+n-1 on `node`: their namespaces exist and hold
    their IPs when this returns. Indices must not repeat within a bed."""
    node_obj = tb.node(node)
    pods = [Pod(name=f"fp{i}", node=node_obj.name, ip=pod_ip(i), netns=f"{_netns_prefix(tb)}{i}",
                meshed=True, cgroup=node_obj.cgroup, annotations={}, ports=[topology.APP_PORT], veth="",
                service_ip="")
            for i in range(start, start + n)]
    if not pods:
        return pods
    # One `ip` for all the namespaces; their addresses from this process (an
    # `ip -n` per namespace made creation the bottleneck of the churn test on
    # a busy machine: about 90 ms per pod).
    subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {p.netns}\n" for p in pods), text=True,
                   check=True)
    _in_thread(_address_loopbacks, pods)
    return pods


_CLONE_NEWNET = 0x40000000
_LOOPBACK_INDEX = 1   # lo is the first interface of every network namespace


def _address_loopbacks(pods: list[Pod]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for p in pods:
        fd = os.open(f"/run/netns/{p.netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {p.netns}")
        finally:
            os.close(fd)
        with IPRoute() as ipr:   # its netlink socket is in this thread's namespace
            ipr.addr("add", index=_LOOPBACK_INDEX, address=p.ip, prefixlen=32)
            ipr.link("set", index=_LOOPBACK_INDEX, state="up")
        # a child forked from this thread starts in the thread's namespace
        subprocess.run(["iptables-restore", "--noflush"], input=istio_iptables.restore_payload(
            istio_iptables.pod_flags(p)), text=True, check=True, capture_output=True)


def _in_thread(fn, *args) -> None:
    """fn(*args) in a short-lived thread: setns moves only the calling
    thread, and this one ends without going back to the host's namespace."""
    failure: list[BaseException] = []

    def run():
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(e)

    t = threading.Thread(target=run, name="extra-pods")
    t.start()
    t.join()
    if failure:
        raise failure[0]


def remove_pod_namespaces(pods: list[Pod]) -> None:
    """Delete the pods' namespaces (those already gone are skipped)."""
    _delete_namespaces([p.netns for p in pods])


def remove_all(tb) -> None:
    """Delete every extra pod namespace of the bed, whoever made it."""
    _delete_namespaces(topology.owned_netns(tb.name), prefix=_netns_prefix(tb))


def _netns_prefix(tb) -> str:
    return f"{topology.prefix(tb.name)}x"


def _delete_namespaces(names: list[str], prefix: str = "") -> None:
    names = [n for n in names if n.startswith(prefix)]
    if names:
        # -force: go on past a namespace that is already gone.
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns delete {n}\n" for n in names),
                       text=True, capture_output=True)


def pod_objects(tb, pods: list[Pod]) -> list[dict]:
    """The pods' objects, as the bed writes its own pods' objects."""
    return [kube.pod_object(tb.name, p, tb.node(p.node)) for p in pods]
