"""The guest's initramfs: busybox, the modules a Debian kernel needs to reach
the host's root over 9p, and an init that runs one command.

The guest sees the host's / read-only (QEMU's virtfs, tag `hostroot`) with a
tmpfs overlay on top, so it runs the host's venv, bcc, Envoy and tests as they
are while nothing it writes reaches the host. The guest kernel's own modules
(unpacked from its Debian package into the cache, which the guest reads over
9p too) are bound at /lib/modules/RELEASE so that iptables and friends can load
netfilter modules on demand.
"""

from __future__ import annotations

import lzma
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")          # Debian's busybox-static: no shared libraries needed
VIRTFS_TAG = "hostroot"
STATUS_MARK = "MERBRIDGE-VM-EXIT-STATUS"  # the console line the host reads the command's exit status from
# What the init needs as modules; each is skipped where the kernel has it built in.
NEEDED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

INIT_TEMPLATE = r"""#!/bin/busybox sh
# merbridge-py kernel matrix: mount the host's root read-only with a tmpfs
# overlay, run one command in it, print its exit status, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
  insmod "/modules/$m" || echo "merbridge-vm: insmod $m failed"
done
mkdir -p /lower /rw /root
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose {tag} /lower || echo "merbridge-vm: 9p mount failed"
mount -t tmpfs -o size=75% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /root || echo "merbridge-vm: overlay mount failed"
# The guest kernel's own modules, unpacked from its package on the host.
mkdir -p /root/lib/modules/{release}
mount --bind /lower{modules_dir} /root/lib/modules/{release}
mount -t proc proc /root/proc
mount -t sysfs sysfs /root/sys
mount -t devtmpfs devtmpfs /root/dev
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts devpts /root/dev/pts
mount -t tmpfs tmpfs /root/dev/shm
mount -t tmpfs tmpfs /root/run
# no tmpfs on /tmp: the overlay's /tmp is writable already, and a checkout under the host's /tmp (CI's
# clone can be there) must stay visible in the guest
mount -t bpf bpf /root/sys/fs/bpf
mount -t cgroup2 cgroup2 /root/sys/fs/cgroup
ip link set lo up 2>/dev/null
# The kernel runs its module loader (bridge, veth, netfilter on demand) with the
# initramfs as its root, not the command's chroot: send it into the chroot.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /root /sbin/modprobe "$@"\n' > /modprobe-in-root
chmod 755 /modprobe-in-root
echo /modprobe-in-root > /proc/sys/kernel/modprobe
echo "merbridge-vm: running on $(uname -r)"
chroot /root /usr/bin/env -i {env} /bin/bash -c {command}
status=$?
echo "{mark}: $status"
sync
poweroff -f
"""


def init_script(release: str, modules_dir: str, command: str, cwd: str, env: dict[str, str]) -> str:
    """The init's text. `modules_dir`: the host path of the guest kernel's
    lib/modules/RELEASE; `command` runs in bash in `cwd` with exactly `env`."""
    env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    script = f"cd {shlex.quote(cwd)} && {command}"
    return INIT_TEMPLATE.format(tag=VIRTFS_TAG, release=release, modules_dir=modules_dir,
                                env=env_words, command=shlex.quote(script), mark=STATUS_MARK)


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    deps = {}
    for line in text.splitlines():
        if ":" in line:
            path, rest = line.split(":", 1)
            deps[path] = rest.split()
    return deps


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def load_order(modules_dep: str, builtin: str, wanted=NEEDED_MODULES) -> list[str]:
    """Module paths (as in modules.dep) to insmod in this order for `wanted`,
    dependencies first; modules the kernel has built in are left out."""
    deps = parse_modules_dep(modules_dep)
    by_name = {_module_name(p): p for p in deps}
    builtin_names = {_module_name(p) for p in builtin.split()}
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):   # modules.dep lists the deepest dependency last
            add(d)
        order.append(path)

    for name in wanted:
        if name in builtin_names:
            continue
        if name not in by_name:
            raise FileNotFoundError(f"module {name} is neither built in nor in modules.dep")
        add(by_name[name])
    return order


def build(kernel_root: Path, release: str, command: str, cwd: str, env: dict[str, str], out: Path) -> Path:
    """Write the initramfs (newc cpio, uncompressed: the kernel unpacks it fastest) to `out`."""
    mods = kernel_root / "lib" / "modules" / release
    order = load_order((mods / "modules.dep").read_text(), (mods / "modules.builtin").read_text())
    with tempfile.TemporaryDirectory(prefix="mbp-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "modules", "proc", "sys", "dev"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        names = []
        for rel in order:
            src = mods / rel
            name = _module_name(rel) + ".ko"
            data = src.read_bytes()
            if rel.endswith(".xz"):   # busybox's insmod takes plain .ko only
                data = lzma.decompress(data)
            (root / "modules" / name).write_bytes(data)
            names.append(name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        init = root / "init"
        init.write_text(init_script(release, str(mods.resolve()), command, cwd, env))
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
        with out.open("wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(), stdout=f,
                           check=True)
    return out
