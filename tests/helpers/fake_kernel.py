"""Stand-ins for the kernel in agent tests: a datapath that is two dicts (like
the pod_policy and local_pod_ip maps) and a namespace index fed by the test."""

from merbridge_py.netns import Netns


class FakeDatapath:
    def __init__(self):
        self.pod_policy: dict[int, tuple] = {}   # cookie -> (ip, outbound, inbound)
        self.pod_fields: dict[int, object] = {}  # cookie -> policy.rules.PodKernelFields
        self.local_pod_ip: dict[str, int] = {}
        self.fail_ips: set[str] = set()
        self.bpf = None   # metrics read no kernel counters from a fake

    def set_pod(self, cookie, ip, outbound, inbound, fields=None):
        if ip in self.fail_ips:
            raise OSError(28, "No space left on device")
        self.pod_policy[cookie] = (ip, tuple(outbound), tuple(inbound))
        self.pod_fields[cookie] = fields
        self.local_pod_ip[ip] = cookie

    def remove_pod(self, cookie, ip):
        self.local_pod_ip.pop(ip, None)
        self.pod_policy.pop(cookie, None)

    def pod_entries(self):
        return [(c, v[0]) for c, v in self.pod_policy.items()]


class FakeNetns:
    def __init__(self):
        self.by_ip: dict[str, list[Netns]] = {}
        self.refreshes = 0
        self.fail_with: Exception | None = None
        self.userns: dict[int, object] = {}     # cookie -> UsernsMaps, or an exception to raise

    def user_namespace_maps(self, ns):
        found = self.userns.get(ns.cookie)
        if isinstance(found, Exception):
            raise found
        return found     # None: the host's user namespace

    def add(self, ip, cookie):
        self.by_ip.setdefault(ip, []).append(Netns(cookie, f"/run/netns/{cookie}", cookie, {ip}))

    def refresh(self, reread=True):
        self.refreshes += 1
        if self.fail_with is not None:
            raise self.fail_with

    def owners(self, ip):
        return list(self.by_ip.get(ip, []))


class DictMap:
    """A BPF hash map as a dict of bytes, with bpf_syscall.Map's interface
    (lookup, update, delete, items, keys) and its ctypes key and value types."""

    def __init__(self, key_type, value_type, name="map"):
        self.key_type, self.value_type, self.name = key_type, value_type, name
        self.data: dict[bytes, bytes] = {}
        # Fault injection: the next `fail_writes` updates or deletes raise `fault`
        # (as the kernel's E2BIG of a full map would), then writes work again.
        self.fail_writes = 0
        self.fault = OSError(7, "Argument list too long")

    def _maybe_fail(self):
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise self.fault

    def _key(self, key):
        return bytes(key if isinstance(key, self.key_type) else self.key_type(key))

    def lookup(self, key):
        v = self.data.get(self._key(key))
        return None if v is None else self.value_type.from_buffer_copy(v)

    def update(self, key, value, flags=0):
        self._maybe_fail()
        v = value if isinstance(value, self.value_type) else self.value_type(value)
        self.data[self._key(key)] = bytes(v)

    def delete(self, key):
        self._maybe_fail()
        return self.data.pop(self._key(key), None) is not None

    def keys(self):
        for k in list(self.data):
            yield self.key_type.from_buffer_copy(k)

    def items(self):
        for k, v in list(self.data.items()):
            yield self.key_type.from_buffer_copy(k), self.value_type.from_buffer_copy(v)


class DictMaps(dict):
    """Datapath.bpf for tests: the pod maps of layout.MAPS as DictMaps."""

    def __init__(self):
        from merbridge_py import layout
        super().__init__({name: DictMap(*types, name=name) for name, types in layout.MAPS.items()
                          if name in ("pod_policy", "local_pod_ip", "dns_policy")})
        self.sockhash_fd = -1


def dict_datapath():
    """The real merbridge_py.datapath.Datapath (its set_pod, remove_pod and
    audit methods) over dict maps: no kernel, no compiler."""
    from pathlib import Path

    from merbridge_py.datapath import Datapath
    from merbridge_py.mesh import ISTIO
    dp = Datapath(ISTIO, Path("/nonexistent-cgroup"), Path("/nonexistent-bpffs"))
    dp.bpf = DictMaps()
    return dp


def kernel_view(dp):
    """What a dict datapath's maps hold, read from the dicts themselves (not
    through the code under test): (local_pod_ip as IP -> cookie, pod_policy as
    cookie -> pod IP, the cookies with a dns_policy entry)."""
    import socket
    ips = {k.text(): int(v.value) for k, v in dp.bpf["local_pod_ip"].items()}
    policies = {int(k.value): socket.inet_ntoa(int(v.pod_ip).to_bytes(4, "little"))
                for k, v in dp.bpf["pod_policy"].items()}
    return ips, policies, {int(k.value) for k in dp.bpf["dns_policy"].keys()}
