"""Issue 20, coexistence with another sockmap user: a socket carries one sk_msg
program, so when another tool's sockhash holds a socket first (Envoy's
sockmap socket interface puts both ends of its connections into one;
OpenTelemetry's eBPF instrumentation every outgoing socket), our sockops
insert fails with -EBUSY. Such a connection must keep working through TCP,
unspliced, and the agent must count it (merbridge_splice_skipped_total
{reason="busy"}).

The other tool here is a tiny independent sockops + sk_msg pair compiled with
bcc: its own sockhash, its sk_msg program attached to it, its sockops program
attached with BPF_F_ALLOW_MULTI to each pod's cgroup. The agent attaches to
the node's cgroup, the pods' parent; the kernel runs a cgroup's own programs
before its ancestors' (kernel/bpf/cgroup.c, compute_effective_progs, without
BPF_F_PREORDER), so the other tool inserts first, whenever either was
attached. The test checks that it did: the other tool counts its own inserts
and its failed ones (there are none: had ours come first, its insert would
have been the one refused).

Topology: one node, pods a and b, Envoy sidecars with mTLS, ebpf mode. Traffic
a -> b, same node: HTTP over one keep-alive connection and over new
connections, and order_load connections whose every byte the server checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from merbridge_py import bpf_syscall
from merbridge_py.datapath import open_cgroup
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

ORDER_PORT = 9300        # not declared on the pods: Envoy carries it as plain TCP (PassthroughCluster)
ORDER_CONNECTIONS = 60
HTTP_KEEPALIVE = 20
HTTP_NEW = 5

# Which ends of a connection the other tool takes (its `take` slot).
TAKE_ACTIVE = 1          # the connecting end, as OpenTelemetry's eBPF instrumentation
TAKE_PASSIVE = 2         # the accepted end
TAKE_BOTH = TAKE_ACTIVE | TAKE_PASSIVE   # as a proxy putting its connections into its own sockmap

# The other tool's counters (slots of other_state).
INSERTED, INSERT_FAILED, MESSAGES, TAKE = range(4)

OTHER_TOOL = r"""
#include <uapi/linux/bpf.h>
#include <linux/socket.h>

enum { INSERTED = 0, INSERT_FAILED, MESSAGES, TAKE, SLOTS };

BPF_SOCKHASH(other_socks, u64, 65536);
BPF_ARRAY(other_state, u64, SLOTS);

static u64 (*cookie64)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline void bump(int slot)
{
    u64 *value = other_state.lookup(&slot);
    if (value)
        __sync_fetch_and_add(value, 1);
}

int other_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET && skops->family != AF_INET6)
        return 1;
    int take_slot = TAKE;
    u64 *take = other_state.lookup(&take_slot);
    if (!take)
        return 1;
    u64 end = skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ? 1 :
              skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB ? 2 : 0;
    if (!(end & *take))
        return 1;
    u64 key = cookie64(skops);
    long err = other_socks.sock_hash_update(skops, &key, BPF_NOEXIST);
    bump(err == 0 ? INSERTED : INSERT_FAILED);
    return 1;
}

int other_sk_msg(struct sk_msg_md *msg)
{
    bump(MESSAGES);
    return SK_PASS;
}
"""


class OtherSockmapUser:
    """The other tool: compiled, its sk_msg program on its sockhash, its
    sockops program on `cgroups`. close() takes everything off again."""

    def __init__(self, cgroups: list[Path], take: int):
        from bcc import BPF, libbcc

        from merbridge_py import kheaders
        kheaders.find().apply()
        self.bpf = BPF(text=OTHER_TOOL.encode())
        self.attached: list[tuple[int, int, int]] = []   # (target fd, program fd, attach type), in order
        self.cgroup_fds: list[int] = []
        try:
            self.state = self.bpf[b"other_state"]
            self.state[self.state.Key(TAKE)] = self.state.Leaf(take)
            sockops = self.bpf.load_func(b"other_sockops", BPF.SOCK_OPS)
            sk_msg = self.bpf.load_func(b"other_sk_msg", BPF.SK_MSG)
            self.sockops_id = bpf_syscall.prog_id(sockops.fd)
            sockhash_fd = libbcc.lib.bpf_table_fd(self.bpf.module, b"other_socks")
            # The sk_msg program first: a socket the sockops program inserts carries it from then on.
            self._attach(sockhash_fd, sk_msg.fd, bpf_syscall.AttachType.SK_MSG_VERDICT, 0)
            for cgroup in cgroups:
                self.cgroup_fds.append(open_cgroup(cgroup))
                self._attach(self.cgroup_fds[-1], sockops.fd, bpf_syscall.AttachType.CGROUP_SOCK_OPS,
                             bpf_syscall.BPF_F_ALLOW_MULTI)
        except BaseException:
            self.close()
            raise

    def _attach(self, target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
        bpf_syscall.prog_attach(target_fd, prog_fd, attach_type, flags)
        self.attached.append((target_fd, prog_fd, attach_type))

    def counts(self) -> dict[str, int]:
        return {name: self.state[self.state.Key(slot)].value
                for name, slot in (("inserted", INSERTED), ("insert_failed", INSERT_FAILED),
                                   ("messages", MESSAGES))}

    def close(self) -> None:
        errors = []
        for target_fd, prog_fd, attach_type in reversed(self.attached):
            try:
                bpf_syscall.prog_detach(target_fd, prog_fd, attach_type)
            except OSError as e:
                errors.append(e)
        self.attached = []
        for fd in self.cgroup_fds:
            os.close(fd)
        self.cgroup_fds = []
        self.bpf.cleanup()
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def bed():
    name = f"cx{os.getpid() % 10000}{uuid.uuid4().hex[:3]}"
    with Testbed.up(name, nodes=1, pods=[PodSpec("a", node=0), PodSpec("b", node=0)], mode="ebpf") as tb:
        server = tb.exec("b", [sys.executable, "-m", "merbridge_py.testbed.order_load", "serve",
                               "--port", str(ORDER_PORT), "--workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout.readline().strip() == "ready", "order_load server in b did not start"
            yield tb
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


COUNTERS = {
    "busy": 'merbridge_splice_skipped_total{reason="busy"}',
    "inserts": "merbridge_sockhash_inserts_total",
    "spliced_messages": "merbridge_spliced_messages_total",
    "misses": "merbridge_splice_misses_total",
    "insert_errors": 'merbridge_datapath_errors_total{kind="sockhash_insert"}',
}


def agent_counters(tb: Testbed) -> dict[str, float]:
    metrics = tb.agent_metrics(tb.nodes[0])
    assert COUNTERS["busy"] in metrics, "the agent does not export the busy splice skips"
    return {name: metrics[key] for name, key in COUNTERS.items()}


def splice_off(tb: Testbed) -> bool:
    """The kernel probes turned splicing off: nothing is ever inserted (docs/kernel-behaviour.md)."""
    return tb.agent_metrics(tb.nodes[0]).get('merbridge_splice_mode{mode="off"}', 0) == 1


def traffic(tb: Testbed) -> None:
    """a -> b through both sidecars; fails on any failed request or wrong byte."""
    results = tb.requests("a", "b", count=HTTP_KEEPALIVE)
    results += tb.requests("a", "b", count=HTTP_NEW, new_connection=True)
    for r in results:
        assert r["error"] is None and r["status"] == 200, r
        assert r["body"]["pod"] == "b" and r["body"]["peer"].startswith("127.0.0.6:"), r
    (big,) = tb.requests("a", "b", path="/bytes?n=3000000", timeout=60)
    assert big["error"] is None and big["body"] == "<3000000 bytes>", big   # http.client checks the length
    done = tb.exec_in("a", [sys.executable, "-m", "merbridge_py.testbed.order_load", "send",
                            "--target", f"{tb.pod('b').ip}:{ORDER_PORT}", "--workers", "2",
                            "--connections", str(ORDER_CONNECTIONS)], timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sent = json.loads(done.stdout)
    assert sent["errors"] == 0, sent["error_examples"]
    assert (sent["ok"], sent["reordered"], sent["corrupted"], sent["short"]) == (ORDER_CONNECTIONS, 0, 0, 0), sent


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def test_the_same_traffic_is_spliced_without_another_sockmap_user(bed):
    """The baseline: what the other tool takes away below is there without it."""
    before = agent_counters(bed)
    traffic(bed)
    moved = delta(agent_counters(bed), before)
    print(f"\nwithout another sockmap user: {moved}")
    assert moved["busy"] == 0 and moved["insert_errors"] == 0, moved
    if splice_off(bed):
        assert moved["inserts"] == 0, moved
    else:
        assert moved["inserts"] > 0 and moved["spliced_messages"] > 0, moved


@pytest.mark.parametrize("take", [TAKE_BOTH, TAKE_ACTIVE], ids=["both-ends", "outgoing-only"])
def test_sockets_another_sockmap_user_holds_stay_on_tcp_and_are_counted(bed, take):
    pods = [bed.pod("a"), bed.pod("b")]
    other = OtherSockmapUser([Path(p.cgroup) for p in pods], take)
    try:
        # Attached on the pods' own cgroups, below the node's cgroup the agent attaches to.
        for pod in pods:
            fd = open_cgroup(Path(pod.cgroup))
            try:
                assert bpf_syscall.prog_query(fd, bpf_syscall.AttachType.CGROUP_SOCK_OPS) == [other.sockops_id]
            finally:
                os.close(fd)
        before = agent_counters(bed)
        traffic(bed)
        moved = delta(agent_counters(bed), before)
        theirs = other.counts()
    finally:
        other.close()
    print(f"\nanother sockmap user taking {'both ends' if take == TAKE_BOTH else 'outgoing sockets'}: "
          f"agent {moved}; other tool {theirs}")
    # The other tool inserted first, every time: had the agent's insert come first, its own would have failed.
    assert theirs["inserted"] > 0 and theirs["insert_failed"] == 0, theirs
    assert theirs["messages"] > 0, "the other tool's sk_msg program never ran on its sockets"
    assert moved["insert_errors"] == 0, moved
    # Nothing of ours redirected a message: every leg has one end in the other tool's sockhash.
    assert moved["spliced_messages"] == 0, moved
    if splice_off(bed):
        assert moved["busy"] == moved["inserts"] == 0, moved
        return
    # Every socket the agent tried and could not put into sock_pairs is one the other tool holds.
    assert 0 < moved["busy"] <= theirs["inserted"], (moved, theirs)
    # Both ends of every leg are the other tool's, or (outgoing only) the connecting end is (busy: one per leg
    # tried) and the server end follows its decision (ODST_SPLICED in the record; inbound_leg_spliced on the
    # sidecar -> app leg, whose app end joined on its own before, and then its first send missed): either way
    # none of ours joined and none of our redirects missed.
    assert moved["inserts"] == 0 and moved["misses"] == 0, moved
