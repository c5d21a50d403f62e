"""Find kernel headers bcc can compile against, and tell bcc where they are.

bcc looks in /lib/modules/$(uname -r)/build (+ .../source). Kernels without a
headers package (VMs, custom builds) have neither, but our programs only use
UAPI structs, so a nearby Debian headers tree works. Debian splits its headers
into an arch dir (`linux-headers-X-amd64`: generated files, .config) and a
`linux-headers-X-common` dir; bcc's BCC_KERNEL_SOURCE takes one directory, so
we present the pair as one merged tree of symlinks.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV_OVERRIDE = "MERBRIDGE_KERNEL_HEADERS"
# A second /usr/src-like directory searched last: the container image keeps its
# own Debian headers there, because the host's /usr/src mount hides the image's.
ENV_FALLBACK = "MERBRIDGE_KERNEL_HEADERS_FALLBACK"
MODULES_DIR = Path("/lib/modules")
SRC_DIR = Path("/usr/src")
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class HeadersNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class Headers:
    path: Path | None     # what BCC_KERNEL_SOURCE must point at; None: bcc's default finds them
    description: str

    def apply(self) -> None:
        if self.path is not None:
            os.environ["BCC_KERNEL_SOURCE"] = str(self.path)


def _usable(d: Path) -> bool:
    return (d / "include" / "linux" / "kconfig.h").is_file() or (d / "include" / "generated").is_dir()


def _complete(d: Path) -> bool:
    # a tree bcc can use on its own: kconfig.h (common part) and generated/autoconf.h (arch part)
    return (d / "include" / "linux" / "kconfig.h").is_file() and (d / "include" / "generated" / "autoconf.h").is_file()


def _version_key(name: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def find(release: str | None = None, modules_dir: Path = MODULES_DIR, src_dir: Path = SRC_DIR,
         cache_dir: Path | None = None) -> Headers:
    release = release or platform.release()
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        d = Path(override)
        if not _complete(d):
            raise HeadersNotFound(f"{ENV_OVERRIDE}={override} is not a complete kernel headers tree "
                                  "(needs include/linux/kconfig.h and include/generated/autoconf.h)")
        return Headers(d, f"{d} (from {ENV_OVERRIDE})")

    build = modules_dir / release / "build"
    if build.is_dir() and (_complete(build) or (modules_dir / release / "source").is_dir()):
        return Headers(None, f"{build} (the running kernel's own)")

    exact = src_dir / f"linux-headers-{release}"
    if exact.is_dir() and _complete(exact):
        return Headers(exact, f"{exact} (the running kernel's own)")

    arch = _DEBIAN_ARCH.get(platform.machine(), platform.machine())
    search = [src_dir] + ([Path(os.environ[ENV_FALLBACK])] if os.environ.get(ENV_FALLBACK) else [])
    candidates = []
    for d in search:
        if d.is_dir():
            candidates += sorted((p for p in d.glob(f"linux-headers-*-{arch}") if p.is_dir()),
                                 key=lambda p: _version_key(p.name), reverse=True)
    for arch_dir in candidates:
        common = arch_dir.with_name(arch_dir.name[: -len(arch)] + "common")
        if _complete(arch_dir):
            return Headers(arch_dir, f"{arch_dir} (Debian headers, not the running kernel's {release})")
        if common.is_dir() and _usable(arch_dir):
            merged = merge_trees([arch_dir, common], (cache_dir or _default_cache()) / arch_dir.name)
            return Headers(merged, f"{arch_dir} + {common.name} (Debian headers, not the running kernel's "
                                   f"{release}; the programs only use UAPI structs)")

    raise HeadersNotFound(
        f"no kernel headers found for kernel {release}: looked in {build} and "
        f"{', '.join(str(d) + '/linux-headers-*' for d in search)}. "
        f"Fix: install linux-headers-{release}, or Debian's linux-headers-{arch} (any recent version works), "
        f"or set {ENV_OVERRIDE} to a headers tree")


def _default_cache() -> Path:
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    return base / "merbridge-py" / "kernel-headers"


def merge_trees(sources: list[Path], dest: Path) -> Path:
    """Make `dest` show the union of `sources` as symlinks; a directory present
    in several sources becomes a real directory merged recursively, so no
    source shadows another. Earlier sources win for files. Idempotent."""
    dest.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[Path]] = {}
    for src in sources:
        for entry in sorted(src.iterdir()):
            names.setdefault(entry.name, []).append(entry)
    for name, entries in names.items():
        target = dest / name
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) > 1:
            if target.is_symlink():
                target.unlink()
            merge_trees(dirs, target)
        elif not target.exists() and not target.is_symlink():
            target.symlink_to(entries[0])
    return dest
