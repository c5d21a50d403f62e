"""A fresh machine has only what scripts/install-system-deps.sh installs. These tests fail, naming the package
to add, when the code runs a program that scripts/system-programs.txt does not list, when a listed package is
not installed by the script, or when a listed program is missing on this machine."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from merbridge_py import system_programs

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("merbridge_py", "tests", "benchmarks", "scripts", ".ci", "Makefile")

# Words the scan below finds that name an executable on this machine but are not programs we run.
NOT_PROGRAMS = {
    "file": "an argparse choice (benchmarks/agent_footprint.py --source)",
    "node": "a key of the benchmark's datapath rows",
    "watch": "a query parameter of the fake API server",
    "route": "a key of Envoy's route configuration",
    "idle": "a key of /proc/stat's counters",
    "python": "the test bed's app choice; the project's Python is the venv's",
    "reboot": "a syscall name in the seccomp profile helper",
    "chroot": "a syscall name in the seccomp profile helper",
    "host": "the kernel matrix's label for this machine's own kernel",
}


def _candidate_words() -> set[str]:
    """The first quoted word of an argument list, or a name looked up with which(): how this code runs programs."""
    words = set()
    for sub in SCANNED:
        top = REPO / sub
        files = [top] if top.is_file() else [f for f in top.rglob("*") if f.is_file() and f.suffix in (".py", ".sh", "")]
        for f in files:
            if ".venv" in f.parts:
                continue
            text = f.read_text(errors="ignore")
            words |= set(re.findall(r"[\[(]\s*[\"']([A-Za-z0-9][A-Za-z0-9_.+-]{1,40})[\"']\s*[,\])]", text))
            words |= set(re.findall(r"which\(\s*[\"']([A-Za-z0-9][A-Za-z0-9_.+-]{1,40})[\"']", text))
    return words


def _owners(exes: list[str]) -> dict[str, str]:
    """exe -> the Debian package that ships it, in one dpkg call (dpkg records /bin paths on merged-/usr systems)."""
    variants = {}
    for exe in exes:
        real = os.path.realpath(exe)
        for path in (real, re.sub(r"^/usr(?=/s?bin/)", "", real)):
            variants[path] = exe
    out = subprocess.run(["dpkg", "-S", *variants], capture_output=True, text=True).stdout
    owners = {}
    for line in out.splitlines():
        packages, _, path = line.partition(": ")
        if path.strip() in variants:
            owners[variants[path.strip()]] = packages.split(",")[0].split(":")[0].strip()
    return owners


def _essential() -> set[str]:
    """Packages every Debian system has (Essential: yes, or Priority: required, which even debootstrap's
    minbase installs): no install script needs to name them."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Essential} ${Priority}\n"],
                         capture_output=True, text=True).stdout
    return {f[0] for f in (line.split() for line in out.splitlines()) if "yes" in f[1:] or "required" in f[1:]}


def _script_packages(script: Path) -> set[str]:
    m = re.search(r"packages=\((.*?)\n\)", script.read_text(), re.S)
    assert m, f"{script}: no packages=( ... ) array"
    return {word for line in m.group(1).splitlines() for word in line.split("#", 1)[0].split()}


def unlisted_programs(listed: dict[str, str]) -> list[str]:
    """Programs the code runs that are on this machine, come from a non-essential package and are not listed."""
    essential = _essential()
    exes = {}
    for word in sorted(_candidate_words() - set(listed) - set(NOT_PROGRAMS)):
        exe = shutil.which(word)
        if exe is not None and exe.startswith(("/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/")):
            exes[word] = exe
    owners = _owners(list(exes.values()))
    return [f"{word} (Debian package {owners[exe]})" for word, exe in exes.items()
            if exe in owners and owners[exe] not in essential]


def uninstalled_packages(listed: dict[str, str], script: Path) -> list[str]:
    """Listed packages that the install script does not install (essential ones need not be named)."""
    installed, essential = _script_packages(script), _essential()
    return sorted({f"{pkg} (for {prog})" for prog, pkg in listed.items() if pkg not in installed | essential})


def test_every_program_the_code_runs_is_listed():
    problems = unlisted_programs(system_programs.load())
    assert not problems, ("the code runs programs scripts/system-programs.txt does not list (a fresh machine lacks "
                          "them): add each with its package there and to scripts/install-system-deps.sh: "
                          + ", ".join(problems))


def test_every_listed_package_is_installed_by_the_script():
    problems = uninstalled_packages(system_programs.load(), system_programs.INSTALL_SCRIPT)
    assert not problems, "scripts/install-system-deps.sh does not install: " + ", ".join(problems)


def test_every_listed_program_is_on_this_machine():
    gone = system_programs.missing()
    assert not gone, "missing: " + ", ".join(f"{p} (Debian package {k})" for p, k in sorted(gone.items()))


def test_the_check_fails_when_a_program_is_dropped_from_the_list():
    listed = system_programs.load()
    assert "dig" in listed
    without_dig = {p: k for p, k in listed.items() if p != "dig"}
    assert unlisted_programs(without_dig) == ["dig (Debian package bind9-dnsutils)"]


def test_the_check_fails_when_a_package_is_dropped_from_the_install_script(tmp_path):
    script = tmp_path / "install-system-deps.sh"
    script.write_text(re.sub(r"\bbind9-dnsutils\b", "", system_programs.INSTALL_SCRIPT.read_text()))
    assert uninstalled_packages(system_programs.load(), script) == ["bind9-dnsutils (for dig)"]


def test_require_names_the_missing_program_and_its_package(tmp_path, monkeypatch):
    listing = tmp_path / "system-programs.txt"
    listing.write_text("# program package who\nip iproute2 bed\nno-such-tool-mbp some-package tests\n")
    monkeypatch.setattr(system_programs, "LIST", listing)
    assert system_programs.load(listing) == {"ip": "iproute2", "no-such-tool-mbp": "some-package"}
    with pytest.raises(system_programs.MissingPrograms, match=r"no-such-tool-mbp \(Debian package some-package\)"):
        system_programs.require()
    system_programs.require(["ip"])   # present: no error


def test_a_malformed_line_is_a_clear_error(tmp_path):
    listing = tmp_path / "system-programs.txt"
    listing.write_text("dig\n")
    with pytest.raises(ValueError, match=r"system-programs.txt:1: expected 'program package"):
        system_programs.load(listing)


def test_a_test_bed_names_the_package_of_a_missing_program_before_creating_anything(monkeypatch):
    from merbridge_py.testbed import testbed
    real_which = shutil.which
    monkeypatch.setattr(system_programs.shutil, "which", lambda name: None if name == "nft" else real_which(name))
    monkeypatch.setattr(testbed.topology, "plan", lambda *a, **k: pytest.fail("the bed went past the program check"))
    with pytest.raises(testbed.TestbedError, match=r"nft \(Debian package nftables\).*install-system-deps"):
        testbed.Testbed.up(name="mbpcheck", rules="nftables")
