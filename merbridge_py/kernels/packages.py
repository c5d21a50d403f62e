"""Which Debian kernels the matrix boots, and getting them without installing.

The names are resolved at run time: Debian's security suite drops old point
releases, so a hard-coded name stops working within weeks. Resolution is a
pure function of `apt-cache search` output (tested without a network); the
download uses `apt-get download` (nothing installed, nothing configured) and
`dpkg-deb -x` into a cache directory kept between runs.

Bookworm's kernels come through the host's own apt sources. Bullseye's 5.10
comes through a private apt configuration (its own sources list, lists and
cache directories, `-o Dir::...`), so the host's apt setup is never touched.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The 6.12 point release that carries the sockmap FIONREAD regression (TCP-path
# bytes of a socket in a sockhash invisible to FIONREAD) without its fix; see
# the FIONREAD table in the field notes. Later releases up to 6.12.117 were seen
# to carry it too, so when 6.12.100 has left the archive the oldest one left is
# the next best stand-in.
FIONREAD_REGRESSED_6_12 = 100

BULLSEYE_SOURCES = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main\n"
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security "
    "bullseye-security main\n"
)

_RE_6_1 = re.compile(r"^linux-image-(6\.1\.0-(\d+)-amd64)$")
_RE_6_12 = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb12-amd64)$")
_RE_5_10 = re.compile(r"^linux-image-(5\.10\.0-(\d+)-amd64)$")


class KernelPackageError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelChoice:
    label: str          # the matrix's column name, e.g. "6.12 (FIONREAD regression)"
    package: str        # linux-image-...
    release: str        # uname -r inside the guest
    expect: str         # "pass" or "refused"
    suite: str          # "bookworm" (host apt) or "bullseye" (private apt)
    note: str = ""      # why this one, when it is not the obvious choice


def package_names(apt_cache_search_output: str) -> list[str]:
    """Package names from `apt-cache search` lines ("name - description")."""
    return [line.split(" - ", 1)[0].strip() for line in apt_cache_search_output.splitlines() if " - " in line]


def _by_number(names: list[str], pattern: re.Pattern) -> list[tuple[int, str, str]]:
    found = []
    for n in names:
        m = pattern.match(n)
        if m:
            found.append((int(m.group(2)), n, m.group(1)))
    return sorted(found)


def choose_bookworm(names: list[str]) -> list[KernelChoice]:
    """The newest 6.1, a 6.12 carrying the FIONREAD regression, the newest 6.12."""
    k61 = _by_number(names, _RE_6_1)
    k612 = _by_number(names, _RE_6_12)
    if not k61:
        raise KernelPackageError("no linux-image-6.1.0-NN-amd64 package in the apt lists (run apt-get update)")
    if not k612:
        raise KernelPackageError("no linux-image-6.12.NNN+deb12-amd64 package in the apt lists (run apt-get update)")
    _, pkg, rel = k61[-1]
    choices = [KernelChoice("6.1 newest", pkg, rel, "pass", "bookworm")]
    wanted = [k for k in k612 if k[0] == FIONREAD_REGRESSED_6_12]
    if wanted:
        _, pkg, rel = wanted[0]
        note = ""
    else:
        point, pkg, rel = k612[0]
        note = (f"6.12.{FIONREAD_REGRESSED_6_12} has left the archive; 6.12.{point} is the oldest 6.12 left "
                "(verify it still carries the FIONREAD regression)")
    choices.append(KernelChoice("6.12 FIONREAD regression", pkg, rel, "pass", "bookworm", note))
    _, pkg_new, rel_new = k612[-1]
    if pkg_new != pkg:
        choices.append(KernelChoice("6.12 newest", pkg_new, rel_new, "pass", "bookworm"))
    return choices


def choose_bullseye(names: list[str]) -> KernelChoice:
    k510 = _by_number(names, _RE_5_10)
    if not k510:
        raise KernelPackageError("no linux-image-5.10.0-NN-amd64 package in bullseye's apt lists")
    _, pkg, rel = k510[-1]
    return KernelChoice("5.10 (expected refusal)", pkg, rel, "refused", "bullseye")


class Apt:
    """apt-get/apt-cache with either the host's configuration or a private one."""

    def __init__(self, private_root: Path | None = None, sources: str = ""):
        self.options: list[str] = []
        self.private_root = private_root
        if private_root is not None:
            private_root = self.private_root = private_root.resolve()   # apt reads relative Dir:: paths from /
            etc = private_root / "etc"
            for d in (etc / "sources.list.d", etc / "preferences.d", private_root / "lists" / "partial",
                      private_root / "cache" / "archives" / "partial"):
                d.mkdir(parents=True, exist_ok=True)
            (etc / "sources.list").write_text(sources)
            self.options = [
                "-o", f"Dir::Etc::SourceList={etc / 'sources.list'}",
                "-o", f"Dir::Etc::SourceParts={etc / 'sources.list.d'}",
                "-o", f"Dir::Etc::Preferences={etc / 'preferences'}",
                "-o", f"Dir::Etc::PreferencesParts={etc / 'preferences.d'}",
                "-o", f"Dir::State::Lists={private_root / 'lists'}",
                "-o", f"Dir::Cache={private_root / 'cache'}",
                "-o", "Dir::State::status=/dev/null",   # no installed packages: we only download
            ]
        # The cache dir may be unreadable to apt's sandbox user (_apt).
        self.options += ["-o", "APT::Sandbox::User=root"]

    def _run(self, argv: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
        r = subprocess.run(argv[:1] + self.options + argv[1:], cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise KernelPackageError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        return r.stdout

    def update(self) -> None:
        self._run(["apt-get", "-q", "update"])

    def search(self, regex: str) -> list[str]:
        return package_names(self._run(["apt-cache", "search", "--names-only", regex]))

    def download(self, package: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        self._run(["apt-get", "-q", "download", package], cwd=into, timeout=1200)
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise KernelPackageError(f"apt-get download {package} left no .deb in {into}")
        return debs[-1]


def resolve(cache: Path, update: bool = True) -> list[KernelChoice]:
    """Every kernel of the matrix, resolved against the archive as it is now."""
    host = Apt()
    names = host.search(r"^linux-image-6\.(1|12)\.")
    if update and not names:
        host.update()
        names = host.search(r"^linux-image-6\.(1|12)\.")
    choices = choose_bookworm(names)
    bullseye = Apt(cache / "apt-bullseye", BULLSEYE_SOURCES)
    if update or not any((cache / "apt-bullseye" / "lists").glob("*Packages*")):
        bullseye.update()
    choices.append(choose_bullseye(bullseye.search(r"^linux-image-5\.10\.0-")))
    return choices


def unpacked(choice: KernelChoice, cache: Path) -> Path:
    """The kernel package unpacked under cache/<release>/ (downloaded once, kept),
    with modules.dep built: the directory holds boot/vmlinuz-<release> and
    lib/modules/<release>."""
    root = cache / choice.release
    done = root / ".unpacked"
    if done.exists():
        return root
    apt = Apt(cache / "apt-bullseye", BULLSEYE_SOURCES) if choice.suite == "bullseye" else Apt()
    debs = cache / "debs"
    existing = sorted(debs.glob(f"{choice.package}_*.deb"))
    deb = existing[-1] if existing else apt.download(choice.package, debs)
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    if not (root / "lib" / "modules" / choice.release).is_dir() and (root / "usr" / "lib" / "modules").is_dir():
        (root / "lib").mkdir(exist_ok=True)
        (root / "lib" / "modules").symlink_to("../usr/lib/modules")
    subprocess.run(["depmod", "-b", str(root), choice.release], check=True)
    if not (root / "boot" / f"vmlinuz-{choice.release}").is_file():
        raise KernelPackageError(f"{deb.name} holds no boot/vmlinuz-{choice.release}")
    done.touch()
    return root
