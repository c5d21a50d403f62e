"""The pure parts of the kernel matrix (merbridge_py/kernels): which Debian
packages it picks, how it reads a VM's console, and what the guest's init
mounts. No VM here; `make test-kernels` boots them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merbridge_py.kernels import initramfs, matrix, packages, vm

APT_CACHE_SEARCH = """\
linux-image-6.1.0-47-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-57-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-57-amd64-dbg - Debug symbols for linux-image-6.1.0-57-amd64
linux-image-6.1.0-57-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-57-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.12.100+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.101+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.118+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.118+deb12-rt-amd64 - Linux 6.12 for 64-bit PCs, PREEMPT_RT (signed)
linux-image-6.12.99+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
"""


def test_bookworm_choice_newest_61_the_regressed_612_and_the_newest_612():
    choices = packages.choose_bookworm(packages.package_names(APT_CACHE_SEARCH))
    assert [(c.package, c.release, c.note) for c in choices] == [
        ("linux-image-6.1.0-57-amd64", "6.1.0-57-amd64", ""),          # 57 > 9 as numbers, not as text
        ("linux-image-6.12.100+deb12-amd64", "6.12.100+deb12-amd64", ""),
        ("linux-image-6.12.118+deb12-amd64", "6.12.118+deb12-amd64", ""),
    ]
    assert all(c.expect == "pass" and c.suite == "bookworm" for c in choices)


def test_when_6_12_100_is_gone_the_oldest_6_12_left_stands_in_and_says_so():
    names = [n for n in packages.package_names(APT_CACHE_SEARCH) if "6.12.100" not in n]
    regressed = packages.choose_bookworm(names)[1]
    assert regressed.package == "linux-image-6.12.101+deb12-amd64"
    assert "6.12.100 has left the archive" in regressed.note and "6.12.101" in regressed.note


def test_one_6_12_left_is_both_columns_once():
    names = ["linux-image-6.1.0-57-amd64", "linux-image-6.12.118+deb12-amd64"]
    assert [c.release for c in packages.choose_bookworm(names)] == ["6.1.0-57-amd64", "6.12.118+deb12-amd64"]


def test_bullseye_choice_and_missing_packages_are_clear_errors():
    choice = packages.choose_bullseye(["linux-image-5.10.0-9-amd64", "linux-image-5.10.0-46-amd64",
                                       "linux-image-5.10.0-46-cloud-amd64"])
    assert (choice.release, choice.expect, choice.suite) == ("5.10.0-46-amd64", "refused", "bullseye")
    with pytest.raises(packages.KernelPackageError, match="apt-get update"):
        packages.choose_bookworm(["linux-image-6.12.118+deb12-amd64"])
    with pytest.raises(packages.KernelPackageError, match="bullseye"):
        packages.choose_bullseye([])


def test_private_apt_configuration_never_points_at_the_hosts(tmp_path):
    apt = packages.Apt(tmp_path / "apt", packages.BULLSEYE_SOURCES)
    options = dict(o.split("=", 1) for o in apt.options[1::2])
    for key in ("Dir::Etc::SourceList", "Dir::Etc::SourceParts", "Dir::State::Lists", "Dir::Cache"):
        assert options[key].startswith(str(tmp_path)), key
    assert options["Dir::State::status"] == "/dev/null"
    assert "bullseye main" in (tmp_path / "apt" / "etc" / "sources.list").read_text()


CONSOLE = """\
[    1.234] Run /init as init process
merbridge-vm: running on 6.1.0-57-amd64
..F.
FAILED tests/test_x.py::test_y - AssertionError
=================== 1 failed, 3 passed, 1 skipped in 245.31s (0:04:05) ===================
MERBRIDGE-VM-EXIT-STATUS: 1\r
[  250.000] reboot: Power down
"""


def test_status_line_and_pytest_counts_from_the_console():
    assert vm.exit_status(CONSOLE) == 1
    assert vm.exit_status("MERBRIDGE-VM-EXIT-STATUS: 0\nMERBRIDGE-VM-EXIT-STATUS: 2\n") == 2  # the last one counts
    assert vm.exit_status("kernel panic\n") is None
    assert vm.exit_status("echo MERBRIDGE-VM-EXIT-STATUS: 0 inside a line\n") is None
    assert matrix.pytest_counts(CONSOLE) == {"failed": 1, "passed": 3, "skipped": 1}
    assert matrix.pytest_counts("5 passed in 3.10s\n") == {"passed": 5}
    assert matrix.pytest_counts("\x1b[31m1 failed\x1b[0m\x1b[31m in 97.15s (0:01:37)\x1b[0m\n") == {"failed": 1}
    assert matrix.pytest_counts("1 error in 2.0s\n") == {"error": 1}
    assert matrix.pytest_counts("no summary here\n") == {}


def refusal_run(console: str, status: int | None) -> vm.VmRun:
    return vm.VmRun(status, console, 1.0, False)


def test_a_refusal_counts_only_when_doctor_names_the_helper_and_loading_failed():
    doctor = ("[FAIL] helper bpf_get_netns_cookie: the verifier refuses it in sockops: "
              "unknown func bpf_get_netns_cookie#122\n")
    assert matrix.judge_refusal(refusal_run(doctor, 1))[:2] == (True, "refused (expected)")
    assert matrix.judge_refusal(refusal_run(doctor, 0))[:2] == (False, "NOT refused")
    assert matrix.judge_refusal(refusal_run("[FAIL] kernel version: 5.10\n", 1))[0] is False
    statistics_only = "[FAIL] helper bpf_get_netns_cookie: ... processed 1 insns (limit 1000000)\n"
    assert matrix.judge_refusal(refusal_run(statistics_only, 1))[0] is False
    assert matrix.judge_refusal(refusal_run(doctor, None))[0] is False


def test_init_mounts_what_the_tests_need_and_prints_the_status():
    script = initramfs.init_script("6.1.0-57-amd64", "/cache/6.1.0-57-amd64/lib/modules/6.1.0-57-amd64",
                                   "python -m pytest 'tests/x.py::t[a b]'", "/work/project",
                                   {"MERBRIDGE_REQUIRE_BPF": "1", "PATH": "/usr/bin:/bin"})
    for needed in (f"mount -t 9p -o trans=virtio,version=9p2000.L,ro", initramfs.VIRTFS_TAG,
                   "mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /root",
                   "mount --bind /lower/cache/6.1.0-57-amd64/lib/modules/6.1.0-57-amd64 /root/lib/modules/6.1.0-57-amd64",
                   "mount -t proc proc /root/proc", "mount -t sysfs sysfs /root/sys",
                   "mount -t devtmpfs devtmpfs /root/dev", "mount -t tmpfs tmpfs /root/run",
                   "mount -t bpf bpf /root/sys/fs/bpf", "mount -t cgroup2 cgroup2 /root/sys/fs/cgroup",
                   "echo /modprobe-in-root > /proc/sys/kernel/modprobe",   # bridge, veth, nf modules on demand
                   f'echo "{initramfs.STATUS_MARK}: $status"', "poweroff -f"):
        assert needed in script, needed
    assert "MERBRIDGE_REQUIRE_BPF=1" in script
    # the command reaches bash as one quoted word, brackets and spaces intact
    assert "-c 'cd /work/project && python -m pytest '\"'\"'tests/x.py::t[a b]'\"'\"''" in script


MODULES_DEP = """\
kernel/fs/netfs/netfs.ko.xz:
kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/fs/overlayfs/overlay.ko.xz:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
"""


def test_module_load_order_puts_dependencies_first_and_skips_built_ins():
    order = initramfs.load_order(MODULES_DEP, "kernel/drivers/virtio/virtio_pci.ko\n")
    assert order == ["kernel/fs/netfs/netfs.ko.xz", "kernel/net/9p/9pnet.ko.xz", "kernel/net/9p/9pnet_virtio.ko.xz",
                     "kernel/fs/9p/9p.ko.xz", "kernel/fs/overlayfs/overlay.ko.xz"]
    with_pci = initramfs.load_order(MODULES_DEP, "")
    assert with_pci[:3] == ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
                            "kernel/drivers/virtio/virtio_pci.ko"]
    with pytest.raises(FileNotFoundError, match="overlay"):
        initramfs.load_order("kernel/fs/9p/9p.ko:\n", "", wanted=("overlay",))


def test_the_test_list_is_data_and_missing_files_are_left_out_with_a_note(tmp_path):
    assert all(isinstance(t, str) and t.startswith("tests/") for t in matrix.KERNEL_TESTS)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("")
    kept, notes = matrix.existing_tests(["tests/test_a.py::test_x[ebpf]", "tests/test_b.py"], tmp_path)
    assert kept == ["tests/test_a.py::test_x[ebpf]"]
    assert notes == ["tests/test_b.py does not exist: left out"]


def test_qemu_runs_software_emulation_with_the_host_root_read_only(tmp_path):
    argv = vm.qemu_argv(tmp_path / "vmlinuz", tmp_path / "initrd")
    assert argv[argv.index("-accel") + 1] == "tcg"
    virtfs = argv[argv.index("-virtfs") + 1]
    assert "path=/," in virtfs and "readonly=on" in virtfs
    assert "-no-reboot" in argv


def test_a_vm_past_its_timeout_is_killed_and_has_no_status(tmp_path, monkeypatch):
    monkeypatch.setattr(vm, "qemu_argv", lambda *a, **kw: ["sh", "-c", "echo booting; exec sleep 60"])
    run = vm.boot(tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "console.log", timeout=1)
    assert run.timed_out and run.status is None
    assert run.console == "booting\n" and run.seconds < 30


def test_timeout_scale_stretches_start_up_waits_and_refuses_nonsense(monkeypatch):
    from merbridge_py.testbed.testbed import TIMEOUT_SCALE_ENV, TestbedError, timeout_scale
    monkeypatch.delenv(TIMEOUT_SCALE_ENV, raising=False)
    assert timeout_scale() == 1
    assert matrix.GUEST_ENV[TIMEOUT_SCALE_ENV] == "5"
    monkeypatch.setenv(TIMEOUT_SCALE_ENV, "2.5")
    assert timeout_scale() == 2.5
    for bad in ("fast", "0.5"):
        monkeypatch.setenv(TIMEOUT_SCALE_ENV, bad)
        with pytest.raises(TestbedError, match=TIMEOUT_SCALE_ENV):
            timeout_scale()


def test_loader_timeout_can_be_raised_for_slow_machines_and_refuses_nonsense(monkeypatch):
    from merbridge_py import datapath
    monkeypatch.delenv(datapath.LOADER_TIMEOUT_ENV, raising=False)
    assert datapath.loader_timeout() == datapath.LOADER_TIMEOUT
    assert matrix.GUEST_ENV[datapath.LOADER_TIMEOUT_ENV] == "900"
    monkeypatch.setenv(datapath.LOADER_TIMEOUT_ENV, "300")
    assert datapath.loader_timeout() == 300
    for bad in ("slow", "0"):
        monkeypatch.setenv(datapath.LOADER_TIMEOUT_ENV, bad)
        with pytest.raises(datapath.DatapathError, match=datapath.LOADER_TIMEOUT_ENV):
            datapath.loader_timeout()


def test_the_probes_line_of_a_guest_is_found_and_its_command_prints_it():
    from merbridge_py.kernels import matrix
    console = "boot noise\r\nMERBRIDGE-PROBES: kernel probes: fionread_redirected invisible; splice mode off: why\r\n1 passed"
    assert matrix.probes_line(console) == "kernel probes: fionread_redirected invisible; splice mode off: why"
    assert matrix.probes_line("no such line") == ""
    assert matrix.PROBES_MARK in matrix.probes_command("/venv/bin/python")


def test_chosen_tests_replace_the_list_and_a_missing_file_is_an_error(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("")
    chosen = ["tests/test_a.py::test_x[ebpf-same-node]", "tests/test_a.py", "tests/test_a.py"]
    assert matrix.chosen_tests(chosen, tmp_path) == (["tests/test_a.py::test_x[ebpf-same-node]", "tests/test_a.py"], [])
    with pytest.raises(matrix.NodeIdError, match="tests/test_b.py does not exist: nothing to run"):
        matrix.chosen_tests(["tests/test_a.py", "tests/test_b.py::test_y"], tmp_path)
    with pytest.raises(matrix.NodeIdError, match="not a pytest node id under tests/: -k"):
        matrix.chosen_tests(["-k"], tmp_path)
    # none chosen: the matrix's own list, files not there yet left out with a note
    kept, notes = matrix.chosen_tests([], tmp_path)
    assert kept == [] and len(notes) == len(matrix.KERNEL_TESTS)


def test_cli_test_option_runs_only_the_chosen_node_ids(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from merbridge_py.kernels import cli
    seen = {}

    def fake_run_matrix(cache, project, out, only, update, echo, tests):
        seen.update(only=only, tests=tests)
        return [matrix.host_row()]

    monkeypatch.setattr(matrix, "run_matrix", fake_run_matrix)
    chosen = ["tests/test_peer_name.py::test_untouched_sockets_show_the_kernels_peer", "tests/test_loader.py"]
    args = ["--json", str(tmp_path / "m.json"), "--only", "6.12.118"]
    r = CliRunner().invoke(cli.test_kernels, args + [a for t in chosen for a in ("--test", t)])
    assert r.exit_code == 0, r.output
    assert seen == {"only": ["6.12.118"], "tests": chosen}
    assert json.loads((tmp_path / "m.json").read_text())["tests"] == chosen   # the report names what ran
    r = CliRunner().invoke(cli.test_kernels, args + ["--test", "tests/test_not_there.py"])
    assert r.exit_code == 2 and "test_not_there.py does not exist" in r.output
    assert seen["tests"] == chosen, "an unknown node id must stop the run before any VM"


def test_the_guest_runs_pytest_then_reports_its_compiles_keeping_pytests_status():
    command = matrix.with_compile_report(matrix.pytest_command("/v/bin/python", ["tests/test_a.py::t[x y]"]))
    assert command.startswith("/v/bin/python -m pytest -q") and "--durations=0" in command
    assert "'tests/test_a.py::t[x y]'; status=$?;" in command and command.endswith("exit $status")
    assert f"sed 's/^/{matrix.COMPILE_MARK} /' {matrix.COMPILE_LOG}" in command
    env = matrix.guest_env()
    assert env[matrix.COMPILE_LOG_ENV] == matrix.COMPILE_LOG
    assert (Path(env["PYTHONPATH"]) / "sitecustomize.py").is_file()


def test_compile_times_and_their_share_of_the_wall_time():
    console = ("..\n"
               f'{matrix.COMPILE_MARK} {{"seconds": 31.5, "ok": true, "program": "loader.py", "test": "t (setup)"}}\r\n'
               f'{matrix.COMPILE_MARK} {{"seconds": 12.25, "ok": false, "program": "pytest", "test": "u (call)"}}\n'
               f'{matrix.COMPILE_MARK} {{"seconds": 4\n'          # cut by the console: not counted
               "MERBRIDGE-VM-EXIT-STATUS: 0\n")
    assert matrix.compile_times(console) == [31.5, 12.25]
    row = matrix.KernelResult("6.1 newest", "6.1.0-57-amd64", "p", "pass", "passed", True, seconds=175.0,
                              counts={"passed": 3}, compiles=2, compile_seconds=43.75)
    assert matrix.format_compiles(row) == "2: 44 s (25%)"
    assert matrix.format_compiles(matrix.host_row()) == "-"
    assert "2: 44 s (25%)" in matrix.table([matrix.host_row(), row]).splitlines()[-1]


def test_the_guest_compile_timer_records_each_bcc_compile_and_never_breaks_one(tmp_path):
    """guest/sitecustomize.py against a stand-in bcc package (the real one needs
    root and seconds per compile): one line per BPF(), the failed one too."""
    fake = tmp_path / "site" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "class BPF:\n"
        "    def __init__(self, text=b''):\n"
        "        if b'bad' in text:\n"
        "            raise Exception('compile failed')\n"
        "        self.text = text\n")
    log = tmp_path / "compiles.jsonl"
    program = ("import os, bcc\n"
               "os.environ['PYTEST_CURRENT_TEST'] = 'tests/test_a.py::t (call)'\n"
               "assert bcc.BPF(text=b'ok').text == b'ok'\n"
               "try:\n    bcc.BPF(text=b'bad')\nexcept Exception as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": f"{matrix.GUEST_SITE}:{tmp_path / 'site'}", matrix.COMPILE_LOG_ENV: str(log)}
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "compile failed\n", done.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["ok"], r["test"]) for r in records] == [(True, "tests/test_a.py::t (call)"),
                                                         (False, "tests/test_a.py::t (call)")]
    assert all(isinstance(r["seconds"], float) for r in records)
    # an unwritable log loses the measurement, never the compile; without the variable nothing is wrapped
    env[matrix.COMPILE_LOG_ENV] = str(tmp_path / "no" / "such" / "dir" / "log")
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    del env[matrix.COMPILE_LOG_ENV]
    done = subprocess.run([sys.executable, "-c", "import bcc; print(bcc.BPF.__init__.__name__)"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "__init__\n", done.stderr
