"""Compile and load the eBPF programs with bcc, pin them, and exit.

The agent runs this as a short-lived child (`python -m merbridge_py.loader`)
so that bcc and the LLVM it maps (about 140 MB of RSS) never live in the
long-running agent process. bcc creates the maps pinned under --maps-dir, or
reuses a predecessor's it finds there (see merbridge.h). Each program is
pinned as --pin-dir/<function>; the agent opens those pins, removes them and
does all attaching itself, through bpf(2) (merbridge_py/bpf_syscall.py).
Nothing is attached here: a loader that dies leaves no program running.

On success one JSON line goes to stdout: the headers used, the programs
pinned, how long compiling took, the CPU time this process used (its whole
life), its peak RSS (with its anonymous and file-backed parts at the end).
On failure a one-line error goes to stderr (after whatever clang or the
verifier printed) and the exit status is 1, with no program pin left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def compile_programs(maps_dir: Path, cflags: list[str]):
    """The bcc module with every hook's program loaded (not attached). Also
    what tests/test_layout.py compares layout.py against."""
    from bcc import BPF, BPFAttachType, BPFProgType

    from .datapath import HOOKS, program_text
    bpf = BPF(text=program_text().encode(), cflags=list(cflags) + [f'-DMB_MAPS_DIR="{maps_dir}"'])
    try:
        fns = {hook.function: bpf.load_func(hook.function.encode(), getattr(BPFProgType, hook.prog_type),
                                            attach_type=getattr(BPFAttachType, hook.attach_type))
               for hook in HOOKS}
    except BaseException:
        bpf.cleanup()
        raise
    return bpf, fns


TRACING_REFUSED = "EPERM"


class _BtfType(ct.Structure):
    _fields_ = [("name_off", ct.c_uint32), ("info", ct.c_uint32), ("type", ct.c_uint32)]


class _BtfMember(ct.Structure):   # follows a struct's _BtfType, vlen times
    _fields_ = [("name_off", ct.c_uint32), ("type", ct.c_uint32), ("offset", ct.c_uint32)]


BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_FUNC = 12


@contextlib.contextmanager
def _vmlinux_btf():
    """The running kernel's BTF through libbpf (which bcc loads anyway), and
    the libbpf functions that read it."""
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.btf__load_vmlinux_btf.restype = ct.c_void_p
    lib.btf__find_by_name_kind.argtypes = [ct.c_void_p, ct.c_char_p, ct.c_uint32]
    lib.btf__find_by_name_kind.restype = ct.c_int
    lib.btf__type_by_id.argtypes = [ct.c_void_p, ct.c_uint32]
    lib.btf__type_by_id.restype = ct.POINTER(_BtfType)
    lib.btf__name_by_offset.argtypes = [ct.c_void_p, ct.c_uint32]
    lib.btf__name_by_offset.restype = ct.c_char_p
    lib.btf__free.argtypes = [ct.c_void_p]
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        raise RuntimeError(f"this kernel has no readable BTF (/sys/kernel/btf/vmlinux): "
                           f"{os.strerror(ct.get_errno())}")
    try:
        yield lib, btf
    finally:
        lib.btf__free(btf)


def kernel_function_arguments(names: tuple[str, ...]) -> int:
    """How many arguments these kernel functions take, from the running
    kernel's BTF. An fexit program finds the return value after the
    arguments, and recvmsg handlers lost their last one (addr_len) in 6.18;
    they must all agree."""
    counts = {}
    with _vmlinux_btf() as (lib, btf):
        for name in names:
            func_id = lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC)
            if func_id < 0:
                raise RuntimeError(f"{name} is not in this kernel's BTF")
            proto = lib.btf__type_by_id(btf, lib.btf__type_by_id(btf, func_id).contents.type)
            counts[name] = proto.contents.info & 0xffff   # vlen: the number of parameters
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the recvmsg handlers take different arguments here: {counts}")
    return next(iter(counts.values()))


def kernel_struct_member_offset(struct: str, member: str) -> int:
    """The byte offset of a non-bitfield member of a kernel struct (also one
    inside the struct's anonymous unions and structs), from the running
    kernel's BTF: struct sock's layout depends on the kernel's
    configuration, so no fixed offset serves every kernel."""
    with _vmlinux_btf() as (lib, btf):
        struct_id = lib.btf__find_by_name_kind(btf, struct.encode(), BTF_KIND_STRUCT)
        if struct_id < 0:
            raise RuntimeError(f"struct {struct} is not in this kernel's BTF")
        bits = _member_bit_offset(lib, btf, struct_id, member.encode())
    if bits is None:
        raise RuntimeError(f"struct {struct} has no member {member} in this kernel's BTF")
    if bits < 0 or bits % 8:
        raise RuntimeError(f"{struct}.{member} is a bitfield in this kernel's BTF")
    return bits // 8


def _member_bit_offset(lib, btf, type_id: int, member: bytes) -> int | None:
    """`member`'s offset in bits in struct or union `type_id`, looking into
    anonymous members; -1 for a bitfield, None where there is no such member."""
    t = lib.btf__type_by_id(btf, type_id).contents
    vlen, kind, kflag = t.info & 0xffff, (t.info >> 24) & 0x1f, t.info >> 31
    if kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
        return None
    members = ct.cast(ct.addressof(t) + ct.sizeof(_BtfType), ct.POINTER(_BtfMember))
    for i in range(vlen):
        m = members[i]
        offset = m.offset & 0xffffff if kflag else m.offset
        if kflag and m.offset >> 24:
            offset = -1   # a bitfield: its size is in the top 8 bits
        if m.name_off == 0:   # an anonymous struct or union: its members are the parent's
            inner = _member_bit_offset(lib, btf, m.type, member)
            if inner is not None:
                return -1 if inner < 0 or offset < 0 else offset + inner
        elif lib.btf__name_by_offset(btf, m.name_off) == member:
            return offset
    return None


def compile_reader_hook(hook, maps_dir: Path, cflags: list[str]):
    """One of backpressure's reader hooks (datapath.READER_HOOKS), compiled
    as its own module on the maps the first one pinned. bcc attaches
    kretfunc__ and raw_tracepoint__ programs as it loads them (a tracepoint
    the kernel lacks fails here); that attachment ends with this process (the
    agent makes its own)."""
    from bcc import BPF

    from .datapath import READER_PROGRESS_HEADER, program_text
    defines = [f'-DMB_MAPS_DIR="{maps_dir}"']
    if hook.prog_type == "TRACING":
        functions = tuple(name.removeprefix("kretfunc__") for name in hook.programs)
        defines.append(f"-DRECVMSG_ARGUMENTS={kernel_function_arguments(functions)}")
    if hook.tracepoint:   # its pre-filter reads the socket's psock pointer (sock_recv_length.bpf.c)
        defines.append(f"-DSK_USER_DATA_OFFSET={kernel_struct_member_offset('sock', 'sk_user_data')}")
    bpf = BPF(text=program_text(sources=(READER_PROGRESS_HEADER, hook.source)).encode(),
              cflags=list(cflags) + defines)
    try:
        fns = {name: bpf.load_func(name.encode(), getattr(BPF, hook.prog_type)) for name in hook.programs}
    except BaseException:
        bpf.cleanup()
        raise
    return bpf, fns


def _refusal(hook, e: Exception) -> str:
    """One line on why a reader hook did not load."""
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if reason == "Need super-user privileges to run":   # bcc's words for EPERM, misleading as root
        reason = (f"the kernel refused to load it ({TRACING_REFUSED}: kernel lockdown or a security "
                  "module forbids such programs here)")
    return f"{hook.kind}: {reason}"


def load_and_pin(maps_dir: Path, pin_dir: Path, cflags: list[str], reader_hook: bool = True) -> dict:
    """`reader_hook`: False where nothing would use a reader hook (the node
    never splices, or has no backlog limit: datapath.why_no_reader_hook); each one costs a
    compile (20-45 s in the kernel matrix's emulated VMs)."""
    from . import kheaders
    from .datapath import READER_HOOKS, obj_pin
    headers = kheaders.find()
    headers.apply()
    started = time.monotonic()
    bpf, fns = compile_programs(maps_dir, cflags)
    tracing, tracing_error = None, None
    tracing_programs, reader_tracing, refusals = [], None, []
    try:
        pin_dir.mkdir(parents=True, exist_ok=False)
        for name, fn in fns.items():
            obj_pin(fn.fd, pin_dir / name)
        # Optional: without a reader hook the datapath still works (datapath.READER_HOOKS).
        # The first hook the kernel takes is pinned, never two (a read would count twice).
        for hook in READER_HOOKS if reader_hook else ():
            try:
                tracing, tracing_fns = compile_reader_hook(hook, maps_dir, cflags)
            except Exception as e:  # noqa: BLE001 - bcc raises bare Exceptions; the reason goes to the agent
                refusals.append(_refusal(hook, e))
                continue
            for name, fn in tracing_fns.items():
                obj_pin(fn.fd, pin_dir / name)
            tracing_programs, reader_tracing = sorted(tracing_fns), hook.kind
            break
        else:
            if reader_hook:
                tracing_error = "; ".join(refusals)
    finally:
        bpf.cleanup()   # closes our fds; the pins keep programs and maps alive
        if tracing is not None:
            tracing.cleanup()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"headers": headers.description, "programs": sorted(fns), "seconds": round(time.monotonic() - started, 3),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3), "peak_rss_kb": usage.ru_maxrss,
              **_rss_split()}
    result["tracing_programs"] = tracing_programs
    if not reader_hook:
        result["reader_hook_skipped"] = True   # not needed (datapath.why_no_reader_hook)
    if reader_tracing:
        result["reader_tracing"] = reader_tracing
    if refusals:
        result["reader_hooks_refused"] = refusals   # also those refused before the one that loaded
    if tracing_error:
        result["tracing_error"] = tracing_error
    return result


def _rss_split() -> dict:
    """Anonymous vs file-backed (mostly LLVM's library) resident memory, at
    the end, when it is near its peak: only the anonymous part is memory a
    memory limit cannot reclaim."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[f"{key[3:].lower()}_rss_kb"] = int(value.split()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merbridge_py.loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps-dir", type=Path, required=True, help="bpffs directory of the pinned maps")
    parser.add_argument("--pin-dir", type=Path, required=True,
                        help="bpffs directory to create for the program pins (must not exist)")
    parser.add_argument("--no-reader-hook", action="store_true",
                        help="do not compile backpressure's reader hook (not needed: the node never splices, "
                             "or has no backlog limit)")
    parser.add_argument("cflags", nargs="*", help="-D defines for the compiler (after --)")
    args = parser.parse_args(argv)
    try:
        result = load_and_pin(args.maps_dir, args.pin_dir, args.cflags, reader_hook=not args.no_reader_hook)
    except Exception as e:  # noqa: BLE001 - bcc raises bare Exceptions; every failure is one line for the agent
        if args.pin_dir.exists():
            shutil.rmtree(args.pin_dir, ignore_errors=True)
        print(f"error: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
