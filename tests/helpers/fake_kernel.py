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
