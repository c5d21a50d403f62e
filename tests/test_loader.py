"""The agent keeps bcc and LLVM out of its own process: a loader child
compiles, loads and pins (merbridge_py/loader.py), the agent works on the
pins through bpf(2) (merbridge_py/bpf_syscall.py)."""

from __future__ import annotations

import ctypes as ct
import os
import shutil
from pathlib import Path

import pytest

from helpers.reader_hooks import tracepoint_exists
from merbridge_py import bpf_syscall, layout, loader
from merbridge_py.datapath import (BACKLOG_BYTES, BACKLOG_BYTES_ENV, BACKLOG_FALLBACK_ENV, FALLBACK_BULK_BYTES, HOOKS,
                                   READER_HOOKS, Datapath, DatapathError, run_loader)
from merbridge_py.kernel_probes import SPLICE_OFF, SPLICE_SK_MSG, KernelBehaviour
from merbridge_py.mesh import ISTIO

LLVM_MARKERS = ("libbcc", "libLLVM", "libclang")


def test_cpu_list_length():
    assert bpf_syscall.cpu_list_length("0\n") == 1
    assert bpf_syscall.cpu_list_length("0-3\n") == 4
    assert bpf_syscall.cpu_list_length("0-3,8,10-11") == 7


def test_struct_member_offsets_from_the_kernels_btf():
    """The reader hooks read a socket's head at the offsets
    ebpf/reader_progress.h declares (checked there against four kernels'
    BTF) and, in the tracepoint, sk_user_data at the offset the loader reads
    from BTF: both must agree with the running kernel, the kernel matrix runs
    this on 6.1 and 6.12."""
    head = {"skc_daddr": 0, "skc_rcv_saddr": 4, "skc_dport": 12, "skc_num": 14, "skc_family": 16,
            "skc_v6_daddr": 56, "skc_v6_rcv_saddr": 72}
    assert {name: loader.kernel_struct_member_offset("sock_common", name) for name in head} == head
    # struct sock begins with its sock_common; sk_user_data lies well past it
    assert loader.kernel_struct_member_offset("sock", "__sk_common") == 0
    assert loader.kernel_struct_member_offset("sock", "sk_user_data") > 72


def test_struct_member_offset_says_what_is_missing():
    with pytest.raises(RuntimeError, match="struct sock has no member sk_no_such_member"):
        loader.kernel_struct_member_offset("sock", "sk_no_such_member")
    with pytest.raises(RuntimeError, match="struct no_such_struct_mbp is not in this kernel's BTF"):
        loader.kernel_struct_member_offset("no_such_struct_mbp", "x")
    with pytest.raises(RuntimeError, match="bitfield"):   # sk_kern_sock: a 1-bit field (6.1 to 6.18)
        loader.kernel_struct_member_offset("sock", "sk_kern_sock")


@pytest.fixture
def bpffs():
    d = Path(f"/sys/fs/bpf/mbp-loadertest{os.getpid()}")
    yield d
    if d.exists():
        shutil.rmtree(d)
        pytest.fail(f"{d} was left behind")


@pytest.mark.bpf
def test_datapath_state_through_bpf_syscalls(bpffs):
    """Everything the agent reads and writes, on maps a loader child made; a
    load that never attached leaves nothing behind."""
    dp = Datapath(ISTIO, Path("/nonexistent"), bpffs)
    dp.load()
    try:
        assert not (bpffs / "loading").exists(), "the loader's program pins must be gone once opened"
        assert dp.loader_result["programs"] == sorted(h.function for h in HOOKS)
        config = dp.bpf["config"].lookup(0)
        assert config.splice == layout.SplicePolicy.ADAPTIVE
        # backpressure's limits; where this kernel refuses the fexit programs, the fallback's: the
        # default (budget) keeps them, the opt-in (bulk) drops the limit for a lower bulk threshold
        bulk_fallback = dp.tracing_error and os.environ.get(BACKLOG_FALLBACK_ENV) == "bulk"
        assert (config.backlog_bytes, config.bulk_bytes) == \
            ((0, FALLBACK_BULK_BYTES) if bulk_fallback else (BACKLOG_BYTES, 64 << 20)), dp.tracing_error
        assert sorted(dp.tracing_progs) == dp.loader_result["tracing_programs"]
        assert (dp.tracing_error is None) == (dp.loader_result["tracing_programs"] in
                                              [sorted(hook.programs) for hook in READER_HOOKS]), dp.loader_result
        dp.set_pod(0x1234_5678_9abc, "10.9.8.7", [], [])
        assert dp.pod_entries() == [(0x1234_5678_9abc, "10.9.8.7")]
        assert dp.map_sizes() == {"pod_policy": 1, "local_pod_ip": 1, "connect_original_dst": 0,
                                  "original_dst": 0, "sock_pairs": 0}
        counters = dp.bpf["counters"].lookup(0)
        assert len(counters) == bpf_syscall.possible_cpus()
        assert set(dp.counters()) == {c.name.lower() for c in layout.Counter}
        dp.remove_pod(0x1234_5678_9abc, "10.9.8.7")
        dp.remove_pod(0x1234_5678_9abc, "10.9.8.7")   # gone already: not an error
        assert dp.pod_entries() == []
        with pytest.raises(OSError, match="key/value sizes"):
            bpf_syscall.Map.open(dp.maps_dir / "config", ct.c_uint32, ct.c_uint64)
    finally:
        dp.close()
    assert not bpffs.exists(), "a load that never attached must not leave the maps it created"


@pytest.mark.bpf
@pytest.mark.parametrize("splice_mode,backlog,why", [
    (SPLICE_OFF, "", "this node does not splice (the kernel probes turned splicing off)"),
    (SPLICE_SK_MSG, "0", "no backlog limit (MERBRIDGE_BACKLOG_BYTES=0)"),
])
def test_no_reader_hook_is_compiled_where_none_is_needed(bpffs, monkeypatch, splice_mode, backlog, why):
    """Splicing off (the kernel probes on 6.1, or --splice never): no reader
    hook could ever attach; no backlog limit: nothing would read its counts.
    Either way the loader does not spend a compile on one."""
    monkeypatch.setenv(BACKLOG_BYTES_ENV, backlog)
    dp = Datapath(ISTIO, Path("/nonexistent"), bpffs, kernel=KernelBehaviour([], splice_mode, "as the test says"))
    dp.load()
    try:
        assert dp.loader_result["tracing_programs"] == [] and dp.loader_result["reader_hook_skipped"]
        assert "tracing_error" not in dp.loader_result and dp.tracing_error is None and not dp.tracing_progs
        assert dp.backlog_tracing == f"not needed: {why}"
    finally:
        dp.close()
    assert not bpffs.exists()


@pytest.mark.bpf
def test_a_successor_counts_as_read_what_was_redirected_while_no_agent_ran(bpffs):
    """No reader hook runs between two agents: a successor taking over the
    maps credits those reads, so no spliced socket goes to TCP early."""
    off = KernelBehaviour([], SPLICE_OFF, "one compile each is enough here")
    first = Datapath(ISTIO, Path("/nonexistent"), bpffs, kernel=off)
    first.load()
    try:
        behind = layout.SockTuple(layout.Addr.of("10.0.0.1"), layout.Addr.of("10.0.0.2"), 3, 4)
        ahead = layout.SockTuple(layout.Addr.of("10.0.0.5"), layout.Addr.of("10.0.0.6"), 7, 8)   # read TCP bytes too
        backlogs = first.bpf["peer_backlogs"]
        backlogs.update(behind, layout.PeerBacklog(redirected=5 << 20, consumed=1 << 20))
        backlogs.update(ahead, layout.PeerBacklog(redirected=10, consumed=20))
        successor = Datapath(ISTIO, Path("/nonexistent"), bpffs, kernel=off)
        successor.load()
        try:
            assert successor.adopted_maps
            read = {(k.local_ip.text(), v.redirected, v.consumed) for k, v in successor.bpf["peer_backlogs"].items()}
            assert read == {("10.0.0.1", 5 << 20, 5 << 20), ("10.0.0.5", 10, 20)}, read
        finally:
            successor.close()
    finally:
        first.close()
    assert not bpffs.exists()


class _BrokenFlags(Datapath):
    def compile_flags(self) -> list[str]:
        return []   # merbridge.h refuses to compile without the mesh's constants


@pytest.mark.bpf
def test_a_failed_compile_is_one_line_and_leaves_nothing(bpffs):
    dp = _BrokenFlags(ISTIO, Path("/nonexistent"), bpffs)
    with pytest.raises(DatapathError) as e:
        dp.load()
    assert str(e.value).startswith("compiling or loading the eBPF programs failed: ")
    assert "\n" not in str(e.value)
    assert dp.bpf is None and not bpffs.exists()


@pytest.mark.bpf
def test_loader_reports_its_peak_and_cleans_its_pins_on_failure(bpffs):
    bpffs.mkdir()
    try:
        with pytest.raises(DatapathError):
            run_loader(bpffs / "maps", bpffs / "loading", ["-DNOT_A_MESH=1"])
        assert not (bpffs / "loading").exists()
        (bpffs / "maps").mkdir(exist_ok=True)   # bcc may have made it before the compile failed
        report = run_loader(bpffs / "maps", bpffs / "loading", ISTIO.cflags())
        tracing = report["tracing_programs"]   # one reader hook's programs, or none (tracing_error says why)
        assert bool(tracing) != bool(report.get("tracing_error")), report
        if tracepoint_exists("sock_recv_length"):   # 6.4+: the tracepoint loads where fexit is refused
            assert tracing, report
        assert sorted(p.name for p in (bpffs / "loading").iterdir()) == sorted(report["programs"] + tracing)
        assert report["peak_rss_kb"] > 0 and report["elapsed"] >= report["seconds"]
    finally:
        shutil.rmtree(bpffs)


@pytest.mark.bpf
@pytest.mark.slow
def test_the_agent_process_never_maps_bcc_or_llvm():
    """On a small test bed: the running agent serves meshed traffic, and
    neither bcc nor LLVM is mapped into its process."""
    from merbridge_py.testbed import PodSpec, Testbed
    name = f"ldr{os.getpid()}"
    with Testbed.up(name, nodes=1, pods=[PodSpec("a"), PodSpec("b")], mode="ebpf") as tb:
        agent = next(r for r in tb.processes if r.role == "agent")
        assert [r["error"] for r in tb.requests("a", "b", count=5) if r["error"]] == []
        assert tb.agent_metrics("node0")['merbridge_redirects_total{direction="outbound"}'] > 0
        mapped = Path(f"/proc/{agent.pid}/maps").read_text()
        assert agent.alive()
        found = sorted({line.split()[-1] for line in mapped.splitlines() if any(m in line for m in LLVM_MARKERS)})
        assert found == [], f"the agent maps {found}"
        assert not (Path(tb.node("node0").bpffs) / "loading").exists()
