"""What each kernel of the matrix runs, running it, and the report.

Add a test to the matrix by adding its pytest node id to KERNEL_TESTS. Keep
the list small: under software emulation every agent start compiles the
programs again (20-45 s: the loader compiles from source each time, so a
compiled object cannot be shared between tests), and a kernel's whole run
must stay within minutes for CI.
"""

from __future__ import annotations

import json
import platform
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import initramfs, packages, vm

# Run inside every kernel expected to pass. Files that do not exist (yet) are
# left out with a note, so a list entry can precede its file.
KERNEL_TESTS = [
    # compile and verify every program; the maps the agent works on through bpf(2);
    # a failed compile reported in one line
    "tests/test_loader.py::test_datapath_state_through_bpf_syscalls",
    "tests/test_loader.py::test_a_failed_compile_is_one_line_and_leaves_nothing",
    # the datapath on one simulated node, the agent attaching and detaching every
    # program twice: 300 messages through both sidecars stay off TCP when spliced
    # and cross it when not (the sockmap behaviour that differs between kernels)
    "tests/test_datapath.py::test_splicing_keeps_messages_off_tcp",
    # end to end on a one-node test bed in ebpf mode: requests through Envoy
    # sidecars speaking mTLS to each other (auto-mTLS), redirected by the agent,
    # whose process never maps bcc or LLVM. The smallest such test: the mTLS
    # STRICT one (test_testbed_e2e.py) needs two nodes, whose agents compiling at
    # once outran the loader's 120 s under emulation on a busy machine.
    "tests/test_loader.py::test_the_agent_process_never_maps_bcc_or_llvm",
    # what this kernel's sockmap really does (FIONREAD and friends)
    "tests/test_kernel_probes.py",
    # backpressure (issue 20): a paused reader holds its writer back through the
    # sidecars, and readers' progress is counted by the fexit programs, whose
    # target's arguments differ between kernels (6.18 dropped addr_len)
    "tests/test_backpressure.py",
]

# Run inside a kernel expected to refuse the programs: doctor must name the
# missing helper, and loading the programs must fail.
REFUSAL_TEST = "tests/test_loader.py::test_datapath_state_through_bpf_syscalls"
MISSING_HELPER = "bpf_get_netns_cookie"

PASS_TIMEOUT = 1800      # seconds for one kernel's whole VM run; it is killed past that
REFUSAL_TIMEOUT = 600
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "MERBRIDGE_REQUIRE_BPF": "1",     # a skipped BPF test is a failure here as in CI
    "PYTHONDONTWRITEBYTECODE": "1",
    # start-up waits x5: under emulation on 2 shared cores one compile took 52 s
    # and a test bed's Envoys missed their 30 s
    "MERBRIDGE_TIMEOUT_SCALE": "5",
    # the agent's loader child: one compile took over its default 120 s there
    "MERBRIDGE_LOADER_TIMEOUT": "900",
}
HOST_COLUMN_NOTE = "covered by the normal test suite (make test)"


@dataclass
class KernelResult:
    label: str
    release: str
    package: str
    expect: str
    result: str                 # "passed", "failed", "refused (expected)", "NOT refused", "no status", ...
    ok: bool
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)
    note: str = ""
    console_log: str = ""


def existing_tests(node_ids: list[str], project: Path) -> tuple[list[str], list[str]]:
    """(node ids whose file exists, notes for those left out)."""
    kept, notes = [], []
    for node_id in node_ids:
        if (project / node_id.split("::", 1)[0]).exists():
            kept.append(node_id)
        else:
            notes.append(f"{node_id.split('::', 1)[0]} does not exist: left out")
    return kept, notes


_SUMMARY = re.compile(r"^=*\s*(.*?) in [\d.]+s(?: \([\d:]+\))?\s*=*$")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pytest_counts(console: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 failed in 12.3s"),
    {} when there is none."""
    for line in reversed(_ANSI.sub("", console.replace("\r", "")).splitlines()):
        m = _SUMMARY.match(line.strip())
        if not m:
            continue
        counts = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)",
                            m.group(1))
        if counts:
            return {("error" if k.startswith("error") else k): int(n) for n, k in counts}
    return {}


def pytest_command(python: str, node_ids: list[str], *options: str) -> str:
    # --color=no: the guest's console is a tty, and colour codes would split the summary line
    return " ".join([shlex.quote(python), "-m", "pytest", "-q", "-ra", "--color=no", "-p", "no:cacheprovider",
                     *options, *map(shlex.quote, node_ids)])


PROBES_MARK = "MERBRIDGE-PROBES:"


def probes_command(python: str) -> str:
    """One line saying what the behaviour probes find on the guest's kernel and the splice mode the agent
    picks from them (plain bpf(2), no compile: seconds), recorded in the matrix's result."""
    code = (f"from merbridge_py.kernel_probes import probe_kernel; "
            f"print({PROBES_MARK!r}, probe_kernel().summary(), flush=True)")
    return f"{shlex.quote(python)} -c {shlex.quote(code)}"


def probes_line(console: str) -> str:
    for line in _ANSI.sub("", console.replace("\r", "")).splitlines():
        if line.startswith(PROBES_MARK):
            return line[len(PROBES_MARK):].strip()
    return ""


def refusal_command(python: str) -> str:
    merbridge = shlex.quote(str(Path(python).parent / "merbridge-py"))
    # the verifier's whole log, captured by pytest, would take minutes to cross the emulated serial port
    load = pytest_command(python, [REFUSAL_TEST], "--tb=line", "--show-capture=no")
    return f"{merbridge} doctor; echo \"doctor exit status: $?\"; {load}"


def judge_refusal(run: vm.VmRun) -> tuple[bool, str, str]:
    """Refused as expected: doctor names the missing helper and loading the
    programs failed. Returns (as expected, result, doctor's line)."""
    said = [line.strip() for line in run.console.splitlines()
            if line.startswith("[FAIL]") and f"unknown func {MISSING_HELPER}" in line]
    load_failed = run.status not in (None, 0)
    if said and load_failed:
        return True, "refused (expected)", said[0]
    if run.status is None:
        return False, "no status (timeout or crash)", ""
    return False, "NOT refused" if run.status == 0 else "refused, but doctor did not name " + MISSING_HELPER, ""


def run_kernel(choice: packages.KernelChoice, cache: Path, project: Path, out_dir: Path, python: str,
               tests: list[str]) -> KernelResult:
    root = packages.unpacked(choice, cache)
    if choice.expect == "refused":
        command, timeout = refusal_command(python), REFUSAL_TIMEOUT
    else:
        # the probes first; the status the guest prints is pytest's
        command, timeout = f"{probes_command(python)}; {pytest_command(python, tests)}", PASS_TIMEOUT
    initrd = initramfs.build(root, choice.release, command, str(project), GUEST_ENV,
                             out_dir / f"initrd-{choice.release}.cpio")
    log = out_dir / f"console-{choice.release}.log"
    run = vm.boot(root / "boot" / f"vmlinuz-{choice.release}", initrd, log, timeout)
    initrd.unlink()
    counts = pytest_counts(run.console)
    note = choice.note
    if choice.expect == "refused":
        ok, result, said = judge_refusal(run)
        note = note or said
    elif run.timed_out:
        ok, result = False, f"timed out after {timeout} s"
    elif run.status is None:
        ok, result = False, "no status line (the guest crashed?)"
    else:
        ok = run.status == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")
        result = "passed" if ok else f"failed (exit status {run.status})"
    if choice.expect != "refused":
        note = "; ".join(n for n in (note, probes_line(run.console)) if n)
    return KernelResult(choice.label, choice.release, choice.package, choice.expect, result, ok,
                        round(run.seconds, 1), counts, note, str(log))


def host_row() -> KernelResult:
    return KernelResult("host", platform.release(), "(this machine's kernel)", "pass", HOST_COLUMN_NOTE, True)


def format_counts(counts: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items() if k in ("passed", "failed", "error", "skipped")) or "-"


def table(rows: list[KernelResult]) -> str:
    head = ("kernel", "release", "wall time", "result", "tests")
    body = [(r.label, r.release, f"{r.seconds:.0f} s" if r.seconds else "-", r.result, format_counts(r.counts))
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(rows: list[KernelResult], path: Path, tests: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "tests": tests,
                                "kernels": [asdict(r) for r in rows]}, indent=2) + "\n")


def run_matrix(cache: Path, project: Path, out_dir: Path, only: list[str] | None = None, update: bool = True,
               echo=print, python: str | None = None) -> list[KernelResult]:
    """Every kernel, one VM at a time (emulation is CPU hungry; the machine is shared)."""
    python = python or sys.executable
    tests, notes = existing_tests(KERNEL_TESTS, project)
    for note in notes:
        echo(f"note: {note}")
    choices = packages.resolve(cache, update=update)
    for c in choices:
        if c.note:
            echo(f"note: {c.label}: {c.note}")
    if only:
        choices = [c for c in choices if any(o in c.label or o in c.release for o in only)]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [host_row()]
    for c in choices:
        echo(f"== {c.label}: {c.package} (expect: {c.expect})")
        r = run_kernel(c, cache, project, out_dir, python, tests)
        echo(f"== {c.label}: {r.result} [{format_counts(r.counts)}] in {r.seconds:.0f} s; console: {r.console_log}")
        rows.append(r)
    return rows
