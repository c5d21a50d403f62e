"""The few bpf(2) commands the agent needs on objects that are already loaded
and pinned: open a pin, read and write map entries, attach, detach and query
programs. Plain ctypes on libc's syscall(), so the long-running agent never
maps bcc's LLVM (merbridge_py/loader.py compiles in a child process instead).

No maintained pure-Python binding of bpf(2) was on PyPI when this was written
(bpfmaps: maps only, last release 2022; pylibbpf: a 0.0.x binding of libbpf);
the commands below are a small, stable part of the kernel's UAPI.
"""

from __future__ import annotations

import ctypes as ct
import enum
import errno
import os
import platform
from functools import lru_cache
from pathlib import Path

_NR_BPF = {"x86_64": 321, "aarch64": 280}

_libc = ct.CDLL(None, use_errno=True)


class Cmd(enum.IntEnum):
    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_GET_FD_BY_ID = 13
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    RAW_TRACEPOINT_OPEN = 17     # raw tracepoints, and fentry/fexit programs (datapath.READER_HOOKS)


class AttachType(enum.IntEnum):
    """enum bpf_attach_type (the ones merbridge-py uses)."""

    CGROUP_SOCK_OPS = 3
    SK_SKB_STREAM_VERDICT = 5       # only on kernels that need it (merbridge_py/kernel_probes.py)
    SK_MSG_VERDICT = 7
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_GETSOCKOPT = 21
    CGROUP_UDP4_SENDMSG = 14        # DNS capture (ebpf/dns_*.bpf.c)
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_UDP6_SENDMSG = 15        # DNS capture of v4-mapped servers (ebpf/dns_inet6.bpf.c)
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_INET6_GETPEERNAME = 30


class MapType(enum.IntEnum):
    HASH = 1
    ARRAY = 2
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    SOCKHASH = 18


PER_CPU_MAP_TYPES = (MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH)
BPF_F_ALLOW_MULTI = 2   # share a cgroup hook with other tools' programs (Cilium, ...)
BPF_ANY = 0
BPF_EXIST = 2           # update only an entry that is still there


# --- attr layouts (union bpf_attr, one struct per command group) -------------------

class _ElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


class _AttachAttr(ct.Structure):
    _fields_ = [("target_fd", ct.c_uint32), ("attach_bpf_fd", ct.c_uint32), ("attach_type", ct.c_uint32),
                ("attach_flags", ct.c_uint32), ("replace_bpf_fd", ct.c_uint32)]


class _QueryAttr(ct.Structure):
    _fields_ = [("target_fd", ct.c_uint32), ("attach_type", ct.c_uint32), ("query_flags", ct.c_uint32),
                ("attach_flags", ct.c_uint32), ("prog_ids", ct.c_uint64), ("prog_cnt", ct.c_uint32),
                ("pad", ct.c_uint32)]


class _RawTracepointAttr(ct.Structure):
    _fields_ = [("name", ct.c_uint64), ("prog_fd", ct.c_uint32), ("pad", ct.c_uint32), ("cookie", ct.c_uint64)]


class _GetByIdAttr(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _MapCreateAttr(ct.Structure):
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32)]


class MapInfo(ct.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]


class BpfError(OSError):
    pass


def bpf(cmd: Cmd, attr: ct.Structure, what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    rc = _libc.syscall(ct.c_long(nr), ct.c_int(cmd), ct.byref(attr), ct.c_uint(ct.sizeof(attr)))
    if rc < 0:
        err = ct.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def _addr(obj) -> int:
    return ct.addressof(obj)


def _attach_name(attach_type: int) -> str:
    try:
        return AttachType(attach_type).name
    except ValueError:
        return f"attach type {attach_type}"


# --- pins and programs ---------------------------------------------------------------

def obj_get(path: Path | str) -> int:
    name = ct.create_string_buffer(str(path).encode())
    return bpf(Cmd.OBJ_GET, _ObjAttr(pathname=_addr(name)), f"opening pinned object {path}")


def obj_pin(fd: int, path: Path | str) -> None:
    name = ct.create_string_buffer(str(path).encode())
    bpf(Cmd.OBJ_PIN, _ObjAttr(pathname=_addr(name), bpf_fd=fd), f"pinning {path}")


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    bpf(Cmd.PROG_ATTACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                                     attach_flags=flags), f"attaching a program ({_attach_name(attach_type)})")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(Cmd.PROG_DETACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type),
        f"detaching a program ({_attach_name(attach_type)})")


def prog_query(target_fd: int, attach_type: int, capacity: int = 64) -> list[int]:
    """IDs of the programs attached directly to `target_fd` for `attach_type`."""
    ids = (ct.c_uint32 * capacity)()
    attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=capacity)
    bpf(Cmd.PROG_QUERY, attr, f"querying attached programs ({_attach_name(attach_type)})")
    return list(ids[: attr.prog_cnt])


def tracing_attach(prog_fd: int, what: str, tracepoint: str | None = None) -> int:
    """Attach a loaded fentry/fexit program to the kernel function it was
    loaded for, or a raw tracepoint program to `tracepoint`; returns the
    link's fd, which holds the attachment: closing it (or the process ending)
    detaches the program."""
    name = ct.create_string_buffer(tracepoint.encode()) if tracepoint else None
    attr = _RawTracepointAttr(name=_addr(name) if name is not None else 0, prog_fd=prog_fd)
    return bpf(Cmd.RAW_TRACEPOINT_OPEN, attr, f"attaching {what}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return bpf(Cmd.PROG_GET_FD_BY_ID, _GetByIdAttr(id=prog_id), f"opening program {prog_id}")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    bpf(Cmd.OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=_addr(info)),
        "reading map info")
    return info


class _ProgInfoHead(ct.Structure):
    """The head of struct bpf_prog_info: the kernel fills what fits in info_len."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8)]


def prog_id(fd: int) -> int:
    """The kernel's id of a loaded program (what prog_query lists)."""
    info = _ProgInfoHead()
    bpf(Cmd.OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=_addr(info)),
        "reading program info")
    return info.id


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    return bpf(Cmd.MAP_CREATE, _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                                              max_entries=max_entries), "creating a map")


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """How many value slots a per-CPU map returns: one per possible CPU
    (the kernel's num_possible_cpus(), the weight of this mask)."""
    return cpu_list_length(Path("/sys/devices/system/cpu/possible").read_text())


def cpu_list_length(text: str) -> int:
    """How many CPUs a kernel CPU list names: "0-3,8" -> 5."""
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


# --- maps ------------------------------------------------------------------------

class Map:
    """One map opened from its pin, with keys and values as ctypes types (the
    structs of merbridge_py/layout.py). A per-CPU map reads as a list with
    one value per possible CPU."""

    def __init__(self, fd: int, key_type, value_type, name: str = "map"):
        self.fd, self.key_type, self.value_type, self.name = fd, key_type, value_type, name
        info = map_info(fd)
        self.map_type = info.type
        self.per_cpu = info.type in PER_CPU_MAP_TYPES
        if info.key_size != ct.sizeof(key_type) or info.value_size != ct.sizeof(value_type):
            raise BpfError(errno.EINVAL, f"map {name}: kernel has key/value sizes {info.key_size}/{info.value_size}, "
                                         f"expected {ct.sizeof(key_type)}/{ct.sizeof(value_type)}")
        self._slot = (ct.sizeof(value_type) + 7) // 8 * 8   # per-CPU values are 8-byte aligned
        self._n_values = possible_cpus() if self.per_cpu else 1

    @classmethod
    def open(cls, path: Path, key_type, value_type) -> "Map":
        fd = obj_get(path)
        try:
            return cls(fd, key_type, value_type, path.name)
        except BaseException:
            os.close(fd)
            raise

    def _key(self, key):
        return key if isinstance(key, self.key_type) else self.key_type(key)

    def lookup(self, key):
        """The value (a list of per-CPU values for a per-CPU map), or None."""
        k = self._key(key)
        buf = ct.create_string_buffer(self._slot * self._n_values)
        try:
            bpf(Cmd.MAP_LOOKUP_ELEM, _ElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(buf)),
                f"looking up in {self.name}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        values = [self.value_type.from_buffer_copy(buf, i * self._slot) for i in range(self._n_values)]
        return values if self.per_cpu else values[0]

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        if self.per_cpu:
            raise BpfError(errno.EINVAL, f"{self.name}: writing per-CPU maps is not supported here")
        k = self._key(key)
        v = value if isinstance(value, self.value_type) else self.value_type(value)
        bpf(Cmd.MAP_UPDATE_ELEM, _ElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(v), flags=flags),
            f"updating {self.name}")

    def delete(self, key) -> bool:
        """False when the key was not there."""
        k = self._key(key)
        try:
            bpf(Cmd.MAP_DELETE_ELEM, _ElemAttr(map_fd=self.fd, key=_addr(k)), f"deleting from {self.name}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self):
        yield from iter_keys(self.fd, self.key_type, self.name)

    def items(self):
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:   # deleted meanwhile
                yield k, v

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def iter_keys(fd: int, key_type, name: str = "map"):
    """Every key, by BPF_MAP_GET_NEXT_KEY (also for maps whose values user
    space cannot read, such as a sockhash)."""
    key, next_key = key_type(), key_type()
    attr = _ElemAttr(map_fd=fd, key=0, value=_addr(next_key))
    while True:
        try:
            bpf(Cmd.MAP_GET_NEXT_KEY, attr, f"listing {name}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        ct.memmove(ct.addressof(key), ct.addressof(next_key), ct.sizeof(key_type))
        attr.key = _addr(key)
        yield key_type.from_buffer_copy(key)
